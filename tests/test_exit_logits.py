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


def test_each_row_leaves_at_its_earliest_confirmed_check():
    """Rows pending at several checks leave at the first one whose confirmation passed,
    with that check's stream and logits; rows confirmed nowhere stay."""
    import torch

    from vllm_early_exit.model_executor.early_exit.deferred import PendingExit, earliest

    def pending(layer, rows):
        rows = torch.tensor(rows)
        stream = rows.float().unsqueeze(1) * 10 + layer
        return PendingExit(layer, rows, stream, stream + 0.5, None, None)

    checks = [pending(1, [0, 2, 3]), pending(3, [0, 1, 3]), pending(4, [1, 3])]
    verdicts = [torch.tensor([False, True, False]), torch.tensor([True, True, True]), torch.tensor([True, True])]
    logits = [p.stream * 100 for p in checks]
    confirmed = earliest(checks, verdicts, logits, num_rows=5)
    by_row = {int(r): (c.layer, float(c.stream[i]), float(c.exit_stream[i]), float(c.logits[i]))
              for c in confirmed for i, r in enumerate(c.rows)}
    assert by_row == {
        2: (1, 21.0, 21.5, 2100.0),
        0: (3, 3.0, 3.5, 300.0),
        1: (3, 13.0, 13.5, 1300.0),
        3: (3, 33.0, 33.5, 3300.0),
    }
    assert [c.layer for c in confirmed] == [1, 3]  # the layer-4 check confirmed no row first


@pytest.mark.parametrize("engine", [{}, {"enforce_eager": False}], ids=["eager", "compiled"])
def test_deferred_confirmations_match_reference(tiny_llama, reference, even_shortlist, engine):
    """per_token with a shortlist, four requests in one batch: rows that pass the first stage
    keep running and are confirmed together (at the end of the stack, in the product that reads
    the sampling logits), each at its earliest confirmed check; rows confirmed after they ran
    deeper layers get those layers' K/V written again from the stream they left with. Tokens
    and exits are those of the reference, which confirms every check at once; a confirmed row
    whose deeper K/V kept what it computed while it went on changes the later tokens."""
    prompts = tiny_prompts(4, seed=7)
    traces = [reference.generate(p, NEW_TOKENS, **TWO_STAGE, shortlist=EVEN_TOKENS) for p in prompts]
    settings = {"exit_layers": [1, 3], "threshold": 0.2, "policy": "per_token", "shortlist": str(even_shortlist)}
    result = run_engine(tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=settings, batched=True, **engine)
    assert result["outputs"] == [t.tokens for t in traces]
    stats = result["stats"][0]
    assert stats["exits_per_layer"] == exit_counts(traces, reference.num_layers)
    assert stats["deferred_exits"] > 0
    assert stats["sampled_from_checks"] == stats["early_exit_tokens"]


@pytest.mark.parametrize("policy", [{"policy": "all"}, {"policy": "quorum", "quorum": 0.5}], ids=["all", "quorum"])
def test_step_policies_confirm_only_steps_that_can_leave(tiny_llama, tmp_path, policy):
    """all / quorum with a shortlist of every token (its first stage is the full check): the
    step's decisions are those of full scoring, but the full readout runs only where the
    first stage lets the whole step leave, so every confirmation is a step that left."""
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
    with pytest.raises(EarlyExitConfigError, match="shortlist and early_exit.vocab_top_k are exclusive"):
        _start(tiny_llama, additional_config={"early_exit": {"shortlist": str(even_shortlist), "vocab_top_k": 8}})
    other = write_shortlist(tmp_path / "other.json", [1, 2, 3], 49152, {})
    with pytest.raises(EarlyExitConfigError, match="vocabulary of 49152 tokens.*served model has 512"):
        _start(tiny_llama, additional_config={"early_exit": {"shortlist": str(other)}})
