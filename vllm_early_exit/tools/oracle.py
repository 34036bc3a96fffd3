"""Oracle analysis: how much depth each sequence really needs (arXiv 2410.20022).

``python -m vllm_early_exit oracle --model DIR`` answers two questions on real
prompts, with greedy decoding:

1. *Per-sequence minimum depth.* For every prompt and every depth d, the real
   engine decodes with the per-request depth budget ``max_layers = d`` (every
   decode token leaves after layer d - 1, state propagation fills the rest), all
   in one batch. A sequence's oracle depth is the smallest d whose output is
   identical to full depth. The mean over prompts is the analogue of the
   paper's 23.3% figure: what an oracle that picks each sequence's depth needs.
2. *Best static skip set.* Layers are added greedily to a skip set, each time
   the layer whose skipping keeps the most decode tokens right. Scoring is
   teacher-forced on the full-depth outputs with HF transformers: every layer
   runs, and for decode positions a skipped layer's output is replaced by its
   input, which is exactly what ``skip_layers`` does (its attention still
   writes K/V from the stream passing through). A sequence is reproduced
   exactly by free-running decoding iff every teacher-forced position agrees,
   so "identical" here is exact, not an approximation.

Results go to JSON, Markdown and a PNG, written after the depth budgets and
after every skip set scored, so a stopped run keeps what it measured;
``--resume`` continues it (same model, prompts and lengths).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vllm_early_exit.tools.engines import build_engine, shutdown_engine
from vllm_early_exit.tools.resume import saved_results, write_json

DEFAULT_OUT = Path("benchmarks/results")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF LLaMA or Qwen2 checkpoint folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--prompts", type=int, default=32, help="evaluation-split ShareGPT prompts (default 32)")
    parser.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    parser.add_argument("--max-skip", type=int, default=4, help="largest skip set the greedy search builds (default 4)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for oracle.{json,md,png}")
    parser.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out/oracle.json (same model, prompts and --max-tokens): "
        "its depth budgets and the skip sets already scored are kept",
    )


@dataclass
class SkipStep:
    skip_layers: list[int]
    token_agreement: float
    """Share of decode tokens (teacher-forced) the skip set keeps right."""
    identical: float
    """Share of sequences whose output the skip set reproduces exactly."""


# --- 1. per-sequence minimum depth, through the real engine ------------------------


def budget_outputs(llm, prompts: list[list[int]], max_tokens: int, num_layers: int) -> list[list[list[int]]]:
    """outputs[p][d - 1]: prompt p decoded with the depth budget ``max_layers = d``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    requests, params = [], []
    for prompt in prompts:
        for depth in range(1, num_layers + 1):
            requests.append(TokensPrompt(prompt_token_ids=prompt))
            params.append(SamplingParams(
                max_tokens=max_tokens, temperature=0.0, detokenize=False,
                extra_args={"early_exit": {"max_layers": depth}},
            ))
    # Prompt pass once per prompt first, so the budget runs read the prompt's K/V from
    # vLLM's prefix cache instead of computing it once per depth.
    llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts],
        SamplingParams(max_tokens=1, detokenize=False),
        use_tqdm=False,
    )
    results = llm.generate(requests, params, use_tqdm=True)
    tokens = [list(r.outputs[0].token_ids) for r in results]
    return [tokens[i * num_layers : (i + 1) * num_layers] for i in range(len(prompts))]


def min_depths(outputs: list[list[list[int]]]) -> list[int]:
    """Per prompt, the smallest depth whose output equals the full-depth output (the last)."""
    return [next(d + 1 for d, out in enumerate(per_depth) if out == per_depth[-1]) for per_depth in outputs]


# --- 2. best static skip set, teacher-forced --------------------------------------


class SkipScorer:
    """Teacher-forced decode-token agreement of a skip set on (prompt, full output) pairs."""

    def __init__(self, model, prompts: list[list[int]], outputs: list[list[int]]) -> None:
        self.model = model
        self.sequences = [torch.tensor(p + o[:-1]) for p, o in zip(prompts, outputs)]
        self.decode_from = [len(p) for p in prompts]
        self.targets = [torch.tensor(o) for o in outputs]
        self._skip: set[int] = set()
        self._decode_mask = None
        for index, layer in enumerate(model.model.layers):
            layer.register_forward_hook(self._hook(index), with_kwargs=True)

    def _hook(self, index: int):
        def skip_decode_positions(module, args, kwargs, output):
            if index not in self._skip:
                return None
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            kept = torch.where(self._decode_mask, before, after)
            return (kept, *output[1:]) if isinstance(output, tuple) else kept

        return skip_decode_positions

    def score(self, skip: set[int]) -> tuple[float, float, list[bool]]:
        """(token agreement, identical share, identical per sequence) with ``skip`` skipped.

        Position ``len(prompt) + k`` holds output token k, the input of decode step
        k + 1; its logits predict output token k + 1. The first output token comes
        from the prompt pass, which runs every layer, so it is not scored.
        """
        self._skip = set(skip)
        agree = total = 0
        identical = []
        with torch.no_grad():
            for ids, start, target in zip(self.sequences, self.decode_from, self.targets):
                mask = torch.zeros(1, ids.shape[0], 1, dtype=torch.bool)
                mask[:, start:] = True  # positions whose token is a decode token
                self._decode_mask = mask
                logits = self.model(ids[None]).logits[0, start:]
                right = logits.argmax(-1) == target[1:]
                agree += int(right.sum())
                total += right.numel()
                identical.append(bool(right.all()))
        return agree / total, sum(identical) / len(identical), identical


def skip_key(skip: set[int]) -> str:
    """The key of a skip set in the report's ``scores`` (its layers, sorted, comma-separated)."""
    return ",".join(str(layer) for layer in sorted(skip))


def greedy_skip_sets(
    scorer: SkipScorer, num_layers: int, max_skip: int, scores: dict[str, list[float]], scored=None
) -> Iterator[SkipStep]:
    """Grows a skip set one layer at a time, keeping the layer that hurts least; yields each.

    ``scores``: skip set key -> (token agreement, identical share), filled as sets
    are scored; sets already in it (a resumed run) are not scored again.
    ``scored()`` is called after each new score. The last layer is never a
    candidate: skipping it cannot be told apart from an exit.
    """

    def score(skip: set[int]) -> tuple[float, float]:
        key = skip_key(skip)
        if key not in scores:
            scores[key] = list(scorer.score(skip)[:2])
            if scored is not None:
                scored()
        return tuple(scores[key])

    yield SkipStep([], *score(set()))
    chosen: set[int] = set()
    for _ in range(max_skip):
        best = None
        for layer in range(num_layers - 1):
            if layer in chosen:
                continue
            agreement, identical = score(chosen | {layer})
            if best is None or (agreement, identical) > best[1:]:
                best = (layer, agreement, identical)
        chosen.add(best[0])
        yield SkipStep(sorted(chosen), best[1], best[2])


# --- the command ---------------------------------------------------------------


RESUME_KEYS = ("model", "num_layers", "max_tokens", "prompt_token_ids")
"""What a resumed run must share with the report it continues."""


def analyse(
    model_dir: str, prompts: list[list[int]], max_tokens: int, max_skip: int,
    save=lambda report: None, previous: dict | None = None,
) -> dict:
    """Both analyses on token prompts; returns the report dict.

    ``save(report)`` is called with the report so far after the depth budgets and
    after every skip set scored; ``previous``: a report of the same run to continue.
    """
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    num_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    report = {"model": model_dir, "num_layers": num_layers, "prompts": len(prompts), "max_tokens": max_tokens,
              "prompt_token_ids": prompts, "complete": False}
    if previous is not None:
        outputs = previous["outputs_per_depth"]
        scores = dict(previous.get("scores", {}))
    else:
        outputs = _budget_runs(model_dir, prompts, max_tokens, num_layers)
        scores = {}
    depths = min_depths(outputs)
    full = [per_depth[-1] for per_depth in outputs]
    report.update({
        "min_depths": depths,
        "mean_min_depth": sum(depths) / len(depths),
        "mean_min_depth_fraction": sum(depths) / len(depths) / num_layers,
        "outputs_full_depth": full,
        "outputs_per_depth": outputs,
        "skip_path": [],
        "largest_identical_skip_set": [],
        "scores": scores,
    })
    save(report)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # LLaMA or Qwen2
    scorer = SkipScorer(model, prompts, full)
    candidates = 1 + sum(num_layers - 1 - k for k in range(max_skip))
    with tqdm(total=candidates, initial=min(len(scores), candidates), desc="skip sets") as progress:

        def scored():
            progress.update(1)
            save(report)

        for step in greedy_skip_sets(scorer, num_layers, max_skip, scores, scored):
            report["skip_path"].append(asdict(step))
            if step.identical == 1.0:
                report["largest_identical_skip_set"] = step.skip_layers
            save(report)
    report["complete"] = True
    save(report)
    return report


def _budget_runs(model_dir: str, prompts: list[list[int]], max_tokens: int, num_layers: int):
    """Every prompt decoded at every depth budget by the real engine (``budget_outputs``)."""
    import gc

    # Budgets hold under per_token also for decode rows of steps that prefill other
    # requests, so the requests may reach the engine in any order and mix (no
    # ``generate_together`` needed).
    longest = max(len(p) for p in prompts) + max_tokens
    llm = build_engine(
        model_dir, max_model_len=longest + 8, skip_tokenizer_init=True, enable_prefix_caching=True,
        early_exit={"exit_layers": [], "policy": "per_token", "log_interval_s": 0, "compile": False},
    )
    outputs = budget_outputs(llm, prompts, max_tokens, num_layers)
    shutdown_engine(llm)
    del llm
    gc.collect()
    return outputs


def resumed_report(out_dir: Path, expected: dict) -> dict | None:
    """The report in ``out_dir`` to continue, or None when there is none; refuses another run's."""
    path = out_dir / "oracle.json"
    previous = saved_results(path, {key: expected[key] for key in RESUME_KEYS}, command="oracle")
    if previous is not None and "outputs_per_depth" not in previous:
        raise SystemExit(f"oracle --resume: {path} was written by an older version (no outputs_per_depth); run without --resume.")
    return previous


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "oracle.json", report)
    layers = report["num_layers"]
    lines = [
        "# Oracle depth",
        "",
        f"{report['prompts']} held-out ShareGPT prompts, {report['max_tokens']} greedy tokens, "
        f"{layers}-layer model ({report.get('model', '')}).",
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
    (out_dir / "oracle.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.hist(report["min_depths"], bins=range(1, layers + 2), align="left", color="tab:blue")
    left.axvline(report["mean_min_depth"], color="k", linestyle="--", label="mean")
    left.set(xlabel="oracle depth (layers)", ylabel="sequences", title="Per-sequence minimum depth")
    left.legend()
    sizes = [len(s["skip_layers"]) for s in report["skip_path"]]
    right.plot(sizes, [s["token_agreement"] for s in report["skip_path"]], "o-", label="decode tokens right")
    right.plot(sizes, [s["identical"] for s in report["skip_path"]], "s-", label="outputs identical")
    right.set(xlabel="layers skipped (greedy)", ylabel="share", ylim=(0, 1.02), title="Static skip sets")
    right.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "oracle.png", dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from vllm_early_exit.tools.assets import chat_prompt, sharegpt_split, smollm2_checkpoint

    if args.prompts < 1 or args.max_tokens < 2 or args.max_skip < 0:
        raise SystemExit("oracle: --prompts must be >= 1, --max-tokens >= 2 and --max-skip >= 0.")
    model = args.model or str(smollm2_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [
        tokenizer.encode(chat_prompt(tokenizer, text), add_special_tokens=False)
        for text in sharegpt_split("evaluation", args.prompts)
    ]
    num_layers = AutoConfig.from_pretrained(model).num_hidden_layers
    expected = {"model": model, "num_layers": num_layers, "max_tokens": args.max_tokens, "prompt_token_ids": prompts}
    previous = resumed_report(args.out, expected) if args.resume else None
    report = analyse(model, prompts, args.max_tokens, args.max_skip, lambda r: write_report(r, args.out), previous)
    print((args.out / "oracle.md").read_text())
    return report
