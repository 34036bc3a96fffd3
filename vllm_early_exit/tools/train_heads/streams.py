"""Data collection for ``train-heads``: teacher-forced streams of the HF model, and its frozen readout.

Each sequence runs through the model once; at every position not seen before
(:class:`PrefixSet`) the stream after each head layer, the final stream and the
model's top next tokens are kept (:class:`Streams`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import sys
import torch
from torch import nn

from vllm_early_exit.tools.train_heads.settings import TrainHeadsError


# --- the frozen readout -----------------------------------------------------------


class Readout:
    """The model's final norm and LM head, frozen: what every head is read through."""

    def __init__(self, model) -> None:
        self.norm = model.model.norm
        self.weight = model.lm_head.weight.detach()
        for p in self.norm.parameters():
            p.requires_grad_(False)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def logits(self, stream: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``stream`` rows over ``tokens`` (None: the whole vocabulary)."""
        weight = self.weight if tokens is None else self.weight[tokens]
        return nn.functional.linear(self.norm(stream), weight)


# --- teacher-forced streams ---------------------------------------------------------


class PrefixSet:
    """Positions already seen: the same prefix gives the same streams, so it is kept once.

    Chat templates start every conversation with the same system turn; without
    this, those identical positions would dominate the data.
    """

    def __init__(self) -> None:
        self._children: dict[tuple[int, int], int] = {}

    def new_positions(self, tokens: Sequence[int]) -> list[int]:
        node, fresh = 0, []
        for position, token in enumerate(tokens):
            key = (node, int(token))
            if key not in self._children:
                self._children[key] = len(self._children) + 1
                fresh.append(position)
            node = self._children[key]
        return fresh


@dataclass
class Streams:
    """Per kept position: the streams a head needs and what the full model predicted."""

    after: dict[int, torch.Tensor]
    """Layer -> ``[N, hidden]`` stream after that layer."""
    final: torch.Tensor
    """``[N, hidden]`` stream after the last layer, before the final norm."""
    teacher_top: torch.Tensor
    """``[N, k]`` the full model's top-k next tokens, best first."""
    sequence: torch.Tensor
    """``[N]`` index of the sequence each position came from."""
    before: dict[int, torch.Tensor] = field(default_factory=dict)
    """Layer -> ``[N, hidden]`` stream entering that layer (gate features; held-out only)."""

    @property
    def tokens(self) -> int:
        return self.final.shape[0]


@torch.no_grad()
def collect_streams(
    model,
    sequences: Sequence[Sequence[int]],
    layers: Sequence[int],
    top_k: int,
    seen: PrefixSet,
    *,
    with_before: bool = False,
    desc: str = "teacher",
) -> Streams:
    """Runs each sequence through the model (teacher forcing) and keeps the new positions."""
    from tqdm import tqdm

    captured: list[torch.Tensor] = []
    hook = model.model.norm.register_forward_pre_hook(lambda _module, inputs: captured.append(inputs[0]))
    after: dict[int, list] = {l: [] for l in layers}
    before: dict[int, list] = {l: [] for l in layers}
    final, top, owner = [], [], []
    try:
        for index, tokens in enumerate(tqdm(sequences, desc=desc, unit="seq", file=sys.stdout)):
            keep = torch.tensor(seen.new_positions(tokens), dtype=torch.long)
            if keep.numel() == 0:
                continue
            captured.clear()
            out = model(torch.tensor([list(tokens)]), output_hidden_states=True)
            states = out.hidden_states  # states[i]: entering layer i; states[l + 1]: after layer l
            for l in layers:
                after[l].append(states[l + 1][0, keep])
                if with_before:
                    before[l].append(states[l][0, keep])
            final.append(captured[-1][0, keep])
            top.append(out.logits[0, keep].topk(top_k, dim=-1).indices)
            owner.append(torch.full((keep.numel(),), index, dtype=torch.long))
    finally:
        hook.remove()
    if not final:
        raise TrainHeadsError(f"{desc}: the sequences hold no new positions (all empty or repeating earlier ones)")
    cat = torch.cat
    return Streams(
        after={l: cat(v).float() for l, v in after.items()},
        final=cat(final).float(),
        teacher_top=cat(top),
        sequence=cat(owner),
        before={l: cat(v).float() for l, v in before.items()} if with_before else {},
    )
