"""A step with decode rows: run a segment, check, leave or go on.

``DecodeStep.run`` walks the segments of a ``StepPlan`` (``plan.py``) over a
``RowState`` (``rows.py``). Every row stays in the step to its end and every
tensor keeps the step's shape; a segment runs its layers for every row, with the
rows that left held at their exit stream. The step is a chain of *branches*
(``branches.py``): device work that reads nothing on the host, updates the row
state in place and ends by writing one flag (``DecodeStep.work``):

* ``run``: a segment's layers, then, at a decision point, its check
  (``decision``): the signal reads every row (``checks.py``), the policy picks
  the rows that leave (with depth budgets and replayed exits),
  ``rows.leave_rows`` records the exits, and the flag says whether any row
  still runs. With a shortlist the check stops after its first stage (``gate``),
  and the flag says whether some row may leave. Compiled, the segment's layers
  and its check (the first stage, or the whole one-stage decision with its
  exits) are one unit (``groups.CheckedGroup``, ``stage``) whose outputs become
  the rows' state: one call and one read per decision point;
* ``confirm`` (a shortlist): the full-vocabulary confirmation, then the exits (compiled,
  one unit when it reads every row: ``units.ConfirmBranch``, ``confirmation``);
* ``forced`` (a shortlist's gate stayed shut): the exits of budgets and replays;
* ``exit``: every row has left after layer L: the deeper layers get their K/V by
  state propagation (``kv_fill.KVPropagator``), then the final norm;
* ``finish``: the final norm after the last layer.

``DecodeStep.run`` is the host's part: it takes a branch, reads the flag when the
branch asks for it (``RowState.read_flag``, the step's only wait for the device:
once per decision point, a shortlist's confirmation counted as a decision of its
own) and picks the next branch. On a GPU the same branches are CUDA graphs
(``graphs.py``). What the host knows without a read it does not read: a forced
exit every row takes, and in a step that also computes prompt tokens the stack
never ends early, so the host reads only a shortlist's gate there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vllm_early_exit.model_executor.early_exit.branches import CONFIRM, EXIT, FINISH, FORCED, RUN, Branch, BranchPlan
from vllm_early_exit.model_executor.early_exit.checks import ExitCheck
from vllm_early_exit.model_executor.early_exit.groups import CompiledStack
from vllm_early_exit.model_executor.early_exit.kv_fill import KVPropagator, run_layers_holding
from vllm_early_exit.model_executor.early_exit.plan import Segment, StepPlan
from vllm_early_exit.model_executor.early_exit.policies import ExitPolicy
from vllm_early_exit.model_executor.early_exit.requests import RowSettings
from vllm_early_exit.model_executor.early_exit.rows import RowState, finished, lead, leave_rows, pin
from vllm_early_exit.model_executor.early_exit.stats import ExitCounters


@dataclass
class StepLog:
    """What the host knows of a step after its walk."""

    pure: bool
    rows: int
    decisions: int = 0
    """Decision points reached, a shortlist's confirmation counted as one of its own."""
    host_reads: int = 0
    """Flags the host read."""
    ended_after: int | None = None
    """The layer after which every row had left (None: the step reached the last layer)."""
    exits_without_logits: bool = False
    """Some decision let rows leave without reading their full-vocabulary logits."""

    @property
    def logits_complete(self) -> bool:
        """Every row left with its sampling logits (the LM head need not run for this step)."""
        return self.pure and self.ended_after is not None and not self.exits_without_logits


class DecodeStep:
    """Walks a step's rows down layers ``start..end-1`` (see the module docstring)."""

    def __init__(
        self,
        layers: Sequence[nn.Module],
        start: int,
        end: int,
        check: ExitCheck,
        policy: ExitPolicy,
        kv: KVPropagator,
        counters: ExitCounters,
        norm: nn.Module,
        stack: CompiledStack | None = None,
        fills_exits: bool = True,
    ) -> None:
        self.layers, self.start, self.end = layers, start, end
        self.check, self.policy, self.kv, self.counters, self.norm = check, policy, kv, counters, norm
        self.stack = stack
        self.fills_exits = fills_exits
        """When every row has left, the deeper layers get K/V by state propagation; False in an engine
        that catches up (``skipped_kv: "recompute"``): every row then waits, and no token reads those
        layers at its position before its request's next step has run it there again."""
        self.first_check = min(check.check_layers, default=None)
        """The step's first check reads the full vocabulary (``vocab_top_k`` keeps its top tokens)."""
        self._branches: dict[tuple, BranchPlan] = {}

    @property
    def full_checks(self) -> frozenset[int]:
        """The check layers whose readout is the full vocabulary (with ``vocab_top_k``, the first)."""
        check = self.check
        if not check.signal.reads_logits:
            return frozenset()
        return frozenset(layer for layer in check.check_layers if check.reads_full_logits(layer == self.first_check))

    def certain(self, rows: RowState) -> bool:
        """Every row leaves at the first check whatever it reads (a forced exit, no request
        threshold of its own, no request with early exit off): known on the host."""
        return self.certain_of(rows.settings)

    def certain_of(self, settings: RowSettings) -> bool:
        return self.check.certain(settings.own_thresholds) and not settings.any_off

    def branches(self, plan: StepPlan, rows: RowState, forced_points: frozenset[int]) -> BranchPlan:
        """The branch chain of this step (``branches.py``), made once per kind of step."""
        key = (plan, rows.pure, self.certain(rows), forced_points)
        if key not in self._branches:
            self._branches[key] = BranchPlan.of(
                plan, pure=rows.pure, two_stage=self.check.two_stage, certain=key[2],
                full_checks=self.full_checks, forced_points=forced_points,
            )
        return self._branches[key]

    # --- the executor: the host's part ---------------------------------------------------

    def run(self, branches: BranchPlan, rows: RowState, log: StepLog) -> torch.Tensor:
        """The stack's output for every row: its last stream through the final norm."""
        branch: Branch | None = branches.start
        width = None
        while branch is not None:
            self.count(branch, log)
            self.tally(branch, log.pure)
            self.work(branch, rows, width)
            flag = None
            if branch.reads_flag:
                log.host_reads += 1
                if branch.gate:  # the confirmation reads just the rows that passed
                    width = rows.read_count()
                    flag = width > 0
                else:
                    flag = rows.read_flag()
            branch = branch.next(flag)
        return rows.output

    def count(self, branch: Branch, log: StepLog) -> None:
        """What the host learns of the step by taking ``branch``."""
        log.decisions += branch.decisions
        if branch.kind == CONFIRM:
            # A confirmation reads the rows that passed the first stage: rows that a budget or
            # a quorum takes along leave without their logits.
            unread = branch.forced_point or self.policy.name == "quorum"
            log.exits_without_logits |= unread or not branch.full_readout
        elif branch.kind == RUN and branch.segment.decision:
            log.exits_without_logits |= not branch.gate and not branch.full_readout
        elif branch.kind == FORCED:
            log.exits_without_logits = True
        elif branch.kind == EXIT:
            log.ended_after = branch.layer

    def tally(self, branch: Branch, pure: bool) -> None:
        """The engine's counters of taking ``branch`` (``graphs.ProgramRun.fold`` counts the same
        on the device when the host does not walk the branches)."""
        self.counters.full_readouts += branch.full_readout
        if branch.kind == EXIT:
            self.counters.step(branch.layer)
        elif branch.kind == FINISH and pure:
            self.counters.step(None)

    # --- the branches: device work, no host read -----------------------------------------

    def work(self, branch: Branch, rows: RowState, width: int | None = None) -> None:
        """One branch's device work: it reads nothing on the host, updates ``rows`` in place and
        ends by writing ``rows.flag`` (``exit`` and ``finish``: ``rows.output``). ``width``: how many
        rows a confirmation reads, as its gate counted them (None: every row, as a graph does)."""
        if branch.kind == RUN:
            self.segment(branch.segment, rows, gate=branch.gate)
        elif branch.kind == CONFIRM:
            self.confirm(branch.segment, rows, width)
        elif branch.kind == FORCED:
            self.leave_forced(branch.layer, rows)
        elif branch.kind == EXIT:
            self.exit(branch.layer, rows)
        else:
            self.finish(rows)

    def segment(self, segment: Segment, rows: RowState, gate: bool = False) -> None:
        """The segment's layers for every row (frozen rows held at their stream), then its
        decision, or with ``gate`` its check's first stage."""
        inputs = self.fused_inputs(segment, rows, gate)
        if inputs is not None:  # the segment's layers and its check as one compiled unit
            rows.take(**self.stack.run_checked(segment.bounds, rows.positions, **inputs))
            return
        if segment.reads_previous:
            rows.previous.copy_(rows.stream())
        self.run_layers(segment, rows)
        if gate:
            self.first_stage(segment, rows)
        elif segment.decision:
            self.decide(segment, rows)

    def fused_inputs(self, segment: Segment, rows: RowState, gate: bool) -> dict[str, torch.Tensor | None] | None:
        """The row tensors of the compiled unit (``groups.CheckedGroup``) that runs the segment and
        its check, by name, or None where the step runs them apart. A unit serves a segment of
        the engine's plan that ends at a check, at no depth budget's end; a
        one-stage check (``stage``) only in a pure-decode step without replayed rows or rows that
        ride along with their group's last row (``skipped_kv: "recompute"``), whose
        certainty is the engine's own (a forced exit every row takes, or no request threshold
        making one read; requests that turned early exit off are rows the unit's ``allowed``
        keeps from leaving), reading no pruned vocabulary, with the row tensors the unit was compiled for
        (``CheckedGroup.accepts``)."""
        stack, check = self.stack, self.check
        if stack is None or not stack.has_checked(segment.bounds) or segment.last in rows.settings.budget_layers:
            return None
        if not gate and (
            check.two_stage or not rows.plain
            or self.certain(rows) != check.always_confident
            or (check.vocab_top_k is not None and not check.always_confident)
        ):
            return None
        inputs = rows.check_inputs()
        if gate:
            return inputs
        inputs.update(self.decision_inputs(rows))
        return inputs if stack.checked[segment.bounds].accepts(inputs) else None

    def decision_inputs(self, rows: RowState) -> dict[str, torch.Tensor | None]:
        """What a decision's exits update besides the stream (``units.DECISION_ARGS``), by name."""
        return {"depths": rows.depths, "counts": self.counters.rows, "logits": rows.logits, "taken": rows.taken,
                "emitted": rows.emitted, "emits": rows.emits}

    def stage(
        self, layer: int, stream: torch.Tensor, previous: torch.Tensor | None, state: dict[str, torch.Tensor | None],
        counts: torch.Tensor | None, allowed: torch.Tensor, thresholds: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """What a compiled unit (``groups.CheckedGroup``) computes after its layers: a shortlist's
        first stage (``gate``) when its check has one, else the whole decision (``decision``; a
        forced exit's reads nothing); the new row tensors by name (``RowState.take``)."""
        check = self.check
        if check.two_stage:
            passing, count = self.gate(layer, stream, previous, state["running"], state["live"], allowed, thresholds)
            out = {"passing": passing, "count": count, "flag": count > 0}
            return out if previous is None else {**out, "previous": previous}
        certain = check.always_confident
        return self.decision(
            layer, stream, previous, state, counts, allowed, thresholds, reads=not certain, certain=certain
        )

    def run_layers(self, segment: Segment, rows: RowState) -> None:
        keep = rows.keep
        if segment.skipped:
            if rows.pure:  # no row runs a skipped layer: its K/V comes from the stream
                self.kv.fill(rows.positions, rows.stream(), segment.first, segment.stop)
                return
            keep = keep * (~rows.decode).unsqueeze(1)  # prompt rows run it; decode rows pass at their stream
        if self.stack is not None and self.stack.has(segment.bounds):
            out = self.stack.run(segment.bounds, rows.positions, rows.hidden_states, rows.residual, keep)
        else:
            layers = self.layers[segment.first : segment.stop]
            out = run_layers_holding(layers, rows.positions, rows.hidden_states, rows.residual, keep)
        rows.advance(*out)

    def decide(self, segment: Segment, rows: RowState) -> None:
        """A one-stage decision, eagerly (``decision``); ``rows.flag``: does any row still run."""
        settings = rows.settings
        forced = rows.forced(segment.last) if segment.last in settings.budget_layers else None
        certain = segment.check and self.certain(rows)
        out = self.decision(
            segment.last, rows.stream(), rows.previous, rows.state(), self.counters.rows, settings.allowed,
            settings.thresholds, reads=segment.check and not certain, certain=certain, forced=forced,
            pinned=rows.pinned, pure=rows.pure, leaders=rows.leaders,
        )
        rows.flag.copy_(out.pop("flag"))  # in place, as ``RowState.leave`` writes it
        rows.take(**out)

    def decision(
        self, layer: int, stream: torch.Tensor, previous: torch.Tensor | None, state: dict[str, torch.Tensor | None],
        counts: torch.Tensor, allowed: torch.Tensor, thresholds: torch.Tensor, *, reads: bool = True,
        certain: bool = False, forced: torch.Tensor | None = None, pinned: torch.Tensor | None = None,
        pure: bool = True, leaders: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """A one-stage decision after ``layer``, tensors in and out (the one definition the eager
        step and the compiled unit ``groups.CheckedGroup`` share): with ``reads`` the check's
        reading of every row (``certain``: every row is confident), the policy with ``forced``
        rows (a depth budget's end), ``pinned`` ones (replayed exits) and rows that leave with their
        ``leaders``, then the exits (``rows.leave_rows``); the new row tensors, ``flag``: does any row
        still run."""
        running = state["running"]
        exit_stream = self.check.exit_stream(layer, stream) if (reads or certain) and self.check.heads is not None else None
        confident, logits = torch.zeros_like(running), None
        if certain:
            confident = torch.ones_like(running)
        elif reads:
            reading = self.check.read(
                layer, stream, stream if exit_stream is None else exit_stream, previous, thresholds,
                first=layer == self.first_check,
            )
            confident, logits = reading.confident, reading.logits
        leave = self.leaving(layer, confident & allowed, running, state["live"], forced, pinned, leaders)
        return leave_rows(state, counts, leave, layer, stream, logits if pure else None, exit_stream)

    def leaving(
        self, layer: int, votes: torch.Tensor, running: torch.Tensor, live: torch.Tensor,
        forced: torch.Tensor | None, pinned: torch.Tensor | None, leaders: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The rows that leave after ``layer``: the policy over the deciding rows' ``votes`` and
        the ``forced`` ones, replayed rows at their recorded layer, every row with its leader."""
        if forced is not None:
            votes = votes | forced
        return lead(pin(self.policy.rows_to_exit(votes, running & live), pinned, running, layer), leaders)

    def first_stage(self, segment: Segment, rows: RowState) -> None:
        """A shortlist's first stage, eagerly (``gate``)."""
        layer, settings = segment.last, rows.settings
        forced = rows.forced(layer) if layer in settings.budget_layers else None
        passing, count = self.gate(
            layer, rows.stream(), rows.previous, rows.running, rows.live, settings.allowed, settings.thresholds, forced,
        )
        rows.passing.copy_(passing)
        rows.count.copy_(count)
        rows.flag.copy_(count > 0)

    def gate(
        self, layer: int, stream: torch.Tensor, previous: torch.Tensor | None, running: torch.Tensor,
        live: torch.Tensor, allowed: torch.Tensor, thresholds: torch.Tensor, forced: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A shortlist's first stage after ``layer``, tensors in and out (the one definition the
        eager step and the compiled unit ``groups.CheckedGroup`` share): the rows that pass it
        (``rows.passing``) and how many of them the policy lets through (``rows.count``; the gate
        is open when it is not 0), ``forced`` rows (a depth budget's end) voting with them."""
        exit_stream = stream if self.check.heads is None else self.check.exit_stream(layer, stream)
        deciding = running & live
        passing = self.check.first_stage(layer, stream, exit_stream, previous, thresholds) & allowed & deciding
        votes = passing if forced is None else passing | forced
        gate = self.policy.rows_to_exit(votes, deciding) & passing
        return passing, gate.sum()

    def confirm(self, segment: Segment, rows: RowState, width: int | None = None) -> None:
        """A shortlist's confirmation: the full readout of the rows that passed the first stage
        (``width`` of them, gathered; None: every row), confident where both stages are, then the
        exits; ``rows.flag``: does any row still run."""
        inputs = self.confirm_inputs(segment, rows, width)
        if inputs is not None:  # every row read, as one compiled unit
            rows.take(**self.stack.run_confirm(segment.last, rows.positions, **inputs))
            return
        stream = rows.stream()
        exit_stream = self.exit_stream(segment, stream)
        if width is None:
            confident, logits = self.read(segment, rows, stream, exit_stream)
            self.leave(segment.last, rows, confident & rows.passing, stream, logits, exit_stream)
            return
        # The passing rows first (a stable sort of a 0/1 key), then the first ``width`` of them.
        read = torch.argsort((~rows.passing).to(torch.int8), stable=True)[:width]
        confident_read, logits = self.read(segment, rows, stream, exit_stream, read)
        confident = torch.zeros_like(rows.passing).index_copy_(0, read, confident_read)
        self.leave(segment.last, rows, confident & rows.passing, stream, logits, exit_stream, read)

    def confirm_inputs(
        self, segment: Segment, rows: RowState, width: int | None
    ) -> dict[str, torch.Tensor | None] | None:
        """The row tensors of the compiled confirmation (``units.ConfirmBranch``) by name, or None
        where it runs eagerly: the unit reads every row, so it serves a confirmation of them all in
        a pure-decode step with no replayed or group rows, no budget's end here, and the tensors
        it was compiled for (``accepts``)."""
        stack = self.stack
        if (
            stack is None or segment.last not in stack.confirms or segment.last in rows.settings.budget_layers
            or not rows.plain or (width is not None and width < rows.running.shape[0])
        ):
            return None
        inputs = {**rows.check_inputs(), **self.decision_inputs(rows), "passing": rows.passing,
                  "previous": rows.previous}
        return inputs if stack.confirms[segment.last].accepts(inputs) else None

    def confirmation(self, layer: int, previous: torch.Tensor | None, passing: torch.Tensor, state: dict,
                     counts: torch.Tensor, allowed: torch.Tensor, thresholds: torch.Tensor) -> dict[str, torch.Tensor]:
        """A shortlist's confirmation of every row after ``layer``, tensors in and out (what the
        compiled unit ``units.ConfirmBranch`` runs): the one-stage ``decision`` over the full
        vocabulary, where only rows that ``passing`` the first stage may leave."""
        stream = state["hidden_states"] + state["residual"]
        return self.decision(layer, stream, previous, state, counts, allowed & passing, thresholds)

    def read(
        self, segment: Segment, rows: RowState, stream: torch.Tensor, exit_stream: torch.Tensor | None,
        read: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The check's verdict and the full-vocabulary logits it read (or None), of every row or
        of the rows ``read``."""
        readout_stream = stream if exit_stream is None else exit_stream
        previous, thresholds = rows.previous, rows.settings.thresholds
        if read is not None:
            stream, readout_stream, thresholds = stream[read], readout_stream[read], thresholds[read]
            previous = None if previous is None else previous[read]
        reading = self.check.read(
            segment.last, stream, readout_stream, previous, thresholds, first=segment.last == self.first_check,
        )
        return reading.confident, reading.logits

    def leave_forced(self, layer: int, rows: RowState) -> None:
        """The rows a budget or a pin makes leave after ``layer`` when no row passed the first stage."""
        self.leave(layer, rows, torch.zeros_like(rows.running), rows.stream(), None, None)

    def leave(
        self, layer: int, rows: RowState, confident: torch.Tensor, stream: torch.Tensor,
        logits: torch.Tensor | None, exit_stream: torch.Tensor | None, read: torch.Tensor | None = None,
    ) -> None:
        settings = rows.settings
        forced = rows.forced(layer) if layer in settings.budget_layers else None
        leave = self.leaving(
            layer, confident & settings.allowed, rows.running, rows.live, forced, rows.pinned, rows.leaders
        )
        rows.leave(leave, layer, stream, logits, exit_stream, read)

    def exit_stream(self, segment: Segment, stream: torch.Tensor) -> torch.Tensor | None:
        """Every row's stream through the check layer's exit head (None: no heads, or no check)."""
        if not segment.check or self.check.heads is None:
            return None
        return self.check.exit_stream(segment.last, stream)

    def exit(self, layer: int, rows: RowState) -> None:
        """Every row left by ``layer`` (``exit_output``): compiled, one unit
        (``units.ExitBranch``) whose output becomes the step's."""
        inputs = {"hidden_states": rows.hidden_states, "residual": rows.residual, "emitted": rows.emitted,
                  "emits": rows.emits}
        stack = self.stack
        if stack is not None and layer in stack.exits and stack.exits[layer].accepts(inputs):
            rows.take(output=stack.run_exit(layer, rows.positions, **inputs))
        else:
            rows.output.copy_(self.exit_output(layer, rows.positions, **inputs))

    def exit_output(
        self, layer: int, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor,
        emitted: torch.Tensor | None, emits: torch.Tensor,
    ) -> torch.Tensor:
        """The ``exit`` branch after ``layer``, tensors in and out (the one definition the eager step
        and the compiled unit ``units.ExitBranch`` share): the deeper layers' K/V from each row's
        stream (state propagation; none when the engine catches up), then the final norm of the rows'
        last streams."""
        if self.fills_exits:
            self.kv.fill(positions, hidden_states + residual, layer + 1, self.end)
        return self.norm(*finished(hidden_states, residual, emitted, emits))[0]

    def finish(self, rows: RowState) -> None:
        """The walk reached the last layer: the rows still running went the full depth."""
        rows.output.copy_(self.norm(*rows.finish(counted=True))[0])
