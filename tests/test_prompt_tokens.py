"""Prompt tokens run at full depth even when a step computes just one of them.

With prefix caching, a prompt that is one token past a block boundary and whose
blocks another request already computed gets a prefix hit of everything but its
last token (hits are whole blocks, and vLLM always computes at least one prompt
token). Its first step then schedules one token: a step shaped like pure decode
(``max_query_len == 1``). That token is a prompt token: it must not leave early
nor skip layers, and it is not a decode token in the counters.
"""

from __future__ import annotations

import pytest

from .conftest import run_engine, tiny_prompts

BLOCK = 32  # the smallest block CPU_ATTN takes (a multiple of 32)
NEW_TOKENS = 12
RULES = {
    "exit": ({"exit_layers": [1], "threshold": 0.0, "policy": "per_token"}, {"exit_layers": (1,), "threshold": 0.0}),
    "skip": ({"skip_layers": [2, 4], "exit_layers": []}, {"skip_layers": (2, 4)}),
}


@pytest.mark.parametrize("rule", ["exit", "skip"])
def test_prefix_hit_prompt_token_runs_full_depth(tiny_llama, reference, rule):
    """A's prompt fills two blocks and a half; B's prompt is A's first 2 blocks + 1 token,
    so B's first step computes only B's last prompt token, alone in its step."""
    settings, reference_rule = RULES[rule]
    prompt_a = tiny_prompts(1, length=2 * BLOCK + 9, seed=11)[0]
    prompt_b = prompt_a[: 2 * BLOCK + 1]
    result = run_engine(
        tiny_llama, [(prompt_a, NEW_TOKENS), (prompt_b, NEW_TOKENS)], early_exit=settings,
        enable_prefix_caching=True, block_size=BLOCK,
    )
    expected = [reference.generate(p, NEW_TOKENS, **reference_rule).tokens for p in (prompt_a, prompt_b)]
    # B as if its prompt ran at full depth, unlike B with its last prompt token treated as a decode token.
    assert result["outputs"] == expected

    stats = result["stats"][0]
    decode_tokens = 2 * (NEW_TOKENS - 1)  # each request's first token comes from its prompt step
    assert stats["decode_tokens"] == decode_tokens
    if rule == "exit":
        assert stats["exits_per_layer"][1] == decode_tokens
        assert stats["full_depth_tokens"] == 0
    else:  # skipping counts a decode token as full depth over the layers it runs
        assert stats["mean_layers"] == pytest.approx(4)
