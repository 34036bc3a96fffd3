"""Scores of the quality benchmark: ROUGE-L on token ids, :class:`Point`, the frontier and operating points."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field


TARGETS = (0.9, 0.95, 0.99)
"""Token-agreement targets of the frontier table."""
OPERATING_TARGET = 0.95
"""An operating point (HumanEval, histogram) is the lowest-depth point with at least this agreement."""
DEPTH_TARGET = 0.8


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F1 of ``candidate`` against ``reference`` on token ids (1.0: identical)."""
    if list(candidate) == list(reference):
        return 1.0
    if not candidate or not reference:
        return 0.0
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@dataclass
class Point:
    """One operating point: a method at one setting, scored against full depth."""

    signal: str
    setting: float | list[int] | None
    """The threshold, the skip set, or None for full depth."""
    num_layers: int
    mean_layers: float
    """Layers computed per decode token; decode tokens the counters did not see
    (they shared a step with a prefill, which runs the full depth) count as full depth."""
    identical: float
    prefix: float
    token_agreement: float
    rouge_l: float
    exits_per_layer: list[int] = field(default_factory=list)
    full_depth_tokens: int = 0
    decode_tokens: int = 0
    counted_decode_tokens: int = 0
    output_tokens: int = 0
    exit_layers: list[int] | None = None

    @property
    def depth(self) -> float:
        return self.mean_layers / self.num_layers

    @property
    def label(self) -> str:
        if self.setting is None:
            return "full depth"
        if isinstance(self.setting, list):
            return "skip " + ",".join(map(str, self.setting))
        return f"{self.signal} {self.setting:g}"

    def to_dict(self) -> dict:
        return asdict(self) | {"depth": self.depth, "label": self.label}


def frontier(points: Sequence[Point], targets: Sequence[float] = TARGETS) -> dict[str, dict[str, dict | None]]:
    """Per signal and target: the point with the lowest mean depth whose token agreement reaches
    it (None when only points that never left early do)."""
    table: dict[str, dict[str, dict | None]] = {}
    for signal in dict.fromkeys(p.signal for p in points if p.setting is not None):
        mine = [p for p in points if p.signal == signal]
        table[signal] = {}
        for target in targets:
            best = pick_operating_point(mine, target)
            table[signal][str(target)] = None if best is None else {
                "setting": best.setting, "depth": best.depth, "mean_layers": best.mean_layers,
                "token_agreement": best.token_agreement,
            }
    return table


def pick_operating_point(points: Sequence[Point], target: float = OPERATING_TARGET) -> Point | None:
    """The lowest-depth point of one method whose token agreement reaches ``target``
    (None when none does below full depth)."""
    ok = [p for p in points if p.token_agreement >= target and p.setting is not None and p.mean_layers < p.num_layers]
    return min(ok, key=lambda p: (p.mean_layers, -p.token_agreement), default=None)
