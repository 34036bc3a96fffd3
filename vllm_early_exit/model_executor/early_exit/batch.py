"""Which tokens of the running step are decode tokens, read from vLLM's forward context.

Tokens of all requests are flattened in request order (the runner's
``input_batch.req_ids`` order); rows past ``num_actual_tokens`` are padding.
Only decode tokens may leave early or skip layers; every other token (prompt
tokens, padding) runs every layer, so prompt K/V is exact in every layer.

The rule. A request's row is a decode row when, before this step, the request
had computed at least its whole prompt (``input_batch.num_computed_tokens_cpu[i]
>= input_batch.num_prompt_tokens[i]``) and it has exactly one token in the step.
This is vLLM's own rule (``is_prefilling = num_computed_tokens < num_prompt_tokens``
and the zero-draft decode mask in ``gpu_model_runner.py``, 0.32).
``num_computed_tokens_cpu`` holds the count BEFORE this step's tokens while the
model runs: ``_update_states`` writes the scheduler's count (tokens computed by
earlier steps, prefix-cache hits included) before the forward, the runner takes
the step's positions as ``num_computed_tokens_cpu[req] + 0..n-1``, and nothing
writes it again until the next step's ``_update_states`` (V1 GPU runner, and
the CPU runner, which inherits it, in 0.26 and 0.32).

A step shaped like decode (``max_query_len == 1``) is therefore not proof of
decode: a prompt whose blocks are all prefix-cache hits but its last token (hits
are rounded down to a block, and at least one prompt token is computed), or a
one-token last chunk of a chunked prefill, computes one prompt token in such a
step. Every request of such a step is checked (one vectorised numpy comparison
per step): all decode rows give the fast pure-decode form ``DecodeBatch(n)``;
some give a mixed step, whose other rows run every layer; none give None.

Layouts per attention backend (fields checked in vLLM 0.26 and 0.32):

- ``max_query_len`` and ``query_start_loc`` (CPU_ATTN ``CPUAttentionMetadata``,
  ``FlashAttentionMetadata``, ``TritonAttentionMetadata``): with
  ``max_query_len == 1`` request i is row i; otherwise the request lengths come
  from ``query_start_loc`` (a device-to-host copy, on mixed steps only).
- ``num_decodes`` / ``num_decode_tokens`` / ``num_prefills`` and no
  ``max_query_len`` (``FlashInferMetadata``): the runner orders the batch
  decodes first (``reorder_batch_threshold``), so requests 0..num_decodes-1 are
  rows 0..num_decodes-1 when each has one token (``num_decode_tokens ==
  num_decodes``); FlashInfer counts one-token prompt chunks as decodes, so these
  candidates are checked by the same rule. Anything else there (multi-token
  "decodes" of speculative layouts, zero-length padding requests) runs full depth.

Without the runner's batch (``input_batch=None``) no step is taken as decode:
no metadata layout tells a one-token prompt row from a decode row (FlashInfer's
``num_prefills == 0`` counts short prompt chunks as decodes too), so the only
safe answer is full depth. Speculative layouts (rows of several tokens) never
have decode rows by this rule; micro-batched metadata (a list of more than one
dict, DBO) is not mapped to rows and runs full depth. Any inconsistency between
the metadata and the batch (token or request counts that do not agree) also
gives full depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vllm.forward_context import get_forward_context, is_forward_context_available


@dataclass(frozen=True)
class DecodeBatch:
    """The decode tokens of the running step."""

    num_tokens: int
    """Decode tokens in the step."""
    rows: torch.Tensor | None = None
    """Their token rows in a mixed step; None in a pure-decode step (rows 0..num_tokens-1)."""
    requests: tuple[int, ...] | None = None
    """Their requests' indices in the runner's batch; None in a pure-decode step (row i is request i)."""
    pinned: tuple[int, ...] | None = None
    """Per decode row of a recompute after preemption (``replay.py``): the layer after which the
    row leaves whatever the signal says (it left there before the preemption), or -1 for a row
    that decides live; None when no row is pinned."""
    positions: tuple[int, ...] | None = None
    """With ``pinned``: each row's position (-1: the request's next position, as for decode)."""

    @property
    def pure(self) -> bool:
        return self.rows is None

    @property
    def request_indices(self) -> tuple[int, ...] | range:
        return range(self.num_tokens) if self.requests is None else self.requests

    @property
    def num_live(self) -> int:
        """Decode rows that decide live (not pinned)."""
        return self.num_tokens if self.pinned is None else sum(p < 0 for p in self.pinned)

    @property
    def pinned_layers(self) -> frozenset[int]:
        return frozenset() if self.pinned is None else frozenset(p for p in self.pinned if p >= 0)


def step_metadata(attn_metadata):
    """The attention metadata of one layer (all layers of the model share the step's layout).

    None when there is none (dummy and profiling runs) or when it is split into
    micro-batches (a list of several per-layer dicts), whose rows are not mapped here."""
    if isinstance(attn_metadata, list):
        if len(attn_metadata) != 1:
            return None
        attn_metadata = attn_metadata[0]
    if isinstance(attn_metadata, dict):
        attn_metadata = next(iter(attn_metadata.values()), None)
    return attn_metadata


def _num_requests(input_batch) -> int:
    num_reqs = getattr(input_batch, "num_reqs", None)
    return len(input_batch.req_ids) if num_reqs is None else int(num_reqs)


def _finished_prompts(input_batch, requests: np.ndarray) -> np.ndarray:
    """Per request in ``requests``: True when it had computed its whole prompt before this step."""
    computed = np.asarray(input_batch.num_computed_tokens_cpu)[requests]
    prompt = np.asarray(input_batch.num_prompt_tokens)[requests]
    return computed >= prompt


def _decode_rows(
    input_batch, candidates: np.ndarray, rows: np.ndarray, pure_if_all: bool, device: torch.device
) -> DecodeBatch | None:
    """The decode batch of the one-token requests ``candidates`` (their token rows ``rows``)."""
    decode = _finished_prompts(input_batch, candidates)
    if not decode.any():
        return None
    if pure_if_all and decode.all():
        return DecodeBatch(int(candidates.size))
    requests = candidates[decode]
    return DecodeBatch(
        int(requests.size),
        torch.tensor(rows[decode].tolist(), dtype=torch.long, device=device),
        tuple(requests.tolist()),
    )


def decode_batch(meta, input_batch) -> DecodeBatch | None:
    """The decode tokens of a step with attention metadata ``meta`` (one layer's), given the
    runner's batch; None when it has none (the whole step then runs every layer)."""
    if meta is None or input_batch is None:
        return None
    num_tokens = getattr(meta, "num_actual_tokens", None)
    if not num_tokens:
        return None
    num_tokens = int(num_tokens)
    num_reqs = _num_requests(input_batch)
    if num_reqs == 0:
        return None
    device = getattr(getattr(meta, "slot_mapping", None), "device", torch.device("cpu"))  # the step's token device

    max_query_len = getattr(meta, "max_query_len", None)
    if max_query_len is None:
        return _split_batch_decodes(meta, input_batch, num_tokens, num_reqs, device)
    if max_query_len == 1:
        # Every scheduled request has one token: request i is row i.
        if num_tokens != num_reqs:
            return None
        everyone = np.arange(num_reqs)
        return _decode_rows(input_batch, everyone, everyone, pure_if_all=True, device=device)
    starts = getattr(meta, "query_start_loc", None)
    if starts is None:
        return None
    starts = starts[: num_reqs + 1].cpu().numpy()
    if starts.size != num_reqs + 1 or int(starts[-1]) != num_tokens:
        return None
    one_token = np.flatnonzero(np.diff(starts) == 1)
    return _decode_rows(input_batch, one_token, starts[one_token], pure_if_all=False, device=device)


def _split_batch_decodes(meta, input_batch, num_tokens: int, num_reqs: int, device) -> DecodeBatch | None:
    """Backends that count decodes and prefills instead (FlashInfer): decodes come first."""
    num_decodes = getattr(meta, "num_decodes", None)
    num_decode_tokens = getattr(meta, "num_decode_tokens", None)
    num_prefills = getattr(meta, "num_prefills", None)
    if num_decodes is None or num_decode_tokens is None or num_prefills is None:
        return None
    if not num_decodes or num_decode_tokens != num_decodes or num_decodes + num_prefills != num_reqs:
        return None
    if num_decodes > num_tokens:
        return None
    candidates = np.arange(num_decodes)
    return _decode_rows(input_batch, candidates, candidates, pure_if_all=num_prefills == 0, device=device)


def current_step_metadata():
    """The running step's attention metadata (one layer's), or None (dummy and profiling runs)."""
    if not is_forward_context_available():
        return None
    return step_metadata(get_forward_context().attn_metadata)


def current_decode_batch(input_batch=None) -> DecodeBatch | None:
    """The decode tokens of the running step, or None when it has none.

    ``input_batch``: the model runner's batch (request order, prompt lengths and
    tokens computed before this step); without it no step is taken as decode (see
    the module docstring). None also covers vLLM's dummy and profiling runs,
    which carry no metadata.
    """
    return decode_batch(current_step_metadata(), input_batch)
