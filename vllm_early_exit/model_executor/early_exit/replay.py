"""Exits replayed when vLLM recomputes a preempted request.

vLLM preempts a request by freeing its KV blocks; when the request is scheduled
again, its prompt and every token it generated so far are recomputed as a
prefill. Plain vLLM gets the same K/V back. An early-exit engine would not: a
decode token that left after layer L had its deeper layers' K/V written by
state propagation (and skipped ``skip_layers``), while a prefill runs every
layer for every row. The request's later tokens would then attend to other K/V
than before the preemption, and its output would depend on memory pressure.

``ExitRecord`` keeps, per request, how each of its decode tokens went down the
stack (its *depth code*, by position) and turns the recompute into a replay:

* code 0 (no entry): the token ran in a full-depth step; a prefill row gives it
  the same K/V again;
* code ``c >= 1``: the token was walked down the stack (skipping the skip
  layers) and ran layers up to ``c - 1`` before it left (``c`` = number of
  layers: it went to the end).

In the recompute's step, rows of generated tokens with a code ``c >= 1`` become
*pinned* decode rows: the decode step takes them down the stack like decode rows and
makes them leave exactly after layer ``c - 1``, whatever the signal says
(``RowState.pin``), so every deeper layer gets the same propagated K/V as
before. The recompute's last token, whose own decision was never made, is a
live decode row under ``per_token`` (as in the decode step it stands for);
under ``all`` / ``quorum`` it runs at full depth, as every decode row of a step
that also prefills does. Replayed tokens are counted in
``ExitStats.replayed_tokens``, not again as exits.

The record costs, per walked step, one small device tensor of depth codes; the
host reads them every ``FLUSH_EVERY`` steps (one copy) or when a recompute
needs them, and then forgets requests that vLLM's runner no longer holds
(finished ones; preempted requests stay in ``runner.requests``).

Not replayed: attention layouts without ``query_start_loc`` (FlashInfer), whose
chunks cannot be mapped to rows here; recomputes in a step that keeps full
depth because a request with early exit off shares it while ``skip_layers`` is
set (``per_token``). Those recomputes run at full depth, as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from vllm_early_exit.model_executor.early_exit.batch import DecodeBatch

FLUSH_EVERY = 1024
"""Walked steps between host reads of the depth codes: the record's one wait for the device,
once in this many steps (the codes it holds meanwhile take ``rows`` x 2 bytes a step)."""


@dataclass(frozen=True)
class Replay:
    """The rows of one step's recomputed generated tokens."""

    rows: list[int]
    """Token rows."""
    requests: list[int]
    """Their requests' indices in the runner's batch."""
    pinned: list[int]
    """Per row, the last layer it ran before the preemption, or -1 for the live last token."""
    positions: list[int]

    @property
    def request_set(self) -> set[int]:
        return set(self.requests)


class ExitRecord:
    """Depth codes of each request's decode tokens, by position (see the module docstring)."""

    def __init__(self, num_layers: int, live_requests: Mapping) -> None:
        self.num_layers = num_layers
        self.live_requests = live_requests
        """The runner's ``requests``: ids of requests it still holds."""
        self._codes: dict[str, np.ndarray] = {}
        self._pending: list[tuple[list[str], np.ndarray, torch.Tensor]] = []

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._codes or any(req_id in ids for ids, _, _ in self._pending)

    def note(self, req_ids: list[str], positions: np.ndarray, codes: torch.Tensor) -> None:
        """The decode tokens at ``positions`` of requests ``req_ids`` ran to depth ``codes`` (device)."""
        self._pending.append((req_ids, positions, codes))
        if len(self._pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Moves the pending codes to the host (one copy) and forgets finished requests."""
        if self._pending:
            codes = torch.cat([c for _, _, c in self._pending]).cpu().numpy()
            offset = 0
            for req_ids, positions, _ in self._pending:
                for req_id, position, code in zip(req_ids, positions.tolist(), codes[offset : offset + len(req_ids)]):
                    self._store(req_id, position, code)
                offset += len(req_ids)
            self._pending.clear()
        for req_id in [r for r in self._codes if r not in self.live_requests]:
            del self._codes[req_id]

    def _store(self, req_id: str, position: int, code: int) -> None:
        codes = self._codes.get(req_id)
        if codes is None or codes.size <= position:
            grown = np.zeros(max(64, 2 * (position + 1)), dtype=np.int16)
            if codes is not None:
                grown[: codes.size] = codes
            self._codes[req_id] = codes = grown
        codes[position] = code

    def code(self, req_id: str, position: int) -> int:
        codes = self._codes.get(req_id)
        return 0 if codes is None or codes.size <= position else int(codes[position])

    def replay(self, meta, input_batch, *, skips: bool, live_last: bool) -> Replay | None:
        """The rows of this step that recompute generated tokens of recorded requests, or None.

        ``skips``: the engine has skip layers (then a code of "ran to the end" is replayed too);
        ``live_last``: the recompute's last token decides live (``per_token``)."""
        if not self._codes and not self._pending:
            return None
        candidates = self._recomputing(input_batch)
        if not candidates:
            return None
        starts = getattr(meta, "query_start_loc", None)
        num_reqs = len(input_batch.req_ids)
        if starts is None:
            return None
        starts = starts[: num_reqs + 1].cpu().numpy()
        if starts.size != num_reqs + 1:
            return None
        self.flush()
        computed = np.asarray(input_batch.num_computed_tokens_cpu)
        prompt = np.asarray(input_batch.num_prompt_tokens)
        total = np.asarray(input_batch.num_tokens_no_spec)
        rows, requests, pinned, positions = [], [], [], []
        for i in candidates:
            req_id = input_batch.req_ids[i]
            first = int(computed[i])
            for offset in range(int(starts[i + 1] - starts[i])):
                position = first + offset
                if position < prompt[i]:
                    continue
                if position == total[i] - 1:  # the last token: its decision was never made
                    if not live_last:
                        continue
                    layer = -1
                else:
                    code = self.code(req_id, position)
                    if code == 0 or (code == self.num_layers and not skips):
                        continue  # it ran every layer: a prefill row is exact
                    layer = code - 1
                rows.append(int(starts[i]) + offset)
                requests.append(int(i))
                pinned.append(layer)
                positions.append(position)
        if not any(p >= 0 for p in pinned):
            return None
        return Replay(rows, requests, pinned, positions)

    def _recomputing(self, input_batch) -> list[int]:
        """Requests of the batch that recompute more than their last token and have codes."""
        total = getattr(input_batch, "num_tokens_no_spec", None)
        if total is None:
            return []
        num_reqs = len(input_batch.req_ids)
        computed = np.asarray(input_batch.num_computed_tokens_cpu)[:num_reqs]
        prompt = np.asarray(input_batch.num_prompt_tokens)[:num_reqs]
        total = np.asarray(total)[:num_reqs]
        behind = np.flatnonzero((computed < total - 1) & (total > prompt))
        return [int(i) for i in behind if input_batch.req_ids[i] in self]


def with_replay(live: DecodeBatch | None, replay: Replay, meta, keep_live: bool, device) -> DecodeBatch:
    """The step's decode batch with the replayed rows added (pinned); live decode rows of
    other requests are kept when ``keep_live`` (``per_token``), else they run at full depth."""
    rows, requests, pinned, positions = list(replay.rows), list(replay.requests), list(replay.pinned), list(replay.positions)
    if live is not None and keep_live:
        replayed = replay.request_set
        starts = None if live.pure else meta.query_start_loc.cpu().numpy()
        for request in live.request_indices:
            if request in replayed:
                continue
            rows.append(request if starts is None else int(starts[request]))
            requests.append(request)
            pinned.append(-1)
            positions.append(-1)  # filled from the runner when noted
    return DecodeBatch(
        len(rows),
        torch.tensor(rows, dtype=torch.long, device=device),
        tuple(requests),
        pinned=tuple(pinned),
        positions=tuple(positions),
    )


def note_step(record: ExitRecord, input_batch, batch: DecodeBatch, codes: torch.Tensor) -> None:
    """Records the depth codes of the step's live decode rows (``codes``: per decode row)."""
    computed = np.asarray(input_batch.num_computed_tokens_cpu)
    requests = batch.request_indices
    if batch.pinned is None:
        positions = computed[: batch.num_tokens] if batch.requests is None else computed[np.asarray(requests)]
        record.note([input_batch.req_ids[i] for i in requests], positions.copy(), codes)
        return
    live = [k for k, p in enumerate(batch.pinned) if p < 0]
    if not live:
        return
    positions = np.array(
        [batch.positions[k] if batch.positions[k] >= 0 else int(computed[requests[k]]) for k in live]
    )
    record.note([input_batch.req_ids[requests[k]] for k in live], positions, codes[torch.tensor(live, device=codes.device)])
