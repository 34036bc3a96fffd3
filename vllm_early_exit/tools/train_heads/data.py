"""Training data of ``train-heads``: ShareGPT ``train``-split conversations, rendered in the chat template."""

from __future__ import annotations

from collections.abc import Sequence

from vllm_early_exit.tools.train_heads.settings import TrainHeadsError


def sharegpt_train_conversations(count: int) -> list[tuple[str, str | None]]:
    """``(first user turn, first assistant reply or None)`` of the first ``count`` conversations of
    the ``train`` split, in file order; the user turns are exactly ``sharegpt_split("train", count)``,
    so the calibration and evaluation prompts are never used."""
    from vllm_early_exit.tools import assets

    start, size = assets.SPLITS["train"]
    if not 1 <= count <= size:
        raise TrainHeadsError(
            f"--prompts {count} is out of range; the ShareGPT train split holds {size}, so it must lie in [1, {size}]"
        )
    out: list[tuple[str, str | None]] = []
    usable = 0
    for record in assets._sharegpt_records():
        turns = record.get("conversations") or []
        if not turns or turns[0].get("from") != "human":
            continue
        text = (turns[0].get("value") or "").strip()
        if not 16 <= len(text) <= 600:  # the filter of assets.sharegpt_prompts
            continue
        usable += 1
        if usable <= start:
            continue
        reply = turns[1].get("value") if len(turns) > 1 and turns[1].get("from") == "gpt" else None
        out.append((text, (reply or "").strip() or None))
        if len(out) == count:
            break
    if [user for user, _ in out] != assets.sharegpt_split("train", count):
        raise RuntimeError("ShareGPT conversations do not line up with sharegpt_split('train'); "
                           "the split filter in assets changed")
    return out


def render_conversations(tokenizer, conversations: Sequence[tuple[str, str | None]],
                         max_len: int) -> list[list[int]]:
    """Each conversation in the chat template (user turn, then the reply when there is one),
    tokenized as the engine sees it and cut to ``max_len`` tokens."""
    sequences = []
    for user, reply in conversations:
        messages = [{"role": "user", "content": user}]
        if reply:
            messages.append({"role": "assistant", "content": reply})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not reply)
        sequences.append(tokenizer.encode(text, add_special_tokens=False)[:max_len])
    return sequences
