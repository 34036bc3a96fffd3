"""Running the quality benchmark: its engines, generating and scoring, and the sweeps per method.

One plain engine (references, scoring, HumanEval at full depth) stays up for the whole
run; one early-exit engine runs beside it at a time. Every ``generate`` prefills all its
prompts in one step (``engines.generate_together``), so every later step is pure decode.
"""

from __future__ import annotations

import gc
import json
import sys
import time

from vllm_early_exit.tools.engines import build_engine, generate_together, machine_info, shutdown_engine
from vllm_early_exit.tools.quality.humaneval import HUMANEVAL_INSTRUCTION, HumanEval
from vllm_early_exit.tools.quality.methods import (
    HEAD_METHODS,
    THRESHOLD_SIGNALS,
    Options,
    block_influence,
    method_settings,
    skip_order,
    skip_sets_from_influence,
    skip_settings,
)
from vllm_early_exit.tools.quality.report import write_report
from vllm_early_exit.tools.quality.results import Results, merge_previous
from vllm_early_exit.tools.quality.scores import Point, mean, rouge_l


class Bench:
    """The engines, prompts and references of one benchmark run."""

    def __init__(self, opts: Options) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from vllm_early_exit.tools.assets import chat_prompt, sharegpt_split

        self.opts = opts
        self.num_layers = AutoConfig.from_pretrained(opts.model).num_hidden_layers
        self.tokenizer = AutoTokenizer.from_pretrained(opts.model)
        texts = sharegpt_split("evaluation", opts.prompts)
        self.prompts = [
            self.tokenizer.encode(chat_prompt(self.tokenizer, t), add_special_tokens=False) for t in texts
        ]
        self.humaneval = HumanEval(opts.humaneval, opts.humaneval_tokens, opts.humaneval_timeout_s, self.tokenizer)
        humaneval_lengths = self.humaneval.prompt_lengths
        lengths = [len(p) for p in self.prompts] + humaneval_lengths
        self.max_model_len = max(lengths) + max(opts.max_tokens, opts.humaneval_tokens) + 16
        # A token budget that prefills every prompt of one generate call in one step.
        self.prefill_budget = max(sum(len(p) for p in self.prompts), sum(humaneval_lengths)) + 64
        self.common = {"dtype": opts.dtype, "max_model_len": self.max_model_len, "enforce_eager": True}
        self.plain = None
        self.references: list[list[int]] = []
        self._choices: dict[tuple[int, tuple[int, ...]], list[bool]] = {}

    # engines

    def start_plain(self) -> None:
        self.plain = build_engine(self.opts.reference or self.opts.model, **self.common, max_num_batched_tokens=max(2048, self.max_model_len))

    def early_exit_engine(self, settings: dict):
        """An early-exit engine whose token budget prefills all prompts of a generate call in
        one step (see ``engines.generate_together``)."""
        return build_engine(
            self.opts.model, **self.common, max_num_batched_tokens=max(self.max_model_len, self.prefill_budget),
            max_num_seqs=max(256, len(self.prompts), len(self.humaneval.problems)), early_exit=settings,
        )

    # generation and scoring

    def generate(self, llm, extra_args: dict | None = None) -> list[list[int]]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=self.opts.max_tokens, temperature=0.0, extra_args=extra_args, detokenize=False)
        results = generate_together(llm, self.prompts, params)
        return [list(r.outputs[0].token_ids) for r in results]

    def full_model_choices(self, outputs: list[list[int]]) -> list[list[bool]]:
        """``agreement.full_model_choices`` on the plain engine, each distinct output scored once
        (strict settings reproduce many full-depth outputs exactly)."""
        from vllm_early_exit.tools.agreement import full_model_choices

        missing = sorted({i for i, o in enumerate(outputs) if (i, tuple(o)) not in self._choices})
        if missing:
            fresh = full_model_choices(self.plain, [self.prompts[i] for i in missing], [outputs[i] for i in missing])
            for i, c in zip(missing, fresh):
                self._choices[(i, tuple(outputs[i]))] = c
        return [self._choices[(i, tuple(o))] for i, o in enumerate(outputs)]

    def score(self, signal: str, setting, outputs: list[list[int]], stats=None, exit_layers=None) -> Point:
        """A point from its outputs and the engine's counters over them (None: full depth)."""
        from vllm_early_exit.tools.agreement import Agreement, token_agreement

        agreement = Agreement.of(outputs, self.references)
        choices = self.full_model_choices(outputs)
        decode_tokens = sum(max(len(o) - 1, 0) for o in outputs)  # the first token comes from the prefill
        if stats is None:
            exits, full, counted, computed = [0] * self.num_layers, decode_tokens, 0, decode_tokens * self.num_layers
        else:
            exits, counted, computed = list(stats.exits_per_layer), stats.decode_tokens, stats.layers_computed
            unseen = max(decode_tokens - counted, 0)
            full = stats.full_depth_tokens + unseen
            computed += unseen * self.num_layers
        return Point(
            signal=signal, setting=setting, num_layers=self.num_layers,
            mean_layers=computed / decode_tokens if decode_tokens else float(self.num_layers),
            identical=agreement.identical, prefix=agreement.prefix, token_agreement=token_agreement(choices),
            rouge_l=mean([rouge_l(o, r) for o, r in zip(outputs, self.references)]),
            exits_per_layer=exits, full_depth_tokens=full, decode_tokens=decode_tokens,
            counted_decode_tokens=counted, output_tokens=sum(len(o) for o in outputs), exit_layers=exit_layers,
        )

    def measure(self, llm, signal: str, setting, extra_args: dict | None, exit_layers) -> Point:
        from vllm_early_exit import get_exit_stats, reset_exit_stats

        reset_exit_stats(llm)
        outputs = self.generate(llm, extra_args)
        return self.score(signal, setting, outputs, get_exit_stats(llm), exit_layers)


def free(llm) -> None:
    """Stops an engine before the next one starts (one early-exit engine beside the plain one at a time)."""
    shutdown_engine(llm)
    gc.collect()


def _setup(opts: Options, bench: Bench, threshold_methods: list[str]) -> dict:
    return {
        "model": opts.model, "reference": opts.reference or opts.model, "num_layers": bench.num_layers,
        "prompts": opts.prompts, "prompt_split": "evaluation",
        "max_tokens": opts.max_tokens, "dtype": opts.dtype, "greedy": True, "methods": opts.methods,
        "thresholds": {m: opts.thresholds[m] for m in threshold_methods}, "heads": opts.heads,
        "humaneval": {"problems": len(bench.humaneval.problems), "max_tokens": opts.humaneval_tokens,
                      "timeout_s": opts.humaneval_timeout_s, "instruction": HUMANEVAL_INSTRUCTION},
        "smoke": opts.smoke, **machine_info(),
    }


def sweep_threshold_signal(bench: Bench, results: Results, signal: str) -> None:
    """One early-exit engine for ``signal``: a point per threshold, then HumanEval at the operating point.

    Head methods without a usable heads folder are recorded as skipped instead.
    """
    from tqdm import tqdm

    from vllm_early_exit.config import EarlyExitConfigError

    try:
        settings = method_settings(signal, bench.opts, bench.num_layers)
    except (EarlyExitConfigError, FileNotFoundError) as exc:
        if signal not in HEAD_METHODS:
            raise
        results.skipped[signal] = f"skipped: {exc}"
        print(f"quality: {signal}: {results.skipped[signal]}", flush=True)
        return
    results.engine_settings[signal] = settings
    llm = bench.early_exit_engine(settings)
    try:
        for threshold in tqdm(bench.opts.thresholds[signal], desc=signal, leave=False, file=sys.stdout):
            request = {"early_exit": {"threshold": threshold}}
            results.points.append(bench.measure(llm, signal, threshold, request, settings["exit_layers"]))
        point = results.choose_operating_point(signal)
        if point is not None and bench.humaneval.problems:
            request = {"early_exit": {"threshold": point.setting}}
            results.humaneval[signal] = bench.humaneval.evaluate(llm, request) | {"setting": point.setting}
    finally:
        free(llm)


def sweep_skip_sets(bench: Bench, results: Results) -> None:
    """An engine per skip set; HumanEval on a fresh engine for the operating point's set."""
    from tqdm import tqdm

    from vllm_early_exit.tools.assets import sharegpt_split

    sets = bench.opts.skip_sets
    if sets is None:
        influence = block_influence(bench.opts.model, sharegpt_split("calibration", bench.opts.calibration_prompts))
        sets = skip_sets_from_influence(influence, bench.opts.skip_sizes)
        results.skip = {"block_influence": influence, "order": skip_order(influence)}
    results.skip["sets"] = sets
    results.engine_settings["skip"] = skip_settings([]) | {"skip_layers": "one engine per set (above)"}
    for layers in tqdm(sets, desc="skip sets", leave=False, file=sys.stdout):
        llm = bench.early_exit_engine(skip_settings(layers))
        try:
            results.points.append(bench.measure(llm, "skip", layers, None, []))
        finally:
            free(llm)
    point = results.choose_operating_point("skip")
    if point is not None and bench.humaneval.problems:
        llm = bench.early_exit_engine(skip_settings(point.setting))
        try:
            results.humaneval["skip"] = bench.humaneval.evaluate(llm) | {"setting": point.setting}
        finally:
            free(llm)


def run_benchmark(opts: Options) -> dict:
    """The whole benchmark; the report is rewritten after every method, so a long run that
    stops keeps what it measured."""
    from tqdm import tqdm

    started = time.monotonic()
    bench = Bench(opts)
    threshold_methods = [m for m in opts.methods if m in THRESHOLD_SIGNALS]
    results = Results(_setup(opts, bench, threshold_methods))
    if opts.merge:
        path = opts.out / "quality.json"
        if not path.is_file():
            raise SystemExit(f"--merge: there is no earlier report {path}")
        merge_previous(results, json.loads(path.read_text()), opts.methods)
    bench.start_plain()
    try:
        bench.references = bench.generate(bench.plain)
        results.points.append(bench.score("full", None, bench.references))
        if bench.humaneval.problems:
            results.humaneval["full"] = bench.humaneval.evaluate(bench.plain)
        for method in tqdm(threshold_methods + (["skip"] if "skip" in opts.methods else []), desc="methods", file=sys.stdout):
            if method == "skip":
                sweep_skip_sets(bench, results)
            else:
                sweep_threshold_signal(bench, results, method)
            write_report(results.report(), opts.out)
    finally:
        free(bench.plain)
    results.setup["seconds"] = round(time.monotonic() - started)
    report = results.report()
    write_report(report, opts.out)
    return report
