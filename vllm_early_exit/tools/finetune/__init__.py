"""``finetune``: make a model exit-ready by self-distillation, with the original as the reference.

The original model generates greedy replies to the training prompts in vLLM, keeping its top-k
distribution at every reply token (``data.py``). The student, a LoRA on the original's decoder
layers by default (``training.py``), learns to make each exit layer's readout (the shared final
norm and LM head) match that distribution, while a KL anchor on the last layer keeps its full-depth
output the original's (``loss.py``). A held-out evaluation every ``--eval-every`` steps measures,
against the original's tokens, the full-depth agreement (the ceiling every exit setting
inherits), each exit layer's agreement and the max-prob frontier (``evaluate.py``); the best
checkpoint that holds the ceiling is merged into ``OUT/model`` (``adapter.py``), an HF checkpoint
of the same architecture that vLLM and the plugin load as they load the original.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_early_exit.tools.finetune.settings import (
    ARCHITECTURES, EXIT_TARGETS, METHODS, FinetuneError, FinetuneSettings, default_exit_layers,
)

DEFAULT_LR = {"lora": 1e-4, "full": 1e-5}
HELD_OUT = 48
"""Held-out prompts: the last ones of the ShareGPT train split (or of ``--prompt-file``), never trained on."""


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, e.g. 16,20,24; got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FinetuneSettings()
    parser.add_argument("--model", help="HF checkpoint folder of the original (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--out", required=True, help="run folder: data, checkpoints, report and OUT/model")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out (same settings)")
    parser.add_argument("--method", default=d.method, choices=METHODS,
                        help=f"lora (default): adapters on every layer, merged at the end; full: every decoder weight")
    parser.add_argument("--exit-layers", type=_layer_list,
                        help="0-based layers whose readout learns the original's distribution (default: every "
                             "second layer from two thirds of the stack to the second-to-last; SmolLM2: "
                             + ",".join(map(str, default_exit_layers(30))) + ")")
    parser.add_argument("--tokens", type=int, default=d.tokens, help=f"training budget in sequence tokens (default {d.tokens:,})")
    parser.add_argument("--lr", type=float, help=f"AdamW learning rate (default {DEFAULT_LR['lora']} for lora, "
                        f"{DEFAULT_LR['full']} for full)")
    parser.add_argument("--lora-rank", type=int, default=d.lora_rank, help=f"(default {d.lora_rank})")
    parser.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help=f"(default {d.lora_alpha})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per step (default {d.batch_size})")
    parser.add_argument("--exits-per-step", type=int, default=d.exits_per_step,
                        help=f"exit layers read per step, in turn (default {d.exits_per_step})")
    parser.add_argument("--exit-weight", type=float, default=d.exit_weight,
                        help=f"exit KL weight, times (layer + 1) / layers (default {d.exit_weight})")
    parser.add_argument("--exit-target", default=d.exit_target, choices=EXIT_TARGETS,
                        help="what an exit learns: soft (default), the original's distribution; hard, its "
                             "greedy token, so the exit's max-prob estimates the chance it agrees")
    parser.add_argument("--anchor-weight", type=float, default=d.anchor_weight,
                        help=f"last layer's KL weight (default {d.anchor_weight})")
    parser.add_argument("--teacher-top-k", type=int, default=d.teacher_top_k,
                        help=f"the original's top tokens kept per reply position (default {d.teacher_top_k}; "
                             "at most vLLM's max_logprobs)")
    parser.add_argument("--layer-dropout", type=float, default=d.layer_dropout,
                        help="LayerSkip layer dropout, largest at the last layer (default 0: off)")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help=f"steps between evaluations (default {d.eval_every})")
    parser.add_argument("--ceiling", type=float, default=d.ceiling,
                        help=f"full-depth agreement a chosen checkpoint keeps (default {d.ceiling})")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 (default: bfloat16 autocast)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--prompts", type=int, default=1024, help="training prompts, from the start of the "
                        "ShareGPT train split (default 1024)")
    parser.add_argument("--held-out", type=int, default=HELD_OUT, help=f"held-out prompts (default {HELD_OUT})")
    parser.add_argument("--prompt-file", help="your own prompts instead of ShareGPT: a JSON list of strings "
                        "or a text file, one prompt a line; the last --held-out are held out")
    parser.add_argument("--max-tokens", type=int, default=128, help="reply tokens per prompt (default 128)")
    parser.add_argument("--max-prompt-tokens", type=int, default=192,
                        help="prompt tokens kept, the last ones (default 192)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.epilog = ("The exit-ready model is OUT/model; measure it against the original with "
                     "`oracle --model OUT/model --reference ORIGINAL` and calibrate it with "
                     "`calibrate --model OUT/model --reference ORIGINAL`.")


def settings_from_args(args: argparse.Namespace) -> FinetuneSettings:
    return FinetuneSettings(
        exit_layers=args.exit_layers, method=args.method, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lr=args.lr if args.lr is not None else DEFAULT_LR.get(args.method, DEFAULT_LR["lora"]),
        batch_size=args.batch_size, tokens=args.tokens, exits_per_step=args.exits_per_step,
        exit_weight=args.exit_weight, exit_target=args.exit_target, anchor_weight=args.anchor_weight, teacher_top_k=args.teacher_top_k,
        layer_dropout=args.layer_dropout, eval_every=args.eval_every, ceiling=args.ceiling,
        bf16=not args.no_bf16, seed=args.seed,
    )


def read_prompt_file(path: Path) -> list[str]:
    if not path.is_file():
        raise FinetuneError(f"--prompt-file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        prompts = json.loads(text)
    except json.JSONDecodeError:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise FinetuneError(f"--prompt-file {str(path)!r}: expected a JSON list of non-empty strings or one prompt a line")
    return prompts


def prompt_texts(args: argparse.Namespace) -> tuple[list[str], list[str], str]:
    """(training prompts, held-out prompts, where they came from)."""
    if args.prompts < 1 or args.held_out < 1:
        raise FinetuneError(f"--prompts {args.prompts} and --held-out {args.held_out} must be >= 1")
    if args.prompt_file:
        texts = read_prompt_file(Path(args.prompt_file))
        if len(texts) < args.prompts + args.held_out:
            raise FinetuneError(f"--prompt-file holds {len(texts)} prompts; --prompts {args.prompts} + "
                                f"--held-out {args.held_out} need {args.prompts + args.held_out}")
        return texts[:args.prompts], texts[-args.held_out:], f"{args.prompt_file}"
    from vllm_early_exit.tools.assets import SPLITS, sharegpt_split

    size = SPLITS["train"][1]
    if args.prompts + args.held_out > size:
        raise FinetuneError(f"the ShareGPT train split holds {size} prompts; --prompts {args.prompts} + "
                            f"--held-out {args.held_out} must not exceed it")
    texts = sharegpt_split("train", size)
    return texts[:args.prompts], texts[-args.held_out:], "ShareGPT train split (held out: its last prompts)"


def model_config(model: Path):
    from transformers import AutoConfig

    if not (model / "config.json").is_file():
        raise FinetuneError(f"--model {str(model)!r} is not an HF checkpoint folder (no config.json)")
    config = AutoConfig.from_pretrained(model)
    arch = (config.architectures or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise FinetuneError(f"--model {model.name}: architecture {arch} is not supported; allowed: "
                            f"{', '.join(ARCHITECTURES)} (what the plugin serves)")
    return config


def _resumable(run_info: dict) -> dict:
    """What a resumed run must share with the run it continues: everything but the budget
    (``--tokens``: a resumed run may train further)."""
    flat = {k: v for k, v in run_info.items() if k != "settings"}
    settings = FinetuneSettings.from_dict(run_info["settings"]).as_dict()  # a setting added since: its default
    flat.update({f"--{k.replace('_', '-')}": v for k, v in settings.items() if k != "tokens"})
    return flat


def check_run_folder(out: Path, run_info: dict, resume: bool) -> None:
    from vllm_early_exit.tools.resume import differing_settings

    saved = out / "run.json"
    if resume:
        if not saved.is_file():
            raise FinetuneError(f"--resume: {out} holds no run (no run.json); start one without --resume")
        differ = differing_settings(_resumable(json.loads(saved.read_text())), _resumable(run_info))
        if differ:
            raise FinetuneError(f"--resume: {out} holds another run; these differ from its run.json: "
                                f"{', '.join(differ)}. Resume with the settings it was started with, or "
                                "choose another --out")
    elif saved.exists():
        raise FinetuneError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(run_info, indent=2) + "\n")


def run(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoTokenizer

    from vllm_early_exit.tools import console
    from vllm_early_exit.tools.assets import smollm2_checkpoint
    from vllm_early_exit.tools.engines import shutdown_engine
    from vllm_early_exit.tools.finetune.data import prompt_ids, teacher_data
    from vllm_early_exit.tools.finetune.training import export, train
    from vllm_early_exit.tools.optional import require

    try:
        model = Path(args.model) if args.model else smollm2_checkpoint()
        out = Path(args.out)
        settings = settings_from_args(args)
        config = model_config(model)
        settings.check(config.num_hidden_layers)
        if settings.method == "lora":
            require("peft")
        if args.threads is not None:
            if args.threads < 1:
                raise FinetuneError(f"--threads {args.threads} must be >= 1")
            torch.set_num_threads(args.threads)
        if args.max_tokens < 2 or args.max_prompt_tokens < 8:
            raise FinetuneError(f"--max-tokens {args.max_tokens} must be >= 2 and --max-prompt-tokens "
                                f"{args.max_prompt_tokens} >= 8")
        train_texts, held_texts, source = prompt_texts(args)
        run_info = {
            "model": str(model), "num_layers": config.num_hidden_layers, "settings": settings.as_dict(),
            "data": {"source": source, "train_sequences": len(train_texts), "held_out_sequences": len(held_texts),
                     "max_tokens": args.max_tokens, "max_prompt_tokens": args.max_prompt_tokens},
        }
        check_run_folder(out, run_info, args.resume)
        tokenizer = AutoTokenizer.from_pretrained(model)
        data_dir = out / "data"
        train_data, engine = teacher_data(model, "train", prompt_ids(tokenizer, train_texts, args.max_prompt_tokens),
                                          data_dir, args.max_tokens, settings.teacher_top_k)
        held_out, engine = teacher_data(model, "held-out", prompt_ids(tokenizer, held_texts, args.max_prompt_tokens),
                                        data_dir, args.max_tokens, settings.teacher_top_k, engine)
        if engine is not None:
            shutdown_engine(engine)
        settings.check_budget(train_data.tokens() / len(train_data) * settings.batch_size)
    except FinetuneError as exc:
        raise SystemExit(f"finetune: error: {exc}") from None
    report = train(out, model, settings, train_data, held_out, run_info, args.resume)
    with console.phase("merging the best checkpoint into the exit-ready model"):
        target = export(out, model, settings, report)
    from vllm_early_exit.tools.finetune.report import plot
    from vllm_early_exit.tools.optional import draw

    console.say(f"report: {out / 'finetune_report.md'}")
    console.say(f"exit-ready model: {target}")
    drawn = draw(plot, {settings.method: report}, out / "finetune_curve.png", say=console.say)
    if drawn:
        console.say(f"curve: {drawn}")
    return {"model": str(target), "best_step": report["best_step"], "tokens": report["tokens"]}
