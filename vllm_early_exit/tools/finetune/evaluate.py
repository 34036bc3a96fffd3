"""Held-out evaluation of a student against the original: teacher-forced on the original's
greedy replies, the share of reply positions where each exit layer's readout (and the last
layer's) picks the original's token, and the max-prob rule's frontier at the exit layers.

Only the exit layers and the last are read (an LM-head product each); the readouts go into the
oracle's :class:`~vllm_early_exit.tools.oracle.TokenReadouts`, one column per layer, the layers not
read never confident, so the oracle's max-prob rule scores them as it scores every layer's.
"""

from __future__ import annotations

import torch

from vllm_early_exit.tools.finetune.data import TeacherData
from vllm_early_exit.tools.finetune.readouts import ExitReadouts
from vllm_early_exit.tools.oracle import TokenReadouts, max_prob_exits

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 0.9999)
AGREEMENTS = (0.99, 0.95, 0.9)


@torch.no_grad()
def held_out_readouts(readouts: ExitReadouts, data: TeacherData, exit_layers: tuple[int, ...]) -> TokenReadouts:
    """Every reply position of ``data`` (prompt + reply minus its last token, one sequence at a
    time), read after ``exit_layers`` and the last layer."""
    layers = [*exit_layers, readouts.num_layers - 1]
    was_training = readouts.training
    readouts.eval()
    tops, probs, targets = [], [], []
    try:
        for prompt, reply in zip(data.prompts, data.replies):
            ids = torch.tensor(prompt + reply[:-1])[None]
            select = torch.zeros_like(ids, dtype=torch.bool)
            select[0, len(prompt) - 1:] = True
            out = readouts(ids, torch.ones_like(ids), select, list(exit_layers))
            maxima = [torch.softmax(out[layer].float(), -1).max(-1) for layer in layers]
            top = torch.full((len(reply), readouts.num_layers), -1, dtype=torch.long)
            prob = torch.zeros(len(reply), readouts.num_layers)
            top[:, layers] = torch.stack([m.indices for m in maxima], 1)
            prob[:, layers] = torch.stack([m.values for m in maxima], 1)
            tops.append(top)
            probs.append(prob)
            targets.append(torch.tensor(reply))
    finally:
        readouts.train(was_training)
    return TokenReadouts(torch.cat(tops), torch.cat(probs), torch.cat(targets))


def lowest_depth(frontier: list[dict], agreement: float, depth: str = "depth") -> float | None:
    """The lowest ``depth`` (a key of the frontier's points) among the points that reach ``agreement``."""
    reached = [point[depth] for point in frontier if point["agreement"] >= agreement]
    return min(reached) if reached else None


def evaluate(readouts: ExitReadouts, data: TeacherData, exit_layers: tuple[int, ...]) -> dict:
    r = held_out_readouts(readouts, data, exit_layers)
    right = r.right.float().mean(0)
    frontier = []
    for threshold in THRESHOLDS:
        agree, depth = max_prob_exits(r, list(exit_layers), threshold)
        frontier.append({"threshold": threshold, "agreement": float(agree.float().mean()), "depth": depth})
    return {
        "positions": int(r.target.numel()),
        "full_depth_agreement": float(right[-1]),
        "exit_agreement": {str(layer): float(right[layer]) for layer in exit_layers},
        "depth_at": {str(a): lowest_depth(frontier, a) for a in AGREEMENTS},
        "frontier": frontier,
    }
