"""Prefix caching under early exit: a multi-turn chat workload, caching on vs off.

    .venv/bin/python benchmarks/prefix_cache.py [--conversations 8] [--turns 3] [--tokens 32]
        [--rounds 2] [--block-size 32] [--model DIR] [--out benchmarks/results]

Each conversation starts from a ShareGPT user message (evaluation split) in SmolLM2's chat
template; turn k's prompt is turn k-1's prompt + its output + the next user message, so a
chat reuses its own history. Every turn runs the conversations' requests as one batch
(greedy, ``ignore_eos``, a fixed output length). Three engines live side by side in this
process (each with its own engine core): early exit with prefix caching on (the plugin keeps
only full-depth blocks in the cache: the previous turns' prompts, not their outputs), the
same with caching off, and plain vLLM with caching on (vLLM's own hit rate, which includes
decode-filled blocks). The workload runs on the three in turn, in a rotated order per round,
with the prefix cache reset before every run. Hit rate = prefix-cache-hit prompt tokens /
prompt tokens (``RequestOutput.num_cached_tokens``); throughput = output tokens / wall time
of the whole workload (prefills included). Writes prefix_cache.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# Every decode token leaves after layer 14 of 30: the most decode blocks hold propagated K/V.
EARLY_EXIT = {"exit_layers": [14], "threshold": 0.0, "policy": "per_token", "log_interval_s": 0}
ENGINE = {"max_model_len": 2048, "enforce_eager": True}
NEXT_TURN = "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def conversations(tokenizer, count: int, turns: int) -> list[list[list[int]]]:
    """Per conversation, the token ids each turn adds before the model answers."""
    from vllm_early_exit.tools.assets import chat_prompt, sharegpt_split

    texts = sharegpt_split("evaluation", count * turns, max_chars=300)
    out = []
    for c in range(count):
        messages = texts[c * turns : (c + 1) * turns]
        first = tokenizer.encode(chat_prompt(tokenizer, messages[0]), add_special_tokens=False)
        rest = [tokenizer.encode(NEXT_TURN.format(m), add_special_tokens=False) for m in messages[1:]]
        out.append([first, *rest])
    return out


def run_workload(llm, chats, tokens: int, extra_args=None) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, extra_args=extra_args)
    llm.reset_prefix_cache()
    history = [[] for _ in chats]
    prompt_tokens = cached_tokens = output_tokens = 0
    per_turn, outputs = [], []
    start = time.perf_counter()
    for turn in range(len(chats[0])):
        prompts = [history[c] + chats[c][turn] for c in range(len(chats))]
        t0 = time.perf_counter()
        results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        turn_prompt = sum(len(p) for p in prompts)
        turn_cached = sum(r.num_cached_tokens or 0 for r in results)
        turn_out = [list(r.outputs[0].token_ids) for r in results]
        per_turn.append({
            "turn": turn + 1, "prompt_tokens": turn_prompt, "cached_tokens": turn_cached,
            "hit_rate": turn_cached / turn_prompt, "seconds": seconds,
        })
        prompt_tokens += turn_prompt
        cached_tokens += turn_cached
        output_tokens += sum(len(o) for o in turn_out)
        history = [p + o for p, o in zip(prompts, turn_out)]
        outputs.append(turn_out)
    seconds = time.perf_counter() - start
    return {
        "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens,
        "hit_rate": cached_tokens / prompt_tokens, "output_tokens": output_tokens,
        "seconds": seconds, "output_tokens_per_s": output_tokens / seconds,
        "per_turn": per_turn, "outputs": outputs,
    }


def mean(values):
    return sum(values) / len(values)


def summarise(runs: list[dict]) -> dict:
    return {
        "hit_rate": runs[0]["hit_rate"],
        "hit_rate_by_turn": [t["hit_rate"] for t in runs[0]["per_turn"]],
        "prompt_tokens": runs[0]["prompt_tokens"],
        "cached_tokens": runs[0]["cached_tokens"],
        "output_tokens_per_s": [r["output_tokens_per_s"] for r in runs],
        "output_tokens_per_s_mean": mean([r["output_tokens_per_s"] for r in runs]),
        "seconds": [r["seconds"] for r in runs],
        "same_outputs_every_round": all(r["outputs"] == runs[0]["outputs"] for r in runs),
    }


def write_markdown(path: Path, result: dict) -> None:
    info, setup, eng = result["machine"], result["setup"], result["engines"]
    on, off, plain = eng["early_exit_cache_on"], eng["early_exit_cache_off"], eng["plain_cache_on"]
    turns = len(on["hit_rate_by_turn"])
    lines = [
        "# Prefix caching under early exit (multi-turn chat)",
        "",
        f"{info['date']}, {info['processor']} ({info['cpus']} CPUs, {info['device']}), python {info['python']}, "
        f"torch {info['torch']}, vLLM {info['vllm']}. Produced by `benchmarks/prefix_cache.py`.",
        "",
        f"Model {setup['model_name']}, float32, eager, block size {setup['block_size']}. "
        f"{setup['conversations']} conversations x {setup['turns']} turns (ShareGPT evaluation split, "
        f"SmolLM2 chat template), each turn's prompt = previous prompt + output + next user message; "
        f"the conversations' turn k runs as one batch, greedy, {setup['tokens']} new tokens, `ignore_eos`. "
        f"Early exit: `{json.dumps(setup['early_exit'])}` (every decode token leaves at half depth, so every "
        f"decode-filled block holds propagated K/V). {setup['rounds']} rounds, engines alternated "
        f"(rotated order), prefix cache reset before every run. The machine is shared: timings are noisy.",
        "",
        "| engine | prefix-cache hit rate (prompt tokens) | " + " | ".join(f"turn {t + 1}" for t in range(turns))
        + " | output tokens/s (mean of rounds) | per round |",
        "|---|---|" + "---|" * turns + "---|---|",
    ]
    for name, label in (
        ("early_exit_cache_on", "early exit, prefix caching on"),
        ("early_exit_cache_off", "early exit, prefix caching off"),
        ("plain_cache_on", "plain vLLM, prefix caching on"),
    ):
        e = eng[name]
        lines.append(
            f"| {label} | {e['hit_rate']:.1%} ({e['cached_tokens']}/{e['prompt_tokens']}) | "
            + " | ".join(f"{h:.1%}" for h in e["hit_rate_by_turn"])
            + f" | {e['output_tokens_per_s_mean']:.1f} | "
            + ", ".join(f"{v:.1f}" for v in e["output_tokens_per_s"]) + " |"
        )
    lines += [
        "",
        f"Early exit with caching on vs off: {on['output_tokens_per_s_mean'] / off['output_tokens_per_s_mean']:.2f}x "
        f"output tokens/s. Outputs of early exit with caching on and off identical: "
        f"{result['early_exit_outputs_identical']} of {result['outputs_compared']} turn outputs.",
        "",
        "The early-exit engine caches only blocks that full depth wrote: a turn reuses the previous turns' "
        "prompt blocks and recomputes (as a prefill, at full depth) the blocks that hold the previous "
        f"outputs. Plain vLLM also reuses those decode-filled blocks, hence its higher hit rate "
        f"({plain['hit_rate']:.1%} vs {on['hit_rate']:.1%}); turn 1 has no history, so no hits.",
    ]
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    eng = result["engines"]
    names = [("early_exit_cache_on", "early exit\ncache on"), ("early_exit_cache_off", "early exit\ncache off"),
             ("plain_cache_on", "plain vLLM\ncache on")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    turns = len(eng["early_exit_cache_on"]["hit_rate_by_turn"])
    width = 0.27
    for i, (key, label) in enumerate(names):
        left.bar([t + (i - 1) * width for t in range(turns)], [100 * h for h in eng[key]["hit_rate_by_turn"]],
                 width, label=label.replace("\n", " "))
    left.set_xticks(range(turns), [f"turn {t + 1}" for t in range(turns)])
    left.set_ylabel("prefix-cache hits (% of prompt tokens)")
    left.legend(fontsize=7)
    right.bar([label for _, label in names], [eng[k]["output_tokens_per_s_mean"] for k, _ in names],
              color=["C0", "C1", "C2"])
    right.set_ylabel("output tokens/s")
    fig.suptitle("Multi-turn chat, SmolLM2-135M, CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=32,
                        help="KV block size (tokens); the CPU backend needs a multiple of 32 and defaults to 128")
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoTokenizer

    from vllm_early_exit.tools.assets import smollm2_checkpoint
    from vllm_early_exit.tools.engines import build_engine, machine_info, shutdown_engine

    model = Path(args.model) if args.model else smollm2_checkpoint()
    chats = conversations(AutoTokenizer.from_pretrained(model), args.conversations, args.turns)
    engine = {**ENGINE, "block_size": args.block_size}
    engines = {
        "early_exit_cache_on": (build_engine(model, early_exit=EARLY_EXIT, enable_prefix_caching=True, **engine), None),
        "early_exit_cache_off": (build_engine(model, early_exit=EARLY_EXIT, enable_prefix_caching=False, **engine), None),
        "plain_cache_on": (build_engine(model, enable_prefix_caching=True, **engine), None),
    }
    block_size = engines["plain_cache_on"][0].llm_engine.vllm_config.cache_config.block_size
    order = list(engines)
    for name, (llm, extra) in engines.items():  # warm-up: first-call costs out of the timings
        llm.generate([{"prompt_token_ids": chats[0][0]}], None, use_tqdm=False)
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for r in range(args.rounds):
        for name in order[r % len(order):] + order[: r % len(order)]:
            llm, extra = engines[name]
            runs[name].append(run_workload(llm, chats, args.tokens, extra))
            print(f"round {r + 1} {name}: hit rate {runs[name][-1]['hit_rate']:.1%}, "
                  f"{runs[name][-1]['output_tokens_per_s']:.1f} output tokens/s", flush=True)
    for llm, _ in engines.values():
        shutdown_engine(llm)

    on, off = runs["early_exit_cache_on"][0]["outputs"], runs["early_exit_cache_off"][0]["outputs"]
    pairs = [(a, b) for turn_a, turn_b in zip(on, off) for a, b in zip(turn_a, turn_b)]
    result = {
        "machine": machine_info(),
        "setup": {
            "model": str(model), "model_name": "SmolLM2-135M-Instruct", "block_size": block_size,
            "conversations": args.conversations, "turns": args.turns, "tokens": args.tokens,
            "rounds": args.rounds, "early_exit": EARLY_EXIT, "engine": engine,
        },
        "engines": {name: summarise(r) for name, r in runs.items()},
        "early_exit_outputs_identical": sum(a == b for a, b in pairs),
        "outputs_compared": len(pairs),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix_cache.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(out / "prefix_cache.md", result)
    print((out / "prefix_cache.md").read_text())
    from vllm_early_exit.tools.optional import draw

    draw(write_plot, result, out / "prefix_cache.png")  # last: the results are written and printed
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
