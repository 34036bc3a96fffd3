"""The compiled units of a step's branches after a decision, and what every unit with optional
inputs shares.

* ``ExitBranch``: every row has left after a decision layer: the deeper layers' K/V by state
  propagation, then the final norm (``DecodeStep.exit_output``);
* ``ConfirmBranch``: a shortlist check's confirmation of every row: the full readout, the signal
  where the first stage passed, the policy and the exits (``DecodeStep.confirmation``);
* ``OptionalInputs``: a unit whose inputs may be None is compiled for the pattern of its first
  call, which must give every input a tensor of its own (``_distinct``).

Each unit's work is bound after the model's step is built (``groups.CompiledStack.bind``): the
one definition the eager step runs too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig

LAYER_ARGS = ("positions", "hidden_states", "residual", "keep")
"""A group's inputs: the step's positions, and its rows' hidden state, residual and ``keep``."""

ROW_ARGS = ("running", "live", "allowed", "thresholds")
"""The per-row tensors a check reads besides the stream (``RowState`` and ``RowSettings``)."""

DECISION_ARGS = ("depths", "counts", "logits", "taken", "emitted", "emits")
"""What a one-stage check's exits update besides the stream (``rows.leave_rows``): None for a
shortlist's first stage, which decides nothing; ``logits`` and ``emitted`` are None until a
first exit keeps some; ``counts`` (the counters) keeps its shape."""


class OptionalInputs:
    """A compiled unit with inputs that may be None: it is compiled for the pattern of its first
    call (``CompiledStack``), and vLLM drops the guards that would tell another pattern apart,
    so a call with another pattern must not reach it (``accepts``). The same holds for inputs
    that are one tensor: traced so, the graph has one input for them and reads it for each
    ever after, so the first call must give every input a tensor of its own (``_distinct``)."""

    absent: frozenset[str] | None = None
    """The inputs the unit was compiled without (set by its first call)."""

    def accepts(self, inputs: dict[str, torch.Tensor | None]) -> bool:
        """Whether a call with ``inputs`` runs the graph compiled for it (or compiles it first)."""
        return self.absent is None or self.absent == _absent(inputs)


def _absent(inputs: dict[str, torch.Tensor | None]) -> frozenset[str]:
    return frozenset(name for name, value in inputs.items() if value is None)


def _distinct(inputs: dict[str, torch.Tensor | None]) -> None:
    """Refuses a first call whose inputs share memory: dynamo traces two arguments that are one
    tensor as one graph input, guarded by ``a is b``, and vLLM drops that guard, so the unit
    would read the first for both in every later call (a warm-up that passed one tensor as
    ``running`` and ``allowed`` let requests with early exit off leave)."""
    seen: dict[int, str] = {}
    for name, value in inputs.items():
        if value is None:
            continue
        key = value.untyped_storage().data_ptr()
        if key in seen:
            raise ValueError(f"compiled unit first called with {seen[key]!r} and {name!r} sharing memory")
        seen[key] = name


@support_torch_compile(dynamic_arg_dims={name: 0 for name in ("positions", "hidden_states", "residual", "emitted", "emits")})
class ExitBranch(OptionalInputs, nn.Module):
    """The ``exit`` branch after a decision layer as one compiled unit: every row has left, so
    the deeper layers' K/V come from each row's stream (state propagation), then the final
    norm; ``branch`` (``DecodeStep.exit_output``, the one definition the eager step runs too)
    is bound with the checked groups' stage (``CompiledStack.bind``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.branch = None

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        emitted: torch.Tensor | None = None,
        emits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The stack's output for every row."""
        return self.branch(self.layer, positions, hidden_states, residual, emitted, emits)


CONFIRM_ARGS = ("hidden_states", "residual", "passing", "previous", *ROW_ARGS, *DECISION_ARGS)
"""A shortlist's confirmation's inputs: the stream, the rows that passed its first stage, the
stream entering the check layer (for signals that read it) and a one-stage check's row tensors."""


@support_torch_compile(dynamic_arg_dims={name: 0 for name in ("positions", *CONFIRM_ARGS) if name != "counts"})
class ConfirmBranch(OptionalInputs, nn.Module):
    """The ``confirm`` branch of a shortlist check as one compiled unit: the full readout of every
    row, the signal where the first stage passed, the policy and the exits; ``branch``
    (``DecodeStep.confirmation``, the one definition the eager step runs too) is bound with the
    checked groups' stage (``CompiledStack.bind``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.branch = None

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor, passing: torch.Tensor,
        previous: torch.Tensor, keep: torch.Tensor, running: torch.Tensor, live: torch.Tensor,
        allowed: torch.Tensor, thresholds: torch.Tensor, depths: torch.Tensor, counts: torch.Tensor,
        logits: torch.Tensor | None = None, taken: torch.Tensor | None = None, emitted: torch.Tensor | None = None,
        emits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The rows' new tensors by name (``RowState.take``), ``flag``: does any row still run."""
        state = {
            "hidden_states": hidden_states, "residual": residual, "keep": keep, "running": running, "live": live,
            "depths": depths, "logits": logits, "taken": taken, "emitted": emitted, "emits": emits,
        }
        return self.branch(self.layer, previous, passing, state, counts, allowed, thresholds)


@functools.cache
def exit_class(layer: int) -> type[nn.Module]:
    """The ``ExitBranch`` subclass after ``layer`` (named for vLLM's compile cache, as ``group_class``)."""

    def forward(self, positions, hidden_states, residual, emitted=None, emits=None):
        return ExitBranch.forward(self, positions, hidden_states, residual, emitted, emits)

    return _named(ExitBranch, f"ExitBranch_{layer}", forward)


@functools.cache
def confirm_class(layer: int) -> type[nn.Module]:
    """The ``ConfirmBranch`` subclass at ``layer`` (named for vLLM's compile cache, as ``group_class``)."""

    def forward(
        self, positions, hidden_states, residual, passing, previous, keep, running, live, allowed, thresholds, depths,
        counts, logits=None, taken=None, emitted=None, emits=None,
    ):
        return ConfirmBranch.forward(
            self, positions, hidden_states, residual, passing, previous, keep, running, live, allowed, thresholds,
            depths, counts, logits, taken, emitted, emits,
        )

    return _named(ConfirmBranch, f"ConfirmBranch_{layer}", forward)


def _named(base: type[nn.Module], name: str, forward: Callable) -> type[nn.Module]:
    forward.__qualname__ = f"{name}.forward"
    return type(name, (base,), {"forward": forward, "__qualname__": name})
