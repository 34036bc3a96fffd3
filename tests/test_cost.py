"""The cost model at a batch: a decode step reads each layer once for all its rows.

Hand-counted weights of a small model against ``tools/cost.py``: per token (one request
alone), per step of ``batch`` independent rows under ``per_token`` (a step is as deep as
its deepest row), and per step from the step counters an engine keeps. No engine runs here;
``test_exit_logits.py`` checks the step counters against the reference in the real engine.
"""

from __future__ import annotations

import pytest

from vllm_early_exit.model_executor.early_exit.stats import ExitStats
from vllm_early_exit.tools.cost import (
    WeightBytes,
    batch_bytes,
    predicted_at_batch,
    predicted_ratio,
    predicted_speed,
    predicted_step_ratio,
    step_bytes,
)

LAYERS, HIDDEN, LAYER, KV, HEAD = 6, 8, 1000, 50, 400
WEIGHTS = WeightBytes(num_layers=LAYERS, hidden=HIDDEN, layer=LAYER, kv_projection=KV, lm_head=HEAD)
CHECK_AT_2 = {"exit_layers": [2], "policy": "per_token", "signal": "max_prob", "threshold": 0.9}


def stats(exits: dict[int, int] | None = None, full: int = 0, **counters) -> dict:
    per_layer = [0] * LAYERS
    for layer, count in (exits or {}).items():
        per_layer[layer] = count
    return ExitStats(LAYERS, exits_per_layer=per_layer, full_depth_tokens=full, **counters).to_dict()


def early(layer: int) -> int:
    """A step that stops after ``layer``: the layers down to it, the K/V of the rest."""
    return (layer + 1) * LAYER + (LAYERS - layer - 1) * KV


FULL = LAYERS * LAYER


def test_forced_exits_cost_the_same_at_every_batch():
    """Every row leaves at the same layer, so a step of any size is as deep as one row."""
    forced = {**CHECK_AT_2, "threshold": 0.0}
    counted = stats({2: 64})
    one = WEIGHTS.plain / (early(2) + HEAD)  # no check readout, the LM head to sample
    assert predicted_ratio(WEIGHTS, forced, counted) == pytest.approx(one)
    for batch in (1, 8, 32):
        assert predicted_at_batch(WEIGHTS, forced, counted, batch) == pytest.approx(one)


def test_a_per_token_step_is_as_deep_as_its_deepest_row():
    """Half the tokens leave at the check after layer 2 (sampled from its logits), half go the
    full depth: a step of ``b`` rows stops there only when all of them do (probability 0.5^b)."""
    counted = stats({2: 50}, full=50, sampled_from_checks=50)
    leave = early(2) + HEAD  # the check's full readout, which also samples
    stay = FULL + HEAD + HEAD  # the check's readout, then the LM head for sampling
    assert predicted_ratio(WEIGHTS, CHECK_AT_2, counted) == pytest.approx(WEIGHTS.plain / (0.5 * leave + 0.5 * stay))
    for batch in (2, 8):
        gone = 0.5**batch
        assert batch_bytes(WEIGHTS, CHECK_AT_2, counted, batch) == pytest.approx(gone * leave + (1 - gone) * stay)
        assert predicted_at_batch(WEIGHTS, CHECK_AT_2, counted, batch) == pytest.approx(
            WEIGHTS.plain / (gone * leave + (1 - gone) * stay)
        )
    speeds = [predicted_at_batch(WEIGHTS, CHECK_AT_2, counted, b) for b in (1, 2, 8, 32)]
    assert speeds == sorted(speeds, reverse=True) and speeds[0] > 1.0 > speeds[-1]


def test_two_stage_checks_read_the_lm_head_where_some_row_leaves(tmp_path):
    """With a shortlist under per_token, the checks read its rows; the LM head is read to confirm
    at each check where some row of the step leaves, and to sample when some row went on to the
    end (a row that left is sampled from its confirmation's logits)."""
    from vllm_early_exit.model_executor.early_exit.shortlist import write_shortlist

    shortlist = tmp_path / "shortlist.json"
    write_shortlist(shortlist, list(range(10)), vocab_size=50, source={"test": "cost"})
    settings = {**CHECK_AT_2, "exit_layers": [2, 4], "shortlist": str(shortlist)}
    counted = stats({2: 30, 4: 30}, full=40, sampled_from_checks=60)
    rows = 10 * HIDDEN
    shares = {2: 0.3**4, 4: 0.6**4 - 0.3**4, 5: 1 - 0.6**4}
    products = 2 * (1 - 0.7**4) + (1 - 0.6**4)  # some row leaves at 2, at 4, goes the full depth
    expected = (
        shares[2] * (early(2) + rows) + shares[4] * (early(4) + 2 * rows) + shares[5] * (FULL + 2 * rows)
        + products * HEAD
    )
    assert batch_bytes(WEIGHTS, settings, counted, 4) == pytest.approx(expected)
    alone = 0.3 * (early(2) + rows) + 0.3 * (early(4) + 2 * rows) + 0.4 * (FULL + 2 * rows) + HEAD
    assert batch_bytes(WEIGHTS, settings, counted, 1) == pytest.approx(alone)


def test_rows_that_leave_together_do_not_depend_on_the_batch():
    """Under ``all`` / ``quorum`` the counts are already the steps' own: per token holds at any batch."""
    counted = stats({2: 50}, full=50, sampled_from_checks=50)
    for policy in ("all", "quorum"):
        settings = {**CHECK_AT_2, "policy": policy}
        assert predicted_at_batch(WEIGHTS, settings, counted, 32) == predicted_ratio(WEIGHTS, settings, counted)


def test_counted_steps_are_priced_as_they_ran():
    """Step counters: 3 steps stopped after layer 2, 1 ran every layer; 3 check readouts and one
    sampling product in all, and the check's cheap part (none for a full readout) per step."""
    counted = stats({2: 20}, full=12, step_exits_per_layer=[0, 0, 3, 0, 0, 0], full_depth_steps=1,
                    full_readouts=4, sampling_products=1, sampled_from_checks=20)
    expected = (3 * early(2) + FULL + 5 * HEAD) / 4
    assert step_bytes(WEIGHTS, CHECK_AT_2, counted) == pytest.approx(expected)
    assert predicted_step_ratio(WEIGHTS, CHECK_AT_2, counted) == pytest.approx(WEIGHTS.plain / expected)
    assert step_bytes(WEIGHTS, CHECK_AT_2, stats({2: 20})) is None  # no step counted
    # Steps over max_exit_batch ran every layer and no check: plain vLLM's weights.
    unchecked = stats(full=32, full_depth_steps=4, unchecked_steps=4, sampling_products=4)
    assert predicted_step_ratio(WEIGHTS, {**CHECK_AT_2, "max_exit_batch": 2}, unchecked) == pytest.approx(1.0)


def test_a_batch_must_be_positive_and_missing_counts_predict_nothing():
    counted = stats({2: 50}, full=50)
    with pytest.raises(ValueError, match="batch 0 is invalid: allowed values are integers >= 1"):
        predicted_at_batch(WEIGHTS, CHECK_AT_2, counted, 0)
    assert predicted_speed(None, CHECK_AT_2, counted, 8) is None
    assert predicted_speed(WEIGHTS, CHECK_AT_2, stats(), 8) is None


def test_above_max_exit_batch_steps_cost_what_plain_vllm_reads():
    """Steps with more rows than ``max_exit_batch`` run unchecked; the hint is the largest batch
    the checks are predicted to pay at (0.5^b of the steps leave at layer 2, the rest pay a check)."""
    from vllm_early_exit.tools.cost import exit_batch_hint

    counted = stats({2: 50}, full=50, sampled_from_checks=50)
    guarded = {**CHECK_AT_2, "max_exit_batch": 2}
    assert predicted_at_batch(WEIGHTS, guarded, counted, 2) == predicted_at_batch(WEIGHTS, CHECK_AT_2, counted, 2)
    assert predicted_at_batch(WEIGHTS, guarded, counted, 3) == 1.0
    paying = [b for b in range(1, 64) if predicted_at_batch(WEIGHTS, CHECK_AT_2, counted, b) > 1.0]
    assert paying == list(range(1, len(paying) + 1)) and 1 <= len(paying) < 63
    assert exit_batch_hint(WEIGHTS, guarded, counted) == len(paying)
    assert exit_batch_hint(WEIGHTS, {**CHECK_AT_2, "threshold": 1.0}, stats(full=100)) is None
