"""Exit signals: a confidence score per row, read at a check layer.

Each signal is a small object: ``score(reading)`` gives one number per row and
``confident(reading, threshold)`` compares it with the threshold in the
signal's direction (``higher_is_confident``). ``threshold`` is a number or one
per row. A ``LayerReading`` offers what a signal may read: the layer's residual
stream, the stream entering the layer, and the readout logits, computed only
when a signal asks for them (saturation never does, so it costs no LM-head product).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from vllm_early_exit.model_executor.early_exit.heads import ExitHeads, gate_features


class LayerReading:
    """What a check layer offers the signals, for the rows still running."""

    def __init__(
        self,
        layer: int,
        stream: torch.Tensor,
        previous: torch.Tensor | None,
        read_logits: Callable[[], torch.Tensor],
    ) -> None:
        self.layer = layer
        self.stream = stream
        """Residual stream after ``layer``: ``[rows, hidden]``."""
        self.previous = previous
        """Residual stream entering ``layer`` (None unless the signal asked for it)."""
        self._read_logits = read_logits
        self._logits: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor:
        """Next-token logits read at this layer (through its exit head when heads are loaded)."""
        if self._logits is None:
            self._logits = self._read_logits()
        return self._logits


class ExitSignal(ABC):
    name: str
    higher_is_confident: bool = True
    needs_previous: bool = False
    """True when the signal reads the stream entering the check layer."""
    reads_logits: bool = True
    """True when the signal reads the layer's logits (it costs an LM-head product)."""
    score_range: tuple[float, float] = (0.0, 1.0)
    """Smallest and largest score the signal can give."""

    def always_confident(self, threshold: float) -> bool:
        """True when no score can fail ``threshold`` (a forced exit): the check reads nothing."""
        low, high = self.score_range
        return threshold <= low if self.higher_is_confident else threshold >= high

    @abstractmethod
    def score(self, reading: LayerReading) -> torch.Tensor:
        """Float tensor ``[rows]``."""

    def confident(self, reading: LayerReading, threshold: float | torch.Tensor) -> torch.Tensor:
        """Boolean tensor ``[rows]``: True where the row may leave at this layer."""
        score = self.score(reading)
        return score >= threshold if self.higher_is_confident else score <= threshold


class MaxProbSignal(ExitSignal):
    """Top-1 softmax probability."""

    name = "max_prob"

    def score(self, reading: LayerReading) -> torch.Tensor:
        return torch.softmax(reading.logits.float(), dim=-1).amax(dim=-1)


class HeadSignal(MaxProbSignal):
    """Top-1 probability of the trained exit head (the readout goes through the head)."""

    name = "head"


class MarginSignal(ExitSignal):
    """Top-1 minus top-2 softmax probability (CALM's margin)."""

    name = "margin"

    def score(self, reading: LayerReading) -> torch.Tensor:
        top2 = torch.softmax(reading.logits.float(), dim=-1).topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]


class EntropySignal(ExitSignal):
    """Entropy of the softmax distribution, in nats; low entropy is confident."""

    name = "entropy"
    higher_is_confident = False
    score_range = (0.0, float("inf"))

    def score(self, reading: LayerReading) -> torch.Tensor:
        log_probs = torch.log_softmax(reading.logits.float(), dim=-1)
        return -(log_probs.exp() * log_probs).sum(dim=-1)


class SaturationSignal(ExitSignal):
    """Cosine similarity of the stream after the layer and the stream entering it.

    A layer that barely turns the stream has little left to add (CALM's state saturation).
    """

    name = "saturation"
    needs_previous = True
    reads_logits = False
    score_range = (-1.0, 1.0)

    def score(self, reading: LayerReading) -> torch.Tensor:
        return torch.cosine_similarity(reading.stream.float(), reading.previous.float(), dim=-1)


class GateSignal(ExitSignal):
    """A trained per-layer classifier's probability that this layer's token is the final one."""

    name = "gate"
    needs_previous = True

    def __init__(self, heads: ExitHeads) -> None:
        self.heads = heads

    def score(self, reading: LayerReading) -> torch.Tensor:
        features = gate_features(reading.logits, reading.stream, reading.previous)
        return self.heads.gate_probability(reading.layer, features)


_SIGNALS: dict[str, type[ExitSignal]] = {
    cls.name: cls for cls in (MaxProbSignal, MarginSignal, EntropySignal, SaturationSignal, HeadSignal)
}


def make_signal(name: str, heads: ExitHeads | None = None) -> ExitSignal:
    """Builds the signal named in the settings (names are validated in ``config``)."""
    if name == "gate":
        assert heads is not None, "signal 'gate' needs heads (checked in config)"
        return GateSignal(heads)
    return _SIGNALS[name]()

