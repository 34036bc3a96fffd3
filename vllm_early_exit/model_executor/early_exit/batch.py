"""Which tokens of the running step are decode tokens, read from vLLM's forward context.

Tokens of all requests are flattened in request order; rows past
``num_actual_tokens`` are padding. In a pure-decode step every request
contributes exactly one token, its logits row. In a mixed step, prefill tokens
need exact K/V in every layer and never leave; its decode tokens are the
requests with one scheduled token at or past the end of their prompt (a
one-token last chunk of a chunked prefill is not one).
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def pure(self) -> bool:
        return self.rows is None

    @property
    def request_indices(self) -> tuple[int, ...] | range:
        return range(self.num_tokens) if self.requests is None else self.requests


def _first_metadata(attn_metadata):
    if isinstance(attn_metadata, list):  # speculative decoding: [0] is the target's
        attn_metadata = attn_metadata[0] if attn_metadata else None
    if isinstance(attn_metadata, dict):
        attn_metadata = next(iter(attn_metadata.values()), None)
    return attn_metadata


def _mixed_step_decodes(meta, input_batch) -> DecodeBatch | None:
    """Decode tokens of a step that also prefills (needs ``query_start_loc`` and the runner's batch)."""
    starts = getattr(meta, "query_start_loc", None)
    if starts is None or input_batch is None:
        return None
    starts = starts.tolist()
    computed = input_batch.num_computed_tokens_cpu
    prompt = input_batch.num_prompt_tokens
    requests = tuple(
        i for i in range(len(starts) - 1)
        if starts[i + 1] - starts[i] == 1 and computed[i] >= prompt[i]
    )
    if not requests:
        return None
    rows = torch.tensor([starts[i] for i in requests], device=meta.query_start_loc.device)
    return DecodeBatch(len(requests), rows, requests)


def current_decode_batch(input_batch=None) -> DecodeBatch | None:
    """The decode tokens of the running step, or None when it has none.

    ``input_batch``: the model runner's batch, which knows prompt lengths; without it
    only pure-decode steps are recognised. None also covers vLLM's dummy and
    profiling runs, which carry no metadata.
    """
    if not is_forward_context_available():
        return None
    meta = _first_metadata(get_forward_context().attn_metadata)
    if meta is None:
        return None
    max_query_len = getattr(meta, "max_query_len", None)
    num_tokens = getattr(meta, "num_actual_tokens", None)
    if max_query_len is None:
        # Backends that split the batch (e.g. FlashInfer) count prefills instead.
        if getattr(meta, "num_prefills", None) != 0:
            return None
        num_tokens = getattr(meta, "num_decode_tokens", num_tokens)
        if num_tokens is None or num_tokens != getattr(meta, "num_decodes", num_tokens):
            return None
        max_query_len = 1
    if not num_tokens:
        return None
    if max_query_len != 1:
        return _mixed_step_decodes(meta, input_batch)
    return DecodeBatch(int(num_tokens))
