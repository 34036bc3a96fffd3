"""Head fitting for ``train-heads``: the head designs, their closed-form start and the KL training.

A head maps a layer's stream ``h`` to ``h + h W^T + b`` (``affine``: a full ``W``;
``low_rank``: ``W = U V``). :func:`initial_heads` fits every head by ridge
regression towards the final stream; :func:`train_heads` then trains all of them
with Adam on KL(full model || head) over candidate vocabularies.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
from torch import nn

from vllm_early_exit.tools.train_heads.settings import DESIGNS, TrainSettings
from vllm_early_exit.tools.train_heads.streams import Readout, Streams


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


def _generator(seed: int, design: str, layer: int) -> torch.Generator:
    """The generator of one head's random start (low_rank from the identity only)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + DESIGNS.index(design) * 1_009 + layer)


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


def hard_to_teacher(head_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the cross-entropy of the head on the teacher's top token (the
    candidates hold every row's top teacher tokens, so the top one is among the columns)."""
    return nn.functional.cross_entropy(head_logits, teacher_logits.argmax(-1))


def train_heads(heads: dict[tuple[str, int], nn.Module], train: Streams, readout: Readout,
                settings: TrainSettings, generator: torch.Generator) -> dict[tuple[str, int], list[float]]:
    """Adam with a cosine learning-rate decay on the KL to the full model (``--target hard``: the
    cross-entropy on its top token), for all heads at once.

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
    objective = hard_to_teacher if settings.target == "hard" else kl_to_teacher
    losses: dict[tuple[str, int], list[float]] = {key: [] for key in heads}
    with tqdm(total=total, desc=f"training {len(heads)} heads", unit="step", file=sys.stdout) as bar:
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
                    loss = objective(logits, target)
                    loss.backward()  # heads are independent: one graph at a time keeps memory flat
                    running[(design, layer)] += float(loss.detach()) * batch.numel()
                optimizer.step()
                schedule.step()
                bar.update()
            for key in heads:
                losses[key].append(running[key] / rows)
            bar.set_postfix(kl=f"{sum(v[-1] for v in losses.values()) / len(heads):.3f}")
    return losses
