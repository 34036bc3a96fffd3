"""Where propagated K/V is written: every path that gives a token K/V it did not compute.

A decode token that leaves after layer L, or skips a layer, still needs K/V in
the layers it does not run, or later tokens would attend to holes. State
propagation writes them from the token's residual stream ``s`` (at its exit, or
entering the skipped layer): layer ``l`` stores ``k, v = kv_proj(norm_l(s))``
with rotary on ``k``. This module is the only place that arranges it; each way
below writes exactly that rule:

* ``KVPropagator.fill``: the stream through each layer's input norm, its K/V
  projection and rotary, written by vLLM's own cache-update op (a pure-decode
  step whose rows have all left, or a skipped layer in a pure-decode step). The
  projections are built once from the loaded weights (``build_kv_projections``):
  the k and v rows of every layer's ``qkv_proj`` with the layer's input-norm
  weight folded in, stacked (``FoldedKV``), so a fill reads no q rows (40% of
  ``qkv_proj``'s bytes on SmolLM2, 25% on Qwen2.5-Coder-1.5B) and all its layers
  take one product, one rotary call and one cache write each;
* ``run_layers_holding``: a run of layers in which the rows that left (or that
  pass a skipped layer beside prompt rows) are held at their stream: after each
  layer their hidden state is zeroed and their residual set back to it, so every
  deeper layer's fused add+norm sees it and its own attention writes their K/V
  from it.

Every attention backend that implements ``do_kv_cache_update`` (CPU, FlashAttention,
FlashInfer) keeps working, since the cache is written by vLLM's op or attention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.model_executor.layers.layernorm import RMSNorm
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


@torch.library.custom_op("vllm_early_exit::write_kv", mutates_args=())
def write_kv(k: torch.Tensor, v: torch.Tensor, layer_name: str) -> None:
    """vLLM's cache update (``unified_kv_cache_update``: the step's slot mapping and the layer's
    cache from the forward context) as an op with a side effect, so that a compiled unit keeps
    it although nothing uses its result (``units.ExitBranch``)."""
    unified_kv_cache_update(k, v, layer_name)


@write_kv.register_fake
def _(k: torch.Tensor, v: torch.Tensor, layer_name: str) -> None:
    return None


torch.fx.node.has_side_effect(torch.ops.vllm_early_exit.write_kv.default)


def _write_kv(attn: nn.Module, k: torch.Tensor, v: torch.Tensor) -> None:
    """Writes ``[rows, kv_heads, head_dim]`` K/V of every row of the step into the layer's
    paged cache with vLLM's op (at the step's slot mapping)."""
    write_kv(k, v, attn.attn.layer_name)


def _kv_rows(attn: nn.Module) -> torch.Tensor | None:
    """The k and v rows of a loaded, unquantized ``qkv_proj`` weight (this rank's shard), or None."""
    qkv = attn.qkv_proj
    weight = getattr(qkv, "weight", None)
    if (
        not isinstance(getattr(qkv, "quant_method", None), UnquantizedLinearMethod)
        or weight is None
        or weight.dim() != 2
        or weight.shape[0] != attn.q_size + 2 * attn.kv_size
    ):
        return None
    return weight.detach()[attn.q_size :]


class FoldedKV:
    """The K/V-only projections of a rank's layers as one matrix: each layer's k and v rows of
    ``qkv_proj`` with the layer's input-norm weight folded in, stacked in layer order.

    Every layer's input norm is ``g_l * s / rms(s)``, so for one stream ``s`` the K/V of
    layers ``a..b`` are one product ``(s / rms(s)) @ [W_a diag(g_a); ...; W_b diag(g_b)].T``
    (plus the q/k/v bias), and their rotary one call over ``b - a + 1`` times the heads
    (every layer shares one rotary embedding). A fill of ``n`` layers costs a handful of
    operations instead of a dozen per layer. Fills that reach the last layer from a check
    layer multiply a matrix packed for the platform's GEMM (``gemm.py``; on CPU a packed copy of
    the suffix, built once); other ranges multiply a slice of the stack.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        start: int,
        end: int,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        eps: float,
        packed_starts: Iterable[int],
    ) -> None:
        self.layers, self.start, self.end = layers, start, end
        attn = layers[start].self_attn
        self.rotary = attn.rotary_emb
        self.kv_size, self.num_kv_heads, self.head_dim = attn.kv_size, attn.num_kv_heads, attn.head_dim
        self.weight, self.bias, self.eps = weight, bias, eps
        self._packed = {first: self._pack(first) for first in set(packed_starts) if start <= first < end}

    @classmethod
    def build(
        cls, layers: Sequence[nn.Module], start: int, end: int, packed_starts: Iterable[int]
    ) -> "FoldedKV | None":
        """The folded stack of layers ``start..end - 1`` from their loaded weights, or None when
        some layer does not fit the rule (a quantized ``qkv_proj``, another norm, its own rotary)."""
        first_attn = layers[start].self_attn
        rows, biases, eps = [], [], None
        for index in range(start, end):
            layer = layers[index]
            attn, norm = layer.self_attn, layer.input_layernorm
            kv = _kv_rows(attn)
            if (
                kv is None
                or type(norm) is not RMSNorm
                or not norm.has_weight
                or norm.variance_size_override is not None
                or attn.rotary_emb is not first_attn.rotary_emb
                or (eps is not None and norm.variance_epsilon != eps)
            ):
                return None
            eps = norm.variance_epsilon
            rows.append((kv.float() * norm.weight.detach().float()).to(kv.dtype))
            bias = getattr(attn.qkv_proj, "bias", None)
            biases.append(None if bias is None else bias.detach()[attn.q_size :])
        has_bias = biases[0] is not None
        if any((b is not None) != has_bias for b in biases):
            return None
        bias = torch.cat(biases) if has_bias else None
        return cls(layers, start, end, torch.cat(rows), bias, eps, packed_starts)

    def _slice(self, first: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stack's rows (and bias) of layers ``first..stop - 1``."""
        size = 2 * self.kv_size
        rows = slice((first - self.start) * size, (stop - self.start) * size)
        return self.weight[rows], None if self.bias is None else self.bias[rows]

    def _pack(self, first: int) -> Callable[[torch.Tensor], torch.Tensor]:
        weight, bias = self._slice(first, self.end)
        # The platform may convert the bias it is given; the stack keeps its own.
        return platform_linear(weight, None if bias is None else bias.clone())

    def _project(self, x: torch.Tensor, first: int, stop: int) -> torch.Tensor:
        if stop == self.end and first in self._packed:
            return self._packed[first](x)
        return torch.nn.functional.linear(x, *self._slice(first, stop))

    def project(
        self, positions: torch.Tensor, stream: torch.Tensor, first: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K (with rotary) and V of layers ``first..stop - 1`` from ``stream``:
        ``[rows, stop - first, kv_heads, head_dim]`` each."""
        rows, count = stream.shape[0], stop - first
        s = stream.float()
        normed = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + self.eps)).to(self.weight.dtype)
        kv = self._project(normed, first, stop).view(rows, count, 2, self.kv_size)
        # Rotary of every layer's k at once: the layers' heads side by side, one position per row.
        k, _ = self.rotary(positions, kv[:, :, 0].reshape(rows, count * self.kv_size))
        heads = (self.num_kv_heads, self.head_dim)
        return k.view(rows, count, *heads), kv[:, :, 1].unflatten(-1, heads)

    def fill(self, positions: torch.Tensor, stream: torch.Tensor, first: int, stop: int) -> None:
        k, v = self.project(positions, stream, first, stop)
        for offset, index in enumerate(range(first, stop)):
            _write_kv(self.layers[index].self_attn, k[:, offset], v[:, offset])

    @property
    def packed_starts(self) -> list[int]:
        """The first layers of the fills that multiply a packed matrix."""
        return sorted(self._packed)


class KVPropagator:
    """Fills the paged K/V of layers a step does not run from a residual stream."""

    def __init__(self, layers: Sequence[nn.Module], start: int, end: int, check_layers: Iterable[int] = ()) -> None:
        self.layers, self.start, self.end = layers, start, end
        self.check_layers = frozenset(check_layers)
        self.folded: FoldedKV | None = None
        """The folded K/V-only projections (``build_kv_projections``); None: every fill
        projects through each layer's ``qkv_proj``."""
        self._built = False

    @property
    def kv_projections(self) -> list[int]:
        """The layers whose fills use the folded K/V-only projections."""
        return [] if self.folded is None else list(range(self.start, self.end))

    def build_kv_projections(self) -> None:
        """Folds this rank's K/V-only projections from the weights just loaded (before vLLM
        post-processes them, which on CPU repacks them and drops the plain matrices). The
        fills a step takes when every row leaves at a check layer get packed matrices."""
        starts = [layer + 1 for layer in self.check_layers]
        self.folded = FoldedKV.build(self.layers, self.start, self.end, starts)
        self._built = True

    def ensure_kv_projections(self) -> None:
        """Builds the folded projections once if loading did not: loaders that never call the
        model's ``load_weights`` (``load_format="dummy"``) leave them unbuilt. Called on the
        first forward (vLLM's memory-profiling run, so the stack is counted before the K/V cache
        is sized). Where post-processing has already repacked the weights (the CPU platform)
        nothing fits and fills keep projecting through each layer's ``qkv_proj``."""
        if not self._built:
            self.build_kv_projections()

    def fill(self, positions: torch.Tensor, stream: torch.Tensor, first: int, stop: int) -> None:
        """Writes the K/V of layers ``first..stop - 1`` of every row of the step from ``stream``."""
        if first >= stop:
            return
        if self.folded is not None:
            self.folded.fill(positions, stream, first, stop)
            return
        for index in range(first, stop):
            layer = self.layers[index]
            attn = layer.self_attn
            k, v = _project_kv(attn, layer.input_layernorm(stream)).split([attn.kv_size, attn.kv_size], dim=-1)
            k, _ = attn.rotary_emb(positions, k.contiguous())  # rotary of k alone (no q)
            heads = (-1, attn.num_kv_heads, attn.head_dim)
            _write_kv(attn, k.view(heads), v.view(heads))


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
