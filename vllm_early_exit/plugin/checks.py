"""Start-up checks against the loaded model and the engine settings, and the settings early exit needs.

``verify_and_update`` runs while vLLM builds its ``VllmConfig`` (through the
``MODELS_CONFIG_MAP`` entry that ``hooks.install_hooks`` adds), in the process
that starts the engine, before any worker exists. Settings that can be checked
without the model are checked in ``config.py``.
"""

from __future__ import annotations

import logging

from vllm_early_exit.architecture import ARCHITECTURE
from vllm_early_exit.config import EarlyExitConfig, EarlyExitConfigError, EarlyExitUnsupportedError, EngineLimits
from vllm_early_exit.model_executor.early_exit.heads import ExitHeads
from vllm_early_exit.model_executor.early_exit.shortlist import check_shortlist, read_shortlist
from vllm_early_exit.model_executor.models.qwen2_early_exit import QWEN2_MODEL_TYPE, adapt_qwen2_config
from vllm_early_exit.plugin.cli import settings_source
from vllm_early_exit.plugin.catch_up import set_catch_up
from vllm_early_exit.plugin.worker import WORKER_EXTENSION

logger = logging.getLogger("vllm_early_exit")

SUPPORTED_MODEL_TYPES = ("llama", QWEN2_MODEL_TYPE)
"""``hf_config.model_type`` values the early-exit model runs (Qwen2: see ``models/qwen2_early_exit.py``)."""


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
    if model_type == QWEN2_MODEL_TYPE:
        adapt_qwen2_config(hf_config, model_config.model)
    source = settings_source(vllm_config.additional_config)
    settings = EarlyExitConfig.from_additional_config(vllm_config.additional_config, source)
    check_layers = settings.check_layers_for(hf_config.num_hidden_layers, source)
    if settings.heads is not None:
        heads = ExitHeads.load(settings.heads)
        heads.check_base(hf_config.num_hidden_layers, hf_config.hidden_size, hf_config.vocab_size, settings.heads)
        heads.check_layers(check_layers, settings.heads, gates=settings.signal == "gate")
    if settings.vocab_top_k is not None and settings.vocab_top_k > hf_config.vocab_size:
        raise EarlyExitConfigError(
            f"early_exit.vocab_top_k={settings.vocab_top_k} in {source} is invalid: this model's vocabulary "
            f"has {hf_config.vocab_size} tokens."
        )

    if settings.shortlist is not None:
        check_shortlist(read_shortlist(settings.shortlist), hf_config.vocab_size, settings.shortlist)

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
    if settings.shortlist is not None and parallel.tensor_parallel_size > 1:
        raise EarlyExitUnsupportedError(
            "early_exit.shortlist does not support tensor parallelism yet (the LM head is split "
            "across ranks); leave shortlist unset with tensor_parallel_size > 1."
        )
    if vllm_config.speculative_config is not None:
        raise EarlyExitUnsupportedError(
            "early exit cannot be combined with speculative decoding: both change how "
            "decode steps run the layer stack. Turn one of them off."
        )
    if vllm_config.lora_config is not None:
        raise EarlyExitUnsupportedError(
            "early exit does not support LoRA adapters (enable_lora): rows that left the stack are "
            "gathered before the MLP, while vLLM's LoRA kernels map adapters by token position, so a "
            "row could get another request's adapter. Start without LoRA or without early exit."
        )
    _choose_model_runner(vllm_config)
    _check_cuda_graphs(vllm_config, settings)
    _set_execution_mode(vllm_config, settings)
    if settings.catches_up:
        set_catch_up(vllm_config, source)
    if not parallel.worker_extension_cls:
        parallel.worker_extension_cls = WORKER_EXTENSION
    elif parallel.worker_extension_cls != WORKER_EXTENSION:
        logger.warning(
            "worker_extension_cls=%s is set, so get_exit_stats() cannot read the counters.",
            parallel.worker_extension_cls,
        )


def request_limits(vllm_config) -> EngineLimits | None:
    """What this engine admits as a request's own settings; None for an engine without early exit.

    Read where vLLM admits a request (``hooks._wrap_validate_params``); the settings
    passed the start-up checks above when the engine was built.
    """
    model_config = vllm_config.model_config
    if getattr(model_config, "architecture", None) != ARCHITECTURE:
        return None
    settings = EarlyExitConfig.from_additional_config(vllm_config.additional_config)
    return EngineLimits.of(settings, model_config.hf_config.num_hidden_layers)


V2_MODEL_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def _choose_model_runner(vllm_config) -> None:
    """vLLM's V1 model runner: the model reads per-request settings and prompt lengths from its batch.

    Model Runner V2 (vLLM's default on CUDA when Triton is present) keeps neither
    where the model can read them, so per-request settings (``enabled: false``
    among them) would be ignored: never start on it. The choice is the
    ``VLLM_USE_V2_MODEL_RUNNER=0`` environment variable, set in this process (so
    the engine and worker processes inherit it) when the user has not set it;
    engines started later in this process also get V1.
    """
    import os

    explicit = os.environ.get(V2_MODEL_RUNNER_ENV)
    if explicit is not None and explicit.strip().lower() in ("1", "true"):
        raise EarlyExitUnsupportedError(
            f"early exit needs vLLM's V1 model runner, but {V2_MODEL_RUNNER_ENV}={explicit} asks for "
            f"Model Runner V2, where per-request early-exit settings cannot reach the model. "
            f"Unset {V2_MODEL_RUNNER_ENV} (early exit then chooses V1) or set it to 0."
        )
    if not vllm_config.use_v2_model_runner:
        return
    os.environ[V2_MODEL_RUNNER_ENV] = "0"
    logger.info(
        "Early exit runs on vLLM's V1 model runner (%s=0): Model Runner V2 does not expose the "
        "per-request settings and prompt lengths early exit reads.", V2_MODEL_RUNNER_ENV,
    )


def _compiles_by_default() -> bool:
    """Whether ``compile: null`` compiles: on CPU, where compiled groups measured faster than
    eager ones (``benchmarks/results/speed.md``); elsewhere not until measured there."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _check_cuda_graphs(vllm_config, settings: EarlyExitConfig) -> None:
    """``cuda_graphs`` needs a CUDA device, compiled groups, and for ``"conditional"`` graph
    conditional nodes on one rank (NCCL collectives do not instantiate beside them)."""
    mode = settings.cuda_graphs
    if mode is None:
        return
    from vllm.platforms import current_platform

    def refuse(reason: str) -> None:
        raise EarlyExitUnsupportedError(f"early_exit.cuda_graphs={mode!r} is unsupported here: {reason}.")

    if not current_platform.is_cuda():
        refuse("it captures CUDA graphs and this platform is not CUDA (leave cuda_graphs unset)")
    if vllm_config.model_config.enforce_eager or settings.compile is False:
        refuse("it needs the compiled groups and vLLM's CUDA graphs (drop enforce_eager and compile: false)")
    if mode == "conditional":
        import torch

        if not hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node"):
            refuse(f"torch {torch.__version__} has no CUDA graph conditional nodes (torch >= 2.12); use 'branches'")
        if vllm_config.parallel_config.tensor_parallel_size > 1:
            refuse("NCCL collectives do not instantiate beside conditional nodes; use 'branches' with tensor parallelism")


def _set_execution_mode(vllm_config, settings: EarlyExitConfig) -> None:
    """Eager, or compiled layer groups with piecewise CUDA graphs (never one whole-model graph).

    The exit decision is a host-side branch between layers, so a graph of the whole
    forward would freeze one path. vLLM derives its compilation settings from
    ``enforce_eager`` and ``cudagraph_mode`` after this hook runs.
    """
    model_config = vllm_config.model_config
    if not settings.enabled:
        eager_because = "early exit is off (early_exit.enabled is false)"
    elif settings.compile is False:
        eager_because = "early_exit.compile is false"
    elif settings.compile is None and settings.cuda_graphs is None and not _compiles_by_default():
        eager_because = "early_exit.compile is unset, and compiled groups are the default on CPU only"
    else:
        eager_because = None
    if eager_because is not None:
        if not model_config.enforce_eager:
            logger.info("Early exit runs the model eagerly (enforce_eager=True): %s.", eager_because)
            model_config.enforce_eager = True
        return
    if model_config.enforce_eager:
        if settings.compile:
            logger.warning("early_exit.compile is true but enforce_eager=True: the layer groups run eagerly.")
        return
    from vllm.config import CUDAGraphMode

    compilation = vllm_config.compilation_config
    if settings.cuda_graphs is not None:
        # vLLM's default graph mode: full graphs of uniform decode batches are where the
        # plugin captures its steps (``plugin/graphs.py``), piecewise graphs for the rest.
        logger.info("Early exit captures its decode steps as CUDA graphs (cuda_graphs=%s).", settings.cuda_graphs)
        return
    if compilation.cudagraph_mode is None or compilation.cudagraph_mode.has_full_cudagraphs():
        # On platforms without graphs vLLM turns this off again.
        compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE
    logger.info(
        "Early exit compiles the layer groups between decision points (piecewise CUDA graphs on CUDA; "
        "early_exit.compile: false or enforce_eager runs them eagerly)."
    )
