"""shortlist: the tokens a model emits most often, for the cheap first stage of exit checks.

Counts the tokens of the assistant replies of ShareGPT's ``train`` split (never
the calibration or evaluation prompts), each reply closed by the end-of-turn
token, in the model's own tokenizer, and writes the ``size`` most frequent to a
shortlist file (``model_executor/early_exit/shortlist.py`` has the format).
Serve with ``{"shortlist": PATH}``. It also reports the share of reply tokens the
shortlist covers.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from vllm_early_exit.tools.assets import cache_dir

DEFAULT_SIZE = 1024
DEFAULT_REPLIES = 2000


def default_shortlist_path(model: str | Path, size: int = DEFAULT_SIZE) -> Path:
    """Where ``shortlist`` keeps a model's shortlist: ``<cache>/shortlists/<model folder name>-<size>.json``."""
    return cache_dir() / "shortlists" / f"{Path(model).name}-{size}.json"


def build_shortlist(model: str | Path, size: int = DEFAULT_SIZE, replies: int = DEFAULT_REPLIES,
                    out: str | Path | None = None) -> dict:
    """Counts reply tokens and writes the shortlist; returns where and what it covers."""
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from vllm_early_exit.model_executor.early_exit.shortlist import write_shortlist
    from vllm_early_exit.tools.train_heads.data import sharegpt_train_conversations

    tokenizer = AutoTokenizer.from_pretrained(model)
    vocab_size = AutoConfig.from_pretrained(model).vocab_size
    if not 1 <= size <= vocab_size:
        raise SystemExit(f"--size {size} is invalid: it must lie in [1, {vocab_size}] (the vocabulary)")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    end = end if isinstance(end, int) and end != tokenizer.unk_token_id else tokenizer.eos_token_id
    counts: Counter[int] = Counter()
    texts = [reply for _, reply in sharegpt_train_conversations(replies) if reply]
    for reply in tqdm(texts, desc="counting reply tokens", unit="reply", file=sys.stdout):
        counts.update(tokenizer.encode(reply, add_special_tokens=False))
        if end is not None:
            counts[end] += 1
    tokens = [token for token, _ in counts.most_common(size) if token < vocab_size]
    total = sum(counts.values())
    coverage = sum(counts[t] for t in tokens) / total if total else 0.0
    path = Path(out) if out else default_shortlist_path(model, size)
    source = {"model": str(model), "replies": len(texts), "reply_tokens": total, "coverage": coverage,
              "data": "ShareGPT train split, assistant replies"}
    write_shortlist(path, tokens, vocab_size, source)
    return {"path": str(path), "size": len(tokens), "coverage": coverage, "replies": len(texts)}


def ensure_shortlist(model: str | Path, size: int = DEFAULT_SIZE) -> Path:
    """The model's default shortlist, built on first use (a few seconds)."""
    from vllm_early_exit.model_executor.early_exit.shortlist import read_shortlist

    path = default_shortlist_path(model, size)
    if not path.exists() or read_shortlist(path)["source"].get("model") != str(model):
        build_shortlist(model, size)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF checkpoint folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"tokens on the list (default {DEFAULT_SIZE})")
    parser.add_argument("--replies", type=int, default=DEFAULT_REPLIES,
                        help=f"ShareGPT train-split replies to count (default {DEFAULT_REPLIES})")
    parser.add_argument("--out", help="file to write (default: the cache, see default_shortlist_path)")


def run(args: argparse.Namespace) -> dict:
    from vllm_early_exit.tools.assets import smollm2_checkpoint

    model = args.model or str(smollm2_checkpoint())
    result = build_shortlist(model, args.size, args.replies, args.out)
    print(f"shortlist of {result['size']} tokens covers {result['coverage']:.1%} of the reply tokens "
          f"of {result['replies']} ShareGPT replies: {result['path']}")
    print(f'serve with: --early-exit-config \'{{"shortlist": "{result["path"]}", ...}}\'')
    return result
