"""State propagation's folded K/V projections, on a model whose input norms matter.

The fills multiply ``s / rms(s)`` by the layers' k/v rows with each layer's input-norm
weight folded in, all layers of a fill in one product (``kv_fill.FoldedKV``). HF
initialises norm weights to 1, so the shared tiny model cannot tell a fill that drops
them; this one draws them at random.

* every range a fill may take (from a check layer to the end: a packed matrix; any
  other: a slice of the stack) against each layer's own ``input_layernorm``,
  ``qkv_proj`` and rotary, inside a real engine (the runner below);
* threshold exits whose filled K/V later tokens read, against the HF reference.

Run as a script (``python test_kv_fill.py OUT.json MODEL``) it is the runner.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

CHECKS = {"exit_layers": [1, 3], "threshold": 0.5, "log_interval_s": 0}
"""On this model some decode tokens leave after layer 1 or 3 and later ones read what was filled."""
RANGES = [(2, 6), (4, 6), (3, 6), (1, 2), (0, 6), (2, 5)]
"""Fills from a check layer to the end (packed: 2 and 4), and other ranges (slices)."""


@pytest.fixture(scope="module")
def norm_llama(tmp_path_factory):
    from .conftest import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("norm_llama"), seed=5, random_norms=True)


@pytest.fixture(scope="module")
def norm_reference(norm_llama):
    import torch
    from transformers import LlamaForCausalLM

    from .reference import ReferenceDecoder

    return ReferenceDecoder(LlamaForCausalLM.from_pretrained(norm_llama, dtype=torch.float32))


def test_folded_projections_match_each_layer(norm_llama, tmp_path):
    from .in_process import run_script

    result = run_script(__file__, tmp_path / "out.json", norm_llama, timeout=600)
    assert result["packed_starts"] == [2, 4]
    assert [tuple(r) for r in result["ranges"]] == RANGES
    for (first, stop), errors in zip(RANGES, result["errors"]):
        assert len(errors) == stop - first
        for error in errors:
            assert error["k"] < 1e-5 and error["v"] < 1e-5, (first, stop, errors)


def test_threshold_exits_read_folded_fills(norm_llama, norm_reference):
    from .conftest import NEW_TOKENS, run_engine, tiny_prompts

    prompts = tiny_prompts(3, seed=23)
    result = run_engine(norm_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=CHECKS)
    rule = {"exit_layers": tuple(CHECKS["exit_layers"]), "threshold": CHECKS["threshold"]}
    traces = [norm_reference.generate(p, NEW_TOKENS, **rule) for p in prompts]
    assert result["outputs"] == [t.tokens for t in traces]
    # No decision sits near the threshold, so float noise cannot flip one.
    margins = [abs(c - CHECKS["threshold"]) for t in traces for step in t.confidences for c in step.values()]
    assert min(margins) > 1e-2
    exits = [layer for t in traces for layer in t.exit_layers if layer is not None]
    assert 0 < len(exits) < len(prompts) * (NEW_TOKENS - 1)
    assert sum(result["stats"][0]["exits_per_layer"]) == len(exits)
    # Later tokens read the filled K/V: without it the reference decodes differently.
    unfilled = [norm_reference.generate(p, NEW_TOKENS, **rule, propagate=False).tokens for p in prompts]
    assert result["outputs"] != unfilled
    assert result["kv_projections"] == [list(range(norm_reference.num_layers))]


def test_loaders_that_skip_load_weights_still_fill(norm_llama):
    """``load_format="dummy"`` never calls the model's ``load_weights``: the projections are
    built on the first forward instead; on CPU vLLM has repacked ``qkv_proj`` by then, so
    nothing folds and the fills go through each layer's own ``qkv_proj``: every decode token
    still leaves and decoding goes on. (On CUDA the weights stay plain and the stack folds.)"""
    from .conftest import run_engine, tiny_prompts

    prompts = [(p, 8) for p in tiny_prompts(2, seed=29)]
    forced = {"exit_layers": [2], "threshold": 0.0, "policy": "per_token", "log_interval_s": 0}
    result = run_engine(norm_llama, prompts, early_exit=forced, load_format="dummy")
    assert result["kv_projections"] == [[]]  # nothing folded from repacked weights
    stats = result["stats"][0]
    assert stats["exits_per_layer"][2] == stats["decode_tokens"] == 2 * 7
    assert all(len(o) == 8 for o in result["outputs"])


def _projection_errors(worker) -> dict:
    """On the worker: each range's folded K/V against the layers' own modules, relative max error."""
    import torch

    model = worker._early_exit_model()
    folded = model.kv_propagator.folded
    generator = torch.Generator().manual_seed(0)
    stream = 3 * torch.randn(5, model.config.hidden_size, generator=generator)
    positions = torch.tensor([3, 17, 40, 41, 200])
    errors = []
    with torch.no_grad():
        for first, stop in RANGES:
            k, v = folded.project(positions, stream, first, stop)
            per_layer = []
            for offset, index in enumerate(range(first, stop)):
                layer = model.layers[index]
                attn = layer.self_attn
                qkv, _ = attn.qkv_proj(layer.input_layernorm(stream))
                q, k_ref, v_ref = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
                _, k_ref = attn.rotary_emb(positions, q.contiguous(), k_ref.contiguous())

                def error(got, want):
                    return float((got.reshape(want.shape) - want).abs().max() / want.abs().max())

                per_layer.append({"k": error(k[:, offset], k_ref), "v": error(v[:, offset], v_ref)})
            errors.append(per_layer)
    return {"packed_starts": folded.packed_starts, "ranges": RANGES, "errors": errors}


def main(out: str, model: str) -> None:
    from vllm import LLM

    llm = LLM(
        model, dtype="float32", max_model_len=512, enforce_eager=True, skip_tokenizer_init=True,
        additional_config={"early_exit": CHECKS},
    )
    Path(out).write_text(json.dumps(llm.collective_rpc(_projection_errors)[0]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
