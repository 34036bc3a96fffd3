"""Matmuls the plugin adds to the forward pass, through the GEMM vLLM gives its own linear layers.

On vLLM's CPU build a linear layer's weight is prepacked for oneDNN once, after
loading; a plain ``torch.nn.functional.linear`` on the same weight takes about
twice as long for a decode batch. The shortlist's rows of the LM head and the
K/V-only projections of state propagation are built once from loaded weights
and multiplied the way vLLM multiplies its own layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def platform_linear(
    weight: torch.Tensor, bias: torch.Tensor | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x @ weight.T + bias`` through the platform's GEMM for linear layers.

    On the CPU platform: vLLM's CPU GEMM dispatch (a prepacked oneDNN matmul for
    float32 and bfloat16 weights), which keeps its own packed copy, so ``weight``
    is not kept; where that dispatch is missing or fails, and on every other
    platform, ``torch.nn.functional.linear`` (cuBLAS on CUDA).
    """
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        try:
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            # A stand-in for a linear layer: the dispatch packs ``weight`` and, for kernels
            # that want it, converts ``bias`` in place, as for vLLM's own layers.
            holder = torch.nn.Module()
            holder.weight = torch.nn.Parameter(weight, requires_grad=False)
            holder.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
            dispatch_cpu_unquantized_gemm(holder, remove_weight=True)
            # Empty when the dispatch packed its own copy; the weight itself on its fallback path.
            kept, kept_bias, cpu_linear = holder.weight, holder.bias, holder.cpu_linear
            return lambda x: cpu_linear(x, kept, kept_bias)
        except (ImportError, AttributeError, RuntimeError):
            pass
    return lambda x: torch.nn.functional.linear(x, weight, bias)
