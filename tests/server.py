"""Starts `vllm serve` as a user would (the console script) and always stops it."""

from __future__ import annotations

import os
from pathlib import Path

from vllm_early_exit.tools.serving import VLLM, fetch_metrics, free_port, metric_value  # noqa: F401
from vllm_early_exit.tools.serving import running_server as _running_server


def serve_command(model: Path, port: int, *extra: str) -> list[str]:
    return [
        str(VLLM), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "512", "--enforce-eager", *extra,
    ]


def running_server(model: Path, *extra: str, startup_timeout: float = 420):
    """Yields the base URL once /health answers; the server is stopped on exit, pass or fail."""
    port = free_port()
    log = Path(os.environ["VLLM_CACHE_ROOT"]).parent / f"serve-{port}.log"
    return _running_server(serve_command(model, port, *extra), port, log, startup_timeout)
