"""The oracle's engine runs: every prompt decoded at every depth budget (the per-sequence minimum
depth), and the reference's greedy outputs that every figure is measured against."""

from __future__ import annotations

from vllm_early_exit.tools.engines import build_engine, shutdown_engine


def budget_outputs(llm, prompts: list[list[int]], max_tokens: int, num_layers: int) -> list[list[list[int]]]:
    """outputs[p][d - 1]: prompt p decoded with the depth budget ``max_layers = d``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    requests, params = [], []
    for prompt in prompts:
        for depth in range(1, num_layers + 1):
            requests.append(TokensPrompt(prompt_token_ids=prompt))
            params.append(SamplingParams(
                max_tokens=max_tokens, temperature=0.0, detokenize=False,
                extra_args={"early_exit": {"max_layers": depth}},
            ))
    # Prompt pass once per prompt first, so the budget runs read the prompt's K/V from
    # vLLM's prefix cache instead of computing it once per depth.
    llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts],
        SamplingParams(max_tokens=1, detokenize=False),
        use_tqdm=False,
    )
    results = llm.generate(requests, params, use_tqdm=True)
    tokens = [list(r.outputs[0].token_ids) for r in results]
    return [tokens[i * num_layers : (i + 1) * num_layers] for i in range(len(prompts))]


def min_depths(outputs: list[list[list[int]]], targets: list[list[int]] | None = None) -> list[int]:
    """Per prompt, the smallest depth whose output equals the target output (default: the model's
    own full-depth output, the last). A prompt that no depth reproduces (a tuned model whose
    full depth differs from its reference's) counts every layer."""
    targets = targets if targets is not None else [per_depth[-1] for per_depth in outputs]
    return [next((d + 1 for d, out in enumerate(per_depth) if out == target), len(per_depth))
            for per_depth, target in zip(outputs, targets)]


def reference_outputs(reference: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The greedy outputs of plain vLLM on ``reference``: what the figures are measured against."""
    import gc

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(len(p) for p in prompts) + max_tokens
    llm = build_engine(reference, max_model_len=longest + 8, skip_tokenizer_init=True, enforce_eager=True,
                       label="plain vLLM (reference)")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False)
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    shutdown_engine(llm)
    del llm
    gc.collect()
    return [list(r.outputs[0].token_ids) for r in results]



def run_budgets(model_dir: str, prompts: list[list[int]], max_tokens: int, num_layers: int):
    """Every prompt decoded at every depth budget by the real engine (``budget_outputs``)."""
    import gc

    # Budgets hold under per_token also for decode rows of steps that prefill other
    # requests, so the requests may reach the engine in any order and mix (no
    # ``generate_together`` needed).
    longest = max(len(p) for p in prompts) + max_tokens
    llm = build_engine(
        model_dir, max_model_len=longest + 8, skip_tokenizer_init=True, enable_prefix_caching=True,
        early_exit={"exit_layers": [], "policy": "per_token", "log_interval_s": 0, "compile": False},
    )
    outputs = budget_outputs(llm, prompts, max_tokens, num_layers)
    shutdown_engine(llm)
    del llm
    gc.collect()
    return outputs
