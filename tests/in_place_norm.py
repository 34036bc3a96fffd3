"""An in-place fused add+RMSNorm on CPU, as CUDA's ``fused_add_rms_norm`` behaves.

vLLM's CPU norm returns new tensors; the CUDA kernel overwrites its inputs. A
tensor the model keeps across a layer call (a stream saved before the layer)
would be overwritten on CUDA: installing this norm in the engine's process
makes that happen on CPU, so tests can see it.
"""

from __future__ import annotations

ENV = "EARLY_EXIT_TEST_IN_PLACE_NORM"


def install() -> None:
    from vllm.model_executor.layers.layernorm import RMSNorm

    out_of_place = RMSNorm.forward_native

    def forward_native(self, x, residual=None):
        if residual is None:
            return out_of_place(self, x)
        out, new_residual = out_of_place(self, x, residual)
        residual.copy_(new_residual)  # the kernel writes x + residual into residual ...
        x.copy_(out)  # ... and the normed result into x
        return x, residual

    RMSNorm.forward_native = forward_native
