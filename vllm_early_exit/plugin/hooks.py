"""How the plugin hooks into vLLM's engine set-up; ``install_hooks`` installs them all.

* ``EngineArgs.add_cli_args`` / ``from_cli_args``: the ``vllm serve`` flags (``cli.py``).
* ``EngineArgs.create_engine_config`` is wrapped so that ``early_exit``
  settings in ``additional_config`` alone select the early-exit architecture
  (an ``hf_overrides`` entry, as if the user had written it).
* ``MODELS_CONFIG_MAP`` gets an entry for the early-exit architecture. vLLM
  calls it while it builds the ``VllmConfig``: the start-up checks and engine
  settings of ``checks.py``.
* The V1 model runner's ``load_model`` is wrapped (``loading.py``): the runner hands itself to
  the early-exit model it builds, which reads its requests and batch before each step.
* The V1 model runner's ``sample_tokens`` is wrapped (``rewind.py``): a catch-up engine's
  output says which tokens wait, for its scheduler (``scheduler.py``).
* ``CUDAGraphWrapper.__call__`` is wrapped (``graphs.py``): with ``cuda_graphs``,
  an early-exit model's captured steps replay where vLLM replays its full graph.
* ``SamplingParams._verify_args`` is wrapped to check the form of a request's own
  settings (``extra_args["early_exit"]`` or the flat ``vllm_xargs`` keys) when its
  ``SamplingParams`` is made, before it meets an engine.
* ``InputProcessor._validate_params`` (vLLM's admission check of a request's
  parameters, with the engine's config at hand, in the process that takes requests:
  ``LLM`` offline, the API server when served) is wrapped to check them against the
  engine: a threshold in the range of the engine's signal, a depth budget within the
  model's layers. A bad value is the plugin's error from ``LLM.generate`` and an
  HTTP 400 from the server, never a failure inside a decode step.
* ``AsyncLLM.generate`` (what the server calls per request) runs the same check
  when it is called, before its generator starts: a streamed request is admitted
  inside its stream, after the server has answered 200, so without this a bad
  value would reach a streaming client as an error event instead of an HTTP 400.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm.exceptions import VLLMValidationError

from vllm_early_exit.architecture import ARCHITECTURE, MODEL_CLASS
from vllm_early_exit.config import EarlyExitConfig, EarlyExitConfigError, EarlyExitUnsupportedError, RequestEarlyExit
from vllm_early_exit.plugin.checks import request_limits, verify_and_update
from vllm_early_exit.plugin.cli import _wrap_add_cli_args, _wrap_from_cli_args, settings_source, wants_early_exit

__all__ = [
    "ARCHITECTURE", "MODEL_CLASS", "EarlyExitRequestError", "check_request", "install_hooks", "select_architecture",
]


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
            EarlyExitConfig.from_additional_config(self.additional_config, settings_source(self.additional_config))
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


class EarlyExitRequestError(EarlyExitConfigError, VLLMValidationError):
    """A request's own early-exit setting is invalid: the plugin's ``EarlyExitConfigError``, and
    vLLM's request-validation error, which vLLM's server answers with HTTP 400 (vLLM 0.32's
    ``AsyncLLM.generate`` passes on client errors of its own classes only and turns any other
    error of an admission check into a 500)."""

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)
        self.parameter = None
        self.value = None

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):
        return type(self), (str(self),)


def check_request(extra_args: Any, limits=None) -> None:
    """A request's own early-exit settings (``RequestEarlyExit``), raising ``EarlyExitRequestError``."""
    try:
        RequestEarlyExit.from_extra_args(extra_args, limits)
    except EarlyExitConfigError as exc:
        raise EarlyExitRequestError(str(exc)) from None


def _wrap_verify_args(original):
    @functools.wraps(original)
    def _verify_args(self, *args, **kwargs):
        original(self, *args, **kwargs)
        # The form of per-request settings, as soon as they are made (no engine yet);
        # their range is checked when an engine admits the request (_wrap_validate_params).
        check_request(self.extra_args)

    _verify_args.__early_exit_hook__ = True
    return _verify_args


_LIMITS = "_early_exit_request_limits"


def _admit(input_processor, params: Any) -> None:
    """Checks a request's own settings against the engine of ``input_processor``."""
    extra_args = getattr(params, "extra_args", None)
    if not extra_args:
        return
    if _LIMITS not in input_processor.__dict__:  # once per engine: its settings and the model's depth
        input_processor.__dict__[_LIMITS] = request_limits(input_processor.vllm_config)
    limits = input_processor.__dict__[_LIMITS]
    if limits is not None:
        check_request(extra_args, limits)


def _wrap_validate_params(original):
    @functools.wraps(original)
    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        _admit(self, params)
        return result

    _validate_params.__early_exit_hook__ = True
    return _validate_params


def _wrap_generate(original):
    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        params = kwargs["sampling_params"] if "sampling_params" in kwargs else args[1] if len(args) > 1 else None
        _admit(self.input_processor, params)
        return original(self, *args, **kwargs)

    generate.__early_exit_hook__ = True
    return generate


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
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.input_processor import InputProcessor

    if not getattr(EngineArgs.add_cli_args, "__early_exit_hook__", False):
        EngineArgs.add_cli_args = staticmethod(_wrap_add_cli_args(EngineArgs.add_cli_args))
        EngineArgs.from_cli_args = _wrap_from_cli_args(EngineArgs.from_cli_args)
    if not getattr(EngineArgs.create_engine_config, "__early_exit_hook__", False):
        EngineArgs.create_engine_config = _wrap_create_engine_config(EngineArgs.create_engine_config)
    if not getattr(SamplingParams._verify_args, "__early_exit_hook__", False):
        SamplingParams._verify_args = _wrap_verify_args(SamplingParams._verify_args)
    if not getattr(InputProcessor._validate_params, "__early_exit_hook__", False):
        InputProcessor._validate_params = _wrap_validate_params(InputProcessor._validate_params)
    if not getattr(AsyncLLM.generate, "__early_exit_hook__", False):
        AsyncLLM.generate = _wrap_generate(AsyncLLM.generate)
    if ARCHITECTURE not in MODELS_CONFIG_MAP:
        MODELS_CONFIG_MAP[ARCHITECTURE] = _model_config_hook()
    from vllm_early_exit.plugin.graphs import install_graph_dispatch
    from vllm_early_exit.plugin.loading import install_runner_hook
    from vllm_early_exit.plugin.prefix_cache import install_prefix_cache_guard
    from vllm_early_exit.plugin.rewind import install_rewind_hook

    install_runner_hook()  # vLLM's V1 runner hands itself to the model it builds

    install_rewind_hook()  # skipped_kv 'recompute': the runner's output says which tokens wait

    install_graph_dispatch()  # cuda_graphs: the model's captured steps where vLLM replays its full graph

    install_prefix_cache_guard()  # prefix cache of early-exit engines: full-depth blocks only
