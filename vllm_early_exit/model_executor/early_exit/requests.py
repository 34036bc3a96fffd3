"""Per-request settings in persistent buffers, indexed by the runner's batch slot.

A request may bring its own threshold, a depth budget, or turn early exit off
(``config.RequestEarlyExit``). The table keeps them per batch slot (row ``i`` of
the runner's persistent batch is slot ``i``) in host arrays and in device
tensors of the same layout. Slots are written when the request in them changes
(it joins, leaves, or the runner moves it); a step whose slots all hold what they
held before copies nothing. A pure-decode step reads its rows' settings as the
first ``rows`` entries of the device tensors (a slice, no gather), so the same
code serves every step; the host arrays answer the questions the host decides on
(does a row turn early exit off, where do budgets end) without reading the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vllm_early_exit.config import RequestEarlyExit


@dataclass(frozen=True)
class RowSettings:
    """The settings of a step's token rows, as device tensors ``[rows]``, and what the host
    knows of them."""

    thresholds: torch.Tensor
    """Each row's threshold (the engine's where the request has none)."""
    allowed: torch.Tensor
    """False for rows whose request turned early exit off."""
    last_layers: torch.Tensor
    """The last layer each row's depth budget allows (a layer past the stack: no budget)."""
    any_off: bool
    """Some decode row's request turned early exit off."""
    own_thresholds: bool
    """Some decode row has a threshold of its own."""
    budget_layers: frozenset[int]
    """The layers after which some decode row's budget ends (decision points of the step)."""


class RequestTable:
    """Per-request settings by batch slot: host arrays, and device tensors written when they change."""

    def __init__(self, slots: int, num_layers: int, threshold: float, device: torch.device) -> None:
        self.num_layers = num_layers
        self.threshold = threshold
        self._ids: list[str | None] = [None] * slots
        self.host_thresholds = np.full(slots, threshold, dtype=np.float32)
        self.host_allowed = np.ones(slots, dtype=bool)
        self.host_last = np.full(slots, num_layers, dtype=np.int64)
        self.thresholds = torch.full((slots,), threshold, dtype=torch.float32, device=device)
        self.allowed = torch.ones(slots, dtype=torch.bool, device=device)
        self.last_layers = torch.full((slots,), num_layers, dtype=torch.long, device=device)
        self._dirty = False
        self._held = 0
        """Slots the last update filled (the ones after it hold no request)."""

    @property
    def slots(self) -> int:
        return len(self._ids)

    def write(self, slot: int, settings: RequestEarlyExit | None) -> None:
        """The settings of the request now in ``slot`` (None: the engine's)."""
        enabled = settings is None or settings.enabled
        threshold = self.threshold if settings is None or settings.threshold is None else settings.threshold
        budget = None if settings is None else settings.max_layers
        self.host_allowed[slot] = enabled
        self.host_thresholds[slot] = threshold
        self.host_last[slot] = self.num_layers if budget is None else min(budget, self.num_layers) - 1
        self._dirty = True

    def update(self, req_ids: Sequence[str], settings_of: Callable[[str], RequestEarlyExit | None]) -> None:
        """Writes the slots whose request changed since the last step (``req_ids``: the runner's
        batch, in slot order; ``settings_of``: a request's own settings), empties the slots past
        it, then copies the host arrays to the device once if anything changed."""
        held = len(req_ids)
        for slot in range(min(max(held, self._held), self.slots)):
            req_id = req_ids[slot] if slot < held else None
            if self._ids[slot] != req_id:
                self._ids[slot] = req_id
                self.write(slot, None if req_id is None else settings_of(req_id))
        self._held = held
        if self._dirty:
            self.thresholds.copy_(torch.from_numpy(self.host_thresholds), non_blocking=True)
            self.allowed.copy_(torch.from_numpy(self.host_allowed), non_blocking=True)
            self.last_layers.copy_(torch.from_numpy(self.host_last), non_blocking=True)
            self._dirty = False

    def rows(self, num_rows: int, decode: int) -> RowSettings:
        """Settings of a pure-decode step: token row ``i`` is slot ``i`` (``decode`` real rows,
        the rest padding)."""
        return self._settings(
            self.thresholds[:num_rows], self.allowed[:num_rows], self.last_layers[:num_rows], slice(0, decode)
        )

    def scattered(self, num_rows: int, rows: torch.Tensor, requests: Sequence[int]) -> RowSettings:
        """Settings of a step whose decode rows ``rows`` (token rows) belong to the requests in
        slots ``requests``; every other row gets the engine's settings."""
        index = torch.tensor(list(requests), dtype=torch.long, device=rows.device)

        def scatter(values: torch.Tensor, default) -> torch.Tensor:
            out = torch.full((num_rows,), default, dtype=values.dtype, device=values.device)
            out[rows] = values[index]
            return out

        return self._settings(
            scatter(self.thresholds, self.threshold),
            scatter(self.allowed, True),
            scatter(self.last_layers, self.num_layers),
            np.asarray(list(requests), dtype=np.int64),
        )

    def _settings(self, thresholds, allowed, last_layers, slots) -> RowSettings:
        host_last = self.host_last[slots]
        return RowSettings(
            thresholds=thresholds,
            allowed=allowed,
            last_layers=last_layers,
            any_off=not bool(self.host_allowed[slots].all()),
            own_thresholds=bool((self.host_thresholds[slots] != self.threshold).any()),
            budget_layers=frozenset(int(l) for l in np.unique(host_last) if l < self.num_layers - 1),
        )
