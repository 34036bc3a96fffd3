"""Early exit inside the real vLLM engine (CPU build, float32) against independent references.

References: plain vLLM ``LlamaForCausalLM`` on the same engine settings, and
``ReferenceDecoder`` (HF transformers weights, its own cache, the same exit and
state-propagation rule).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from .conftest import MIXED, NEW_TOKENS, run_engine, tiny_prompts


def exit_counts(traces, num_layers: int) -> list[int]:
    counts = Counter(layer for t in traces for layer in t.exit_layers if layer is not None)
    return [counts.get(layer, 0) for layer in range(num_layers)]


def test_reference_matches_hf_generate(tiny_llama, reference):
    """The reference itself, at full depth, is HF's own greedy decoding."""
    for prompt in tiny_prompts(2):
        ids = torch.tensor([prompt])
        hf = reference.model.generate(
            ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )[0, len(prompt):].tolist()
        assert reference.generate(prompt, NEW_TOKENS).tokens == hf


def test_exits_disabled_is_plain_vllm(tiny_llama, reference):
    prompts = tiny_prompts(4)
    requests = [(p, NEW_TOKENS) for p in prompts]
    plain = run_engine(tiny_llama, requests, batched=True)
    early = run_engine(tiny_llama, requests, batched=True, early_exit={"enabled": False})
    assert early["outputs"] == plain["outputs"]
    # Plain vLLM agrees with the HF reference, so the exact comparisons below are fair.
    assert plain["outputs"] == [reference.generate(p, NEW_TOKENS).tokens for p in prompts]
    assert early["stats"][0]["decode_tokens"] == 0


@pytest.mark.parametrize("layer", [1, 3, 4])
def test_forced_exit_matches_reference(tiny_llama, reference, layer):
    """Every decode token leaves after ``layer`` (threshold 0 always passes)."""
    prompts = tiny_prompts(2, seed=layer)
    result = run_engine(
        tiny_llama,
        [(p, NEW_TOKENS) for p in prompts],
        early_exit={"exit_layers": [layer], "threshold": 0.0},
    )
    expected = [reference.generate(p, NEW_TOKENS, exit_layers=(layer,)).tokens for p in prompts]
    assert result["outputs"] == expected
    full = [reference.generate(p, NEW_TOKENS).tokens for p in prompts]
    assert result["outputs"] != full, "a forced exit should change this random model's output"

    stats = result["stats"][0]
    decode_tokens = len(prompts) * (NEW_TOKENS - 1)
    assert stats["exits_per_layer"][layer] == decode_tokens
    assert stats["decode_tokens"] == decode_tokens
    assert stats["full_depth_tokens"] == 0
    assert stats["mean_layers"] == pytest.approx(layer + 1)
    # The deeper layers' K/V came from the K/V-only projections built at load time.
    assert result["kv_projections"] == [list(range(reference.num_layers))]


@pytest.fixture(scope="module")
def mixed_run(tiny_llama, mixed_traces):
    """The engine on the mixed case: (prompts, reference traces, engine result), in vLLM's
    default processes (engine core and worker apart), as served."""
    prompts, traces = mixed_traces
    result = run_engine(tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=MIXED, one_process=False)
    return prompts, traces, result


def test_threshold_exits_match_reference_with_state_propagation(reference, mixed_run):
    prompts, traces, result = mixed_run
    assert result["outputs"] == [t.tokens for t in traces]

    # Without propagation the reference decodes differently, so the K/V fill is
    # what makes the engine's output right.
    no_fill = [
        reference.generate(
            p, NEW_TOKENS, exit_layers=tuple(MIXED["exit_layers"]), threshold=MIXED["threshold"], propagate=False
        ).tokens
        for p in prompts
    ]
    assert no_fill != result["outputs"]

    stats = result["stats"][0]
    num_layers = reference.num_layers
    assert stats["exits_per_layer"] == exit_counts(traces, num_layers)
    assert 0 < stats["early_exit_tokens"] < stats["decode_tokens"]


def test_statistics_add_up(reference, mixed_run):
    prompts, traces, result = mixed_run
    stats = result["stats"][0]
    decode_tokens = len(prompts) * (NEW_TOKENS - 1)
    assert sum(stats["exits_per_layer"]) + stats["full_depth_tokens"] == decode_tokens
    assert stats["decode_tokens"] == decode_tokens
    layers = [reference.num_layers if e is None else e + 1 for t in traces for e in t.exit_layers]
    assert stats["mean_layers"] == pytest.approx(sum(layers) / len(layers))


def test_tensor_parallel_two_ranks_match_one(tiny_llama, mixed_run):
    prompts, _, single = mixed_run
    tp2 = run_engine(
        tiny_llama,
        [(p, NEW_TOKENS) for p in prompts],
        early_exit=MIXED,
        tensor_parallel_size=2,
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
        timeout=900,
    )
    assert tp2["outputs"] == single["outputs"]
    assert len(tp2["stats"]) == 2
    assert tp2["stats"][0] == tp2["stats"][1], "both ranks must take the same decisions"
    assert tp2["stats"][0] == single["stats"][0]
    # Each rank fills from the k/v rows of its own qkv_proj shard.
    assert tp2["kv_projections"] == [list(range(6))] * 2


@pytest.mark.parametrize("early_exit", [None, {"compile": False}], ids=["defaults", "compile_false"])
def test_architecture_override_uses_default_settings(tiny_llama, reference, early_exit):
    """``hf_overrides`` alone selects the early-exit model with its defaults
    (max_prob >= 0.9, checks from half the stack). Without enforce_eager the layer
    groups compile by default, as plain vLLM compiles its model; ``compile: false`` runs
    them eagerly. Tokens and exits are the reference's either way."""
    prompts = tiny_prompts(2, seed=11)
    result = run_engine(
        tiny_llama,
        [(p, NEW_TOKENS) for p in prompts],
        early_exit=early_exit,
        hf_overrides={"architectures": ["EarlyExitLlamaForCausalLM"]},
        enforce_eager=False,
    )
    layers = reference.num_layers
    defaults = tuple(range(layers // 2, layers - 1))
    traces = [reference.generate(p, NEW_TOKENS, exit_layers=defaults, threshold=0.9) for p in prompts]
    assert result["outputs"] == [t.tokens for t in traces]
    assert result["stats"][0]["exits_per_layer"] == exit_counts(traces, layers)
    groups = result["layer_groups"]
    if early_exit is None:
        # Cut after every check layer: [0, first check + 1), then one group per layer.
        bounds = [(0, defaults[0] + 1), *((x + 1, x + 2) for x in defaults)]
        assert groups == [
            *({"layers": [first, stop], "compiled": True} for first, stop in bounds),
            {"layers": [0, layers], "compiled": True, "full_depth": True},
        ]
    else:
        assert groups == []
