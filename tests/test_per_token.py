"""``policy: "per_token"``: confident rows leave on their own, the others go on."""

from __future__ import annotations

from .conftest import MIXED, NEW_TOKENS, run_engine, tiny_prompts
from .test_correctness import exit_counts

PER_TOKEN = {**MIXED, "policy": "per_token"}


def test_per_token_is_batch_invariant_and_matches_reference(tiny_llama, reference, mixed_traces):
    """Each request decodes alone and inside a batch exactly as the HF reference decodes it
    alone: its exits no longer depend on its neighbours."""
    prompts, traces = mixed_traces
    result = run_engine(tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=PER_TOKEN, batched="both")
    expected = [t.tokens for t in traces]
    assert result["outputs"] == expected
    assert result["outputs_batched"] == expected
    # Exits per layer: the reference's, twice (alone, then batched).
    assert result["stats"][0]["exits_per_layer"] == [2 * n for n in exit_counts(traces, reference.num_layers)]

    # The strict consensus policy in a batch exits less: rows wait for each other.
    consensus = run_engine(tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=MIXED, batched=True)
    assert consensus["stats"][0]["early_exit_tokens"] < result["stats"][0]["early_exit_tokens"] / 2


def test_per_token_rows_with_early_exit_off_stay_full_depth_beside_exiting_rows(tiny_llama, reference):
    prompts = tiny_prompts(3, seed=5)
    forced = {"exit_layers": [1, 3], "threshold": 0.0, "policy": "per_token"}
    requests = [(prompts[0], NEW_TOKENS, {"early_exit": {"enabled": False}})] + [(p, NEW_TOKENS) for p in prompts[1:]]
    result = run_engine(tiny_llama, requests, early_exit=forced, batched=True)
    assert result["outputs"][0] == reference.generate(prompts[0], NEW_TOKENS).tokens
    assert result["outputs"][1:] == [
        reference.generate(p, NEW_TOKENS, exit_layers=(1, 3), threshold=0.0).tokens for p in prompts[1:]
    ]
    stats = result["stats"][0]
    assert stats["exits_per_layer"][1] == 2 * (NEW_TOKENS - 1)
    # Request 0's decode tokens ran full depth; the scheduler may put its first ones in
    # the steps that prefill the others, which are not pure-decode steps and not counted.
    assert NEW_TOKENS - 3 <= stats["full_depth_tokens"] <= NEW_TOKENS - 1


def test_decode_rows_of_mixed_steps_leave_too(tiny_llama, reference, mixed_traces):
    """A token budget of 20 per step chunks every prompt's prefill, so most steps mix one
    request's decode token with another's prefill chunk (one-token last chunks included).
    The decode rows still leave on their own: outputs and exits match the reference."""
    prompts, traces = mixed_traces
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=PER_TOKEN, batched=True,
        max_num_batched_tokens=20, max_num_seqs=4,
    )
    assert result["outputs"] == [t.tokens for t in traces]
    stats = result["stats"][0]
    assert stats["exits_per_layer"] == exit_counts(traces, reference.num_layers)
    assert stats["decode_tokens"] == len(prompts) * (NEW_TOKENS - 1)


def test_steps_with_more_rows_than_max_exit_batch_run_full_depth_unchecked(tiny_llama, reference, mixed_traces):
    """``max_exit_batch: 2``: alone, each request leaves where the reference does; three together,
    every step runs the full depth with no check, so they decode the full-depth reference's tokens."""
    prompts, traces = mixed_traces
    full = [reference.generate(p, NEW_TOKENS).tokens for p in prompts]
    assert full != [t.tokens for t in traces]  # the exits change tokens: the two runs can be told apart
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit={**PER_TOKEN, "max_exit_batch": 2}, batched="both"
    )
    assert result["outputs"] == [t.tokens for t in traces]
    assert result["outputs_batched"] == full
    stats = result["stats"][0]
    assert stats["exits_per_layer"] == exit_counts(traces, reference.num_layers)  # those of the requests alone
    assert stats["unchecked_steps"] == NEW_TOKENS - 1
    assert stats["full_depth_steps"] >= NEW_TOKENS - 1
