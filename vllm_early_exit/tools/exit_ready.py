"""Exit-ready models that ship with the package, kept in ``vllm_early_exit/exit_ready/<name>/``.

What ships is small: the exit weights, float16, and the early-exit settings ``calibrate``
certified for them against the original (``early_exit.json``). The exit weights are one of

* exit heads on the frozen trunk (``heads.json`` + ``heads.safetensors``, the format of
  ``train-heads``): the model's own weights are the original's, so its full-depth output is the
  original's exactly; the folder ``fetch-model`` builds links the original's files and adds the
  heads;
* ``finetune``'s LoRA factors (``exit_adapter.safetensors``): merged into a copy of the original.

``fetch-model <name>`` builds the folder once under the cache and returns it; its
``early_exit.json`` is the shipped settings with the files they read (the heads folder, the
token shortlist) as paths on this machine. The original stays where it is, the reference of
every quality figure.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

SMOLLM2_EXIT_READY = "smollm2-exit-ready"
SHIPPED = Path(__file__).resolve().parent.parent / "exit_ready"
SETTINGS_FILE = "early_exit.json"
"""The settings ``calibrate`` certified for the exit-ready model (target agreement against the original)."""
HEADS_FOLDER = "heads"
"""Where a built exit-ready folder keeps its exit heads."""

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
    """No exit weights for the exit-ready model ship with this version; the message says why and what to do."""


def exit_ready_checkpoint(name: str = SMOLLM2_EXIT_READY) -> Path:
    """The exit-ready model's HF checkpoint, built on first use under the cache, with its
    certified settings beside the weights (``early_exit.json``, its files resolved)."""
    from vllm_early_exit.files import HEADS_WEIGHTS_FILE
    from vllm_early_exit.tools.cache import cache_dir
    from vllm_early_exit.tools.finetune.adapter import WEIGHTS, build_merged

    source = shipped_dir(name)
    if (source / HEADS_WEIGHTS_FILE).is_file():
        build = build_with_heads
    elif (source / WEIGHTS).is_file():
        build = build_merged
    else:
        raise NotShipped(
            f"no {name} exit weights ship with this version (docs/finetune.md). Make an exit-ready "
            "model with `python -m vllm_early_exit finetune --out DIR` (DIR/model is its checkpoint) "
            "or train exit heads with `python -m vllm_early_exit train-heads`"
        )
    original = original_checkpoint(name)
    out = build(original, source, cache_dir() / FOLDERS[name])
    settings = certified_settings(name)
    if settings is not None:
        (out / SETTINGS_FILE).write_text(json.dumps(resolve_settings(settings, out, original), indent=2) + "\n")
    return out


def build_with_heads(original: Path, source: Path, out: Path) -> Path:
    """The exit-ready folder of exit heads on the frozen trunk: every file of ``original`` linked
    (vLLM loads the original's weights), the heads copied to ``out/heads``. Rebuilt when the
    shipped heads changed; built in a temporary folder and renamed, so an interrupted build
    never counts as done."""
    from vllm_early_exit.files import HEADS_CONFIG_FILE, HEADS_WEIGHTS_FILE

    out = Path(out)
    heads = out / HEADS_FOLDER
    current = all(
        (heads / f).is_file() and (heads / f).read_bytes() == (source / f).read_bytes()
        for f in (HEADS_CONFIG_FILE, HEADS_WEIGHTS_FILE)
    )
    if (out / "config.json").exists() and current:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=".build-"))
    try:
        for item in Path(original).iterdir():
            if not item.name.startswith("."):
                (staging / item.name).symlink_to(item.resolve())
        (staging / HEADS_FOLDER).mkdir()
        for f in (HEADS_CONFIG_FILE, HEADS_WEIGHTS_FILE):
            shutil.copy(source / f, staging / HEADS_FOLDER / f)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def resolve_settings(settings: dict, folder: Path, original: Path) -> dict:
    """The shipped settings as a server reads them: ``heads`` the built folder's heads (where
    heads ship) and ``shortlist`` the original's token shortlist (built once, as ``shortlist``
    does), both as paths on this machine."""
    resolved = dict(settings)
    if resolved.get("heads") == HEADS_FOLDER:
        resolved["heads"] = str(Path(folder) / HEADS_FOLDER)
    if resolved.get("shortlist") is True:
        from vllm_early_exit.tools.shortlist import ensure_shortlist

        resolved["shortlist"] = str(ensure_shortlist(original))
    return resolved


def certified_settings(name: str = SMOLLM2_EXIT_READY) -> dict | None:
    """The early-exit settings shipped for the model, as shipped (None where none were
    certified): ``"heads": "heads"`` names the built folder's heads and ``"shortlist": true``
    the original's token shortlist (``resolve_settings``)."""
    path = shipped_dir(name) / SETTINGS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def served_settings(folder: Path) -> dict:
    """The settings a server of a built exit-ready folder (``exit_ready_checkpoint``) reads: its
    ``early_exit.json``."""
    return json.loads((Path(folder) / SETTINGS_FILE).read_text())
