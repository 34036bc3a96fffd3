"""Compiled layer groups: the segments of the engine's plan, each one compiled unit.

With ``compile`` the decoder stack is cut at the engine's decision points
(``plan.py``: after each check layer, around each skipped layer, and before each
check layer when the signal reads the stream entering it). Each segment is a
``LayerGroup``, compiled by vLLM's own ``support_torch_compile`` machinery
(inductor; on CUDA split at attention into piecewise CUDA graphs). The decisions
stay between groups (``step.py``).

Rows that left earlier in the step stay in the batch, frozen: ``keep`` is 0 for
them, and ``kv_fill.run_layers_holding`` holds them at the stream they entered
the group with, so each deeper layer's attention writes their K/V from their
exit-layer stream (state propagation). The shapes never change, so one compiled
graph serves every step.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn
from vllm.compilation.backends import set_model_tag
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CompilationMode, VllmConfig

from vllm_early_exit.model_executor.early_exit.kv_fill import run_layers_holding


def compiling(vllm_config: VllmConfig) -> bool:
    """True when vLLM will compile ``support_torch_compile`` modules under this config."""
    return vllm_config.compilation_config.mode not in (CompilationMode.NONE, CompilationMode.STOCK_TORCH_COMPILE)


@support_torch_compile(dynamic_arg_dims={"positions": 0, "hidden_states": 0, "residual": 0, "keep": 0})
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


@functools.cache
def group_class(first: int, stop: int) -> type[LayerGroup]:
    """The ``LayerGroup`` subclass for layers ``first..stop-1``.

    vLLM keys its saved (AOT) compile artifacts by the qualified name of the
    compiled ``forward``; every group bakes its own layers' attention names into
    its graph, so each layer range gets a ``forward`` of its own name.
    """
    name = f"LayerGroup_{first}_{stop}"

    def forward(self, positions, hidden_states, residual, keep):
        return LayerGroup.forward(self, positions, hidden_states, residual, keep)

    forward.__qualname__ = f"{name}.forward"
    return type(name, (LayerGroup,), {"forward": forward, "__qualname__": name})


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
    """The model's layer groups, the whole stack for full-depth steps, and the static input
    buffers CUDA graphs replay from."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        layers: Sequence[nn.Module],
        bounds: list[tuple[int, int]],
        prefix: str,
    ) -> None:
        self.bounds = bounds
        self.groups: dict[tuple[int, int], LayerGroup] = {}
        for first, stop in bounds:
            with set_model_tag(f"early_exit_layers_{first}_{stop}"):
                self.groups[(first, stop)] = group_class(first, stop)(
                    vllm_config=vllm_config, prefix=f"{prefix}.groups.{first}", layers=layers[first:stop]
                )
        start, end = bounds[0][0], bounds[-1][1]
        with set_model_tag("early_exit_full_stack"):
            self.full = FullStack(vllm_config=vllm_config, prefix=f"{prefix}.full", layers=layers[start:end])
        mode = vllm_config.compilation_config.cudagraph_mode
        # Piecewise CUDA graphs replay from the addresses they were captured with:
        # inputs made on the host between groups are copied into fixed buffers first.
        self.static_inputs = mode is not None and mode.has_piecewise_cudagraphs()
        self.max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self._buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._warmed_up = False

    def has(self, bounds: tuple[int, int]) -> bool:
        """True when layers ``bounds`` are one compiled group."""
        return bounds in self.groups

    def run(
        self,
        bounds: tuple[int, int],
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        keep: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        group = self.groups[bounds]
        if not self.static_inputs:
            return group(positions, hidden_states, residual, keep)
        rows = hidden_states.shape[0]
        hidden_buf, residual_buf, keep_buf = self._static(hidden_states)
        hidden_buf[:rows].copy_(hidden_states)
        residual_buf[:rows].copy_(residual)
        keep_buf[:rows].copy_(keep)
        hidden_states, residual = group(positions, hidden_buf[:rows], residual_buf[:rows], keep_buf[:rows])
        # The last piece's outputs live in the graph pool: own them before the next group runs.
        return hidden_states.clone(), residual.clone()

    def run_all(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer for every row (``FullStack``): the stack's output stream and residual.

        The first call (vLLM's warm-up run, which has no decode rows) also runs the groups once,
        so that every graph compiles before serving: on vLLM 0.32's CPU build a group compiled
        for the first time inside a decode step aborted the engine (heap corruption in the
        K/V cache update that followed).
        """
        if not self._warmed_up:
            self._warmed_up = True
            residual, keep = torch.zeros_like(hidden_states), hidden_states.new_ones(hidden_states.shape[0], 1)
            stream = hidden_states.clone()
            for bounds in self.bounds:
                stream, residual = self.run(bounds, positions, stream, residual, keep)
        if not self.static_inputs:
            return self.full(positions, hidden_states)
        rows = hidden_states.shape[0]
        hidden_buf = self._static(hidden_states)[0]
        hidden_buf[:rows].copy_(hidden_states)
        hidden_states, residual = self.full(positions, hidden_buf[:rows])
        return hidden_states.clone(), residual.clone()

    def _static(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._buffers is None:
            shape = (self.max_tokens, like.shape[-1])
            self._buffers = (
                like.new_zeros(shape),
                like.new_zeros(shape),
                like.new_ones(self.max_tokens, 1),
            )
        return self._buffers
