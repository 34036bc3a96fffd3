"""The plugin's two errors: a bad setting, and a model or engine setting early exit cannot run with."""

from __future__ import annotations

from typing import Any


class EarlyExitConfigError(ValueError):
    """An early-exit setting is invalid. The message names the key, the value, where the value
    came from (the engine settings, ``--early-exit-config``, a request's ``extra_args`` or
    ``vllm_xargs``) and what is allowed."""


class EarlyExitUnsupportedError(ValueError):
    """The model or an engine setting cannot be combined with early exit (the message says why)."""


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut short for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def invalid(key: str, value: Any, source: str, allowed: str) -> EarlyExitConfigError:
    """The one form of a bad-value message: ``KEY=VALUE in SOURCE is invalid: ALLOWED.``"""
    return EarlyExitConfigError(f"{key}={shown(value)} in {source} is invalid: {allowed}.")
