"""Held-out evaluation of a student against the original: teacher-forced on the original's
greedy replies, the share of reply positions where each exit layer's readout (and the last
layer's) picks the original's token, and the max-prob rule's frontier at the exit layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_early_exit.tools.finetune.data import TeacherData
from vllm_early_exit.tools.finetune.readouts import ExitReadouts

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 0.9999)
AGREEMENTS = (0.99, 0.95, 0.9)


@dataclass
class HeldOutReadouts:
    top: torch.Tensor
    """``[positions, exits + 1]`` the readout's top token at each exit layer, then the last layer."""
    max_prob: torch.Tensor
    """``[positions, exits + 1]`` its probability."""
    target: torch.Tensor
    """``[positions]`` the original's token."""


@torch.no_grad()
def held_out_readouts(readouts: ExitReadouts, data: TeacherData, exit_layers: tuple[int, ...]) -> HeldOutReadouts:
    """Every reply position of ``data`` (prompt + reply minus its last token, one sequence at a time)."""
    was_training = readouts.training
    readouts.eval()
    tops, probs, targets = [], [], []
    try:
        for prompt, reply in zip(data.prompts, data.replies):
            ids = torch.tensor(prompt + reply[:-1])[None]
            select = torch.zeros_like(ids, dtype=torch.bool)
            select[0, len(prompt) - 1:] = True
            out = readouts(ids, torch.ones_like(ids), select, list(exit_layers))
            maxima = [torch.softmax(out[layer].float(), -1).max(-1) for layer in sorted(out)]
            tops.append(torch.stack([m.indices for m in maxima], 1))
            probs.append(torch.stack([m.values for m in maxima], 1))
            targets.append(torch.tensor(reply))
    finally:
        readouts.train(was_training)
    return HeldOutReadouts(torch.cat(tops), torch.cat(probs), torch.cat(targets))


def max_prob_frontier(r: HeldOutReadouts, exit_layers: tuple[int, ...], num_layers: int) -> list[dict]:
    """Per threshold, the per-token max-prob rule over the exit layers: agreement with the
    original and the mean share of layers run (a position that no exit takes runs them all)."""
    exits = len(exit_layers)
    depth_of = torch.tensor([*(layer + 1 for layer in exit_layers), num_layers], dtype=torch.float32)
    rows = torch.arange(r.top.shape[0])
    out = []
    for threshold in THRESHOLDS:
        confident = r.max_prob[:, :exits] >= threshold
        column = torch.where(confident.any(1), confident.int().argmax(1), exits)
        right = r.top[rows, column] == r.target
        out.append({"threshold": threshold, "agreement": float(right.float().mean()),
                    "depth": float(depth_of[column].mean() / num_layers)})
    return out


def lowest_depth(frontier: list[dict], agreement: float) -> float | None:
    reached = [point["depth"] for point in frontier if point["agreement"] >= agreement]
    return min(reached) if reached else None


def evaluate(readouts: ExitReadouts, data: TeacherData, exit_layers: tuple[int, ...]) -> dict:
    r = held_out_readouts(readouts, data, exit_layers)
    right = (r.top == r.target[:, None]).float().mean(0).tolist()
    frontier = max_prob_frontier(r, exit_layers, readouts.num_layers)
    return {
        "positions": int(r.target.numel()),
        "full_depth_agreement": right[-1],
        "exit_agreement": {str(layer): value for layer, value in zip(exit_layers, right)},
        "depth_at": {str(a): lowest_depth(frontier, a) for a in AGREEMENTS},
        "frontier": frontier,
    }
