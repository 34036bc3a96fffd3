"""Early-exit counters: kept on the device during steps, read on the host when asked.

``ExitCounters`` is what the model counts with. What depends on the rows' own
decisions (tokens that left after each layer, tokens that went the full depth,
tokens sampled from their check's logits) is added to one int64 tensor on the
step's device inside the step, with no host read; what the host decided itself
(where a step stopped, which LM-head products it took, unchecked and replayed
steps) is counted in Python. ``ExitCounters.snapshot`` reads both into an
``ExitStats`` in one copy: ``get_exit_stats`` (``plugin/worker.py``), the
periodic log line and the server's ``/metrics`` read that.

``/metrics`` is served by the API server, the counters live in the engine's
worker. When ``$VLLM_EARLY_EXIT_METRICS_DIR`` names a folder (``vllm serve
--enable-early-exit`` creates one, ``plugin/metrics.py``), the first rank keeps
the per-row counters in a memory-mapped file there (``CounterFile``): on the CPU
the counter tensor is that file, so it is always current; on other devices it is
copied there at most every ``PUBLISH_INTERVAL_S`` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("vllm_early_exit")

METRICS_DIR_ENV = "VLLM_EARLY_EXIT_METRICS_DIR"
PUBLISH_INTERVAL_S = 1.0
"""Seconds between copies of device counters to the metrics file (devices other than the CPU)."""

@dataclass
class ExitStats:
    """Counters over pure-decode tokens, as read from the model (``ExitCounters.snapshot``).

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
    step_exits_per_layer: list[int] = field(default_factory=list)
    """Pure-decode steps whose every row had left after layer ``l``: the stack ran no deeper.
    A step's cost on a weight-bound machine follows its deepest row (``tools/cost.py``)."""
    full_depth_steps: int = 0
    """Pure-decode steps that ran every layer (some row went the full depth)."""
    sampling_products: int = 0
    """Pure-decode steps whose sampling logits took vLLM's LM-head product (some row did not
    leave with a full-vocabulary check's logits)."""
    unchecked_steps: int = 0
    """Steps with more requests decoding than ``max_exit_batch``: they ran the full depth, no check."""
    rerun_rows: int = 0
    """Rows run again for decode tokens that waited (``skipped_kv: "recompute"``): a request's
    tokens that left early ride along with its next token until a step runs every layer. They
    are not decode tokens and not in ``mean_layers``; they cost compute, not weight reads."""

    def __post_init__(self) -> None:
        if not self.exits_per_layer:
            self.exits_per_layer = [0] * self.num_layers
        if not self.step_exits_per_layer:
            self.step_exits_per_layer = [0] * self.num_layers

    @property
    def decode_steps(self) -> int:
        """Pure-decode steps counted (``step_exits_per_layer`` and ``full_depth_steps``)."""
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
            "step_exits_per_layer": list(self.step_exits_per_layer),
            "full_depth_steps": self.full_depth_steps,
            "decode_steps": self.decode_steps,
            "sampling_products": self.sampling_products,
            "unchecked_steps": self.unchecked_steps,
            "rerun_rows": self.rerun_rows,
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
            step_exits_per_layer=list(data.get("step_exits_per_layer", ())),
            full_depth_steps=data.get("full_depth_steps", 0),
            sampling_products=data.get("sampling_products", 0),
            unchecked_steps=data.get("unchecked_steps", 0),
            rerun_rows=data.get("rerun_rows", 0),
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

    def due(self, now: float) -> bool:
        return self.enabled and now - self._last >= self.interval_s

    def log(self, stats: ExitStats, now: float) -> None:
        self._last = now
        logger.info("Early exit: %s", stats.summary())


class CounterFile:
    """The per-row counters of one engine in a memory-mapped int64 file, for ``/metrics``.

    ``engine-<pid>.npy`` holds ``[exits after layer 0, ..., exits after layer N-1, full-depth
    tokens, tokens sampled from checks]``; ``engine-<pid>.json`` the model's name, its layers
    and its skipped layers.
    """

    def __init__(self, folder: Path, model_name: str, num_layers: int, skip_layers: tuple[int, ...] = ()) -> None:
        stem = folder / f"engine-{os.getpid()}"
        meta = {"model_name": model_name, "num_layers": num_layers, "skip_layers": list(skip_layers)}
        stem.with_suffix(".json").write_text(json.dumps(meta))
        self.values = np.lib.format.open_memmap(
            stem.with_suffix(".npy"), mode="w+", dtype=np.int64, shape=(num_layers + 2,)
        )

    @classmethod
    def from_env(cls, model_name: str, num_layers: int, skip_layers: tuple[int, ...] = ()) -> "CounterFile | None":
        """The file in ``$VLLM_EARLY_EXIT_METRICS_DIR``, or None when the server did not ask for one."""
        folder = os.environ.get(METRICS_DIR_ENV)
        return cls(Path(folder), model_name, num_layers, skip_layers) if folder else None


def read_counter_files(folder: Path) -> dict[str, ExitStats]:
    """The per-row counters of every engine in ``folder``, summed per model name."""
    totals: dict[str, ExitStats] = {}
    for meta_path in sorted(folder.glob("engine-*.json")):
        try:
            meta = json.loads(meta_path.read_text())
            values = np.load(meta_path.with_suffix(".npy"), mmap_mode="r")
        except (OSError, ValueError):
            continue  # an engine that is still creating its files
        layers = meta["num_layers"]
        stats = totals.setdefault(
            meta["model_name"], ExitStats(layers, skip_layers=tuple(meta.get("skip_layers", ())))
        )
        for layer, count in enumerate(values[:layers]):
            stats.exits_per_layer[layer] += int(count)
        stats.full_depth_tokens += int(values[layers])
        stats.sampled_from_checks += int(values[layers + 1])
    return totals


class ExitCounters:
    """The model's counters: per-row counts in a device tensor, the host's own counts in Python."""

    def __init__(
        self, num_layers: int, skip_layers: tuple[int, ...] = (), file: CounterFile | None = None,
        log_interval_s: float = 0.0, device: torch.device | None = None,
    ) -> None:
        self.num_layers = num_layers
        self.skip_layers = tuple(skip_layers)
        self.file = file
        device = torch.get_default_device() if device is None else device
        self.rows = (
            torch.from_numpy(file.values)
            if file is not None and device.type == "cpu"
            else torch.zeros(num_layers + 2, dtype=torch.long, device=device)
        )
        """``[exits after each layer..., full-depth tokens, tokens sampled from checks]`` on the
        model's device (on the CPU with server metrics: the metrics file itself). Made with the
        model, outside inference mode, so that resetting it from an RPC may write it."""
        self.logger = PeriodicStatsLogger(log_interval_s, enabled=log_interval_s > 0)
        self.sources: list[Callable[[ExitCounters], None]] = []
        """Counts kept elsewhere on the device (a step captured with conditional nodes counts its
        steps there, ``graphs.ProgramRun.fold``), added in before the counters are read."""
        self._published = time.monotonic()
        self._reset_host()

    def _reset_host(self) -> None:
        self.step_exits_per_layer = [0] * self.num_layers
        self.full_depth_steps = 0
        self.unchecked_steps = 0
        self.full_readouts = 0
        self.sampling_products = 0
        self.replayed_tokens = 0
        self.rerun_rows = 0

    # --- inside a step: device counts, no host read ---------------------------------------

    def exits(self, layer: int, rows: torch.Tensor) -> None:
        """``rows`` (boolean ``[rows]``) left after ``layer``."""
        self.rows[layer] += rows.sum()

    def full_depth(self, rows: torch.Tensor) -> None:
        """``rows`` ran every layer."""
        self.rows[self.num_layers] += rows.sum()

    def sampled(self, rows: torch.Tensor) -> None:
        """``rows`` are sampled from the logits their check read."""
        self.rows[self.num_layers + 1] += rows.sum()

    # --- the host's own counts -------------------------------------------------------------

    def step(self, exit_layer: int | None) -> None:
        """One pure-decode step that ran no deeper than ``exit_layer`` (None: every layer)."""
        if exit_layer is None:
            self.full_depth_steps += 1
        else:
            self.step_exits_per_layer[exit_layer] += 1

    # --- reading -------------------------------------------------------------------------

    def snapshot(self) -> ExitStats:
        """Every counter, read in one copy."""
        for source in self.sources:
            source(self)
        values = self.rows.cpu().tolist()
        return ExitStats(
            num_layers=self.num_layers,
            exits_per_layer=values[: self.num_layers],
            full_depth_tokens=values[self.num_layers],
            skip_layers=self.skip_layers,
            sampled_from_checks=values[self.num_layers + 1],
            replayed_tokens=self.replayed_tokens,
            full_readouts=self.full_readouts,
            step_exits_per_layer=list(self.step_exits_per_layer),
            full_depth_steps=self.full_depth_steps,
            sampling_products=self.sampling_products,
            unchecked_steps=self.unchecked_steps,
            rerun_rows=self.rerun_rows,
        )

    def reset(self) -> None:
        self.rows.zero_()
        self._reset_host()

    def after_step(self) -> None:
        """The periodic log line, and the metrics file where the counters are not that file."""
        now = time.monotonic()
        if self.logger.due(now):
            self.logger.log(self.snapshot(), now)
        publish = self.file is not None and self.rows.device.type != "cpu"
        if publish and now - self._published >= PUBLISH_INTERVAL_S:
            self._published = now
            self.file.values[:] = self.rows.cpu().numpy()
