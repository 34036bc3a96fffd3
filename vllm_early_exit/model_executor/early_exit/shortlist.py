"""A static token shortlist: the first, cheap stage of a two-stage exit check.

A shortlist file (written by ``python -m vllm_early_exit shortlist``) names the
tokens a model emits most often. With ``shortlist`` set, a check first reads the
signal over the logits of those tokens only (a few percent of the LM head); only
rows that pass go on to the full-vocabulary readout, and a row leaves only when
that confirmation passes too. Over the shortlist, the top-1 probability of a
token is at least its probability over the whole vocabulary, so a row that the
full check would let leave passes the first stage whenever its top token is on
the shortlist: the two stages leave no later than the full check alone, never
earlier.

The file: ``{"format": "vllm-early-exit-shortlist", "version": 1,
"vocab_size": V, "tokens": [ids, most frequent first], "source": {...}}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vllm_early_exit.errors import EarlyExitConfigError
from vllm_early_exit.model_executor.early_exit.gemm import platform_linear

FORMAT = "vllm-early-exit-shortlist"
VERSION = 1


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
    if data.get("format") != FORMAT or not isinstance(tokens, list) or not tokens:
        raise EarlyExitConfigError(
            f"early_exit.shortlist={where!r} is not a shortlist file (format {FORMAT!r} with a list of tokens)."
        )
    return data


def write_shortlist(path: str | Path, tokens: list[int], vocab_size: int, source: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "version": VERSION, "vocab_size": vocab_size, "tokens": tokens, "source": source}
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


class Shortlist:
    """The shortlist's rows of the LM head, gathered once (after the weights are loaded) and
    multiplied through the platform's GEMM for linear layers (``gemm.py``)."""

    def __init__(self, path: str) -> None:
        self.tokens = torch.tensor(read_shortlist(path)["tokens"], dtype=torch.long)
        self._dtype: torch.dtype | None = None
        self._linear: Callable[[torch.Tensor], torch.Tensor] | None = None

    def prepare(self, lm_head: torch.nn.Module) -> None:
        """Gathers and packs the shortlist's rows of ``lm_head`` (once)."""
        if self._linear is None:
            full = lm_head.weight
            self._dtype = full.dtype
            self._linear = platform_linear(full[self.tokens.to(full.device)].contiguous())

    def logits(self, hidden: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
        """``[rows, len(tokens)]``: the logits of these tokens (without the logits scale)."""
        self.prepare(lm_head)
        return self._linear(hidden.to(self._dtype))
