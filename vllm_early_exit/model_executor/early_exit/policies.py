"""Exit policies: which rows leave at a check layer, given which rows are confident.

``all`` and ``quorum`` decide for the whole step (vLLM runs one batch through
the stack); ``per_token`` lets each confident row leave on its own while the
others go on, so a request's depth no longer depends on what it is batched with.

A policy sees every row of the step (fixed shapes): ``deciding`` marks the rows
whose vote counts (decode rows still running), and only they can leave.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ExitPolicy(ABC):
    name: str
    per_row: bool = False
    """True when rows leave one by one; False when the step leaves as a whole."""

    @abstractmethod
    def rows_to_exit(self, confident: torch.Tensor, deciding: torch.Tensor) -> torch.Tensor:
        """``confident``, ``deciding``: boolean ``[rows]``. Returns the rows that leave (within ``deciding``)."""


class AllPolicy(ExitPolicy):
    """Strict consensus: every deciding row must be confident."""

    name = "all"

    def rows_to_exit(self, confident: torch.Tensor, deciding: torch.Tensor) -> torch.Tensor:
        return deciding & (confident | ~deciding).all()


class QuorumPolicy(ExitPolicy):
    """Leave when at least a share ``quorum`` of the deciding rows is confident."""

    name = "quorum"

    def __init__(self, quorum: float) -> None:
        self.quorum = quorum

    def rows_to_exit(self, confident: torch.Tensor, deciding: torch.Tensor) -> torch.Tensor:
        share = (confident & deciding).sum() / deciding.sum().clamp(min=1)
        return deciding & (share >= self.quorum)


class PerTokenPolicy(ExitPolicy):
    """Each confident row leaves; the rest continue."""

    name = "per_token"
    per_row = True

    def rows_to_exit(self, confident: torch.Tensor, deciding: torch.Tensor) -> torch.Tensor:
        return confident & deciding


def make_policy(name: str, quorum: float) -> ExitPolicy:
    """Builds the policy named in the settings (names are validated in ``config``)."""
    if name == "quorum":
        return QuorumPolicy(quorum)
    if name == "per_token":
        return PerTokenPolicy()
    return AllPolicy()
