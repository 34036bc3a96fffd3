"""The training run of ``train-heads``: :func:`train_exit_heads`, from token sequences to an ``ExitHeads`` file."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from vllm_early_exit.model_executor.early_exit.heads import ExitHeads
from vllm_early_exit.tools.train_heads.fitting import initial_heads, train_heads
from vllm_early_exit.tools.train_heads.gates import evaluate, fit_gate
from vllm_early_exit.tools.train_heads.settings import DESIGNS, TrainHeadsError, TrainSettings
from vllm_early_exit.tools.train_heads.streams import PrefixSet, Readout, collect_streams


def base_model_info(model_dir: str | Path, config) -> dict[str, Any]:
    """``base_model`` of the heads file: the engine checks the three sizes against the served model."""
    return {
        "path": str(model_dir),
        "architecture": (config.architectures or [config.model_type])[0],
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
    }


def versions() -> dict[str, str]:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def load_model(model_dir: str | Path):
    """The HF model in float32, in eval mode, with its parameters frozen."""
    from transformers import AutoModelForCausalLM

    if not (Path(model_dir) / "config.json").is_file():
        raise TrainHeadsError(f"--model {str(model_dir)!r} is not an HF checkpoint folder (no config.json)")
    # The checkpoint's own class (LLaMA, Qwen2: a LLaMA class would drop Qwen2's q/k/v biases).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


def split_holdout(sequences: Sequence[Sequence[int]], fraction: float) -> int:
    """Index of the first held-out sequence (the last ``fraction`` of them are held out)."""
    held = max(1, round(fraction * len(sequences)))
    if len(sequences) - held < 1:
        raise TrainHeadsError(
            f"{len(sequences)} sequences cannot be split into training and held-out ones; "
            "give at least 2 (--prompts)"
        )
    return len(sequences) - held


def check_tokens(sequences: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Every token id must exist in the model's vocabulary."""
    for index, tokens in enumerate(sequences):
        bad = [t for t in tokens if not 0 <= t < vocab_size]
        if bad:
            raise TrainHeadsError(
                f"sequence {index} holds token ids {bad[:5]} outside this model's vocabulary [0, {vocab_size - 1}]"
            )


def train_exit_heads(model_dir: str | Path, sequences: Sequence[Sequence[int]],
                     settings: TrainSettings = TrainSettings(), data: dict | None = None) -> ExitHeads:
    """Trains heads (and gates) for the model in ``model_dir`` on token ``sequences``.

    The last ``settings.holdout`` of the sequences are held back: they choose the
    design, fit the gates and give the reported numbers. ``data`` describes where
    the sequences came from (recorded in the file). The same seed and inputs give
    identical tensors.
    """
    started = time.perf_counter()
    machine = {"cpus": os.cpu_count(), "threads": torch.get_num_threads(),
               "load_average": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None}
    torch.manual_seed(settings.seed)
    model = load_model(model_dir)
    config = model.config
    settings.check(config.num_hidden_layers, config.hidden_size)
    layers = settings.head_layers(config.num_hidden_layers)
    split = split_holdout(sequences, settings.holdout)
    check_tokens(sequences, config.vocab_size)

    seen = PrefixSet()
    train = collect_streams(model, sequences[:split], layers, settings.teacher_top_k, seen, desc="teacher (train)")
    held = collect_streams(model, sequences[split:], layers, settings.teacher_top_k, seen,
                           with_before=settings.gates, desc="teacher (held-out)")
    collected = time.perf_counter()

    readout = Readout(model)
    designs = DESIGNS if settings.design == "compare" else (settings.design,)
    heads = initial_heads(designs, layers, train, settings)
    losses = train_heads(heads, train, readout, settings, torch.Generator().manual_seed(settings.seed))
    for head in heads.values():
        head.requires_grad_(False)
    trained = time.perf_counter()

    readings = evaluate(readout, held, {d: {l: heads[(d, l)] for l in layers} for d in designs})
    chosen = max(designs, key=lambda d: (sum(r.agreement for r in readings[d].values()), -designs.index(d)))
    gates, gate_scores = {}, {}
    if settings.gates:
        for l in layers:
            reading = readings[chosen][l]
            gates[l], gate_scores[l] = fit_gate(reading.features, reading.correct, held.sequence)
    finished = time.perf_counter()

    rows = []
    for l in layers:
        row: dict[str, Any] = {"layer": l, "plain_agreement": readings["plain"][l].agreement,
                               "plain_kl": readings["plain"][l].kl}
        for design in designs:
            row[f"{design}_agreement"] = readings[design][l].agreement
            row[f"{design}_kl"] = readings[design][l].kl
            row[f"{design}_train_kl"] = losses[(design, l)]
        row.update(gate_scores.get(l, {}))
        rows.append(row)
    training = {
        "method": f"{settings.init} start, then "
                  + ("KL(full model || head)" if settings.target == "soft" else "cross-entropy on the full model's top token")
                  + " over candidate tokens; held-out numbers on the full vocabulary",
        "settings": {**asdict(settings), "layers": list(layers)},
        "designs": list(designs),
        "chosen": chosen,
        "data": {
            **(data or {}),
            "sequences_train": split,
            "sequences_held_out": len(sequences) - split,
            "tokens_train": train.tokens,
            "tokens_held_out": held.tokens,
        },
        "per_layer": rows,
        "mean": {name: sum(r.agreement for r in by_layer.values()) / len(layers)
                 for name, by_layer in readings.items()},
        "seconds": {
            "teacher": round(collected - started, 1),
            "heads": round(trained - collected, 1),
            "evaluation_and_gates": round(finished - trained, 1),
            "total": round(finished - started, 1),
        },
        "versions": versions(),
        "machine": machine,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    weights = {l: heads[(chosen, l)].export() for l in layers}
    return ExitHeads(base_model=base_model_info(model_dir, config), layers=layers, weights=weights,
                     design=chosen, gates=gates, training=training)
