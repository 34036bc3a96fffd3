"""The plan of a decode step: the runs of layers between decision points.

A decision point is a layer after which the step may change which rows run:
a check layer, the last layer of a request's depth budget, or the layer a
replayed row left at before a preemption (``replay.py``). Between two decision
points the step runs a *segment* of layers, the same for every row and with no
host involvement, so a segment can be one compiled unit (``groups.py``) and, on
a GPU, one CUDA graph. A skipped layer is a segment of its own: a pure-decode
step fills its K/V instead of running it. With a signal that reads the stream
entering a check layer (saturation, gates), a cut also precedes every check
layer.

The model's compiled groups are the segments of the engine's own decision
points (``engine_plan``). A step whose rows bring more decision points (a depth
budget or a replayed exit between two cuts) splits the segment that holds them;
those parts run layer by layer (``DecodeStep``), the others stay compiled.
The plan is plain Python, the same on every platform, and is tested on CPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Layers ``first..stop-1``, run (or, if ``skipped``, filled) for every row of the step."""

    first: int
    stop: int
    skipped: bool = False
    """A skipped layer (``skip_layers``): decode rows do not run it; its K/V comes from their stream."""
    check: bool = False
    """A check follows the segment's last layer."""
    decision: bool = False
    """A decision follows the segment's last layer (a check, a budget end, a replayed exit)."""
    reads_previous: bool = False
    """The check after it reads the stream entering its last layer (the segment is that one layer)."""

    @property
    def last(self) -> int:
        return self.stop - 1

    @property
    def bounds(self) -> tuple[int, int]:
        return self.first, self.stop


@dataclass(frozen=True)
class StepPlan:
    """The segments of one step, in layer order, covering ``start..end-1``."""

    segments: tuple[Segment, ...]

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return [s.bounds for s in self.segments]

    @property
    def decisions(self) -> list[int]:
        """The layers after which a decision follows."""
        return [s.last for s in self.segments if s.decision]


def plan(
    start: int,
    end: int,
    check_layers: Iterable[int],
    skip_layers: Iterable[int] = (),
    extra_points: Iterable[int] = (),
    cut_before_checks: bool = False,
) -> StepPlan:
    """The segments of layers ``start..end-1`` with decisions after ``check_layers`` and
    ``extra_points`` (budget ends, replayed exits), every skipped layer a segment of its own,
    and with ``cut_before_checks`` a cut before every check layer too.

    A decision after the last layer decides nothing (the stack ends there) and is dropped.
    """
    checks = {layer for layer in check_layers if start <= layer < end - 1}
    skipped = {layer for layer in skip_layers if start <= layer < end}
    points = checks | {layer for layer in extra_points if start <= layer < end - 1}
    cuts = {start, end} | {layer + 1 for layer in points}
    for layer in skipped:
        cuts.update((layer, layer + 1))
    if cut_before_checks:
        cuts.update(checks)
    edges = sorted(c for c in cuts if start <= c <= end)
    segments = []
    for first, stop in zip(edges, edges[1:]):
        last = stop - 1
        segments.append(
            Segment(
                first,
                stop,
                skipped=first in skipped,
                check=last in checks,
                decision=last in points,
                reads_previous=cut_before_checks and last in checks and first == last,
            )
        )
    return StepPlan(tuple(segments))
