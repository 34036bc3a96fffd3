"""Exit signals: per-row confidence read from a layer's logits.

Each signal is a small object with one method, ``confident(logits, threshold)``,
that returns a boolean per row; ``threshold`` is a number or one per row. The logits are those of the final norm and the
shared LM head applied to an intermediate layer's residual stream, so no
signal here adds parameters to the model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ExitSignal(ABC):
    """Turns logits ``[rows, vocab]`` into a confident/not-confident flag per row."""

    name: str

    @abstractmethod
    def confident(self, logits: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
        """Boolean tensor ``[rows]``: True where the row may leave at this layer."""


class MaxProbSignal(ExitSignal):
    """Top-1 softmax probability at least ``threshold``."""

    name = "max_prob"

    def confident(self, logits: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=-1)
        return probs.amax(dim=-1) >= threshold


class MarginSignal(ExitSignal):
    """Top-1 minus top-2 softmax probability at least ``threshold`` (CALM's margin)."""

    name = "margin"

    def confident(self, logits: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
        top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
        return (top2[:, 0] - top2[:, 1]) >= threshold


class EntropySignal(ExitSignal):
    """Entropy of the softmax distribution (nats) at most ``threshold``."""

    name = "entropy"

    def confident(self, logits: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
        return entropy <= threshold


_SIGNALS: dict[str, type[ExitSignal]] = {
    cls.name: cls for cls in (MaxProbSignal, MarginSignal, EntropySignal)
}


def make_signal(name: str) -> ExitSignal:
    """Builds the signal named in the settings (names are validated in ``config``)."""
    return _SIGNALS[name]()
