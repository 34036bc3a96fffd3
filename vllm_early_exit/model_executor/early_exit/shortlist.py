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

from collections.abc import Callable

import torch

from vllm_early_exit.files import (  # the file format lives in the leaf module the settings read too
    SHORTLIST_FORMAT as FORMAT,
    SHORTLIST_VERSION as VERSION,
    check_shortlist,
    read_shortlist,
    write_shortlist,
)
from vllm_early_exit.model_executor.early_exit.gemm import platform_linear

__all__ = ["FORMAT", "VERSION", "Shortlist", "check_shortlist", "read_shortlist", "write_shortlist"]


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
