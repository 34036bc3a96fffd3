"""The engine runs of ``calibrate``: decode at every candidate threshold, score against full depth.

One early-exit engine decodes every calibration prompt at every candidate (each
request carries its threshold in ``extra_args``), with all prefills of a batch in
one step (``engines.generate_together``); one plain engine then scores every
output token against the full model's choice. :func:`calibrate` runs both and
hands the measurements to the Learn-then-Test core (``ltt.finish``).
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_early_exit.tools.calibrate.ltt import (
    DEFAULT_THRESHOLDS,
    CalibrationError,
    ThresholdRun,
    build_settings,
    check_level,
    check_thresholds,
    finish,
    strict_order,
)
from vllm_early_exit.tools.calibrate.speed import DEFAULT_BATCH
from vllm_early_exit.tools.cost import WeightBytes
from vllm_early_exit.tools.engines import build_engine, generate_together, shutdown_engine
from vllm_early_exit.tools.resume import as_saved, saved_results, write_json

# Prompt tokens that may prefill in one step (the engine's max_num_batched_tokens);
# a threshold's prompts beyond that run in several waves (``generate_together``).
PREFILL_TOKENS = 16384
MAX_BATCH = 256
STEP_TIMEOUT_S = 3600
"""vLLM's limit on one model step (``VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS``, default 300 s), raised
for calibration unless set: a wave of ``PREFILL_TOKENS`` prompt tokens prefills in one step,
which takes Qwen2.5-Coder-1.5B in float32 on two CPU cores longer than 300 s."""


def generate_at_thresholds(
    model: str,
    prompts: Sequence[Sequence[int]],
    settings: Mapping[str, Any],
    thresholds: Sequence[float],
    *,
    max_tokens: int,
    dtype: str = "float32",
) -> tuple[dict[float, list[list[int]]], dict[float, dict[str, Any]]]:
    """Greedy outputs of one early-exit engine per threshold, and its counters per threshold.

    Every request carries its threshold (``extra_args``); the prompts run in waves
    whose prefills each fit one step (``engines.generate_together``).
    """
    from tqdm import tqdm
    from vllm import SamplingParams

    from vllm_early_exit import get_exit_stats, reset_exit_stats

    longest = max(len(p) for p in prompts)
    budget = max(PREFILL_TOKENS, longest)
    os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", str(STEP_TIMEOUT_S))  # read by the engine's workers
    engine_settings = {**settings, "threshold": thresholds[0], "log_interval_s": 0}
    llm = build_engine(
        model, enforce_eager=True, max_model_len=longest + max_tokens + 1, dtype=dtype, early_exit=engine_settings,
        max_num_batched_tokens=budget, max_num_seqs=min(MAX_BATCH, len(prompts)),
        enable_chunked_prefill=True,
    )
    outputs: dict[float, list[list[int]]] = {}
    counters: dict[float, dict[str, Any]] = {}
    try:
        for threshold in tqdm(thresholds, desc="early-exit engine, thresholds", unit="threshold", file=sys.stdout):
            params = SamplingParams(
                max_tokens=max_tokens, temperature=0.0, detokenize=False,
                extra_args={"early_exit": {"threshold": threshold}},
            )
            reset_exit_stats(llm)
            together = generate_together(llm, prompts, params, budget=budget, max_batch=MAX_BATCH)
            result = [list(out.outputs[0].token_ids) for out in together]
            stats = get_exit_stats(llm)
            expected = sum(max(len(o) - 1, 0) for o in result)  # the first token comes from the prefill
            outputs[threshold] = result
            counters[threshold] = {
                "mean_layers": stats.mean_layers if stats.decode_tokens else None,
                "decode_tokens": stats.decode_tokens,
                "mixed_step_tokens": max(expected - stats.decode_tokens, 0),
                "num_layers": stats.num_layers,
                "exit_stats": stats.to_dict(),
            }
    finally:
        shutdown_engine(llm)
    return outputs, counters


def score_outputs(
    model: str,
    prompts: Sequence[Sequence[int]],
    outputs: Mapping[float, Sequence[Sequence[int]]],
    *,
    dtype: str = "float32",
    chunk: int = 64,
) -> dict[float, list[list[bool]]]:
    """Per threshold, prompt and generated token: does the full model pick that token?

    Each distinct (prompt, output) pair is scored once by one plain engine.
    """
    from tqdm import tqdm

    from vllm_early_exit.tools.agreement import full_model_choices

    unique: dict[tuple[int, tuple[int, ...]], list[bool] | None] = {}
    for result in outputs.values():
        for i, out in enumerate(result):
            unique[(i, tuple(out))] = None
    keys = list(unique)
    longest = max(len(prompts[i]) + len(out) for i, out in keys)
    llm = build_engine(model, enforce_eager=True, max_model_len=longest + 1, dtype=dtype, max_num_batched_tokens=max(2048, longest + 1))
    try:
        with tqdm(total=len(keys), desc="plain engine, scoring outputs", unit="output", file=sys.stdout) as bar:
            for start in range(0, len(keys), chunk):
                part = keys[start:start + chunk]
                choices = full_model_choices(llm, [prompts[i] for i, _ in part], [list(o) for _, o in part])
                for key, c in zip(part, choices):
                    unique[key] = c
                bar.update(len(part))
    finally:
        shutdown_engine(llm)
    return {t: [unique[(i, tuple(out))] for i, out in enumerate(result)] for t, result in outputs.items()}


def settings_files_digest(settings: Mapping[str, Any]) -> str:
    """sha256 over the files the settings name (the heads folder's files, the shortlist): a resumed
    run must not reuse outputs decoded with heads or a shortlist that have since been replaced."""
    import hashlib

    digest = hashlib.sha256()
    for key in ("heads", "shortlist"):
        if settings.get(key):
            root = Path(settings[key])
            for file in sorted(root.iterdir()) if root.is_dir() else [root]:
                digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


def measurements_path(out: Path) -> Path:
    """``settings.json`` -> ``settings.runs.json``: the measured outputs, counters and scores."""
    return out.with_name(out.stem + ".runs.json")


class Measurements:
    """What a calibration run has measured so far, kept in a file next to its output.

    The file is written after the early-exit engine's outputs and after their
    scores, so a stopped or crashed run loses neither; with ``resume`` a run with
    the same ``key`` (model, prompts, settings, thresholds, lengths, dtype) reads
    them back instead of measuring again, and a file of another run is refused.
    """

    def __init__(self, path: Path, key: dict[str, Any], resume: bool):
        self.path, self.key = path, as_saved(key)
        saved = saved_results(path, key, command="calibrate", settings_of=lambda s: s.get("key")) if resume else None
        self.data: dict[str, Any] = saved or {}

    def get(self, name: str) -> Any:
        return self.data.get(name)

    def put(self, name: str, value: Any) -> None:
        self.data[name] = value
        write_json(self.path, {**self.data, "key": self.key}, indent=None)


def measure(
    model: str,
    prompts: Sequence[Sequence[int]],
    settings: Mapping[str, Any],
    thresholds: Sequence[float],
    *,
    max_tokens: int,
    dtype: str = "float32",
    saved: Measurements | None = None,
    reference: str | None = None,
) -> list[ThresholdRun]:
    """Decodes the prompts at every threshold and scores them against the full model
    (``reference`` at full depth where given: the original of an exit-ready model).

    ``thresholds`` must already be in strict order; the runs come back in it.
    ``saved`` keeps each phase's results and supplies those of a resumed run.
    """
    generated = saved.get("generated") if saved else None
    if generated is None:
        outputs, counters = generate_at_thresholds(model, prompts, settings, thresholds, max_tokens=max_tokens, dtype=dtype)
        gc.collect()  # the early-exit engine's memory, before the plain engine starts
        if saved:
            saved.put("generated", [[outputs[t], counters[t]] for t in thresholds])
    else:
        print(f"--resume: the early-exit outputs come from {saved.path}", flush=True)
        outputs = {t: out for t, (out, _) in zip(thresholds, generated)}
        counters = {t: counter for t, (_, counter) in zip(thresholds, generated)}
    scored = saved.get("scores") if saved else None
    if scored is None:
        choices = score_outputs(reference or model, prompts, outputs, dtype=dtype)
        if saved:
            saved.put("scores", [choices[t] for t in thresholds])
    else:
        print(f"--resume: the full model's scores come from {saved.path}", flush=True)
        choices = dict(zip(thresholds, scored))
    runs = []
    for t in thresholds:
        per_prompt = choices[t]
        runs.append(ThresholdRun(
            threshold=t,
            agreement=[sum(c) / len(c) if c else 1.0 for c in per_prompt],
            tokens=sum(len(c) for c in per_prompt),
            agreeing_tokens=sum(sum(c) for c in per_prompt),
            mean_layers=counters[t]["mean_layers"],
            decode_tokens=counters[t]["decode_tokens"],
            mixed_step_tokens=counters[t]["mixed_step_tokens"],
            exit_stats=counters[t]["exit_stats"],
        ))
    return runs


def calibrate(
    model: str | Path,
    prompts: Sequence[Sequence[int]],
    settings: Mapping[str, Any],
    *,
    target: float,
    delta: float,
    out: str | Path,
    thresholds: Sequence[float] | None = None,
    max_tokens: int = 64,
    dtype: str = "float32",
    info: Mapping[str, Any] | None = None,
    resume: bool = False,
    batch: int = DEFAULT_BATCH,
    reference: str | Path | None = None,
) -> dict[str, Any]:
    """Calibrates the threshold of ``settings`` on token-id ``prompts`` (see the ``calibrate`` package docstring).

    Writes ``out`` (the settings, only if a threshold is accepted),
    ``<out stem>.report.json`` and, as it measures, ``<out stem>.runs.json``
    (:class:`Measurements`; ``resume`` continues from it); ``reference``: the checkpoint whose
    full-depth choices the agreement counts (default ``model``: the guarantee is then against the
    model itself; an exit-ready model's original makes it a guarantee against the original); returns the report, with each threshold's
    predicted (weight-bytes bound) speed vs plain vLLM at ``batch`` rows a step from its
    exit counts and the model's config (``cost.py``; None where the config cannot be read).
    """
    check_level("--target-agreement", target)
    check_level("--delta", delta)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise CalibrationError("--prompts: calibration needs at least one prompt, none of them empty.")
    if not (isinstance(max_tokens, int) and max_tokens >= 1):
        raise CalibrationError(f"--max-tokens {max_tokens!r} is invalid: allowed values are integers >= 1.")
    settings = build_settings(settings)
    signal = settings["signal"]
    candidates = strict_order(signal, thresholds if thresholds is not None else DEFAULT_THRESHOLDS[signal])
    check_thresholds(settings, candidates)
    try:
        weights = WeightBytes.from_pretrained(str(model))
    except (OSError, ValueError, AttributeError):  # no HF config.json of a LLaMA-family model
        weights = None
    start = time.perf_counter()
    # Calibration batches are large; ``max_exit_batch`` would leave them unchecked. A per_token
    # check decides each row alone, so the runs decode without it and the file keeps it.
    measured = {k: v for k, v in settings.items() if k != "max_exit_batch"}
    reference = str(reference) if reference is not None else None
    key = {"model": str(model), "reference": reference or str(model), "prompt_token_ids": [list(p) for p in prompts], "settings": measured,
           "files": settings_files_digest(settings), "thresholds": list(candidates), "max_tokens": max_tokens,
           "dtype": dtype}
    saved = Measurements(measurements_path(Path(out)), key, resume)
    runs = measure(str(model), prompts, measured, candidates, max_tokens=max_tokens, dtype=dtype, saved=saved,
                   reference=reference)
    details = {"model": str(model), "reference": reference or str(model), "max_tokens": max_tokens, "dtype": dtype, **dict(info or {})}
    details["seconds"] = round(time.perf_counter() - start, 1)
    return finish(runs, settings, target=target, delta=delta, out=out, info=details, weights=weights, batch=batch)
