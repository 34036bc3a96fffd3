"""What the GPU check runs: the models, the early-exit settings (the speed benchmark's modes in
``vllm_early_exit/tools/bench.py``) and the tests' helpers it borrows."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
"""The entry point: ``scripts/gpu_check.sh`` runs it, and it runs itself as ``--worker``."""

SMOLLM2 = "/tmp/models/smollm2"
LLAMA8B = "/tmp/models/llama8b-shape"
HALF_DEPTH_LIMIT = 1.9
"""Plain vLLM with 16 of 32 layers over all 32 (H100, gpu-bundle/README.md): 1.87x-1.92x."""


# ---------------------------------------------------------------------------------------------
# Settings (the same as the speed benchmark's modes in vllm_early_exit/tools/bench.py)


def forced_settings(num_layers: int) -> dict:
    """``forced_50``: every decode token leaves after layer num_layers // 2 - 1."""
    return {"exit_layers": [num_layers // 2 - 1], "threshold": 0.0, "policy": "per_token"}


def deep_layers(num_layers: int) -> list[int]:
    """The check layers of bench's ``never`` and ``per_token`` modes: every second from 2/3 depth."""
    return list(range(max(1, (2 * num_layers) // 3), num_layers - 1, 2))


def never_settings(num_layers: int, shortlist: str | None) -> tuple[str, dict]:
    """Max-prob checks that never fire, the cheapest way there is: ``never_shortlist`` scores a
    token shortlist first (a full readout only for rows it lets through, here none); without a
    shortlist file, ``never_top_k`` prunes later checks to the first one's 256 top tokens."""
    settings = {"signal": "max_prob", "threshold": 1.0, "exit_layers": deep_layers(num_layers)}
    if shortlist is not None:
        return "never_shortlist", {**settings, "shortlist": shortlist}
    return "never_top_k", {**settings, "vocab_top_k": 256}

# Helpers from tests/ (conftest imports pytest at module level; the GPU image may lack it)


def tests_conftest():
    if importlib.util.find_spec("pytest") is None:
        stub = types.ModuleType("pytest")
        stub.fixture = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda f: f))
        sys.modules["pytest"] = stub
    from tests import conftest

    return conftest


def tiny_model(args) -> Path:
    """The tests' tiny random LLaMA (``tests/conftest.py``), made once in the scratch folder."""
    tiny = Path(args.scratch) / "tiny_llama"
    if not (tiny / "config.json").exists():
        tests_conftest().make_tiny_llama(tiny)
    return tiny
