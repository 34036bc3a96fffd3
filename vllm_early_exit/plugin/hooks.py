"""How the plugin hooks into vLLM's engine set-up.

Four hooks, all installed by ``register()``:

* ``EngineArgs.add_cli_args`` / ``from_cli_args`` are wrapped to add
  ``--enable-early-exit`` and ``--early-exit-config`` to ``vllm serve`` and to
  turn them into the ``early_exit`` entry of ``additional_config`` (vLLM builds
  the ``serve`` parser after loading plugins, so the flags show in ``--help``).

* ``EngineArgs.create_engine_config`` is wrapped so that ``early_exit``
  settings in ``additional_config`` alone select the early-exit architecture
  (an ``hf_overrides`` entry, as if the user had written it).
* ``MODELS_CONFIG_MAP`` gets an entry for the early-exit architecture. vLLM
  calls it while it builds the ``VllmConfig`` (in the process that starts the
  engine, before any worker exists): it checks the model and the settings and
  adapts the engine settings that early exit needs.
* ``SamplingParams._verify_args`` is wrapped to check a request's own
  ``extra_args["early_exit"]`` when the request is made (HTTP 400 on the server).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import fields
from typing import Any

from vllm_early_exit.config import (
    CONFIG_KEY,
    EarlyExitConfig,
    EarlyExitConfigError,
    EarlyExitUnsupportedError,
    RequestEarlyExit,
)
from vllm_early_exit.model_executor.early_exit.heads import ExitHeads
from vllm_early_exit.model_executor.early_exit.stats import WORKER_EXTENSION

logger = logging.getLogger("vllm_early_exit")

ARCHITECTURE = "EarlyExitLlamaForCausalLM"
MODEL_CLASS = "vllm_early_exit.model_executor.models.llama_early_exit:EarlyExitLlamaForCausalLM"
SUPPORTED_MODEL_TYPES = ("llama",)


def wants_early_exit(additional_config: Any) -> bool:
    return isinstance(additional_config, dict) and CONFIG_KEY in additional_config


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


CLI_HELP = {
    "--enable-early-exit": (
        "Serve the model with early exit (vllm-early-exit plugin): pure-decode steps may "
        "leave the layer stack after a confident check layer. LLaMA-family models only."
    ),
    "--early-exit-config": (
        "Early-exit settings as inline JSON or the path of a JSON file, e.g. "
        '\'{"signal": "max_prob", "threshold": 0.9, "min_layer": 20}\'. Implies '
        "--enable-early-exit. Same schema as the offline additional_config "
        '{"early_exit": {...}}; keys: ' + ", ".join(f.name for f in fields(EarlyExitConfig)) + "."
    ),
}


def _wrap_add_cli_args(original):
    @functools.wraps(original)
    def add_cli_args(parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        group = parser.add_argument_group(
            "EarlyExit", "Early-exit decoding (vllm-early-exit plugin). See its README."
        )
        group.add_argument(
            "--enable-early-exit", action="store_true", default=False, help=CLI_HELP["--enable-early-exit"]
        )
        group.add_argument("--early-exit-config", default=None, help=CLI_HELP["--early-exit-config"])
        return parser

    add_cli_args.__early_exit_hook__ = True
    return add_cli_args


def settings_from_cli(args) -> dict[str, Any] | None:
    """The ``early_exit`` settings that ``--enable-early-exit``/``--early-exit-config`` ask for."""
    value = getattr(args, "early_exit_config", None)
    if value is not None:
        return EarlyExitConfig.from_cli_value(value)
    return {} if getattr(args, "enable_early_exit", False) else None


def _wrap_from_cli_args(original):
    @functools.wraps(original)
    def from_cli_args(cls, args, *rest, **kwargs):
        settings = settings_from_cli(args)
        if settings is not None:
            additional = dict(getattr(args, "additional_config", None) or {})
            if CONFIG_KEY in additional and additional[CONFIG_KEY] != settings and settings:
                raise EarlyExitConfigError(
                    "early-exit settings given twice: in --additional-config and in "
                    "--early-exit-config. Use one of them."
                )
            additional.setdefault(CONFIG_KEY, settings)
            args.additional_config = additional
        if wants_early_exit(getattr(args, "additional_config", None)):
            from vllm_early_exit.plugin.metrics import enable_server_metrics

            enable_server_metrics()
        return original.__func__(cls, args, *rest, **kwargs)

    from_cli_args.__early_exit_hook__ = True
    return classmethod(from_cli_args)


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


def verify_and_update(vllm_config) -> None:
    """Start-up checks and the engine settings early exit needs.

    Raises ``EarlyExitConfigError`` for bad settings and ``EarlyExitUnsupportedError``
    for a model or engine setting early exit cannot run with, each with a message that names the setting and what is allowed.
    """
    model_config = vllm_config.model_config
    hf_config = model_config.hf_config
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EarlyExitUnsupportedError(
            f"early exit supports LLaMA-family models (model_type {list(SUPPORTED_MODEL_TYPES)}); "
            f"{model_config.model} has model_type {model_type!r}. Start it without early exit."
        )
    settings = EarlyExitConfig.from_additional_config(vllm_config.additional_config)
    check_layers = set(settings.exit_layers_for(hf_config.num_hidden_layers)) - set(settings.skip_layers)
    if settings.heads is not None:
        heads = ExitHeads.load(settings.heads)
        heads.check_base(hf_config.num_hidden_layers, hf_config.hidden_size, hf_config.vocab_size, settings.heads)
        heads.check_layers(check_layers, settings.heads, gates=settings.signal == "gate")
    if settings.vocab_top_k is not None and settings.vocab_top_k > hf_config.vocab_size:
        raise EarlyExitConfigError(
            f"early_exit.vocab_top_k={settings.vocab_top_k} is invalid: this model's vocabulary "
            f"has {hf_config.vocab_size} tokens."
        )

    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        raise EarlyExitUnsupportedError(
            "early exit does not support pipeline parallelism "
            f"(pipeline_parallel_size={parallel.pipeline_parallel_size}): the exit decision "
            "needs the LM head at every check layer. Use tensor parallelism instead."
        )
    if settings.vocab_top_k is not None and parallel.tensor_parallel_size > 1:
        raise EarlyExitUnsupportedError(
            "early_exit.vocab_top_k does not support tensor parallelism yet (the LM head is "
            "split across ranks); leave vocab_top_k unset with tensor_parallel_size > 1."
        )
    if vllm_config.speculative_config is not None:
        raise EarlyExitUnsupportedError(
            "early exit cannot be combined with speculative decoding: both change how "
            "decode steps run the layer stack. Turn one of them off."
        )
    _set_execution_mode(vllm_config, settings)
    if not parallel.worker_extension_cls:
        parallel.worker_extension_cls = WORKER_EXTENSION
    elif parallel.worker_extension_cls != WORKER_EXTENSION:
        logger.warning(
            "worker_extension_cls=%s is set, so get_exit_stats() cannot read the counters.",
            parallel.worker_extension_cls,
        )


def _set_execution_mode(vllm_config, settings: EarlyExitConfig) -> None:
    """Eager, or compiled layer groups with piecewise CUDA graphs (never one whole-model graph).

    The exit decision is a host-side branch between layers, so a graph of the whole
    forward would freeze one path. vLLM derives its compilation settings from
    ``enforce_eager`` and ``cudagraph_mode`` after this hook runs.
    """
    model_config = vllm_config.model_config
    if not (settings.enabled and settings.compile):
        if not model_config.enforce_eager:
            logger.info("Early exit runs the model eagerly (enforce_eager=True; set early_exit.compile to compile).")
            model_config.enforce_eager = True
        return
    if model_config.enforce_eager:
        logger.warning("early_exit.compile is set but enforce_eager=True: the layer groups run eagerly.")
        return
    from vllm.config import CUDAGraphMode

    compilation = vllm_config.compilation_config
    if compilation.cudagraph_mode is None or compilation.cudagraph_mode.has_full_cudagraphs():
        # On platforms without graphs vLLM turns this off again.
        compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE
    logger.info("Early exit compiles the layer groups between decision points (piecewise CUDA graphs on CUDA).")


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
