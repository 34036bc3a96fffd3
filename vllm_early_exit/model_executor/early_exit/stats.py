"""Early-exit counters, kept by the model and logged periodically by the engine.

The model counts, for every decode step, how many tokens left after each layer
and how many went the full depth. They are read from Python through
``plugin/worker.py`` and served on ``/metrics`` through ``plugin/metrics.py``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("vllm_early_exit")

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
    sampled_from_checks: int = 0
    """Tokens sampled from the logits their exit check computed (no second LM-head product)."""
    replayed_tokens: int = 0
    """Generated tokens whose exits were replayed when vLLM recomputed a preempted request."""
    full_readouts: int = 0
    """Full-vocabulary readouts the checks took: each reads the whole LM head once, for
    however many rows (with a shortlist: the confirmations)."""
    deferred_exits: int = 0
    """Tokens whose exit was confirmed after deeper layers had run (``deferred.py``): the
    K/V of those layers was written again from the stream they left with."""
    step_exits_per_layer: list[int] = field(default_factory=list)
    """Pure-decode steps whose every row had left after layer ``l``: the stack ran no deeper.
    A step's cost on a weight-bound machine follows its deepest row (``tools/cost.py``)."""
    full_depth_steps: int = 0
    """Pure-decode steps that ran every layer (some row went the full depth)."""
    sampling_products: int = 0
    """Pure-decode steps whose sampling logits took vLLM's LM-head product (some row did not
    leave with a full-vocabulary check's logits)."""
    unchecked_steps: int = 0
    """Steps with more decode rows than ``max_exit_batch``: they ran the full depth, no check."""

    def __post_init__(self) -> None:
        if not self.exits_per_layer:
            self.exits_per_layer = [0] * self.num_layers
        if not self.step_exits_per_layer:
            self.step_exits_per_layer = [0] * self.num_layers

    def reset(self) -> None:
        """Sets every counter back to zero (in place: the model's walkers hold this object)."""
        self.exits_per_layer = [0] * self.num_layers
        self.full_depth_tokens = 0
        self.sampled_from_checks = 0
        self.replayed_tokens = 0
        self.full_readouts = 0
        self.deferred_exits = 0
        self.step_exits_per_layer = [0] * self.num_layers
        self.full_depth_steps = 0
        self.sampling_products = 0
        self.unchecked_steps = 0

    def record(self, exit_layer: int | None, tokens: int) -> None:
        """Counts ``tokens`` decode tokens that left after ``exit_layer`` (None: full depth)."""
        if exit_layer is None:
            self.full_depth_tokens += tokens
        else:
            self.exits_per_layer[exit_layer] += tokens

    def record_step(self, exit_layer: int | None) -> None:
        """Counts one pure-decode step that ran no deeper than ``exit_layer`` (None: every layer)."""
        if exit_layer is None:
            self.full_depth_steps += 1
        else:
            self.step_exits_per_layer[exit_layer] += 1

    @property
    def decode_steps(self) -> int:
        """Pure-decode steps counted by :meth:`record_step`."""
        return sum(self.step_exits_per_layer) + self.full_depth_steps

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
            "sampled_from_checks": self.sampled_from_checks,
            "replayed_tokens": self.replayed_tokens,
            "full_readouts": self.full_readouts,
            "deferred_exits": self.deferred_exits,
            "step_exits_per_layer": list(self.step_exits_per_layer),
            "full_depth_steps": self.full_depth_steps,
            "decode_steps": self.decode_steps,
            "sampling_products": self.sampling_products,
            "unchecked_steps": self.unchecked_steps,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExitStats":
        return cls(
            num_layers=data["num_layers"],
            exits_per_layer=list(data["exits_per_layer"]),
            full_depth_tokens=data["full_depth_tokens"],
            skip_layers=tuple(data.get("skip_layers", ())),
            sampled_from_checks=data.get("sampled_from_checks", 0),
            replayed_tokens=data.get("replayed_tokens", 0),
            full_readouts=data.get("full_readouts", 0),
            deferred_exits=data.get("deferred_exits", 0),
            step_exits_per_layer=list(data.get("step_exits_per_layer", ())),
            full_depth_steps=data.get("full_depth_steps", 0),
            sampling_products=data.get("sampling_products", 0),
            unchecked_steps=data.get("unchecked_steps", 0),
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
