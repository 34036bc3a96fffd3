"""vllm-early-exit: early-exit decoding for LLaMA-family models in vLLM.

vLLM calls :func:`register` in every process through the
``vllm.general_plugins`` entry point. It registers the model class lazily (by
``"module:Class"`` string) and installs the engine hooks (``plugin/hooks.py``).
"""

from vllm_early_exit.config import CONFIG_KEY, EarlyExitConfig
from vllm_early_exit.errors import EarlyExitConfigError, EarlyExitUnsupportedError
from vllm_early_exit.model_executor.early_exit.stats import ExitStats
from vllm_early_exit.plugin.worker import get_exit_stats, reset_exit_stats

__all__ = [
    "CONFIG_KEY",
    "EarlyExitConfig",
    "EarlyExitConfigError",
    "EarlyExitUnsupportedError",
    "ExitStats",
    "get_exit_stats",
    "register",
    "reset_exit_stats",
]

__version__ = "0.1.0"


def register() -> None:
    from vllm import ModelRegistry

    from vllm_early_exit.architecture import ARCHITECTURE, MODEL_CLASS
    from vllm_early_exit.plugin.hooks import install_hooks

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    install_hooks()
