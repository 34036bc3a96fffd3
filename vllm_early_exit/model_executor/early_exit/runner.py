"""What the model reads of the vLLM model runner that loaded it, before each step.

vLLM hands a model no per-request parameters and does not say which tokens are
decode tokens: its V1 model runner keeps the request table
(``runner.requests[req_id].sampling_params``), the row order of a step and the
prompt lengths (``runner.input_batch``). The model is built inside the runner's
``load_model``, which the plugin wraps (``plugin/loading.py``) so that the runner hands
itself over for the length of the call (``loading``); the model takes it from there while it
is constructed (``RunnerView.of_loading_runner``). Before each step, on the host and without
reading device data, the view:

* writes the per-request settings of the batch's slots into the model's
  ``RequestTable`` (only the slots whose request changed);
* finds the step's decode rows (``batch.py``), with the rows of a recompute after
  preemption pinned to their recorded exits (``replay.py``), or, in an engine that catches
  up (``skipped_kv: "recompute"``), its decode groups.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from vllm_early_exit.config import EarlyExitConfigError, EarlyExitUnsupportedError, RequestEarlyExit
from vllm_early_exit.model_executor.early_exit.batch import (
    DecodeBatch,
    current_step_metadata,
    decode_batch,
    decode_groups,
)
from vllm_early_exit.model_executor.early_exit.replay import ExitRecord, with_replay
from vllm_early_exit.model_executor.early_exit.requests import RequestTable

logger = logging.getLogger("vllm_early_exit")

CACHE_LIMIT = 4096
"""Requests whose parsed settings are kept (the cache is cleared when it grows past this)."""


_LOADING: ContextVar[object | None] = ContextVar("early_exit_loading_runner", default=None)
"""The model runner whose ``load_model`` is running in this thread (set by ``loading``)."""


@contextmanager
def loading(runner) -> Iterator[None]:
    """While the body runs, ``runner`` is the runner that builds the model (the load hook,
    ``plugin/loading.py``, wraps vLLM's ``load_model`` in this)."""
    token = _LOADING.set(runner)
    try:
        yield
    finally:
        _LOADING.reset(token)


def is_v1_runner(runner) -> bool:
    """Whether ``runner`` holds what the model reads: V1's request table and persistent batch."""
    return hasattr(runner, "input_batch") and hasattr(runner, "requests")


class RunnerView:
    """The model runner that loads the model: its batch layout and its requests' settings."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self._settings: dict[str, RequestEarlyExit | None] = {}

    @classmethod
    def of_loading_runner(cls) -> "RunnerView":
        """The model runner that is building this model (handed over by the load hook); refuses
        to start without a V1 runner."""
        runner = _LOADING.get()
        if is_v1_runner(runner):
            return cls(runner)
        raise EarlyExitUnsupportedError(
            "early exit could not find vLLM's V1 model runner while the model was loading, so "
            "per-request settings (enabled, threshold, max_layers) could not reach the model. "
            "Start the engine with VLLM_USE_V2_MODEL_RUNNER=0 (the V1 model runner)."
        )

    @property
    def input_batch(self):
        return self.runner.input_batch

    @property
    def live_requests(self):
        """The runner's request table (ids of requests it still holds)."""
        return self.runner.requests

    def request_settings(self, req_id: str) -> RequestEarlyExit | None:
        """A request's own settings (checked when the request was admitted), parsed once."""
        if req_id not in self._settings:
            state = self.runner.requests.get(req_id)
            params = getattr(state, "sampling_params", None)
            try:
                settings = RequestEarlyExit.from_extra_args(getattr(params, "extra_args", None))
            except EarlyExitConfigError as exc:  # admission refuses these; never fail a step
                logger.warning("Early exit: ignoring settings of request %s: %s", req_id, exc)
                settings = None
            if len(self._settings) > CACHE_LIMIT:
                self._settings.clear()
            self._settings[req_id] = settings
        return self._settings[req_id]

    def write_settings(self, table: RequestTable) -> None:
        """The table's slots as the runner's batch holds them now."""
        input_batch = self.input_batch
        num_reqs = getattr(input_batch, "num_reqs", None)
        req_ids = input_batch.req_ids
        table.update(req_ids if num_reqs is None else req_ids[: int(num_reqs)], self.request_settings)

    def decode_batch(self, record: ExitRecord, per_row: bool, skips: bool, device: torch.device):
        """The step's decode rows with the replayed rows of recomputes after preemption, and how
        many rows are replayed; None when the step has no decode row."""
        meta, input_batch = current_step_metadata(), self.input_batch
        batch = decode_batch(meta, input_batch)
        if meta is None:
            return batch, 0
        replay = record.replay(meta, input_batch, skips=skips, live_last=per_row)
        if replay is None:
            return batch, 0
        replayed = sum(p >= 0 for p in replay.pinned)
        return with_replay(batch, replay, meta, keep_live=per_row, device=device), replayed

    def decode_groups(self, max_waiting: int) -> tuple[DecodeBatch | None, tuple[int, ...]]:
        """A catch-up step's decode groups, and the sizes of those that run every layer for want
        of room to wait (``batch.decode_groups``)."""
        return decode_groups(current_step_metadata(), self.input_batch, max_waiting)

    def request_ids(self, indices) -> list[str]:
        """The ids of the batch's requests at ``indices``."""
        req_ids = self.input_batch.req_ids
        return [req_ids[i] for i in indices]


__all__ = ["DecodeBatch", "RunnerView", "is_v1_runner", "loading"]
