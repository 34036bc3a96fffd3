"""Starting ``vllm serve`` as a user would (the console script) and always stopping it;
reading its ``/metrics``.

The serving benchmark (``serve_bench.py``) and the serving tests share this.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

VLLM = Path(sys.executable).with_name("vllm")
"""The ``vllm`` console script of this environment."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(
    command: Sequence[str], port: int, log_path: Path, startup_timeout: float = 420, env: dict | None = None
) -> Iterator[str]:
    """Runs ``command`` (a ``vllm serve`` line listening on ``port``) with its output in
    ``log_path``; yields the base URL once ``/health`` answers. The server is stopped on
    exit, pass or fail; a server that exits or never gets healthy raises with its log's tail."""
    log = open(log_path, "w+")
    proc = subprocess.Popen(
        list(command), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=None if env is None else {**os.environ, **env},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read()[-5000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                raise TimeoutError(f"vllm serve did not become healthy in {startup_timeout:.0f} s:\n{log.read()[-5000:]}")
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def fetch_metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """Value of one sample in Prometheus text format (labels must all match)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None
