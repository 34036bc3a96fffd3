"""No aliasing: streams kept across a layer call survive an in-place fused add+norm.

On CUDA vLLM's fused add+RMSNorm overwrites its inputs; before the first layer
the residual stream *is* the embedding tensor, so a stream saved there and read
after the layer would hold something else. These tests install such a norm in
the engine's process (``in_place_norm.py``) and compare with the HF reference.
"""

from __future__ import annotations

from .conftest import NEW_TOKENS, run_engine, tiny_prompts
from .in_place_norm import ENV

# The norm is patched in the engine's own process: keep the engine core there.
IN_PLACE = {ENV: "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def test_skipping_layer_0_in_mixed_steps(tiny_llama, reference):
    """Decode rows of steps that also prefill hold their embedding stream through layer 0."""
    prompts = tiny_prompts(3, seed=23)
    rule = {"skip_layers": (0,), "exit_layers": (4,), "threshold": 0.0}
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts],
        early_exit={"skip_layers": [0], "exit_layers": [4], "threshold": 0.0, "policy": "per_token"},
        batched=True, max_num_batched_tokens=20, max_num_seqs=4, env=IN_PLACE,
    )
    assert result["outputs"] == [reference.generate(p, NEW_TOKENS, **rule).tokens for p in prompts]
    stats = result["stats"][0]
    assert stats["exits_per_layer"][4] == stats["decode_tokens"] > 0


def test_saturation_reads_the_stream_entering_layer_0(tiny_llama, reference):
    """Saturation at layer 0 compares with the embedding; were it overwritten by the
    layer's in-place norm, the cosine would be high and rows would leave at layer 0."""
    prompts = tiny_prompts(3, seed=13)
    rule = {"exit_layers": (0, 3), "threshold": 0.5, "signal": "saturation"}
    traces = [reference.generate(p, NEW_TOKENS, **rule) for p in prompts]
    margins = [abs(c - rule["threshold"]) for t in traces for step in t.confidences for c in step.values()]
    assert min(margins) > 1e-2
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts],
        early_exit={**rule, "exit_layers": [0, 3]}, env=IN_PLACE,
    )
    assert result["outputs"] == [t.tokens for t in traces]
    assert result["stats"][0]["exits_per_layer"][0] == 0
    assert result["stats"][0]["exits_per_layer"][3] == sum(t.exit_layers.count(3) for t in traces) > 0
