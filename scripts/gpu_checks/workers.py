"""Engines in a worker subprocess: started, measured and stopped there, one JSON line per finished
engine or measurement; the parent polls the lines and shares the time budget out (``Clock``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpu_checks.settings import ROOT, SCRIPT

def _runner_of(worker) -> str:
    runner = worker.model_runner
    return f"{type(runner).__module__}.{type(runner).__qualname__}"


def emit(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def release(llm) -> None:
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


def exit_stats(llm) -> dict:
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


def start_engine(spec: dict, engine: dict):
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
        [sys.executable, str(SCRIPT), "--worker", kind, str(spec_path), str(results)],
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


def budget_or_skip(section: dict, clock: Clock, report) -> float | None:
    """The seconds left for a section, or None (recorded as skipped) when under 30."""
    budget = clock.left()
    if budget >= 30:
        return budget
    section["status"] = f"skipped: out of time budget ({budget:.0f} s left)"
    report.write()
    return None
