"""Where propagated K/V is written: every path that gives a token K/V it did not compute.

A decode token that leaves after layer L, or skips a layer, still needs K/V in
the layers it does not run, or later tokens would attend to holes. State
propagation writes them from the token's residual stream ``s`` (at its exit, or
entering the skipped layer): layer ``l`` stores ``k, v = kv_proj(norm_l(s))``
with rotary on ``k``. This module is the only place that arranges it; each way
below writes exactly that rule:

* ``KVPropagator.fill``: the stream through each layer's input norm, its K/V
  projection and rotary, written by vLLM's own cache-update op (a pure-decode
  step whose rows all left, or a skipped layer in a pure-decode step). The K/V
  projection is built once from the loaded weights (the k and v rows of
  ``qkv_proj``, ``build_kv_projections``), so a fill reads no q rows: 40% of
  ``qkv_proj``'s bytes on SmolLM2, 25% on Qwen2.5-Coder-1.5B;
* ``freeze_rows``: rows that left while others go on get hidden state 0 and
  residual ``s``, so every deeper layer's fused add+norm sees ``s`` and its own
  attention writes their K/V from it (eager walk);
* ``run_layer``: a layer where only the running rows take the MLP (frozen rows
  keep ``s``);
* ``run_layers_holding`` (compiled groups): after each layer the frozen rows'
  hidden state is zeroed and their residual set back to ``s``;
* ``skip_layer`` / ``holding``: decode rows of a mixed step (prefill rows run
  every layer) pass a skipped layer held at their stream, which its attention
  writes as their K/V.

Every attention backend that implements ``do_kv_cache_update`` (CPU, FlashAttention,
FlashInfer) keeps working, since the cache is written by vLLM's op or attention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.model_executor.layers.linear import UnquantizedLinearMethod

from vllm_early_exit.model_executor.early_exit.gemm import platform_linear


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


def _project_kv(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[k | v]`` of ``x`` through the layer's own ``qkv_proj`` (the q rows are computed and dropped)."""
    return attn.qkv_proj(x)[0][:, attn.q_size :]


def kv_projection(attn: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``x -> [k | v]`` from the k and v rows of a loaded ``qkv_proj`` (this rank's shard), or
    None when its weight is not a plain matrix (quantized layers keep ``_project_kv``).

    Called after the checkpoint is loaded and before vLLM post-processes the weights
    (which on CPU repacks them and drops the plain matrix), so it copies the rows it needs.
    """
    qkv = attn.qkv_proj
    weight = getattr(qkv, "weight", None)
    rows = slice(attn.q_size, attn.q_size + 2 * attn.kv_size)
    if (
        not isinstance(getattr(qkv, "quant_method", None), UnquantizedLinearMethod)
        or weight is None
        or weight.dim() != 2
        or weight.shape[0] != rows.stop
    ):
        return None
    bias = getattr(qkv, "bias", None)
    return platform_linear(
        weight.detach()[rows].clone(), None if bias is None else bias.detach()[rows].clone()
    )


class KVPropagator:
    """Fills the paged K/V of layers a step does not run from a residual stream."""

    def __init__(self, layers: Sequence[nn.Module], start: int, end: int) -> None:
        self.layers, self.start, self.end = layers, start, end
        self.kv_projections: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
        """Layer -> its K/V-only projection (``build_kv_projections``); layers without one
        project through ``qkv_proj``."""

    def build_kv_projections(self) -> None:
        """K/V-only projections of this rank's layers, from the weights just loaded."""
        for index in range(self.start, self.end):
            projection = kv_projection(self.layers[index].self_attn)
            if projection is not None:
                self.kv_projections[index] = projection

    def fill(self, positions: torch.Tensor, stream: torch.Tensor, skipped: Iterable[int]) -> None:
        for index in skipped:
            layer = self.layers[index]
            attn = layer.self_attn
            x = layer.input_layernorm(stream)
            projection = self.kv_projections.get(index)
            kv = _project_kv(attn, x) if projection is None else projection(x)
            k, v = kv.split([attn.kv_size, attn.kv_size], dim=-1)
            k, _ = attn.rotary_emb(positions, k.contiguous())  # rotary of k alone (no q)
            unified_kv_cache_update(
                k.view(-1, attn.num_kv_heads, attn.head_dim),
                v.view(-1, attn.num_kv_heads, attn.head_dim),
                attn.attn.layer_name,
            )


def freeze_rows(
    hidden_states: torch.Tensor, residual: torch.Tensor, stream: torch.Tensor, rows: torch.Tensor
) -> None:
    """Holds ``rows`` at ``stream`` (in place): deeper layers write their K/V from it."""
    hidden_states[rows] = 0
    residual[rows] = stream[rows]


def run_layer(
    layer: nn.Module,
    positions: torch.Tensor,
    hidden_states: torch.Tensor,
    residual: torch.Tensor | None,
    running: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer; only ``running`` rows take the MLP (None: every row, vLLM's own forward).

    Attention runs for every row: for frozen rows it writes K/V from their held
    stream, which is what state propagation writes.
    """
    if running is None:
        return layer(positions, hidden_states, residual)
    hidden_states, residual = layer.input_layernorm(hidden_states, residual)
    hidden_states = layer.self_attn(positions=positions, hidden_states=hidden_states)
    hidden, res = layer.post_attention_layernorm(hidden_states[running], residual[running])
    hidden = layer.mlp(hidden)
    out = torch.zeros_like(hidden_states).index_copy_(0, running, hidden)
    return out, residual.index_copy_(0, running, res)


def skip_layer(
    layer: nn.Module,
    positions: torch.Tensor,
    hidden_states: torch.Tensor,
    residual: torch.Tensor | None,
    stream: torch.Tensor,
    skipping: torch.Tensor,
    running: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer that ``skipping`` rows pass unchanged while the other rows run it.

    ``stream``: every row's stream entering the layer (a tensor of its own). The
    layer's attention writes the skipping rows' K/V from it, as a fill would.
    """
    hidden_states, residual = run_layer(layer, positions, hidden_states, residual, running)
    freeze_rows(hidden_states, residual, stream, skipping)
    return hidden_states, residual


def holding(keep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A compiled group's row mask with ``rows`` held at their stream as well."""
    held = keep.clone()
    held[rows] = 0
    return held


def run_layers_holding(
    layers: Sequence[nn.Module],
    positions: torch.Tensor,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    keep: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layers in turn, rows with ``keep == 0`` held at the stream they entered with (no host sync)."""
    held = hidden_states + residual  # a new tensor: the layers update ``residual`` in place
    running = keep > 0
    for layer in layers:
        hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states = hidden_states * keep
        residual = torch.where(running, residual, held)
    return hidden_states, residual
