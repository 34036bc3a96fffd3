"""``skipped_kv: "recompute"`` (catch-up): a token that left early waits, and its request's next
step runs it again beside the new token until a step runs every layer.

Every K/V a token reads is then the full model's, so the engine decodes as the HF reference
whose exited tokens run their deeper layers anyway (``reference.CatchUpReference``, with the
same ``max_waiting`` cap), and differently from state propagation. The scheduler gives a request
back its waiting tokens: a step after an exit runs ``w + 1`` rows of the request, which the
counters show as ``rerun_rows``.
"""

from __future__ import annotations

import pytest

from vllm_early_exit import EarlyExitConfig, EarlyExitConfigError, EarlyExitUnsupportedError

from .conftest import MIXED, NEW_TOKENS, run_engine, tiny_prompts
from .test_compiled import COMPILED_ENGINE, _groups
from .test_correctness import exit_counts
from .test_settings import _start

MAX_WAITING = 4
RECOMPUTE = {"skipped_kv": "recompute", "max_waiting": MAX_WAITING}


@pytest.fixture(scope="module")
def catch_up_reference(reference):
    from .reference import CatchUpReference

    return CatchUpReference(reference.model, MAX_WAITING)


def rerun_rows(trace) -> int:
    """Rows a catch-up engine runs again for ``trace``: before each decode token, the tokens
    that left since the last full-depth one."""
    rows = waiting = 0
    for exit_layer in trace.exit_layers:
        rows += waiting
        waiting = waiting + 1 if exit_layer is not None else 0
    return rows


@pytest.fixture(scope="module")
def exact_traces(catch_up_reference, mixed_traces):
    """Prompts and the catch-up reference's traces for threshold exits at layers 1 and 3."""
    prompts, propagated = mixed_traces
    layers, threshold = tuple(MIXED["exit_layers"]), MIXED["threshold"]
    traces = [catch_up_reference.generate(p, NEW_TOKENS, exit_layers=layers, threshold=threshold) for p in prompts]
    margins = [abs(c - threshold) for t in traces for step in t.confidences for c in step.values()]
    assert min(margins) > 1e-3  # no decision near the threshold: float noise cannot flip one
    assert [t.tokens for t in traces] != [t.tokens for t in propagated]  # exact K/V decodes otherwise
    return prompts, traces


PER_TOKEN = {**MIXED, "policy": "per_token", **RECOMPUTE}


def check_alone_and_batched(result: dict, prompts, traces, num_layers: int) -> None:
    expected = [t.tokens for t in traces]
    assert result["outputs"] == expected
    assert result["outputs_batched"] == expected
    stats = result["stats"][0]
    assert stats["exits_per_layer"] == [2 * n for n in exit_counts(traces, num_layers)]
    assert stats["decode_tokens"] == 2 * len(prompts) * (NEW_TOKENS - 1)
    assert stats["rerun_rows"] == 2 * sum(rerun_rows(t) for t in traces) > 0
    # A step whose rows all left is sampled from its checks' logits, groups of several rows too:
    # vLLM's LM-head product runs only after steps that reached the last layer.
    assert stats["sampling_products"] == stats["full_depth_steps"] < stats["decode_steps"]


def test_threshold_exits_match_the_exact_reference_alone_and_batched(tiny_llama, reference, exact_traces):
    """Threshold exits at layers 1 and 3, per_token: alone and three requests in a batch (groups of
    different sizes in one step), the tokens of the reference with exact K/V, not propagated."""
    prompts, traces = exact_traces
    result = run_engine(tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=PER_TOKEN, batched="both")
    check_alone_and_batched(result, prompts, traces, reference.num_layers)


def test_compiled_steps_decide_as_the_eager_ones(tiny_llama, reference, exact_traces):
    """Compiled: steps of one row per request run the compiled checked units (no fill in the exit
    branch), steps with a group of several rows decide eagerly between the compiled groups."""
    prompts, traces = exact_traces
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit={**PER_TOKEN, "compile": True}, batched="both",
        **COMPILED_ENGINE,
    )
    assert result["layer_groups"] == _groups((0, 2), (2, 4), (4, 6))
    check_alone_and_batched(result, prompts, traces, reference.num_layers)


def test_chunks_the_token_budget_cuts_run_every_layer(tiny_llama, reference, mixed_traces):
    """Every decode token leaves after layer 1 (per_token, three requests, a cap no run reaches),
    so each request's group grows by a row a step, and a token budget of 20 per step cuts them:
    a cut chunk is not sampled and runs every layer (exact, like any full-depth row), the rest of
    its group is scheduled next and leaves. Tokens: the reference's with exact K/V; fewer rows are
    re-run than without cuts (0 + 1 + ... + 22 per request)."""
    from .reference import CatchUpReference

    prompts, _ = mixed_traces
    wide = CatchUpReference(reference.model, NEW_TOKENS)
    expected = [wide.generate(p, NEW_TOKENS, exit_layers=(1,), threshold=0.0).tokens for p in prompts]
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts], batched=True, max_num_batched_tokens=20, max_num_seqs=4,
        early_exit={"exit_layers": [1], "threshold": 0.0, "policy": "per_token", **RECOMPUTE,
                    "max_waiting": NEW_TOKENS},
    )
    assert result["outputs"] == expected
    stats = result["stats"][0]
    assert stats["exits_per_layer"][1] == stats["decode_tokens"] == len(prompts) * (NEW_TOKENS - 1)
    assert 0 < stats["rerun_rows"] < len(prompts) * sum(range(NEW_TOKENS - 1))  # the budget cut groups


def test_forced_exits_wait_until_max_waiting(tiny_llama, reference, catch_up_reference):
    """Every decode token leaves after layer 1 (policy all, one request): each step runs the
    tokens waiting since the last full-depth one again, and the group that would hold more than
    ``max_waiting`` tokens runs every layer. 23 decode tokens: 4 cycles of 5 steps (4 exits, 1 full
    depth) and 3 exits; the steps run 0+1+2+3+4 rows again per cycle, then 0+1+2."""
    prompt = tiny_prompts(1, seed=4)[0]
    trace = catch_up_reference.generate(prompt, NEW_TOKENS, exit_layers=(1,), threshold=0.0)
    assert trace.exit_layers == ([1] * MAX_WAITING + [None]) * 4 + [1] * 3
    propagated = reference.generate(prompt, NEW_TOKENS, exit_layers=(1,), threshold=0.0).tokens
    assert trace.tokens != propagated

    result = run_engine(  # vLLM's default processes: the output's waiting tokens cross to the engine core
        tiny_llama, [(prompt, NEW_TOKENS)], early_exit={"exit_layers": [1], "threshold": 0.0, **RECOMPUTE},
        one_process=False,
    )
    assert result["outputs"] == [trace.tokens]
    stats = result["stats"][0]
    assert stats["exits_per_layer"][1] == 19 and stats["early_exit_tokens"] == 19
    assert stats["full_depth_tokens"] == 4
    assert stats["rerun_rows"] == 4 * 10 + 3 == rerun_rows(trace)
    assert stats["mean_layers"] == pytest.approx((19 * 2 + 4 * reference.num_layers) / 23)


def test_a_threshold_that_never_fires_is_plain_vllm(tiny_llama, reference):
    prompts = tiny_prompts(3, seed=9)
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts], batched=True,
        early_exit={"exit_layers": [1, 3], "threshold": 1.0, "policy": "per_token", **RECOMPUTE},
    )
    # The full-depth reference is plain vLLM's output (test_correctness.test_exits_disabled_is_plain_vllm).
    assert result["outputs"] == [reference.generate(p, NEW_TOKENS).tokens for p in prompts]
    stats = result["stats"][0]
    assert stats["early_exit_tokens"] == 0 and stats["rerun_rows"] == 0
    assert stats["full_depth_tokens"] == len(prompts) * (NEW_TOKENS - 1)


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"skipped_kv": "exact"}, r"early_exit.skipped_kv='exact'.*allowed values are \['propagate', 'recompute'\]"),
        ({"skipped_kv": "recompute", "max_waiting": 0}, r"early_exit.max_waiting=0.*number of tokens >= 1"),
        ({"max_waiting": 8}, r"early_exit.max_waiting=8.*only applies with skipped_kv 'recompute'"),
        ({"skipped_kv": "recompute", "skip_layers": [2]}, r"early_exit.skip_layers=\[2\].*skipped_kv 'recompute'"),
        ({"skipped_kv": "recompute", "cuda_graphs": "branches"}, r"early_exit.cuda_graphs='branches'.*'recompute'"),
    ],
)
def test_bad_catch_up_settings_name_the_setting(raw, message):
    with pytest.raises(EarlyExitConfigError, match=message):
        EarlyExitConfig.from_dict(raw)


def test_catch_up_is_not_a_request_setting_and_refuses_depth_budgets():
    from vllm_early_exit.config import EngineLimits, RequestEarlyExit

    with pytest.raises(EarlyExitConfigError, match=r"unknown per-request early_exit setting\(s\) \['skipped_kv'\]"):
        RequestEarlyExit.from_extra_args({"early_exit": {"skipped_kv": "recompute"}})
    limits = EngineLimits.of(EarlyExitConfig.from_dict(RECOMPUTE), 6)
    assert RequestEarlyExit.from_extra_args({"early_exit": {"threshold": 0.5}}, limits) is not None
    with pytest.raises(EarlyExitConfigError, match="early_exit_max_layers=3.*skipped_kv is 'recompute'"):
        RequestEarlyExit.from_extra_args({"early_exit_max_layers": 3}, limits)


@pytest.mark.parametrize(
    "engine,message",
    [
        ({"async_scheduling": True}, "skipped_kv='recompute'.*synchronous scheduling.*async_scheduling"),
        (
            {"scheduler_cls": "vllm.v1.core.sched.scheduler.Scheduler"},
            "skipped_kv='recompute'.*CatchUpScheduler.*scheduler_cls='vllm.v1.core.sched.scheduler.Scheduler'",
        ),
    ],
)
def test_engine_refuses_what_would_keep_tokens_waiting(tiny_llama, engine, message):
    with pytest.raises(EarlyExitUnsupportedError, match=message):
        _start(tiny_llama, additional_config={"early_exit": RECOMPUTE}, **engine)


def test_max_exit_batch_counts_requests_not_waiting_rows(tiny_llama, catch_up_reference):
    """``max_exit_batch: 1`` with one request: its steps of several rows (waiting tokens and the
    new one) are one request, so they stay checked and the tokens are the reference's, as without
    the limit; counting rows would run them unchecked at full depth."""
    prompt = tiny_prompts(1, seed=4)[0]
    trace = catch_up_reference.generate(prompt, NEW_TOKENS, exit_layers=(1,), threshold=0.0)
    result = run_engine(
        tiny_llama, [(prompt, NEW_TOKENS)],
        early_exit={"exit_layers": [1], "threshold": 0.0, **RECOMPUTE, "max_exit_batch": 1},
    )
    assert result["outputs"] == [trace.tokens]
    stats = result["stats"][0]
    assert stats["unchecked_steps"] == 0 and stats["early_exit_tokens"] == 19
    assert stats["rerun_rows"] == rerun_rows(trace)
