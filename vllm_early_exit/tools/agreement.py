"""How far early-exit outputs agree with full-depth outputs of the same prompts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def prefix_agreement(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """Share of the reference's tokens produced before the first divergence (1.0: identical)."""
    if not reference:
        return 1.0
    same = 0
    for a, b in zip(candidate, reference):
        if a != b:
            break
        same += 1
    return same / len(reference)


@dataclass(frozen=True)
class Agreement:
    identical: float
    """Share of outputs token-identical to the reference."""
    prefix: float
    """Mean share of tokens agreeing up to the first divergence."""

    @classmethod
    def of(cls, candidates: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> "Agreement":
        if len(candidates) != len(references) or not references:
            raise ValueError("agreement needs one candidate per reference output")
        pairs = list(zip(candidates, references))
        identical = sum(list(a) == list(b) for a, b in pairs) / len(pairs)
        prefix = sum(prefix_agreement(a, b) for a, b in pairs) / len(pairs)
        return cls(identical=identical, prefix=prefix)


def full_model_choices(llm, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> list[list[bool]]:
    """Per generated token: is it the token the full model picks after the same prefix?

    ``llm`` is a plain (full-depth) vLLM engine. It scores prompt + output in one
    prefill pass (``prompt_logprobs=0`` gives each token's rank under the full
    model), so this measures every early-exit decision on the early-exit
    engine's own prefix, without the first divergence hiding the rest.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    requests = [TokensPrompt(prompt_token_ids=list(p) + list(o)) for p, o in zip(prompts, outputs)]
    results = llm.generate(requests, params, use_tqdm=False)
    choices = []
    for prompt, output, result in zip(prompts, outputs, results):
        ranks = result.prompt_logprobs[len(prompt):]
        choices.append([entry[token].rank == 1 for token, entry in zip(output, ranks)])
    return choices


def token_agreement(choices: Sequence[Sequence[bool]]) -> float:
    """Share of all generated tokens that the full model would have picked too."""
    total = sum(len(c) for c in choices)
    return sum(sum(c) for c in choices) / total if total else 1.0
