"""The data of an exit-aware fine-tune: the original model's own greedy replies, with its
top-k next-token distribution at every reply position, generated once by vLLM.

Caching the original's top-k log-probabilities as it generates (vLLM returns them with
each token) makes the teacher free during training: no frozen copy of the model runs
beside the student, and the teacher is exactly what plain vLLM serves. The KL is taken
over those k tokens plus the rest of the mass (:func:`loss.top_k_kl`).

Replies are generated in chunks, each saved as it completes (``<out>/data/<split>-NNNN.pt``),
so a stopped run generates only what is missing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CHUNK = 128
"""Prompts per saved chunk."""


@dataclass
class TeacherData:
    """Sequences of prompt + the original's reply, with the original's top-k at each reply token."""

    prompts: list[list[int]]
    replies: list[list[int]]
    top_ids: list[torch.Tensor]
    """Per sequence ``[len(reply), k]`` int64: the original's top tokens at each reply position,
    best first (the first is the reply token itself: the replies are greedy)."""
    top_logprobs: list[torch.Tensor]
    """Per sequence ``[len(reply), k]`` float32: their log-probabilities."""

    def __len__(self) -> int:
        return len(self.prompts)

    def tokens(self) -> int:
        return sum(len(p) + len(r) for p, r in zip(self.prompts, self.replies))

    def reply_tokens(self) -> int:
        return sum(len(r) for r in self.replies)

    @classmethod
    def concat(cls, parts: list[TeacherData]) -> TeacherData:
        return cls(*(sum((getattr(p, name) for p in parts), []) for name in
                     ("prompts", "replies", "top_ids", "top_logprobs")))

    def save(self, path: Path) -> None:
        save_whole(self.__dict__, path)

    @classmethod
    def load(cls, path: Path) -> TeacherData:
        return cls(**torch.load(path, weights_only=True))

    @classmethod
    def load_split(cls, folder: Path, split: str) -> TeacherData:
        """Every part of ``split`` (``train``, ``held-out``) in a run's data folder, in order."""
        return cls.concat([cls.load(p) for p in sorted(folder.glob(f"{split}-*.pt"))])


def save_whole(obj, path: Path) -> None:
    """``torch.save`` into a temporary file renamed at the end: a stopped run never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.rename(path)


def top_k_of(logprobs: list[dict], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, logprobs)`` of shape ``[tokens, k]`` from vLLM's per-token logprob dicts, by rank."""
    ids, values = [], []
    for position in logprobs:
        ranked = sorted(position.items(), key=lambda item: item[1].rank)[:k]
        if len(ranked) < k:
            raise ValueError(f"vLLM returned {len(ranked)} log-probabilities at a position; asked for {k}")
        ids.append([token for token, _ in ranked])
        values.append([entry.logprob for _, entry in ranked])
    return torch.tensor(ids, dtype=torch.long), torch.tensor(values, dtype=torch.float32)


def prompt_ids(tokenizer, texts: list[str], max_prompt_tokens: int) -> list[list[int]]:
    """The chat-template token ids of each user turn; longer prompts are cut to their last
    ``max_prompt_tokens`` tokens (the template's reply header stays)."""
    from vllm_early_exit.tools.assets import chat_prompt

    out = []
    for text in texts:
        ids = tokenizer(chat_prompt(tokenizer, text), add_special_tokens=False)["input_ids"]
        out.append(ids[-max_prompt_tokens:])
    return out


def generate(llm, prompts: list[list[int]], max_tokens: int, k: int) -> TeacherData:
    """The original's greedy replies to ``prompts`` with its top-``k`` at every reply token."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=k, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    replies, top_ids, top_logprobs = [], [], []
    for out in outputs:
        completion = out.outputs[0]
        ids, values = top_k_of(completion.logprobs, k)
        replies.append(list(completion.token_ids))
        top_ids.append(ids)
        top_logprobs.append(values)
    return TeacherData(prompts, replies, top_ids, top_logprobs)


def teacher_data(
    model: Path, split: str, prompts: list[list[int]], folder: Path, max_tokens: int, k: int, engine=None
) -> tuple[TeacherData, object]:
    """The teacher data of ``prompts``, from ``folder`` where chunks were saved before, the rest
    generated now (a plain vLLM engine on the original ``model``, built on first need and
    returned for reuse)."""
    from vllm_early_exit.tools import console
    from vllm_early_exit.tools.engines import build_engine

    folder.mkdir(parents=True, exist_ok=True)
    chunks = [prompts[i:i + CHUNK] for i in range(0, len(prompts), CHUNK)]
    parts = []
    missing = [i for i in range(len(chunks)) if not (folder / f"{split}-{i:04d}.pt").exists()]
    if missing and int(os.environ.get("RANK", "0")) != 0:
        # Under accelerate launch / torchrun the first process generates; the others wait for its files.
        while missing:
            time.sleep(5)
            missing = [i for i in missing if not (folder / f"{split}-{i:04d}.pt").exists()]
    if missing and engine is None:
        engine = build_engine(model, label="plain vLLM", max_logprobs=k, enable_prefix_caching=False)
    with console.phase(f"the original's replies to the {split} prompts", total=len(chunks)) as bar:
        for i, chunk in enumerate(chunks):
            path = folder / f"{split}-{i:04d}.pt"
            if i in missing:
                part = generate(engine, chunk, max_tokens, k)
                part.save(path)
            else:
                part = TeacherData.load(path)
                if part.prompts != chunk:
                    raise ValueError(f"{path} holds other prompts than this run's; remove {folder} to start over")
            parts.append(part)
            bar.advance()
        data = TeacherData.concat(parts)
        bar.done(f"{len(data)} replies, {data.reply_tokens():,} reply tokens")
    return data, engine
