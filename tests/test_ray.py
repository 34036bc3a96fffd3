"""Ray holds the engines: the Ray Serve and Ray Data examples, each over two early-exit vLLM engines.

Every replica / actor builds its own ``vllm.LLM`` with early exit (the plugin loads there
through its entry point). The tokens must equal those of one offline engine that decodes the
same prompts one at a time, so every prompt is sent alone: one prompt per Serve request (a
replica takes one request at a time) and one row per Ray Data batch.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest

from .conftest import ENGINE_DEFAULTS, run_engine, tiny_prompts
from .server import free_port

import ray.data  # noqa: E402,F401  (ray[serve,data] comes with the `test` extra)
import ray.serve  # noqa: E402,F401

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples are plain scripts: import them by name

SETTINGS = {"exit_layers": [1, 3], "threshold": 0.5}
MAX_TOKENS = 16
PROMPTS = tiny_prompts(4)
ENGINE_KWARGS = {**ENGINE_DEFAULTS, "skip_tokenizer_init": True}
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def offline(tiny_llama) -> dict:
    """Tokens and statistics of one engine outside Ray, requests decoded one at a time."""
    return run_engine(tiny_llama, [(p, MAX_TOKENS) for p in PROMPTS], early_exit=SETTINGS)


def _ray_env() -> dict[str, str]:
    """What every Ray worker needs: vLLM's CPU settings and the examples on the import path."""
    env = {k: os.environ[k] for k in ("VLLM_CACHE_ROOT", "VLLM_CPU_KVCACHE_SPACE", "TOKENIZERS_PARALLELISM")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLES), os.environ.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def ray_cluster():
    """A private local Ray with two CPUs (one per engine); always shut down."""
    import ray

    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 * 1024**2,
            runtime_env={"env_vars": _ray_env()},
        )
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="class")
def serve_app(ray_cluster, tiny_llama):
    """The Serve example with two replicas on the tiny model: (handle, HTTP URL).

    Shut down after the class's tests, pass or fail: the replicas hold both CPUs of the cluster.
    """
    from ray import serve
    from ray_serve import build_app

    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(str(tiny_llama), SETTINGS, num_replicas=2, engine_kwargs=ENGINE_KWARGS)
        yield serve.run(app, name="early_exit", route_prefix="/"), f"http://127.0.0.1:{port}/"
    finally:
        serve.shutdown()


def _replica_counters(handle) -> dict[int, dict]:
    from ray_serve import stats_per_replica

    found = stats_per_replica(handle, calls=8)
    assert len(found) == 2, f"statistics should come from both replicas: {found}"
    return found


def _added_up(stats: list[dict]) -> dict:
    """Counters of several engines added up."""
    return {
        "decode_tokens": sum(s["decode_tokens"] for s in stats),
        "exits_per_layer": [sum(column) for column in zip(*(s["exits_per_layer"] for s in stats))],
    }


class TestServe:
    """The Ray Serve example: two replicas, reached through the handle and over HTTP."""

    def test_replicas_match_offline_engine(self, serve_app, offline):
        handle, _ = serve_app
        before = _replica_counters(handle)
        responses = [handle.generate.remote([p], max_tokens=MAX_TOKENS, ignore_eos=True) for p in PROMPTS]
        results = [r.result(timeout_s=TIMEOUT_S) for r in responses]
        assert [r["outputs"][0]["token_ids"] for r in results] == offline["outputs"]
        assert len({r["replica_pid"] for r in results}) == 2, "the requests should reach both replicas"

        after = _replica_counters(handle)
        assert after.keys() == before.keys()
        moved = {pid: after[pid]["decode_tokens"] - before[pid]["decode_tokens"] for pid in after}
        assert all(n > 0 for n in moved.values()), f"both replicas should have decoded with early exit: {moved}"
        # Prompts decoded alone add up: both replicas together counted what the offline engine did.
        added = _added_up(list(after.values()))
        previous = _added_up(list(before.values()))
        expected = offline["stats"][0]
        assert added["decode_tokens"] - previous["decode_tokens"] == expected["decode_tokens"]
        assert [a - b for a, b in zip(added["exits_per_layer"], previous["exits_per_layer"])] == expected[
            "exits_per_layer"
        ]
        assert expected["early_exit_tokens"] > 0, "these settings should exit some tokens early"

    def test_http_route(self, serve_app, offline):
        _, url = serve_app
        body = json.dumps({"prompts": [PROMPTS[0]], "max_tokens": MAX_TOKENS, "ignore_eos": True}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            result = json.loads(response.read())
        assert result["outputs"][0]["token_ids"] == offline["outputs"][0]
        assert result["exit_stats"]["decode_tokens"] >= MAX_TOKENS - 1


def test_data_actors_match_offline_engine(ray_cluster, tiny_llama, offline):
    from ray_data import run_batch_rows

    rows = run_batch_rows(
        str(tiny_llama), PROMPTS, SETTINGS, concurrency=2, engine_kwargs=ENGINE_KWARGS,
        max_tokens=MAX_TOKENS, batch_size=1,
    )
    assert [[int(t) for t in r["generated_token_ids"]] for r in rows] == offline["outputs"]
    final = _final_counters(rows)
    assert len(final) == 2, f"the rows should reach both actors: {final}"
    assert all(decode > 0 for decode, _ in final.values()), f"both actors should decode with early exit: {final}"
    # Rows decoded alone add up: both actors together counted what the offline engine did.
    expected = offline["stats"][0]
    assert sum(decode for decode, _ in final.values()) == expected["decode_tokens"]
    assert sum(early for _, early in final.values()) == expected["early_exit_tokens"] > 0


def _final_counters(rows: list[dict]) -> dict[int, tuple[int, int]]:
    """Per actor: its (decode_tokens, early_exit_tokens) after its last row (counters only grow)."""
    final: dict[int, tuple[int, int]] = {}
    for row in rows:
        counters = (int(row["decode_tokens"]), int(row["early_exit_tokens"]))
        final[row["actor_pid"]] = max(final.get(row["actor_pid"], (0, 0)), counters)
    return final
