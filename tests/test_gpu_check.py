"""``scripts/gpu_check.py``: its CPU smoke run (tiny random LLaMA, float32) end to end.

The script is what runs on a lent GPU machine; here it runs with ``--smoke --device cpu``
so that its harness (worker subprocesses, comparisons, reports) is exercised in CI.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
CHECKS = (
    "exits_off_eq_plain", "forced_eq_reference", "threshold_eq_reference", "request_off_eq_plain", "compiled_eq_eager",
)


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_verdicts_need_compared_and_equal_tokens():
    gc = _script()
    assert gc.verdict(gc.compare([[1, 2, 3]], [[1, 2, 3]]), True, None, 0.05)[0] == "pass"
    assert gc.verdict(gc.compare([[1, 2, 4]], [[1, 2, 3]]), True, None, 0.05)[0] == "fail"
    assert gc.verdict(gc.compare([[1, 2]], [[1, 2, 3]]), True, None, 0.05)[0] == "fail"  # a missing token
    assert gc.verdict(gc.compare([], [[1, 2, 3]]), True, None, 0.05)[0] == "fail"  # nothing compared
    # bf16: within the like-with-like noise plus tolerance, or not.
    one_in_ten = gc.compare([[1] * 9 + [2]], [[1] * 10])
    assert gc.verdict(one_in_ten, False, 0.06, 0.05)[0] == "pass"
    assert gc.verdict(one_in_ten, False, 0.0, 0.05)[0] == "fail"


def test_gpu_check_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--out", str(out), "--budget-s", "540",
         "--scratch", str(tmp_path / "scratch")],
        cwd=ROOT, capture_output=True, text=True, timeout=660,
    )
    report_md = out / "gpu_check.md"
    assert (out / "gpu_check.json").exists() and report_md.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    checks = {c["check"]: c for c in report["correctness"] if c["group"] == "tiny-default"}
    assert proc.returncode == 0, json.dumps(report["correctness"], indent=1)[-6000:]

    # Every correctness check ran, compared tokens, and found them identical (float32).
    assert set(CHECKS) <= set(checks), sorted(checks)
    for name in CHECKS:
        c = checks[name]
        assert c["status"] == "pass", (name, c)
        assert c["compare"]["tokens"] > 0 and c["compare"]["differing"] == 0, (name, c["compare"])
        assert c["compare"]["rows"] == c["compare"]["rows_expected"] > 0
    assert checks["plain_run_to_run"]["compare"]["differing"] == 0

    # The exits really happened: forced at layer 2 of 6 for every decode token; threshold exits
    # beside the per-request enabled:false rows; the compiled engine exits as the eager one.
    forced = checks["forced_eq_reference"]["stats"]
    assert forced["exits_per_layer"][2] == forced["decode_tokens"] > 0
    assert sum(checks["threshold_eq_reference"]["reference_exits"]) > 0
    assert checks["compiled_eq_eager"]["stats"]["exits_per_layer"] == checks["threshold_eq_reference"]["stats"]["exits_per_layer"]

    # On CPU vLLM picks the V1 runner: recorded, not failed.
    groups = {g["group"]: g for g in report["groups"]}
    assert groups["tiny-default"]["runner_version"] == "V1"
    assert groups["tiny-v1"]["status"] == "skipped"
    assert "V2 unavailable on this platform" in groups["tiny-v1"]["note"]

    # The speed section has numbers for the three engines, with the depth each ran.
    rows = {r["engine"]: r for r in report["speed"]["rows"]}
    assert set(rows) == {"plain", "forced_50", "never_top_k"}, report["speed"]
    assert all(r["tokens_per_s"] > 0 and r["ratio"] > 0 for r in rows.values())
    assert rows["forced_50"]["mean_layers"] == 3.0 and rows["never_top_k"]["mean_layers"] == 6.0
    assert not report["speed"]["errors"]

    md = report_md.read_text()
    assert "## Correctness" in md and "## Speed" in md
    assert all(name in md for name in CHECKS) and "| 4 | forced_50 |" in md
