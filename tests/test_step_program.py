"""The conditional-node program of a decode step (``graphs.ConditionalProgram``) in a real engine.

On a GPU with conditional CUDA graph nodes, a step is one graph in which every
branch runs under a predicate computed on the device, and the engine's step
counters come from the device's visit counts. Here the same program runs in a
CPU engine (``step_program.py``, predicates evaluated on the host): tokens, exits
and step counters must be those of the HF reference, as for the host's own walk.
"""

from __future__ import annotations

from .conftest import EVEN_TOKENS, MIXED, NEW_TOKENS, run_engine
from .engine_runner import STEP_PROGRAM_ENV
from .test_correctness import exit_counts

PROGRAM = {STEP_PROGRAM_ENV: "1"}


def test_per_token_steps_as_programs_match_reference(tiny_llama, reference, mixed_traces):
    prompts, traces = mixed_traces
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit={**MIXED, "policy": "per_token"},
        batched="both", env=PROGRAM,
    )
    expected = [t.tokens for t in traces]
    assert result["outputs"] == expected
    assert result["outputs_batched"] == expected
    stats = result["stats"][0]
    assert stats["exits_per_layer"] == [2 * n for n in exit_counts(traces, reference.num_layers)]
    alone = [layer for t in traces for layer in t.exit_layers]
    batched = [None if None in layers else max(layers) for layers in zip(*(t.exit_layers for t in traces))]
    steps = alone + batched
    assert stats["step_exits_per_layer"] == [steps.count(layer) for layer in range(reference.num_layers)]
    assert stats["full_depth_steps"] == steps.count(None) > 0
    assert stats["full_readouts"] > 0 and stats["sampled_from_checks"] == stats["early_exit_tokens"]


def test_two_stage_steps_as_programs_match_reference(tiny_llama, reference, even_shortlist):
    from .conftest import tiny_prompts

    rule = {"exit_layers": (1, 3), "threshold": 0.2}
    prompts = tiny_prompts(4, seed=7)
    traces = [reference.generate(p, NEW_TOKENS, **rule, shortlist=EVEN_TOKENS) for p in prompts]
    settings = {"exit_layers": [1, 3], "threshold": 0.2, "policy": "per_token", "shortlist": str(even_shortlist)}
    result = run_engine(tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=settings, batched=True, env=PROGRAM)
    assert result["outputs"] == [t.tokens for t in traces]
    assert result["stats"][0]["exits_per_layer"] == exit_counts(traces, reference.num_layers)


def test_forced_steps_as_programs_end_at_their_exit(tiny_llama, reference):
    from .conftest import tiny_prompts

    prompts = tiny_prompts(2, seed=3)
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit={"exit_layers": [2], "threshold": 0.0},
        batched=True, env=PROGRAM,
    )
    assert result["outputs"] == [reference.generate(p, NEW_TOKENS, exit_layers=(2,)).tokens for p in prompts]
    stats = result["stats"][0]
    assert stats["step_exits_per_layer"][2] == stats["decode_steps"] == NEW_TOKENS - 1
    assert stats["full_readouts"] == 0
