"""The plugin's own matmuls (shortlist rows, K/V-only fills) through vLLM's GEMM dispatch.

No engine: vLLM's CPU GEMM dispatch (prepacked oneDNN here) against
``torch.nn.functional.linear`` on the same weights, with and without a bias.
"""

from __future__ import annotations

import pytest
import torch

from vllm_early_exit.model_executor.early_exit.gemm import platform_linear


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows", [1, 8, 33])
def test_platform_linear_matches_torch_linear(dtype, tolerance, with_bias, rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=generator).to(dtype)
    bias = torch.randn(96, generator=generator).to(dtype) if with_bias else None
    x = torch.randn(rows, 64, generator=generator).to(dtype)
    expected = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    linear = platform_linear(weight.clone(), None if bias is None else bias.clone())
    out = linear(x)
    assert out.shape == (rows, 96)
    torch.testing.assert_close(out.float(), expected, atol=tolerance * 8, rtol=tolerance)
