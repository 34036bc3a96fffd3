"""Shared fixtures: tiny random LLaMA and Qwen2 checkpoints, SmolLM2, and a real vLLM engine per call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

# Engines in tests: float32 (bf16 takes a CPU path that crashes on some machines),
# a 1 GiB KV cache, and a private compile cache.
ENGINE_DEFAULTS = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True}


def one_process_env() -> dict:
    """The environment for a process that runs vLLM engines in a test: each engine's core, and
    with one rank its worker too (vLLM's CPU platform keeps the ``uni`` executor then), runs in
    that process. A tiny engine starts in 17 s instead of 38 s, with the same model, scheduler
    and hooks; the layout ``vllm serve`` runs is kept where a test asks for it."""
    return {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@pytest.fixture(scope="session", autouse=True)
def _vllm_env(tmp_path_factory):
    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm_cache")))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_shape(layers: int, vocab_size: int) -> dict:
    """HF config sizes of the tiny random models: 4 heads of 32 (2 KV heads), a 256-wide MLP."""
    return {
        "vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "initializer_range": 0.2, "bos_token_id": 1, "eos_token_id": 2,
    }


def make_tiny_llama(
    path: Path, *, seed: int = 0, layers: int = 6, vocab_size: int = 512, random_norms: bool = False
) -> Path:
    """A random LLaMA: 4 heads of 32 (2 KV heads) so tensor parallelism 2 divides it.

    Weights are drawn with a large scale so logits are peaked: greedy choices are
    then far from ties and exact comparisons between implementations are fair.
    HF initialises every norm weight to 1; ``random_norms`` draws the layers' input-norm
    weights from [0.25, 1.75], so a path that drops or mixes them up decodes differently.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**tiny_shape(layers, vocab_size), tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if random_norms:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight.uniform_(0.25, 1.75)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def make_tiny_qwen2(
    path: Path, *, seed: int = 0, layers: int = 6, vocab_size: int = 512, tie_word_embeddings: bool = False
) -> Path:
    """A random Qwen2 shaped like ``make_tiny_llama``'s LLaMA, with non-zero q/k/v biases.

    HF initialises biases to zero; random ones make the checkpoint's biases matter, so
    an engine that dropped them would decode differently.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        **tiny_shape(layers, vocab_size), tie_word_embeddings=tie_word_embeddings, use_sliding_window=False
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A tiny random Qwen2 with an untied LM head (``tiny_qwen2_tied``: tied embeddings)."""
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="session")
def tiny_qwen2_tied(tmp_path_factory) -> Path:
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2_tied"), seed=1, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory, smollm2) -> Path:
    """A tiny random LLaMA with SmolLM2's tokenizer and chat template, for the server."""
    import shutil

    path = make_tiny_llama(tmp_path_factory.mktemp("tiny_chat_llama"), seed=3, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2 / name).exists():
            shutil.copy(smollm2 / name, path / name)
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from vllm_early_exit.tools.assets import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def reference(tiny_llama):
    """The independent HF-transformers early-exit reference on the tiny model."""
    import torch
    from transformers import LlamaForCausalLM

    from .reference import ReferenceDecoder

    return ReferenceDecoder(LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))


NEW_TOKENS = 24
# Threshold exits at layers 1 and 3 on the tiny model: some tokens leave, later
# ones go full depth and read the K/V that state propagation wrote for them.
MIXED = {"exit_layers": [1, 3], "threshold": 0.5}


@pytest.fixture(scope="session")
def mixed_traces(reference):
    """Prompts and the reference's traces for ``MIXED``."""
    prompts = tiny_prompts(3, seed=7)
    traces = [
        reference.generate(p, NEW_TOKENS, exit_layers=tuple(MIXED["exit_layers"]), threshold=MIXED["threshold"])
        for p in prompts
    ]
    # No decision of the reference sits near the threshold, so float noise cannot flip one.
    margins = [abs(c - MIXED["threshold"]) for t in traces for step in t.confidences for c in step.values()]
    assert min(margins) > 1e-3
    return prompts, traces


# A shortlist of the tiny model's even token ids: a two-stage check's first stage.
EVEN_TOKENS = list(range(0, 512, 2))


@pytest.fixture(scope="session")
def even_shortlist(tmp_path_factory):
    from vllm_early_exit.model_executor.early_exit.shortlist import write_shortlist

    return write_shortlist(tmp_path_factory.mktemp("shortlist") / "even.json", EVEN_TOKENS, 512, {"test": True})


def tiny_prompts(n: int, length: int = 17, seed: int = 1) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(length + i)] for i in range(n)]


def run_engine(
    model: Path,
    requests: list[tuple],
    *,
    early_exit: dict | None = None,
    batched: bool | str = False,
    env: dict | None = None,
    timeout: int = 600,
    one_process: bool = True,
    **engine,
) -> dict:
    """Starts a real vLLM engine in a fresh process and greedily decodes ``requests``:
    ``(prompt token ids, max new tokens)`` or ``(..., SamplingParams.extra_args)``.

    ``one_process`` (the default): that process gets ``one_process_env()``. ``False`` starts
    vLLM's default processes, the layout ``vllm serve`` runs (batched runs keep their core
    in-process either way, see ``engine_runner.py``).

    Returns ``{"outputs": [token ids per request], "stats": [per rank] (early exit only)}``.
    """
    kwargs = {**ENGINE_DEFAULTS, "skip_tokenizer_init": True, **engine}
    if early_exit is not None:
        kwargs["additional_config"] = {"early_exit": early_exit}
    spec = {
        "model": str(model),
        "engine": kwargs,
        "requests": [[list(r[0]), r[1], r[2] if len(r) > 2 else None] for r in requests],
        "batched": batched,
        "stats": early_exit is not None or "hf_overrides" in engine,
    }
    work = Path(os.environ["VLLM_CACHE_ROOT"]).parent
    spec_path = work / f"spec_{os.getpid()}_{id(spec)}.json"
    result_path = spec_path.with_suffix(".out.json")
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(HERE / "engine_runner.py"), str(spec_path), str(result_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**(one_process_env() if one_process else os.environ), **(env or {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"engine run failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(result_path.read_text())
