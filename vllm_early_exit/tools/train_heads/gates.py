"""Held-out evaluation and gate fitting for ``train-heads``.

:func:`evaluate` scores the plain readout and every head on the held-out positions
(full vocabulary) and computes the gate features there; :func:`fit_gate` fits a
logistic gate per layer on them and scores it by two-fold cross-fitting.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from torch import nn

from vllm_early_exit.model_executor.early_exit.heads import GATE_FEATURES, gate_features
from vllm_early_exit.tools.train_heads.streams import Readout, Streams


# --- held-out evaluation ------------------------------------------------------------


@dataclass
class Reading:
    """One way of reading one layer, scored on the held-out positions (full vocabulary)."""

    agreement: float
    """Fraction of positions whose top token is the full model's."""
    kl: float
    """Mean KL(full model || this reading)."""
    correct: torch.Tensor
    """``[N]`` bool: top token equals the full model's."""
    features: torch.Tensor | None = None
    """``[N, len(GATE_FEATURES)]`` gate inputs (for the heads only)."""


@torch.no_grad()
def evaluate(readout: Readout, held: Streams, heads: dict[str, dict[int, nn.Module]],
             rows: int = 512) -> dict[str, dict[int, Reading]]:
    """Scores the plain readout (``"plain"``) and every design's heads at every layer.

    Works chunk by chunk: the full model's distribution is computed once per chunk
    and no ``[N, vocab]`` tensor outlives it. Gate features (for the heads) are
    :func:`heads.gate_features` itself, so they are exactly what the engine computes.
    """
    from tqdm import tqdm

    layers = sorted(held.after)
    readers: dict[str, dict[int, nn.Module | None]] = {"plain": {l: None for l in layers}, **heads}
    count = held.tokens
    correct = {name: {l: torch.empty(count, dtype=torch.bool) for l in layers} for name in readers}
    kl = {name: {l: torch.empty(count) for l in layers} for name in readers}
    features = {name: {l: torch.empty(count, len(GATE_FEATURES)) for l in layers} for name in heads}
    for start in tqdm(range(0, count, rows), desc="held-out", unit="chunk", leave=False, file=sys.stdout):
        part = slice(start, start + rows)
        teacher = torch.log_softmax(readout.logits(held.final[part]), dim=-1)
        teacher_probs = teacher.exp()
        neg_entropy = (teacher_probs * teacher).sum(-1)
        del teacher
        answer = held.teacher_top[part, 0]
        for name, by_layer in readers.items():
            for l in layers:
                stream = held.after[l][part]
                head = by_layer[l]
                logits = readout.logits(stream if head is None else head(stream))
                # KL(p || q) = sum p log p - (sum p * logits - logsumexp(logits))
                cross = torch.einsum("rv,rv->r", teacher_probs, logits) - torch.logsumexp(logits, dim=-1)
                kl[name][l][part] = neg_entropy - cross
                correct[name][l][part] = logits.argmax(-1) == answer
                if head is not None and held.before:
                    features[name][l][part] = gate_features(logits, stream, held.before[l][part])
    return {
        name: {
            l: Reading(
                float(correct[name][l].float().mean()), float(kl[name][l].mean()), correct[name][l],
                features[name][l] if name in heads and held.before else None,
            )
            for l in layers
        }
        for name in readers
    }


# --- gates --------------------------------------------------------------------------


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3,
                 steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression ``sigmoid(x w + b)`` by Newton's method (deterministic, float64).

    ``l2`` keeps the weights finite when the classes separate. With one class only,
    the weights are zero and the bias is the log-odds of the smoothed rate.
    """
    if bool(y.all()) or not bool(y.any()):
        rate = (float(y.sum()) + 0.5) / (y.numel() + 1)
        return torch.zeros(x.shape[1]), torch.tensor([math.log(rate / (1 - rate))])
    design = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    target = y.double()
    penalty = torch.full((design.shape[1],), l2, dtype=torch.float64)
    penalty[-1] = 0.0
    beta = torch.zeros(design.shape[1], dtype=torch.float64)
    rows = design.shape[0]
    for _ in range(steps):
        p = torch.sigmoid(design @ beta)
        grad = design.T @ (p - target) / rows + penalty * beta
        hess = design.T @ (design * (p * (1 - p)).unsqueeze(1)) / rows + torch.diag(penalty + 1e-9)
        step = torch.linalg.solve(hess, grad)
        beta = beta - step
        if float(step.abs().max()) < 1e-10:
            break
    return beta[:-1].float(), beta[-1:].float()


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve (ties counted half); None when a class is missing."""
    pos, neg = scores[labels], scores[~labels]
    if pos.numel() == 0 or neg.numel() == 0:
        return None
    ranks = torch.empty(scores.numel(), dtype=torch.float64)
    values, inverse = scores.double().unique(return_inverse=True)
    order = torch.argsort(scores.double(), stable=True)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    mean_rank = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    mean_rank /= torch.bincount(inverse, minlength=values.numel()).double()
    tied = mean_rank[inverse]
    return float((tied[labels].sum() - pos.numel() * (pos.numel() + 1) / 2) / (pos.numel() * neg.numel()))


def fit_gate(features: torch.Tensor, correct: torch.Tensor,
             sequence: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], dict]:
    """The stored gate (fitted on all held-out positions) and its two-fold cross-fitted scores.

    Folds alternate by sequence, so a gate is never scored on a conversation it was
    fitted on (with a single held-out sequence, they alternate by position).
    """
    order = torch.unique(sequence, return_inverse=True)[1]
    fold = order % 2 if int(order.max()) > 0 else torch.arange(sequence.numel()) % 2
    probability = torch.empty(correct.numel())
    for k in (0, 1):
        fit_rows, score_rows = fold != k, fold == k
        if not bool(fit_rows.any()) or not bool(score_rows.any()):
            fit_rows = score_rows = torch.ones_like(correct)
        weight, bias = fit_logistic(features[fit_rows], correct[fit_rows])
        probability[score_rows] = torch.sigmoid(features[score_rows] @ weight + bias)
    predicted = probability >= 0.5
    base = float(correct.float().mean())
    scores = {
        "gate_accuracy": float((predicted == correct).float().mean()),
        "gate_majority_accuracy": max(base, 1 - base),
        "gate_auc": auc(probability, correct),
    }
    return fit_logistic(features, correct), scores
