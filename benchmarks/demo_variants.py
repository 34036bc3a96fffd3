"""The demo's workload on variants of its settings: where the demo's gap to plain vLLM goes.

Same prompts as ``python -m vllm_early_exit demo`` (32 ShareGPT chat prompts, 64 new
tokens, greedy). Plain vLLM (its defaults) stays alive; each variant is built in turn,
warmed up, and timed in rounds alternated with plain vLLM, so each ratio is taken in
the same run. Writes ``benchmarks/results/demo_variants.{json,md}`` after every variant.

    .venv/bin/python benchmarks/demo_variants.py
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from vllm_early_exit.tools.engines import build_engine, machine_info, shutdown_engine

OUT = Path("benchmarks/results")
DEMO = {"signal": "max_prob", "threshold": 0.99, "exit_layers": [26, 28], "policy": "per_token"}
VARIANTS = {  # name -> early_exit settings ("eager": plain vLLM with enforce_eager)
    "plain_eager": "eager",
    "no_checks": {"exit_layers": [], "compile": False},
    "checks_never_fire": {**DEMO, "threshold": 1.0, "compile": False},
    "demo": {**DEMO, "compile": False},
    "demo_compiled": {**DEMO, "compile": True},
}


def main() -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_early_exit import get_exit_stats, reset_exit_stats
    from vllm_early_exit.tools.assets import chat_prompt, sharegpt_prompts, smollm2_checkpoint
    from vllm_early_exit.tools.demo import timed_generate
    from vllm_early_exit.tools.shortlist import ensure_shortlist

    model = str(smollm2_checkpoint())
    shortlist = str(ensure_shortlist(model))
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = [tokenizer.encode(chat_prompt(tokenizer, p), add_special_tokens=False) for p in sharegpt_prompts(32)]
    prompts = [TokensPrompt(prompt_token_ids=i) for i in ids]
    params = SamplingParams(max_tokens=64, temperature=0.0)
    engine = {"dtype": "float32", "max_model_len": 2048, "kv_cache_gib": 1}
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(), "variants": []}
    plain = build_engine(model, **engine)
    timed_generate(plain, prompts[:4], params)
    for name, settings in VARIANTS.items():
        if settings == "eager":
            settings, other = None, build_engine(model, enforce_eager=True, **engine)
        else:
            settings = {**settings, "shortlist": shortlist} if "signal" in settings else settings
            other = build_engine(model, early_exit=settings, **engine)
        timed_generate(other, prompts[:4], params)
        if settings is not None:
            reset_exit_stats(other)
        runs = {"plain": [], "variant": []}
        for _ in range(2):
            runs["plain"].append(timed_generate(plain, prompts, params))
            runs["variant"].append(timed_generate(other, prompts, params))
        speed = {k: sum(t.tokens for t in v) / sum(t.seconds for t in v) for k, v in runs.items()}
        identical = sum(a == b for a, b in zip(runs["plain"][0].outputs, runs["variant"][0].outputs))
        report["variants"].append({
            "name": name, "early_exit": settings,
            "plain_tokens_per_s": speed["plain"], "tokens_per_s": speed["variant"],
            "ratio": speed["variant"] / speed["plain"],
            "mean_layers": get_exit_stats(other).mean_layers if settings is not None else 30.0,
            "identical_outputs": identical, "prompts": len(prompts),
        })
        shutdown_engine(other)
        write(report)
        print(f"{name}: ratio {report['variants'][-1]['ratio']:.3f}", flush=True)


def write(report: dict) -> None:
    (OUT / "demo_variants.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# The demo's workload on variants of its settings", "",
        f"{report['date']} | {json.dumps(report['machine'])} | SmolLM2-135M-Instruct float32 | 32 ShareGPT chat "
        "prompts, 64 new tokens, greedy, 2 timed rounds alternated with plain vLLM (its defaults)", "",
        "| variant | plain tok/s | variant tok/s | ratio | mean layers | outputs identical to plain |",
        "|---|---|---|---|---|---|",
    ]
    for v in report["variants"]:
        lines.append(
            f"| `{v['name']}` | {v['plain_tokens_per_s']:.1f} | {v['tokens_per_s']:.1f} | {v['ratio']:.3f} | "
            f"{v['mean_layers']:.2f} | {v['identical_outputs']}/{v['prompts']} |"
        )
    lines += ["", "Settings: " + "; ".join(f"`{v['name']}`: {json.dumps(v['early_exit'])}" for v in report["variants"])]
    (OUT / "demo_variants.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
