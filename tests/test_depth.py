"""Depth without trained parts: skipped layers, per-request depth budgets, saturation.

Each is checked in the real engine against the HF reference applying the same rule.
"""

from __future__ import annotations

import pytest

from .conftest import NEW_TOKENS, run_engine, tiny_prompts
from .test_correctness import exit_counts


@pytest.mark.parametrize(
    "settings,reference_rule,mean_layers",
    [
        ({"skip_layers": [2, 4], "exit_layers": []}, {"skip_layers": (2, 4)}, 4),
        # Skipping and exiting together: layer 2 skipped, every token leaves after layer 3.
        (
            {"skip_layers": [2], "exit_layers": [3], "threshold": 0.0},
            {"skip_layers": (2,), "exit_layers": (3,), "threshold": 0.0},
            3,
        ),
    ],
)
def test_skip_layers_match_reference(tiny_llama, reference, settings, reference_rule, mean_layers):
    prompts = tiny_prompts(2, seed=17)
    result = run_engine(tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=settings)
    expected = [reference.generate(p, NEW_TOKENS, **reference_rule).tokens for p in prompts]
    assert result["outputs"] == expected
    assert result["outputs"] != [reference.generate(p, NEW_TOKENS).tokens for p in prompts]
    stats = result["stats"][0]
    assert stats["decode_tokens"] == len(prompts) * (NEW_TOKENS - 1)
    assert stats["mean_layers"] == pytest.approx(mean_layers)


def test_request_depth_budgets(tiny_llama, reference):
    """Under per_token, each request leaves at its own budget; a request without one
    runs full depth beside them."""
    prompts = tiny_prompts(3, seed=19)
    requests = [
        (prompts[0], NEW_TOKENS, {"early_exit": {"max_layers": 3}}),
        (prompts[1], NEW_TOKENS, {"early_exit_max_layers": 5}),  # vllm_xargs spelling
        (prompts[2], NEW_TOKENS),
    ]
    result = run_engine(
        tiny_llama, requests, early_exit={"exit_layers": [], "policy": "per_token"}, batched=True
    )
    assert result["outputs"] == [
        reference.generate(prompts[0], NEW_TOKENS, exit_layers=(2,), threshold=0.0).tokens,
        reference.generate(prompts[1], NEW_TOKENS, exit_layers=(4,), threshold=0.0).tokens,
        reference.generate(prompts[2], NEW_TOKENS).tokens,
    ]
    exits = result["stats"][0]["exits_per_layer"]
    assert exits[2] == exits[4] == NEW_TOKENS - 1
    assert sum(exits) == 2 * (NEW_TOKENS - 1)


def test_saturation_signal_matches_reference(tiny_llama, reference):
    """Cosine of the streams after and before a check layer, against the threshold."""
    prompts = tiny_prompts(3, seed=13)
    rule = {"exit_layers": (1, 3), "threshold": 0.7, "signal": "saturation"}
    traces = [reference.generate(p, NEW_TOKENS, **rule) for p in prompts]
    margins = [abs(c - rule["threshold"]) for t in traces for step in t.confidences for c in step.values()]
    assert min(margins) > 1e-3
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit={**rule, "exit_layers": [1, 3]}
    )
    assert result["outputs"] == [t.tokens for t in traces]
    counts = exit_counts(traces, reference.num_layers)
    assert result["stats"][0]["exits_per_layer"] == counts
    assert counts[1] > 0 and counts[3] > 0
