"""The report of a ``train-heads`` run: the per-layer table, ``heads.json`` and ``heads.md``."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_early_exit.model_executor.early_exit.heads import GATE_FEATURES, ExitHeads


def table(training: dict) -> list[str]:
    """The per-layer Markdown table of a training record."""
    designs = training["designs"]
    head = ["layer", "plain readout"] + [f"{d} head" for d in designs] + ["gate accuracy", "gate majority", "gate AUC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in training["per_layer"]:
        cells = [str(row["layer"]), f"{row['plain_agreement']:.3f}"]
        cells += [f"{row[f'{d}_agreement']:.3f}" + (" *" if d == training["chosen"] else "") for d in designs]
        if "gate_accuracy" in row:
            auc_value = row["gate_auc"]
            cells += [f"{row['gate_accuracy']:.3f}", f"{row['gate_majority_accuracy']:.3f}",
                      "-" if auc_value is None else f"{auc_value:.3f}"]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    mean = training["mean"]
    means = [f"{mean['plain']:.3f}"] + [f"{mean[d]:.3f}" for d in designs]
    lines.append("| mean | " + " | ".join(means) + " | | | |")
    return lines


def write_report(heads: ExitHeads, out_dir: Path, heads_dir: Path) -> None:
    """``heads.json`` (the training record) and ``heads.md`` (the table) in ``out_dir``."""
    training = heads.training
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"heads_dir": str(heads_dir), "base_model": heads.base_model, "design": heads.design,
              "layers": list(heads.layers), "gate_layers": sorted(heads.gates), **training}
    (out_dir / "heads.json").write_text(json.dumps(record, indent=2) + "\n")
    data, seconds, settings = training["data"], training["seconds"], training["settings"]
    v = training["versions"]
    lines = [
        f"# Exit heads: {Path(heads.base_model['path']).name}",
        "",
        f"{training['date']} | {training['machine']['cpus']} CPUs, torch threads: {training['machine']['threads']}, "
        f"load average {training['machine']['load_average']} at the start (a shared machine) | "
        f"torch {v['torch']} | transformers {v['transformers']} | seed {settings['seed']}",
        "",
        f"Time: {seconds['total']:.0f} s in all: teacher forcing {seconds['teacher']:.0f} s, heads "
        f"{seconds['heads']:.0f} s, held-out evaluation and gates {seconds['evaluation_and_gates']:.0f} s.",
        "",
        f"Data: {data.get('source', 'token sequences')}. {data['sequences_train']} conversations "
        f"({data['tokens_train']} positions) train the heads; held-out conversations: {data['sequences_held_out']} "
        f"({data['tokens_held_out']} positions) choose the design, fit the gates and give every number below. "
        "Positions whose whole prefix was seen before (the shared system turn) count once.",
        "",
        "Agreement = fraction of held-out positions whose top token at that layer equals the full model's. "
        "`plain readout`: the layer's stream through the final norm and LM head as is; heads: through the "
        f"trained head first (`*`: the design kept in the file). Designs: affine (full matrix), low_rank "
        f"(rank {settings['rank']}). Gate: logistic classifier over {', '.join(GATE_FEATURES)} predicting "
        "\"the head's token is the full model's\", two-fold cross-fitted by conversation; `gate majority` "
        "is the accuracy of always guessing the more common answer.",
        "",
        *table(training),
        "",
        "Held-out KL(full || reading), nats:",
        "",
        "| layer | plain readout | " + " | ".join(f"{d} head" for d in training["designs"]) + " |",
        "|---|---|" + "---|" * len(training["designs"]),
    ]
    for row in training["per_layer"]:
        kls = [f"{row[f'{d}_kl']:.3f}" for d in training["designs"]]
        lines.append(f"| {row['layer']} | {row['plain_kl']:.3f} | " + " | ".join(kls) + " |")
    lines += ["", "Settings: `" + json.dumps(settings) + "`", "", f"Heads folder: `{heads_dir}`"]
    (out_dir / "heads.md").write_text("\n".join(lines) + "\n")
