"""The rules every early-exit setting follows, the engine's and a request's own.

Where a value came from (``SOURCES``: every message names it), the signals and the range
each reads its threshold in (``THRESHOLD_RANGES``: an engine's ``threshold`` and a request's
own are checked against the same table), the checks of a value's type, and the message of
a refused value (``fail``). The engine's settings (``config.py``) and a request's own
(``request_settings.py``) are both built on these.
"""

from __future__ import annotations

import math
from typing import Any

from vllm_early_exit.errors import EarlyExitConfigError, invalid

CONFIG_KEY = "early_exit"

# Where a value came from, as the error messages say it.
ENGINE_SETTINGS = "the engine settings"
EARLY_EXIT_CONFIG_OPTION = "--early-exit-config"
ADDITIONAL_CONFIG_OPTION = "--additional-config"
REQUEST_EXTRA_ARGS = "the request's extra_args"
REQUEST_VLLM_XARGS = "the request's vllm_xargs"
SOURCES = (ENGINE_SETTINGS, EARLY_EXIT_CONFIG_OPTION, ADDITIONAL_CONFIG_OPTION, REQUEST_EXTRA_ARGS, REQUEST_VLLM_XARGS)

# Signal name -> how ``threshold`` is read for it.
SIGNALS: dict[str, str] = {
    "max_prob": "exit when the top-1 probability >= threshold (0 <= threshold <= 1)",
    "margin": "exit when top-1 minus top-2 probability >= threshold (0 <= threshold <= 1)",
    "entropy": "exit when the entropy of the distribution (nats) <= threshold (threshold >= 0)",
    "saturation": "exit when the cosine similarity of this layer's residual stream and the previous "
    "layer's >= threshold (-1 <= threshold <= 1); needs no LM-head product",
    "head": "exit when the trained exit head's top-1 probability >= threshold (0 <= threshold <= 1); "
    "needs `heads`",
    "gate": "exit when the trained gate's probability that this layer's token is the final one "
    ">= threshold (0 <= threshold <= 1); needs `heads` trained with gates",
}

# Signal -> (lowest, highest threshold, what the message says).
_PROBABILITY = (0.0, 1.0, "it must lie in [0, 1]")
THRESHOLD_RANGES: dict[str, tuple[float, float, str]] = {
    "max_prob": _PROBABILITY,
    "margin": _PROBABILITY,
    "head": _PROBABILITY,
    "gate": _PROBABILITY,
    "saturation": (-1.0, 1.0, "(a cosine similarity) it must lie in [-1, 1]"),
    "entropy": (0.0, math.inf, "it must be >= 0 (nats)"),
}


def fail(key: str, value: Any, allowed: str, source: str = ENGINE_SETTINGS) -> EarlyExitConfigError:
    """The error for ``early_exit.KEY`` = ``value`` from ``source``, saying what is allowed."""
    return invalid(f"early_exit.{key}", value, source, allowed)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool, not an int too large for a float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
