"""What the commands that run engines share (bench, quality, calibrate, oracle):
stopping an engine, and the machine and versions a result was measured on."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone


def shutdown_engine(llm) -> None:
    """Stops an ``LLM``'s engine core (and its worker processes); best effort.

    The engine's memory goes once the caller drops its last reference to ``llm``.
    """
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # the engine goes away with the object anyway
        pass


def machine_info() -> dict:
    """Date, machine, device and versions, recorded next to every benchmark result."""
    import torch
    import vllm

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
