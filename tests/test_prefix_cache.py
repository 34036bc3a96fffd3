"""Prefix caching in an early-exit engine (``plugin/prefix_cache.py``), on real vLLM CPU engines.

One subprocess runs every engine of this file one after another, each with its
engine core in that process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the
scheduler and its KV cache manager can be inspected, and a plain engine runs in
the same process as the early-exit ones:

* ``guarded``: early exit forced at layer 1 for every decode token of the tiny
  model, prefix caching on, 32-token blocks. A two-turn chat (turn 1 exits,
  turn 2 has early exit off and a prompt of turn 1's prompt + output + new
  tokens), and two exiting requests that share a 64-token prefix.
* ``preempting``: the ``guarded`` engine with a KV cache too small for its
  batch, so vLLM preempts exiting requests and recomputes them; then each
  one's next turn with early exit off.
* ``uncached``: the same engine with prefix caching off (the shared-prefix
  request, to check that reusing another request's prompt blocks is exact).
* ``plain``: plain vLLM, prefix caching on: the reference for turn 2, and a
  two-turn chat of its own (vLLM caches decode blocks there, as always).
* ``unguarded``: the ``guarded`` engine with the guard switched off in this
  process: turn 2 then reads propagated K/V and differs from plain vLLM (shows
  that the chat above exercises the problem).

Run as a script (``python test_prefix_cache.py OUT.json MODEL``) it is the runner.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

BLOCK = 32  # the CPU attention backend needs a multiple of 32
FORCED = {"exit_layers": [1], "threshold": 0.0, "policy": "per_token", "log_interval_s": 0}
ENGINE = {
    "dtype": "float32", "max_model_len": 512, "enforce_eager": True, "skip_tokenizer_init": True,
    "block_size": BLOCK, "enable_prefix_caching": True,
}
PROMPT_LEN = 40  # one full prompt block; the second is finished by decode tokens
TURN1_TOKENS = 40
TURN2_EXTRA = 8
TURN2_TOKENS = 16
SHARED_LEN = 64
OFF = {"early_exit": {"enabled": False}}


def _tokens(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


# --- the runner (in the subprocess) ----------------------------------------------------------------


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def _generate(llm, prompt: list[int], max_tokens: int, extra_args=None) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra_args)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    return {"prompt": prompt, "output": list(out.outputs[0].token_ids), "cached": out.num_cached_tokens}


def _chat(llm, turn1_args, turn2_args) -> list[dict]:
    turn1 = _generate(llm, _tokens(PROMPT_LEN, 1), TURN1_TOKENS, turn1_args)
    prompt2 = turn1["prompt"] + turn1["output"] + _tokens(TURN2_EXTRA, 2)
    return [turn1, _generate(llm, prompt2, TURN2_TOKENS, turn2_args)]


def _engine(model: str, early_exit: dict | None, **overrides):
    from vllm import LLM

    kwargs = {**ENGINE, **overrides}
    if early_exit is not None:
        kwargs["additional_config"] = {"early_exit": early_exit}
    return LLM(model, **kwargs)


def _close(llm) -> None:
    import gc

    from vllm_early_exit.tools.engines import shutdown_engine

    shutdown_engine(llm)
    del llm
    gc.collect()


def _shared_prefix_requests(llm) -> list[dict]:
    shared = _tokens(SHARED_LEN, 3)
    first = _generate(llm, shared + _tokens(5, 4), 8)
    second = _generate(llm, shared + _tokens(7, 5), 8)
    return [first, second]


PREEMPT_REQUESTS = 4
PREEMPT_TOKENS = 60


def _preempting_chats(llm) -> dict:
    """Exiting requests that do not all fit in the KV cache (vLLM preempts and recomputes some),
    then each one's next turn with early exit off, one at a time."""
    from vllm import SamplingParams

    from vllm_early_exit.tools.engines import watch_preemptions

    preempted = watch_preemptions(llm)
    prompts = [_tokens(PROMPT_LEN, 10 + i) for i in range(PREEMPT_REQUESTS)]
    params = SamplingParams(max_tokens=PREEMPT_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    turns2 = [
        _generate(llm, p + list(o.outputs[0].token_ids) + _tokens(TURN2_EXTRA, 20 + i), TURN2_TOKENS, OFF)
        for i, (p, o) in enumerate(zip(prompts, outs))
    ]
    return {"preemptions": len(preempted), "turn2": turns2}


def run_all(model: str) -> dict:
    from vllm_early_exit import get_exit_stats
    from vllm_early_exit.plugin import prefix_cache

    result = {}

    llm = _engine(model, FORCED)
    guard = getattr(_scheduler(llm).kv_cache_manager, prefix_cache._MARK, None)
    chat = _chat(llm, None, OFF)
    shared = _shared_prefix_requests(llm)
    stats = get_exit_stats(llm)
    result["guarded"] = {
        "guard": guard is not None, "chat": chat, "shared": shared,
        "early_tokens": stats.early_exit_tokens, "open_requests": len(guard.exact) if guard else None,
    }
    _close(llm)

    # 10 blocks of 32 tokens for 4 requests of 100 tokens: vLLM must preempt.
    llm = _engine(model, FORCED, num_gpu_blocks_override=10, max_model_len=256, max_num_seqs=PREEMPT_REQUESTS)
    result["preempting"] = _preempting_chats(llm)
    _close(llm)

    llm = _engine(model, FORCED, enable_prefix_caching=False)
    result["uncached"] = {
        "guard": hasattr(_scheduler(llm).kv_cache_manager, prefix_cache._MARK),
        "second": _generate(llm, shared[1]["prompt"], 8),
    }
    _close(llm)

    llm = _engine(model, None)
    result["plain"] = {
        "guard": hasattr(_scheduler(llm).kv_cache_manager, prefix_cache._MARK),
        "turn2": _generate(llm, chat[1]["prompt"], TURN2_TOKENS),
        "chat": _chat(llm, None, None),
        "preempting_turn2": [_generate(llm, t["prompt"], TURN2_TOKENS)["output"] for t in result["preempting"]["turn2"]],
    }
    _close(llm)

    original = prefix_cache.guard_scheduler
    prefix_cache.guard_scheduler = lambda scheduler: None
    try:
        llm = _engine(model, FORCED)
        result["unguarded"] = {"chat": _chat(llm, None, OFF)}
        _close(llm)
    finally:
        prefix_cache.guard_scheduler = original
    return result


# --- the tests ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory) -> dict:
    from .in_process import run_script

    return run_script(__file__, tmp_path_factory.mktemp("prefix_cache") / "runs.json", tiny_llama, timeout=900)


def _prompt_blocks(n: int) -> int:
    return n // BLOCK * BLOCK


def test_next_turn_with_early_exit_off_gets_plain_vllm_tokens(runs):
    turn2 = runs["guarded"]["chat"][1]
    assert runs["guarded"]["early_tokens"] > 0  # turn 1 left early: its decode blocks hold propagated K/V
    assert turn2["output"] == runs["plain"]["turn2"]["output"]
    # Turn 2 reuses turn 1's prompt blocks, and nothing a decode step wrote.
    assert turn2["cached"] == _prompt_blocks(PROMPT_LEN)
    assert runs["guarded"]["guard"]


def test_without_the_guard_the_next_turn_reads_propagated_kv(runs):
    """The control: vLLM alone caches turn 1's decode blocks, and turn 2 then differs from plain vLLM."""
    turn1, turn2 = runs["unguarded"]["chat"]
    assert turn1 == runs["guarded"]["chat"][0]
    assert turn2["cached"] > _prompt_blocks(PROMPT_LEN)
    assert turn2["output"] != runs["plain"]["turn2"]["output"]


def test_prompt_blocks_of_other_requests_are_reused_exactly(runs):
    first, second = runs["guarded"]["shared"]
    assert first["cached"] == 0
    assert second["cached"] == SHARED_LEN
    assert not runs["uncached"]["guard"]
    assert second["output"] == runs["uncached"]["second"]["output"]


def test_next_turn_after_preemption_gets_plain_vllm_tokens(runs):
    """A preempted request recomputes its prompt and output as a prefill (full depth); its next turn is exact."""
    preempting = runs["preempting"]
    assert preempting["preemptions"] > 0
    assert [t["output"] for t in preempting["turn2"]] == runs["plain"]["preempting_turn2"]


def test_plain_engine_in_the_same_process_keeps_caching_decode_blocks(runs):
    plain = runs["plain"]
    assert not plain["guard"]
    turn2 = plain["chat"][1]
    computed = PROMPT_LEN + TURN1_TOKENS - 1  # the last output token's K/V is never written in turn 1
    assert turn2["cached"] == _prompt_blocks(computed) > _prompt_blocks(PROMPT_LEN)


def test_guard_forgets_finished_requests(runs):
    assert runs["guarded"]["open_requests"] == 0


def test_engines_without_early_exit_on_are_not_guarded():
    from types import SimpleNamespace

    from vllm_early_exit.plugin.hooks import ARCHITECTURE
    from vllm_early_exit.plugin.prefix_cache import early_exit_engine

    def config(architectures, additional_config=None):
        return SimpleNamespace(
            model_config=SimpleNamespace(architectures=architectures), additional_config=additional_config
        )

    assert early_exit_engine(config([ARCHITECTURE], {"early_exit": {"threshold": 0.5}}))
    assert early_exit_engine(config([ARCHITECTURE]))  # hf_overrides alone: default settings
    assert not early_exit_engine(config([ARCHITECTURE], {"early_exit": {"enabled": False}}))
    assert not early_exit_engine(config(["LlamaForCausalLM"]))


if __name__ == "__main__":
    out_path, model_dir = sys.argv[1], sys.argv[2]
    Path(out_path).write_text(json.dumps(run_all(model_dir)))
