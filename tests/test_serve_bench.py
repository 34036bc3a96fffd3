"""The serving benchmark end to end on a tiny model: two real `vllm serve` processes and
vLLM's own client (`vllm bench serve`) against each, at two concurrencies."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from vllm_early_exit.tools.assets import write_sharegpt_file


def test_sharegpt_file_holds_complete_records_vllm_can_load(tmp_path):
    path = tmp_path / "sharegpt.json"
    assert write_sharegpt_file(path, 50) == 50
    records = json.loads(path.read_text())  # the packaged file itself does not parse
    assert len(records) == 50
    assert all(len(r["conversations"]) == 2 and r["conversations"][0]["from"] == "human" for r in records)


def test_bench_serve_smoke_run(tiny_chat_llama, tmp_path):
    out, temp = tmp_path / "results", tmp_path / "temp"
    temp.mkdir()
    settings = {"exit_layers": [2, 3], "threshold": 0.5, "policy": "per_token", "compile": False}
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_early_exit", "bench-serve", "--model", str(tiny_chat_llama),
         "--concurrency", "1,2", "--prompts-per-concurrency", "1", "--output-len", "4", "--max-model-len", "512",
         "--early-exit-config", json.dumps(settings), "--serve-args=--enforce-eager", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "TMPDIR": str(temp)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not list(temp.glob("serve-bench-*"))  # its work folder (data set, logs, client results) is gone
    report = json.loads((out / "serve_bench.json").read_text())
    assert report["setup"]["complete"]
    runs = {(r["server"], r["concurrency"]): r for r in report["runs"]}
    assert set(runs) == {(s, c) for s in ("plain", "early_exit") for c in (1, 2)}
    for run in runs.values():
        assert run["completed"] == run["num_prompts"] == 8
        assert run["output_tokens"] == 8 * 4  # ignore_eos: every request runs to its output length
        assert run["output_throughput"] > 0
    # The early-exit server's counters over each run come from its /metrics: 3 decode
    # tokens per request after the first (prefill) token, warm-up requests included.
    stats = runs[("early_exit", 1)]["exit_stats"]
    assert stats["decode_tokens"] >= 8 * 3
    assert stats["decode_tokens"] == stats["full_depth_tokens"] + sum(stats["exits_per_layer"])
    assert runs[("plain", 1)]["exit_stats"] is None
    rows = {r["concurrency"]: r for r in report["rows"]}
    assert rows[2]["ratio_output_throughput"] > 0
    assert 3.0 <= rows[2]["mean_layers"] <= 6.0
    assert rows[2]["limit"] > 0
    assert "| 2 | 8 |" in (out / "serve_bench.md").read_text()
    assert (out / "serve_bench.png").stat().st_size > 0
