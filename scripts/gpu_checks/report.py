"""The report: ``gpu_check.json`` and ``gpu_check.md``, rewritten after every finished check, and
the set-up it records (versions, device, budget)."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from gpu_checks.profile import PROFILED
from gpu_checks.settings import HALF_DEPTH_LIMIT

class Report:
    def __init__(self, out: Path, setup: dict) -> None:
        self.out = out
        self.data = {"setup": setup, "correctness": [], "groups": [], "speed": {"rows": [], "engines": {}, "errors": []},
                     "profile": {"rows": [], "errors": []}}
        out.mkdir(parents=True, exist_ok=True)

    def check(self, record: dict) -> None:
        self.data["correctness"].append(record)
        self.write()

    def failed(self) -> list[dict]:
        return [c for c in self.data["correctness"] if c["status"] not in ("pass", "info", "not run")]

    def write(self) -> None:
        self.data["setup"]["updated"] = now()
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2))
        (self.out / "gpu_check.md").write_text(self.markdown())

    def markdown(self) -> str:
        s = self.data["setup"]
        lines = [
            "# GPU check: vllm_early_exit",
            "",
            f"{s['date']} | {s['device_name']} | vLLM {s.get('vllm', '?')} | torch {s.get('torch', '?')} | "
            f"transformers {s.get('transformers', '?')} | Python {s['python']} | correctness dtype {s['dtype']} | "
            f"VLLM_BATCH_INVARIANT {'1' if s['batch_invariant'] else 'not set'}"
            f"{' (not known to this vLLM)' if not s['batch_invariant_known'] else ''} | "
            f"budget {s['budget_s']:.0f} s{' | smoke' if s['smoke'] else ''}",
            "",
            "## Correctness",
            "",
        ]
        for g in self.data["groups"]:
            lines.append(f"- {g['group']}: {one_line(g['status'], 200)}"
                         f"{' - ' + one_line(g['note'], 300) if g.get('note') else ''}")
        lines += [
            "",
            "| group | check | status | differing / tokens | share | noise (like with like) | detail |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in self.data["correctness"]:
            cmp = c.get("compare") or {}
            share = f"{cmp['share']:.4f}" if cmp.get("share") is not None else "-"
            counted = f"{cmp['differing']} / {cmp['tokens']}" if cmp else "-"
            noise = f"{c['noise']:.4f} ({c['noise_from']})" if c.get("noise") is not None else "-"
            detail = one_line(c.get("detail"), 300).replace("|", "/")
            lines.append(f"| {c['group']} | {c['check']} | {c['status']} | {counted} | {share} | {noise} | {detail} |")
        sp = self.data["speed"]
        lines += ["", "## Speed", ""]
        if sp.get("setup"):
            x = sp["setup"]
            lines += [
                f"{Path(x['model']).name} ({x['num_layers']} layers, {x['dtype']}, load_format {x['load_format']}), "
                f"{x['prompt_tokens']} prompt / {x['output_tokens']} output tokens (ignore_eos, greedy), "
                f"{x['rounds']} timed rounds after a warm-up, each engine alternated run by run with plain vLLM "
                f"(its ratio is to those plain runs). "
                f"`limit`: layers / mean layers; measured limit of leaving at half depth on H100: "
                f"~{HALF_DEPTH_LIMIT}x (plain vLLM with 16 of 32 layers, gpu-bundle/README.md).",
                "",
            ]
        if s["smoke"]:
            lines += [
                "Smoke run: tiny model, eager engines, few tokens: the numbers check the harness, they are "
                "not a speed measurement.",
                "",
            ]
        for name, e in sp["engines"].items():
            settings = json.dumps(e.get("early_exit")) if e.get("early_exit") is not None else "plain vLLM"
            started = (f"start {e['start_s']:.0f} s, {e.get('runner', '')}" if "start_s" in e
                       else one_line(e.get("error", "not started"), 300))
            lines.append(f"- `{name}`: {settings} {json.dumps(e.get('engine', {}))}; {started}")
        if sp["rows"]:
            lines += ["", "| batch | engine | tok/s | ratio to plain | mean layers | limit |", "|---|---|---|---|---|---|"]
            for r in sp["rows"]:
                ratio = f"{r['ratio']:.3f}" if r.get("ratio") is not None else "-"
                layers = f"{r['mean_layers']:.2f}" if r.get("mean_layers") is not None else "-"
                limit = f"{r['limit']:.2f}" if r.get("limit") is not None else "-"
                lines.append(f"| {r['batch']} | {r['engine']} | {r['tokens_per_s']:.1f} | {ratio} | {layers} | {limit} |")
        for err in sp["errors"]:
            lines.append(f"- error: {one_line(err, 300)}")
        if sp.get("status"):
            lines += ["", f"Speed: {sp['status']}"]
        lines += _profile_lines(self.data["profile"])
        failed = self.failed()
        lines += ["", f"**{len(failed)} correctness check(s) failed.**" if failed else "All correctness checks that ran passed."]
        return "\n".join(lines) + "\n"


def _profile_lines(pr: dict) -> list[str]:
    if not pr.get("rows") and not pr.get("status"):
        return []
    labels = [label for *_, label in PROFILED]
    shown = [label for label in labels if any(label in r.get("host_ms_per_step", {}) for r in pr["rows"])]
    lines = ["", "## Profile (per output token, its prompt's prefill included; torch.profiler running; "
             "host ms spent inside each range)", ""]
    if pr["rows"]:
        lines += ["| engine | batch | ms/step | device ms | graph launches | kernel launches | syncs | memcpy | "
                  + " | ".join(shown) + " |", "|---" * (8 + len(shown)) + "|"]
        for r in pr["rows"]:
            if "error" in r:
                lines.append(f"| {r['engine']} | {r['batch']} | error: {one_line(r['error'], 200)} |")
                continue
            rt, host = r["runtime_per_step"], r["host_ms_per_step"]
            lines.append(
                f"| {r['engine']} | {r['batch']} | {r['ms_per_step']:.2f} | {r['device_ms_per_step']:.2f} | "
                f"{rt['graph_launches']:.1f} | {rt['kernel_launches']:.1f} | {rt['syncs']:.1f} | {rt['memcpy']:.1f} | "
                + " | ".join(f"{host[label]:.2f}" if label in host else "-" for label in shown) + " |")
    for r in pr["rows"]:
        if r.get("python_top"):
            top = ", ".join(f"`{x['function']}` {x['own_ms_per_step']:.3f}" for x in r["python_top"][:8])
            lines.append(f"- {r['engine']}, batch {r['batch']}, most own host time (cProfile, ms per step): {top}")
    for err in pr.get("errors", []):
        lines.append(f"- error: {one_line(err, 300)}")
    if pr.get("status"):
        lines += ["", f"Profile: {pr['status']}"]
    return lines



def one_line(text, limit: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _batch_invariant_known() -> bool:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return False
    envs = Path(list(spec.submodule_search_locations)[0]) / "envs.py"
    return envs.exists() and "VLLM_BATCH_INVARIANT" in envs.read_text()


def setup_info(args) -> dict:
    info = {"date": now(), "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "device": args.device, "dtype": args.dtype, "smoke": args.smoke,
            "only": args.only, "budget_s": args.budget_s, "batch_invariant_known": _batch_invariant_known(),
            "argv": sys.argv[1:]}
    info["batch_invariant"] = info["batch_invariant_known"] and args.dtype != "float32" and not args.no_batch_invariant
    for name in ("torch", "vllm", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:
            info[name] = f"unavailable ({exc})"
    try:
        import torch

        info["device_name"] = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    except Exception as exc:
        info["device_name"] = f"unknown ({exc})"
    return info
