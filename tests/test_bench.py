"""A smoke run of the speed benchmark: the real harness, tiny steps, on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import one_process_env


def _bench(model, out, *options) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_early_exit", "bench", "--model", str(model), "--batches", "1,2",
         "--output-tokens", "6", "--prompt-tokens", "16", "--rounds", "1", "--out", str(out), *options],
        capture_output=True, text=True, timeout=900, env=one_process_env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "speed.json").read_text())


def test_speed_benchmark_smoke_run_writes_results(tiny_chat_llama, tmp_path):
    """A run of one engine, then the smoke run resumed from it: the engine measured first is kept."""
    out = tmp_path / "results"
    first = _bench(tiny_chat_llama, out, "--modes", "forced_50")
    assert first["setup"]["complete"]
    assert {r["engine"] for r in first["rows"]} == {"plain", "forced_50"}
    report = _bench(tiny_chat_llama, out, "--smoke", "--resume")
    kept = [m for m in first["raw"] if m["block"] == "forced_50"]
    assert [m for m in report["raw"] if m["block"] == "forced_50"] == kept
    rows = {(r["engine"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {(e, b) for e in ("plain", "forced_50", "never_top_k", "per_token", "per_token_shortlist") for b in (1, 2)}
    # Forced to leave after layer 2 of 6: three layers per token, ideal speedup 2.
    assert rows[("forced_50", 2)]["mean_layers"] == 3.0
    assert rows[("forced_50", 2)]["ideal_speedup"] == 2.0
    assert rows[("never_top_k", 1)]["mean_layers"] == 6.0
    # The cost model: leaving at half depth reads fewer weights, checks that never fire read more.
    assert 1.0 < rows[("forced_50", 2)]["predicted"] < 2.0
    assert rows[("never_top_k", 1)]["predicted"] < 1.0
    # Priced by the steps each engine ran: at batch 1 a step is its token, so both counts agree;
    # forced exits stop every step at the same layer at any batch.
    for engine in ("forced_50", "never_top_k", "per_token"):
        assert rows[(engine, 1)]["predicted"] == pytest.approx(rows[(engine, 1)]["predicted_per_token"])
    assert rows[("forced_50", 2)]["predicted"] == pytest.approx(rows[("forced_50", 2)]["predicted_per_token"])
    stats = [m["stats"] for m in report["raw"] if m["engine"] == "per_token" and m["batch"] == 2][-1]
    assert stats["decode_steps"] > 0 and rows[("per_token", 2)]["predicted"] <= rows[("per_token", 2)]["predicted_per_token"]
    # Plain vLLM's prefill was timed in every block; the limit keeps its share as it is.
    forced = rows[("forced_50", 2)]
    assert 0.0 < forced["prefill_share"] < 1.0
    assert 1.0 < forced["limit"] < forced["predicted"]
    assert forced["limit"] == pytest.approx(1 / (forced["prefill_share"] + (1 - forced["prefill_share"]) / forced["predicted"]))
    assert {m["engine"] for m in report["raw"] if m["block"] == "per_token"} == {"plain", "plain_prefill", "per_token"}
    assert report["setup"]["modes"]["per_token_shortlist"]["shortlist"]
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    assert rows[("plain", 1)]["ratio_vs_plain"] == 1.0
    assert (out / "speed.png").stat().st_size > 0
    assert "| forced_50 | 2 |" in (out / "speed.md").read_text()


def test_limit_keeps_the_prefill_share():
    """Amdahl's law on the decode steps' weight-bytes limit: prefill 40% of plain's time and decode
    steps at most 2x faster give at most 1 / (0.4 + 0.6 / 2) = 1.43x."""
    from vllm_early_exit.tools.bench import PREFILL, Measurement, step_limit, summarize

    runs = [
        Measurement("plain", 4, 40, 10.0, 6.0, block="fast"),
        Measurement("fast", 4, 40, 8.0, 3.0, block="fast"),
        Measurement(PREFILL, 4, 4, 4.0, 6.0, block="fast"),
    ]
    rows = {r["engine"]: r for r in summarize(runs, 6)["rows"]}
    assert set(rows) == {"plain", "fast"}
    assert rows["fast"]["prefill_share"] == pytest.approx(0.4)
    assert rows["fast"]["ratio_vs_plain"] == pytest.approx(1.25)
    assert rows["fast"]["limit"] is None  # no cost model without weights and settings
    assert step_limit(2.0, 0.4) == pytest.approx(1 / 0.7)
    assert step_limit(2.0, 0.0) == pytest.approx(2.0)
    assert step_limit(None, 0.4) is None


def test_resume_refuses_results_of_other_settings(tiny_chat_llama, tmp_path):
    from vllm_early_exit.tools.bench import resumed_measurements

    out = tmp_path / "results"
    out.mkdir()
    setup = {"model": str(tiny_chat_llama), "batches": [1, 2], "output_tokens": 6, "prompt_tokens": 16,
             "rounds": 1, "dtype": "float32", "modes": {"plain": None, "never": {"threshold": 1.0}}}
    raw = [{"engine": e, "batch": 1, "tokens": 6, "seconds": 1.0, "mean_layers": 6.0, "stats": None, "block": "never",
            "tokens_per_s": 6.0} for e in ("plain", "never")]
    (out / "speed.json").write_text(json.dumps({"setup": setup, "raw": raw}))
    assert len(resumed_measurements(out, setup)) == 2
    # An engine whose settings changed is measured again.
    assert resumed_measurements(out, {**setup, "modes": {"plain": None, "never": {"threshold": 0.9}}}) == []
    with pytest.raises(SystemExit, match=r"another batches \(batches: \[1, 2\] there, \[1, 8\] now\)"):
        resumed_measurements(out, {**setup, "batches": [1, 8]})


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_qwen2_tied"])
def test_weight_size_is_the_checkpoints_parameters(fixture, request):
    from transformers import AutoModelForCausalLM

    from vllm_early_exit.tools.engines import weight_gib

    model = request.getfixturevalue(fixture)
    hf = AutoModelForCausalLM.from_pretrained(model)
    parameters = sum(p.numel() for p in hf.parameters())  # tied weights counted once
    # Norm weights and q/k/v biases are left out: a fraction of a percent even at this size.
    assert weight_gib(model, "float32") == pytest.approx(parameters * 4 / 2**30, rel=0.02)
    assert weight_gib(model, "bfloat16") == pytest.approx(weight_gib(model, "float32") / 2)


def test_two_engines_that_would_not_fit_are_refused_at_start_up(tiny_llama, monkeypatch):
    import psutil

    from vllm_early_exit.tools.engines import check_engines_fit, weight_gib

    class Memory:
        available = 2 * 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory)
    check_engines_fit(tiny_llama, "float32", 2, 0.5, "bench")  # 2 x (2 x the weights + 0.5 GiB) fit
    assert weight_gib(tiny_llama, "float32") < 0.1
    with pytest.raises(SystemExit, match=r"bench: 2 engines .* in float32 .* but 2\.0 GiB is free\. Use --dtype bfloat16"):
        check_engines_fit(tiny_llama, "float32", 2, 1.0, "bench")
