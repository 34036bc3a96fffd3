"""How the plugin hooks into vLLM's engine set-up; ``install_hooks`` installs them all.

* ``EngineArgs.add_cli_args`` / ``from_cli_args``: the ``vllm serve`` flags (``cli.py``).
* ``EngineArgs.create_engine_config`` is wrapped so that ``early_exit``
  settings in ``additional_config`` alone select the early-exit architecture
  (an ``hf_overrides`` entry, as if the user had written it).
* ``MODELS_CONFIG_MAP`` gets an entry for the early-exit architecture. vLLM
  calls it while it builds the ``VllmConfig``: the start-up checks and engine
  settings of ``checks.py``.
* ``SamplingParams._verify_args`` is wrapped to check a request's own
  ``extra_args["early_exit"]`` when the request is made (HTTP 400 on the server).
"""

from __future__ import annotations

import functools
from typing import Any

from vllm_early_exit.config import EarlyExitConfig, EarlyExitConfigError, EarlyExitUnsupportedError, RequestEarlyExit
from vllm_early_exit.plugin.checks import verify_and_update
from vllm_early_exit.plugin.cli import _wrap_add_cli_args, _wrap_from_cli_args, wants_early_exit

ARCHITECTURE = "EarlyExitLlamaForCausalLM"
MODEL_CLASS = "vllm_early_exit.model_executor.models.llama_early_exit:EarlyExitLlamaForCausalLM"


def select_architecture(hf_overrides: Any) -> Any:
    """``hf_overrides`` with the early-exit architecture, unless the user chose one."""
    if callable(hf_overrides):

        def override(config):
            config = hf_overrides(config)
            config.architectures = [ARCHITECTURE]
            return config

        return override
    overrides = dict(hf_overrides or {})
    overrides.setdefault("architectures", [ARCHITECTURE])
    return overrides


def _wrap_create_engine_config(original):
    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        if wants_early_exit(self.additional_config):
            # Fail on bad settings before vLLM loads anything.
            EarlyExitConfig.from_additional_config(self.additional_config)
            self.hf_overrides = select_architecture(self.hf_overrides)
        try:
            return original(self, *args, **kwargs)
        except ValueError as exc:
            # vLLM's config is a pydantic dataclass: it wraps errors raised by the
            # model config hook. Users should see the plugin's own message.
            cause = _early_exit_cause(exc)
            if cause is None:
                raise
            raise cause from None

    create_engine_config.__early_exit_hook__ = True
    return create_engine_config


def _wrap_verify_args(original):
    @functools.wraps(original)
    def _verify_args(self, *args, **kwargs):
        original(self, *args, **kwargs)
        # Per-request settings are checked when the request is admitted (HTTP 400
        # from the server), never in the middle of a decode step.
        RequestEarlyExit.from_extra_args(self.extra_args)

    _verify_args.__early_exit_hook__ = True
    return _verify_args


def _early_exit_cause(exc: BaseException) -> ValueError | None:
    own = (EarlyExitConfigError, EarlyExitUnsupportedError)
    if isinstance(exc, own):
        return exc
    errors = getattr(exc, "errors", None)
    for error in errors() if callable(errors) else ():
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, own):
            return cause
    return None


def _model_config_hook():
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class EarlyExitModelConfig(VerifyAndUpdateConfig):
        """Checks and adapts the engine settings for the early-exit model."""

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            verify_and_update(vllm_config)

    return EarlyExitModelConfig


def install_hooks() -> None:
    """Installs the hooks once per process (``register()`` may be called again)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.sampling_params import SamplingParams

    if not getattr(EngineArgs.add_cli_args, "__early_exit_hook__", False):
        EngineArgs.add_cli_args = staticmethod(_wrap_add_cli_args(EngineArgs.add_cli_args))
        EngineArgs.from_cli_args = _wrap_from_cli_args(EngineArgs.from_cli_args)
    if not getattr(EngineArgs.create_engine_config, "__early_exit_hook__", False):
        EngineArgs.create_engine_config = _wrap_create_engine_config(EngineArgs.create_engine_config)
    if not getattr(SamplingParams._verify_args, "__early_exit_hook__", False):
        SamplingParams._verify_args = _wrap_verify_args(SamplingParams._verify_args)
    if ARCHITECTURE not in MODELS_CONFIG_MAP:
        MODELS_CONFIG_MAP[ARCHITECTURE] = _model_config_hook()
    from vllm_early_exit.plugin.prefix_cache import install_prefix_cache_guard

    install_prefix_cache_guard()  # prefix cache of early-exit engines: full-depth blocks only
