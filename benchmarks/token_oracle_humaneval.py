"""Per-token oracle on HumanEval replies: how deep must each token go to keep the reply?

    .venv/bin/python benchmarks/token_oracle_humaneval.py            # Qwen2.5-Coder-1.5B, 40 problems

Teacher-forced with HF transformers on the full-depth run's replies (``humaneval.jsonl``
of ``benchmarks/humaneval_full_depth.py``, re-tokenized): at every reply position, every
layer's plain readout (final norm and LM head) is compared with the model's own pick after
the same prefix (the last layer's). The per-token oracle and the max-prob rule are the
``oracle`` command's (``tools/oracle.py``); beside token agreement this also counts the
problems whose every reply token stays right, the share a HumanEval-keeping setting must
reach. Writes ``token_oracle.json`` and ``token_oracle.md`` to ``--out`` (a run of 40
problems takes a few minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vllm_early_exit.model_executor.early_exit.heads import default_layers
from vllm_early_exit.tools.assets import qwen_coder_path
from vllm_early_exit.tools.oracle import (
    DEFAULT_THRESHOLDS, TokenReadouts, max_prob_exits, token_oracle, token_readouts,
)
from vllm_early_exit.tools.quality.humaneval import humaneval_problems, humaneval_prompt
from vllm_early_exit.tools.resume import write_json

RESULTS = Path("benchmarks/results/qwen2.5-coder-1.5b")
AGREEMENTS = (1.0, 0.999, 0.99, 0.95)


def kept_problems(readouts: TokenReadouts, lengths: list[int], check_layers: list[int], threshold: float) -> int:
    """Problems whose every reply position the max-prob rule reads right at ``threshold``."""
    right, _ = max_prob_exits(readouts, check_layers, threshold)
    return sum(bool(part.all()) for part in torch.split(right, lengths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the fetched Qwen2.5-Coder-1.5B-Instruct)")
    parser.add_argument("--replies", type=Path, default=RESULTS / "humaneval.jsonl", help="full-depth replies (JSONL)")
    parser.add_argument("--problems", type=int, default=40, help="first N problems by index (default 40)")
    parser.add_argument("--out", type=Path, default=RESULTS / "token_oracle")
    args = parser.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = args.model or qwen_coder_path()
    if model_dir is None:
        raise SystemExit("no model: run `python -m vllm_early_exit fetch-model qwen2.5-coder-1.5b` or pass --model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    replies = {json.loads(line)["index"]: json.loads(line) for line in args.replies.read_text().splitlines() if line}
    problems = [p for p in humaneval_problems(164) if int(p["task_id"].split("/")[1]) in replies][: args.problems]
    prompts = [humaneval_prompt(tokenizer, p) for p in problems]
    outputs = [tokenizer.encode(replies[int(p["task_id"].split("/")[1])]["reply"], add_special_tokens=False) for p in problems]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    from tqdm import tqdm

    parts = [token_readouts(model, [prompt], [output]) for prompt, output in tqdm(list(zip(prompts, outputs)), desc="problems")]
    top, max_prob = torch.cat([r.top for r in parts]), torch.cat([r.max_prob for r in parts])
    # The target is the model's own pick after the same prefix (its last layer), not the
    # re-tokenized reply: token agreement as the quality benchmark counts it.
    readouts = TokenReadouts(top, max_prob, top[:, -1].clone())
    lengths = [r.top.shape[0] for r in parts]
    checks = default_layers(layers)
    report = token_oracle(readouts, checks, DEFAULT_THRESHOLDS, AGREEMENTS)
    for row in report["max_prob"]:
        row["problems_all_right"] = kept_problems(readouts, lengths, checks, row["threshold"])
    report.update({
        "model": str(model_dir), "problems": len(problems), "num_layers": layers,
        "reply_tokens": sum(lengths), "replies": str(args.replies),
        "reply_matches_own_pick": float((torch.cat([torch.tensor(o[1:]) for o in outputs]) == readouts.target).float().mean()),
    })
    report.pop("max_probs_at_checks")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "token_oracle.json", report)
    share = lambda v: "-" if v is None else f"{v:.3f} ({v * layers:.2f} layers)"  # noqa: E731
    lines = [
        f"# Per-token oracle on HumanEval replies ({Path(model_dir).name})",
        "",
        f"First {len(problems)} HumanEval problems, the full-depth replies ({sum(lengths)} reply positions), "
        f"teacher-forced, every layer's plain readout against the model's own pick. max_prob checks at "
        f"{checks}. A problem stays only if every reply token stays right.",
        "",
        "| token agreement | oracle depth | max_prob depth |",
        "|---|---|---|",
    ]
    lines += [f"| >= {a} | {share(d)} | {share(report['max_prob_depth'][a])} |" for a, d in report["oracle_depth"].items()]
    lines += ["", "| max_prob threshold | token agreement | depth | problems with every token right |", "|---|---|---|---|"]
    lines += [
        f"| {r['threshold']} | {r['token_agreement']:.4f} | {r['depth']:.3f} | {r['problems_all_right']} of {len(problems)} |"
        for r in report["max_prob"]
    ]
    (args.out / "token_oracle.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
