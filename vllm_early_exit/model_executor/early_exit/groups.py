"""Compiled units of the step: the segments of the engine's plan, each with the check that ends it.

With ``compile`` the decoder stack is cut at the engine's decision points
(``plan.py``: after each check layer, around each skipped layer, and before each
check layer when the signal reads the stream entering it). Each segment is a
``LayerGroup``, compiled by vLLM's own ``support_torch_compile`` machinery
(inductor; on CUDA split at attention into piecewise CUDA graphs). A segment that
ends at a check with a first stage (a shortlist) is also a ``CheckedGroup``: its
layers, the final norm of the stream, the shortlist product, the signal, the
policy's gate and the count the host reads, as one compiled unit with tensors in
and out (``DecodeStep.gate`` is its one definition, shared with the eager step),
so a check that does not fire costs the host one call and one read.

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


def compiling(vllm_config: VllmConfig) -> bool:
    """True when vLLM will compile ``support_torch_compile`` modules under this config."""
    return vllm_config.compilation_config.mode not in (CompilationMode.NONE, CompilationMode.STOCK_TORCH_COMPILE)


LAYER_ARGS = ("positions", "hidden_states", "residual", "keep")
"""A group's inputs: the step's positions, and its rows' hidden state, residual and ``keep``."""

ROW_ARGS = ("running", "live", "allowed", "thresholds")
"""The per-row tensors a check reads besides the stream (``RowState`` and ``RowSettings``)."""


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


@support_torch_compile(dynamic_arg_dims={name: 0 for name in (*LAYER_ARGS, *ROW_ARGS)})
class CheckedGroup(nn.Module):
    """A segment's layers and the check that ends it as one compiled unit: the layers (frozen
    rows held), the stream, and ``stage`` (``DecodeStep.gate``), the check's first stage with
    the policy's gate over it, as tensors in and out, so the host makes one call and reads one
    count per decision point.

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
    ) -> tuple[torch.Tensor, ...]:
        """The layers' hidden state and residual, the stream entering the segment (for signals
        that read it), the rows passing the first stage, how many of them the gate lets through
        and whether that is any."""
        previous = hidden_states + residual
        hidden_states, residual = run_layers_holding(self.layers, positions, hidden_states, residual, keep)
        stream = hidden_states + residual
        passing, count = self.stage(
            self.last, stream, previous if self.reads_previous else None, running, live, allowed, thresholds
        )
        return hidden_states, residual, previous, passing, count, count > 0


@functools.cache
def group_class(first: int, stop: int, checked: bool = False) -> type[nn.Module]:
    """The ``LayerGroup`` (with ``checked``: ``CheckedGroup``) subclass for layers ``first..stop-1``.

    vLLM keys its saved (AOT) compile artifacts by the qualified name of the
    compiled ``forward``; every group bakes its own layers' attention names into
    its graph, so each layer range (and kind) gets a ``forward`` of its own name.
    """
    base = CheckedGroup if checked else LayerGroup
    name = f"{base.__name__}_{first}_{stop}"
    if checked:

        def forward(self, positions, hidden_states, residual, keep, running, live, allowed, thresholds):
            return CheckedGroup.forward(self, positions, hidden_states, residual, keep, running, live, allowed, thresholds)

    else:

        def forward(self, positions, hidden_states, residual, keep):
            return LayerGroup.forward(self, positions, hidden_states, residual, keep)

    forward.__qualname__ = f"{name}.forward"
    return type(name, (base,), {"forward": forward, "__qualname__": name})


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
    ends it, for segments whose check has a first stage), the whole stack for full-depth steps,
    and the static input buffers CUDA graphs replay from."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        layers: Sequence[nn.Module],
        plan: StepPlan,
        prefix: str,
        gates: bool = False,
    ) -> None:
        """``gates``: the checks have a first stage (a shortlist), compiled with their segment."""
        self.bounds = plan.bounds
        self.groups: dict[tuple[int, int], nn.Module] = {}
        self.checked: dict[tuple[int, int], CheckedGroup] = {}
        for segment in plan.segments:
            first, stop = segment.bounds
            with set_model_tag(f"early_exit_layers_{first}_{stop}"):
                self.groups[(first, stop)] = group_class(first, stop)(
                    vllm_config=vllm_config, prefix=f"{prefix}.groups.{first}", layers=layers[first:stop]
                )
            if gates and segment.check and not segment.skipped:
                with set_model_tag(f"early_exit_checked_{first}_{stop}"):
                    self.checked[(first, stop)] = group_class(first, stop, checked=True)(
                        vllm_config=vllm_config, prefix=f"{prefix}.checked.{first}", layers=layers[first:stop],
                        last=segment.last, reads_previous=segment.reads_previous,
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

    def bind(self, stage: Callable, prepare: Callable[[torch.Tensor], None]) -> None:
        """The checked groups' stage (``DecodeStep.gate``), and what must be ready before it is
        traced (``ExitCheck.prepare``: built on the host, once)."""
        for group in self.checked.values():
            group.stage = stage
        self._prepare = prepare

    def has(self, bounds: tuple[int, int]) -> bool:
        """True when layers ``bounds`` are one compiled group."""
        return bounds in self.groups

    def has_checked(self, bounds: tuple[int, int]) -> bool:
        """True when layers ``bounds`` and the first stage of their check are one compiled unit."""
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
        self, bounds: tuple[int, int], positions: torch.Tensor, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """``CheckedGroup.forward``'s outputs for layers ``bounds``; ``inputs``: its row tensors
        by name (the stream's and ``ROW_ARGS``)."""
        return self._call(self.checked[bounds], positions, **inputs)

    def _call(self, group: nn.Module, positions: torch.Tensor, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.static_inputs:
            return group(positions, *inputs.values())
        # Piecewise CUDA graphs: every row input from a fixed buffer, and the outputs (in the
        # graph pool) owned before the next unit runs.
        static = [self._static(name, value) for name, value in inputs.items()]
        return tuple(out.clone() for out in group(positions, *static))

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
        rows = hidden_states.shape[0]
        residual, keep = torch.zeros_like(hidden_states), hidden_states.new_ones(rows, 1)
        stream = hidden_states.clone()
        self._prepare(stream)
        flags = torch.ones(rows, dtype=torch.bool, device=hidden_states.device)
        row_inputs = {
            "running": flags, "live": flags, "allowed": flags,
            "thresholds": torch.full((rows,), 2.0, device=hidden_states.device),
        }
        for bounds in self.bounds:
            if bounds in self.checked:
                self.run_checked(bounds, positions, hidden_states=stream, residual=residual, keep=keep, **row_inputs)
            stream, residual = self.run(bounds, positions, stream, residual, keep)

    def _static(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` copied into the fixed buffer of input ``name`` (made on first use)."""
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = self._buffers[name] = value.new_zeros((self.max_tokens, *value.shape[1:]))
        rows = value.shape[0]
        buffer[:rows].copy_(value)
        return buffer[:rows]
