"""Trained exit heads and gates inside the real engine, against the HF reference.

The heads here are random affine maps written in the product's heads format:
what is tested is that the engine loads them, reads check layers through them,
decides on their confidence and emits their token, exactly as the reference does.
"""

from __future__ import annotations

import pytest
import torch

from vllm_early_exit.config import EarlyExitConfigError
from vllm_early_exit.model_executor.early_exit.heads import ExitHeads

from .conftest import EVEN_TOKENS, NEW_TOKENS, run_engine, tiny_prompts
from .test_correctness import exit_counts

LAYERS = (1, 3)
THRESHOLD = 0.5


def random_heads(hidden: int, vocab: int, layers=LAYERS, seed: int = 0, with_gates: bool = True) -> ExitHeads:
    generator = torch.Generator().manual_seed(seed)
    weights = {
        layer: (torch.randn(hidden, hidden, generator=generator) * 0.6 / hidden**0.5, torch.zeros(hidden))
        for layer in layers
    }
    # Gates that read only the max-prob feature: p >= 0.5 exactly when max_prob >= 0.5.
    gates = {layer: (torch.tensor([40.0, 0.0, 0.0, 0.0]), torch.tensor([-20.0])) for layer in layers} if with_gates else {}
    base = {"path": "tiny", "architecture": "LlamaForCausalLM", "num_hidden_layers": 6,
            "hidden_size": hidden, "vocab_size": vocab}
    return ExitHeads(base_model=base, layers=tuple(layers), weights=weights, gates=gates)


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    return random_heads(128, 512).save(tmp_path_factory.mktemp("heads"))


@pytest.fixture(scope="module")
def head_traces(reference, heads_dir):
    heads = ExitHeads.load(heads_dir)
    prompts = tiny_prompts(3, seed=11)
    traces = [
        reference.generate(p, NEW_TOKENS, exit_layers=LAYERS, threshold=THRESHOLD, heads=heads.weights)
        for p in prompts
    ]
    margins = [abs(c - THRESHOLD) for t in traces for step in t.confidences for c in step.values()]
    assert min(margins) > 1e-3, "a decision sits at the threshold; pick another seed"
    return prompts, traces


def test_saved_heads_load_back(heads_dir):
    heads = ExitHeads.load(heads_dir)
    original = random_heads(128, 512)
    assert heads.layers == LAYERS and sorted(heads.gates) == list(LAYERS)
    for layer in LAYERS:
        assert torch.equal(heads.weights[layer][0], original.weights[layer][0])


@pytest.mark.parametrize("signal", ["head", "gate"])
def test_heads_change_decisions_and_match_reference(tiny_llama, reference, heads_dir, head_traces, signal):
    prompts, traces = head_traces
    settings = {"heads": str(heads_dir), "signal": signal, "exit_layers": list(LAYERS), "threshold": THRESHOLD}
    result = run_engine(tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=settings)
    assert result["outputs"] == [t.tokens for t in traces]
    assert result["stats"][0]["exits_per_layer"] == exit_counts(traces, reference.num_layers)

    # The same rule without heads decides and decodes differently.
    plain_rule = [
        reference.generate(p, NEW_TOKENS, exit_layers=LAYERS, threshold=THRESHOLD) for p in prompts
    ]
    assert [t.exit_layers for t in plain_rule] != [t.exit_layers for t in traces]
    assert [t.tokens for t in plain_rule] != [t.tokens for t in traces]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_stage_checks_read_through_the_heads(tiny_llama, reference, heads_dir, even_shortlist, compiled):
    """per_token, head signal and a shortlist, batched: both stages read each row's head stream
    at the check, and a row that leaves emits it, as the reference does (compiled: the first
    stage reads the head inside its segment's compiled unit)."""
    heads = ExitHeads.load(heads_dir)
    prompts = tiny_prompts(4, seed=11)
    rule = {"exit_layers": LAYERS, "threshold": THRESHOLD, "heads": heads.weights, "shortlist": EVEN_TOKENS}
    traces = [reference.generate(p, NEW_TOKENS, **rule) for p in prompts]
    margins = [abs(c - THRESHOLD) for t in traces for step in t.confidences for c in step.values()]
    assert min(margins) > 1e-3, "a decision sits at the threshold; pick another seed"
    settings = {"heads": str(heads_dir), "signal": "head", "exit_layers": list(LAYERS), "threshold": THRESHOLD,
                "policy": "per_token", "shortlist": str(even_shortlist), "compile": compiled}
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=settings, batched=True, enforce_eager=not compiled
    )
    assert result["outputs"] == [t.tokens for t in traces]
    stats = result["stats"][0]
    assert stats["exits_per_layer"] == exit_counts(traces, reference.num_layers)
    assert stats["sampled_from_checks"] == stats["early_exit_tokens"] > 0


def test_engine_refuses_heads_of_another_model_or_layers(tiny_llama, tmp_path):
    from vllm import LLM

    from .conftest import ENGINE_DEFAULTS

    wrong_shape = random_heads(64, 512).save(tmp_path / "wrong_shape")
    with pytest.raises(EarlyExitConfigError, match="trained for a model with .*'hidden_size': 64.*train-heads"):
        LLM(str(tiny_llama), skip_tokenizer_init=True, **ENGINE_DEFAULTS,
            additional_config={"early_exit": {"heads": str(wrong_shape), "signal": "head", "exit_layers": [1]}})
    only_layer_1 = random_heads(128, 512, layers=(1,)).save(tmp_path / "layer_1")
    with pytest.raises(EarlyExitConfigError, match=r"heads for layers \[1\].*at layers \[3\]"):
        LLM(str(tiny_llama), skip_tokenizer_init=True, **ENGINE_DEFAULTS,
            additional_config={"early_exit": {"heads": str(only_layer_1), "signal": "head", "exit_layers": [1, 3]}})
    no_gates = random_heads(128, 512, with_gates=False).save(tmp_path / "no_gates")
    with pytest.raises(EarlyExitConfigError, match="trained without gates"):
        LLM(str(tiny_llama), skip_tokenizer_init=True, **ENGINE_DEFAULTS,
            additional_config={"early_exit": {"heads": str(no_gates), "signal": "gate", "exit_layers": [1]}})
