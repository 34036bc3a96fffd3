"""Exit-ready models that ship with the package: an exit adapter (``finetune``'s LoRA factors,
float16) and the early-exit settings ``calibrate`` certified for it against the original, kept in
``vllm_early_exit/exit_ready/<name>/``. ``fetch-model <name>`` merges the adapter into the packaged
original once and returns the folder; the original stays where it is, the reference of every
quality figure.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SMOLLM2_EXIT_READY = "smollm2-exit-ready"
SHIPPED = Path(__file__).resolve().parent.parent / "exit_ready"
SETTINGS_FILE = "early_exit.json"
"""The settings ``calibrate`` certified for the exit-ready model (target agreement against the original)."""

FOLDERS = {SMOLLM2_EXIT_READY: "SmolLM2-135M-Instruct-exit-ready"}


def shipped_dir(name: str) -> Path:
    return SHIPPED / name


def original_checkpoint(name: str) -> Path:
    """The original an exit-ready model was tuned from (its reference)."""
    from vllm_early_exit.tools.assets import smollm2_checkpoint

    if name != SMOLLM2_EXIT_READY:
        raise ValueError(f"unknown exit-ready model {name!r}; allowed: {', '.join(FOLDERS)}")
    return smollm2_checkpoint()


class NotShipped(RuntimeError):
    """No adapter for the exit-ready model ships with this version; the message says why and what to do."""


def exit_ready_checkpoint(name: str = SMOLLM2_EXIT_READY) -> Path:
    """The exit-ready model's HF checkpoint, merged on first use under the cache, with its
    calibrated settings beside the weights (``early_exit.json``)."""
    from vllm_early_exit.tools.cache import cache_dir
    from vllm_early_exit.tools.finetune.adapter import WEIGHTS, build_merged

    source = shipped_dir(name)
    if not (source / WEIGHTS).is_file():
        raise NotShipped(
            f"no {name} adapter ships with this version: no fine-tune so far kept the original's full-depth "
            "output (>= 0.99 token agreement) while moving its exits (docs/finetune.md). Make one with "
            "`python -m vllm_early_exit finetune --out DIR`; DIR/model is the exit-ready checkpoint"
        )
    target = cache_dir() / FOLDERS[name]
    out = build_merged(original_checkpoint(name), source, target)
    if (source / SETTINGS_FILE).exists() and not (out / SETTINGS_FILE).exists():
        shutil.copy(source / SETTINGS_FILE, out / SETTINGS_FILE)
    return out


def certified_settings(name: str = SMOLLM2_EXIT_READY) -> dict | None:
    """The early-exit settings shipped for the model (None where none were certified)."""
    path = shipped_dir(name) / SETTINGS_FILE
    return json.loads(path.read_text()) if path.exists() else None
