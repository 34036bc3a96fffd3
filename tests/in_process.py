"""Runs a test file's own runner in a fresh process whose engine cores run in that process.

With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the scheduler and its KV cache manager can be
inspected and patched from the runner, and ``LLM.generate`` queues every request before the
first step (see ``one_process_env``). The runner is the test file run as a script:
``python FILE OUT.json MODEL``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import one_process_env


def run_script(script: str, out: Path, model: Path, timeout: int) -> dict:
    proc = subprocess.run(
        [sys.executable, script, str(out), str(model)],
        capture_output=True, text=True, timeout=timeout, check=False,
        env=one_process_env(),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"engine run failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())
