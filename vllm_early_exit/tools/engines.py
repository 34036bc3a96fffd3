"""What the tools that run vLLM engines share (demo, bench, quality, calibrate, oracle).

* :func:`build_engine`: the one way a tool builds an ``LLM``, with the defaults
  every tool wants (float32, a fixed seed, a CPU KV cache size, the early-exit
  settings as ``additional_config``, no tokenizer for a folder without one).
* :func:`generate_together`: the one way a tool makes every prompt of a batch
  prefill in one engine step, so that every later step is pure decode.
* :func:`shutdown_engine` / :func:`shutdown_engines` and :func:`machine_info`: stopping
  engines, and the machine and versions a result was measured on.
* :func:`check_engines_fit`: the start-up check of tools that keep two engines
  alive at once (bench, bench-serve) against the machine's free memory.
"""

from __future__ import annotations

import itertools
import os
import platform
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def has_tokenizer(model: str | Path) -> bool:
    """Whether vLLM can load a tokenizer for ``model`` (a hub name is assumed to have one)."""
    folder = Path(model)
    if not folder.is_dir():
        return True  # a hub name: let vLLM load its tokenizer
    return any((folder / name).exists() for name in TOKENIZER_FILES)


def build_engine(
    model: str | Path,
    *,
    early_exit: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    seed: int = 0,
    kv_cache_gib: int = 2,
    label: str | None = None,
    note: str | None = None,
    **engine_kwargs: Any,
):
    """A vLLM ``LLM`` for ``model`` with the tools' shared defaults.

    ``early_exit`` (the plugin's settings) becomes ``additional_config={"early_exit": ...}``;
    None builds a plain vLLM engine. ``kv_cache_gib`` is the default of
    ``VLLM_CPU_KVCACHE_SPACE`` (a value already in the environment wins).
    ``skip_tokenizer_init`` defaults to True for a folder without tokenizer files.
    Every other keyword goes to ``LLM`` as it is.

    The start is one console line (``console.phase``): ``starting <label> (<note>) ... 71 s``;
    ``label`` defaults to "plain vLLM" or "early-exit vLLM", ``note`` to "compiling" for an
    engine that compiles.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    from vllm import LLM

    from vllm_early_exit.tools import console

    kwargs: dict[str, Any] = {"dtype": dtype, "seed": seed}
    if not has_tokenizer(model):
        kwargs["skip_tokenizer_init"] = True
    kwargs.update(engine_kwargs)
    if early_exit is not None:
        kwargs["additional_config"] = {"early_exit": dict(early_exit)}
    if label is None:
        label = "plain vLLM" if early_exit is None else "early-exit vLLM"
    if note is None:
        eager = kwargs.get("enforce_eager") or (early_exit is not None and early_exit.get("compile") is False)
        note = "" if eager else "compiling"
    with console.phase(f"starting {label} on {Path(model).name}" + (f" ({note})" if note else "")):
        return LLM(str(model), **kwargs)


CPU_ENGINE_RESIDENT_FACTOR = 2.0
"""Resident memory of one vLLM CPU engine per byte of its model's weights: its worker held
10.6 GiB for the 6.6 GiB of Qwen2.5-Coder-1.5B's float32 weights while warming up (1.6x) and
6.4 GiB for its 3.3 GiB in bfloat16 (1.9x); its engine-core process and the caller's front
end come on top."""


def weight_gib(model: str | Path, dtype: str) -> float:
    """GiB of ``model``'s weights in ``dtype`` (``auto``: the checkpoint's own dtype)."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    if dtype == "auto":
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    name = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    element = torch.empty(0, dtype=getattr(torch, name.removeprefix("torch."))).element_size()
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    attention = hidden * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    layers = config.num_hidden_layers * (attention + 3 * hidden * inter)
    embeddings = vocab * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return (layers + embeddings) * element / 2**30


def check_engines_fit(model: str | Path, dtype: str, engines: int, kv_cache_gib: float, tool: str) -> None:
    """Refuses, before any engine starts, ``engines`` CPU engines of ``model`` alive at once
    that would not fit the free memory (on CPU the weights and the KV cache are host memory;
    past it the machine swaps or freezes instead of failing). Other platforms: no check."""
    import psutil
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    weights = weight_gib(model, dtype)
    need = engines * (CPU_ENGINE_RESIDENT_FACTOR * weights + kv_cache_gib)
    free = psutil.virtual_memory().available / 2**30
    if need > free:
        raise SystemExit(
            f"{tool}: {engines} engines of {model} in {dtype} are alive at once and need about "
            f"{need:.1f} GiB ({weights:.1f} GiB of weights each, about {CPU_ENGINE_RESIDENT_FACTOR}x that "
            f"resident, plus {kv_cache_gib:g} GiB of KV cache), but {free:.1f} GiB is free. "
            "Use --dtype bfloat16 (half the weights), a smaller model, or free memory."
        )


def shutdown_engine(llm) -> None:
    """Stops an ``LLM``'s engine core (and its worker processes); best effort.

    The engine's memory goes once the caller drops its last reference to ``llm``.
    """
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # the engine goes away with the object anyway
        pass


def shutdown_engines(*llms) -> None:
    """Stops several engines at once (each waits a few seconds for its processes to exit)."""
    import threading

    threads = [threading.Thread(target=shutdown_engine, args=(llm,)) for llm in llms]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def watch_preemptions(llm) -> list[str]:
    """The ids of requests vLLM preempts from now on (appended as it happens), for an engine
    whose core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    preempted: list[str] = []
    preempt = scheduler._preempt_request

    def counted(request, *args, **kwargs):
        preempted.append(request.request_id)
        return preempt(request, *args, **kwargs)

    scheduler._preempt_request = counted
    return preempted


# --- every prefill in one step ------------------------------------------------------

_request_ids = itertools.count()


def prefill_waves(lengths: Sequence[int], budget: int, max_batch: int) -> list[list[int]]:
    """Indices of prompts (of these token ``lengths``), grouped in order so that each group's
    prompt tokens fit in ``budget`` and it holds at most ``max_batch`` prompts."""
    waves: list[list[int]] = [[]]
    used = 0
    for i, length in enumerate(lengths):
        if waves[-1] and (used + length > budget or len(waves[-1]) >= max_batch):
            waves.append([])
            used = 0
        waves[-1].append(i)
        used += length
    return waves


def _generate_at_once(llm, requests: list, params: list) -> list:
    """Adds every request while the engine core's scheduler is paused, then runs them to the end."""
    engine = llm.llm_engine
    core = engine.engine_core
    try:
        core.call_utility("pause_scheduler", "keep", False)
    except Exception:  # no pause utility (older vLLM; an in-process engine core, which has no call_utility)
        return llm.generate(requests, params, use_tqdm=False)
    ids = [f"together-{next(_request_ids)}" for _ in requests]
    try:
        for request_id, request, p in zip(ids, requests, params):
            engine.add_request(request_id, request, p)
    finally:
        core.call_utility("resume_scheduler")
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return [finished[i] for i in ids]


def generate_together(
    llm,
    prompts: Sequence[Sequence[int]],
    params,
    *,
    budget: int | None = None,
    max_batch: int | None = None,
) -> list:
    """``llm.generate`` of token-id ``prompts`` with all their prefills in one engine step.

    vLLM's engine process starts stepping as soon as the first request arrives, so the
    first requests would decode in steps that still prefill later ones, where nobody
    leaves early, and how many depends on timing. Here the requests are added while the
    engine core's scheduler is paused (``pause_scheduler("keep")``), and it resumes once
    all are in: with a token budget (``max_num_batched_tokens``) that fits the prompts,
    one step prefills them all and every later step is pure decode, so runs repeat
    exactly and the early-exit counters see every decode token.

    Fallback: an engine that cannot pause gets plain ``llm.generate``. That is exact for
    an in-process engine core (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), where ``generate``
    queues all requests before the first step; with an older vLLM's engine process the
    first steps may mix prefills and decodes.

    With ``budget`` (prompt tokens per step) and ``max_batch`` given, the prompts run in
    consecutive waves that each fit (:func:`prefill_waves`). ``params`` is one
    ``SamplingParams`` or one per prompt. Outputs come back in prompt order.
    """
    from vllm.inputs import TokensPrompt

    per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    if budget is None:
        return _generate_at_once(llm, requests, per_prompt)
    outputs: list = [None] * len(prompts)
    for wave in prefill_waves([len(p) for p in prompts], budget, max_batch or len(prompts)):
        results = _generate_at_once(llm, [requests[i] for i in wave], [per_prompt[i] for i in wave])
        for i, result in zip(wave, results):
            outputs[i] = result
    return outputs


def machine_info() -> dict:
    """Date, machine, device and versions, recorded next to every benchmark result."""
    import torch
    import vllm

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
