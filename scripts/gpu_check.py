"""GPU check of the early-exit plugin: correctness, then speed; results written as they finish.

Run from the repository root (``scripts/gpu_check.sh`` does, and sets up the device):

    python scripts/gpu_check.py [--device cpu|cuda] [--out DIR] [--smoke]
                                [--only correctness|speed] [--budget-s S]

Correctness (one group per model and Model Runner: the runner vLLM picks, then V1 through
``VLLM_USE_V2_MODEL_RUNNER=0``; tiny random LLaMA first, then SmolLM2):

- ``exits_off_eq_plain``: ``enabled: false`` engine == plain vLLM (same engine options);
- ``forced_eq_reference``: forced exit at 50% depth == the HF reference (``tests/reference.py``);
- ``threshold_eq_reference``: a threshold exit (``per_token``) == the HF reference;
- ``request_off_eq_plain``: rows with per-request ``enabled: false`` beside those exiting rows
  == plain vLLM's rows;
- ``compiled_eq_eager``: the same engine with ``compile: true`` == the eager one.

Every engine of a group decodes the same prompts as one batch (engine core in process,
prefix caching off: the same batch composition in every engine). In float32 a check passes
on identical tokens; in bf16 plain vLLM is not bit-stable itself, so ``VLLM_BATCH_INVARIANT=1``
is set where vLLM knows it, each check reports its share of differing tokens beside the
like-with-like noise (plain vLLM run twice; plain vs the reference at full depth; plain compiled
vs plain eager), and passes when identical or within that noise plus ``--bf16-tolerance``.

Speed: plain vLLM (default: torch.compile + CUDA graphs) against forced exit at 50% depth and
checks that never fire (``never_top_k``), both with ``compile: true`` (the modes of
``vllm_early_exit/tools/bench.py``), on the Llama-3.1-8B shape with dummy weights, batches
1/8/64, 128 prompt and 128 output tokens, runs alternated engine by engine in one process.

The engines of a group run in a worker subprocess (``--worker``) that appends one JSON line per
finished engine or measurement; this process turns them into checks and rewrites
``gpu_check.json`` and ``gpu_check.md`` after each. Exit code 1 if a correctness check failed,
2 if none got to a verdict (all out of time), else 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMOLLM2 = "/tmp/models/smollm2"
LLAMA8B = "/tmp/models/llama8b-shape"
HALF_DEPTH_LIMIT = 1.9
"""Plain vLLM with 16 of 32 layers over all 32 (H100, gpu-bundle/README.md): 1.87x-1.92x."""


# ---------------------------------------------------------------------------------------------
# Settings (the same as the speed benchmark's modes in vllm_early_exit/tools/bench.py)


def forced_settings(num_layers: int) -> dict:
    """``forced_50``: every decode token leaves after layer num_layers // 2 - 1."""
    return {"exit_layers": [num_layers // 2 - 1], "threshold": 0.0, "policy": "per_token"}


def deep_layers(num_layers: int) -> list[int]:
    """The check layers of bench's ``never`` and ``per_token`` modes: every second from 2/3 depth."""
    return list(range(max(1, (2 * num_layers) // 3), num_layers - 1, 2))


def never_settings(num_layers: int, shortlist: str | None) -> tuple[str, dict]:
    """Max-prob checks that never fire, the cheapest way there is: ``never_shortlist`` scores a
    token shortlist first (a full readout only for rows it lets through, here none); without a
    shortlist file, ``never_top_k`` prunes later checks to the first one's 256 top tokens."""
    settings = {"signal": "max_prob", "threshold": 1.0, "exit_layers": deep_layers(num_layers)}
    if shortlist is not None:
        return "never_shortlist", {**settings, "shortlist": shortlist}
    return "never_top_k", {**settings, "vocab_top_k": 256}


# ---------------------------------------------------------------------------------------------
# Helpers from tests/ (conftest imports pytest at module level; the GPU image may lack it)


def _tests_conftest():
    if importlib.util.find_spec("pytest") is None:
        stub = types.ModuleType("pytest")
        stub.fixture = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda f: f))
        sys.modules["pytest"] = stub
    from tests import conftest

    return conftest


# ---------------------------------------------------------------------------------------------
# Worker: runs engines in this process, one JSON line per finished engine / measurement


def _runner_of(worker) -> str:
    runner = worker.model_runner
    return f"{type(runner).__module__}.{type(runner).__qualname__}"


def _emit(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _release(llm) -> None:
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except Exception:
        pass


def _stats(llm) -> dict:
    from vllm_early_exit import get_exit_stats

    s = get_exit_stats(llm)
    return {
        "exits_per_layer": list(s.exits_per_layer),
        "full_depth_tokens": s.full_depth_tokens,
        "decode_tokens": s.decode_tokens,
        "mean_layers": s.mean_layers,
    }


def _engine_kwargs(spec: dict, engine: dict) -> dict:
    kwargs = {**spec["common"], **engine.get("engine", {})}
    if engine.get("early_exit") is not None:
        kwargs["additional_config"] = {"early_exit": {**engine["early_exit"], "log_interval_s": 0}}
    return kwargs


def _start(spec: dict, engine: dict):
    from vllm import LLM

    os.environ.update(engine.get("env", {}))  # e.g. the V1 runner for a plain engine compared like with like
    start = time.perf_counter()
    llm = LLM(spec["model"], **_engine_kwargs(spec, engine))
    info = {"start_s": time.perf_counter() - start}
    try:
        info["runner"] = llm.collective_rpc(_runner_of)[0]
    except Exception as exc:
        info["runner"] = f"unknown ({exc})"
    v2 = ".worker.gpu." in info["runner"] or ".worker.cpu." in info["runner"]  # V1: gpu_model_runner, ...
    info["runner_version"] = "V2" if v2 else "V1" if info["runner"].startswith("vllm.") else "unknown"
    return llm, info


def worker_correctness(spec: dict, results: Path) -> None:
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    for engine in spec["engines"]:
        record = {"engine": engine["name"]}
        llm = None
        try:
            llm, info = _start(spec, engine)
            record.update(info)
            rows = engine.get("rows") or [None] * len(prompts)
            params = [
                SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True, extra_args=x)
                for x in rows
            ]
            record["outputs"] = []
            for _ in range(engine.get("repeats", 1)):
                outs = llm.generate(prompts, params, use_tqdm=False)
                record["outputs"].append([list(o.outputs[0].token_ids) for o in outs])
            if engine.get("early_exit") is not None:
                record["stats"] = _stats(llm)
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc()[-4000:]
        _emit(results, record)
        if llm is not None:
            _release(llm)


def worker_speed(spec: dict, results: Path) -> None:
    """Plain vLLM stays up; each early-exit engine in turn is started and alternated with it
    run by run at every batch size (a block), then stopped, so each block's numbers are
    complete before the next engine starts (a time budget then loses whole engines only)."""
    from vllm import SamplingParams

    from vllm_early_exit import reset_exit_stats

    def started(engine):
        try:
            llm, info = _start(spec, engine)
            _emit(results, {"engine": engine["name"], "started": True, **info})
            return llm
        except Exception as exc:
            _emit(results, {"engine": engine["name"], "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc()[-4000:]})
            return None

    def timed(llm, name, exiting, prompts, batch, round_index, block):
        record = {"engine": name, "batch": batch, "round": round_index, "block": block}
        try:
            if exiting:
                reset_exit_stats(llm)
            start = time.perf_counter()  # generate returns with the outputs: the device is done
            outs = llm.generate(prompts, params, use_tqdm=False)
            record["seconds"] = time.perf_counter() - start
            record["tokens"] = sum(len(o.outputs[0].token_ids) for o in outs)
            if exiting:
                record["mean_layers"] = _stats(llm)["mean_layers"]
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
        _emit(results, record)

    rng = random.Random(0)
    params = SamplingParams(max_tokens=spec["output_tokens"], temperature=0.0, ignore_eos=True)
    prompts = {b: [{"prompt_token_ids": [rng.randrange(10, spec["max_token_id"]) for _ in range(spec["prompt_tokens"])]}
                   for _ in range(b)] for b in spec["batches"]}
    plain_spec, *others = spec["engines"]
    plain = started(plain_spec)
    if plain is None:
        return
    for engine in others:
        llm = started(engine)
        if llm is None:
            continue
        for batch in spec["batches"]:
            for round_index in range(spec["rounds"] + 1):  # round 0 warms both up at this batch size
                timed(plain, plain_spec["name"], False, prompts[batch], batch, round_index, engine["name"])
                timed(llm, engine["name"], True, prompts[batch], batch, round_index, engine["name"])
        _release(llm)


# Where a step's host time goes: (module, class or None, attribute) -> range name. Wrapped in
# the profile worker only, so the product itself carries no profiler ranges.
PROFILED = (
    ("vllm.model_executor.models.llama", "LlamaForCausalLM", "forward", "model.forward"),
    ("vllm.model_executor.models.llama", "LlamaForCausalLM", "compute_logits", "model.compute_logits"),
    ("vllm_early_exit.model_executor.early_exit.runner", "RunnerView", "decode_batch", "ee.decode_batch"),
    ("vllm_early_exit.model_executor.early_exit.runner", "RunnerView", "write_settings", "ee.request_settings"),
    ("vllm_early_exit.model_executor.early_exit.stats", "ExitCounters", "after_step", "ee.counters"),
    ("vllm_early_exit.model_executor.models.llama_early_exit", None, "note_step", "ee.note_step"),
    ("vllm_early_exit.model_executor.early_exit.step", "DecodeStep", "segment", "ee.segment"),
    ("vllm_early_exit.model_executor.early_exit.step", "DecodeStep", "decide", "ee.decide"),
    ("vllm_early_exit.model_executor.early_exit.step", "DecodeStep", "first_stage", "ee.first_stage"),
    ("vllm_early_exit.model_executor.early_exit.step", "DecodeStep", "confirm", "ee.confirm"),
    ("vllm_early_exit.model_executor.early_exit.step", "DecodeStep", "exit", "ee.exit"),
    ("vllm_early_exit.model_executor.early_exit.rows", "RowState", "read_flag", "ee.flag_read"),
    ("vllm_early_exit.model_executor.early_exit.rows", "RowState", "read_count", "ee.gate_read"),
    ("vllm_early_exit.model_executor.early_exit.groups", "CompiledStack", "run", "ee.group"),
    ("vllm_early_exit.model_executor.early_exit.kv_fill", "KVPropagator", "fill", "ee.kv_fill"),
)
# Runtime calls counted per step: graph replays, kernel launches, and what waits for the device.
RUNTIME_CALLS = {
    "graph_launches": ("cudaGraphLaunch",),
    "kernel_launches": ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"),
    "syncs": ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"),
    "memcpy": ("cudaMemcpyAsync", "cudaMemcpy"),
}


def _wrap_in_ranges() -> None:
    import functools
    import importlib

    from torch.profiler import record_function

    for module_name, class_name, attr, label in PROFILED:
        owner = importlib.import_module(module_name)
        if class_name is not None:
            owner = getattr(owner, class_name)
        fn = getattr(owner, attr)

        def wrapped(*args, __fn=fn, __label=label, **kwargs):
            with record_function(__label):
                return __fn(*args, **kwargs)

        setattr(owner, attr, functools.wraps(fn)(wrapped))


def _python_profile(run, steps: int, top: int = 40) -> list[dict]:
    """cProfile of ``run()``: the functions with the most own time (ms per step), to find host
    work that torch.profiler's ranges do not name."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"function": f"{Path(file).name}:{line}:{name}", "calls_per_step": round(nc / steps, 2),
             "own_ms_per_step": round(1000 * tt / steps, 4), "cumulative_ms_per_step": round(1000 * ct / steps, 4)}
            for (file, line, name), (_, nc, tt, ct, _) in rows]


def worker_profile(spec: dict, results: Path) -> None:
    """Each engine in turn, in this process: a few decode steps under torch.profiler per batch
    size; one record per (engine, batch) with host time per range and runtime calls per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams

    _wrap_in_ranges()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    rng = random.Random(0)
    steps = spec["output_tokens"]
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    with profile(activities=activities):  # the profiler's own first-use set-up, outside any measurement
        torch.ones(8).sum()
    for engine in spec["engines"]:
        try:
            llm, info = _start(spec, engine)
        except Exception as exc:
            _emit(results, {"engine": engine["name"], "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc()[-4000:]})
            continue
        _emit(results, {"engine": engine["name"], "started": True, **info})
        for batch in spec["batches"]:
            record = {"engine": engine["name"], "batch": batch, "steps": steps}
            try:
                prompts = [{"prompt_token_ids": [rng.randrange(10, spec["max_token_id"])
                                                 for _ in range(spec["prompt_tokens"])]} for _ in range(batch)]
                llm.generate(prompts, params, use_tqdm=False)  # warm-up at this batch size
                with profile(activities=activities) as prof:
                    start = time.perf_counter()
                    llm.generate(prompts, params, use_tqdm=False)
                    record["ms_per_step"] = 1000 * (time.perf_counter() - start) / steps
                events = prof.key_averages()
                by_key = {e.key: e for e in events}
                record["host_ms_per_step"] = {
                    label: by_key[label].cpu_time_total / 1000 / steps
                    for *_, label in PROFILED if label in by_key}
                record["calls_per_step"] = {
                    label: by_key[label].count / steps for *_, label in PROFILED if label in by_key}
                record["runtime_per_step"] = {
                    kind: sum(by_key[n].count for n in names if n in by_key) / steps
                    for kind, names in RUNTIME_CALLS.items()}
                record["device_ms_per_step"] = sum(
                    getattr(e, "self_device_time_total", 0) for e in events
                    if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)) / 1000 / steps
                record["aten_ops_per_step"] = sum(e.count for e in events if e.key.startswith("aten::")) / steps
                if batch == spec["batches"][0]:
                    record["python_top"] = _python_profile(lambda: llm.generate(prompts, params, use_tqdm=False), steps)
            except Exception as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
            _emit(results, record)
        _release(llm)


# ---------------------------------------------------------------------------------------------
# Comparisons and verdicts


def compare(got: list[list[int]], want: list[list[int]]) -> dict:
    """Position by position over the rows (a missing or extra token counts as differing)."""
    tokens = differing = identical = 0
    first = []
    for a, b in zip(got, want):
        n = max(len(a), len(b))
        diff = [i for i in range(n) if i >= len(a) or i >= len(b) or a[i] != b[i]]
        tokens += n
        differing += len(diff)
        identical += not diff
        first.append(diff[0] if diff else None)
    return {
        "rows": min(len(got), len(want)),
        "rows_expected": len(want),
        "tokens": tokens,
        "differing": differing,
        "share": differing / tokens if tokens else None,
        "identical_rows": identical,
        "first_divergence": first,
    }


def verdict(cmp: dict, exact: bool, noise: float | None, tolerance: float) -> tuple[str, str]:
    if cmp["tokens"] == 0 or cmp["rows"] < cmp["rows_expected"]:
        return "fail", "nothing (or not everything) was compared"
    if cmp["differing"] == 0:
        return "pass", "identical tokens"
    if exact:
        return "fail", f"{cmp['differing']} of {cmp['tokens']} tokens differ (float32: identical required)"
    bound = (noise or 0.0) + tolerance
    if cmp["share"] <= bound:
        return "pass", f"share {cmp['share']:.3f} within bf16 noise {noise or 0.0:.3f} + tolerance {tolerance}"
    return "fail", f"share {cmp['share']:.3f} above bf16 noise {noise or 0.0:.3f} + tolerance {tolerance}"


def exit_counts(traces, num_layers: int) -> list[int]:
    counts = [0] * num_layers
    for t in traces:
        for layer in t.exit_layers:
            if layer is not None:
                counts[layer] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# The report: JSON + Markdown, rewritten after every finished check


class Report:
    def __init__(self, out: Path, setup: dict) -> None:
        self.out = out
        self.data = {"setup": setup, "correctness": [], "groups": [], "speed": {"rows": [], "engines": {}, "errors": []},
                     "profile": {"rows": [], "errors": []}}
        out.mkdir(parents=True, exist_ok=True)

    def check(self, record: dict) -> None:
        self.data["correctness"].append(record)
        self.write()

    def failed(self) -> list[dict]:
        return [c for c in self.data["correctness"] if c["status"] not in ("pass", "info", "not run")]

    def write(self) -> None:
        self.data["setup"]["updated"] = _now()
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2))
        (self.out / "gpu_check.md").write_text(self.markdown())

    def markdown(self) -> str:
        s = self.data["setup"]
        lines = [
            "# GPU check: vllm_early_exit",
            "",
            f"{s['date']} | {s['device_name']} | vLLM {s.get('vllm', '?')} | torch {s.get('torch', '?')} | "
            f"transformers {s.get('transformers', '?')} | Python {s['python']} | correctness dtype {s['dtype']} | "
            f"VLLM_BATCH_INVARIANT {'1' if s['batch_invariant'] else 'not set'}"
            f"{' (not known to this vLLM)' if not s['batch_invariant_known'] else ''} | "
            f"budget {s['budget_s']:.0f} s{' | smoke' if s['smoke'] else ''}",
            "",
            "## Correctness",
            "",
        ]
        for g in self.data["groups"]:
            lines.append(f"- {g['group']}: {_one_line(g['status'], 200)}"
                         f"{' - ' + _one_line(g['note'], 300) if g.get('note') else ''}")
        lines += [
            "",
            "| group | check | status | differing / tokens | share | noise (like with like) | detail |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in self.data["correctness"]:
            cmp = c.get("compare") or {}
            share = f"{cmp['share']:.4f}" if cmp.get("share") is not None else "-"
            counted = f"{cmp['differing']} / {cmp['tokens']}" if cmp else "-"
            noise = f"{c['noise']:.4f} ({c['noise_from']})" if c.get("noise") is not None else "-"
            detail = _one_line(c.get("detail"), 300).replace("|", "/")
            lines.append(f"| {c['group']} | {c['check']} | {c['status']} | {counted} | {share} | {noise} | {detail} |")
        sp = self.data["speed"]
        lines += ["", "## Speed", ""]
        if sp.get("setup"):
            x = sp["setup"]
            lines += [
                f"{Path(x['model']).name} ({x['num_layers']} layers, {x['dtype']}, load_format {x['load_format']}), "
                f"{x['prompt_tokens']} prompt / {x['output_tokens']} output tokens (ignore_eos, greedy), "
                f"{x['rounds']} timed rounds after a warm-up, each engine alternated run by run with plain vLLM "
                f"(its ratio is to those plain runs). "
                f"`limit`: layers / mean layers; measured limit of leaving at half depth on H100: "
                f"~{HALF_DEPTH_LIMIT}x (plain vLLM with 16 of 32 layers, gpu-bundle/README.md).",
                "",
            ]
        if s["smoke"]:
            lines += [
                "Smoke run: tiny model, eager engines, few tokens: the numbers check the harness, they are "
                "not a speed measurement.",
                "",
            ]
        for name, e in sp["engines"].items():
            settings = json.dumps(e.get("early_exit")) if e.get("early_exit") is not None else "plain vLLM"
            started = (f"start {e['start_s']:.0f} s, {e.get('runner', '')}" if "start_s" in e
                       else _one_line(e.get("error", "not started"), 300))
            lines.append(f"- `{name}`: {settings} {json.dumps(e.get('engine', {}))}; {started}")
        if sp["rows"]:
            lines += ["", "| batch | engine | tok/s | ratio to plain | mean layers | limit |", "|---|---|---|---|---|---|"]
            for r in sp["rows"]:
                ratio = f"{r['ratio']:.3f}" if r.get("ratio") is not None else "-"
                layers = f"{r['mean_layers']:.2f}" if r.get("mean_layers") is not None else "-"
                limit = f"{r['limit']:.2f}" if r.get("limit") is not None else "-"
                lines.append(f"| {r['batch']} | {r['engine']} | {r['tokens_per_s']:.1f} | {ratio} | {layers} | {limit} |")
        for err in sp["errors"]:
            lines.append(f"- error: {_one_line(err, 300)}")
        if sp.get("status"):
            lines += ["", f"Speed: {sp['status']}"]
        lines += _profile_lines(self.data["profile"])
        failed = self.failed()
        lines += ["", f"**{len(failed)} correctness check(s) failed.**" if failed else "All correctness checks that ran passed."]
        return "\n".join(lines) + "\n"


def _profile_lines(pr: dict) -> list[str]:
    if not pr.get("rows") and not pr.get("status"):
        return []
    labels = [label for *_, label in PROFILED]
    shown = [label for label in labels if any(label in r.get("host_ms_per_step", {}) for r in pr["rows"])]
    lines = ["", "## Profile (per output token, its prompt's prefill included; torch.profiler running; "
             "host ms spent inside each range)", ""]
    if pr["rows"]:
        lines += ["| engine | batch | ms/step | device ms | graph launches | kernel launches | syncs | memcpy | "
                  + " | ".join(shown) + " |", "|---" * (8 + len(shown)) + "|"]
        for r in pr["rows"]:
            if "error" in r:
                lines.append(f"| {r['engine']} | {r['batch']} | error: {_one_line(r['error'], 200)} |")
                continue
            rt, host = r["runtime_per_step"], r["host_ms_per_step"]
            lines.append(
                f"| {r['engine']} | {r['batch']} | {r['ms_per_step']:.2f} | {r['device_ms_per_step']:.2f} | "
                f"{rt['graph_launches']:.1f} | {rt['kernel_launches']:.1f} | {rt['syncs']:.1f} | {rt['memcpy']:.1f} | "
                + " | ".join(f"{host[label]:.2f}" if label in host else "-" for label in shown) + " |")
    for r in pr["rows"]:
        if r.get("python_top"):
            top = ", ".join(f"`{x['function']}` {x['own_ms_per_step']:.3f}" for x in r["python_top"][:8])
            lines.append(f"- {r['engine']}, batch {r['batch']}, most own host time (cProfile, ms per step): {top}")
    for err in pr.get("errors", []):
        lines.append(f"- error: {_one_line(err, 300)}")
    if pr.get("status"):
        lines += ["", f"Profile: {pr['status']}"]
    return lines


def _one_line(text, limit: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Orchestration


class Clock:
    """Wall-clock budget shared out over the remaining items by weight."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def share(self, weight: float, remaining_weight: float) -> float:
        return max(0.0, self.left() * weight / remaining_weight)


def run_worker(kind: str, spec: dict, work: Path, timeout_s: float, env: dict, on_record) -> str:
    """Runs ``--worker kind`` on ``spec``; calls ``on_record(list of records so far)`` on new lines."""
    spec_path = work / f"{spec['name']}.spec.json"
    results = work / f"{spec['name']}.jsonl"
    spec_path.write_text(json.dumps(spec))
    results.unlink(missing_ok=True)
    log = open(work / f"{spec['name']}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(spec_path), str(results)],
        cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # its engine-core processes go with it when the budget stops it
    )
    deadline, seen, outcome = time.monotonic() + timeout_s, 0, "finished"
    while True:
        try:
            rc = proc.wait(timeout=2)
            outcome = "finished" if rc == 0 else f"worker exited with {rc} (log: {log.name})"
            break
        except subprocess.TimeoutExpired:
            pass
        finally:
            seen = _poll(results, seen, on_record)
        if time.monotonic() > deadline:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            outcome = f"stopped at its time budget ({timeout_s:.0f} s)"
            break
    _poll(results, -1, on_record)
    log.close()
    return outcome


def _poll(results: Path, seen: int, on_record) -> int:
    if not results.exists():
        return seen
    records = []
    for line in results.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line still being written
            break
    if len(records) != seen:
        on_record(records)
    return len(records)


def _batch_invariant_known() -> bool:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return False
    envs = Path(list(spec.submodule_search_locations)[0]) / "envs.py"
    return envs.exists() and "VLLM_BATCH_INVARIANT" in envs.read_text()


def tiny_model(args) -> Path:
    """The tests' tiny random LLaMA (``tests/conftest.py``), made once in the scratch folder."""
    tiny = Path(args.scratch) / "tiny_llama"
    if not (tiny / "config.json").exists():
        _tests_conftest().make_tiny_llama(tiny)
    return tiny


def correctness_groups(args) -> list[dict]:
    groups = [{"model": "tiny", "path": tiny_model(args)}]
    if not args.smoke:
        groups.append({"model": "smollm2", "path": Path(args.smollm2)})
    out = []
    for g in groups:
        for runner, env in (("default", {}), ("v1", {"VLLM_USE_V2_MODEL_RUNNER": "0"})):
            out.append({**g, "runner": runner, "env": env, "name": f"{g['model']}-{runner}",
                        "weight": {"tiny-default": 2.0, "tiny-v1": 1.0}.get(f"{g['model']}-{runner}", 1.5)})
    if args.groups:
        wanted = args.groups.split(",")
        unknown = sorted(set(wanted) - {g["name"] for g in out})
        if unknown:
            raise ValueError(f"--groups: unknown group(s) {unknown}; known: {[g['name'] for g in out]}")
        out = [g for g in out if g["name"] in wanted]
    return out


def model_case(group: dict, conftest, args) -> dict:
    """Prompts, token count, exit rules and reference of one model."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from tests.reference import ReferenceDecoder

    path = group["path"]
    num_layers = AutoConfig.from_pretrained(path).num_hidden_layers
    if group["model"] == "tiny":
        prompts = conftest.tiny_prompts(6, seed=7)
        max_tokens = conftest.NEW_TOKENS
        rule = {**conftest.MIXED, "policy": "per_token"}
        max_model_len = 512
    else:
        tok = AutoTokenizer.from_pretrained(path)
        texts = [
            "The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):",
            "Explain why the sky is blue.", "List three prime numbers:", "Once upon a time, in a small village,",
            "How do I boil an egg?", "Translate 'good morning' into Spanish:",
        ]
        prompts = [tok.encode(t) for t in texts]
        max_tokens = 32
        rule = {"signal": "max_prob", "threshold": 0.9, "exit_layers": deep_layers(num_layers), "policy": "per_token"}
        max_model_len = 1024
    ref = ReferenceDecoder(LlamaForCausalLM.from_pretrained(path, dtype=torch.float32))
    return {"num_layers": num_layers, "prompts": prompts, "max_tokens": max_tokens, "rule": rule,
            "forced": forced_settings(num_layers), "max_model_len": max_model_len, "reference": ref}


def correctness_spec(group: dict, case: dict, args) -> dict:
    exact = args.dtype == "float32"
    common = {"dtype": args.dtype, "max_model_len": case["max_model_len"], "seed": 0, "enforce_eager": True,
              "enable_prefix_caching": False, "skip_tokenizer_init": True, "max_num_seqs": 16}
    if args.device == "cuda":
        common["gpu_memory_utilization"] = 0.3
    off = {"early_exit": {"enabled": False}}
    mixed_rows = [None if i % 2 == 0 else off for i in range(len(case["prompts"]))]
    engines = [
        {"name": "plain", "early_exit": None, "repeats": 2},
        {"name": "exits_off", "early_exit": {"enabled": False}},
        {"name": "forced", "early_exit": case["forced"]},
        {"name": "threshold_mixed", "early_exit": case["rule"], "rows": mixed_rows},
        {"name": "compiled", "early_exit": {**case["rule"], "compile": True}, "rows": mixed_rows,
         "engine": {"enforce_eager": False}},
    ]
    if args.cuda_graphs:  # the captured step (early_exit.cuda_graphs) against the compiled one
        engines.append({"name": "graphed", "early_exit": {**case["rule"], "compile": True, "cuda_graphs": args.cuda_graphs},
                        "rows": mixed_rows, "engine": {"enforce_eager": False}})
    if not exact:  # the compile-vs-eager noise of plain vLLM itself, for compiled_eq_eager in bf16
        engines.append({"name": "plain_compiled", "early_exit": None, "engine": {"enforce_eager": False}})
    return {"name": group["name"], "model": str(group["path"]), "common": common, "engines": engines,
            "prompts": case["prompts"], "max_tokens": case["max_tokens"]}


class GroupChecks:
    """Turns a group's engine records into checks as soon as their engines are done."""

    def __init__(self, group: dict, case: dict, report: Report, args) -> None:
        self.group, self.case, self.report, self.args = group, case, report, args
        self.exact = args.dtype == "float32"
        self.done: set[str] = set()
        self.runner = self.runner_version = None
        self._ref: dict[str, list] = case.setdefault("traces", {})  # shared by the model's groups

    def _rule_kwargs(self, rule: str) -> dict:
        c = self.case
        return {
            "full": {},
            "forced": {"exit_layers": tuple(c["forced"]["exit_layers"]), "threshold": 0.0},
            "rule": {"exit_layers": tuple(c["rule"]["exit_layers"]), "threshold": c["rule"]["threshold"]},
        }[rule]

    def reference(self, rule: str):
        """The reference's free-running traces of every prompt under ``rule``."""
        if rule not in self._ref:
            c, ref = self.case, self.case["reference"]
            self._ref[rule] = [ref.generate(p, c["max_tokens"], **self._rule_kwargs(rule)) for p in c["prompts"]]
        return self._ref[rule]

    def teacher_forced(self, rule: str, rows, tokens: list[list[int]]):
        """The reference's picks under ``rule`` after each prefix of ``tokens`` (one list per row)."""
        c, ref = self.case, self.case["reference"]
        return [ref.generate(c["prompts"][i], len(t), teacher=t, **self._rule_kwargs(rule)) for i, t in zip(rows, tokens)]

    def __call__(self, records: list[dict]) -> None:
        by = {r["engine"]: r for r in records}
        if self.runner is None and "plain" in by and "runner" in by["plain"]:
            self.runner, self.runner_version = by["plain"]["runner"], by["plain"]["runner_version"]
        for name, needs, fn in (
            ("plain_run_to_run", ("plain",), self.plain_run_to_run),
            ("exits_off_eq_plain", ("plain", "exits_off"), self.exits_off),
            ("forced_eq_reference", ("plain", "forced"), self.forced),
            ("threshold_eq_reference", ("plain", "threshold_mixed"), self.threshold),
            ("request_off_eq_plain", ("plain", "threshold_mixed"), self.request_off),
            ("compiled_eq_eager", ("threshold_mixed", "compiled"), self.compiled),
            ("graphed_eq_compiled", ("compiled", "graphed"), self.graphed),
        ):
            if name in self.done or not all(n in by for n in needs):
                continue
            self.done.add(name)
            self.run_check(name, fn, [by[n] for n in needs], by)

    def finish(self, outcome: str) -> None:
        names = ["plain_run_to_run", "exits_off_eq_plain", "forced_eq_reference", "threshold_eq_reference",
                 "request_off_eq_plain", "compiled_eq_eager"] + (["graphed_eq_compiled"] if self.args.cuda_graphs else [])
        for name in names:
            if name not in self.done:  # out of time: not run; the worker died: an error
                self.done.add(name)
                status = "not run" if "time budget" in outcome else "error"
                self.record(name, status, f"its engines did not finish: {outcome}")

    def record(self, check: str, status: str, detail: str, **extra) -> None:
        self.report.check({"group": self.group["name"], "runner": self.runner, "check": check, "status": status,
                           "detail": detail, **extra})

    def run_check(self, name, fn, engines, by) -> None:
        errors = [f"{e['engine']}: {e['error']}" for e in engines if "error" in e]
        if errors:
            tb = next(e.get("traceback") for e in engines if "error" in e)
            self.record(name, "error", "; ".join(errors), traceback=tb)
            return
        try:
            fn(*engines, by=by)
        except Exception as exc:
            self.record(name, "error", f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])

    def noise(self, plain: dict) -> float:
        return compare(plain["outputs"][1], plain["outputs"][0])["share"] or 0.0

    def judged(self, name, got, want, noise, noise_from, detail_extra="", ok=True, **extra) -> None:
        """``ok``: the check's other conditions (exit counts, exits happened) hold."""
        cmp = compare(got, want)
        status, detail = verdict(cmp, self.exact, noise if not self.exact else None, self.args.bf16_tolerance)
        if not ok:
            status, detail = "fail", detail + "; but see the exit counts"
        self.record(name, status, detail + (f"; {detail_extra}" if detail_extra else ""), compare=cmp,
                    noise=None if self.exact else noise, noise_from=noise_from, **extra)

    def plain_run_to_run(self, plain, by) -> None:
        cmp = compare(plain["outputs"][1], plain["outputs"][0])
        status = "info" if cmp["tokens"] else "fail"
        self.record("plain_run_to_run", status, f"plain vLLM run twice on the same batch; runner {plain.get('runner')}",
                    compare=cmp, start_s=plain.get("start_s"))

    def exits_off(self, plain, off, by) -> None:
        self.judged("exits_off_eq_plain", off["outputs"][0], plain["outputs"][0], self.noise(plain), "plain run to run",
                    f"decode tokens counted {off['stats']['decode_tokens']}", stats=off["stats"])

    def _against_reference(self, name, plain, engine, rule, rows) -> None:
        """float32: the free-running reference, token for token. bf16: teacher-forced (the
        reference picks after the engine's own prefix), so one flipped near-tie counts once
        instead of changing every later token; the noise is plain vLLM against the full-depth
        reference, teacher-forced the same way."""
        c = self.case
        rows = list(rows)
        got = [engine["outputs"][0][i] for i in rows]
        baseline = None
        if self.exact:
            traces = [self.reference(rule)[i] for i in rows]
        else:
            traces = self.teacher_forced(rule, rows, got)
            plain_rows = [plain["outputs"][0][i] for i in rows]
            full = self.teacher_forced("full", rows, plain_rows)
            baseline = compare(plain_rows, [t.tokens for t in full])["share"]
        want = [t.tokens for t in traces]
        expected = exit_counts(traces, c["num_layers"])
        counts = engine["stats"]["exits_per_layer"]
        same_counts = counts == expected
        margins = [abs(v - c["rule"]["threshold"]) for t in traces for step in t.confidences for v in step.values()]
        detail = (f"exit counts {'equal' if same_counts else 'differ'}: engine {counts}, reference {expected}"
                  + (f"; min |confidence - threshold| {min(margins):.2e}" if rule == "rule" and margins else ""))
        has_exits = sum(expected) > 0 and sum(counts) > 0
        if not has_exits:
            detail += "; no exits: nothing early was compared"
        # Forced exits do not depend on numerics; threshold decisions may flip in bf16.
        counts_ok = same_counts or (rule == "rule" and not self.exact)
        noise_from = "plain vs reference at full depth" + ("" if self.exact else ", teacher-forced")
        self.judged(name, got, want, baseline, noise_from, detail,
                    ok=counts_ok and has_exits, stats=engine["stats"], reference_exits=expected)

    def forced(self, plain, forced, by) -> None:
        self._against_reference("forced_eq_reference", plain, forced, "forced", range(len(self.case["prompts"])))

    def threshold(self, plain, mixed, by) -> None:
        self._against_reference("threshold_eq_reference", plain, mixed, "rule", range(0, len(self.case["prompts"]), 2))

    def request_off(self, plain, mixed, by) -> None:
        rows = range(1, len(self.case["prompts"]), 2)
        exited = sum(mixed["stats"]["exits_per_layer"])
        self.judged("request_off_eq_plain", [mixed["outputs"][0][i] for i in rows],
                    [plain["outputs"][0][i] for i in rows], self.noise(plain), "plain run to run",
                    f"rows beside them left early {exited} times", ok=exited > 0)

    def graphed(self, compiled, graphed, by) -> None:
        """The step captured as CUDA graphs (``cuda_graphs``) decodes as the compiled step does."""
        same = graphed["stats"]["exits_per_layer"] == compiled["stats"]["exits_per_layer"]
        self.judged("graphed_eq_compiled", graphed["outputs"][0], compiled["outputs"][0], self.noise(by["plain"]),
                    "plain run to run", f"exit counts {'equal' if same else 'differ'}: graphed "
                    f"{graphed['stats']['exits_per_layer']}, compiled {compiled['stats']['exits_per_layer']}",
                    ok=same or not self.exact, stats=graphed["stats"])

    def compiled(self, mixed, compiled, by) -> None:
        noise, noise_from = None, "plain compiled vs plain eager"
        if not self.exact:
            if "plain_compiled" in by and "outputs" in by["plain_compiled"]:
                noise = compare(by["plain_compiled"]["outputs"][0], by["plain"]["outputs"][0])["share"]
            else:
                noise, noise_from = self.noise(by["plain"]), "plain run to run (plain compiled did not run yet)"
        same = compiled["stats"]["exits_per_layer"] == mixed["stats"]["exits_per_layer"]
        self.judged("compiled_eq_eager", compiled["outputs"][0], mixed["outputs"][0], noise, noise_from,
                    f"exit counts {'equal' if same else 'differ'}: compiled {compiled['stats']['exits_per_layer']}, "
                    f"eager {mixed['stats']['exits_per_layer']}; start {compiled.get('start_s', 0):.0f} s",
                    ok=same or not self.exact, stats=compiled["stats"])


def run_correctness(args, report: Report, clock: Clock, work: Path, weights_after: float) -> None:
    conftest = _tests_conftest()
    try:
        groups = correctness_groups(args)
    except Exception as exc:
        report.check({"group": "setup", "check": "tiny model", "status": "error", "detail": str(exc),
                      "traceback": traceback.format_exc()[-4000:]})
        return
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if report.data["setup"]["batch_invariant"]:
        env["VLLM_BATCH_INVARIANT"] = "1"
    cases: dict[str, dict] = {}
    default_runner: dict[str, str] = {}
    for index, group in enumerate(groups):
        remaining = sum(g["weight"] for g in groups[index:]) + weights_after
        entry = {"group": group["name"], "runner_env": group["env"]}
        report.data["groups"].append(entry)
        if group["runner"] == "v1" and default_runner.get(group["model"], "V2") == "V1":
            entry.update(status="skipped", note="V2 unavailable on this platform: vLLM picked the V1 runner "
                         "for the default run already, so a V1 run would repeat it")
            report.write()
            continue
        if not Path(group["path"], "config.json").exists():
            entry.update(status="skipped", note=f"no model at {group['path']}")
            report.write()
            continue
        budget = clock.share(group["weight"], remaining)
        if budget < 20:
            entry.update(status="skipped", note=f"out of time budget ({budget:.0f} s left for it)")
            report.write()
            continue
        started = time.monotonic()
        try:
            if group["model"] not in cases:
                cases[group["model"]] = model_case(group, conftest, args)
            case = cases[group["model"]]
            checks = GroupChecks(group, case, report, args)
            spec = correctness_spec(group, case, args)
            entry.update(status="running", budget_s=round(budget))
            report.write()
            outcome = run_worker("correctness", spec, work, budget - (time.monotonic() - started),
                                 {**env, **group["env"]}, checks)
            checks.finish(outcome)
            entry.update(status=outcome, runner=checks.runner, runner_version=checks.runner_version,
                         seconds=round(time.monotonic() - started))
            if group["runner"] == "default" and checks.runner_version == "V1":
                default_runner[group["model"]] = "V1"
                entry["note"] = f"V2 unavailable on this platform: vLLM picked {checks.runner}"
        except Exception as exc:
            entry.update(status="error", note=f"{type(exc).__name__}: {exc}")
            report.check({"group": group["name"], "check": "group", "status": "error", "detail": str(exc),
                          "traceback": traceback.format_exc()[-4000:]})
        report.write()


def speed_spec(args) -> dict:
    from transformers import AutoConfig

    if args.smoke:
        model = tiny_model(args)
        batches, prompt_tokens, output_tokens, rounds, max_token_id = [4], 16, 8, 1, 500
    else:
        model = Path(args.llama8b)
        batches, prompt_tokens, output_tokens, rounds, max_token_id = [1, 8, 64], 128, 128, 2, 49000
    num_layers = AutoConfig.from_pretrained(model).num_hidden_layers
    # Smoke runs on CPU stay eager (compiling three engines takes minutes on 2 cores).
    compiled = not args.smoke
    common = {"dtype": "bfloat16" if args.device == "cuda" else "float32",
              "max_model_len": prompt_tokens + output_tokens + 16, "seed": 0, "max_num_seqs": max(batches)}
    if args.smoke:
        common["skip_tokenizer_init"] = True  # the tiny model has no tokenizer
    else:
        common["load_format"] = "dummy"
    if args.device == "cuda":
        common["gpu_memory_utilization"] = 0.28
    extra = {"compile": True} if compiled else {}
    if compiled and args.cuda_graphs:
        extra["cuda_graphs"] = args.cuda_graphs
    eager = {} if compiled else {"enforce_eager": True}
    engines = [
        {"name": "plain", "early_exit": None, "engine": eager},
        {"name": "forced_50" + ("_compiled" if compiled else ""), "early_exit": {**forced_settings(num_layers), **extra},
         "engine": eager},
    ]
    never, settings = never_settings(num_layers, str(Path(args.shortlist).resolve()) if args.shortlist else None)
    engines.append({"name": never + ("_compiled" if compiled else ""), "early_exit": {**settings, **extra},
                    "engine": eager})
    if args.device == "cuda":
        engines.append(PLAIN_LIKE_EARLY_EXIT)
    return {"name": "speed", "model": str(model), "common": common, "engines": engines, "batches": batches,
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "rounds": rounds,
            "max_token_id": max_token_id, "num_layers": num_layers}


PLAIN_LIKE_EARLY_EXIT = {
    "name": "plain_v1_piecewise", "early_exit": None, "env": {"VLLM_USE_V2_MODEL_RUNNER": "0"},
    "engine": {"compilation_config": {"cudagraph_mode": "PIECEWISE"}},
}
"""Plain vLLM on the runner and CUDA-graph mode early exit runs on (V1, piecewise graphs): the
share of a ratio that is the platform's, not the layers' or the checks'."""


def profile_spec(args) -> dict:
    """The speed run's model and engines (shorter prompts, a few steps), for ``worker_profile``."""
    spec = speed_spec(args)
    spec.update(name="profile", prompt_tokens=16, output_tokens=8 if args.smoke else 24,
                batches=spec["batches"][:2])
    spec["common"] = {**spec["common"], "max_model_len": 64 if args.smoke else 128}
    return spec


def _budget_or_skip(section: dict, clock: Clock, report: Report) -> float | None:
    """The seconds left for a section, or None (recorded as skipped) when under 30."""
    budget = clock.left()
    if budget >= 30:
        return budget
    section["status"] = f"skipped: out of time budget ({budget:.0f} s left)"
    report.write()
    return None


def run_profile(args, report: Report, clock: Clock, work: Path) -> None:
    """Host time per step by range, graph replays, kernel launches and device waits."""
    pr = report.data["profile"]
    budget = _budget_or_skip(pr, clock, report)
    if budget is None:
        return
    try:
        spec = profile_spec(args)
        pr["status"] = f"running (budget {budget:.0f} s)"
        report.write()

        def on_record(records):
            pr["rows"] = [r for r in records if "batch" in r]
            pr["errors"] = [f"{r['engine']}: {r['error']}" for r in records if "error" in r]
            pr["engines"] = {r["engine"]: {k: v for k, v in r.items() if k not in ("engine", "traceback")}
                             for r in records if "batch" not in r}
            report.write()

        pr["status"] = run_worker("profile", spec, work, budget - 5, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                                  on_record)
    except Exception as exc:
        pr["status"] = "error"
        pr["errors"].append(f"{type(exc).__name__}: {exc}")
    report.write()


def speed_rows(records: list[dict], num_layers: int) -> tuple[list[dict], list[str]]:
    """Per batch: plain vLLM over all its timed runs, and each engine with its ratio to the plain
    runs alternated with it (its block)."""
    runs = [r for r in records if "batch" in r and "error" not in r and r["round"] > 0]
    errors = [f"{r['engine']}{' batch ' + str(r['batch']) if 'batch' in r else ''}: {r['error']}"
              for r in records if "error" in r]

    def rate(ms):
        return sum(r["tokens"] for r in ms) / sum(r["seconds"] for r in ms)

    rows = []
    for batch in sorted({r["batch"] for r in runs}):
        at = [r for r in runs if r["batch"] == batch]
        plain = [r for r in at if r["engine"] == "plain"]
        if plain:
            rows.append({"batch": batch, "engine": "plain", "tokens_per_s": rate(plain), "runs": len(plain),
                         "ratio": 1.0, "mean_layers": float(num_layers), "limit": 1.0})
        for engine in dict.fromkeys(r["engine"] for r in at if r["engine"] != "plain"):
            ms = [r for r in at if r["engine"] == engine]
            block = [r for r in plain if r["block"] == engine]
            mean_layers = sum(r["mean_layers"] for r in ms) / len(ms)
            rows.append({"batch": batch, "engine": engine, "tokens_per_s": rate(ms), "runs": len(ms),
                         "ratio": rate(ms) / rate(block) if block else None, "mean_layers": mean_layers,
                         "limit": num_layers / mean_layers if mean_layers else None})
    return rows, errors


def run_speed(args, report: Report, clock: Clock, work: Path) -> None:
    sp = report.data["speed"]
    budget = _budget_or_skip(sp, clock, report)
    if budget is None:
        return
    try:
        spec = speed_spec(args)
        if not Path(spec["model"], "config.json").exists():
            sp["status"] = f"skipped: no model at {spec['model']}"
            report.write()
            return
        sp["setup"] = {"model": spec["model"], "num_layers": spec["num_layers"], "dtype": spec["common"]["dtype"],
                       "load_format": spec["common"].get("load_format", "auto"), "batches": spec["batches"],
                       "prompt_tokens": spec["prompt_tokens"], "output_tokens": spec["output_tokens"],
                       "rounds": spec["rounds"]}
        sp["engines"] = {e["name"]: {"early_exit": e["early_exit"], "engine": e["engine"]} for e in spec["engines"]}
        sp["status"] = f"running (budget {budget:.0f} s)"
        report.write()

        def on_record(records):
            for r in records:
                if "batch" not in r:
                    sp["engines"][r["engine"]].update({k: v for k, v in r.items() if k not in ("traceback", "engine")})
            sp["rows"], sp["errors"] = speed_rows(records, spec["num_layers"])
            report.write()

        # Engine cores in their own processes: a function sent through collective_rpc (which
        # runner ran) needs pickle. The CPU smoke run keeps the cores in process (quicker starts).
        env = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
        if args.smoke:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        outcome = run_worker("speed", spec, work, budget - 5, env, on_record)
        sp["status"] = outcome
    except Exception as exc:
        sp["status"] = "error"
        sp["errors"].append(f"{type(exc).__name__}: {exc}")
        sp["traceback"] = traceback.format_exc()[-4000:]
    report.write()


def setup_info(args) -> dict:
    info = {"date": _now(), "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "device": args.device, "dtype": args.dtype, "smoke": args.smoke,
            "only": args.only, "budget_s": args.budget_s, "batch_invariant_known": _batch_invariant_known(),
            "argv": sys.argv[1:]}
    info["batch_invariant"] = info["batch_invariant_known"] and args.dtype != "float32" and not args.no_batch_invariant
    for name in ("torch", "vllm", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:
            info[name] = f"unavailable ({exc})"
    try:
        import torch

        info["device_name"] = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    except Exception as exc:
        info["device_name"] = f"unknown ({exc})"
    return info


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="default: $OUT or ./gpu_check_out")
    p.add_argument("--smoke", action="store_true", help="tiny model only, few tokens; speed on the tiny model, 1 batch size")
    p.add_argument("--only", choices=("correctness", "speed", "profile"),
                   help="one part (default: correctness, then speed; profile runs only when asked)")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 470)),
                   help="wall-clock budget of the whole run, shared out over the checks (default 470)")
    p.add_argument("--dtype", default=None, help="correctness dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--bf16-tolerance", type=float, default=0.05,
                   help="bf16: share of differing tokens allowed above the like-with-like noise (default 0.05)")
    p.add_argument("--no-batch-invariant", action="store_true", help="do not set VLLM_BATCH_INVARIANT=1 in bf16")
    p.add_argument("--scratch", default=os.path.join(tempfile.gettempdir(), "gpu_check_scratch"),
                   help="tiny model and vLLM cache (kept out of --out, whose files travel back)")
    p.add_argument("--groups", default=None,
                   help="correctness groups to run, comma-separated (default all: tiny-default,tiny-v1,"
                        "smollm2-default,smollm2-v1)")
    p.add_argument("--shortlist", default=None,
                   help="a shortlist file (`python -m vllm_early_exit shortlist`): the never-firing checks score it "
                        "first (never_shortlist); without one they prune to 256 tokens (never_top_k)")
    p.add_argument("--cuda-graphs", choices=("branches", "conditional"), default=None,
                   help="capture the early-exit engines' decode steps (early_exit.cuda_graphs); adds the "
                   "graphed_eq_compiled check")
    p.add_argument("--smollm2", default=SMOLLM2)
    p.add_argument("--llama8b", default=LLAMA8B)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, spec_path, results = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
        spec = json.loads(spec_path.read_text())
        {"correctness": worker_correctness, "speed": worker_speed, "profile": worker_profile}[kind](spec, results)
        return 0
    args = parse_args(argv)
    clock = Clock(args.budget_s)
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(args.scratch) / "vllm_cache"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = Report(out, setup_info(args))
    report.write()
    if args.only in (None, "correctness"):
        speed_weight = 0.0 if args.only else 1.0 if args.smoke else 3.0
        run_correctness(args, report, clock, work, weights_after=speed_weight)
    if args.only in (None, "speed"):
        run_speed(args, report, clock, work)
    if args.only == "profile":
        run_profile(args, report, clock, work)
    report.write()
    print(report.markdown())
    if report.failed():
        return 1
    judged = [c for c in report.data["correctness"] if c["status"] == "pass"]
    return 2 if args.only in (None, "correctness") and not judged else 0  # 2: no check got to a verdict


if __name__ == "__main__":
    sys.exit(main())
