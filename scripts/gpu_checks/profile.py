"""Profile: where a decode step's host time goes (``--only profile``): the speed run's engines, a
few steps each under torch.profiler with ranges around the model's and the plugin's methods."""

from __future__ import annotations

import random
import time
import traceback
from pathlib import Path

from gpu_checks.speed import speed_spec
from gpu_checks.workers import Clock, budget_or_skip, emit, release, run_worker, start_engine

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
            llm, info = start_engine(spec, engine)
        except Exception as exc:
            emit(results, {"engine": engine["name"], "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc()[-4000:]})
            continue
        emit(results, {"engine": engine["name"], "started": True, **info})
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
            emit(results, record)
        release(llm)


def profile_spec(args) -> dict:
    """The speed run's model and engines (shorter prompts, a few steps), for ``worker_profile``."""
    spec = speed_spec(args)
    spec.update(name="profile", prompt_tokens=16, output_tokens=8 if args.smoke else 24,
                batches=spec["batches"][:2])
    spec["common"] = {**spec["common"], "max_model_len": 64 if args.smoke else 128}
    return spec


def run_profile(args, report, clock: Clock, work: Path) -> None:
    """Host time per step by range, graph replays, kernel launches and device waits."""
    pr = report.data["profile"]
    budget = budget_or_skip(pr, clock, report)
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
