"""Where K/V of skipped layers is written: state propagation.

When a decode step leaves after layer L, layers L+1.. still need K/V at these
positions, or later tokens would attend to holes. For each skipped layer the
exit-layer residual stream goes through that layer's input norm, the k/v part
of its ``qkv_proj`` and rotary, and the result is written into the layer's
paged KV blocks by vLLM's own cache-update op, so every attention backend that
implements ``do_kv_cache_update`` (CPU, FlashAttention, FlashInfer) keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update


def check_kv_fill_supported(layers: Sequence[nn.Module]) -> None:
    """Refuses attention backends whose cache is written inside the attention kernel."""
    for layer in layers:
        attn = layer.self_attn.attn
        backend = attn.attn_backend
        if getattr(backend, "forward_includes_kv_cache_update", False):
            raise NotImplementedError(
                f"early exit writes K/V of skipped layers with vLLM's cache-update op, "
                f"but the attention backend {backend.get_name()} writes its cache inside "
                "the attention kernel. Choose another backend (CPU_ATTN, FLASH_ATTN, FLASHINFER)."
            )
        if getattr(attn, "kv_sharing_target_layer_name", None) is not None:
            raise NotImplementedError("early exit does not support cross-layer KV sharing.")


def _project_kv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v of ``x`` through the layer's own ``qkv_proj``.

    The q rows are computed and dropped: slicing the weight would save them, but
    platforms repack or quantize linear weights after loading (vLLM's CPU build
    does), so only the layer's own forward is safe on every backend.
    """
    kv = attn.qkv_proj(x)[0][:, attn.q_size :]
    k, v = kv.split([attn.kv_size, attn.kv_size], dim=-1)
    return k, v


class KVPropagator:
    """Fills the paged K/V of skipped layers from the exit layer's residual stream."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.layers = layers

    def fill(self, positions: torch.Tensor, stream: torch.Tensor, skipped: range) -> None:
        for index in skipped:
            layer = self.layers[index]
            attn = layer.self_attn
            k, v = _project_kv(attn, layer.input_layernorm(stream))
            k, _ = attn.rotary_emb(positions, k.contiguous())  # rotary of k alone (no q)
            unified_kv_cache_update(
                k.view(-1, attn.num_kv_heads, attn.head_dim),
                v.view(-1, attn.num_kv_heads, attn.head_dim),
                attn.attn.layer_name,
            )
