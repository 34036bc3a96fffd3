"""Early-exit counters on the server's ``/metrics`` (Prometheus).

The counters live in the worker processes, ``/metrics`` is served by the API
server process. ``vllm serve --enable-early-exit`` therefore creates a folder
(``$VLLM_EARLY_EXIT_METRICS_DIR``, inherited by the engine processes) where the
first tensor-parallel rank of each engine keeps its counters in a small
memory-mapped file (``CounterFile`` in ``model_executor/early_exit/stats.py``: on
the CPU the model counts in that file itself, elsewhere it copies its device
counters there at most every second); a Prometheus collector in the API server
reads the files when ``/metrics`` is scraped.

Exposed names (label ``model_name``; ``layer`` is 0-based):

* ``vllm:early_exit_decode_tokens_total``: decode tokens checked
* ``vllm:early_exit_early_tokens_total``: decode tokens that left early
* ``vllm:early_exit_full_depth_tokens_total``: decode tokens that ran every layer
* ``vllm:early_exit_layer_exits_total{layer}``: tokens that left after that layer
* ``vllm:early_exit_mean_layers``: mean layers computed per decode token
* ``vllm:early_exit_num_layers``: layers of the model
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from vllm_early_exit.model_executor.early_exit.stats import METRICS_DIR_ENV, read_counter_files

ENV_DIR = METRICS_DIR_ENV


class EarlyExitCollector:
    """The API-server side: a Prometheus collector over the engines' counter files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families = {
            "decode": CounterMetricFamily(
                "vllm:early_exit_decode_tokens", "Decode tokens checked for early exit.", labels=["model_name"]
            ),
            "early": CounterMetricFamily(
                "vllm:early_exit_early_tokens", "Decode tokens that left the layer stack early.", labels=["model_name"]
            ),
            "full": CounterMetricFamily(
                "vllm:early_exit_full_depth_tokens", "Decode tokens that ran every layer.", labels=["model_name"]
            ),
            "layer": CounterMetricFamily(
                "vllm:early_exit_layer_exits", "Decode tokens that left after this layer (0-based).",
                labels=["model_name", "layer"],
            ),
            "mean": GaugeMetricFamily(
                "vllm:early_exit_mean_layers", "Mean layers computed per decode token.", labels=["model_name"]
            ),
            "depth": GaugeMetricFamily("vllm:early_exit_num_layers", "Layers of the model.", labels=["model_name"]),
        }
        for model, stats in read_counter_files(self.folder).items():
            families["decode"].add_metric([model], stats.decode_tokens)
            families["early"].add_metric([model], stats.early_exit_tokens)
            families["full"].add_metric([model], stats.full_depth_tokens)
            for layer, count in enumerate(stats.exits_per_layer):
                families["layer"].add_metric([model, str(layer)], count)
            families["mean"].add_metric([model], stats.mean_layers)
            families["depth"].add_metric([model], stats.num_layers)
        yield from families.values()


def enable_server_metrics() -> Path:
    """Called in the API server process before the engine starts (idempotent)."""
    folder = os.environ.get(ENV_DIR)
    if folder:
        return Path(folder)
    from prometheus_client import REGISTRY

    path = Path(tempfile.mkdtemp(prefix="vllm-early-exit-metrics-"))
    os.environ[ENV_DIR] = str(path)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    REGISTRY.register(EarlyExitCollector(path))
    return path
