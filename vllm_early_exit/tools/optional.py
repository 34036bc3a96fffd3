"""Optional packages: what each one is for, the command that installs it, and the check that names it.

The plugin needs only vLLM. The offline workflows convert SmolLM2's GGUF file (``gguf`` and
``accelerate``), show progress (``tqdm``) and draw their plots (``matplotlib``): the ``tools``
extra. The Ray Serve and Ray Data examples need Ray: the ``ray`` extra. A command never loses a
result to a missing one: it writes and prints its results first and draws last (``draw``), and
a missing package is named with the command that installs it, never as a traceback.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOOLS_EXTRA = "pip install 'vllm-early-exit[tools]'"
RAY_EXTRA = "pip install 'vllm-early-exit[ray]'"
TRAIN_EXTRA = "pip install 'vllm-early-exit[train]'"

# package -> (what needs it, how to install it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "matplotlib": ("the plots of demo, bench, bench-serve, oracle and quality", f"{TOOLS_EXTRA} (or pip install matplotlib)"),
    "gguf": ("converting SmolLM2's GGUF file into a checkpoint", f"{TOOLS_EXTRA} (or pip install gguf accelerate)"),
    "accelerate": ("converting SmolLM2's GGUF file into a checkpoint", f"{TOOLS_EXTRA} (or pip install gguf accelerate)"),
    "peft": ("finetune's LoRA", f"{TRAIN_EXTRA} (or pip install 'peft>=0.21,<0.22')"),
    "ray": ("the Ray Serve and Ray Data examples", f"{RAY_EXTRA} (or pip install 'ray[serve,data]==2.60.0')"),
}


def available(package: str) -> bool:
    """Whether ``package`` imports."""
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


def missing(package: str) -> str:
    """The line that names a missing package: what needs it and the command that installs it."""
    purpose, install = OPTIONAL[package]
    return f"{package} is not installed ({purpose} need it): {install}"


def require(package: str) -> None:
    """Stops with the install command (``SystemExit``) when ``package`` is missing."""
    if not available(package):
        raise SystemExit(missing(package))


def draw(plot: Callable[[Any, Path], None], data: Any, path: Path, say: Callable[[str], None] = print) -> Path | None:
    """``plot(data, path)`` with matplotlib on its file-only backend; the path drawn, or None (and
    one line that says why) when matplotlib is missing. Call it after the results are written."""
    if not available("matplotlib"):
        say(f"{Path(path).name} not drawn: {missing('matplotlib')}")
        return None
    import matplotlib

    matplotlib.use("Agg")
    plot(data, Path(path))
    return Path(path)
