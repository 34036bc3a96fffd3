"""Correctness: plain vLLM, early exit off, forced and threshold exits, per-request off and compiled
engines of one model in a worker; each check compares their tokens (to each other or to the HF
reference of ``tests/reference.py``) as soon as its engines are done."""

from __future__ import annotations

import time
import traceback
from pathlib import Path

from gpu_checks.report import Report
from gpu_checks.settings import deep_layers, forced_settings, tests_conftest, tiny_model
from gpu_checks.workers import Clock, emit, exit_stats, release, run_worker, start_engine

def worker_correctness(spec: dict, results: Path) -> None:
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    for engine in spec["engines"]:
        record = {"engine": engine["name"]}
        llm = None
        try:
            llm, info = start_engine(spec, engine)
            record.update(info)
            rows = engine.get("rows") or [None] * len(prompts)
            params = [
                SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True, extra_args=x)
                for x in rows
            ]
            record["outputs"] = []
            for _ in range(engine.get("repeats", 1)):
                outs = llm.generate(prompts, params, use_tqdm=False)
                record["outputs"].append([list(o.outputs[0].token_ids) for o in outs])
            if engine.get("early_exit") is not None:
                record["stats"] = exit_stats(llm)
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc()[-4000:]
        emit(results, record)
        if llm is not None:
            release(llm)


# Comparisons and verdicts


def compare(got: list[list[int]], want: list[list[int]]) -> dict:
    """Position by position over the rows (a missing or extra token counts as differing)."""
    tokens = differing = identical = 0
    first = []
    for a, b in zip(got, want):
        n = max(len(a), len(b))
        diff = [i for i in range(n) if i >= len(a) or i >= len(b) or a[i] != b[i]]
        tokens += n
        differing += len(diff)
        identical += not diff
        first.append(diff[0] if diff else None)
    return {
        "rows": min(len(got), len(want)),
        "rows_expected": len(want),
        "tokens": tokens,
        "differing": differing,
        "share": differing / tokens if tokens else None,
        "identical_rows": identical,
        "first_divergence": first,
    }


def verdict(cmp: dict, exact: bool, noise: float | None, tolerance: float) -> tuple[str, str]:
    if cmp["tokens"] == 0 or cmp["rows"] < cmp["rows_expected"]:
        return "fail", "nothing (or not everything) was compared"
    if cmp["differing"] == 0:
        return "pass", "identical tokens"
    if exact:
        return "fail", f"{cmp['differing']} of {cmp['tokens']} tokens differ (float32: identical required)"
    bound = (noise or 0.0) + tolerance
    if cmp["share"] <= bound:
        return "pass", f"share {cmp['share']:.3f} within bf16 noise {noise or 0.0:.3f} + tolerance {tolerance}"
    return "fail", f"share {cmp['share']:.3f} above bf16 noise {noise or 0.0:.3f} + tolerance {tolerance}"


def exit_counts(traces, num_layers: int) -> list[int]:
    counts = [0] * num_layers
    for t in traces:
        for layer in t.exit_layers:
            if layer is not None:
                counts[layer] += 1
    return counts


def correctness_groups(args) -> list[dict]:
    groups = [{"model": "tiny", "path": tiny_model(args)}]
    if not args.smoke:
        groups.append({"model": "smollm2", "path": Path(args.smollm2)})
    out = []
    for g in groups:
        for runner, env in (("default", {}), ("v1", {"VLLM_USE_V2_MODEL_RUNNER": "0"})):
            out.append({**g, "runner": runner, "env": env, "name": f"{g['model']}-{runner}",
                        "weight": {"tiny-default": 2.0, "tiny-v1": 1.0}.get(f"{g['model']}-{runner}", 1.5)})
    if args.groups:
        wanted = args.groups.split(",")
        unknown = sorted(set(wanted) - {g["name"] for g in out})
        if unknown:
            raise ValueError(f"--groups: unknown group(s) {unknown}; known: {[g['name'] for g in out]}")
        out = [g for g in out if g["name"] in wanted]
    return out


def model_case(group: dict, conftest, args) -> dict:
    """Prompts, token count, exit rules and reference of one model."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from tests.reference import ReferenceDecoder

    path = group["path"]
    num_layers = AutoConfig.from_pretrained(path).num_hidden_layers
    if group["model"] == "tiny":
        prompts = conftest.tiny_prompts(6, seed=7)
        max_tokens = conftest.NEW_TOKENS
        rule = {**conftest.MIXED, "policy": "per_token"}
        max_model_len = 512
    else:
        tok = AutoTokenizer.from_pretrained(path)
        texts = [
            "The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):",
            "Explain why the sky is blue.", "List three prime numbers:", "Once upon a time, in a small village,",
            "How do I boil an egg?", "Translate 'good morning' into Spanish:",
        ]
        prompts = [tok.encode(t) for t in texts]
        max_tokens = 32
        rule = {"signal": "max_prob", "threshold": 0.9, "exit_layers": deep_layers(num_layers), "policy": "per_token"}
        max_model_len = 1024
    ref = ReferenceDecoder(LlamaForCausalLM.from_pretrained(path, dtype=torch.float32))
    return {"num_layers": num_layers, "prompts": prompts, "max_tokens": max_tokens, "rule": rule,
            "forced": forced_settings(num_layers), "max_model_len": max_model_len, "reference": ref}


def correctness_spec(group: dict, case: dict, args) -> dict:
    exact = args.dtype == "float32"
    common = {"dtype": args.dtype, "max_model_len": case["max_model_len"], "seed": 0, "enforce_eager": True,
              "enable_prefix_caching": False, "skip_tokenizer_init": True, "max_num_seqs": 16}
    if args.device == "cuda":
        common["gpu_memory_utilization"] = 0.3
    off = {"early_exit": {"enabled": False}}
    mixed_rows = [None if i % 2 == 0 else off for i in range(len(case["prompts"]))]
    engines = [
        {"name": "plain", "early_exit": None, "repeats": 2},
        {"name": "exits_off", "early_exit": {"enabled": False}},
        {"name": "forced", "early_exit": case["forced"]},
        {"name": "threshold_mixed", "early_exit": case["rule"], "rows": mixed_rows},
        {"name": "compiled", "early_exit": {**case["rule"], "compile": True}, "rows": mixed_rows,
         "engine": {"enforce_eager": False}},
    ]
    if args.cuda_graphs:  # the captured step (early_exit.cuda_graphs) against the compiled one
        engines.append({"name": "graphed", "early_exit": {**case["rule"], "compile": True, "cuda_graphs": args.cuda_graphs},
                        "rows": mixed_rows, "engine": {"enforce_eager": False}})
    if not exact:  # the compile-vs-eager noise of plain vLLM itself, for compiled_eq_eager in bf16
        engines.append({"name": "plain_compiled", "early_exit": None, "engine": {"enforce_eager": False}})
    return {"name": group["name"], "model": str(group["path"]), "common": common, "engines": engines,
            "prompts": case["prompts"], "max_tokens": case["max_tokens"]}


class GroupChecks:
    """Turns a group's engine records into checks as soon as their engines are done."""

    def __init__(self, group: dict, case: dict, report: Report, args) -> None:
        self.group, self.case, self.report, self.args = group, case, report, args
        self.exact = args.dtype == "float32"
        self.done: set[str] = set()
        self.runner = self.runner_version = None
        self._ref: dict[str, list] = case.setdefault("traces", {})  # shared by the model's groups

    def _rule_kwargs(self, rule: str) -> dict:
        c = self.case
        return {
            "full": {},
            "forced": {"exit_layers": tuple(c["forced"]["exit_layers"]), "threshold": 0.0},
            "rule": {"exit_layers": tuple(c["rule"]["exit_layers"]), "threshold": c["rule"]["threshold"]},
        }[rule]

    def reference(self, rule: str):
        """The reference's free-running traces of every prompt under ``rule``."""
        if rule not in self._ref:
            c, ref = self.case, self.case["reference"]
            self._ref[rule] = [ref.generate(p, c["max_tokens"], **self._rule_kwargs(rule)) for p in c["prompts"]]
        return self._ref[rule]

    def teacher_forced(self, rule: str, rows, tokens: list[list[int]]):
        """The reference's picks under ``rule`` after each prefix of ``tokens`` (one list per row)."""
        c, ref = self.case, self.case["reference"]
        return [ref.generate(c["prompts"][i], len(t), teacher=t, **self._rule_kwargs(rule)) for i, t in zip(rows, tokens)]

    def __call__(self, records: list[dict]) -> None:
        by = {r["engine"]: r for r in records}
        if self.runner is None and "plain" in by and "runner" in by["plain"]:
            self.runner, self.runner_version = by["plain"]["runner"], by["plain"]["runner_version"]
        for name, needs, fn in (
            ("plain_run_to_run", ("plain",), self.plain_run_to_run),
            ("exits_off_eq_plain", ("plain", "exits_off"), self.exits_off),
            ("forced_eq_reference", ("plain", "forced"), self.forced),
            ("threshold_eq_reference", ("plain", "threshold_mixed"), self.threshold),
            ("request_off_eq_plain", ("plain", "threshold_mixed"), self.request_off),
            ("compiled_eq_eager", ("threshold_mixed", "compiled"), self.compiled),
            ("graphed_eq_compiled", ("compiled", "graphed"), self.graphed),
        ):
            if name in self.done or not all(n in by for n in needs):
                continue
            self.done.add(name)
            self.run_check(name, fn, [by[n] for n in needs], by)

    def finish(self, outcome: str) -> None:
        names = ["plain_run_to_run", "exits_off_eq_plain", "forced_eq_reference", "threshold_eq_reference",
                 "request_off_eq_plain", "compiled_eq_eager"] + (["graphed_eq_compiled"] if self.args.cuda_graphs else [])
        for name in names:
            if name not in self.done:  # out of time: not run; the worker died: an error
                self.done.add(name)
                status = "not run" if "time budget" in outcome else "error"
                self.record(name, status, f"its engines did not finish: {outcome}")

    def record(self, check: str, status: str, detail: str, **extra) -> None:
        self.report.check({"group": self.group["name"], "runner": self.runner, "check": check, "status": status,
                           "detail": detail, **extra})

    def run_check(self, name, fn, engines, by) -> None:
        errors = [f"{e['engine']}: {e['error']}" for e in engines if "error" in e]
        if errors:
            tb = next(e.get("traceback") for e in engines if "error" in e)
            self.record(name, "error", "; ".join(errors), traceback=tb)
            return
        try:
            fn(*engines, by=by)
        except Exception as exc:
            self.record(name, "error", f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])

    def noise(self, plain: dict) -> float:
        return compare(plain["outputs"][1], plain["outputs"][0])["share"] or 0.0

    def judged(self, name, got, want, noise, noise_from, detail_extra="", ok=True, **extra) -> None:
        """``ok``: the check's other conditions (exit counts, exits happened) hold."""
        cmp = compare(got, want)
        status, detail = verdict(cmp, self.exact, noise if not self.exact else None, self.args.bf16_tolerance)
        if not ok:
            status, detail = "fail", detail + "; but see the exit counts"
        self.record(name, status, detail + (f"; {detail_extra}" if detail_extra else ""), compare=cmp,
                    noise=None if self.exact else noise, noise_from=noise_from, **extra)

    def plain_run_to_run(self, plain, by) -> None:
        cmp = compare(plain["outputs"][1], plain["outputs"][0])
        status = "info" if cmp["tokens"] else "fail"
        self.record("plain_run_to_run", status, f"plain vLLM run twice on the same batch; runner {plain.get('runner')}",
                    compare=cmp, start_s=plain.get("start_s"))

    def exits_off(self, plain, off, by) -> None:
        self.judged("exits_off_eq_plain", off["outputs"][0], plain["outputs"][0], self.noise(plain), "plain run to run",
                    f"decode tokens counted {off['stats']['decode_tokens']}", stats=off["stats"])

    def _against_reference(self, name, plain, engine, rule, rows) -> None:
        """float32: the free-running reference, token for token. bf16: teacher-forced (the
        reference picks after the engine's own prefix), so one flipped near-tie counts once
        instead of changing every later token; the noise is plain vLLM against the full-depth
        reference, teacher-forced the same way."""
        c = self.case
        rows = list(rows)
        got = [engine["outputs"][0][i] for i in rows]
        baseline = None
        if self.exact:
            traces = [self.reference(rule)[i] for i in rows]
        else:
            traces = self.teacher_forced(rule, rows, got)
            plain_rows = [plain["outputs"][0][i] for i in rows]
            full = self.teacher_forced("full", rows, plain_rows)
            baseline = compare(plain_rows, [t.tokens for t in full])["share"]
        want = [t.tokens for t in traces]
        expected = exit_counts(traces, c["num_layers"])
        counts = engine["stats"]["exits_per_layer"]
        same_counts = counts == expected
        margins = [abs(v - c["rule"]["threshold"]) for t in traces for step in t.confidences for v in step.values()]
        detail = (f"exit counts {'equal' if same_counts else 'differ'}: engine {counts}, reference {expected}"
                  + (f"; min |confidence - threshold| {min(margins):.2e}" if rule == "rule" and margins else ""))
        has_exits = sum(expected) > 0 and sum(counts) > 0
        if not has_exits:
            detail += "; no exits: nothing early was compared"
        # Forced exits do not depend on numerics; threshold decisions may flip in bf16.
        counts_ok = same_counts or (rule == "rule" and not self.exact)
        noise_from = "plain vs reference at full depth" + ("" if self.exact else ", teacher-forced")
        self.judged(name, got, want, baseline, noise_from, detail,
                    ok=counts_ok and has_exits, stats=engine["stats"], reference_exits=expected)

    def forced(self, plain, forced, by) -> None:
        self._against_reference("forced_eq_reference", plain, forced, "forced", range(len(self.case["prompts"])))

    def threshold(self, plain, mixed, by) -> None:
        self._against_reference("threshold_eq_reference", plain, mixed, "rule", range(0, len(self.case["prompts"]), 2))

    def request_off(self, plain, mixed, by) -> None:
        rows = range(1, len(self.case["prompts"]), 2)
        exited = sum(mixed["stats"]["exits_per_layer"])
        self.judged("request_off_eq_plain", [mixed["outputs"][0][i] for i in rows],
                    [plain["outputs"][0][i] for i in rows], self.noise(plain), "plain run to run",
                    f"rows beside them left early {exited} times", ok=exited > 0)

    def graphed(self, compiled, graphed, by) -> None:
        """The step captured as CUDA graphs (``cuda_graphs``) decodes as the compiled step does."""
        same = graphed["stats"]["exits_per_layer"] == compiled["stats"]["exits_per_layer"]
        self.judged("graphed_eq_compiled", graphed["outputs"][0], compiled["outputs"][0], self.noise(by["plain"]),
                    "plain run to run", f"exit counts {'equal' if same else 'differ'}: graphed "
                    f"{graphed['stats']['exits_per_layer']}, compiled {compiled['stats']['exits_per_layer']}",
                    ok=same or not self.exact, stats=graphed["stats"])

    def compiled(self, mixed, compiled, by) -> None:
        noise, noise_from = None, "plain compiled vs plain eager"
        if not self.exact:
            if "plain_compiled" in by and "outputs" in by["plain_compiled"]:
                noise = compare(by["plain_compiled"]["outputs"][0], by["plain"]["outputs"][0])["share"]
            else:
                noise, noise_from = self.noise(by["plain"]), "plain run to run (plain compiled did not run yet)"
        same = compiled["stats"]["exits_per_layer"] == mixed["stats"]["exits_per_layer"]
        self.judged("compiled_eq_eager", compiled["outputs"][0], mixed["outputs"][0], noise, noise_from,
                    f"exit counts {'equal' if same else 'differ'}: compiled {compiled['stats']['exits_per_layer']}, "
                    f"eager {mixed['stats']['exits_per_layer']}; start {compiled.get('start_s', 0):.0f} s",
                    ok=same or not self.exact, stats=compiled["stats"])


def run_correctness(args, report: Report, clock: Clock, work: Path, weights_after: float) -> None:
    conftest = tests_conftest()
    try:
        groups = correctness_groups(args)
    except Exception as exc:
        report.check({"group": "setup", "check": "tiny model", "status": "error", "detail": str(exc),
                      "traceback": traceback.format_exc()[-4000:]})
        return
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if report.data["setup"]["batch_invariant"]:
        env["VLLM_BATCH_INVARIANT"] = "1"
    cases: dict[str, dict] = {}
    default_runner: dict[str, str] = {}
    for index, group in enumerate(groups):
        remaining = sum(g["weight"] for g in groups[index:]) + weights_after
        entry = {"group": group["name"], "runner_env": group["env"]}
        report.data["groups"].append(entry)
        if group["runner"] == "v1" and default_runner.get(group["model"], "V2") == "V1":
            entry.update(status="skipped", note="V2 unavailable on this platform: vLLM picked the V1 runner "
                         "for the default run already, so a V1 run would repeat it")
            report.write()
            continue
        if not Path(group["path"], "config.json").exists():
            entry.update(status="skipped", note=f"no model at {group['path']}")
            report.write()
            continue
        budget = clock.share(group["weight"], remaining)
        if budget < 20:
            entry.update(status="skipped", note=f"out of time budget ({budget:.0f} s left for it)")
            report.write()
            continue
        started = time.monotonic()
        try:
            if group["model"] not in cases:
                cases[group["model"]] = model_case(group, conftest, args)
            case = cases[group["model"]]
            checks = GroupChecks(group, case, report, args)
            spec = correctness_spec(group, case, args)
            entry.update(status="running", budget_s=round(budget))
            report.write()
            outcome = run_worker("correctness", spec, work, budget - (time.monotonic() - started),
                                 {**env, **group["env"]}, checks)
            checks.finish(outcome)
            entry.update(status=outcome, runner=checks.runner, runner_version=checks.runner_version,
                         seconds=round(time.monotonic() - started))
            if group["runner"] == "default" and checks.runner_version == "V1":
                default_runner[group["model"]] = "V1"
                entry["note"] = f"V2 unavailable on this platform: vLLM picked {checks.runner}"
        except Exception as exc:
            entry.update(status="error", note=f"{type(exc).__name__}: {exc}")
            report.check({"group": group["name"], "check": "group", "status": "error", "detail": str(exc),
                          "traceback": traceback.format_exc()[-4000:]})
        report.write()
