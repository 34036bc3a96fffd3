"""What the cost model says about the thresholds ``calibrate`` certified: which one to recommend.

The Learn-then-Test decision (``ltt.py``) certifies a run of thresholds for quality; this
module judges them for speed, from the weight bytes each one's exit counts predict
(``tools/cost.py``): the recommended threshold (:func:`speed_verdict`, over the certified
``ThresholdResult`` rows) and the largest batch at which it still pays
(:func:`exit_batch_verdict`). Nothing here runs an engine or changes what is certified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vllm_early_exit.tools.cost import PREDICTED, WeightBytes, exit_batch_hint

# A stricter accepted threshold is recommended over the chosen (most permissive)
# one only when it is predicted this much faster: smaller gaps are within what the
# exit counts of one calibration run vary by.
SPEED_MARGIN = 0.01

NO_FASTER = (
    "no calibrated setting is predicted to be faster than plain vLLM on this model: "
    "keep early exit off, or train heads / a shortlist"
)

DEFAULT_BATCH = 8
"""The decode batch a calibrated setting is judged at unless ``--batch`` says otherwise: a server
with a few concurrent requests. Under ``per_token`` the batch decides the speed: a step runs as
deep as its deepest row."""

REPORTED_BATCHES = (1, 8, 32)
"""The batches every report predicts besides ``--batch``."""

SPEED_BASIS = (
    f"predicted_speed: {PREDICTED} speed vs plain vLLM at the report's batch (predicted_speed_by_batch: "
    "at others), plain vLLM's weight bytes read per decode step over the setting's, from its exit counts "
    "on the calibration prompts (tools/cost.py; under per_token a step is as deep as its deepest row, the "
    "rows drawn independently from the counts); the limit on a machine where decoding is bound by reading "
    "weights, not a measured speed"
)


def speed_verdict(rows: Sequence[Any], chosen: int | None, batch: int = DEFAULT_BATCH) -> dict[str, Any]:
    """What the cost model says about the accepted thresholds ``rows[:chosen + 1]``.

    Returns the report's fields ``chosen_predicted_speed``, ``fastest_threshold``
    (the accepted threshold with the highest predicted speed; ties go to the more
    permissive), ``fastest_predicted_speed``, ``recommend`` (``"early_exit"``,
    ``"off"``, or None when nothing could be predicted), ``recommended_threshold``
    and ``speed_message``.

    Which threshold is recommended: the fastest accepted one when it is predicted
    more than ``SPEED_MARGIN`` faster than the chosen one (or the chosen one is not
    predicted faster than plain vLLM and it is), else the chosen one (the settings
    file). Fixed-sequence testing controls the family-wise error, so every accepted
    threshold holds its guarantee at once and picking among them by speed keeps it;
    a stricter threshold predicted faster is then no worse on quality and better on
    cost. Smaller gaps are noise of one run's exit counts, and the most permissive
    threshold (the Learn-then-Test rule, and what the file holds) stays. When no
    accepted threshold is predicted faster than plain vLLM (ratio <= 1.0: its
    checks read more weights than its exits save), ``recommend`` is ``"off"``. The rows'
    predictions are for ``batch`` rows a step, which the messages name.
    """
    at = f"plain vLLM at batch {batch}"
    verdict: dict[str, Any] = {
        "chosen_predicted_speed": None, "fastest_threshold": None, "fastest_predicted_speed": None,
        "recommend": "off" if chosen is None else None, "recommended_threshold": None, "speed_message": None,
    }
    if chosen is None:
        return verdict
    verdict["chosen_predicted_speed"] = mine = rows[chosen].predicted_speed
    known = [i for i in range(chosen + 1) if rows[i].predicted_speed is not None]
    if not known:
        verdict["speed_message"] = (f"no {PREDICTED} speed: the engine counted no decode token "
                                    "(or the model's config could not be read)")
        return verdict
    fastest = max(known, key=lambda i: (rows[i].predicted_speed, i))
    best = rows[fastest].predicted_speed
    verdict.update(fastest_threshold=rows[fastest].threshold, fastest_predicted_speed=best)
    if best <= 1.0:
        verdict.update(recommend="off", speed_message=(
            f"{NO_FASTER} (the fastest certified threshold, {rows[fastest].threshold:g}, is {PREDICTED} "
            f"{best:.3f}x {at})"
        ))
        return verdict
    switch = mine is None or mine <= 1.0 or best > mine * (1.0 + SPEED_MARGIN)
    pick = fastest if switch else chosen
    verdict.update(recommend="early_exit", recommended_threshold=rows[pick].threshold)
    if pick == chosen:
        verdict["speed_message"] = f"the chosen threshold is {PREDICTED} {rows[chosen].predicted_speed:.3f}x {at}"
    else:
        now = "-" if mine is None else f"{mine:.3f}x"
        verdict["speed_message"] = (
            f"recommended: threshold {rows[pick].threshold:g}, stricter and also certified, is {PREDICTED} "
            f"{best:.3f}x {at} against {now} for the chosen {rows[chosen].threshold:g}: "
            f"set \"threshold\": {rows[pick].threshold:g} in the settings file"
        )
    return verdict


def exit_batch_verdict(
    rows: Sequence[Any],
    chosen: int | None,
    verdict: Mapping[str, Any],
    settings: Mapping[str, Any],
    weights: WeightBytes | None,
) -> dict[str, Any]:
    """``max_exit_batch_hint``: the largest batch at which the recommended (else the chosen)
    threshold is predicted faster than plain vLLM (``cost.exit_batch_hint``), and a line saying
    how ``max_exit_batch`` keeps larger steps at plain vLLM's cost; None where nothing pays."""
    pick = verdict.get("recommended_threshold")
    row = next((r for r in rows if r.threshold == pick), None if chosen is None else rows[chosen])
    if row is None or weights is None or not row.exit_stats or not row.exit_stats.get("decode_tokens"):
        return {"max_exit_batch_hint": None}
    hint = exit_batch_hint(weights, {**settings, "threshold": row.threshold}, row.exit_stats)
    if hint is None:
        return {"max_exit_batch_hint": None}
    return {
        "max_exit_batch_hint": hint,
        "exit_batch_message": (
            f"threshold {row.threshold:g} is {PREDICTED} faster than plain vLLM at batches up to {hint}: "
            f"with \"max_exit_batch\": {hint} in the settings, larger steps run the full depth unchecked, "
            "as plain vLLM (a request's tokens then depend on how many requests decode beside it)"
        ),
    }
