"""The layout of the running step, read from vLLM's forward context.

Tokens of all requests are flattened in request order. In a pure-decode step
(every request contributes exactly one token) each real token is a logits row;
rows past ``num_actual_tokens`` are padding. Steps with prefill tokens need
exact K/V in every layer, so they are never allowed to exit.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.forward_context import get_forward_context, is_forward_context_available


@dataclass(frozen=True)
class DecodeBatch:
    """A pure-decode step: ``num_tokens`` real tokens, one per request, each a logits row."""

    num_tokens: int


def _first_metadata(attn_metadata):
    if isinstance(attn_metadata, list):  # speculative decoding: [0] is the target's
        attn_metadata = attn_metadata[0] if attn_metadata else None
    if isinstance(attn_metadata, dict):
        attn_metadata = next(iter(attn_metadata.values()), None)
    return attn_metadata


def current_decode_batch() -> DecodeBatch | None:
    """The running step as a ``DecodeBatch``, or None when it is not a pure-decode step.

    None also covers vLLM's dummy and profiling runs, which carry no metadata.
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
    if max_query_len != 1 or not num_tokens:
        return None
    return DecodeBatch(int(num_tokens))
