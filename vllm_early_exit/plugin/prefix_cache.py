"""Prefix caching in an early-exit engine: only K/V that full depth wrote is ever served from the cache.

The problem. When a decode token leaves the stack after layer L, the deeper
layers get K/V from the layer-L stream (state propagation), not the K/V plain
vLLM would compute. vLLM's prefix cache caches every full block of a request,
decode-filled ones too, under a hash of token ids and extra keys (LoRA,
multimodal, ``cache_salt``) that says nothing about early exit. The next turn
of a chat (prompt = previous prompt + previous output + new text), a request
with early exit off, or any prefill that shares those tokens would then read
propagated K/V and could decode differently from plain vLLM.

The rule, enforced in the scheduler's KV cache manager of early-exit engines:
a block enters the prefix cache only when every token in it, and every token
before it, was computed at full depth. Full depth is known from the schedule
alone: the model treats a request's tokens as prefill (every layer) when they
are scheduled as a chunk of more than one token (``batch.py``: a decode row is
a one-token row; a step whose rows are all one token long is a pure-decode
step, where every row may leave). So, per request, the guard keeps the length
of its *exact prefix*:

* it starts at the request's local prefix-cache hit (those blocks passed this
  rule when they were cached, so they are exact by induction);
* a chunk of more than one token that starts at the end of the exact prefix
  extends it, up to the end of the prompt (prompt chunks; after a preemption,
  the recomputed prompt: the recomputed output tokens replay the exits they
  took while decoding, ``replay.py``, so their K/V is propagated again);
* a one-token chunk ends it: decode tokens, and also the rare one-token prompt
  chunk (a prompt whose blocks all hit but its last token, a one-token last
  chunk of a chunked prefill). Whether the model runs such a prompt row at full
  depth depends on ``batch.py``'s decode rule (prompt rows never leave under
  the rule that checks ``num_prompt_tokens`` on every step; an older rule took
  every step shaped like decode as decode); the guard counts them as inexact
  either way, so it depends only on what every version of that rule shares:
  a row of more than one token is never a decode row;
* tokens loaded by a KV connector (``num_external_computed_tokens``) end it too
  (the connector may hold blocks this rule never saw);
* it never exceeds ``request.num_computed_tokens`` (vLLM lowers that after a
  preemption or a failed KV load).

Every call that caches blocks (``KVCacheCoordinator.cache_blocks``, reached from
``KVCacheManager.allocate_slots`` at scheduling time, from
``KVCacheManager.cache_blocks`` after an async-scheduled step or a finished KV
load) gets its token count capped at the exact prefix; vLLM caches only the full
blocks below that count, so a block holding any propagated K/V (or any token
after one) never gets a hash and can never be hit. What may be reused:

* by any request (early exit on or off, or a plain prefill): blocks of other
  requests' prompts (and of recomputed prompts after preemption), which are
  exactly plain vLLM's K/V;
* never: a block that holds a token whose K/V a decode step wrote. The next turn
  of a conversation therefore recomputes the previous turn's output tokens (at
  full depth, as a prefill) and reuses the previous turn's prompt blocks.

Decode blocks of a request with early exit off are full depth too, but they are
not cached either: the rule reads the schedule only, never per-request settings
(one rule, exact by construction; the cost is re-prefilling one turn's output).

Why not ``cache_salt`` or extra hash keys: the salt enters the hash of every
block of a request (it is chained from the first block), so salting exiting
requests would also stop them sharing prompt blocks with other requests, and
within one request a block hash cannot say "this block was written by a decode
step" without the same per-request bookkeeping as here. Not caching the blocks
is simpler and exactly correct.

Scope: only schedulers of early-exit engines are guarded (the early-exit
architecture, and ``enabled`` not false in the engine settings); the guard is
attached to that scheduler's own KV cache manager instance, so a plain engine
in the same process keeps vLLM's behaviour (decode blocks cached). The engine
core process loads the plugin (``load_general_plugins``) before it builds its
scheduler, in both versions below. With prefix caching off nothing is wrapped.
Not covered: KV connectors that offload blocks on their own (LMCache,
``OffloadingConnector``) could still store decode-written blocks outside vLLM's
prefix cache; an early-exit engine with a ``kv_transfer_config`` logs a warning.

vLLM internals used (checked on 0.32.0, installed, and 0.26.0, read):

* ``vllm.config.SchedulerConfig.get_scheduler_cls()``, called by
  ``EngineCore.__init__`` right before it builds the scheduler (after
  ``load_general_plugins()``); wrapped so that the scheduler module is patched
  only where a scheduler is built. Same in both.
* ``vllm.v1.core.sched.scheduler.Scheduler.__init__(self, vllm_config, ...)``
  keeps ``self.vllm_config`` and builds ``self.kv_cache_manager``
  (``AsyncScheduler`` calls it through ``super().__init__``). Same in both.
* ``KVCacheManager.allocate_slots(request, num_new_tokens,
  num_new_computed_tokens=0, new_computed_blocks=None, num_lookahead_tokens=0,
  num_external_computed_tokens=0, delay_cache_blocks=False, ...)`` returns None
  when it cannot allocate (then nothing was cached) and otherwise calls
  ``self.coordinator.cache_blocks(request, num_tokens)``. Same leading
  parameters in both; 0.32 adds ``skip_zeroing_group_ids``, and in 0.26 the
  ``enable_caching`` check sits in ``allocate_slots`` instead of the coordinator
  (no difference here: the guard is not installed without prefix caching).
* ``KVCacheManager.free(request)`` and ``.coordinator`` (an instance attribute).
* ``KVCacheCoordinator.cache_blocks(request, num_computed_tokens)``: 0.26's
  ``HybridKVCacheCoordinator`` overrides it (aligning the count down); in 0.32
  only the base class defines it, and passes ``replay_boundaries`` on to the
  single-type managers. Both only cache full blocks below the count they get.
  The 0.32 ``FullAttentionManager._cache_partial_tail_block`` (hash blocks
  smaller than scheduler blocks) only caches a boundary at or below that count.
* ``request.request_id``, ``request.num_computed_tokens``, ``request.num_prompt_tokens``. Same in both.
"""

from __future__ import annotations

import functools
import inspect
import logging

logger = logging.getLogger("vllm_early_exit")

_MARK = "__early_exit_prefix_cache__"


def early_exit_engine(vllm_config) -> bool:
    """Whether this engine runs the early-exit model with early exit on (engine settings)."""
    from vllm_early_exit.architecture import ARCHITECTURE
    from vllm_early_exit.config import EarlyExitConfig

    model_config = getattr(vllm_config, "model_config", None)
    if model_config is None:
        return False
    architectures = getattr(model_config, "architectures", None) or getattr(
        getattr(model_config, "hf_config", None), "architectures", None
    ) or []
    if ARCHITECTURE not in architectures:
        return False
    return EarlyExitConfig.from_additional_config(vllm_config.additional_config).enabled


class ExactPrefixGuard:
    """Caps what a KV cache manager caches at each request's full-depth prefix (see the module docstring)."""

    def __init__(self, kv_cache_manager) -> None:
        self.manager = kv_cache_manager
        self.exact: dict[str, int] = {}
        """Request id -> number of leading tokens whose K/V full depth wrote."""
        coordinator = kv_cache_manager.coordinator
        self._allocate = kv_cache_manager.allocate_slots
        self._free = kv_cache_manager.free
        self._cache = coordinator.cache_blocks
        self._signature = inspect.signature(self._allocate)
        # Instance attributes: only this engine's manager changes, never vLLM's classes.
        kv_cache_manager.allocate_slots = self.allocate_slots
        kv_cache_manager.free = self.free
        coordinator.cache_blocks = self.cache_blocks
        setattr(kv_cache_manager, _MARK, self)

    def allocate_slots(self, request, *args, **kwargs):
        if len(args) == 1:  # vLLM's call: ``num_new_tokens``, then keywords (no bind per call)
            num_new, arguments = args[0], kwargs
        else:
            arguments = self._signature.bind(request, *args, **kwargs).arguments
            num_new = arguments.get("num_new_tokens", 0)
        hits = arguments.get("num_new_computed_tokens", 0) or 0
        external = arguments.get("num_external_computed_tokens", 0) or 0
        request_id = request.request_id
        before = self.exact.get(request_id)
        computed = request.num_computed_tokens
        exact = min(before or 0, computed)
        if exact == computed:
            exact = computed + hits
            # A chunk of more than one token is a prefill row: every layer, exact K/V.
            if external == 0 and num_new > 1:
                exact = min(exact + num_new, request.num_prompt_tokens)
        self.exact[request_id] = exact
        blocks = self._allocate(request, *args, **kwargs)
        if blocks is None:  # not scheduled this step: nothing was computed or cached
            if before is None:
                self.exact.pop(request_id, None)
            else:
                self.exact[request_id] = before
        return blocks

    def cache_blocks(self, request, num_computed_tokens, *args, **kwargs):
        limit = self.exact.get(request.request_id, 0)
        return self._cache(request, min(num_computed_tokens, limit), *args, **kwargs)

    def free(self, request, *args, **kwargs):
        self.exact.pop(request.request_id, None)
        return self._free(request, *args, **kwargs)


def guard_scheduler(scheduler) -> ExactPrefixGuard | None:
    """Installs the guard on an early-exit engine's scheduler; None for other engines or without prefix caching."""
    vllm_config = getattr(scheduler, "vllm_config", None)
    manager = getattr(scheduler, "kv_cache_manager", None)
    if manager is None or not early_exit_engine(vllm_config):
        return None
    if not getattr(manager, "enable_caching", False):
        return None
    existing = getattr(manager, _MARK, None)
    if existing is not None:
        return existing
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        logger.warning(
            "Early exit with a KV connector: vLLM's prefix cache keeps only full-depth blocks, but the "
            "connector may store decode blocks whose K/V state propagation wrote."
        )
    logger.info("Early exit: the prefix cache keeps only blocks that full depth wrote (prompt blocks).")
    return ExactPrefixGuard(manager)


def _wrap_scheduler_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        guard_scheduler(self)

    setattr(__init__, _MARK, True)
    return __init__


def _guard_scheduler_class() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    if not getattr(Scheduler.__init__, _MARK, False):
        Scheduler.__init__ = _wrap_scheduler_init(Scheduler.__init__)


def _wrap_get_scheduler_cls(original):
    @functools.wraps(original)
    def get_scheduler_cls(self):
        cls = original(self)
        # The engine core asks for its scheduler class just before it builds the
        # scheduler; vLLM has imported the scheduler module by then.
        _guard_scheduler_class()
        return cls

    setattr(get_scheduler_cls, _MARK, True)
    return get_scheduler_cls


def install_prefix_cache_guard() -> None:
    """Guards the schedulers of early-exit engines; other engines keep vLLM's behaviour.

    ``Scheduler.__init__`` is wrapped when the engine core first asks
    ``SchedulerConfig.get_scheduler_cls()`` for its scheduler class (both
    versions), so processes that never build a scheduler (API servers, workers)
    do not import vLLM's scheduler module for it. Schedulers that do not derive
    from vLLM's ``Scheduler`` (a custom ``scheduler_cls``) are not guarded.
    """
    from vllm.config import SchedulerConfig

    if not getattr(SchedulerConfig.get_scheduler_cls, _MARK, False):
        SchedulerConfig.get_scheduler_cls = _wrap_get_scheduler_cls(SchedulerConfig.get_scheduler_cls)
