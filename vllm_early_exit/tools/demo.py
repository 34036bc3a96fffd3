"""The demo: early exit vs plain vLLM on SmolLM2-135M and real ShareGPT prompts.

Both engines live in this process and run the same prompts, alternating
plain / early exit so machine drift hits both alike. Prints output tokens/s
of each, their ratio, the mean depth of early exit, and its agreement with
the plain (full-depth) outputs: the share of outputs identical, the share of
tokens up to the first divergence, and the token agreement of the quality
benchmark (the share of generated tokens the full model picks after the same
prefix). It does so twice: for all prompts at once (a batch job) and for a few
of them one request at a time (an interactive user). The default settings check
two deep layers through the model's token shortlist (``shortlist``, built on
first use in a few seconds), in steps of at most two requests.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

from vllm_early_exit.tools.agreement import Agreement, full_model_choices, token_agreement
from vllm_early_exit.tools.assets import chat_prompt, sharegpt_prompts, smollm2_checkpoint
from vllm_early_exit.tools.engines import build_engine, shutdown_engine

# Conservative training-free settings: on SmolLM2 intermediate layers are often
# confidently wrong, so checks sit deep and require a very confident reading.
# (max_prob 0.95 at layers 22-28 measured 10.8% token agreement; these, 59.9%.)
# The shortlist (the model's most frequent reply tokens) makes a check that says
# "stay" cost about 2% of the LM head; rows that leave are sampled from their check's logits.
# A step reads each layer once for all its rows and runs as deep as its deepest row: on this
# model checks pay for one or two requests decoding together, so larger steps run unchecked
# (``max_exit_batch``; benchmarks/results/max_exit_batch).
DEFAULT_SETTINGS = {
    "signal": "max_prob", "threshold": 0.99, "exit_layers": [26, 28], "policy": "per_token", "max_exit_batch": 2,
}


@dataclass
class Timed:
    outputs: list[list[int]]
    tokens: int
    seconds: float


def timed_generate(llm, prompts, params, one_at_a_time: bool = False) -> Timed:
    """Generates ``prompts`` together, or one request after the other (an interactive user)."""
    start = time.perf_counter()
    if one_at_a_time:
        results = [r for p in prompts for r in llm.generate([p], params, use_tqdm=False)]
    else:
        results = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    outputs = [list(r.outputs[0].token_ids) for r in results]
    return Timed(outputs, sum(len(o) for o in outputs), seconds)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=32, help="ShareGPT prompts decoded at once (default 32)")
    parser.add_argument("--alone", type=int, default=4,
                        help="of them, how many are also decoded one request at a time (default 4; 0: none)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    parser.add_argument("--rounds", type=int, default=2, help="timed plain/early-exit rounds (default 2)")
    parser.add_argument(
        "--early-exit-config",
        default=None,
        help=f"early_exit settings as JSON (default {json.dumps(DEFAULT_SETTINGS)} with the model's shortlist)",
    )
    parser.add_argument("--dtype", default="float32", help="model dtype (default float32)")


def measure(plain, early, prompts, prompt_ids, params, rounds: int, one_at_a_time: bool) -> dict:
    """Alternated timed rounds of both engines on ``prompts``; early exit's speed, depth and agreement."""
    from vllm_early_exit import get_exit_stats, reset_exit_stats

    reset_exit_stats(early)
    runs: dict[str, list[Timed]] = {"plain": [], "early": []}
    for _ in range(rounds):
        runs["plain"].append(timed_generate(plain, prompts, params, one_at_a_time))
        runs["early"].append(timed_generate(early, prompts, params, one_at_a_time))

    def tokens_per_s(name: str) -> float:
        return sum(t.tokens for t in runs[name]) / sum(t.seconds for t in runs[name])

    stats = get_exit_stats(early)
    agreement = Agreement.of(runs["early"][0].outputs, runs["plain"][0].outputs)
    return {
        "prompts": len(prompts),
        "one_at_a_time": one_at_a_time,
        "plain_tokens_per_s": tokens_per_s("plain"),
        "early_exit_tokens_per_s": tokens_per_s("early"),
        "speed_ratio": tokens_per_s("early") / tokens_per_s("plain"),
        "mean_layers": stats.mean_layers,
        "num_layers": stats.num_layers,
        "decode_steps": stats.decode_steps,
        "unchecked_steps": stats.unchecked_steps,
        "identical_outputs": agreement.identical,
        "prefix_agreement": agreement.prefix,
        "token_agreement": token_agreement(full_model_choices(plain, prompt_ids, runs["early"][0].outputs)),
        "sampled_from_checks": stats.sampled_from_checks,
    }


def print_leg(title: str, leg: dict) -> None:
    print(f"  {title}")
    print(f"    plain vLLM              {leg['plain_tokens_per_s']:8.1f} output tokens/s")
    print(f"    early exit              {leg['early_exit_tokens_per_s']:8.1f} output tokens/s")
    print(f"    ratio                   {leg['speed_ratio']:8.3f}x")
    print(f"    mean layers per token   {leg['mean_layers']:8.2f} of {leg['num_layers']}")
    if leg["unchecked_steps"]:
        print(f"    steps run unchecked     {leg['unchecked_steps']:8d} (more rows than max_exit_batch)")
    print(f"    identical outputs       {leg['identical_outputs']:8.1%}")
    print(f"    token agreement         {leg['token_agreement']:8.1%} (tokens the full model picks after the same prefix)")
    print(f"    prefix agreement        {leg['prefix_agreement']:8.1%} (tokens up to the first divergence)")


def run(args: argparse.Namespace) -> dict:
    import os

    # vLLM's start-up log lines would bury the result: warnings and errors only (unless set).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_early_exit import reset_exit_stats
    from vllm_early_exit.tools.shortlist import ensure_shortlist

    model = str(smollm2_checkpoint())
    if args.early_exit_config is None:
        settings = {**DEFAULT_SETTINGS, "shortlist": str(ensure_shortlist(model))}
    else:
        settings = json.loads(args.early_exit_config)
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt_ids = [
        tokenizer.encode(chat_prompt(tokenizer, p), add_special_tokens=False) for p in sharegpt_prompts(args.prompts)
    ]
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    engine = {"dtype": args.dtype, "max_model_len": 2048, "kv_cache_gib": 1}

    print(f"Starting plain vLLM and early-exit vLLM on {model} ...", flush=True)
    plain = build_engine(model, **engine)
    early = build_engine(model, early_exit=settings, **engine)

    warm = prompts[: min(4, len(prompts))]
    for one_at_a_time in (False, True):
        timed_generate(plain, warm[:2], params, one_at_a_time)
        timed_generate(early, warm[:2], params, one_at_a_time)
    reset_exit_stats(early)

    together = measure(plain, early, prompts, prompt_ids, params, args.rounds, one_at_a_time=False)
    alone_count = min(max(args.alone, 0), len(prompts))
    alone = (
        measure(plain, early, prompts[:alone_count], prompt_ids[:alone_count], params, args.rounds, one_at_a_time=True)
        if alone_count else None
    )
    summary = {"model": "SmolLM2-135M-Instruct", "max_tokens": args.max_tokens, "early_exit": settings,
               **together, "alone": alone}
    print()
    print(f"  prompts                 {len(prompts)} ShareGPT, {args.max_tokens} new tokens, greedy")
    print(f"  early-exit settings     {json.dumps(settings)}")
    print_leg(f"{len(prompts)} requests at once (an offline batch job):", together)
    if alone is not None:
        print_leg(f"{alone_count} of them one at a time (one user waiting for each reply):", alone)
    # Stopped here rather than at interpreter exit, where tearing down two engine cores can abort.
    for llm in (early, plain):
        shutdown_engine(llm)
    return summary
