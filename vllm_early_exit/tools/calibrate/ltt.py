"""The Learn-then-Test core of ``calibrate``: candidate thresholds, checks, the decision, the report.

Which way each signal's threshold gets stricter, the default candidates, the
checks of every calibration argument, the fixed-sequence test over measured
:class:`ThresholdRun` rows (:func:`decide`), and the settings file and report it
leads to (:func:`finish`), with the cost model's verdict on the accepted ones
(``speed.py``). Nothing here runs an engine (see ``runs``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vllm_early_exit.config import SIGNALS, EarlyExitConfig, EarlyExitConfigError, RequestEarlyExit
from vllm_early_exit.tools.calibrate.speed import (  # noqa: F401 (SPEED_MARGIN, NO_FASTER: importable here too)
    DEFAULT_BATCH,
    NO_FASTER,
    REPORTED_BATCHES,
    SPEED_BASIS,
    SPEED_MARGIN,
    exit_batch_verdict,
    speed_verdict,
)
from vllm_early_exit.tools.cost import PREDICTED, WeightBytes, predicted_speed
from vllm_early_exit.tools.risk import fixed_sequence_rejections, hoeffding_bentkus_p_value

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



# --- measured runs and the decision --------------------------------------------


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
    exit_stats: dict[str, Any] | None = None
    """The engine's exit counters over this threshold's runs (``ExitStats.to_dict()``), None when unavailable."""


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
    predicted_speed: float | None = None
    """Predicted (weight-bytes bound) speed vs plain vLLM at the report's batch from ``exit_stats``
    (``cost.py``); None without them."""
    predicted_speed_by_batch: dict[str, float] | None = None
    """The same at each of ``REPORTED_BATCHES`` (keys: the batch as text, as JSON keeps them)."""
    exit_stats: dict[str, Any] | None = None


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
            exit_stats=run.exit_stats,
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
    weights: WeightBytes | None = None,
    batch: int = DEFAULT_BATCH,
) -> dict[str, Any]:
    """Decides, writes the settings file (only when a threshold is accepted) and the report.

    Returns the report. ``status`` is ``"ok"`` (``settings`` holds the chosen
    settings, written to ``out``) or ``"no_threshold"`` (nothing written to ``out``;
    a stale file there is removed so it cannot be mistaken for a result).

    With the model's ``weights``, every row gets its predicted (weight-bytes
    bound) speed vs plain vLLM at ``batch`` rows a step (and at each of
    ``REPORTED_BATCHES``) from its ``exit_stats``, and the report the cost
    model's verdict (:func:`speed_verdict`): ``recommend`` is ``"off"`` when no
    accepted threshold is predicted faster than plain vLLM. The settings file
    stays the chosen threshold's either way (it holds only ``early_exit``
    settings, as ``--early-exit-config`` reads them); the report says what to do.
    """
    signal = settings.get("signal", "max_prob")
    order = [r.threshold for r in runs]
    if order != strict_order(signal, order):
        raise CalibrationError(f"thresholds {order} are not in strict order for signal {signal!r} "
                               f"(strictest first: {STRICTER[signal]} is stricter), or repeat a value.")
    rows, chosen = decide(runs, target, delta)
    for row in rows:
        at = {**settings, "threshold": row.threshold}
        row.predicted_speed = predicted_speed(weights, at, row.exit_stats, batch)
        if row.predicted_speed is not None:
            row.predicted_speed_by_batch = {
                str(b): predicted_speed(weights, at, row.exit_stats, b) for b in REPORTED_BATCHES
            }
    verdict = speed_verdict(rows, chosen, batch)
    verdict.update(exit_batch_verdict(rows, chosen, verdict, settings, weights))
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
        "batch": batch,
        "predicted_speed_basis": SPEED_BASIS,
        **verdict,
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
    for line in ("speed_message", "exit_batch_message"):
        if verdict.get(line):
            report["message"] += "\n" + verdict[line]
    report_path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_table(report: Mapping[str, Any]) -> str:
    """The report's rows as a plain-text table, strictest threshold first, with a legend."""
    batch = report.get("batch", 1)
    others = "/".join(f"b{b}" for b in REPORTED_BATCHES)
    lines = [
        f"{'threshold':>10} {'agreement':>10} {'token agr':>10} {'mean layers':>12} {f'pred. b{batch}*':>12} "
        f"{others:>20} {'p-value':>10}  result",
    ]
    fastest = report.get("fastest_threshold")
    for row in report["thresholds"]:
        layers = "-" if row["mean_layers"] is None else f"{row['mean_layers']:.2f}"
        speed = "-" if row.get("predicted_speed") is None else f"{row['predicted_speed']:.3f}x"
        by_batch = row.get("predicted_speed_by_batch") or {}
        each = "/".join(f"{by_batch[str(b)]:.2f}" for b in REPORTED_BATCHES) if by_batch else "-"
        if row["accepted"]:
            result = "accepted"
        elif row["tested"]:
            result = "not accepted (sequence stops)"
        else:
            result = "not tested"
        if row["threshold"] == report.get("chosen_threshold"):
            result += "  <- chosen"
        if fastest is not None and row["threshold"] == fastest != report.get("chosen_threshold"):
            result += "  <- fastest predicted"
        lines.append(
            f"{row['threshold']:>10g} {row['agreement']:>10.4f} {row['token_agreement']:>10.4f} "
            f"{layers:>12} {speed:>12} {each:>20} {row['p_value']:>10.3g}  {result}"
        )
    lines.append(f"* pred. b{batch}: {PREDICTED} speed vs plain vLLM with {batch} request(s) decoding at once (--batch):\n"
                 "  plain's weight bytes per decode step over the setting's, from its exit counts; a limit where\n"
                 f"  decoding is bound by reading weights, not measured ({others}: the same at those batches)")
    return "\n".join(lines)

