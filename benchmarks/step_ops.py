"""What a decode step asks of the host, per setting: aten ops and host-reading ops per pure-decode step.

Each setting runs in a fresh process (SmolLM2, the engine in that process),
decodes 24 tokens for 1 and then 8 ShareGPT prompts at once, and counts with
``vllm_early_exit.tools.step_ops`` around the model's ``forward`` and
``compute_logits``. Eager by default, so every op is visible; with ``--compiled``
the engines compile (plain vLLM its model, early exit its segments with their
checks) and the ops counted are those the host runs outside compiled units,
beside the compiled calls per step. Writes ``step_ops.json`` and ``step_ops.md``.

With ``--timed`` it times the parts of each step instead (``vllm_early_exit.tools.
step_times``: the compiled calls, the reads, each kind of branch, ``compute_logits``,
the host's rest), over ``--tokens`` new tokens at batch 1, 8 and 32, and writes
``step_times.json`` and ``step_times.md``.

    .venv/bin/python benchmarks/step_ops.py [--out benchmarks/results/step_ops] [--only never,forced_50] [--compiled]
        [--timed [--tokens 64]]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHECKS = [20, 22, 24, 26, 28]
SETTINGS: dict[str, dict | str | None] = {
    "plain": None,
    "never": {"threshold": 1.0, "exit_layers": CHECKS},
    "forced_50": {"exit_layers": [14], "threshold": 0.0, "policy": "all"},
    "per_token": {"signal": "max_prob", "threshold": 0.9, "exit_layers": CHECKS, "policy": "per_token"},
    "never_shortlist": {"threshold": 1.0, "exit_layers": CHECKS, "shortlist": "SHORTLIST"},
    "per_token_shortlist": {
        "signal": "max_prob", "threshold": 0.9, "exit_layers": CHECKS, "policy": "per_token", "shortlist": "SHORTLIST",
    },
    "exit_ready": "EXIT_READY",
}
"""Settings per engine; ``"EXIT_READY"``: the shipped exit-ready SmolLM2 (``fetch-model
smollm2-exit-ready``) with its certified settings, ``max_exit_batch`` lifted so every batch checks."""
BATCHES = (1, 8)
TIMED_BATCHES = (1, 8, 32)
NEW_TOKENS = 24


def measure(name: str, settings: dict | None, compiled: bool = False, timed_tokens: int = 0) -> dict:
    """In this process: one engine with ``settings``, its op counts per batch size (with
    ``timed_tokens``: the times of its steps' parts over that many new tokens)."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_early_exit.tools.assets import chat_prompt, sharegpt_prompts, smollm2_checkpoint
    from vllm_early_exit.tools.engines import build_engine
    from vllm_early_exit.tools.shortlist import ensure_shortlist
    from vllm_early_exit.tools.step_ops import StepRecorder
    from vllm_early_exit.tools.step_times import StepTimer

    model = str(smollm2_checkpoint())
    if settings == "EXIT_READY":
        from vllm_early_exit.tools.exit_ready import exit_ready_checkpoint, served_settings

        folder = exit_ready_checkpoint()
        model = str(folder)
        settings = {key: value for key, value in served_settings(folder).items() if key != "max_exit_batch"}
    if settings is not None and settings.get("shortlist") == "SHORTLIST":
        settings = {**settings, "shortlist": str(ensure_shortlist(model))}
    if settings is None:
        from vllm.model_executor.models.llama import LlamaForCausalLM as model_cls
    else:
        from vllm_early_exit.model_executor.models.llama_early_exit import EarlyExitLlamaForCausalLM as model_cls
    recorder = StepTimer() if timed_tokens else StepRecorder()
    recorder.install(model_cls)
    engine = {"dtype": "float32", "max_model_len": 1024, "kv_cache_gib": 1, "enforce_eager": not compiled}
    if settings is not None:
        settings = {**settings, "log_interval_s": 0, "compile": compiled}
    llm = build_engine(model, early_exit=settings, **engine)
    tokenizer = AutoTokenizer.from_pretrained(model)
    batches = TIMED_BATCHES if timed_tokens else BATCHES
    texts = sharegpt_prompts(max(batches))
    prompts = [
        {"prompt_token_ids": tokenizer.encode(chat_prompt(tokenizer, t), add_special_tokens=False)[-128:]}
        for t in texts
    ]
    params = SamplingParams(max_tokens=timed_tokens or NEW_TOKENS, temperature=0.0, ignore_eos=True)
    result = {"engine": name, "settings": settings, "compiled": compiled, "batches": {}}
    if timed_tokens:  # the first engine steps after start-up are slower: one round left out
        llm.generate(prompts[:1], params, use_tqdm=False)
    for batch in batches:
        recorder.steps.clear()
        llm.generate(prompts[:batch], params, use_tqdm=False)
        result["batches"][str(batch)] = recorder.summary()
    return result


def markdown(results: list[dict]) -> str:
    compiled = any(r.get("compiled") for r in results)
    how = (
        "compiled: `aten ops` are the eager ops outside compiled units, `compiled calls` the calls of compiled units"
        if compiled
        else "eager (every op visible)"
    )
    lines = [
        "# Host work per pure-decode step",
        "",
        f"SmolLM2-135M, {how}, 24 new tokens, batch 1 and 8 ShareGPT prompts at once. "
        "`host reads`: ops that make the host wait for device data or give a data-dependent shape "
        "(`vllm_early_exit/tools/step_ops.py`), per pure-decode step (mean / largest); `decisions`: the "
        "decision points the step reached. Checks at layers " + ", ".join(map(str, CHECKS)) + ".",
        "",
        "| engine | batch | aten ops | compiled calls | ops between them | host reads (mean / max) | decisions | reads by name |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r, batch, s in measured(results):
        names = ", ".join(f"{k} {v:.1f}" for k, v in s["host_reads_by_name"].items()) or "none"
        decisions = "" if s["decisions_per_step"] is None else f"{s['decisions_per_step']:.1f}"
        lines.append(
            f"| {r['engine']} | {batch} | {s['ops_per_step']:.0f} | {s.get('compiled_calls_per_step', 0):.1f} | "
            f"{s.get('ops_between_compiled_calls_per_step', 0):.0f} | "
            f"{s['host_reads_per_step']:.1f} / "
            f"{s['max_host_reads']} | {decisions} | {names} |"
        )
    lines += ["", "Ops per step by name (the most frequent first):", ""]
    for r in results:
        for batch, s in r["batches"].items():
            top = ", ".join(f"{k} {v:.1f}" for k, v in list(s.get("ops_by_name", {}).items())[:25])
            lines.append(f"- {r['engine']}, batch {batch}: {top}")
    return "\n".join(lines) + "\n"


def measured(results: list[dict]):
    """``(engine result, batch, its numbers)`` of every batch that reached a pure-decode step."""
    for r in results:
        for batch, s in r["batches"].items():
            if s.get("steps"):
                yield r, batch, s


def timed_markdown(results: list[dict], tokens: int) -> str:
    lines = [
        "# Where a pure-decode step's time goes",
        "",
        f"SmolLM2-135M, float32, {'compiled' if any(r.get('compiled') for r in results) else 'eager'}, "
        f"{tokens} new tokens per prompt, batch " + ", ".join(map(str, TIMED_BATCHES)) + " ShareGPT prompts at "
        "once; the first 2 pure-decode steps of each batch left out. Exclusive wall time per pure-decode step "
        "(`vllm_early_exit/tools/step_times.py`): a part's time less that of the parts inside it, so the parts "
        "add up to the step; calls per step in brackets. Checks at layers " + ", ".join(map(str, CHECKS)) + ".",
        "",
        "| engine | batch | step ms | parts: ms per step (calls per step) |",
        "|---|---|---|---|",
    ]
    for r, batch, s in measured(results):
        parts = "; ".join(
            f"{name} {ms:.2f} ({s['calls_per_step'][name]:.1f})" for name, ms in s["ms_per_step"].items()
        )
        lines.append(f"| {r['engine']} | {batch} | {s['step_ms']:.2f} | {parts} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/step_ops")
    parser.add_argument("--only", default=None, help="comma-separated settings (default: all)")
    parser.add_argument("--compiled", action="store_true", help="compiled engines (count ops outside compiled units)")
    parser.add_argument("--timed", action="store_true", help="time the parts of each step instead of counting ops")
    parser.add_argument("--tokens", type=int, default=64, help="with --timed: new tokens per prompt")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: one setting
    args = parser.parse_args()
    timed_tokens = args.tokens if args.timed else 0
    if args.one:
        print(json.dumps(measure(args.one, SETTINGS[args.one], args.compiled, timed_tokens)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(SETTINGS)
    results = []
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING"}
    for name in names:
        print(f"step_ops: {name} ...", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name, *(["--compiled"] if args.compiled else []),
             *(["--timed", "--tokens", str(args.tokens)] if args.timed else [])],
            capture_output=True, text=True, env=env, check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"step_ops: {name} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        stem = "step_times" if args.timed else "step_ops"
        text = timed_markdown(results, args.tokens) if args.timed else markdown(results)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
