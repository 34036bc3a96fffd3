"""The state a decode step carries from layer to layer, shared by the walkers.

A step's rows are all its tokens (prefill, decode and padding). Decode rows are
the ones that may leave; ``remaining`` tracks those still running. Per-row
request settings (``RowSettings``) arrive indexed by token row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_early_exit.model_executor.early_exit.batch import DecodeBatch
from vllm_early_exit.model_executor.early_exit.deferred import DeferredExits


@dataclass(frozen=True)
class RowSettings:
    """The step's per-row settings, when any row has its own."""

    allowed: torch.Tensor | None
    """False for rows whose request turned early exit off (``[rows]``), or None when all may leave."""
    thresholds: torch.Tensor | None
    """Per-row thresholds (float32, ``[rows]``), or None when every row uses the engine's."""
    last_layers: torch.Tensor | None = None
    """Per row, the last layer its depth budget allows (``max_layers - 1``; rows without
    a budget get a layer past the stack), or None when no row has a budget."""
    budget_layers: frozenset[int] = frozenset()
    """The layers after which some row's budget ends."""

    @property
    def any_off(self) -> bool:
        """True when some row's request turned early exit off."""
        return self.allowed is not None

    def on_token_rows(self, batch: DecodeBatch, num_rows: int) -> "RowSettings":
        """These settings (one row per decode token) moved onto the step's token rows."""
        if batch.pure:
            return self

        def scatter(values: torch.Tensor | None) -> torch.Tensor | None:
            if values is None:
                return None
            out = values.new_zeros(num_rows)
            out[batch.rows] = values
            return out

        return RowSettings(
            allowed=scatter(self.allowed),
            thresholds=scatter(self.thresholds),
            last_layers=scatter(self.last_layers),
            budget_layers=self.budget_layers,
        )


NO_ROW_SETTINGS = RowSettings(None, None)


@dataclass(frozen=True)
class Exit:
    """Rows that leave after a check layer."""

    leaving: torch.Tensor
    """Their token rows."""
    stream: torch.Tensor
    """Every row's residual stream after the layer (a tensor of its own)."""
    everyone: bool
    """True when the step is pure decode and no row is left running."""


class StepState:
    """Hidden state, residual and row bookkeeping of one step's walk down the stack."""

    def __init__(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        batch: DecodeBatch,
        settings: RowSettings,
        points: frozenset[int],
        num_layers: int,
        defers: bool = False,
    ) -> None:
        self.hidden_states = hidden_states
        self.residual: torch.Tensor | None = None
        self.positions = positions
        self.batch = batch
        self.settings = settings
        self.points = points
        """Layers after which a decision may follow (check layers and budget ends)."""
        rows = batch.num_tokens
        self._logits_rows = rows
        self.decode_rows = torch.arange(rows, device=positions.device) if batch.pure else batch.rows
        self.remaining: torch.Tensor | None = None if batch.pure else batch.rows
        """Decode rows still running; None while every row of a pure-decode step runs
        (per-row tensors are then sliced, not gathered)."""
        self.previous: torch.Tensor | None = None
        """The stream entering the current check layer, for signals that read it."""
        self.emitted: list[tuple[torch.Tensor, torch.Tensor]] = []
        """(rows, stream they emit) for rows that left through an exit head."""
        num_rows = hidden_states.shape[0]
        self.depths = torch.full((num_rows,), num_layers, dtype=torch.int16, device=positions.device)
        """Per token row, the depth code of its walk (``replay.py``): last layer run + 1."""
        self.pinned: torch.Tensor | None = None
        """Per token row, the layer after which a replayed row leaves (-1: decides live)."""
        if batch.pinned is not None:
            self.pinned = torch.full((num_rows,), -1, dtype=torch.long, device=positions.device)
            self.pinned[batch.rows] = torch.tensor(batch.pinned, dtype=torch.long, device=positions.device)
        self.pending: DeferredExits | None = (
            DeferredExits() if defers and batch.pure and self.pinned is None and settings.last_layers is None else None
        )
        """The exits waiting for their confirmation (``deferred.py``), in steps that defer them."""

    def stream(self) -> torch.Tensor:
        """Every row's residual stream, as a new tensor (vLLM's fused add+norm may work in place)."""
        if self.residual is None:  # before the first layer
            return self.hidden_states.clone()
        return self.hidden_states + self.residual

    @property
    def candidates(self) -> torch.Tensor:
        """Decode rows still running."""
        return self.decode_rows if self.remaining is None else self.remaining

    @property
    def running_rows(self) -> int:
        return self._logits_rows if self.remaining is None else self.remaining.numel()

    def of_candidates(self, per_row: torch.Tensor | None) -> torch.Tensor | None:
        """The candidates' rows of a per-row tensor."""
        if per_row is None:
            return None
        return per_row[: self._logits_rows] if self.remaining is None else per_row[self.remaining]

    def candidate_settings(self, layer: int) -> dict[str, torch.Tensor | None]:
        """The candidates' own thresholds, permissions and budgets at ``layer``."""
        settings = self.settings
        last = self.of_candidates(settings.last_layers)
        return {
            "thresholds": self.of_candidates(settings.thresholds),
            "allowed": self.of_candidates(settings.allowed),
            "forced": None if last is None else last <= layer,
        }

    def ensure_residual(self) -> None:
        if self.residual is None:  # only skipped layers so far
            self.residual = torch.zeros_like(self.hidden_states)

    def pin(self, leave: torch.Tensor | None, layer: int) -> torch.Tensor | None:
        """The policy's ``leave`` mask over the candidates, with replayed rows leaving exactly
        after their recorded layer (None stays None when no row is pinned)."""
        if self.pinned is None:
            return leave
        pinned = self.of_candidates(self.pinned)
        here = pinned == layer
        return here if leave is None else torch.where(pinned >= 0, here, leave)

    def live(self, rows: torch.Tensor) -> int:
        """How many of ``rows`` decide live (the host syncs only in replay steps)."""
        return rows.numel() if self.pinned is None else int((self.pinned[rows] < 0).sum())

    def decode_depths(self) -> torch.Tensor:
        """The depth codes of the decode rows, in decode-row order."""
        return self.depths[: self._logits_rows] if self.batch.pure else self.depths[self.batch.rows]

    def left(self, leave: torch.Tensor) -> None:
        """The candidates marked in ``leave`` are no longer running."""
        self.remaining = self.candidates[~leave]

    def final_stream(self, stream: torch.Tensor) -> torch.Tensor:
        """Every row's last stream when all left after one check (``stream``: the check's);
        rows that left through a head emit the head's stream."""
        for leaving, exit_stream in self.emitted:
            stream[leaving] = exit_stream
        return stream

    def final_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden state and residual at the end of the stack, in vLLM's fused layout: the final
        norm then adds them as vLLM's own forward does (in float32 where the norm does).
        Rows that left through a head hold the head's stream."""
        self.ensure_residual()
        for leaving, exit_stream in self.emitted:
            self.hidden_states[leaving] = 0
            self.residual[leaving] = exit_stream
        return self.hidden_states, self.residual
