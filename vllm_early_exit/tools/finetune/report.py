"""``finetune_report.json`` and ``finetune_report.md``, rewritten at every evaluation, and the
curve (``finetune_curve.png``: held-out agreement and depth against tokens trained), drawn
after the figures are written."""

from __future__ import annotations

from pathlib import Path

from vllm_early_exit.tools.resume import write_json


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(report: dict) -> list[str]:
    layers = report["exit_layers"]
    head = ["step", "tokens", "full depth", *(f"L{layer}" for layer in layers), "depth at 0.95", "depth at 0.9"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for h in report["history"]:
        best = " (best)" if h["step"] == report.get("best_step") else ""
        cells = [f"{h['step']}{best}", f"{h['tokens']:,}", _fmt(h["full_depth_agreement"]),
                 *(_fmt(h["exit_agreement"][str(layer)], 2) for layer in layers),
                 _fmt(h["depth_at"]["0.95"]), _fmt(h["depth_at"]["0.9"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    s = report["settings"]
    rate = report.get("tokens_per_hour")
    return "\n".join([
        f"# Exit-aware fine-tune of {report['model']}",
        "",
        f"{s['method']} ({'rank ' + str(s['lora_rank']) if s['method'] == 'lora' else 'every decoder weight'}), "
        f"lr {s['lr']}, {s['batch_size']} sequences a step, {s['exits_per_step']} of the exit layers "
        f"{report['exit_layers']} a step (weight {s['exit_weight']} x depth), anchor {s['anchor_weight']}; "
        f"teacher: the original's top-{s['teacher_top_k']} at each reply token of its own greedy replies "
        f"({report['data']['train_sequences']} train sequences, {report['data']['held_out_sequences']} held out).",
        "",
        f"{report['steps']} steps, {report['tokens']:,} tokens in {report['seconds'] / 60:.1f} min"
        + (f" ({rate:,.0f} tokens an hour here)" if rate else "") + ".",
        "",
        "Held out, teacher-forced on the original's greedy replies: the share of tokens where the tuned "
        "model's readout picks the original's token (full depth: the last layer; L*n*: after layer *n*), "
        "and the depth (share of layers run) at which the max-prob rule over the exit layers keeps "
        "0.95 / 0.9 agreement with the original.",
        "",
        *table(report),
        "",
    ])


def write_report(report: dict, out: Path) -> None:
    write_json(out / "finetune_report.json", report)
    (out / "finetune_report.md").write_text(markdown(report))


def plot(reports: dict[str, dict], path: Path) -> None:
    """Full-depth agreement and depth at 0.95 against tokens, one line per run (drawn through
    ``optional.draw``, after the figures are written)."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, report in reports.items():
        tokens = [h["tokens"] / 1e6 for h in report["history"]]
        line, = ax1.plot(tokens, [h["full_depth_agreement"] for h in report["history"]], marker="o", label=label)
        color = line.get_color()
        depth = [(t, h["depth_at"]["0.95"]) for t, h in zip(tokens, report["history"]) if h["depth_at"]["0.95"]]
        if depth:
            ax2.plot(*zip(*depth), marker="o", color=color, label=f"{label}: depth at 0.95")
        deepest = report["exit_layers"][-1]
        ax2.plot(tokens, [h["exit_agreement"][str(deepest)] for h in report["history"]], ls="--", color=color,
                 label=f"{label}: L{deepest} readout agreement")
    ax1.axhline(0.99, color="grey", ls=":", lw=1)
    ax1.set(xlabel="tokens trained (M)", ylabel="agreement with the original", title="full depth (the ceiling)")
    ax2.axhline(0.85, color="grey", ls=":", lw=1)
    ax2.set(xlabel="tokens trained (M)", ylabel="share", title="the exits: depth at 0.95 agreement, deepest readout")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
