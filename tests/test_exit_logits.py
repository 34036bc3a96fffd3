"""Cheap checks: exit logits reused for sampling, and a static token shortlist as a first stage.

Both are compared with the HF reference in the real engine. A row that leaves
after a full-vocabulary check is sampled from that check's logits (vLLM does not
run the LM head for it again): the tokens must stay the reference's, and the
counters say how many tokens were sampled that way.
"""

from __future__ import annotations

import pytest

from vllm_early_exit import EarlyExitConfigError
from vllm_early_exit.model_executor.early_exit.shortlist import write_shortlist

from .conftest import EVEN_TOKENS, MIXED, NEW_TOKENS, run_engine, tiny_prompts
from .test_correctness import exit_counts
from .test_settings import _start

TWO_STAGE = {"exit_layers": (1, 3), "threshold": 0.2}


@pytest.fixture(scope="module")
def per_token_run(tiny_llama, mixed_traces):
    """``MIXED`` under per_token: each prompt alone, then all of them in one batch."""
    prompts, _ = mixed_traces
    return run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit={**MIXED, "policy": "per_token"}, batched="both"
    )


def test_rows_that_leave_are_sampled_from_their_check_logits(per_token_run, reference, mixed_traces):
    """per_token, alone and batched: every early token took its check's logits, tokens unchanged."""
    _, traces = mixed_traces
    expected = [t.tokens for t in traces]
    assert per_token_run["outputs"] == expected
    assert per_token_run["outputs_batched"] == expected
    stats = per_token_run["stats"][0]
    assert stats["exits_per_layer"] == [2 * n for n in exit_counts(traces, reference.num_layers)]
    assert stats["sampled_from_checks"] == stats["early_exit_tokens"] > 0


def test_each_step_is_counted_as_deep_as_its_deepest_row(per_token_run, reference, mixed_traces):
    """The step counters (what the cost model prices a batch by): alone, a step is its token;
    batched, the step of the i-th tokens stops at the deepest of their exits (full depth when
    any of them goes the full depth), and only full-depth steps take vLLM's LM head."""
    _, traces = mixed_traces
    last = reference.num_layers - 1
    alone = [layer for t in traces for layer in t.exit_layers]
    batched = [
        None if None in layers else max(layers) for layers in zip(*(t.exit_layers for t in traces))
    ]
    steps = alone + batched
    expected = [sum(1 for layer in steps if layer == index) for index in range(reference.num_layers)]
    stats = per_token_run["stats"][0]
    assert stats["step_exits_per_layer"] == expected
    assert stats["full_depth_steps"] == steps.count(None) > 0
    assert stats["decode_steps"] == len(steps) == (len(traces) + 1) * (NEW_TOKENS - 1)
    assert stats["sampling_products"] == steps.count(None)
    # Batched, steps stop later than their rows on average: the rows that left rode along.
    assert batched.count(None) > len([l for l in alone if l is None]) / len(traces)
    assert expected[last] == 0  # a step that reaches the last layer ran every layer


def test_whole_step_leaving_needs_no_lm_head(tiny_llama, reference):
    """policy all, one request at a time: when the step leaves, every row's logits are the check's."""
    prompts = tiny_prompts(2, seed=11)
    rule = {"exit_layers": (2,), "threshold": 0.3}
    traces = [reference.generate(p, NEW_TOKENS, **rule) for p in prompts]
    result = run_engine(tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit={**rule, "exit_layers": [2]})
    assert result["outputs"] == [t.tokens for t in traces]
    stats = result["stats"][0]
    assert stats["sampled_from_checks"] == stats["early_exit_tokens"] == sum(t.exit_layers.count(2) for t in traces) > 0


def test_two_stage_check_matches_reference(tiny_llama, reference, even_shortlist):
    """Max-prob over the shortlist first, then over the full vocabulary: rows leave only when both pass,
    so fewer leave than with the full check alone, and never where it would not."""
    prompts = tiny_prompts(3, seed=7)
    traces = [reference.generate(p, NEW_TOKENS, **TWO_STAGE, shortlist=EVEN_TOKENS) for p in prompts]
    full = [reference.generate(p, NEW_TOKENS, **TWO_STAGE) for p in prompts]
    margins = [abs(c - TWO_STAGE["threshold"]) for t in traces for step in t.confidences for c in step.values()]
    assert min(margins) > 1e-3
    settings = {"exit_layers": [1, 3], "threshold": 0.2, "policy": "per_token", "shortlist": str(even_shortlist)}
    result = run_engine(tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=settings, batched=True)
    assert result["outputs"] == [t.tokens for t in traces]
    counts = exit_counts(traces, reference.num_layers)
    assert result["stats"][0]["exits_per_layer"] == counts
    assert 0 < sum(counts) < sum(exit_counts(full, reference.num_layers))
    assert result["stats"][0]["sampled_from_checks"] == sum(counts)


@pytest.mark.parametrize("engine", [{}, {"enforce_eager": False}], ids=["eager", "compiled"])
def test_two_stage_checks_in_a_batch_match_reference(tiny_llama, reference, even_shortlist, engine):
    """per_token with a shortlist, four requests in one batch: at each check the rows that pass
    the first stage are confirmed over the full vocabulary (every row of the step is read, the
    others' readings ignored), each row leaves at its first confirmed check, and the rows that
    left ride along frozen. Tokens and exits are the reference's, alone and in the compiled groups."""
    prompts = tiny_prompts(4, seed=7)
    traces = [reference.generate(p, NEW_TOKENS, **TWO_STAGE, shortlist=EVEN_TOKENS) for p in prompts]
    settings = {"exit_layers": [1, 3], "threshold": 0.2, "policy": "per_token", "shortlist": str(even_shortlist)}
    result = run_engine(tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=settings, batched=True, **engine)
    assert result["outputs"] == [t.tokens for t in traces]
    stats = result["stats"][0]
    assert stats["exits_per_layer"] == exit_counts(traces, reference.num_layers)
    assert stats["sampled_from_checks"] == stats["early_exit_tokens"] > 0


@pytest.mark.parametrize("policy", [{"policy": "all"}, {"policy": "quorum", "quorum": 0.5}], ids=["all", "quorum"])
def test_step_policies_confirm_only_steps_that_can_leave(tiny_llama, tmp_path, policy):
    """all / quorum with a shortlist of every token (its first stage is the full check): the
    step's decisions are those of full scoring, but the full readout runs only where the
    first stage lets the whole step leave, so every confirmation is a step that left. The
    confirmation reads the rows that passed the first stage, so under the quorum the rows it
    carries along without being confident are sampled by vLLM's own LM-head product."""
    every = write_shortlist(tmp_path / "every.json", list(range(512)), 512, {"test": True})
    prompts = tiny_prompts(3, seed=7)
    settings = {"exit_layers": [1, 3], "threshold": 0.2, **policy}
    requests = [(p, NEW_TOKENS) for p in prompts]
    full = run_engine(tiny_llama, requests, early_exit=settings, batched=True)
    gated = run_engine(tiny_llama, requests, early_exit={**settings, "shortlist": str(every)}, batched=True)
    assert gated["outputs"] == full["outputs"]
    stats, full_stats = gated["stats"][0], full["stats"][0]
    assert stats["exits_per_layer"] == full_stats["exits_per_layer"]
    assert stats["early_exit_tokens"] > 0
    # The three requests decode in lockstep: a step that leaves takes three tokens along.
    assert stats["full_readouts"] * len(prompts) == stats["early_exit_tokens"]
    assert full_stats["full_readouts"] > stats["full_readouts"]
    if policy["policy"] == "all":
        assert stats["sampled_from_checks"] == stats["early_exit_tokens"]
    else:  # rows that leave with the quorum without being confident were not read: vLLM's head samples them
        assert 0 < stats["sampled_from_checks"] < stats["early_exit_tokens"]


def test_shortlist_is_checked_at_start(tiny_llama, tmp_path, even_shortlist):
    with pytest.raises(EarlyExitConfigError, match="early_exit.shortlist=.*cannot be read.*shortlist --model"):
        _start(tiny_llama, additional_config={"early_exit": {"shortlist": str(tmp_path / "missing.json")}})
    with pytest.raises(EarlyExitConfigError, match="early_exit.shortlist=.*signal 'saturation' does not read it"):
        _start(tiny_llama, additional_config={"early_exit": {"shortlist": str(even_shortlist), "signal": "saturation"}})
    with pytest.raises(EarlyExitConfigError, match="shortlist and early_exit.vocab_top_k in the engine settings are exclusive"):
        _start(tiny_llama, additional_config={"early_exit": {"shortlist": str(even_shortlist), "vocab_top_k": 8}})
    other = write_shortlist(tmp_path / "other.json", [1, 2, 3], 49152, {})
    with pytest.raises(EarlyExitConfigError, match="vocabulary of 49152 tokens.*served model has 512"):
        _start(tiny_llama, additional_config={"early_exit": {"shortlist": str(other)}})
