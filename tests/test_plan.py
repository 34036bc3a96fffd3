"""The step plan (``early_exit/plan.py``): segments between decision points, in plain Python."""

from __future__ import annotations

from vllm_early_exit.model_executor.early_exit.plan import Segment, plan


def test_checks_end_segments_and_skipped_layers_are_their_own():
    steps = plan(0, 30, check_layers=[20, 22, 28], skip_layers=[4])
    assert steps.bounds == [(0, 4), (4, 5), (5, 21), (21, 23), (23, 29), (29, 30)]
    assert steps.decisions == [20, 22, 28]
    assert [s.skipped for s in steps.segments] == [False, True, False, False, False, False]
    assert all(s.check == s.decision for s in steps.segments)


def test_budget_ends_split_a_segment_without_a_check():
    """A request whose budget ends after layer 24 brings a decision point of its own."""
    steps = plan(0, 30, check_layers=[20, 28], extra_points=[24])
    assert steps.bounds == [(0, 21), (21, 25), (25, 29), (29, 30)]
    assert [(s.last, s.check, s.decision) for s in steps.segments] == [
        (20, True, True), (24, False, True), (28, True, True), (29, False, False),
    ]


def test_a_signal_that_reads_the_entering_stream_cuts_before_each_check():
    steps = plan(0, 6, check_layers=[1, 3], cut_before_checks=True)
    assert steps.bounds == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 6)]
    assert [s.reads_previous for s in steps.segments] == [False, True, False, True, False]


def test_points_at_or_past_the_last_layer_decide_nothing():
    steps = plan(0, 6, check_layers=[5], extra_points=[5, 9])
    assert steps.segments == (Segment(0, 6),)
    assert steps.decisions == []


def test_a_skipped_layer_can_end_a_budget():
    steps = plan(0, 6, check_layers=[], skip_layers=[2], extra_points=[2])
    assert [(s.bounds, s.skipped, s.decision) for s in steps.segments] == [
        ((0, 2), False, False), ((2, 3), True, True), ((3, 6), False, False),
    ]
