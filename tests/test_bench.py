"""A smoke run of the speed benchmark: the real harness, tiny steps, on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys


def test_speed_benchmark_smoke_run_writes_results(tiny_chat_llama, tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_early_exit", "bench", "--smoke", "--model", str(tiny_chat_llama),
         "--batches", "1,2", "--output-tokens", "6", "--prompt-tokens", "16", "--rounds", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "speed.json").read_text())
    rows = {(r["engine"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {(e, b) for e in ("plain", "forced_50", "never_top_k", "per_token", "per_token_shortlist") for b in (1, 2)}
    # Forced to leave after layer 2 of 6: three layers per token, ideal speedup 2.
    assert rows[("forced_50", 2)]["mean_layers"] == 3.0
    assert rows[("forced_50", 2)]["ideal_speedup"] == 2.0
    assert rows[("never_top_k", 1)]["mean_layers"] == 6.0
    # The cost model: leaving at half depth reads fewer weights, checks that never fire read more.
    assert 1.0 < rows[("forced_50", 2)]["predicted"] < 2.0
    assert rows[("never_top_k", 1)]["predicted"] < 1.0
    assert report["setup"]["modes"]["per_token_shortlist"]["shortlist"]
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    assert rows[("plain", 1)]["ratio_vs_plain"] == 1.0
    assert (out / "speed.png").stat().st_size > 0
    assert "| forced_50 | 2 |" in (out / "speed.md").read_text()
