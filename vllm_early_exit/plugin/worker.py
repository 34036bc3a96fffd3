"""Reading the counters from Python: a worker extension and ``get_exit_stats``.

The counters live in the workers' model (``ExitStats``). ``get_exit_stats(llm)``
reads them through vLLM's ``collective_rpc`` and a worker extension that the
plugin installs (``EarlyExitWorkerExtension``, as ``worker_extension_cls``).
"""

from __future__ import annotations

from typing import Any

from vllm_early_exit.model_executor.early_exit.stats import ExitStats

WORKER_EXTENSION = "vllm_early_exit.plugin.worker.EarlyExitWorkerExtension"


class EarlyExitWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): RPCs for the counters and the execution mode."""

    def _early_exit_model(self):
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        inner = getattr(model, "model", None)
        if not hasattr(inner, "exit_counters"):
            raise RuntimeError(
                f"{type(model).__name__} is not the early-exit model; "
                "start vLLM with early exit enabled to read its statistics."
            )
        return inner

    def early_exit_stats(self) -> dict[str, Any]:
        return self._early_exit_model().exit_counters.snapshot().to_dict()

    def reset_early_exit_stats(self) -> None:
        self._early_exit_model().exit_counters.reset()

    def early_exit_layer_groups(self) -> list[dict[str, Any]]:
        """The compiled layer groups (``compile``) and whether each has been compiled, the whole
        stack that full-depth steps run last (``"full_depth": True``); [] when eager."""
        stack = self._early_exit_model().compiled_stack
        if stack is None:
            return []
        compiled = lambda module: bool(getattr(module, "compiled", False))  # noqa: E731
        groups = [{"layers": [first, stop], "compiled": compiled(group)} for (first, stop), group in stack.groups.items()]
        start, end = stack.bounds[0][0], stack.bounds[-1][1]
        return [*groups, {"layers": [start, end], "compiled": compiled(stack.full), "full_depth": True}]

    def early_exit_kv_projections(self) -> list[int]:
        """The layers whose propagated K/V comes from a K/V-only projection (the rest use ``qkv_proj``)."""
        return sorted(self._early_exit_model().kv_propagator.kv_projections)


def get_exit_stats(llm, all_ranks: bool = False) -> ExitStats | list[ExitStats]:
    """Early-exit counters of an ``LLM`` (or ``LLMEngine``) since start or the last reset.

    Returns the first worker's counters; ``all_ranks=True`` returns one per worker
    (tensor-parallel ranks take the same decisions, so they agree).
    """
    per_rank = [ExitStats.from_dict(d) for d in llm.collective_rpc("early_exit_stats")]
    return per_rank if all_ranks else per_rank[0]


def reset_exit_stats(llm) -> None:
    """Sets the early-exit counters of every worker back to zero."""
    llm.collective_rpc("reset_early_exit_stats")
