"""Runs one vLLM engine in a fresh process for a test and writes what it produced.

Usage: python engine_runner.py SPEC.json RESULT.json

SPEC: {"model": dir, "engine": {LLM kwargs},
       "requests": [[prompt_token_ids, max_tokens, extra_args or null], ...],
       "batched": false, "stats": true}
Requests run one at a time unless "batched" is true, so each is decoded alone
and its schedule is deterministic. RESULT: {"outputs": [[token ids]], "stats": [per rank]}.
"""

import json
import sys


def main(spec_path: str, result_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    from vllm import LLM, SamplingParams

    llm = LLM(spec["model"], **spec["engine"])
    requests = spec["requests"]

    def params(request):
        _, max_tokens, extra_args = request
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra_args)

    prompts = [{"prompt_token_ids": r[0]} for r in requests]
    if spec.get("batched"):
        outs = llm.generate(prompts, [params(r) for r in requests], use_tqdm=False)
    else:
        outs = [llm.generate([p], params(r), use_tqdm=False)[0] for p, r in zip(prompts, requests)]
    result = {"outputs": [list(o.outputs[0].token_ids) for o in outs]}
    if spec.get("stats"):
        from vllm_early_exit import get_exit_stats

        result["stats"] = [s.to_dict() for s in get_exit_stats(llm, all_ranks=True)]
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
