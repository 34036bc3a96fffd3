"""Markdown and PNG of the exit-adapter probe (``exit_adapter_probe.py``) beside the LoRA fine-tune.

    python benchmarks/exit_adapter_report.py RESULT.json [RESULT.json ...] [--lora run2_defaults.json]

Writes ``exit_adapters.md`` and ``exit_adapters.png`` beside the first result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_early_exit.tools.optional import draw


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def best_subset(fewer: dict | None) -> str:
    """The one or two check layers whose depth with the adapters' cost at 0.95 is lowest."""
    if not fewer:
        return "-"
    reached = {k: v["depth_with_adapters_at"]["0.95"] for k, v in fewer.items() if v["depth_with_adapters_at"]["0.95"]}
    if not reached:
        return "-"
    layers = min(reached, key=reached.get)
    return f"{fmt(reached[layers])} (after {layers})"


def rows(name: str, layers: list[int], scored: dict, adapters: bool, fewer: dict | None = None) -> str:
    exits = " / ".join(fmt(scored["exit_agreement"][str(layer)]) for layer in layers)
    with_adapters = scored.get("depth_with_adapters_at", scored["depth_at"]) if adapters else scored["depth_at"]
    return (f"| {name} | {exits} | {fmt(scored['depth_at']['0.95'])} / {fmt(scored['depth_at']['0.9'])} | "
            f"{fmt(with_adapters['0.95'])} / {fmt(with_adapters['0.9'])} | {best_subset(fewer)} |")


def markdown(results: dict[str, dict], lora: dict | None) -> str:
    first = next(iter(results.values()))
    layers = first["layers"]
    lines = [
        "# Exit adapters on a frozen trunk (design b), offline, SmolLM2-135M-Instruct",
        "",
        f"Trained on the original's greedy replies to {first['train_sequences']} ShareGPT train-split prompts "
        f"({first['train_reply_tokens']:,} reply tokens an epoch); scored teacher-forced on "
        f"{first['held_out_positions']:,} held-out reply positions against the original's tokens. The trunk is "
        "the original, so the full-depth agreement (the ceiling) is 1.0 by construction.",
        "",
        "Exit rule: the max-prob rule over the exit layers (a token leaves at the first whose readout reaches the "
        "threshold, else runs the whole stack). `depth`: trunk layers run, as a share of 30. `with adapters`: "
        "plus one layer for every adapter the token ran (each check runs its adapter; a token that leaves at none "
        "ran them all; an adapter weighs `adapter_cost_layers` of a layer: 1 for `layer`, 0.25 for `attention`, "
        "0.09 for `affine`): the weight bytes an engine reads, before the LM-head products every design pays "
        "alike. Runs stopped for time after the epochs shown (each cosine schedule was set for the "
        "`epochs` in its settings).",
        "",
        f"| readout | agreement after layers {' / '.join(str(l) for l in layers)} | depth at 0.95 / 0.9 "
        "| with adapters at 0.95 / 0.9 | best one or two checks, with adapters, at 0.95 |",
        "|---|---|---|---|---|",
        rows("plain (final norm + LM head)", layers, first["plain"], adapters=False),
    ]
    for name, result in results.items():
        for epoch in result.get("epochs", []):
            lines.append(rows(f"adapter, {name}, epoch {epoch['epoch']}", layers, epoch["held_out"], adapters=True,
                              fewer=epoch.get("fewer_checks")))
        if "exported_heads" in result:
            lines.append(rows("the same as engine exit heads (the model's own final norm: `--heads`)", layers,
                              result["exported_heads"], adapters=True, fewer=result["exported_heads"]["fewer_checks"]))
    lines += [
        "",
        "The original's own confidence bounds any exit trained to reproduce its distribution: the share of "
        "held-out positions where the original's final max-prob reaches each threshold (a perfectly distilled "
        "exit is that confident there and nowhere else, so the max-prob rule cannot let more tokens leave):",
        "",
        "| threshold | " + " | ".join(first["original_confident_share"]) + " |",
        "|---" * (len(first["original_confident_share"]) + 1) + "|",
        "| share | " + " | ".join(f"{v:.3f}" for v in first["original_confident_share"].values()) + " |",
    ]
    if lora is not None:
        last = lora["history"][-1]
        lines += ["", f"LoRA design (a), for comparison (`{lora['_file']}`, {last['tokens']:,} tokens): full depth "
                  f"{last['full_depth_agreement']:.3f}, depth at 0.95 {fmt(last['depth_at']['0.95'])}."]
    for name, result in results.items():
        for epoch in result.get("epochs", []):
            lines.append(f"\nTraining, {name}, epoch {epoch['epoch']}: {epoch['seconds']:.0f} s, mean train loss "
                         + ", ".join(f"L{l} {v:.2f}" for l, v in epoch["train_kl"].items()) + ".")
    lines += ["", f"Settings: `{json.dumps(first['settings'])}`", ""]
    return "\n".join(lines)


def plot(data: tuple[dict[str, dict], dict | None], path: Path) -> None:
    import matplotlib.pyplot as plt

    results, lora = data

    fig, ax = plt.subplots(figsize=(7, 4.5))
    first = next(iter(results.values()))
    plain = first["plain"]["frontier"]
    ax.plot([p["depth"] for p in plain], [p["agreement"] for p in plain], "o-", color="gray", label="plain readout, checks after 16-24")
    for name, result in results.items():
        if result.get("epochs"):
            frontier = result["epochs"][-1]["held_out"]["frontier"]
            ax.plot([p["depth_with_adapters"] for p in frontier], [p["agreement"] for p in frontier], "o-",
                    label=f"adapters, {name} (with adapter cost)")
    if lora is not None:
        frontier = lora["history"][-1]["frontier"]
        ax.plot([p["depth"] for p in frontier], [p["agreement"] for p in frontier], "s--",
                label="LoRA fine-tune (a), checks after 20-28")
    ax.axhline(0.95, color="k", lw=0.5)
    ax.axvline(0.85, color="k", lw=0.5, ls=":")
    ax.set_xlabel("mean depth (share of 30 layers)")
    ax.set_ylabel("agreement with the original")
    ax.set_title("Max-prob frontier, SmolLM2-135M, held-out replies")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--lora", type=Path)
    args = parser.parse_args()
    results = {}
    for path in args.results:
        result = json.loads(path.read_text())
        settings = result["settings"]
        results[f"{settings.get('adapter', 'layer')}, {settings.get('target', 'soft')}"] = result
    lora = None
    if args.lora:
        lora = json.loads(args.lora.read_text()) | {"_file": args.lora.name}
    out = args.results[0].parent
    (out / "exit_adapters.md").write_text(markdown(results, lora))
    print(f"wrote {out / 'exit_adapters.md'}")
    draw(plot, (results, lora), out / "exit_adapters.png")


if __name__ == "__main__":
    main()
