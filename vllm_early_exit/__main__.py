"""Command line: ``python -m vllm_early_exit COMMAND`` (also installed as ``vllm-early-exit``).

Every command prints its own progress and result; vLLM's output and third-party
warnings go to ``<cache>/logs/COMMAND.log`` (``tools/console.py``), ``-v`` prints
them too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import textwrap
from typing import NamedTuple


class Command(NamedTuple):
    module: str
    """The module with ``add_arguments(parser)`` and ``run(args)``."""
    summary: str
    """One line in ``--help``."""
    examples: tuple[str, ...]
    """Shown by ``COMMAND --help``; each is a command line after ``python -m vllm_early_exit``."""


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "vllm_early_exit.tools.demo", "early exit against plain vLLM on SmolLM2: speed and agreement",
        ("demo", "demo --engines calibrated --prompts 8 --alone 2"),
    ),
    "bench": Command(
        "vllm_early_exit.tools.bench", "speed benchmark against plain vLLM at batch 1, 8, 32",
        ("bench --modes forced_50_compiled,per_token_shortlist_compiled --out /tmp/speed",
         "bench --calibrated settings.json --modes calibrated"),
    ),
    "bench-serve": Command(
        "vllm_early_exit.tools.serve_bench", "`vllm bench serve` against plain and early-exit servers",
        ("bench-serve --concurrency 1,8 --out /tmp/serve",),
    ),
    "shortlist": Command(
        "vllm_early_exit.tools.shortlist", "a model's most frequent reply tokens (the checks' cheap first stage)",
        ("shortlist --model ~/models/my-llama --size 1024",),
    ),
    "train-heads": Command(
        "vllm_early_exit.tools.train_heads", "train exit heads and gates on the model's own predictions",
        ("train-heads --out heads/ --layers 20,22,24,26,28",),
    ),
    "finetune": Command(
        "vllm_early_exit.tools.finetune", "make a model exit-ready: self-distilled exits, the original as reference",
        ("finetune --out runs/smollm2-exit --tokens 500000", "finetune --out runs/smollm2-exit --resume"),
    ),
    "calibrate": Command(
        "vllm_early_exit.tools.calibrate", "the threshold that keeps a target agreement (Learn-then-Test)",
        ("calibrate --signal max_prob --exit-layers 26,28 --target-agreement 0.95 --prompts 160 --out ee.json",),
    ),
    "oracle": Command(
        "vllm_early_exit.tools.oracle", "how early a perfect exit rule could leave (per sequence, per token)",
        ("oracle --prompts 24 --max-tokens 64 --out /tmp/oracle",),
    ),
    "quality": Command(
        "vllm_early_exit.tools.quality", "quality of every exit signal against full depth",
        ("quality --methods max_prob,head --prompts 24 --out /tmp/quality",),
    ),
    "fetch-model": Command(
        "vllm_early_exit.tools.fetch_model", "fetch a larger real model, or build an exit-ready one (once)",
        ("fetch-model qwen2.5-coder-1.5b", "fetch-model smollm2-exit-ready"),
    ),
}

PROG = "python -m vllm_early_exit"


def _command_list() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return "commands:\n" + "\n".join(lines) + f"\n\n`{PROG} COMMAND --help` shows a command's options and an example."


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (each tool adds its own options)."""
    parser = argparse.ArgumentParser(
        prog=PROG, usage=f"{PROG} [-h] [-v] COMMAND ...",
        description="Early-exit decoding for LLaMA-family models in vLLM: the offline workflows.",
        epilog=_command_list(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print vLLM's output and third-party warnings too (default: to a log file)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands",
                                help=argparse.SUPPRESS)
    for name, command in COMMANDS.items():
        examples = "\n".join(f"  {PROG} {example}" for example in command.examples)
        tool = sub.add_parser(name, prog=f"{PROG} {name}", description=command.summary,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        importlib.import_module(command.module).add_arguments(tool)
        more = f"{textwrap.fill(tool.epilog, 80)}\n\n" if tool.epilog else ""
        tool.epilog = f"{more}example{'s' if len(command.examples) > 1 else ''}:\n{examples}"
        tool.add_argument("--json-out", help="also write the result as JSON to this file")
        tool.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="print vLLM's output and third-party warnings too (default: to a log file)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from vllm_early_exit.tools import console

    args = build_parser().parse_args(argv)
    with console.session(args.command, verbose=args.verbose):
        result = importlib.import_module(COMMANDS[args.command].module).run(args)
    if args.json_out and result is not None:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
