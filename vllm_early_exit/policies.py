"""Exit policies: how per-row confidence becomes one decision for the step.

vLLM runs one batch through the layer stack, so the step leaves at a layer as
a whole; the policy says when that is allowed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ExitPolicy(ABC):
    name: str

    @abstractmethod
    def should_exit(self, confident: torch.Tensor) -> bool:
        """``confident``: boolean ``[rows]``. True when the whole step may leave."""


class AllPolicy(ExitPolicy):
    """Strict consensus: every logits row must be confident."""

    name = "all"

    def should_exit(self, confident: torch.Tensor) -> bool:
        return bool(confident.all())


class QuorumPolicy(ExitPolicy):
    """Leave when at least a share ``quorum`` of the rows is confident."""

    name = "quorum"

    def __init__(self, quorum: float) -> None:
        self.quorum = quorum

    def should_exit(self, confident: torch.Tensor) -> bool:
        return bool(confident.float().mean() >= self.quorum)


def make_policy(name: str, quorum: float) -> ExitPolicy:
    """Builds the policy named in the settings (names are validated in ``config``)."""
    if name == "quorum":
        return QuorumPolicy(quorum)
    return AllPolicy()
