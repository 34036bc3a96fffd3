"""The layer loop of a step with decode tokens: one walker per execution mode.

Both walkers go down the stack over a shared ``StepState``. After each layer
that ends at a decision point, ``Walker.decide`` asks the ``ExitDecider`` which
decode rows leave there. When every row of a pure-decode step has left, the
deeper layers only get their K/V filled; otherwise the leaving rows are frozen
and the rest go on. Only decode rows leave or skip; in a mixed step the prefill
rows run every layer beside them. K/V of what a row does not run is written by
``kv_fill`` alone. With ``per_token`` and a shortlist, a pure-decode step defers
the checks' confirmations (``Walker.defer``, ``deferred.py``): rows that pass
the first stage go on and are confirmed together, at the end of the stack with
the sampling logits or sooner when the whole step may leave.

* ``EagerWalker``: layer by layer, vLLM's own layer modules.
* ``GroupedWalker``: compiled layer groups (``compile: true``) between decision
  points; frozen rows are held by a row mask.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from vllm_early_exit.model_executor.early_exit import kv_fill
from vllm_early_exit.model_executor.early_exit.decision import ExitDecider
from vllm_early_exit.model_executor.early_exit.deferred import ConfirmedExit, PendingExit, earliest
from vllm_early_exit.model_executor.early_exit.groups import CompiledStack
from vllm_early_exit.model_executor.early_exit.kv_fill import KVPropagator
from vllm_early_exit.model_executor.early_exit.stats import ExitStats
from vllm_early_exit.model_executor.early_exit.step import Exit, StepState


class Walker(ABC):
    """Walks a step's rows down layers ``start..end-1``.

    ``walk`` returns the stack's output: every row's last stream through the final norm.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        start: int,
        end: int,
        decider: ExitDecider,
        kv: KVPropagator,
        stats: ExitStats,
    ) -> None:
        self.layers, self.start, self.end = layers, start, end
        self.decider, self.kv, self.stats = decider, kv, stats

    @abstractmethod
    def walk(self, state: StepState) -> torch.Tensor: ...

    @property
    def norm(self) -> nn.Module:
        """The model's final norm (the decider's readout holds it)."""
        return self.decider.readout.norm

    def remember_previous(self, state: StepState, layer: int) -> None:
        """Keeps the stream entering ``layer`` when the signal reads it there."""
        if self.decider.needs_previous and layer in self.decider.check_layers:
            state.previous = state.stream()

    def decide(self, state: StepState, layer: int) -> Exit | None:
        """The rows that leave after ``layer`` (counted), or None when none do."""
        candidates = state.candidates
        if layer not in state.points or candidates.numel() == 0:
            return None
        state.ensure_residual()
        stream = state.stream()
        if state.pending is not None:
            return self.defer(state, layer, stream)
        leave = self.decider.rows_to_exit(
            layer,
            state.of_candidates(stream),
            candidates,
            step_rows=stream.shape[0],
            previous=state.of_candidates(state.previous),
            **state.candidate_settings(layer),
        )
        leave = state.pin(leave, layer)
        if leave is None:
            return None
        leaving = candidates[leave]
        count = leaving.numel()  # the step's one host sync per check
        if count == 0:
            return None
        self.record_exit(state, layer, leaving, state.live(leaving))
        if self.decider.heads is not None:
            state.emitted.append((leaving, self.decider.exit_stream(layer, stream[leaving])))
        return self.exit(state, leaving, stream)

    def record_exit(self, state: StepState, layer: int, rows: torch.Tensor, live: int) -> None:
        """Counts ``rows`` (``live`` of them deciding live) as leaving after ``layer``."""
        state.depths[rows] = layer + 1
        self.stats.record(layer, live)

    def exit(self, state: StepState, leaving: torch.Tensor, stream: torch.Tensor) -> Exit:
        """``leaving`` rows leave at ``stream`` (every row's, theirs the stream they leave with);
        the others go on."""
        everyone = leaving.numel() == state.candidates.numel() and state.batch.pure
        if not everyone:
            kv_fill.freeze_rows(state.hidden_states, state.residual, stream, leaving)
            state.left(torch.isin(state.candidates, leaving))
        return Exit(leaving, stream, everyone)

    def defer(self, state: StepState, layer: int, stream: torch.Tensor) -> Exit | None:
        """A per-token check whose confirmation waits (``deferred.py``): the rows that pass the
        first stage become pending; the pending exits are confirmed now when every running
        row passed, or when as many rows are pending as the step runs."""
        candidates = state.candidates
        settings = state.candidate_settings(layer)
        previous = state.of_candidates(state.previous)
        passing, exit_stream = self.decider.first_stage(
            layer, state.of_candidates(stream), previous, settings["thresholds"], settings["allowed"]
        )
        picked = passing.nonzero().squeeze(1)  # the check's one host sync
        if picked.numel() == 0:
            return None
        thresholds = settings["thresholds"]
        state.pending.add(
            PendingExit(
                layer,
                candidates[picked],
                state.of_candidates(stream)[picked],
                exit_stream[picked],
                None if previous is None else previous[picked],
                None if thresholds is None else thresholds[picked],
            )
        )
        if picked.numel() < candidates.numel() and state.pending.rows < state.running_rows:
            return None
        confirmed = self.confirm(state, layer + 1)
        if not confirmed:
            return None
        for exit in confirmed:  # rows confirmed at an earlier check leave at their own stream
            stream[exit.rows] = exit.stream
        return self.exit(state, torch.cat([exit.rows for exit in confirmed]), stream)

    def confirm(self, state: StepState, stop: int, final: torch.Tensor | None = None) -> list[ConfirmedExit]:
        """Confirms every pending exit (with ``final``'s sampling logits in the same product, at the
        end of the stack) and lets the confirmed rows leave: counted, their logits kept, and the
        K/V of the layers they ran after their exit, up to ``stop``, written from the stream they
        leave with."""
        pending = state.pending.take()
        verdicts, logits, final_logits = self.decider.confirm(pending, final)
        confirmed = earliest(pending, verdicts, logits, state.hidden_states.shape[0])
        exit_logits = self.decider.exit_logits
        for exit in confirmed:
            if exit.layer + 1 < stop:  # confirmed after it ran deeper layers
                self.kv.fill(state.positions[exit.rows], exit.stream, exit.layer + 1, stop, exit.rows)
                self.stats.deferred_exits += exit.rows.numel()
            self.record_exit(state, exit.layer, exit.rows, exit.rows.numel())
            if self.decider.heads is not None:
                state.emitted.append((exit.rows, exit.exit_stream))
            exit_logits.keep(exit.rows, exit.logits, torch.ones_like(exit.rows, dtype=torch.bool))
        if final_logits is not None:
            running = state.candidates
            late = torch.zeros(state.hidden_states.shape[0], dtype=torch.bool, device=running.device)
            for exit in confirmed:
                late[exit.rows] = True
            exit_logits.keep(running, final_logits, ~late[running], from_check=False)
        return confirmed

    def leave_all(self, state: StepState, exit: Exit, layer: int) -> torch.Tensor:
        """Every logits row left after ``layer``: fill the deeper layers' K/V and stop."""
        self.stats.record_step(layer)  # only pure-decode steps leave as a whole (``Walker.exit``)
        self.kv.fill(state.positions, exit.stream, layer + 1, self.end)
        return self.norm(state.final_stream(exit.stream))

    def finish(self, state: StepState) -> torch.Tensor:
        """The walk reached the last layer: the rows still running went the full depth, but for
        rows whose deferred exit is confirmed now (their sampling logits are read with the
        others' in one product)."""
        full_depth = state.running_rows if state.remaining is None else state.live(state.remaining)
        hidden_states, residual = state.final_state()
        out = self.norm(hidden_states, residual)[0]
        if state.pending:
            for exit in self.confirm(state, self.end, final=out[state.candidates]):
                out[exit.rows] = self.norm(exit.exit_stream)
                full_depth -= exit.rows.numel()
        self.stats.record(None, full_depth)
        if state.batch.pure:
            self.stats.record_step(None)
        return out


class EagerWalker(Walker):
    """Layer by layer; frozen rows skip the MLP (their attention writes their K/V)."""

    def walk(self, state: StepState) -> torch.Tensor:
        running: torch.Tensor | None = None  # rows of the step still running (None: all)
        for index in range(self.start, self.end):
            self.remember_previous(state, index)
            layer = self.layers[index]
            if index not in self.decider.skip_layers:
                state.hidden_states, state.residual = kv_fill.run_layer(
                    layer, state.positions, state.hidden_states, state.residual, running
                )
            elif state.batch.pure:
                self.kv.fill(state.positions, state.stream(), index, index + 1)
            else:  # decode rows of a mixed step pass the layer at their stream
                state.hidden_states, state.residual = kv_fill.skip_layer(
                    layer, state.positions, state.hidden_states, state.residual,
                    state.stream(), state.remaining, running,
                )
            exit = self.decide(state, index)
            if exit is None:
                continue
            if exit.everyone:
                return self.leave_all(state, exit, index)
            if running is None:
                running = torch.arange(state.hidden_states.shape[0], device=exit.leaving.device)
            running = running[~torch.isin(running, exit.leaving)]
        return self.finish(state)


class GroupedWalker(Walker):
    """Compiled groups between decision points; frozen rows are held by the ``keep`` mask."""

    def __init__(self, *args, stack: CompiledStack, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stack = stack

    def walk(self, state: StepState) -> torch.Tensor:
        state.ensure_residual()
        keep = state.hidden_states.new_ones(state.hidden_states.shape[0], 1)  # 0 for frozen rows
        for first, stop in self.stack.bounds:
            index = stop - 1  # the group's last layer, where a decision may follow
            self.remember_previous(state, index)
            skipped = first in self.decider.skip_layers  # skipped layers are groups of their own
            if skipped and state.batch.pure:
                self.kv.fill(state.positions, state.stream(), first, first + 1)
            else:
                rows_in = kv_fill.holding(keep, state.remaining) if skipped else keep
                state.hidden_states, state.residual = self.stack.run(
                    (first, stop), state.positions, state.hidden_states, state.residual, rows_in
                )
            exit = self.decide(state, index)
            if exit is None:
                continue
            if exit.everyone:
                return self.leave_all(state, exit, index)
            keep[exit.leaving] = 0
        return self.finish(state)
