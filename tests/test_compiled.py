"""``compile: true``: the layers between decision points run as compiled groups.

Every test starts a real engine with vLLM's torch.compile on (inductor on CPU),
checks which groups were compiled, and compares tokens and exits with the HF
reference applying the same rule.
"""

from __future__ import annotations

import pytest

from .conftest import MIXED, NEW_TOKENS, run_engine, tiny_prompts
from .test_correctness import exit_counts

COMPILED_ENGINE = {"enforce_eager": False}


def _groups(*bounds: tuple[int, int]) -> list[dict]:
    """The groups between decision points, then the whole stack that full-depth steps run
    (every test prefills through it, so a wrong full stack fails its tokens)."""
    whole = {"layers": [bounds[0][0], bounds[-1][1]], "compiled": True, "full_depth": True}
    return [*({"layers": [first, stop], "compiled": True} for first, stop in bounds), whole]


def check_alone_and_batched(result: dict, traces: list, num_layers: int) -> None:
    """Groups cut after the checks at layers 1 and 3; tokens and exits of each prompt alone and
    of all together are the reference's."""
    assert result["layer_groups"] == _groups((0, 2), (2, 4), (4, 6))
    expected = [t.tokens for t in traces]
    assert result["outputs"] == expected
    assert result["outputs_batched"] == expected
    assert result["stats"][0]["exits_per_layer"] == [2 * n for n in exit_counts(traces, num_layers)]


def test_compiled_per_token_matches_reference_alone_and_batched(tiny_llama, reference, mixed_traces):
    """Rows that leave stay frozen inside the compiled groups that follow; the others go on."""
    prompts, traces = mixed_traces
    settings = {**MIXED, "policy": "per_token", "compile": True}
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=settings, batched="both", **COMPILED_ENGINE
    )
    check_alone_and_batched(result, traces, reference.num_layers)


def test_compiled_groups_with_skipped_layer_in_mixed_steps(tiny_llama, reference):
    """A token budget of 20 per step mixes decode rows with prefill chunks: decode rows hold
    their stream through the skipped layer's group, leave at layer 4, and stay frozen
    while prefill rows run the last group."""
    prompts = tiny_prompts(3, seed=23)
    settings = {"skip_layers": [2], "exit_layers": [4], "threshold": 0.0, "policy": "per_token", "compile": True}
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=settings, batched=True,
        max_num_batched_tokens=20, max_num_seqs=4, **COMPILED_ENGINE,
    )
    assert result["layer_groups"] == _groups((0, 2), (2, 3), (3, 5), (5, 6))
    rule = {"skip_layers": (2,), "exit_layers": (4,), "threshold": 0.0}
    assert result["outputs"] == [reference.generate(p, NEW_TOKENS, **rule).tokens for p in prompts]
    stats = result["stats"][0]
    assert stats["exits_per_layer"][4] == stats["decode_tokens"] == len(prompts) * (NEW_TOKENS - 1)


def test_compiled_saturation_reads_the_stream_entering_each_check_layer(tiny_llama, reference):
    """Saturation compares the streams before and after a check layer: each check layer is a group of its own."""
    prompts = tiny_prompts(3, seed=13)
    rule = {"exit_layers": (1, 3), "threshold": 0.7, "signal": "saturation"}
    traces = [reference.generate(p, NEW_TOKENS, **rule) for p in prompts]
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts],
        early_exit={**rule, "exit_layers": [1, 3], "compile": True}, **COMPILED_ENGINE,
    )
    assert result["layer_groups"] == _groups((0, 1), (1, 2), (2, 3), (3, 4), (4, 6))
    assert result["outputs"] == [t.tokens for t in traces]
    counts = exit_counts(traces, reference.num_layers)
    assert result["stats"][0]["exits_per_layer"] == counts
    assert counts[1] > 0 and counts[3] > 0


def test_compiled_engine_walks_layers_for_budgets_between_cuts(tiny_llama, reference):
    """Per-request depth budgets fall inside the single compiled group: those steps run the layers one by one."""
    prompts = tiny_prompts(3, seed=19)
    requests = [
        (prompts[0], NEW_TOKENS, {"early_exit": {"max_layers": 3}}),
        (prompts[1], NEW_TOKENS),
    ]
    result = run_engine(
        tiny_llama, requests, early_exit={"exit_layers": [], "policy": "per_token", "compile": True},
        batched=True, **COMPILED_ENGINE,
    )
    assert result["layer_groups"] == _groups((0, 6))
    assert result["outputs"] == [
        reference.generate(prompts[0], NEW_TOKENS, exit_layers=(2,), threshold=0.0).tokens,
        reference.generate(prompts[1], NEW_TOKENS).tokens,
    ]
    assert result["stats"][0]["exits_per_layer"][2] == NEW_TOKENS - 1


def test_each_layer_range_has_its_own_compile_cache_key():
    """vLLM saves compiled artifacts under a key made from the forward's qualified name;
    groups must not share one (each graph names its own layers' KV caches)."""
    from vllm.compilation.decorators import _model_hash_key

    from vllm_early_exit.model_executor.early_exit.groups import group_class
    from vllm_early_exit.model_executor.early_exit.plan import plan

    bounds = plan(0, 30, check_layers=[9, 19], skip_layers=[4], cut_before_checks=True).bounds
    assert bounds == [(0, 4), (4, 5), (5, 9), (9, 10), (10, 19), (19, 20), (20, 30)]
    keys = {_model_hash_key(group_class(first, stop).forward) for first, stop in bounds}
    assert len(keys) == len(bounds)


def test_compiled_two_stage_checks_match_reference(tiny_llama, reference, even_shortlist):
    """A shortlist's first stage runs inside its segment's compiled unit (``CheckedGroup``):
    per_token, batched, the gates open and shut as the reference's two-stage checks decide."""
    from .conftest import EVEN_TOKENS, tiny_prompts

    rule = {"exit_layers": (1, 3), "threshold": 0.2}
    prompts = tiny_prompts(4, seed=7)
    traces = [reference.generate(p, NEW_TOKENS, **rule, shortlist=EVEN_TOKENS) for p in prompts]
    settings = {"exit_layers": [1, 3], "threshold": 0.2, "policy": "per_token", "shortlist": str(even_shortlist),
                "compile": True}
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=settings, batched="both", **COMPILED_ENGINE
    )
    check_alone_and_batched(result, traces, reference.num_layers)
    assert result["stats"][0]["early_exit_tokens"] > 0


def test_compiled_confirmation_of_one_row_is_one_unit(tiny_llama, reference, even_shortlist):
    """A request decoding alone, two-stage checks: the shortlist's confirmation reads every row, so
    the step's first one runs as one compiled unit (``ConfirmBranch``, compiled without kept
    logits); the tokens and exits are the reference's, and in a pure-decode step with at most one
    confirmation the host runs no op between two compiled calls (an eager one runs dozens; a
    second confirmation in a step, with the first one's logits kept, runs eagerly)."""
    from .conftest import EVEN_TOKENS
    from .engine_runner import STEP_OPS_ENV
    from .test_capture_guard import pure_steps

    rule = {"exit_layers": (1, 3), "threshold": 0.2}
    prompt = tiny_prompts(1, seed=7)[0]
    trace = reference.generate(prompt, NEW_TOKENS, **rule, shortlist=EVEN_TOKENS)
    assert any(layer is not None for layer in trace.exit_layers)  # some confirmation lets the row leave
    settings = {"exit_layers": [1, 3], "threshold": 0.2, "policy": "per_token", "shortlist": str(even_shortlist),
                "compile": True, "log_interval_s": 0}
    result = run_engine(
        tiny_llama, [(prompt, NEW_TOKENS)], early_exit=settings, env={STEP_OPS_ENV: "1"}, **COMPILED_ENGINE
    )
    assert result["outputs"] == [trace.tokens]
    assert result["stats"][0]["exits_per_layer"] == exit_counts([trace], reference.num_layers)
    one_confirmation = [step for step in pure_steps(result) if step["decisions"] == 3]  # two gates, one confirmation
    assert one_confirmation
    for step in one_confirmation:
        assert step["between"] == 0, step["names"]


def test_compiled_forced_exit_runs_as_two_units(tiny_llama, reference):
    """A forced exit after layer 2, compiled: each pure-decode step is the segment with its
    decision (``CheckedGroup``) and the exit branch (``ExitBranch``: the deeper layers' K/V by
    state propagation, the final norm), with no eager op and no read between them; tokens are
    the reference's."""
    from .engine_runner import STEP_OPS_ENV
    from .test_capture_guard import pure_steps

    prompts = tiny_prompts(3, seed=3)
    settings = {"exit_layers": [2], "threshold": 0.0, "policy": "all", "compile": True, "log_interval_s": 0}
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=settings, batched=True,
        env={STEP_OPS_ENV: "1"}, **COMPILED_ENGINE,
    )
    assert result["outputs"] == [reference.generate(p, NEW_TOKENS, exit_layers=(2,)).tokens for p in prompts]
    for step in pure_steps(result):
        assert step["compiled_calls"] == 2 and step["between"] == 0 and not step["host_reads"], step
    assert result["stats"][0]["exits_per_layer"][2] == result["stats"][0]["decode_tokens"]


def test_compiled_one_stage_check_keeps_requests_with_early_exit_off_at_full_depth(tiny_llama, reference, mixed_traces):
    """Compiled, per_token, a batch where request 0 turns early exit off and the others leave at
    threshold 0.5: the decisions run inside the segments' units (``CheckedGroup``, nothing eager
    between them), request 0 decodes the full-depth reference's tokens (plain vLLM's) and never
    leaves, and the others decode the reference's tokens with its exits. (The units were first
    traced by the warm-up with one tensor for ``running``, ``live`` and ``allowed``; with the
    aliasing guard vLLM drops, they read ``running`` as ``allowed`` and let request 0 leave.)"""
    from .engine_runner import STEP_OPS_ENV
    from .test_capture_guard import pure_steps

    prompts, traces = mixed_traces
    assert any(layer is not None for layer in traces[0].exit_layers)  # request 0 would leave if it could
    requests = [(prompts[0], NEW_TOKENS, {"early_exit": {"enabled": False}}), *((p, NEW_TOKENS) for p in prompts[1:])]
    settings = {**MIXED, "policy": "per_token", "compile": True, "log_interval_s": 0}
    result = run_engine(
        tiny_llama, requests, early_exit=settings, batched=True, env={STEP_OPS_ENV: "1"}, **COMPILED_ENGINE
    )
    assert result["outputs"][0] == reference.generate(prompts[0], NEW_TOKENS).tokens
    assert result["outputs"][1:] == [t.tokens for t in traces[1:]]
    counts = exit_counts(traces[1:], reference.num_layers)
    assert result["stats"][0]["exits_per_layer"] == counts and sum(counts) > 0
    for step in pure_steps(result):  # the fused path: no eager decision between the units
        assert step["between"] == 0, step["names"]


def test_a_compiled_unit_is_first_called_with_inputs_of_their_own():
    """A unit traced with one tensor for two inputs reads it for both ever after (vLLM drops
    dynamo's ``a is b`` guard): its first call refuses inputs that share memory."""
    import torch

    from vllm_early_exit.model_executor.early_exit.units import _distinct

    flags = torch.ones(4, dtype=torch.bool)
    _distinct({"running": flags, "allowed": flags.clone(), "logits": None, "emitted": None})
    with pytest.raises(ValueError, match="'running' and 'allowed' sharing memory"):
        _distinct({"running": flags, "live": flags.clone(), "allowed": flags})
    with pytest.raises(ValueError, match="sharing memory"):
        _distinct({"running": flags[:2], "allowed": flags[2:]})
