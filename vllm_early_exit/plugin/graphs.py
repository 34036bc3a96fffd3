"""Where vLLM replays its full CUDA graph of a model, an early-exit model's captured steps replay.

With ``cuda_graphs`` set, the early-exit model carries ``graphed_steps``
(``model_executor/early_exit/graphs.py``). vLLM's model runner wraps a model in a
``CUDAGraphWrapper`` of runtime mode FULL and, for a uniform decode batch, captures
the whole forward as one graph and replays it; a graph of the whole forward would
freeze one path through the exits. ``install_graph_dispatch`` wraps
``CUDAGraphWrapper.__call__`` so that, when the runnable is such a model and the
step runs in FULL mode, the call goes to the model's ``graphed_steps`` instead (with
vLLM's graph pool); every other call, and every other model, is vLLM's own.
"""

from __future__ import annotations

import functools


def _wrap_call(original):
    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        steps = getattr(self.runnable, "graphed_steps", None)
        if steps is None:
            return original(self, *args, **kwargs)
        from vllm.config import CUDAGraphMode
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if self.runtime_mode != CUDAGraphMode.FULL or not is_forward_context_available():
            return original(self, *args, **kwargs)
        context = get_forward_context()
        if context.cudagraph_runtime_mode != CUDAGraphMode.FULL:
            return self.runnable(*args, **kwargs)
        return steps(context.batch_descriptor, self.graph_pool, *args, **kwargs)

    __call__.__early_exit_hook__ = True
    return __call__


def install_graph_dispatch() -> None:
    """Wraps ``CUDAGraphWrapper.__call__`` once per process."""
    from vllm.compilation.cuda_graph import CUDAGraphWrapper

    if not getattr(CUDAGraphWrapper.__call__, "__early_exit_hook__", False):
        CUDAGraphWrapper.__call__ = _wrap_call(CUDAGraphWrapper.__call__)
