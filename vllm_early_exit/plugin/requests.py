"""Per-request early-exit settings of the rows of the running step.

vLLM hands a model no per-request parameters: the model runner keeps them
(``runner.requests[req_id].sampling_params``) and the row order of a step
(``runner.input_batch.req_ids``). ``RequestRows`` reads both. It finds the
runner once, while the runner is loading the model (the model is constructed
inside ``runner.load_model``), and keeps that reference.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_early_exit.config import EarlyExitConfigError, RequestEarlyExit

logger = logging.getLogger("vllm_early_exit")


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


class RequestRows:
    def __init__(self, runner) -> None:
        self.runner = runner
        self._cache: dict[str, RequestEarlyExit | None] = {}

    @classmethod
    def of_loading_runner(cls) -> "RequestRows | None":
        """The model runner up the call stack (the one loading this model), if any."""
        frame = sys._getframe(1)
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if hasattr(candidate, "input_batch") and hasattr(candidate, "requests"):
                return cls(candidate)
            frame = frame.f_back
        logger.warning("Early exit: no model runner found; per-request settings are ignored.")
        return None

    def _settings(self, req_id: str) -> RequestEarlyExit | None:
        if req_id not in self._cache:
            state = self.runner.requests.get(req_id)
            params = getattr(state, "sampling_params", None)
            try:
                settings = RequestEarlyExit.from_extra_args(getattr(params, "extra_args", None))
            except EarlyExitConfigError as exc:  # admission checks these; never fail a step
                logger.warning("Early exit: ignoring settings of request %s: %s", req_id, exc)
                settings = None
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[req_id] = settings
        return self._cache[req_id]

    @property
    def input_batch(self):
        return self.runner.input_batch

    def settings(
        self, requests: Sequence[int], default_threshold: float, num_layers: int, device: torch.device
    ) -> RowSettings | None:
        """Settings of the given requests (indices in the runner's batch), one row each;
        None when all of them use the engine's."""
        req_ids = self.runner.input_batch.req_ids
        per_row = [self._settings(req_ids[i]) for i in requests]
        if all(s is None for s in per_row):
            return None
        allowed = [s is None or s.enabled for s in per_row]
        values = [default_threshold if s is None or s.threshold is None else s.threshold for s in per_row]
        last = [
            num_layers if s is None or s.max_layers is None else min(s.max_layers, num_layers) - 1
            for s in per_row
        ]
        budget_layers = frozenset(l for l in last if l < num_layers - 1)
        return RowSettings(
            allowed=None if all(allowed) else torch.tensor(allowed, dtype=torch.bool, device=device),
            thresholds=(
                None if all(v == default_threshold for v in values)
                else torch.tensor(values, dtype=torch.float32, device=device)
            ),
            last_layers=torch.tensor(last, device=device) if budget_layers else None,
            budget_layers=budget_layers,
        )
