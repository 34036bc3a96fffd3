"""The load hook: vLLM's V1 model runner hands itself to the model it builds.

vLLM gives a model no handle on its runner, but the early-exit model reads the runner's
request table and persistent batch before every step (``early_exit/runner.py``). The V1
runner builds the model inside its ``load_model`` (it calls vLLM's ``get_model`` or a model
loader there). ``install_runner_hook`` wraps that method, in every process the plugin loads in
(vLLM loads it in each worker before the worker and its runner exist), so that the runner is
the loading runner (``runner.loading``) for the length of the call; the model takes it while
it is constructed. Nothing is read from the call stack.

Wrapped: ``GPUModelRunner.load_model`` (``vllm.v1.worker.gpu_model_runner``; the runner
classes of other devices that subclass it without their own ``load_model`` inherit the
wrapper) and, on the CPU platform, ``CPUModelRunner.load_model``
(``vllm.v1.worker.cpu_model_runner``), which replaces it. Model Runner V2 is another class and
is not wrapped: the plugin runs V1 (``checks.py``), and a model built by any other runner
refuses to start with a message that says so.
"""

from __future__ import annotations

import functools
import importlib
import logging

from vllm_early_exit.model_executor.early_exit.runner import loading

logger = logging.getLogger("vllm_early_exit")

GPU_RUNNER = ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner")
CPU_RUNNER = ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner")


def _wrap_load_model(original):
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        with loading(self):
            return original(self, *args, **kwargs)

    load_model.__early_exit_hook__ = True
    return load_model


def runner_classes() -> list[type]:
    """The V1 runner classes of this platform whose own ``load_model`` builds the model."""
    from vllm.platforms import current_platform

    found = []
    for module, name in (GPU_RUNNER, CPU_RUNNER) if current_platform.is_cpu() else (GPU_RUNNER,):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError) as exc:  # a build without this runner
            logger.debug("Early exit: no %s.%s to hand the runner over (%s)", module, name, exc)
    return found


def install_runner_hook() -> None:
    """Wraps each runner class's own ``load_model`` once (``register()`` may be called again)."""
    for cls in runner_classes():
        own = cls.__dict__.get("load_model")
        if own is not None and not getattr(own, "__early_exit_hook__", False):
            cls.load_model = _wrap_load_model(own)
