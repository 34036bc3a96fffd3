"""The quality benchmark: its scores, its HumanEval runner, and a smoke run on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_early_exit.tools.quality import (
    Point,
    frontier,
    humaneval_code,
    humaneval_problems,
    humaneval_program,
    lcs_length,
    pick_operating_point,
    rouge_l,
    run_program,
    skip_sets_from_influence,
)

from .conftest import one_process_env


def test_rouge_l_on_token_ids():
    assert lcs_length([1, 2, 3, 4], [2, 4, 3]) == 2
    assert lcs_length([7, 1, 7, 2, 7, 3], [1, 2, 3]) == 3
    assert rouge_l([5, 6, 7], [5, 6, 7]) == 1.0
    assert rouge_l([], []) == 1.0
    assert rouge_l([1, 2], []) == 0.0
    assert rouge_l([1, 2], [3, 4]) == 0.0
    # LCS 2 of a 4-token candidate and a 3-token reference: P = 1/2, R = 2/3, F = 4/7.
    assert rouge_l([1, 2, 3, 4], [2, 4, 3]) == pytest.approx(4 / 7)
    # Order matters: a common subsequence, not a bag of tokens.
    assert rouge_l([3, 2, 1], [1, 2, 3]) == pytest.approx(1 / 3)


def test_humaneval_runner_passes_fails_and_times_out():
    problem = humaneval_problems(1)[0]
    assert problem["task_id"] == "HumanEval/0"
    # A reply that is the function's body, and one that defines the whole function.
    assert run_program(humaneval_program(problem, problem["canonical_solution"]), timeout_s=20)
    whole = "def has_close_elements(numbers, threshold):\n" + problem["canonical_solution"]
    assert run_program(humaneval_program(problem, whole), timeout_s=20)
    assert not run_program(humaneval_program(problem, "    return False\n"), timeout_s=20)
    assert not run_program(humaneval_program(problem, "    while True:\n        pass\n"), timeout_s=1)


def test_humaneval_code_is_the_first_code_block_of_a_reply():
    assert humaneval_code("Here:\n```python\ndef f():\n    return 1\n```\nIt returns 1.") == "def f():\n    return 1\n"
    assert humaneval_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut at the stop
    assert humaneval_code("    return 1\n") == "    return 1\n"


def _point(signal, setting, mean_layers, agreement):
    return Point(signal, setting, 10, mean_layers, 0.0, 0.0, agreement, 0.0)


def test_frontier_and_operating_point_take_the_lowest_depth_that_keeps_agreement():
    points = [
        _point("full", None, 10.0, 0.999),
        _point("max_prob", 0.9, 6.0, 0.80),
        _point("max_prob", 0.99, 7.5, 0.96),
        _point("max_prob", 0.999, 9.0, 0.995),
        _point("margin", 0.5, 10.0, 1.0),
    ]
    table = frontier(points)
    assert set(table) == {"max_prob", "margin"}
    assert table["max_prob"]["0.9"]["setting"] == 0.99
    assert table["max_prob"]["0.95"]["depth"] == 0.75
    assert table["max_prob"]["0.99"]["setting"] == 0.999
    assert pick_operating_point([p for p in points if p.signal == "max_prob"]).setting == 0.99
    # A point that never left early is no operating point.
    assert pick_operating_point([p for p in points if p.signal == "margin"]) is None


def test_skip_sets_grow_from_the_least_influential_inner_layers():
    influence = [0.9, 0.1, 0.05, 0.3, 0.02, 0.5]
    assert skip_sets_from_influence(influence, [1, 2, 3, 9]) == [[4], [2, 4], [1, 2, 4]]


def test_quality_benchmark_smoke_run(tiny_chat_llama, tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_early_exit", "quality", "--smoke", "--model", str(tiny_chat_llama),
         "--heads", str(tmp_path / "no-heads"), "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=one_process_env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_smoke_results(out)


def check_smoke_results(out):
    """The files of a smoke run exist and their numbers are consistent."""
    report = json.loads((out / "quality.json").read_text())
    for name in ("quality.md", "quality_agreement.png", "quality_prefix.png", "quality_exits.png"):
        assert (out / name).stat().st_size > 0
    layers = report["setup"]["num_layers"]
    skip_set = report["setup"]["skip"]["sets"]
    assert len(skip_set) == 1 and len(skip_set[0]) == 1 and 0 < skip_set[0][0] < layers - 1
    assert skip_set[0][0] == report["setup"]["skip"]["order"][0]
    points = {(p["signal"], json.dumps(p["setting"])): p for p in report["points"]}
    assert set(points) == {
        ("full", "null"), ("max_prob", "0.0"), ("max_prob", "0.02"), ("max_prob", "1.0"), ("skip", json.dumps(skip_set[0]))
    }

    for p in points.values():
        assert p["exits_per_layer"][-1] == 0 and len(p["exits_per_layer"]) == layers
        assert sum(p["exits_per_layer"]) + p["full_depth_tokens"] == p["decode_tokens"] > 0
        if p["setting"] is not None:
            # All prompts are prefilled in one step, so every decode step is pure decode
            # and the early-exit engine's counters see every decode token.
            assert p["counted_decode_tokens"] == p["decode_tokens"]
        for key in ("identical", "prefix", "token_agreement", "rouge_l"):
            assert 0.0 <= p[key] <= 1.0
        assert p["depth"] == pytest.approx(p["mean_layers"] / layers)

    full = points[("full", "null")]
    assert (full["identical"], full["prefix"], full["rouge_l"], full["mean_layers"]) == (1.0, 1.0, 1.0, layers)
    assert full["token_agreement"] == 1.0

    # A threshold max_prob never reaches: no exits, the full-depth outputs exactly.
    never = points[("max_prob", "1.0")]
    assert never["full_depth_tokens"] == never["decode_tokens"]
    assert (never["identical"], never["prefix"], never["rouge_l"], never["mean_layers"]) == (1.0, 1.0, 1.0, layers)
    assert never["token_agreement"] == full["token_agreement"]

    # Threshold 0: every decode token leaves at the first check layer.
    always = points[("max_prob", "0.0")]
    first = always["exit_layers"][0]
    assert first < layers - 1
    assert always["exits_per_layer"][first] == always["decode_tokens"]
    assert always["mean_layers"] == first + 1
    assert always["identical"] < 1.0  # a random model's layer-5 readout is not its final one

    some = points[("max_prob", "0.02")]
    assert always["mean_layers"] <= some["mean_layers"] <= never["mean_layers"]

    # Skipping one layer: every counted decode token computes five layers.
    skip = points[("skip", json.dumps(skip_set[0]))]
    assert skip["full_depth_tokens"] == skip["decode_tokens"]
    assert skip["mean_layers"] == 5.0

    # The frontier holds points that left early and reach each target; a point that never left is none.
    for method, row in report["frontier"].items():
        for target, best in row.items():
            assert best is None or (best["token_agreement"] >= float(target) and best["depth"] < 1.0)
    assert report["frontier"]["max_prob"]["0.99"] is None or report["frontier"]["max_prob"]["0.99"]["setting"] != 1.0
    assert report["humaneval"]["full"]["problems"] == 2
    assert set(report["skipped"]) == {"head", "gate"}
    assert all("train-heads" in message for message in report["skipped"].values())
    md = (out / "quality.md").read_text()
    assert "| max_prob | 1 | 6.00 | 1.000 | 1.0000 | 1.0000 | 1.000 | 1.0000 |" in md
    assert "## Frontier" in md and "## HumanEval pass@1" in md


def test_merge_keeps_the_other_methods_of_an_earlier_report():
    from vllm_early_exit.tools.quality import Results, merge_previous

    setup = {"model": "m", "num_layers": 10, "prompts": 4, "prompt_split": "evaluation", "max_tokens": 8,
             "dtype": "float32", "humaneval": {"problems": 2}, "thresholds": {"max_prob": [0.9]}, "methods": ["max_prob"]}
    earlier = Results(dict(setup, date="then"))
    earlier.points += [_point("full", None, 10.0, 1.0), _point("max_prob", 0.9, 8.0, 0.97), _point("head", 0.5, 7.0, 0.5)]
    earlier.choose_operating_point("max_prob")
    now = Results(dict(setup, date="now", thresholds={"head": [0.8]}, methods=["head"]))
    now.points += [_point("full", None, 10.0, 1.0), _point("head", 0.8, 6.0, 0.96)]
    merge_previous(now, earlier.report(), ["head"])
    report = now.report()
    assert [(p["signal"], p["setting"]) for p in report["points"]] == [("full", None), ("max_prob", 0.9), ("head", 0.8)]
    assert report["operating_points"]["max_prob"]["setting"] == 0.9
    assert report["setup"]["thresholds"] == {"max_prob": [0.9], "head": [0.8]}
    with pytest.raises(SystemExit, match="max_tokens"):
        merge_previous(Results(dict(setup, max_tokens=16)), earlier.report(), ["head"])
