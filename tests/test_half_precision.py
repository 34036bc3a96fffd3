"""float16: early exit with nothing leaving is plain vLLM; forced exits follow the reference.

bfloat16 is not tested here: on this CPU (AMX) vLLM's bf16 attention path crashes
with SIGILL in most runs. The GPU check (``scripts/gpu_check.py``) covers bf16.
"""

from __future__ import annotations

from .conftest import NEW_TOKENS, run_engine, tiny_prompts

HALF = {"dtype": "float16"}


def test_float16_with_nothing_leaving_is_plain_vllm(smollm2):
    """Checks run at two layers and never fire: the rows run the whole stack through the
    decode step, and its final norm must be vLLM's fused add+norm (float32 sum) to stay identical."""
    from transformers import AutoTokenizer

    from vllm_early_exit.tools.assets import chat_prompt, sharegpt_prompts

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    prompts = [tokenizer.encode(chat_prompt(tokenizer, t), add_special_tokens=False) for t in sharegpt_prompts(4)]
    requests = [(p, 24) for p in prompts]
    plain = run_engine(smollm2, requests, batched=True, **HALF)
    never = {"exit_layers": [10, 20], "signal": "saturation", "threshold": 1.0, "policy": "per_token"}
    early = run_engine(smollm2, requests, early_exit=never, batched=True, **HALF)
    assert early["stats"][0]["early_exit_tokens"] == 0
    assert early["stats"][0]["decode_tokens"] == 4 * 23
    assert early["outputs"] == plain["outputs"]


def test_float16_forced_exit_matches_reference(tiny_llama, reference):
    """The tiny model's logits are peaked, so float16 noise cannot flip a greedy choice."""
    prompts = tiny_prompts(3, seed=5)
    result = run_engine(
        tiny_llama, [(p, NEW_TOKENS) for p in prompts],
        early_exit={"exit_layers": [3], "threshold": 0.0, "policy": "per_token"}, **HALF,
    )
    assert result["outputs"] == [
        reference.generate(p, NEW_TOKENS, exit_layers=(3,), threshold=0.0).tokens for p in prompts
    ]
