"""The plugin's own file formats and their readers: a heads folder and a shortlist file.

A leaf (it imports only ``errors``): the settings (``config/``) check that a named file is
what it claims to be without importing what runs in the forward pass, and the model's
modules (``early_exit/heads.py``, ``early_exit/shortlist.py``) read the same files through
the same functions. The formats themselves are described in those two modules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_early_exit.errors import EarlyExitConfigError

HEADS_FORMAT = "vllm-early-exit-heads"
HEADS_VERSION = 1
HEADS_CONFIG_FILE = "heads.json"
HEADS_WEIGHTS_FILE = "heads.safetensors"

SHORTLIST_FORMAT = "vllm-early-exit-shortlist"
SHORTLIST_VERSION = 1


def read_metadata(folder: Path) -> dict[str, Any]:
    """``heads.json`` of a heads folder, with a clear error when it is not one."""
    config = folder / HEADS_CONFIG_FILE
    try:
        meta = json.loads(config.read_text())
    except OSError as exc:
        raise EarlyExitConfigError(
            f"early_exit.heads={str(folder)!r} is not a heads folder: cannot read {HEADS_CONFIG_FILE} "
            f"({exc.strerror}). Create one with `python -m vllm_early_exit train-heads`."
        ) from None
    except json.JSONDecodeError as exc:
        raise EarlyExitConfigError(f"early_exit.heads={str(folder)!r}: {HEADS_CONFIG_FILE} is not valid JSON ({exc}).") from None
    if meta.get("format") != HEADS_FORMAT or meta.get("version") != HEADS_VERSION:
        raise EarlyExitConfigError(
            f"early_exit.heads={str(folder)!r}: {HEADS_CONFIG_FILE} is not a {HEADS_FORMAT} v{HEADS_VERSION} file "
            f"(format={meta.get('format')!r}, version={meta.get('version')!r})."
        )
    if not (folder / HEADS_WEIGHTS_FILE).is_file():
        raise EarlyExitConfigError(f"early_exit.heads={str(folder)!r}: {HEADS_WEIGHTS_FILE} is missing.")
    return meta


def read_shortlist(path: str | Path) -> dict[str, Any]:
    """The shortlist file's content, with a clear error when it is not one."""
    where = str(path)
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise EarlyExitConfigError(
            f"early_exit.shortlist={where!r} cannot be read ({exc.strerror}). "
            "Create one with `python -m vllm_early_exit shortlist --model MODEL`."
        ) from None
    except json.JSONDecodeError as exc:
        raise EarlyExitConfigError(f"early_exit.shortlist={where!r} is not valid JSON ({exc}).") from None
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if data.get("format") != SHORTLIST_FORMAT or not isinstance(tokens, list) or not tokens:
        raise EarlyExitConfigError(
            f"early_exit.shortlist={where!r} is not a shortlist file (format {SHORTLIST_FORMAT!r} with a list of tokens)."
        )
    return data


def write_shortlist(path: str | Path, tokens: list[int], vocab_size: int, source: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": SHORTLIST_FORMAT, "version": SHORTLIST_VERSION, "vocab_size": vocab_size, "tokens": tokens,
        "source": source,
    }
    path.write_text(json.dumps(data) + "\n")
    return path


def check_shortlist(data: dict[str, Any], vocab_size: int, where: str) -> None:
    """Refuses a shortlist made for another vocabulary."""
    if data.get("vocab_size") != vocab_size or max(data["tokens"]) >= vocab_size or min(data["tokens"]) < 0:
        raise EarlyExitConfigError(
            f"early_exit.shortlist={where!r} was made for a vocabulary of {data.get('vocab_size')} tokens, "
            f"but the served model has {vocab_size}. Make one for this model with "
            "`python -m vllm_early_exit shortlist --model MODEL`."
        )
