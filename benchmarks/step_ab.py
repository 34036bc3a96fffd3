"""Two trees of the plugin (a step before a change and after it), benchmarked alternately.

Runs ``python -m vllm_early_exit bench`` once per tree in turn (before, after,
before, after ...), each run with the package of its own tree on ``PYTHONPATH``
(every run alternates its engines with plain vLLM, so each ratio is a same-run
ratio), then writes one table of the runs side by side: per engine and batch,
the ratio to plain vLLM and the weight-bytes limit beside it (``bench``'s
``limit``: the cost model's bound with plain vLLM's prefill share kept), and the
median of each tree's runs. Writes ``step_ab.json``, ``step_ab.md`` and
``step_ab.png`` into ``--out`` and each run's own results under ``--out/runs``.

    .venv/bin/python benchmarks/step_ab.py --before /tmp/before --after . \\
        --runs never_shortlist_compiled,forced_50_compiled,calibrated never_shortlist_compiled \\
        --calibrated benchmarks/results/calibrated_shortlist_deep/settings.json --out benchmarks/results/fused_check

``--runs``: one comma-separated list of modes per pair of runs (before, then after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def bench(tree: Path, modes: str, out: Path, args: argparse.Namespace) -> dict:
    """One ``bench`` run of ``tree``'s package: its ``speed.json``."""
    command = [
        sys.executable, "-m", "vllm_early_exit", "bench", "--modes", modes, "--batches", args.batches,
        "--rounds", str(args.rounds), "--out", str(out),
    ]
    if args.calibrated:
        command += ["--calibrated", str(Path(args.calibrated).resolve())]
    env = {**os.environ, "PYTHONPATH": str(tree), "VLLM_LOGGING_LEVEL": "WARNING"}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench.log", "w") as log:
        subprocess.run(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return json.loads((out / "speed.json").read_text())


def table(runs: list[dict]) -> list[dict]:
    """Per run, engine and batch: the ratio to plain vLLM and the limit."""
    rows = []
    for run in runs:
        for row in run["speed"]["rows"]:
            if row["engine"] == "plain":
                continue
            rows.append({
                "tree": run["tree"], "run": run["index"], "started": run["started"], "engine": row["engine"],
                "batch": row["batch"], "tokens_per_s": row["tokens_per_s"], "ratio": row["ratio_vs_plain"],
                "limit": row.get("limit"), "mean_layers": row.get("mean_layers"),
            })
    return rows


def medians(rows: list[dict]) -> list[dict]:
    keys = sorted({(r["engine"], r["batch"]) for r in rows})
    out = []
    for engine, batch in keys:
        cell = {"engine": engine, "batch": batch}
        for tree in ("before", "after"):
            values = [r for r in rows if (r["engine"], r["batch"], r["tree"]) == (engine, batch, tree)]
            cell[tree] = [round(r["ratio"], 3) for r in values]
            cell[f"{tree}_median"] = statistics.median(cell[tree]) if values else None
            cell[f"{tree}_limit"] = statistics.median(r["limit"] for r in values) if values else None
        out.append(cell)
    return out


def markdown(report: dict) -> str:
    lines = [
        "# Before and after, alternated run by run",
        "",
        f"`benchmarks/step_ab.py`: {report['setup']['note']}",
        "",
        "Cells: same-run ratio to plain vLLM, each run's ratios in run order (the weight-bytes limit, "
        "prefill share kept, in brackets: the median of the runs' limits).",
        "",
        "| engine | batch | before | median | after | median |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["medians"]:
        def cell(tree: str) -> tuple[str, str]:
            if c[f"{tree}_median"] is None:
                return "-", "-"
            return ", ".join(f"{v:.3f}" for v in c[tree]), f"{c[f'{tree}_median']:.3f} ({c[f'{tree}_limit']:.3f})"

        before, before_median = cell("before")
        after, after_median = cell("after")
        lines.append(f"| {c['engine']} | {c['batch']} | {before} | {before_median} | {after} | {after_median} |")
    lines += ["", "Runs:", ""]
    for run in report["runs"]:
        lines.append(f"- {run['index']}: {run['tree']} ({run['path']}), {run['modes']}, {run['started']} - {run['ended']} UTC")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["medians"]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cells)), 4))
    for offset, tree, color in ((-0.2, "before", "#999999"), (0.2, "after", "#1f77b4")):
        for i, c in enumerate(cells):
            values = c[tree]
            ax.scatter([i + offset] * len(values), values, color=color, s=14, label=tree if i == 0 else None)
            if c[f"{tree}_limit"] is not None:
                ax.hlines(c[f"{tree}_limit"], i + offset - 0.15, i + offset + 0.15, color=color, linestyles="dotted")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(cells)), [f"{c['engine']}\nbatch {c['batch']}" for c in cells], fontsize=6, rotation=30)
    ax.set_ylabel("ratio to plain vLLM (dotted: weight-bytes limit)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the tree before the change")
    parser.add_argument("--after", required=True, help="the tree after it")
    parser.add_argument("--runs", nargs="+", required=True, help="modes of each pair of runs")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calibrated")
    parser.add_argument("--note", default="", help="what the machine was doing (shared, noisy ...)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    trees = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    runs = []
    for pair, modes in enumerate(args.runs):
        for tree, path in trees.items():
            index = 2 * pair + (tree == "after") + 1
            started = time.strftime("%H:%M:%S", time.gmtime())
            speed = bench(path, modes, out / "runs" / f"{index}_{tree}", args)
            ended = time.strftime("%H:%M:%S", time.gmtime())
            runs.append({"index": index, "tree": tree, "path": str(path), "modes": modes, "started": started,
                         "ended": ended, "speed": speed})
            rows = table(runs)
            setup = {"batches": args.batches, "rounds": args.rounds, "note": args.note,
                     "bench_setup": runs[0]["speed"]["setup"]}
            report = {"setup": setup, "runs": [{k: v for k, v in r.items() if k != "speed"} for r in runs],
                      "rows": rows, "medians": medians(rows)}
            (out / "step_ab.json").write_text(json.dumps(report, indent=2) + "\n")
            (out / "step_ab.md").write_text(markdown(report))
            plot(report, out / "step_ab.png")
    print((out / "step_ab.md").read_text())


if __name__ == "__main__":
    main()
