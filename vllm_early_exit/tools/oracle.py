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
3. *Per-token oracle.* Teacher-forced on the same outputs, every layer's plain
   readout at every decode position: an oracle that leaves each token at its
   first right layer needs the depth reported, and the max-prob rule is scored
   on the same positions beside it. The gap between the two is what a better
   exit signal could win; the oracle itself is what these readouts allow.

Results go to JSON and Markdown (``oracle_report.py``), written after the depth budgets
and after every skip set scored, so a stopped run keeps what it measured; ``--resume``
continues it (same model, prompts and lengths). The PNG is drawn last, once the results
are written and printed (without matplotlib it is skipped with the command that installs it).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vllm_early_exit.tools.oracle_depths import (  # noqa: F401 (the per-sequence part's names, re-exported)
    budget_outputs, min_depths, reference_outputs, run_budgets,
)
from vllm_early_exit.tools.optional import draw
from vllm_early_exit.tools.oracle_report import plot, token_oracle_lines, write_report  # noqa: F401 (importable here too)
from vllm_early_exit.tools.resume import saved_results, with_reference

DEFAULT_OUT = Path("benchmarks/results")
ORACLE_AGREEMENTS = (0.99, 0.95, 0.9)
"""Token agreements at which the per-token oracle's depth is reported."""
DEFAULT_THRESHOLDS = (0.9, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999)
"""max_prob thresholds scored on the same positions as the oracle."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF LLaMA or Qwen2 checkpoint folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--prompts", type=int, default=32, help="evaluation-split ShareGPT prompts (default 32)")
    parser.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    parser.add_argument("--max-skip", type=int, default=4, help="largest skip set the greedy search builds (default 4)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for oracle.{json,md,png}")
    parser.add_argument(
        "--check-layers", help="check layers of the max-prob rule beside the per-token oracle, e.g. 20,22,24 "
        "(default: every second layer from a third of the stack to the second-to-last)",
    )
    parser.add_argument(
        "--thresholds", default=",".join(str(t) for t in DEFAULT_THRESHOLDS),
        help="max-prob thresholds scored beside the per-token oracle (default %(default)s)",
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out/oracle.json (same model, prompts and --max-tokens): "
        "its depth budgets and the skip sets already scored are kept",
    )
    parser.add_argument(
        "--reference", help="HF checkpoint whose greedy outputs every figure is measured against (default: "
        "--model itself); for an exit-ready model from `finetune`, the original it was tuned from",
    )


@dataclass
class SkipStep:
    skip_layers: list[int]
    token_agreement: float
    """Share of decode tokens (teacher-forced) the skip set keeps right."""
    identical: float
    """Share of sequences whose output the skip set reproduces exactly."""


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


# --- 3. per-token oracle, teacher-forced -------------------------------------------


@dataclass
class TokenReadouts:
    """Each layer's plain readout (final norm and LM head) at every scored decode position,
    teacher-forced on the full-depth outputs, with every layer run."""

    top: torch.Tensor
    """``[positions, layers]``: the readout's top token."""
    max_prob: torch.Tensor
    """``[positions, layers]``: its softmax probability."""
    target: torch.Tensor
    """``[positions]``: the full-depth output's token."""

    @property
    def right(self) -> torch.Tensor:
        return self.top == self.target[:, None]

    def earliest_right(self) -> torch.Tensor:
        """Per position, the layers run up to the first whose readout is the full-depth token
        (all of them when none is: numerics can flip a near tie of the last layer)."""
        right = self.right
        layers = right.shape[1]
        return torch.where(right.any(1), right.int().argmax(1) + 1, layers)


def token_readouts(model, prompts: list[list[int]], outputs: list[list[int]]) -> TokenReadouts:
    """Scored positions as in :meth:`SkipScorer.score`: output token k + 1 is read at the
    position holding output token k (the first output token comes from the prompt pass)."""
    norm, head = model.model.norm, model.lm_head
    tops, probs, targets = [], [], []
    with torch.no_grad():
        for prompt, output in zip(prompts, outputs):
            start = len(prompt)
            result = model(torch.tensor(prompt + output[:-1])[None], output_hidden_states=True)
            # hidden_states: the embeddings, then each layer's output; the last layer is read
            # through the model's own logits.
            # One layer's logits at a time: all of them at once would not fit for a large vocabulary.
            readouts = (head(norm(h[0, start:])) for h in result.hidden_states[1:-1])
            maxima = [
                torch.softmax(logits.float(), -1).max(-1) for logits in (*readouts, result.logits[0, start:])
            ]
            tops.append(torch.stack([m.indices for m in maxima], 1))
            probs.append(torch.stack([m.values for m in maxima], 1))
            targets.append(torch.tensor(output[1:]))
    return TokenReadouts(torch.cat(tops), torch.cat(probs), torch.cat(targets))


def oracle_depth(earliest: torch.Tensor, right_somewhere: torch.Tensor, layers: int, agreement: float) -> float | None:
    """Share of the layers an oracle that knows each token's earliest right layer needs for
    ``agreement``: it lets the positions whose earliest right layer is deepest leave after
    the first layer with a wrong token, as many as the agreement allows (positions that no
    layer reads right are wrong in any case and leave there too). None: not reachable."""
    positions = earliest.numel()
    allowed_wrong = positions - math.ceil(agreement * positions - 1e-9)
    spare = allowed_wrong - int((~right_somewhere).sum())
    if spare < 0:
        return None
    kept = earliest[right_somewhere].sort(descending=True).values
    layers_run = kept[spare:].sum() + (positions - kept[spare:].numel())
    return float(layers_run) / positions / layers


def max_prob_exits(readouts: TokenReadouts, check_layers: list[int], threshold: float) -> tuple[torch.Tensor, float]:
    """(right per position, depth) of the per-token max-prob rule on the teacher-forced readouts:
    a position leaves at the first check layer whose readout reaches ``threshold``, else at the last."""
    positions, layers = readouts.top.shape
    checks = torch.tensor(check_layers, dtype=torch.long)
    confident = readouts.max_prob[:, checks] >= threshold
    exit_layer = torch.where(confident.any(1), checks[confident.int().argmax(1)], layers - 1)
    token = readouts.top[torch.arange(positions), exit_layer]
    return token == readouts.target, int((exit_layer + 1).sum()) / positions / layers


def token_oracle(
    readouts: TokenReadouts, check_layers: list[int], thresholds, agreements=ORACLE_AGREEMENTS
) -> dict:
    """The per-token oracle's depth and max-prob's frontier on the same positions, at ``agreements``."""
    positions, layers = readouts.top.shape
    earliest = readouts.earliest_right()
    right_somewhere = readouts.right.any(1)
    rule = []
    for threshold in thresholds:
        right, depth = max_prob_exits(readouts, check_layers, threshold)
        rule.append({"threshold": threshold, "token_agreement": float(right.float().mean()), "depth": depth})

    def lowest(agreement: float) -> float | None:
        reached = [r["depth"] for r in rule if r["token_agreement"] >= agreement]
        return min(reached) if reached else None

    return {
        "positions": positions,
        "check_layers": list(check_layers),
        "readout_agreement_per_layer": readouts.right.float().mean(0).tolist(),
        "earliest_right": earliest.tolist(),
        "depth_every_token_right": int(earliest.sum()) / positions / layers,
        "oracle_depth": {str(a): oracle_depth(earliest, right_somewhere, layers, a) for a in agreements},
        "oracle_curve": [
            [a, oracle_depth(earliest, right_somewhere, layers, a)] for a in (0.8 + 0.01 * k for k in range(21))
        ],
        "max_prob": rule,
        "max_prob_depth": {str(a): lowest(a) for a in agreements},
        "max_probs_at_checks": readouts.max_prob[:, check_layers].tolist(),
    }


# --- the command ---------------------------------------------------------------


RESUME_KEYS = ("model", "reference", "num_layers", "max_tokens", "prompt_token_ids")
"""What a resumed run must share with the report it continues."""


def analyse(
    model_dir: str, prompts: list[list[int]], max_tokens: int, max_skip: int,
    save=lambda report: None, previous: dict | None = None,
    check_layers: list[int] | None = None, thresholds=DEFAULT_THRESHOLDS, reference: str | None = None,
) -> dict:
    """The three analyses on token prompts; returns the report dict.

    ``save(report)`` is called with the report so far after the depth budgets, after
    the per-token oracle and after every skip set scored; ``previous``: a report of the
    same run to continue (the per-token oracle, quick, is always computed again).
    ``check_layers`` / ``thresholds``: where and how the max-prob rule beside the per-token
    oracle checks (default: the heads' default layers, ``DEFAULT_THRESHOLDS``).
    ``reference``: the checkpoint whose greedy outputs are the targets (default ``model_dir``):
    depths, readouts and skip sets of ``model_dir`` are all scored against its tokens.
    """
    from vllm_early_exit.model_executor.early_exit.heads import default_layers

    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    num_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    report = {"model": model_dir, "reference": reference or model_dir, "num_layers": num_layers,
              "prompts": len(prompts), "max_tokens": max_tokens, "prompt_token_ids": prompts, "complete": False}
    if previous is not None:
        outputs = previous["outputs_per_depth"]
        scores = dict(previous.get("scores", {}))
        full = previous["outputs_full_depth"]
    else:
        outputs = run_budgets(model_dir, prompts, max_tokens, num_layers)
        scores = {}
        full = ([per_depth[-1] for per_depth in outputs] if reference is None
                else reference_outputs(reference, prompts, max_tokens))
    depths = min_depths(outputs, full)
    report.update({
        "full_depth_identical": sum(per_depth[-1] == t for per_depth, t in zip(outputs, full)) / len(full),
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
    report["token_oracle"] = token_oracle(
        token_readouts(model, prompts, full), check_layers or default_layers(num_layers), thresholds
    )
    save(report)
    scorer = SkipScorer(model, prompts, full)
    candidates = 1 + sum(num_layers - 1 - k for k in range(max_skip))
    with tqdm(total=candidates, initial=min(len(scores), candidates), desc="skip sets", file=sys.stdout) as progress:

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


def resumed_report(out_dir: Path, expected: dict) -> dict | None:
    """The report in ``out_dir`` to continue, or None when there is none; refuses another run's."""
    path = out_dir / "oracle.json"
    expected = with_reference(expected)
    previous = saved_results(path, {key: expected[key] for key in RESUME_KEYS}, command="oracle",
                             settings_of=with_reference)
    if previous is not None and "outputs_per_depth" not in previous:
        raise SystemExit(f"oracle --resume: {path} was written by an older version (no outputs_per_depth); run without --resume.")
    return previous


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
    expected = {"model": model, "reference": args.reference or model, "num_layers": num_layers,
                "max_tokens": args.max_tokens, "prompt_token_ids": prompts}
    previous = resumed_report(args.out, expected) if args.resume else None
    try:
        check_layers = [int(x) for x in args.check_layers.split(",")] if args.check_layers else None
        thresholds = [float(x) for x in args.thresholds.split(",")]
    except ValueError:
        raise SystemExit("oracle: --check-layers takes comma-separated integers, --thresholds numbers") from None
    if check_layers is not None and not all(0 <= layer < num_layers for layer in check_layers):
        raise SystemExit(f"oracle: --check-layers must lie in 0..{num_layers - 1} (the model has {num_layers} layers)")
    report = analyse(
        model, prompts, args.max_tokens, args.max_skip, lambda r: write_report(r, args.out), previous,
        check_layers=check_layers, thresholds=thresholds, reference=args.reference,
    )
    print((args.out / "oracle.md").read_text())
    draw(plot, report, args.out / "oracle.png")
    return report
