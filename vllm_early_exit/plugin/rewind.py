"""The runner's output tells the scheduler which tokens wait (``skipped_kv: "recompute"``).

vLLM's V1 model runner builds each step's ``ModelRunnerOutput`` in ``sample_tokens``, after
the forward pass and the sampler, and (with synchronous scheduling, which catch-up engines
run) returns it as it is to the worker, the executor and the scheduler's
``update_from_output``. ``install_rewind_hook`` wraps ``GPUModelRunner.sample_tokens`` at
class level (the CPU runner inherits it): when the runner's model is an early-exit model that
catches up, the returned output gets one more attribute, ``early_exit_rewind``
(``{req_id: waiting tokens}``, the requests whose group left the stack early in this step),
which ``scheduler.CatchUpScheduler`` reads. ``ModelRunnerOutput`` is a plain dataclass, so the
attribute travels wherever the output is pickled (vLLM's multiprocess executor); the shared
``EMPTY_MODEL_RUNNER_OUTPUT`` and other kinds of output are never touched. Every rank's model
decides the same exits from the same logits; the executor returns the first rank's output.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger("vllm_early_exit")

REWIND_ATTRIBUTE = "early_exit_rewind"
"""The attribute of a ``ModelRunnerOutput`` that carries ``{req_id: waiting tokens}``."""

GPU_RUNNER = ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner")


def _wrap_sample_tokens(original):
    @functools.wraps(original)
    def sample_tokens(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        take = getattr(self.get_model(), "take_waiting", None)
        if take is not None:
            attach(output, take())
        return output

    sample_tokens.__early_exit_hook__ = True
    return sample_tokens


def attach(output, waiting: dict[str, int] | None) -> None:
    """Puts ``waiting`` on a step's own ``ModelRunnerOutput`` (None: the model does not catch up)."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    if waiting is None or not isinstance(output, ModelRunnerOutput) or output is EMPTY_MODEL_RUNNER_OUTPUT:
        return
    setattr(output, REWIND_ATTRIBUTE, waiting)


def install_rewind_hook() -> None:
    """Wraps the V1 runner's ``sample_tokens`` once (``register()`` may be called again)."""
    import importlib

    module, name = GPU_RUNNER
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:  # a build without this runner
        logger.debug("Early exit: no %s.%s to report waiting tokens (%s)", module, name, exc)
        return
    own = cls.__dict__.get("sample_tokens")
    if own is not None and not getattr(own, "__early_exit_hook__", False):
        cls.sample_tokens = _wrap_sample_tokens(own)
