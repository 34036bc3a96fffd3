"""Measurements that write as they go and resume: the one rule the long tools share.

A long run (``bench``, ``bench-serve``, ``oracle``, ``calibrate``) rewrites its results
file after every finished piece with ``write_json``, which replaces the file in one step,
so a crash or a time limit leaves the last complete file, never half of one. With
``--resume`` the run reads the file back with ``saved_results``, which hands it over only
when it was measured with the same settings and otherwise stops with each differing
setting and both of its values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any, *, indent: int | None = 2) -> None:
    """Writes ``data`` as JSON to ``path`` by replacing the file whole (a temporary file renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=indent) + "\n")
    os.replace(temporary, path)


def as_saved(value: Any) -> Any:
    """``value`` as a JSON file gives it back (lists for tuples, string keys)."""
    return json.loads(json.dumps(value))


def differing_settings(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """The keys of ``expected`` whose values ``saved`` does not hold."""
    expected = as_saved(expected)
    return [key for key in expected if saved.get(key) != expected[key]]


def with_reference(settings: Mapping[str, Any]) -> dict:
    """``settings`` with ``reference`` set, to ``model`` where none is named: results measured
    before ``--reference`` existed were measured against the model itself."""
    return {**settings, "reference": settings.get("reference") or settings.get("model")}


def saved_results(
    path: Path,
    expected: Mapping[str, Any],
    *,
    command: str,
    settings_of: Callable[[dict], Mapping[str, Any]] = lambda saved: saved,
) -> dict | None:
    """The results saved at ``path`` by a run with the ``expected`` settings; None when there are none.

    ``settings_of`` finds the run's settings in the saved file (default: its top level).
    A file written with other settings is refused with ``SystemExit`` naming each setting
    that differs, its value there and its value now."""
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{command} --resume: {path} is not a results file ({exc}); run without --resume.") from None
    settings = settings_of(saved) or {}
    differs = differing_settings(settings, expected)
    if differs:
        current = as_saved(expected)
        detail = "; ".join(f"{key}: {_short(settings.get(key))} there, {_short(current[key])} now" for key in differs)
        raise SystemExit(
            f"{command} --resume: {path} was measured with another {', '.join(differs)} ({detail}); "
            "use another --out or run without --resume."
        )
    return saved


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
