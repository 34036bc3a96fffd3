"""Speed: plain vLLM against forced exit at half depth and checks that never fire, alternated run
by run in one worker at every batch size; each engine's ratio is to the plain runs of its block."""

from __future__ import annotations

import random
import time
import traceback
from pathlib import Path

from gpu_checks.settings import forced_settings, never_settings, tiny_model
from gpu_checks.workers import Clock, budget_or_skip, emit, exit_stats, release, run_worker, start_engine

def worker_speed(spec: dict, results: Path) -> None:
    """Plain vLLM stays up; each early-exit engine in turn is started and alternated with it
    run by run at every batch size (a block), then stopped, so each block's numbers are
    complete before the next engine starts (a time budget then loses whole engines only)."""
    from vllm import SamplingParams

    from vllm_early_exit import reset_exit_stats

    def started(engine):
        try:
            llm, info = start_engine(spec, engine)
            emit(results, {"engine": engine["name"], "started": True, **info})
            return llm
        except Exception as exc:
            emit(results, {"engine": engine["name"], "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc()[-4000:]})
            return None

    def timed(llm, name, exiting, prompts, batch, round_index, block):
        record = {"engine": name, "batch": batch, "round": round_index, "block": block}
        try:
            if exiting:
                reset_exit_stats(llm)
            start = time.perf_counter()  # generate returns with the outputs: the device is done
            outs = llm.generate(prompts, params, use_tqdm=False)
            record["seconds"] = time.perf_counter() - start
            record["tokens"] = sum(len(o.outputs[0].token_ids) for o in outs)
            if exiting:
                record["mean_layers"] = exit_stats(llm)["mean_layers"]
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
        emit(results, record)

    rng = random.Random(0)
    params = SamplingParams(max_tokens=spec["output_tokens"], temperature=0.0, ignore_eos=True)
    prompts = {b: [{"prompt_token_ids": [rng.randrange(10, spec["max_token_id"]) for _ in range(spec["prompt_tokens"])]}
                   for _ in range(b)] for b in spec["batches"]}
    plain_spec, *others = spec["engines"]
    plain = started(plain_spec)
    if plain is None:
        return
    for engine in others:
        llm = started(engine)
        if llm is None:
            continue
        for batch in spec["batches"]:
            for round_index in range(spec["rounds"] + 1):  # round 0 warms both up at this batch size
                timed(plain, plain_spec["name"], False, prompts[batch], batch, round_index, engine["name"])
                timed(llm, engine["name"], True, prompts[batch], batch, round_index, engine["name"])
        release(llm)


def speed_spec(args) -> dict:
    from transformers import AutoConfig

    if args.smoke:
        model = tiny_model(args)
        batches, prompt_tokens, output_tokens, rounds, max_token_id = [4], 16, 8, 1, 500
    else:
        model = Path(args.llama8b)
        batches, prompt_tokens, output_tokens, rounds, max_token_id = [1, 8, 64], 128, 128, 2, 49000
    num_layers = AutoConfig.from_pretrained(model).num_hidden_layers
    # Smoke runs on CPU stay eager (compiling three engines takes minutes on 2 cores).
    compiled = not args.smoke
    common = {"dtype": "bfloat16" if args.device == "cuda" else "float32",
              "max_model_len": prompt_tokens + output_tokens + 16, "seed": 0, "max_num_seqs": max(batches)}
    if args.smoke:
        common["skip_tokenizer_init"] = True  # the tiny model has no tokenizer
    else:
        common["load_format"] = "dummy"
    if args.device == "cuda":
        common["gpu_memory_utilization"] = 0.28
    extra = {"compile": True} if compiled else {}
    if compiled and args.cuda_graphs:
        extra["cuda_graphs"] = args.cuda_graphs
    eager = {} if compiled else {"enforce_eager": True}
    engines = [
        {"name": "plain", "early_exit": None, "engine": eager},
        {"name": "forced_50" + ("_compiled" if compiled else ""), "early_exit": {**forced_settings(num_layers), **extra},
         "engine": eager},
    ]
    never, settings = never_settings(num_layers, str(Path(args.shortlist).resolve()) if args.shortlist else None)
    engines.append({"name": never + ("_compiled" if compiled else ""), "early_exit": {**settings, **extra},
                    "engine": eager})
    if args.device == "cuda":
        engines.append(PLAIN_LIKE_EARLY_EXIT)
    return {"name": "speed", "model": str(model), "common": common, "engines": engines, "batches": batches,
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "rounds": rounds,
            "max_token_id": max_token_id, "num_layers": num_layers}


PLAIN_LIKE_EARLY_EXIT = {
    "name": "plain_v1_piecewise", "early_exit": None, "env": {"VLLM_USE_V2_MODEL_RUNNER": "0"},
    "engine": {"compilation_config": {"cudagraph_mode": "PIECEWISE"}},
}
"""Plain vLLM on the runner and CUDA-graph mode early exit runs on (V1, piecewise graphs): the
share of a ratio that is the platform's, not the layers' or the checks'."""


def speed_rows(records: list[dict], num_layers: int) -> tuple[list[dict], list[str]]:
    """Per batch: plain vLLM over all its timed runs, and each engine with its ratio to the plain
    runs alternated with it (its block)."""
    runs = [r for r in records if "batch" in r and "error" not in r and r["round"] > 0]
    errors = [f"{r['engine']}{' batch ' + str(r['batch']) if 'batch' in r else ''}: {r['error']}"
              for r in records if "error" in r]

    def rate(ms):
        return sum(r["tokens"] for r in ms) / sum(r["seconds"] for r in ms)

    rows = []
    for batch in sorted({r["batch"] for r in runs}):
        at = [r for r in runs if r["batch"] == batch]
        plain = [r for r in at if r["engine"] == "plain"]
        if plain:
            rows.append({"batch": batch, "engine": "plain", "tokens_per_s": rate(plain), "runs": len(plain),
                         "ratio": 1.0, "mean_layers": float(num_layers), "limit": 1.0})
        for engine in dict.fromkeys(r["engine"] for r in at if r["engine"] != "plain"):
            ms = [r for r in at if r["engine"] == engine]
            block = [r for r in plain if r["block"] == engine]
            mean_layers = sum(r["mean_layers"] for r in ms) / len(ms)
            rows.append({"batch": batch, "engine": engine, "tokens_per_s": rate(ms), "runs": len(ms),
                         "ratio": rate(ms) / rate(block) if block else None, "mean_layers": mean_layers,
                         "limit": num_layers / mean_layers if mean_layers else None})
    return rows, errors


def run_speed(args, report, clock: Clock, work: Path) -> None:
    sp = report.data["speed"]
    budget = budget_or_skip(sp, clock, report)
    if budget is None:
        return
    try:
        spec = speed_spec(args)
        if not Path(spec["model"], "config.json").exists():
            sp["status"] = f"skipped: no model at {spec['model']}"
            report.write()
            return
        sp["setup"] = {"model": spec["model"], "num_layers": spec["num_layers"], "dtype": spec["common"]["dtype"],
                       "load_format": spec["common"].get("load_format", "auto"), "batches": spec["batches"],
                       "prompt_tokens": spec["prompt_tokens"], "output_tokens": spec["output_tokens"],
                       "rounds": spec["rounds"]}
        sp["engines"] = {e["name"]: {"early_exit": e["early_exit"], "engine": e["engine"]} for e in spec["engines"]}
        sp["status"] = f"running (budget {budget:.0f} s)"
        report.write()

        def on_record(records):
            for r in records:
                if "batch" not in r:
                    sp["engines"][r["engine"]].update({k: v for k, v in r.items() if k not in ("traceback", "engine")})
            sp["rows"], sp["errors"] = speed_rows(records, spec["num_layers"])
            report.write()

        # Engine cores in their own processes: a function sent through collective_rpc (which
        # runner ran) needs pickle. The CPU smoke run keeps the cores in process (quicker starts).
        env = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
        if args.smoke:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        outcome = run_worker("speed", spec, work, budget - 5, env, on_record)
        sp["status"] = outcome
    except Exception as exc:
        sp["status"] = "error"
        sp["errors"].append(f"{type(exc).__name__}: {exc}")
        sp["traceback"] = traceback.format_exc()[-4000:]
    report.write()
