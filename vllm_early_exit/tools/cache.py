"""Where the tools keep what they make: converted checkpoints, fetched models, trained heads."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$VLLM_EARLY_EXIT_CACHE``, else ``~/.cache/vllm-early-exit``."""
    root = os.environ.get("VLLM_EARLY_EXIT_CACHE") or Path.home() / ".cache" / "vllm-early-exit"
    return Path(root)


def default_heads_dir(model: str | Path) -> Path:
    """Where ``train-heads`` keeps a model's heads: ``<cache>/heads/<model folder name>``."""
    return cache_dir() / "heads" / Path(model).name
