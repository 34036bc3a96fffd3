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

This file is the command line; the work is in ``scripts/gpu_checks/``: ``settings.py``,
``workers.py`` (engines in a worker subprocess, the time budget), ``correctness.py``,
``speed.py``, ``profile.py`` and ``report.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "scripts"):  # the package and tests/; this script's own parts (gpu_checks/)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from gpu_checks.correctness import GroupChecks, compare, run_correctness, verdict, worker_correctness  # noqa: E402
from gpu_checks.profile import run_profile, worker_profile  # noqa: E402
from gpu_checks.report import Report, setup_info  # noqa: E402
from gpu_checks.settings import LLAMA8B, SMOLLM2, forced_settings  # noqa: E402
from gpu_checks.speed import run_speed, worker_speed  # noqa: E402
from gpu_checks.workers import Clock  # noqa: E402

# What tests/test_gpu_check.py reads of the parts through this module, besides main.
__all__ = ["GroupChecks", "Report", "compare", "forced_settings", "main", "parse_args", "verdict"]


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
