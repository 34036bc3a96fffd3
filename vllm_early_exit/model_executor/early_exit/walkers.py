"""The layer loop of a step with decode tokens: one walker per execution mode.

Both walkers go down the stack over a shared ``StepState``. After each layer
that ends at a decision point, ``Walker.decide`` asks the ``ExitDecider`` which
decode rows leave there. When every row of a pure-decode step has left, the
deeper layers only get their K/V filled; otherwise the leaving rows are frozen
and the rest go on. Only decode rows leave or skip; in a mixed step the prefill
rows run every layer beside them. K/V of what a row does not run is written by
``kv_fill`` alone.

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
from vllm_early_exit.model_executor.early_exit.groups import CompiledStack
from vllm_early_exit.model_executor.early_exit.kv_fill import KVPropagator
from vllm_early_exit.model_executor.early_exit.stats import ExitStats
from vllm_early_exit.model_executor.early_exit.step import Exit, StepState


class Walker(ABC):
    """Walks a step's rows down layers ``start..end-1``.

    ``walk`` returns ``(stream, None)`` when every row left at one check, else
    ``(hidden_states, residual)`` for the final fused add+norm.
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
    def walk(self, state: StepState) -> tuple[torch.Tensor, torch.Tensor | None]: ...

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
        state.depths[leaving] = layer + 1
        self.stats.record(layer, state.live(leaving))
        if self.decider.heads is not None:
            state.emitted.append((leaving, self.decider.exit_stream(layer, stream[leaving])))
        everyone = count == candidates.numel() and state.batch.pure
        if not everyone:
            kv_fill.freeze_rows(state.hidden_states, state.residual, stream, leaving)
            state.left(leave)
        return Exit(leaving, stream, everyone)

    def leave_all(self, state: StepState, exit: Exit, layer: int) -> tuple[torch.Tensor, None]:
        """Every logits row left after ``layer``: fill the deeper layers' K/V and stop."""
        self.kv.fill(state.positions, exit.stream, layer + 1, self.end)
        return state.final_stream(exit.stream), None

    def finish(self, state: StepState) -> tuple[torch.Tensor, torch.Tensor]:
        """The walk reached the last layer: the rows still running went the full depth."""
        self.stats.record(None, state.running_rows if state.remaining is None else state.live(state.remaining))
        return state.final_state()


class EagerWalker(Walker):
    """Layer by layer; frozen rows skip the MLP (their attention writes their K/V)."""

    def walk(self, state: StepState) -> tuple[torch.Tensor, torch.Tensor | None]:
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

    def walk(self, state: StepState) -> tuple[torch.Tensor, torch.Tensor | None]:
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
