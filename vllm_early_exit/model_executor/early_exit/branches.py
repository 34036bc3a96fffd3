"""The branches of a decode step and the order the host takes them in: plain Python.

A step (``step.py``) is a chain of *branches*: device work that reads nothing on
the host and ends by writing one flag (``RowState.flag``). After a branch that
``reads_flag`` the host reads it and takes ``on_true`` or ``on_false``; after any
other branch it takes ``on_true``. ``BranchPlan.of`` builds the chain for a
``StepPlan`` and the kind of step:

* ``run`` (one per segment): its layers and, at a decision point, its check. A
  one-stage check decides at once (the flag: does any row still run); a check
  with a shortlist stops after its first stage (the flag: may some row leave);
* ``confirm`` (a shortlist check whose gate opened): the full-vocabulary
  confirmation and the exits (the flag: does any row still run);
* ``forced`` (a shortlist check whose gate stayed shut at a depth budget's end or
  beside a replayed row): the exits of those rows alone;
* ``exit`` (after a decision where no row runs any more): state propagation
  fills the deeper layers, then the final norm;
* ``finish``: the final norm after the last layer.

The same chain drives every way of running the step: eagerly (``DecodeStep``), one
CUDA graph per branch with a host read between them, or one graph whose flag reads
are conditional nodes (``graphs.py``). ``BranchPlan.walk`` gives the branches a step
takes for given flags, which is what the capture plan is checked with on CPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from vllm_early_exit.model_executor.early_exit.plan import Segment, StepPlan

RUN, CONFIRM, FORCED, EXIT, FINISH = "run", "confirm", "forced", "exit", "finish"
_KIND_ORDER = {RUN: 0, CONFIRM: 1, FORCED: 2, EXIT: 3, FINISH: 4}


@dataclass(eq=False)
class Branch:
    """One branch of a step; ``on_true`` / ``on_false``: the next branch (None: the step ends)."""

    kind: str
    segment: Segment | None = None
    reads_flag: bool = False
    on_true: Branch | None = None
    on_false: Branch | None = None
    gate: bool = False
    """A ``run`` that ends at a shortlist's first stage (its flag opens the confirmation)."""
    full_readout: bool = False
    """The branch reads the full vocabulary at its check (counted, and its exits keep their logits)."""
    decisions: int = 0
    """Decision points the branch reaches (a confirmation counts as one of its own)."""
    forced_point: bool = False
    """Rows may leave at the branch's decision without passing its check (a budget's end, a
    replayed exit)."""

    @property
    def layer(self) -> int | None:
        return None if self.segment is None else self.segment.last

    @property
    def name(self) -> str:
        if self.kind == FINISH:
            return FINISH
        if self.kind == RUN:
            return f"{RUN} {self.segment.first}-{self.segment.last}"
        return f"{self.kind} {self.layer}"

    def next(self, flag: bool | None) -> Branch | None:
        return self.on_false if self.reads_flag and not flag else self.on_true


def layer_order(branch: Branch) -> tuple[float, int]:
    """Branches sorted by this key come in an order the step can take them in: every branch
    before the ones it leads to."""
    return (float("inf") if branch.layer is None else branch.layer, _KIND_ORDER[branch.kind])


@dataclass
class BranchPlan:
    """The branches of one kind of step, from its first ``run``."""

    start: Branch
    branches: list[Branch] = field(default_factory=list)
    """Every branch a step can take, in ``layer_order``."""

    @classmethod
    def of(
        cls,
        plan: StepPlan,
        *,
        pure: bool,
        two_stage: bool,
        certain: bool,
        full_checks: Iterable[int] = (),
        forced_points: Iterable[int] = (),
    ) -> BranchPlan:
        """The chain for ``plan``.

        ``pure``: no prompt row (the stack may end early, so decisions read the running flag);
        ``two_stage``: checks have a shortlist stage; ``certain``: every row leaves at the first
        check whatever it reads (a forced exit), known on the host; ``full_checks``: the check
        layers whose readout is the full vocabulary; ``forced_points``: the decision layers
        where rows may leave without passing a check (budget ends, replayed exits)."""
        full_checks, forced_points = frozenset(full_checks), frozenset(forced_points)
        finish = Branch(FINISH)
        branches: list[Branch] = [finish]
        following: Branch = finish
        for segment in reversed(plan.segments):
            run = Branch(RUN, segment, on_true=following, decisions=int(segment.decision))
            branches.append(run)
            if segment.decision:
                after = cls._after_decision(segment, following, pure, certain and segment.check, branches)
                reads = segment.check and not certain
                if reads and two_stage:
                    confirm = Branch(
                        CONFIRM, segment, full_readout=segment.last in full_checks, decisions=1,
                        forced_point=segment.last in forced_points, **after,
                    )
                    branches.append(confirm)
                    shut = following
                    if segment.last in forced_points:
                        shut = Branch(FORCED, segment, **after)
                        branches.append(shut)
                    run.reads_flag, run.gate, run.on_true, run.on_false = True, True, confirm, shut
                else:
                    run.full_readout = reads and segment.last in full_checks
                    for key, value in after.items():
                        setattr(run, key, value)
            following = run
        return cls(following, sorted(cls._reachable(following), key=layer_order))

    @staticmethod
    def _after_decision(
        segment: Segment, following: Branch, pure: bool, every_row_left: bool, branches: list[Branch]
    ) -> dict:
        """How the branch that makes a decision's exits goes on: in a pure-decode step, to the next
        segment while some row runs, else to the ``exit`` branch; in a step with prompt rows, on."""
        if not pure:
            return {"on_true": following}
        leave = Branch(EXIT, segment)
        branches.append(leave)
        if every_row_left:
            return {"on_true": leave}
        return {"reads_flag": True, "on_true": following, "on_false": leave}

    def walk(self, flags: Iterable[bool]) -> Iterator[Branch]:
        """The branches a step takes when the host reads ``flags``, in order."""
        flags = iter(flags)
        branch: Branch | None = self.start
        while branch is not None:
            yield branch
            branch = branch.next(next(flags) if branch.reads_flag else None)

    @property
    def flag_reads(self) -> int:
        """The most flags one step reads (the longest path through the chain, counted in reads)."""
        most: dict[int, int] = {}
        for branch in reversed(self.branches):  # every successor comes first
            after = [most.get(id(b), 0) for b in (branch.on_true, branch.on_false if branch.reads_flag else None) if b]
            most[id(branch)] = branch.reads_flag + max(after, default=0)
        return most[id(self.start)]

    @staticmethod
    def _reachable(start: Branch) -> list[Branch]:
        """The branches a step can take from ``start``."""
        seen: dict[int, Branch] = {}
        todo = [start]
        while todo:
            branch = todo.pop()
            if branch is None or id(branch) in seen:
                continue
            seen[id(branch)] = branch
            todo.extend((branch.on_true, branch.on_false))
        return list(seen.values())
