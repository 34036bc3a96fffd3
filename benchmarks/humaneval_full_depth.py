"""HumanEval pass@1 of a model at full depth with plain vLLM (the baseline), or with early exit.

    .venv/bin/python benchmarks/humaneval_full_depth.py                     # Qwen2.5-Coder-1.5B, all 164
    .venv/bin/python benchmarks/humaneval_full_depth.py --limit 8 --out /tmp/he8   # a throughput estimate
    .venv/bin/python benchmarks/humaneval_full_depth.py --early-exit '{"threshold": 0.99, ...}' \
        --out benchmarks/results/qwen2.5-coder-1.5b/early-exit-NAME      # an operating point

With ``--early-exit`` the same problems run on the early-exit engine with those settings; the
summary then lists the problems lost and gained against the full-depth run (``--baseline``,
default the full-depth JSONL in the default results folder) and the engine's exit statistics.

Greedy, one reply per problem, the quality benchmark's prompt (``tools/quality/humaneval.py``:
the problem in one user turn of the model's chat template, the reply's first code block run
against the problem's tests in an isolated interpreter). Every problem is written to
``<out>/humaneval.jsonl`` as soon as its reply is generated and run, and a second run skips
the problems already there: a crash or a stop loses only the problems in flight. The JSON and
Markdown summaries (``humaneval.json``, ``humaneval.md``) are rewritten from the JSONL after
every problem. ``--stop-at HH:MM`` (UTC) stops before that time, leaving the rest to a resume.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from vllm_early_exit.tools.resume import write_json

DEFAULT_OUT = Path("benchmarks/results/qwen2.5-coder-1.5b")
JSONL = "humaneval.jsonl"


def read_done(path: Path) -> dict[str, dict]:
    """Problems already in the JSONL, by task id; a line cut off by a crash is ignored."""
    done: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["task_id"]] = record
    return done


def summarize(out: Path, setup: dict, total_problems: int) -> dict:
    """``humaneval.json`` and ``humaneval.md`` from the JSONL (all runs of it together)."""
    records = sorted(read_done(out / JSONL).values(), key=lambda r: r["index"])
    passed = sum(r["passed"] for r in records)
    outcomes = Counter(r["outcome"] for r in records)
    truncated = sum(r["finish_reason"] == "length" for r in records)
    runs = setup.get("runs", [])
    gen_s = sum(r["generation_s"] for r in runs)
    out_tokens = sum(r["output_tokens"] for r in runs)
    indices = [r["index"] for r in records]
    summary = {
        **setup,
        "problems_run": len(records),
        "problems_total": total_problems,
        "complete": len(records) == total_problems,
        "in_order": indices == list(range(len(indices))),
        "passed": passed,
        "pass_at_1": passed / len(records) if records else None,
        "outcomes": dict(outcomes.most_common()),
        "truncated_at_max_tokens": truncated,
        "output_tokens": sum(r["output_tokens"] for r in records),
        "mean_output_tokens": sum(r["output_tokens"] for r in records) / len(records) if records else None,
        "max_output_tokens_seen": max((r["output_tokens"] for r in records), default=0),
        "generation_s": gen_s,
        "output_tokens_per_s": out_tokens / gen_s if gen_s else None,
    }
    if setup.get("early_exit") is not None:
        summary["against_full_depth"] = lost_and_gained(records, setup.get("baseline") and Path(setup["baseline"]))
    write_json(out / "humaneval.json", summary)
    (out / "humaneval.md").write_text(markdown(summary))
    return summary


def lost_and_gained(records: list[dict], baseline: Path | None) -> dict | None:
    """Problems passed at full depth but not here (lost) and the other way round (gained)."""
    if baseline is None or not baseline.exists():
        return None
    full = read_done(baseline)
    lost = [r["task_id"] for r in records if r["task_id"] in full and full[r["task_id"]]["passed"] and not r["passed"]]
    gained = [r["task_id"] for r in records if r["task_id"] in full and not full[r["task_id"]]["passed"] and r["passed"]]
    same_code = sum(r["task_id"] in full and full[r["task_id"]]["code"] == r["code"] for r in records)
    return {"baseline": str(baseline), "lost": lost, "gained": gained, "same_code": same_code}


def markdown(s: dict) -> str:
    pass_at_1 = f"{s['pass_at_1']:.3f}" if s["pass_at_1"] is not None else "-"
    scope = "all" if s["complete"] else f"the first {s['problems_run']}" if s["in_order"] else f"{s['problems_run']}"
    lines = [
        f"# HumanEval pass@1, {s['model_name']}, "
        + ("full depth (plain vLLM)" if s.get("early_exit") is None else f"early exit `{json.dumps(s['early_exit'])}`"),
        "",
        f"**pass@1 {pass_at_1}** ({s['passed']} of {s['problems_run']} problems passed; {scope} of "
        f"{s['problems_total']} HumanEval problems{'' if s['complete'] else ', the rest not run yet: run the command again to resume'}).",
        "",
        "| setting | value |",
        "|---|---|",
        f"| model | `{s['model']}` |",
        f"| engine | plain vLLM {s['vllm']} (`LLM`, full depth), {s['device']} |" if s.get("early_exit") is None
        else f"| engine | vLLM {s['vllm']} with early exit (`LLM`), {s['device']} |",
        *[f"| exits, run {i} | mean {r['exit_stats']['mean_layers']:.2f} of {r['exit_stats']['num_layers']} layers per decode "
          f"token, {r['exit_stats']['early_exit_tokens']} of {r['exit_stats']['decode_tokens']} tokens left early |"
          for i, r in enumerate(s["runs"], 1) if r.get("exit_stats")],
        f"| machine | {s['processor']}, {s['cpus']} CPUs (shared with other work), torch {s['torch']} |",
        f"| dtype | {s['dtype']} |",
        f"| decoding | greedy, max {s['max_tokens']} new tokens, stop at the code block's closing fence |",
        f"| prompt | the problem in one user turn of the model's chat template, after \"{s['instruction'].strip()}\" |",
        f"| scoring | the reply's first code block (or the whole reply) against the problem's tests, {s['timeout_s']:g} s per program |",
        f"| dates | {', '.join(r['started'] for r in s['runs'])} |",
        *[f"| engine, run {i} | {', '.join(f'{k} {v}' for k, v in r['engine'].items())} |"
          for i, r in enumerate(s["runs"], 1) if "engine" in r],
        f"| generation time | {s['generation_s']:.0f} s over {len(s['runs'])} run(s) |",
        f"| output tokens/s | {s['output_tokens_per_s']:.1f} |" if s["output_tokens_per_s"] else "| output tokens/s | - |",
        f"| output tokens per reply | mean {s['mean_output_tokens'] or 0:.0f}, max {s['max_output_tokens_seen']} |",
        f"| replies cut at max tokens | {s['truncated_at_max_tokens']} |",
        "",
        "## Outcomes",
        "",
        "| outcome | problems |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in s["outcomes"].items()],
        "",
        "`assertion`: a test failed (wrong answer); `syntax`: the code does not parse; `error:X`: it raised X; "
        "`timeout`: it ran past the limit. Per problem: `humaneval.jsonl` (reply, code, outcome).",
        "",
    ]
    against = s.get("against_full_depth")
    if against:
        lines += [
            "## Against full depth",
            "",
            f"Baseline `{against['baseline']}`. Same extracted code as full depth: {against['same_code']} of "
            f"{s['problems_run']}. Lost (passed at full depth, failed here): {', '.join(against['lost']) or 'none'}. "
            f"Gained: {', '.join(against['gained']) or 'none'}.",
            "",
        ]
    return "\n".join(lines)


def parse_stop_at(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        hour, minute = (int(x) for x in text.split(":"))
    except ValueError:
        raise SystemExit(f"--stop-at {text!r}: expected HH:MM (UTC)") from None
    now = datetime.now(timezone.utc)
    stop = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if stop <= now:
        raise SystemExit(f"--stop-at {text}: that time (UTC) has passed; it is {now:%H:%M} UTC")
    return time.time() + (stop - now).total_seconds()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF checkpoint folder (default: Qwen2.5-Coder-1.5B-Instruct from fetch-model)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--max-tokens", type=int, default=512, help="new tokens per reply (default 512)")
    parser.add_argument("--limit", type=int, default=164, help="run the first N problems (default 164: all)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per test program (default 10)")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="replies decoded together (default 32)")
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (default 2)")
    parser.add_argument("--dtype", default="float32", help="engine dtype (default float32: bf16 crashes on this CPU)")
    parser.add_argument("--stop-at", help="HH:MM UTC: stop generating then (what is done is kept; resume later)")
    parser.add_argument("--early-exit", type=json.loads, default=None,
                        help="early-exit settings as JSON (default: none, plain vLLM at full depth)")
    parser.add_argument("--baseline", type=Path, default=DEFAULT_OUT / JSONL,
                        help="full-depth JSONL to list lost and gained problems against (with --early-exit)")
    args = parser.parse_args(argv)
    stop_at = parse_stop_at(args.stop_at)

    from transformers import AutoTokenizer

    from vllm_early_exit.tools.assets import FETCH_QWEN_CODER_HINT, qwen_coder_path
    from vllm_early_exit.tools.engines import build_engine, machine_info, shutdown_engine
    from vllm_early_exit.tools.quality.humaneval import (
        HUMANEVAL_INSTRUCTION,
        HUMANEVAL_STOP,
        humaneval_code,
        humaneval_problems,
        humaneval_program,
        humaneval_prompt,
        program_outcome,
    )

    model = args.model or qwen_coder_path()
    if model is None:
        raise SystemExit(f"Qwen2.5-Coder-1.5B-Instruct is not fetched yet: {FETCH_QWEN_CODER_HINT} (or pass --model)")
    model = str(model)
    problems = humaneval_problems(164)
    total = len(problems)
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / JSONL
    done = read_done(jsonl)
    setup_path = args.out / "setup.json"
    setup = json.loads(setup_path.read_text()) if setup_path.exists() else {}
    settings = {"model": model, "max_tokens": args.max_tokens, "dtype": args.dtype, "timeout_s": args.timeout,
                "instruction": HUMANEVAL_INSTRUCTION, "stop": HUMANEVAL_STOP, "early_exit": args.early_exit}
    changed = {k: (setup[k], v) for k, v in settings.items() if k in setup and setup[k] != v}
    if done and changed:
        raise SystemExit(
            f"{jsonl} holds {len(done)} problems run with other settings ({changed}); "
            "resume with the same settings, or pass another --out"
        )
    if args.early_exit is not None:
        if args.out.resolve() == DEFAULT_OUT.resolve():
            raise SystemExit("--early-exit writes next to the full-depth baseline: pass another --out")
        setup["baseline"] = str(args.baseline)
    setup.update(settings, model_name=Path(model).name, **{k: v for k, v in machine_info().items() if k != "date"})
    setup.setdefault("runs", [])
    todo = [(i, p) for i, p in enumerate(problems[: args.limit]) if p["task_id"] not in done]
    print(f"{len(done)} problems done, {len(todo)} to run (of the first {min(args.limit, total)})", flush=True)
    if not todo:
        print(json.dumps(summarize(args.out, setup, total), indent=2))
        return 0

    tokenizer = AutoTokenizer.from_pretrained(model)
    if not tokenizer.chat_template:
        raise SystemExit(f"{model} has no chat template; the prompt needs the model's chat template")
    prompts = {p["task_id"]: humaneval_prompt(tokenizer, p) for _, p in todo}
    max_model_len = max(len(t) for t in prompts.values()) + args.max_tokens + 16

    from tqdm import tqdm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = build_engine(model, dtype=args.dtype, kv_cache_gib=args.kv_cache_gib, max_model_len=max_model_len,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=max(2048, max_model_len),
                       early_exit=args.early_exit)
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop=HUMANEVAL_STOP)
    run = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "problems": 0,
           "output_tokens": 0, "generation_s": 0.0, "stopped_early": False,
           "engine": {"max_num_seqs": args.max_num_seqs, "kv_cache_gib": args.kv_cache_gib,
                      "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")}}
    setup["runs"].append(run)
    by_id = {p["task_id"]: (i, p) for i, p in todo}
    for task_id, tokens in prompts.items():
        engine.add_request(task_id, TokensPrompt(prompt_token_ids=tokens), params)
    start, scoring_s = time.monotonic(), 0.0
    bar = tqdm(total=len(todo), desc="HumanEval", unit="problem", dynamic_ncols=True)
    try:
        with open(jsonl, "a") as f:
            while engine.has_unfinished_requests():
                if stop_at is not None and time.time() >= stop_at:
                    run["stopped_early"] = True
                    print(f"\n--stop-at reached: {bar.n} of {len(todo)} problems done this run", flush=True)
                    break
                for output in engine.step():
                    if not output.finished:
                        continue
                    t0 = time.monotonic()
                    index, problem = by_id[output.request_id]
                    reply = output.outputs[0]
                    code = humaneval_code(reply.text)
                    outcome = program_outcome(humaneval_program(problem, code), args.timeout)
                    record = {
                        "task_id": problem["task_id"], "index": index, "passed": outcome == "passed",
                        "outcome": outcome, "finish_reason": reply.finish_reason,
                        "prompt_tokens": len(output.prompt_token_ids), "output_tokens": len(reply.token_ids),
                        "reply": reply.text, "code": code,
                    }
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    scoring_s += time.monotonic() - t0
                    run["problems"] += 1
                    run["output_tokens"] += len(reply.token_ids)
                    run["generation_s"] = time.monotonic() - start - scoring_s
                    write_json(setup_path, setup)
                    summary = summarize(args.out, setup, total)
                    bar.set_postfix_str(f"pass@1 {summary['pass_at_1']:.3f}, {summary['output_tokens_per_s'] or 0:.1f} tok/s")
                    bar.update(1)
    finally:
        bar.close()
        run["generation_s"] = time.monotonic() - start - scoring_s
        run["scoring_s"] = scoring_s
        if args.early_exit is not None:
            from vllm_early_exit import get_exit_stats

            run["exit_stats"] = get_exit_stats(llm).to_dict()
        write_json(setup_path, setup)
        shutdown_engine(llm)
    summary = summarize(args.out, setup, total)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
