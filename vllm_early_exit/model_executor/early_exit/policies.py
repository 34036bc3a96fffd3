"""Exit policies: which rows leave at a check layer, given which rows are confident.

``all`` and ``quorum`` decide for the whole step (vLLM runs one batch through
the stack); ``per_token`` lets each confident row leave on its own while the
others go on, so a request's depth no longer depends on what it is batched with.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ExitPolicy(ABC):
    name: str
    per_row: bool = False
    """True when rows leave one by one; False when the step leaves as a whole."""

    @abstractmethod
    def rows_to_exit(self, confident: torch.Tensor) -> torch.Tensor:
        """``confident``: boolean ``[rows]`` of the rows still running. Returns the rows that leave."""


class AllPolicy(ExitPolicy):
    """Strict consensus: every logits row must be confident."""

    name = "all"

    def rows_to_exit(self, confident: torch.Tensor) -> torch.Tensor:
        return confident.all().expand_as(confident)


class QuorumPolicy(ExitPolicy):
    """Leave when at least a share ``quorum`` of the rows is confident."""

    name = "quorum"

    def __init__(self, quorum: float) -> None:
        self.quorum = quorum

    def rows_to_exit(self, confident: torch.Tensor) -> torch.Tensor:
        return (confident.float().mean() >= self.quorum).expand_as(confident)


class PerTokenPolicy(ExitPolicy):
    """Each confident row leaves; the rest continue."""

    name = "per_token"
    per_row = True

    def rows_to_exit(self, confident: torch.Tensor) -> torch.Tensor:
        return confident


def make_policy(name: str, quorum: float) -> ExitPolicy:
    """Builds the policy named in the settings (names are validated in ``config``)."""
    if name == "quorum":
        return QuorumPolicy(quorum)
    if name == "per_token":
        return PerTokenPolicy()
    return AllPolicy()
