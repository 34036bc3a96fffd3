"""The exit-aware loss: each exit layer's readout learns the original's final distribution,
while the last layer is held to it.

    loss = anchor_weight * KL(original || last layer)
         + sum over this step's exit layers l of exit_weight * (l + 1) / layers * exit_loss(readout_l)

``exit_loss`` is the same KL (``--exit-target soft``) or the cross-entropy on the original's
greedy token (``hard``, :func:`exit_loss`).

Every KL is over the original's top-k tokens plus the rest of the mass as one more outcome
(:func:`top_k_kl`): the k tokens carry nearly all of the mass at a reply position, and the
coarsened KL is still a KL (it is zero only where the student gives those tokens the
original's probabilities), so it cannot be lowered by a wrong distribution.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def top_k_kl(logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor) -> torch.Tensor:
    """Per row, KL(teacher || student) over the teacher's top-k tokens and the rest of the mass.

    ``logits``: ``[rows, vocab]`` of the student; ``top_ids`` / ``top_logprobs``: ``[rows, k]``
    of the teacher. Returns ``[rows]`` in nats.
    """
    log_q = F.log_softmax(logits.float(), dim=-1)
    log_q_top = log_q.gather(-1, top_ids)
    p_top = top_logprobs.exp()
    kl_top = (p_top * (top_logprobs - log_q_top)).sum(-1)
    p_rest = (1 - p_top.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - log_q_top.exp().sum(-1)).clamp_min(1e-12)
    return kl_top + p_rest * (p_rest.log() - q_rest.log())


def exit_loss(logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor, target: str) -> torch.Tensor:
    """Per row, an exit's loss: ``soft``, :func:`top_k_kl` to the original; ``hard``, the
    cross-entropy on the original's greedy token (``top_ids[:, 0]``: the replies are greedy)."""
    if target == "hard":
        return F.cross_entropy(logits.float(), top_ids[:, 0], reduction="none")
    return top_k_kl(logits, top_ids, top_logprobs)


def exit_scale(layer: int, num_layers: int, exit_weight: float) -> float:
    """LayerSkip's rising scale: deeper exits weigh more (``layer`` 0-based)."""
    return exit_weight * (layer + 1) / num_layers


def rotation(exit_layers: tuple[int, ...], step: int, per_step: int) -> list[int]:
    """The exit layers read at ``step``: ``per_step`` of them, in turn, so each is read
    equally often over ``len(exit_layers)`` steps."""
    n = len(exit_layers)
    return sorted({exit_layers[(step * per_step + j) % n] for j in range(per_step)})
