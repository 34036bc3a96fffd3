"""The rule every long tool resumes by: the same run's saved results, or a refusal naming what differs."""

from __future__ import annotations

import json

import pytest

from vllm_early_exit.tools.resume import saved_results, write_json


def test_results_of_the_same_settings_are_handed_back(tmp_path):
    path = tmp_path / "out" / "results.json"
    assert saved_results(path, {"model": "m"}, command="bench") is None  # nothing measured yet
    write_json(path, {"setup": {"model": "m", "batches": [1, 8]}, "raw": [1, 2]})
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left behind
    # Tuples in the settings compare as the lists the file holds.
    saved = saved_results(path, {"batches": (1, 8)}, command="bench", settings_of=lambda s: s["setup"])
    assert saved["raw"] == [1, 2]


def test_results_of_other_settings_are_refused_with_both_values(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"model": "m", "max_tokens": 10, "prompts": list(range(100))})
    with pytest.raises(SystemExit) as refused:
        saved_results(path, {"model": "m", "max_tokens": 11, "prompts": list(range(101))}, command="oracle")
    message = str(refused.value)
    assert message.startswith(f"oracle --resume: {path} was measured with another max_tokens, prompts (")
    assert "max_tokens: 10 there, 11 now" in message
    assert "..." in message and len(message) < 400  # long values are cut short
    assert "use another --out or run without --resume" in message


def test_a_file_cut_off_mid_write_is_refused_clearly(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"model": "m"})[:-3])
    with pytest.raises(SystemExit, match="calibrate --resume: .* is not a results file"):
        saved_results(path, {"model": "m"}, command="calibrate")
