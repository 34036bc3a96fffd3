"""How per-request early-exit settings reach the model: read from vLLM's model runner.

vLLM hands a model no per-request parameters: the model runner keeps them
(``runner.requests[req_id].sampling_params``) and the row order of a step
(``runner.input_batch.req_ids``). ``RequestRows`` reads both. It finds the
runner once, while the runner is loading the model (the model is constructed
inside ``runner.load_model``), and keeps that reference. The model asks it each
decode step for the settings of the step's rows (``RowSettings``), and the
decode-row detection (``batch.py``) reads the prompt lengths through it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import torch

from vllm_early_exit.config import EarlyExitConfigError, EarlyExitUnsupportedError, RequestEarlyExit
from vllm_early_exit.model_executor.early_exit.step import RowSettings

logger = logging.getLogger("vllm_early_exit")


class RequestRows:
    """The model runner's view of the step's requests: their settings and prompt lengths."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self._cache: dict[str, RequestEarlyExit | None] = {}

    @classmethod
    def of_loading_runner(cls) -> "RequestRows":
        """The model runner up the call stack (the one loading this model); refuses to start without one."""
        frame = sys._getframe(1)
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if hasattr(candidate, "input_batch") and hasattr(candidate, "requests"):
                return cls(candidate)
            frame = frame.f_back
        raise EarlyExitUnsupportedError(
            "early exit could not find vLLM's V1 model runner while the model was loading, so "
            "per-request settings (enabled, threshold, max_layers) could not reach the model. "
            "Start the engine with VLLM_USE_V2_MODEL_RUNNER=0 (the V1 model runner)."
        )

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
