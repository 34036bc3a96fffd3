"""Compiled units of the step: the segments of the engine's plan, each with the check that ends it.

With ``compile`` the decoder stack is cut at the engine's decision points
(``plan.py``: after each check layer, around each skipped layer, and before each
check layer when the signal reads the stream entering it). Each segment is a
``LayerGroup``, compiled by vLLM's own ``support_torch_compile`` machinery
(inductor; on CUDA split at attention into piecewise CUDA graphs). A segment that
ends at a check is also a ``CheckedGroup``: its layers and its check as one
compiled unit with tensors in and out (``DecodeStep.stage``, the one definition
shared with the eager step). With a shortlist that is the first stage: the final
norm of the stream, the shortlist product, the signal, the policy's gate and the
count the host reads. Without one it is the whole decision: the full readout and
its signal (max-prob, margin, entropy, heads, saturation), the policy, the exits
(``rows.leave_rows``) and the running flag. Either way a check that does not fire
costs the host one call and one read (a forced exit: one call and no read). Steps
the unit does not fit (prompt rows, a depth budget's end, a replayed row, a request
threshold or early exit off beside a forced exit, a pruned vocabulary) run the segment's
``LayerGroup`` and the same check eagerly. When every row has left, the ``exit``
branch (the deeper layers' K/V by state propagation, the final norm) is one unit
too, and so is a shortlist's confirmation when it reads every row of a pure-decode
step (``units.py``: ``ExitBranch``, ``ConfirmBranch``).

Rows that left earlier in the step stay in the batch, frozen: ``keep`` is 0 for
them, and ``kv_fill.run_layers_holding`` holds them at the stream they entered
the group with, so each deeper layer's attention writes their K/V from their
exit-layer stream (state propagation). The shapes never change, so one compiled
graph serves every step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn
from vllm.compilation.backends import set_model_tag
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CompilationMode, VllmConfig

from vllm_early_exit.model_executor.early_exit.kv_fill import run_layers_holding
from vllm_early_exit.model_executor.early_exit.plan import StepPlan
from vllm_early_exit.model_executor.early_exit.units import (
    DECISION_ARGS,
    LAYER_ARGS,
    ROW_ARGS,
    ConfirmBranch,
    ExitBranch,
    OptionalInputs,
    _absent,
    _distinct,
    _named,
    confirm_class,
    exit_class,
)


def compiling(vllm_config: VllmConfig) -> bool:
    """True when vLLM will compile ``support_torch_compile`` modules under this config."""
    return vllm_config.compilation_config.mode not in (CompilationMode.NONE, CompilationMode.STOCK_TORCH_COMPILE)


@support_torch_compile(dynamic_arg_dims={name: 0 for name in LAYER_ARGS})
class LayerGroup(nn.Module):
    """Consecutive decoder layers with frozen rows held in place.

    ``layers`` are the model's own modules, kept in a plain list so that their
    weights stay registered (and loaded) under ``model.layers`` only.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = list(layers)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        keep: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``keep``: ``[rows, 1]``, 1 for rows that run these layers, 0 for rows held at their stream."""
        return run_layers_holding(self.layers, positions, hidden_states, residual, keep)


@support_torch_compile(
    dynamic_arg_dims={name: 0 for name in (*LAYER_ARGS, *ROW_ARGS, *DECISION_ARGS) if name != "counts"}
)
class CheckedGroup(OptionalInputs, nn.Module):
    """A segment's layers and the check that ends it as one compiled unit: the layers (frozen
    rows held), the stream, and ``stage`` (``DecodeStep.stage``): a shortlist's first stage
    with the policy's gate over it, or a one-stage check's whole decision and exits, as
    tensors in and out, so the host makes one call and reads one flag per decision point.

    ``stage`` is bound after the model's step is built (``CompiledStack.bind``), before the
    first call compiles the unit.
    """

    def __init__(
        self, *, vllm_config: VllmConfig, prefix: str = "", layers: Sequence[nn.Module], last: int,
        reads_previous: bool,
    ) -> None:
        super().__init__()
        self.layers = list(layers)
        self.last, self.reads_previous = last, reads_previous
        self.stage = None

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        keep: torch.Tensor,
        running: torch.Tensor,
        live: torch.Tensor,
        allowed: torch.Tensor,
        thresholds: torch.Tensor,
        depths: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        taken: torch.Tensor | None = None,
        emitted: torch.Tensor | None = None,
        emits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The rows' new tensors by name (``RowState.take``): the layers' hidden state and
        residual, and what the check's ``stage`` gives (the stream entering the segment as
        ``previous`` only for a first stage that reads it)."""
        previous = hidden_states + residual if self.reads_previous else None
        hidden_states, residual = run_layers_holding(self.layers, positions, hidden_states, residual, keep)
        state = {
            "hidden_states": hidden_states, "residual": residual, "keep": keep, "running": running, "live": live,
            "depths": depths, "logits": logits, "taken": taken, "emitted": emitted, "emits": emits,
        }
        out = self.stage(self.last, hidden_states + residual, previous, state, counts, allowed, thresholds)
        return {"hidden_states": hidden_states, "residual": residual, **out}


@functools.cache
def group_class(first: int, stop: int, checked: bool = False) -> type[nn.Module]:
    """The ``LayerGroup`` (with ``checked``: ``CheckedGroup``) subclass for layers ``first..stop-1``.

    vLLM keys its saved (AOT) compile artifacts by the qualified name of the
    compiled ``forward``; every group bakes its own layers' attention names into
    its graph, so each layer range (and kind) gets a ``forward`` of its own name.
    """
    if checked:

        def forward(
            self, positions, hidden_states, residual, keep, running, live, allowed, thresholds, depths=None,
            counts=None, logits=None, taken=None, emitted=None, emits=None,
        ):
            return CheckedGroup.forward(
                self, positions, hidden_states, residual, keep, running, live, allowed, thresholds, depths, counts,
                logits, taken, emitted, emits,
            )

        return _named(CheckedGroup, f"CheckedGroup_{first}_{stop}", forward)

    def forward(self, positions, hidden_states, residual, keep):
        return LayerGroup.forward(self, positions, hidden_states, residual, keep)

    return _named(LayerGroup, f"LayerGroup_{first}_{stop}", forward)


@support_torch_compile(dynamic_arg_dims={"positions": 0, "hidden_states": 0})
class FullStack(nn.Module):
    """Every layer of the stack as one compiled unit, for steps that run them all for every row
    with no decision on the way (prefill, unchecked steps): what plain vLLM compiles, without
    the cuts between the groups and the held-row masks.

    ``layers`` are the model's own modules, kept in a plain list (as in ``LayerGroup``).
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = list(layers)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        return hidden_states, residual


class CompiledStack:
    """The model's compiled units: a group per segment of the engine's plan (with the check that
    ends it, for segments that end at a check the step may fuse), the exit branch after each
    decision point, the whole stack for full-depth steps, and the static input buffers CUDA
    graphs replay from."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        layers: Sequence[nn.Module],
        plan: StepPlan,
        prefix: str,
        checks: bool = False,
        confirms: bool = False,
    ) -> None:
        """``checks``: each segment that ends at a check also runs with its check as one unit;
        ``confirms``: each check's shortlist confirmation is one unit too."""
        self.bounds = plan.bounds
        self.groups: dict[tuple[int, int], nn.Module] = {}
        self.checked: dict[tuple[int, int], CheckedGroup] = {}
        self.exits: dict[int, ExitBranch] = {}
        self.confirms: dict[int, ConfirmBranch] = {}
        for segment in plan.segments:
            first, stop = segment.bounds
            with set_model_tag(f"early_exit_layers_{first}_{stop}"):
                self.groups[(first, stop)] = group_class(first, stop)(
                    vllm_config=vllm_config, prefix=f"{prefix}.groups.{first}", layers=layers[first:stop]
                )
            if checks and segment.check and not segment.skipped:
                with set_model_tag(f"early_exit_checked_{first}_{stop}"):
                    self.checked[(first, stop)] = group_class(first, stop, checked=True)(
                        vllm_config=vllm_config, prefix=f"{prefix}.checked.{first}", layers=layers[first:stop],
                        last=segment.last, reads_previous=segment.reads_previous,
                    )
            if confirms and segment.check and not segment.skipped:
                with set_model_tag(f"early_exit_confirm_{segment.last}"):
                    self.confirms[segment.last] = confirm_class(segment.last)(
                        vllm_config=vllm_config, prefix=f"{prefix}.confirms.{segment.last}", layer=segment.last
                    )
            if segment.decision:
                with set_model_tag(f"early_exit_exit_{segment.last}"):
                    self.exits[segment.last] = exit_class(segment.last)(
                        vllm_config=vllm_config, prefix=f"{prefix}.exits.{segment.last}", layer=segment.last
                    )
        start, end = self.bounds[0][0], self.bounds[-1][1]
        with set_model_tag("early_exit_full_stack"):
            self.full = FullStack(vllm_config=vllm_config, prefix=f"{prefix}.full", layers=layers[start:end])
        mode = vllm_config.compilation_config.cudagraph_mode
        # Piecewise CUDA graphs replay from the addresses they were captured with:
        # inputs made on the host between groups are copied into fixed buffers first.
        self.static_inputs = mode is not None and mode.has_piecewise_cudagraphs()
        self.max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self._buffers: dict[str, torch.Tensor] = {}
        self._warmed_up = False
        self._prepare: Callable[[torch.Tensor], None] = lambda stream: None
        self._decides = False
        self._counts: torch.Tensor | None = None
        self._heads = False

    def bind(
        self, stage: Callable, exit_output: Callable, prepare: Callable[[torch.Tensor], None], decides: bool,
        counts: torch.Tensor, heads: bool, confirmation: Callable,
    ) -> None:
        """The checked groups' stage (``DecodeStep.stage``), the exit branches' work
        (``DecodeStep.exit_output``), the confirmations' (``DecodeStep.confirmation``), what must be
        ready before they are traced (``ExitCheck.prepare``: built on the host, once), whether the
        stage decides (a one-stage check), the counters it adds to (``ExitCounters.rows``, for their
        dtype) and whether rows leave through exit heads (they emit their head's stream)."""
        for group in self.checked.values():
            group.stage = stage
        for unit in self.exits.values():
            unit.branch = exit_output
        for unit in self.confirms.values():
            unit.branch = confirmation
        self._prepare, self._decides, self._counts, self._heads = prepare, decides, counts, heads

    def has(self, bounds: tuple[int, int]) -> bool:
        """True when layers ``bounds`` are one compiled group."""
        return bounds in self.groups

    def has_checked(self, bounds: tuple[int, int]) -> bool:
        """True when layers ``bounds`` and their check are one compiled unit."""
        return bounds in self.checked

    def run(
        self,
        bounds: tuple[int, int],
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        keep: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._call(self.groups[bounds], positions, hidden_states=hidden_states, residual=residual, keep=keep)

    def run_checked(
        self, bounds: tuple[int, int], positions: torch.Tensor, **inputs: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """``CheckedGroup.forward``'s outputs for layers ``bounds``; ``inputs``: its row tensors
        by name. The first call fixes which optional inputs the unit goes without."""
        return self._call_once_fixed(self.checked[bounds], positions, inputs)

    def run_confirm(self, layer: int, positions: torch.Tensor, **inputs: torch.Tensor | None) -> dict:
        """``ConfirmBranch.forward``'s outputs at ``layer``; ``inputs``: its row tensors by name."""
        return self._call_once_fixed(self.confirms[layer], positions, inputs)

    def run_exit(self, layer: int, positions: torch.Tensor, **inputs: torch.Tensor | None) -> torch.Tensor:
        """``ExitBranch.forward``'s output after ``layer``; ``inputs``: its row tensors by name."""
        return self._call_once_fixed(self.exits[layer], positions, inputs)

    def _call_once_fixed(self, unit: OptionalInputs, positions: torch.Tensor, inputs: dict):
        if unit.absent is None:  # the first call fixes which inputs the unit goes without
            _distinct({"positions": positions, **inputs})
            unit.absent = _absent(inputs)
        return self._call(unit, positions, **inputs)

    def _call(self, group: nn.Module, positions: torch.Tensor, **inputs: torch.Tensor | None):
        if not self.static_inputs:
            return group(positions, **inputs)
        # Piecewise CUDA graphs: every row input from a fixed buffer (the counters, which a
        # unit adds to, are one already), and the outputs (in the graph pool) owned before
        # the next unit runs.
        static = {
            name: value if value is None or name == "counts" else self._static(name, value)
            for name, value in inputs.items()
        }
        out = group(positions, **static)
        if isinstance(out, torch.Tensor):
            return out.clone()
        if isinstance(out, dict):
            return {name: value.clone() for name, value in out.items()}
        return tuple(value.clone() for value in out)

    def run_all(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer for every row (``FullStack``): the stack's output stream and residual.

        The first call (vLLM's warm-up run, which has no decode rows) also runs the groups and
        the checked groups once, so that every graph compiles before serving: on vLLM 0.32's
        CPU build a group compiled for the first time inside a decode step aborted the engine
        (heap corruption in the K/V cache update that followed).
        """
        if not self._warmed_up:
            self._warmed_up = True
            self._warm_up(positions, hidden_states)
        if not self.static_inputs:
            return self.full(positions, hidden_states)
        return self._call(self.full, positions, hidden_states=hidden_states)

    def _warm_up(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """Each unit called once as a step calls it: the checked groups in layer order, each
        with the row tensors the ones before it gave (no row reaches a threshold of 2), every
        input a tensor of its own as in a step (``_distinct``)."""
        rows = hidden_states.shape[0]
        residual, keep = torch.zeros_like(hidden_states), hidden_states.new_ones(rows, 1)
        stream = hidden_states.clone()
        self._prepare(stream)
        flags = torch.ones(rows, dtype=torch.bool, device=hidden_states.device)
        state: dict[str, torch.Tensor | None] = {
            "keep": keep, "running": flags, "live": flags.clone(), "allowed": flags.clone(),
            "thresholds": torch.full((rows,), 2.0, device=hidden_states.device),
        }
        decision = {  # what a one-stage check's exits, and a confirmation's, update
            "depths": torch.zeros(rows, dtype=torch.int16, device=hidden_states.device),
            "counts": torch.zeros_like(self._counts), "logits": None, "taken": torch.zeros_like(flags),
            "emitted": None, "emits": torch.zeros_like(flags),
        }
        if self._decides:
            state.update(decision)
        for bounds in self.bounds:
            if bounds in self.checked:
                out = self.run_checked(bounds, positions, hidden_states=stream, residual=residual, **state)
                state.update((name, out[name]) for name in ("logits", "emitted") if name in out)
            stream, residual = self.run(bounds, positions, stream, residual, keep)
        for layer in self.confirms:  # no row passed a first stage: none leaves
            self.run_confirm(layer, positions, hidden_states=stream, residual=residual,
                             passing=torch.zeros_like(flags), previous=stream.clone(), **{**state, **decision})
        for layer in self.exits:  # (the K/V it writes goes to the warm-up's own slots)
            emitted = torch.zeros_like(stream) if self._heads else None
            self.run_exit(layer, positions, hidden_states=stream, residual=residual, emitted=emitted,
                          emits=torch.zeros_like(flags))

    def _static(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` copied into the fixed buffer of input ``name`` (made on first use)."""
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = self._buffers[name] = value.new_zeros((self.max_tokens, *value.shape[1:]))
        rows = value.shape[0]
        buffer[:rows].copy_(value)
        return buffer[:rows]
