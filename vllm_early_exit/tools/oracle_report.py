"""The ``oracle`` command's report: ``oracle.json`` and ``oracle.md`` (written as the run goes),
and ``oracle.png`` (drawn once, after the results are written and printed)."""

from __future__ import annotations

from pathlib import Path

from vllm_early_exit.tools.resume import write_json


def write_report(report: dict, out_dir: Path) -> None:
    """``oracle.json`` and ``oracle.md`` of a report, whole or partial."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "oracle.json", report)
    layers = report["num_layers"]
    lines = [
        "# Oracle depth",
        "",
        f"{report['prompts']} held-out ShareGPT prompts, {report['max_tokens']} greedy tokens, "
        f"{layers}-layer model ({report.get('model', '')}).",
        *(() if report.get("reference", report.get("model")) == report.get("model") else (
            "",
            f"Every figure is measured against the greedy outputs of the reference {report['reference']}: "
            f"the model's own full depth reproduces {100 * report['full_depth_identical']:.1f}% of them "
            "exactly (a sequence no depth reproduces counts every layer).",
        )),
        "",
        f"- Per-sequence oracle: the smallest depth whose output is identical to full depth averages "
        f"**{report['mean_min_depth']:.2f} of {layers} layers ({100 * report['mean_min_depth_fraction']:.1f}%)**.",
        f"- Largest static skip set that keeps every output identical: {report['largest_identical_skip_set']}.",
        "",
        *(() if report.get("complete", True) else (
            f"**Partial results**: {len(report['scores'])} skip sets scored so far "
            "(`--resume` continues the run).", "",
        )),
        "| skip set (greedy) | decode tokens right (teacher-forced) | outputs identical |",
        "|---|---|---|",
    ]
    for step in report["skip_path"]:
        lines.append(f"| {step['skip_layers']} | {step['token_agreement']:.3f} | {step['identical']:.3f} |")
    lines += token_oracle_lines(report.get("token_oracle"), layers)
    (out_dir / "oracle.md").write_text("\n".join(lines) + "\n")


def token_oracle_lines(tokens: dict | None, layers: int) -> list[str]:
    """The per-token oracle's section of ``oracle.md`` (none for a report without it)."""
    if not tokens:
        return []

    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f} ({value * layers:.2f} layers)"

    lines = [
        "",
        "## Per-token oracle (teacher-forced)",
        "",
        f"Every layer runs at each of the {tokens['positions']} decode positions of the full-depth outputs; a "
        "layer's plain readout (final norm and LM head) is right where its top token is the full-depth token. "
        "The oracle knows each token's first right layer and leaves there; below agreement 1 it also lets the "
        "tokens whose first right layer is deepest leave after the first layer, wrong. `max_prob`: the per-token "
        f"rule at check layers {tokens['check_layers']} on the same positions. Teacher-forced (a wrong token does "
        "not change later positions, deeper layers' K/V come from full computation): a bound on what an exit "
        "signal can reach with these readouts, not an engine measurement.",
        "",
        "| token agreement | oracle depth | max_prob depth |",
        "|---|---|---|",
        f"| every token right | {share(tokens['depth_every_token_right'])} | - |",
    ]
    for agreement, depth in tokens["oracle_depth"].items():
        lines.append(f"| >= {agreement} | {share(depth)} | {share(tokens['max_prob_depth'][agreement])} |")
    lines += ["", "| max_prob threshold | token agreement | depth |", "|---|---|---|"]
    lines += [f"| {r['threshold']} | {r['token_agreement']:.4f} | {r['depth']:.3f} |" for r in tokens["max_prob"]]
    per_layer = tokens["readout_agreement_per_layer"]
    lines += ["", "Readout right per layer (share of positions): " + ", ".join(
        f"{index}: {value:.2f}" for index, value in enumerate(per_layer) if index >= len(per_layer) // 3
    ) + "."]
    return lines


def plot(report: dict, path: Path) -> None:
    """The per-sequence depths, the static skip sets and (when scored) the per-token exits
    (matplotlib; through ``optional.draw``)."""
    import matplotlib.pyplot as plt

    layers = report["num_layers"]
    tokens = report.get("token_oracle")
    fig, axes = plt.subplots(1, 3 if tokens else 2, figsize=(16 if tokens else 11, 4))
    left, right = axes[:2]
    left.hist(report["min_depths"], bins=range(1, layers + 2), align="left", color="tab:blue")
    left.axvline(report["mean_min_depth"], color="k", linestyle="--", label="mean")
    left.set(xlabel="oracle depth (layers)", ylabel="sequences", title="Per-sequence minimum depth")
    left.legend()
    sizes = [len(s["skip_layers"]) for s in report["skip_path"]]
    right.plot(sizes, [s["token_agreement"] for s in report["skip_path"]], "o-", label="decode tokens right")
    right.plot(sizes, [s["identical"] for s in report["skip_path"]], "s-", label="outputs identical")
    right.set(xlabel="layers skipped (greedy)", ylabel="share", ylim=(0, 1.02), title="Static skip sets")
    right.legend()
    if tokens:
        curve = [(a, d) for a, d in tokens["oracle_curve"] if d is not None]
        axes[2].plot([d for _, d in curve], [a for a, _ in curve], "-", color="k", label="per-token oracle")
        axes[2].plot([r["depth"] for r in tokens["max_prob"]], [r["token_agreement"] for r in tokens["max_prob"]],
                     "o--", color="tab:red", label=f"max_prob at {len(tokens['check_layers'])} check layers")
        axes[2].set(xlabel="depth (share of layers)", ylabel="token agreement (teacher-forced)",
                    title="Per-token exits", xlim=(0, 1.02))
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
