"""Early-exit statistics: counted in the model, logged by the engine, read from Python.

The model counts, for every pure-decode step, how many tokens left after each
layer and how many went the full depth. ``get_exit_stats(llm)`` reads the
counters from the workers through vLLM's ``collective_rpc`` and a worker
extension that the plugin installs (``EarlyExitWorkerExtension``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("vllm_early_exit")

WORKER_EXTENSION = "vllm_early_exit.model_executor.early_exit.stats.EarlyExitWorkerExtension"


@dataclass
class ExitStats:
    """Counters over pure-decode tokens.

    ``exits_per_layer[l]`` counts tokens that left after layer ``l`` (0-based),
    so they computed ``l + 1`` layers less the ``skip_layers`` up to ``l``;
    ``full_depth_tokens`` computed every layer that is not skipped.
    """

    num_layers: int
    exits_per_layer: list[int] = field(default_factory=list)
    full_depth_tokens: int = 0
    skip_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.exits_per_layer:
            self.exits_per_layer = [0] * self.num_layers

    def record(self, exit_layer: int | None, tokens: int) -> None:
        """Counts ``tokens`` decode tokens that left after ``exit_layer`` (None: full depth)."""
        if exit_layer is None:
            self.full_depth_tokens += tokens
        else:
            self.exits_per_layer[exit_layer] += tokens

    @property
    def decode_tokens(self) -> int:
        """Decode tokens checked: those that left early plus those that went full depth."""
        return sum(self.exits_per_layer) + self.full_depth_tokens

    @property
    def early_exit_tokens(self) -> int:
        return sum(self.exits_per_layer)

    @property
    def layers_computed(self) -> int:
        skipped = set(self.skip_layers)
        depth, computed = 0, []
        for layer in range(self.num_layers):
            depth += layer not in skipped
            computed.append(depth)
        early = sum(computed[layer] * n for layer, n in enumerate(self.exits_per_layer))
        return early + self.full_depth_tokens * computed[-1]

    @property
    def mean_layers(self) -> float:
        """Mean layers computed per decode token (``num_layers`` when nothing was decoded)."""
        tokens = self.decode_tokens
        return self.layers_computed / tokens if tokens else float(self.num_layers)

    @property
    def mean_depth_fraction(self) -> float:
        return self.mean_layers / self.num_layers

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "exits_per_layer": list(self.exits_per_layer),
            "full_depth_tokens": self.full_depth_tokens,
            "decode_tokens": self.decode_tokens,
            "early_exit_tokens": self.early_exit_tokens,
            "mean_layers": self.mean_layers,
            "skip_layers": list(self.skip_layers),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExitStats":
        return cls(
            num_layers=data["num_layers"],
            exits_per_layer=list(data["exits_per_layer"]),
            full_depth_tokens=data["full_depth_tokens"],
            skip_layers=tuple(data.get("skip_layers", ())),
        )

    def summary(self) -> str:
        exits = {layer: n for layer, n in enumerate(self.exits_per_layer) if n}
        return (
            f"{self.decode_tokens} decode tokens, {self.early_exit_tokens} left early, "
            f"mean depth {self.mean_layers:.2f}/{self.num_layers} layers, exits per layer {exits}"
        )


class PeriodicStatsLogger:
    """Logs a one-line summary of the counters at most every ``interval_s`` seconds."""

    def __init__(self, interval_s: float, enabled: bool) -> None:
        self.interval_s = interval_s
        self.enabled = enabled and interval_s > 0
        self._last = time.monotonic()

    def maybe_log(self, stats: ExitStats) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            logger.info("Early exit: %s", stats.summary())


class EarlyExitWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): RPCs for the counters and the execution mode."""

    def _early_exit_model(self):
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        inner = getattr(model, "model", None)
        if not hasattr(inner, "exit_stats"):
            raise RuntimeError(
                f"{type(model).__name__} is not the early-exit model; "
                "start vLLM with early exit enabled to read its statistics."
            )
        return inner

    def early_exit_stats(self) -> dict[str, Any]:
        return self._early_exit_model().exit_stats.to_dict()

    def reset_early_exit_stats(self) -> None:
        inner = self._early_exit_model()
        inner.exit_stats = ExitStats(inner.exit_stats.num_layers, skip_layers=inner.exit_stats.skip_layers)

    def early_exit_layer_groups(self) -> list[dict[str, Any]]:
        """The compiled layer groups (``compile``) and whether each has been compiled; [] when eager."""
        stack = self._early_exit_model().compiled_stack
        if stack is None:
            return []
        return [
            {"layers": [first, stop], "compiled": bool(getattr(group, "compiled", False))}
            for (first, stop), group in stack.groups.items()
        ]


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
