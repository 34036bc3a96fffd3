"""``skipped_kv: "recompute"`` (catch-up): the engine settings it needs, set at start-up.

A decode token that leaves after layer L waits: the scheduler gives its request back the
tokens that wait (``scheduler.CatchUpScheduler``), so the request's next step runs them
again beside its new token, as one query of several rows, and vLLM's attention rewrites
their K/V in every layer that step runs. The model tells the scheduler which tokens wait
through the runner's output (``rewind.py``). This needs:

* vLLM's synchronous scheduling: with async scheduling the next step is scheduled before
  this step's output is known, and the runner feeds a continuing request only its last
  token from the device (``-1`` placeholders for the others). ``async_scheduling`` is set
  to False here, before vLLM resolves its default (``VllmConfig.__post_init__`` calls this
  hook first); an explicit ``async_scheduling=True`` is refused;
* the plugin's scheduler class, named by its qualified name so that only the engine-core
  process imports it; a ``scheduler_cls`` of the user's that is not a subclass of it is
  refused (it would not give tokens back);
* no replay of exits after preemption (``replay.py``): the model turns it off for these
  engines, since a recompute at full depth is already exact;
* the prefix-cache guard (``prefix_cache.py``), which vLLM's ``Scheduler`` subclasses keep:
  it caches prompt blocks only, so no block that holds a waiting token is ever cached.
"""

from __future__ import annotations

import importlib
import logging

from vllm_early_exit.errors import EarlyExitUnsupportedError

logger = logging.getLogger("vllm_early_exit")

SCHEDULER = "vllm_early_exit.plugin.scheduler.CatchUpScheduler"
"""The scheduler class of catch-up engines, by qualified name (``scheduler.py``)."""


def _resolve(qualname: str) -> object:
    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _is_catch_up_scheduler(cls: object) -> bool:
    """Whether a ``scheduler_cls`` (a class or its qualified name) is ``CatchUpScheduler`` or a subclass."""
    if cls == SCHEDULER:
        return True
    try:
        resolved = _resolve(cls) if isinstance(cls, str) else cls
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(resolved, type) and issubclass(resolved, _resolve(SCHEDULER))


def set_catch_up(vllm_config, source: str) -> None:
    """Synchronous scheduling and the catch-up scheduler; refuses engine settings that would
    keep a waiting token from being run again."""
    scheduler = vllm_config.scheduler_config
    if scheduler.async_scheduling:
        raise EarlyExitUnsupportedError(
            f"early_exit.skipped_kv='recompute' in {source} needs vLLM's synchronous scheduling: with "
            "async_scheduling the next step is scheduled before this step's exits are known. Leave "
            "async_scheduling unset (early exit turns it off) or use skipped_kv 'propagate'."
        )
    if scheduler.scheduler_cls is not None and not _is_catch_up_scheduler(scheduler.scheduler_cls):
        raise EarlyExitUnsupportedError(
            f"early_exit.skipped_kv='recompute' in {source} needs the scheduler class {SCHEDULER} (or a "
            f"subclass), which gives a request back its waiting tokens; scheduler_cls="
            f"{scheduler.scheduler_cls!r} is another. Leave scheduler_cls unset or use skipped_kv 'propagate'."
        )
    scheduler.async_scheduling = False
    if scheduler.scheduler_cls is None:
        scheduler.scheduler_cls = SCHEDULER
    logger.info(
        "Early exit recomputes the K/V of skipped layers (skipped_kv='recompute'): synchronous scheduling, "
        "scheduler %s.", scheduler.scheduler_cls,
    )
