"""A pure-decode step stays capturable: it reads the host at most once per decision it reaches.

A CUDA graph can hold a decode step only when nothing inside it waits for device
data on the host or makes a shape from it; the step may read one flag per
decision point between its graphs. Each engine here (tiny random LLaMA, eager so
every op is visible, the engine in the test's process) counts, around the model's
``forward`` and ``compute_logits``, the aten ops that read the host
(``tools/step_ops.py``: ``.item()``, ``nonzero``, boolean-mask indexing, ...). For
every pure-decode step the count must stay within the decisions the step reached
(a shortlist's confirmation is a decision of its own), and those within what the
settings allow: one per check layer and depth-budget end, two per check layer
with a shortlist, none for a forced exit. The settings cover every policy,
per-request settings, exit heads, a shortlist and a replayed preemption.
"""

from __future__ import annotations

import pytest

from .conftest import EVEN_TOKENS, tiny_prompts
from .conftest import run_engine as _run_engine
from .engine_runner import STEP_OPS_ENV
from .test_heads import random_heads

NEW_TOKENS = 16
CHECKS = [1, 3]
PER_TOKEN = {"exit_layers": CHECKS, "threshold": 0.2, "policy": "per_token", "log_interval_s": 0}


def run_engine(model, requests, **kwargs) -> dict:
    return _run_engine(model, requests, env={STEP_OPS_ENV: "1"}, **kwargs)


def pure_steps(result: dict) -> list[dict]:
    steps = [s for s in result["steps"] if s["pure_decode"]]
    assert steps, "no pure-decode step was counted"
    return steps


def check_steps(result: dict, most_decisions: int) -> None:
    for step in pure_steps(result):
        reads = sum(step["host_reads"].values())
        assert reads <= most_decisions, f"{reads} host reads in one step: {step['host_reads']}"
        assert step["decisions"] is not None and reads <= step["decisions"] <= most_decisions, step


@pytest.fixture(scope="module")
def shortlist_file(tmp_path_factory):
    from vllm_early_exit.model_executor.early_exit.shortlist import write_shortlist

    return write_shortlist(tmp_path_factory.mktemp("guard") / "even.json", EVEN_TOKENS, 512, {"test": True})


@pytest.mark.parametrize(
    "policy", [{"policy": "all"}, {"policy": "quorum", "quorum": 0.5}], ids=["all", "quorum"]
)
def test_step_policies_read_once_per_check(tiny_llama, policy):
    settings = {**PER_TOKEN, "threshold": 0.1, **policy}
    result = run_engine(tiny_llama, [(p, NEW_TOKENS) for p in tiny_prompts(3, seed=2)], early_exit=settings, batched=True)
    check_steps(result, most_decisions=len(CHECKS))
    assert result["stats"][0]["early_exit_tokens"] > 0
    # The counter sees the flag reads (``.item()`` reaches no dispatch mode in inference mode).
    assert max(s["host_reads"].get("item", 0) for s in pure_steps(result)) >= 1


def test_forced_exit_reads_nothing(tiny_llama):
    settings = {"exit_layers": [2], "threshold": 0.0, "policy": "all", "log_interval_s": 0}
    result = run_engine(tiny_llama, [(p, NEW_TOKENS) for p in tiny_prompts(3, seed=3)], early_exit=settings, batched=True)
    check_steps(result, most_decisions=1)
    assert all(not s["host_reads"] for s in pure_steps(result))


def test_per_token_with_request_settings_heads_and_a_shortlist(tiny_llama, tmp_path, shortlist_file):
    """Own thresholds, a depth budget between the checks and a request with early exit off share
    the steps; the checks read through exit heads with a shortlist stage first."""
    heads = random_heads(128, 512).save(tmp_path / "heads")
    settings = {**PER_TOKEN, "heads": str(heads), "shortlist": str(shortlist_file)}
    prompts = tiny_prompts(4, seed=4)
    requests = [
        (prompts[0], NEW_TOKENS),
        (prompts[1], NEW_TOKENS, {"early_exit": {"threshold": 0.6}}),
        (prompts[2], NEW_TOKENS, {"early_exit": {"max_layers": 3}}),
        (prompts[3], NEW_TOKENS, {"early_exit": {"enabled": False}}),
    ]
    result = run_engine(tiny_llama, requests, early_exit=settings, batched=True)
    check_steps(result, most_decisions=2 * len(CHECKS) + 1)  # each check and its confirmation, the budget's end
    stats = result["stats"][0]
    assert stats["exits_per_layer"][2] > 0 and stats["exits_per_layer"][1] + stats["exits_per_layer"][3] > 0


def test_steps_beside_a_replayed_preemption(tiny_llama):
    """A KV cache too small for four requests: vLLM preempts and recomputes, and the recomputes
    replay their exits; the pure-decode steps around them keep their bound."""
    prompts = tiny_prompts(4, length=40, seed=5)
    result = run_engine(
        tiny_llama, [(p, 60) for p in prompts], early_exit=PER_TOKEN, batched=True,
        block_size=32, max_num_seqs=4, num_gpu_blocks_override=10, max_model_len=256,
    )
    check_steps(result, most_decisions=len(CHECKS))
    assert result["stats"][0]["replayed_tokens"] > 0


def test_compiled_shortlist_checks_run_nothing_between_their_units(tiny_llama, shortlist_file):
    """Compiled, a check through a shortlist sits inside its segment's unit (``CheckedGroup``):
    between two compiled calls of a pure-decode step the host runs no aten op, only the read of
    the gate's count; a check that never fires costs one call and one read."""
    settings = {
        "exit_layers": CHECKS, "threshold": 1.0, "shortlist": str(shortlist_file), "compile": True, "log_interval_s": 0,
    }
    prompts = tiny_prompts(3, seed=6)
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=settings, batched=True, enforce_eager=False
    )
    for step in pure_steps(result):
        assert step["compiled_calls"] == len(CHECKS) + 1, step  # one unit per segment
        assert step["between"] == 0, step["names"]
        assert step["host_reads"] == {"item": len(CHECKS)}, step
    assert result["stats"][0]["early_exit_tokens"] == 0


@pytest.mark.parametrize("threshold", [1.0, 0.2], ids=["never", "per_token"])
def test_compiled_one_stage_checks_run_nothing_between_their_units(tiny_llama, threshold):
    """Compiled, a one-stage check (max-prob over the full vocabulary) sits inside its segment's
    unit with its exits (``CheckedGroup``): between two compiled calls of a pure-decode step the
    host runs no aten op, only the read of the running flag, whether rows leave or not."""
    settings = {**PER_TOKEN, "threshold": threshold, "compile": True}
    prompts = tiny_prompts(3, seed=6)
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit=settings, batched=True, enforce_eager=False
    )
    for step in pure_steps(result):
        assert step["between"] == 0, step["names"]
        assert step["host_reads"] == {"item": step["decisions"]}, step
        # One unit per decision reached, and the last segment's when some row runs to the end.
        assert step["decisions"] <= step["compiled_calls"] <= step["decisions"] + 1, step
        assert threshold < 1.0 or step["compiled_calls"] == len(CHECKS) + 1, step
    exits = result["stats"][0]["early_exit_tokens"]
    assert exits == 0 if threshold == 1.0 else exits > 0
