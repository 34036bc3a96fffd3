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

Catch-up engines (``skipped_kv: "recompute"``, ``decode_groups``). A token that left early
waits, and the scheduler gives it back to its request, so a request may have several rows
in a step: ``[computed, computed + n)``, its waiting tokens and its new one. They form a
decode *group* when ``computed`` is past the prompt, the last row is sampled
(``computed + n == input_batch.num_tokens_no_spec[i]``) and ``n <= max_waiting``; the last
row decides for the group and the others leave with it. Other rows run every layer: prompt
rows, a group the token budget cut (its last row is not sampled), a group over the cap. A
recompute after preemption (a sampled chunk that starts inside the prompt and ends at the last
generated token) runs every layer but for its last row, a one-row group that decides.

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
class Groups:
    """The decode groups of a catch-up step (``skipped_kv: "recompute"``), one per request.

    A request's rows in the step are ``[computed, computed + size)``, its tokens from the first
    that waits to the one just sampled; its group is a decode group when ``computed`` is past
    its prompt and the last row is sampled. Its last row decides; the others (tokens that left
    early in earlier steps, run again) ride along and leave with it."""

    requests: tuple[int, ...]
    """The groups' requests, by index in the runner's batch."""
    last_rows: tuple[int, ...]
    """Each group's last (sampled) token row."""
    sizes: tuple[int, ...]
    """Each group's rows."""

    @property
    def rerun_rows(self) -> int:
        """Rows run again for tokens that waited."""
        return sum(self.sizes) - len(self.sizes)


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
    groups: Groups | None = None
    """A catch-up step's decode groups (``skipped_kv: "recompute"``); None in other engines."""
    leaders: tuple[int, ...] | None = None
    """With ``groups`` of several rows: per decode row, the token row of its group's sampled
    row, which decides for it; None when every group is one row."""
    every_row: bool = False
    """Every token row of the step is a decode row, though rows are not requests (groups of
    several rows): the stack may end early, as in a pure-decode step."""

    @property
    def pure(self) -> bool:
        return self.rows is None

    @property
    def num_requests(self) -> int:
        """Requests with decode rows in the step (a catch-up group is one request's rows)."""
        return self.num_tokens if self.groups is None else len(self.groups.requests)

    @property
    def ends_early(self) -> bool:
        """No row of the step must run every layer: the stack stops when every row has left."""
        return self.pure or self.every_row

    @property
    def request_indices(self) -> tuple[int, ...] | range:
        return range(self.num_tokens) if self.requests is None else self.requests

    @property
    def num_live(self) -> int:
        """Decode rows that decide live (not pinned, not riding along with their group's last row)."""
        if self.groups is not None:
            return len(self.groups.last_rows)
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


@dataclass(frozen=True)
class Spans:
    """The token rows of a step's requests, as far as its metadata layout tells them."""

    requests: np.ndarray
    """Indices in the runner's batch of the requests whose rows are known (all of them, or with
    FlashInfer's layout the leading one-token decodes)."""
    starts: np.ndarray
    """Each one's first token row."""
    sizes: np.ndarray
    """Each one's tokens in the step."""
    num_tokens: int
    """The step's token rows (``num_actual_tokens``)."""
    num_reqs: int

    @property
    def every_request(self) -> bool:
        """Every request of the step has one token, and its row is its index (a decode-shaped step)."""
        return self.requests.size == self.num_reqs == self.num_tokens and bool((self.sizes == 1).all())


def _token_device(meta) -> torch.device:
    """The device of the step's tokens."""
    return getattr(getattr(meta, "slot_mapping", None), "device", torch.device("cpu"))


def step_spans(meta, input_batch) -> Spans | None:
    """The requests' token rows in a step with attention metadata ``meta``; None when the layout
    does not say them or disagrees with the runner's batch (the step then runs every layer)."""
    if meta is None or input_batch is None:
        return None
    num_tokens = getattr(meta, "num_actual_tokens", None)
    if not num_tokens:
        return None
    num_tokens = int(num_tokens)
    num_reqs = _num_requests(input_batch)
    if num_reqs == 0:
        return None
    max_query_len = getattr(meta, "max_query_len", None)
    if max_query_len is None:
        return _split_batch_spans(meta, num_tokens, num_reqs)
    everyone = np.arange(num_reqs)
    if max_query_len == 1:
        # Every scheduled request has one token: request i is row i.
        if num_tokens != num_reqs:
            return None
        return Spans(everyone, everyone, np.ones(num_reqs, dtype=np.int64), num_tokens, num_reqs)
    starts = getattr(meta, "query_start_loc", None)
    if starts is None:
        return None
    starts = starts[: num_reqs + 1].cpu().numpy()
    if starts.size != num_reqs + 1 or int(starts[-1]) != num_tokens:
        return None
    return Spans(everyone, starts[:-1], np.diff(starts), num_tokens, num_reqs)


def decode_batch(meta, input_batch) -> DecodeBatch | None:
    """The decode tokens of a step with attention metadata ``meta`` (one layer's), given the
    runner's batch; None when it has none (the whole step then runs every layer)."""
    spans = step_spans(meta, input_batch)
    if spans is None:
        return None
    device = _token_device(meta)
    one_token = spans.sizes == 1
    return _decode_rows(
        input_batch, spans.requests[one_token], spans.starts[one_token], pure_if_all=spans.every_request,
        device=device,
    )


def _split_batch_spans(meta, num_tokens: int, num_reqs: int) -> Spans | None:
    """Backends that count decodes and prefills instead (FlashInfer): decodes come first, one
    token each; the rows of the prefills that follow are not told."""
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
    return Spans(candidates, candidates, np.ones(num_decodes, dtype=np.int64), num_tokens, num_reqs)


def decode_groups(meta, input_batch, max_waiting: int) -> tuple[DecodeBatch | None, tuple[int, ...]]:
    """The decode groups of a catch-up step (``Groups``), and the sizes of the groups that hold
    more than ``max_waiting`` rows: those run every layer (their new token is a full-depth decode
    token, and every token that waited is then complete).

    Rows that are not in a group run every layer: prompt rows, and a chunk whose last row is
    not sampled (the token budget cut a group; the rest is scheduled in the next step)."""
    spans = step_spans(meta, input_batch)
    if spans is None:
        return None, ()
    requests, starts, sizes = spans.requests, spans.starts, spans.sizes
    computed = np.asarray(input_batch.num_computed_tokens_cpu)[requests]
    prompt = np.asarray(input_batch.num_prompt_tokens)[requests]
    total = np.asarray(input_batch.num_tokens_no_spec)[requests]
    sampled = (computed >= prompt) & (computed + sizes == total)
    group = sampled & (sizes <= max_waiting)
    capped = tuple(sizes[sampled & ~group].tolist())
    # A recompute after preemption: a sampled chunk from inside the prompt to the last generated
    # token. Its rows run every layer (exact), but its last row decides, as the decode row it stands for.
    crossing = (computed < prompt) & (computed + sizes == total) & (total > prompt)
    starts, sizes = np.where(crossing, starts + sizes - 1, starts), np.where(crossing, 1, sizes)
    group |= crossing
    if not group.any():
        return None, capped
    requests, starts, sizes = requests[group], starts[group], sizes[group]
    lasts = starts + sizes - 1
    groups = Groups(tuple(requests.tolist()), tuple(lasts.tolist()), tuple(sizes.tolist()))
    if spans.every_request and bool(group.all()):
        return DecodeBatch(int(requests.size), groups=groups), capped
    device = _token_device(meta)
    rows = np.concatenate([np.arange(start, start + size) for start, size in zip(starts, sizes)])
    return DecodeBatch(
        int(rows.size),
        torch.tensor(rows.tolist(), dtype=torch.long, device=device),
        tuple(np.repeat(requests, sizes).tolist()),
        groups=groups,
        leaders=None if bool((sizes == 1).all()) else tuple(np.repeat(lasts, sizes).tolist()),
        every_row=rows.size == spans.num_tokens,
    ), capped


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
