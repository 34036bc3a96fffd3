"""``tools/step_times.py``: a step's parts timed as exclusive time, adding up to the step."""

from __future__ import annotations

import time

from vllm_early_exit.tools.step_times import StepTimer, TimedStep


def test_parts_are_exclusive_and_add_up_to_the_step():
    timer = StepTimer()

    def read():
        time.sleep(0.02)

    def branch():
        time.sleep(0.01)
        timer.time("read", read)

    def step():
        time.sleep(0.01)
        timer.time("branch exit", branch)
        timer.time("read", read)

    start = time.perf_counter()
    timer.time("host", step)
    total = time.perf_counter() - start
    seconds = timer._seconds
    assert timer._calls == {"host": 1, "branch exit": 1, "read": 2}
    assert abs(sum(seconds.values()) - total) < 1e-3  # the parts add up to the step
    assert 0.04 <= seconds["read"] < 0.06
    assert 0.01 <= seconds["branch exit"] < 0.02  # its read counted as a read, not as the branch
    assert 0.01 <= seconds["host"] < 0.02


def test_summary_is_per_pure_decode_step_after_the_first_ones():
    timer = StepTimer()
    timer.steps = [
        TimedStep(True, 1, {"host": 9.0}, {"host": 1}),  # left out: the first pure-decode step
        TimedStep(False, 4, {"host": 5.0}, {"host": 1}),  # a prefill step
        TimedStep(True, 1, {"host": 0.001, "read": 0.003}, {"host": 1, "read": 5}),
        TimedStep(True, 1, {"host": 0.003, "read": 0.001}, {"host": 1, "read": 3}),
    ]
    summary = timer.summary(skip=1)
    assert summary["steps"] == 2
    assert summary["ms_per_step"] == {"read": 2.0, "host": 2.0}
    assert summary["calls_per_step"] == {"read": 4.0, "host": 1.0}
    assert summary["step_ms"] == 4.0
