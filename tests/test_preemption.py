"""Preemption: a recomputed request replays its exits (``early_exit/replay.py``), on real vLLM CPU engines.

vLLM recomputes a preempted request with a prefill of its prompt and output so
far. Its later tokens must see the same K/V as if it had never been preempted,
so its output must not depend on memory pressure. One subprocess runs, per
setting, the same batch twice: with a KV cache large enough for all requests,
and with one so small that vLLM preempts (counted through the scheduler's
``_preempt_request``). Each engine core runs in that process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so all requests are queued before the
first step.

* ``threshold``: ``per_token`` threshold exits at layers 1 and 3 of the tiny
  model (tokens leave at different layers, some go the full depth);
* ``skipping``: the same with layer 2 skipped by every decode token;
* ``compiled``: the ``threshold`` setting with compiled layer groups;
* ``consensus``: a forced exit after layer 1 under the ``all`` policy (small cache only);
* ``no_replay``: the ``threshold`` setting with the replay switched off in the
  process: the control that shows preemption changes outputs without it;
* ``catch_up``: the ``threshold`` setting with ``skipped_kv: "recompute"`` (a cap no run of exits
  reaches): no replay, the full-depth recompute is exact.

Run as a script (``python test_preemption.py OUT.json MODEL``) it is the runner.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

BLOCK = 32  # the CPU attention backend needs a multiple of 32
THRESHOLD = {"exit_layers": [1, 3], "threshold": 0.2, "policy": "per_token", "log_interval_s": 0}
SETTINGS = {
    "threshold": THRESHOLD,
    "skipping": {**THRESHOLD, "skip_layers": [2]},
    "compiled": {**THRESHOLD, "compile": True},
}
# Consensus: exits depend on which requests share a step, and preemption changes the schedule,
# so outputs are not compared; the recomputes still replay (pinned rows walk mixed steps).
CONSENSUS = {"exit_layers": [1], "threshold": 0.0, "policy": "all", "log_interval_s": 0}
REQUESTS = 4
PROMPT_LEN = 40
NEW_TOKENS = 60
CATCH_UP = {**THRESHOLD, "skipped_kv": "recompute", "max_waiting": NEW_TOKENS}
SMALL_CACHE_BLOCKS = 10  # 4 requests of 100 tokens need 16 blocks of 32


def _tokens(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


# --- the runner (in the subprocess) ----------------------------------------------------------------


def _run(model: str, early_exit: dict, **overrides) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_early_exit import get_exit_stats
    from vllm_early_exit.tools.engines import shutdown_engine, watch_preemptions

    compile_ = early_exit.get("compile", False)
    llm = LLM(
        model, dtype="float32", max_model_len=256, enforce_eager=not compile_, skip_tokenizer_init=True,
        block_size=BLOCK, max_num_seqs=REQUESTS, additional_config={"early_exit": early_exit}, **overrides,
    )
    preempted = watch_preemptions(llm)
    prompts = [{"prompt_token_ids": _tokens(PROMPT_LEN, 30 + i)} for i in range(REQUESTS)]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = get_exit_stats(llm).to_dict()
    shutdown_engine(llm)
    return {"outputs": [list(o.outputs[0].token_ids) for o in outs], "preemptions": len(preempted), "stats": stats}


def run_all(model: str) -> dict:
    from vllm_early_exit.model_executor.early_exit import replay

    result = {}
    for name, early_exit in SETTINGS.items():
        result[name] = {
            "large": _run(model, early_exit),
            "small": _run(model, early_exit, num_gpu_blocks_override=SMALL_CACHE_BLOCKS),
        }
    result["consensus"] = {"small": _run(model, CONSENSUS, num_gpu_blocks_override=SMALL_CACHE_BLOCKS)}
    result["catch_up"] = {
        "large": _run(model, CATCH_UP),
        "small": _run(model, CATCH_UP, num_gpu_blocks_override=SMALL_CACHE_BLOCKS),
    }
    original = replay.ExitRecord.replay
    replay.ExitRecord.replay = lambda self, *args, **kwargs: None
    try:
        result["no_replay"] = {
            "large": result["threshold"]["large"],
            "small": _run(model, THRESHOLD, num_gpu_blocks_override=SMALL_CACHE_BLOCKS),
        }
    finally:
        replay.ExitRecord.replay = original
    return result


# --- the tests ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory) -> dict:
    from .in_process import run_script

    return run_script(__file__, tmp_path_factory.mktemp("preemption") / "runs.json", tiny_llama, timeout=1200)


def _differing(pair: dict) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(pair["large"]["outputs"], pair["small"]["outputs"])) if a != b]


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_preempted_requests_decode_as_if_never_preempted(runs, setting):
    pair = runs[setting]
    assert pair["large"]["preemptions"] == 0
    assert pair["small"]["preemptions"] > 0  # vLLM preempted and recomputed requests
    stats = pair["small"]["stats"]
    assert stats["replayed_tokens"] > 0  # the recomputes replayed exits
    # Tokens left at both check layers and some went the full depth: the replay had choices to get right.
    exits = stats["exits_per_layer"]
    assert exits[1] > 0 and exits[3] > 0 and stats["full_depth_tokens"] > 0
    assert _differing(pair) == []
    assert pair["large"]["stats"]["replayed_tokens"] == 0


def test_without_the_replay_preemption_changes_outputs(runs):
    """The control: recomputing at full depth gives other K/V, and some outputs change."""
    pair = runs["no_replay"]
    assert pair["small"]["preemptions"] > 0
    assert pair["small"]["stats"]["replayed_tokens"] == 0
    assert _differing(pair) != []


def test_consensus_recomputes_replay_their_exits(runs):
    small = runs["consensus"]["small"]
    assert small["preemptions"] > 0
    assert small["stats"]["replayed_tokens"] > 0
    assert len(small["outputs"]) == REQUESTS and all(len(o) == NEW_TOKENS for o in small["outputs"])


def test_exit_counts_do_not_count_replayed_tokens(runs):
    """Replayed tokens are counted apart: every decode token is counted once, preempted or not."""
    pair = runs["threshold"]
    assert pair["small"]["stats"]["decode_tokens"] == pair["large"]["stats"]["decode_tokens"]
    assert pair["small"]["stats"]["exits_per_layer"] == pair["large"]["stats"]["exits_per_layer"]


def test_catch_up_recomputes_at_full_depth_and_decodes_as_if_never_preempted(runs):
    """``skipped_kv: "recompute"``: a preempted request, its waiting tokens with it, is recomputed
    at full depth, which is exact: nothing is replayed and every request decodes the same tokens."""
    pair = runs["catch_up"]
    assert pair["large"]["preemptions"] == 0
    assert pair["small"]["preemptions"] > 0
    stats = pair["small"]["stats"]
    assert stats["replayed_tokens"] == 0
    assert stats["early_exit_tokens"] > 0 and stats["rerun_rows"] > 0
    assert _differing(pair) == []


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(sys.argv[1], "w") as f:
        json.dump(run_all(sys.argv[2]), f)
