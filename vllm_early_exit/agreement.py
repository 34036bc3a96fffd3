"""How far early-exit outputs agree with full-depth outputs of the same prompts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def prefix_agreement(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """Share of the reference's tokens produced before the first divergence (1.0: identical)."""
    if not reference:
        return 1.0
    same = 0
    for a, b in zip(candidate, reference):
        if a != b:
            break
        same += 1
    return same / len(reference)


@dataclass(frozen=True)
class Agreement:
    identical: float
    """Share of outputs token-identical to the reference."""
    prefix: float
    """Mean share of tokens agreeing up to the first divergence."""

    @classmethod
    def of(cls, candidates: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> "Agreement":
        if len(candidates) != len(references) or not references:
            raise ValueError("agreement needs one candidate per reference output")
        pairs = list(zip(candidates, references))
        identical = sum(list(a) == list(b) for a, b in pairs) / len(pairs)
        prefix = sum(prefix_agreement(a, b) for a, b in pairs) / len(pairs)
        return cls(identical=identical, prefix=prefix)
