"""``scripts/gpu_check.py``: its CPU smoke run (tiny random LLaMA, float32) end to end.

The script is what runs on a lent GPU machine; here it runs with ``--smoke --device cpu``
so that its harness (worker subprocesses, comparisons, reports) is exercised in CI.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import tempfile
import types
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


def _shortlist(tmp_path: Path) -> Path:
    """A shortlist of 64 of the tiny model's 512 tokens."""
    from vllm_early_exit.model_executor.early_exit.shortlist import write_shortlist

    return write_shortlist(tmp_path / "shortlist.json", list(range(10, 74)), 512, {"made by": "this test"})


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
    shortlist = _shortlist(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--out", str(out), "--budget-s", "540",
         "--scratch", str(tmp_path / "scratch"), "--shortlist", str(shortlist)],
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

    # The speed section has numbers for the three engines (never-firing checks through the
    # shortlist given; vocab_top_k ones only without one), with the depth each ran.
    rows = {r["engine"]: r for r in report["speed"]["rows"]}
    assert set(rows) == {"plain", "forced_50", "never_shortlist"}, report["speed"]
    assert all(r["tokens_per_s"] > 0 and r["ratio"] > 0 for r in rows.values())
    assert rows["forced_50"]["mean_layers"] == 3.0 and rows["never_shortlist"]["mean_layers"] == 6.0
    assert report["speed"]["engines"]["never_shortlist"]["early_exit"]["shortlist"] == str(shortlist.resolve())
    assert not report["speed"]["errors"]

    md = report_md.read_text()
    assert "## Correctness" in md and "## Speed" in md
    assert all(name in md for name in CHECKS) and "| 4 | forced_50 |" in md


def test_bf16_reference_checks_are_teacher_forced(tiny_llama):
    """In bf16 one flipped token must cost one position, not every later one: the reference
    scores the engine's own prefix. float32 keeps the free-running, token-for-token rule."""
    import torch
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_prompts
    from tests.reference import ReferenceDecoder

    gc = _script()
    ref = ReferenceDecoder(LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    prompts = tiny_prompts(2, seed=3)
    case = {"num_layers": 6, "prompts": prompts, "max_tokens": 12, "forced": gc.forced_settings(6),
            "rule": {"exit_layers": [1, 3], "threshold": 0.5}, "reference": ref}
    free = [ref.generate(p, 12, exit_layers=(2,), threshold=0.0).tokens for p in prompts]
    plain = [ref.generate(p, 12).tokens for p in prompts]
    # An engine that picks one token "wrong" (position 4) and decodes on from its own prefix.
    forced = {"exit_layers": (2,), "threshold": 0.0}
    flipped = [free[0][:4] + [(free[0][4] + 1) % 512], list(free[1])]
    while len(flipped[0]) < 12:
        flipped[0].append(ref.generate(prompts[0], 0, teacher=flipped[0] + [0], **forced).tokens[len(flipped[0])])
    assert flipped[0][5:] != free[0][5:]  # free-running, the one flip would count many times
    engine = {"outputs": [flipped], "stats": {"exits_per_layer": [0, 0, 2 * 11, 0, 0, 0]}}

    def judge(dtype):
        report = gc.Report(Path(tempfile.mkdtemp()), {"date": "", "device_name": "", "python": "", "dtype": dtype,
                                                       "batch_invariant": False, "batch_invariant_known": False,
                                                       "budget_s": 0, "smoke": True})
        args = types.SimpleNamespace(dtype=dtype, bf16_tolerance=0.05)
        checks = gc.GroupChecks({"name": "g"}, case, report, args)
        checks._against_reference("forced_eq_reference", {"outputs": [plain]}, engine, "forced", range(2))
        return report.data["correctness"][-1]

    bf16 = judge("bfloat16")
    assert bf16["compare"]["differing"] == 1 and bf16["compare"]["first_divergence"] == [4, None], bf16["compare"]
    assert bf16["noise"] == 0.0  # plain == the full-depth reference here, teacher-forced or not
    assert bf16["status"] == "pass" and "exit counts equal" in bf16["detail"], bf16  # 1/24 within 0 + 0.05
    fp32 = judge("float32")
    assert fp32["status"] == "fail" and fp32["compare"]["differing"] >= 1, fp32  # identical tokens required
    # Teacher forcing with the reference's own tokens reproduces its free-running trace.
    again = ref.generate(prompts[1], 12, exit_layers=(2,), threshold=0.0, teacher=free[1])
    assert again.tokens == free[1] and again.exit_layers == [2] * 11


def test_gpu_check_profile_smoke_run_on_cpu(tmp_path):
    """``--only profile``: every engine profiled at its batch size; the early-exit ranges show
    up for the early-exit engines only (the wrappers reach the model's own methods)."""
    out = tmp_path / "out"
    shortlist = _shortlist(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--only", "profile", "--out", str(out),
         "--budget-s", "400", "--scratch", str(tmp_path / "scratch"), "--shortlist", str(shortlist)],
        cwd=ROOT, capture_output=True, text=True, timeout=500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    rows = {r["engine"]: r for r in report["profile"]["rows"]}
    assert set(rows) == {"plain", "forced_50", "never_shortlist"}, report["profile"]
    for name, row in rows.items():
        assert "error" not in row and row["ms_per_step"] > 0, row
        host = row["host_ms_per_step"]
        assert host["model.forward"] > 0 and host["model.compute_logits"] > 0, row
        assert ("ee.segment" in host) == (name != "plain"), (name, host)
    forced, never = rows["forced_50"]["calls_per_step"], rows["never_shortlist"]["calls_per_step"]
    assert forced["ee.kv_fill"] > 0  # every decode step fills the deeper layers
    assert "ee.flag_read" not in forced and "ee.gate_read" not in forced  # known to leave: no host read
    assert "ee.kv_fill" not in never  # nothing leaves
    assert never["ee.gate_read"] == never["ee.first_stage"] > 0  # one read per check: its shortlist gate
    assert "ee.flag_read" not in never  # no gate opened, so no confirmation and no second read
    assert "## Profile" in (out / "gpu_check.md").read_text()
