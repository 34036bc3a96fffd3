"""An exit-ready model against its original, on the held-out ShareGPT evaluation split.

    .venv/bin/python benchmarks/finetune_eval.py --run RUN_DIR       # a `finetune` run folder
    .venv/bin/python benchmarks/finetune_eval.py --model TUNED       # any exit-ready checkpoint

The original generates greedy replies to the evaluation prompts in vLLM (with its top-k at each
token, ``tools/finetune/data.py``); the original and the tuned model are then both teacher-forced
on those replies in HF transformers, and for each the figures ``finetune`` reports during
training are computed against the ORIGINAL's tokens (``tools/finetune/evaluate.py``): the
full-depth agreement (the ceiling), each exit layer's readout agreement, and the depth at which
the max-prob rule over the exit layers keeps 0.99 / 0.95 / 0.9 agreement. Writes
``finetune_eval.json`` / ``.md`` to ``--out``, and, from the run folder, the training curve
(``finetune_curve.png``) with the run's report.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from vllm_early_exit.tools.finetune.data import prompt_ids, teacher_data
from vllm_early_exit.tools.finetune.evaluate import evaluate
from vllm_early_exit.tools.finetune.readouts import ExitReadouts
from vllm_early_exit.tools.finetune.report import plot
from vllm_early_exit.tools.finetune.settings import default_exit_layers
from vllm_early_exit.tools.optional import draw

RESULTS = Path("benchmarks/results/finetune")


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(report: dict) -> str:
    layers = report["exit_layers"]
    head = ["model", "full depth", *(f"L{layer}" for layer in layers), "depth at 0.99", "depth at 0.95", "depth at 0.9"]
    lines = [
        "# Exit-ready SmolLM2 against the original (held-out evaluation split)",
        "",
        f"{report['prompts']} ShareGPT evaluation prompts, {report['max_tokens']} greedy tokens of the original "
        f"({report['positions']} reply positions), teacher-forced; every figure counts agreement with the "
        "original's token. Full depth: the model's last layer; L*n*: the readout after layer *n* (final norm and "
        "LM head); depth at *a*: the share of layers the max-prob rule over the exit layers runs at its most "
        "permissive threshold that keeps agreement *a* (`-`: no threshold does).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, row in report["models"].items():
        lines.append("| " + " | ".join([
            name, fmt(row["full_depth_agreement"]), *(f"{row['exit_agreement'][str(layer)]:.3f}" for layer in layers),
            fmt(row["depth_at"]["0.99"]), fmt(row["depth_at"]["0.95"]), fmt(row["depth_at"]["0.9"]),
        ]) + " |")
    if report.get("training"):
        t = report["training"]
        lines += ["", f"Tuned: {t['method']} after {t['tokens']:,} training tokens (step {t['best_step']} of "
                  f"{t['steps']}, {t['tokens_per_hour']:,.0f} tokens an hour on this machine); the curve: "
                  "`finetune_curve.png`, the run's report: `finetune_report.md`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finetune run folder (its model/ and report)")
    parser.add_argument("--model", type=Path, help="the exit-ready checkpoint (default: RUN/model)")
    parser.add_argument("--reference", type=Path, help="the original (default: the run's model, else SmolLM2)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_early_exit.tools.assets import sharegpt_split, smollm2_checkpoint
    from vllm_early_exit.tools.engines import shutdown_engine

    run_report = json.loads((args.run / "finetune_report.json").read_text()) if args.run else None
    tuned = args.model or args.run / "model"
    reference = args.reference or (Path(run_report["model"]) if run_report else smollm2_checkpoint())
    layers = tuple(run_report["exit_layers"]) if run_report else default_exit_layers(30)
    tokenizer = AutoTokenizer.from_pretrained(reference)
    prompts = prompt_ids(tokenizer, sharegpt_split("evaluation", args.prompts), 512)
    cache = args.out / ".data"
    data, engine = teacher_data(reference, f"evaluation-{args.max_tokens}", prompts, cache, args.max_tokens, 20)
    if engine is not None:
        shutdown_engine(engine)
    models = {}
    for name, path in (("original", reference), ("exit-ready", tuned)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        models[name] = evaluate(ExitReadouts(model), data, layers)
        print(name, json.dumps({k: models[name][k] for k in ("full_depth_agreement", "depth_at")}), flush=True)
    report = {"reference": str(reference), "model": str(tuned), "prompts": args.prompts, "max_tokens": args.max_tokens,
              "positions": models["original"]["positions"], "exit_layers": list(layers), "models": models}
    if run_report:
        best = next(h for h in run_report["history"] if h["step"] == run_report["best_step"])
        report["training"] = {"method": run_report["settings"]["method"], "tokens": best["tokens"],
                              "best_step": run_report["best_step"], "steps": run_report["steps"],
                              "tokens_per_hour": run_report["tokens_per_hour"] or 0.0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "finetune_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "finetune_eval.md").write_text(markdown(report))
    print(markdown(report))
    if args.run:
        for name in ("finetune_report.json", "finetune_report.md"):
            shutil.copy(args.run / name, args.out / name)
        draw(plot, {run_report["settings"]["method"]: run_report}, args.out / "finetune_curve.png")
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
