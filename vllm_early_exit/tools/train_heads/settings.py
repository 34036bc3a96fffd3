"""What decides a ``train-heads`` run: the designs, :class:`TrainSettings` and its checks."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_early_exit.model_executor.early_exit.heads import default_layers


DESIGNS = ("affine", "low_rank")
CHOICES = (*DESIGNS, "compare")
TARGETS = ("soft", "hard")


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
    target: str = "soft"
    """What a head learns after its closed-form start. ``soft``: the full model's distribution
    (KL). ``hard``: the full model's top token (cross-entropy), so that the head's max-prob
    estimates the chance its token is the full model's, the question a greedy exit asks."""
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
        if self.target not in TARGETS:
            raise TrainHeadsError(f"--target {self.target!r} is unknown; allowed: {', '.join(TARGETS)}")
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
