"""The check at a check layer: how confident each row of the step is there.

``ExitCheck`` reads a layer's residual stream through the final norm and the
shared LM head (``LogitReadout``), after the layer's trained exit head when
``heads`` are set, and asks the configured signal which rows are confident. It
reads every row of the step (fixed shapes: rows that left earlier are read and
ignored), with each row's own threshold.

With ``vocab_top_k`` K (dynamic vocabulary pruning), the first check of a step
reads the full vocabulary and keeps each row's top-K tokens; later checks of the
step score only those K rows of the LM head.

With ``shortlist`` (``shortlist.py``) a check has two stages: ``first_stage`` reads
the signal over a static token shortlist's logits (a few percent of the LM head),
and only when it lets some row leave does the step take ``read``, the full
vocabulary, to confirm; a row is confident only when both stages say so.

The full-vocabulary logits a check reads are also the sampling logits of the
rows that leave there (``RowState.leave``): vLLM samples them without running
the LM head again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vllm_early_exit.config import EarlyExitConfig
from vllm_early_exit.model_executor.early_exit.heads import ExitHeads
from vllm_early_exit.model_executor.early_exit.shortlist import Shortlist
from vllm_early_exit.model_executor.early_exit.signals import LayerReading, make_signal


class LogitReadout:
    """Next-token logits of an intermediate layer: final norm, then the shared LM head.

    Holds references to the model's own modules (no parameters of its own). With
    tensor parallelism the logits processor all-gathers the vocabulary shards, so
    every rank reads the same full logits and takes the same decision.
    """

    def __init__(self, norm: nn.Module, lm_head: nn.Module, logits_processor: nn.Module) -> None:
        self.norm = norm
        self.lm_head = lm_head
        self.logits_processor = logits_processor

    def __call__(self, stream: torch.Tensor) -> torch.Tensor:
        logits = self.logits_processor(self.lm_head, self.norm(stream))
        if logits is None:
            raise RuntimeError(
                "early exit needs the full logits on every tensor-parallel rank, "
                "but this platform gathers them to one rank only."
            )
        return logits

    def pruned(self, stream: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the given tokens only (``tokens``: ``[rows, k]`` ids): ``[rows, k]``."""
        rows = self.lm_head.weight[tokens]
        hidden = self.norm(stream).to(rows.dtype)
        return torch.bmm(rows, hidden.unsqueeze(-1)).squeeze(-1) * self.logits_processor.scale

    def shortlisted(self, stream: torch.Tensor, shortlist: Shortlist) -> torch.Tensor:
        """Logits of the shortlist's tokens, the same for every row: ``[rows, len(shortlist)]``."""
        return shortlist.logits(self.norm(stream), self.lm_head) * self.logits_processor.scale


@dataclass(frozen=True)
class Reading:
    """What a check read for every row of the step."""

    confident: torch.Tensor
    """Rows the signal lets leave (boolean ``[rows]``)."""
    logits: torch.Tensor | None
    """Every row's full-vocabulary logits, when the check read them (None: pruned, or no readout)."""


class ExitCheck:
    """The configured signal at the check layers, with its readout."""

    def __init__(self, config: EarlyExitConfig, num_layers: int) -> None:
        self.check_layers = config.check_layers_for(num_layers)
        self.threshold = config.threshold
        self.heads = ExitHeads.load(config.heads) if config.heads else None
        self.signal = make_signal(config.signal, self.heads)
        self.always_confident = self.signal.always_confident(config.threshold)
        """A threshold no score can fail: every check is a forced exit and reads nothing."""
        self.vocab_top_k = config.vocab_top_k
        self.shortlist = Shortlist(config.shortlist) if config.shortlist else None
        self.readout: LogitReadout | None = None
        self._top_tokens: torch.Tensor | None = None
        self._heads_placed = False

    @property
    def reads_previous(self) -> bool:
        """True when the signal reads the stream entering a check layer."""
        return self.signal.needs_previous

    @property
    def two_stage(self) -> bool:
        """A shortlist stage comes before the full-vocabulary confirmation."""
        return self.shortlist is not None and self.signal.reads_logits

    @property
    def fusable(self) -> bool:
        """The check may run inside its segment's compiled unit (``groups.CheckedGroup``): a
        shortlist's first stage, or a one-stage check that reads no pruned vocabulary (a forced
        exit reads none)."""
        return self.two_stage or self.vocab_top_k is None or self.always_confident

    @property
    def confirmation_fusable(self) -> bool:
        """A shortlist's confirmation may run as one compiled unit (``units.ConfirmBranch``): it
        reads the full vocabulary (no pruned one)."""
        return self.two_stage and self.vocab_top_k is None

    def bind_readout(self, readout: LogitReadout) -> None:
        self.readout = readout

    def reads_full_logits(self, first: bool) -> bool:
        """Whether ``read`` reads the full vocabulary (``first``: the step's first check)."""
        return self.signal.reads_logits and (self.vocab_top_k is None or first)

    def certain(self, own_thresholds: bool) -> bool:
        """Whether every row is confident here whatever it reads (a forced exit with no request
        threshold of its own): the check then reads nothing."""
        return self.always_confident and not own_thresholds

    def prepare(self, like: torch.Tensor) -> None:
        """Builds on the host, once, what the check's compiled units read (the heads on the
        stream's device and dtype, the shortlist's packed rows of the LM head), so that nothing
        is built while a unit is traced."""
        if self.heads is not None and not self._heads_placed:
            self.heads.place(like.device, like.dtype)
            self._heads_placed = True
        if self.shortlist is not None and self.readout is not None:
            self.shortlist.prepare(self.readout.lm_head)

    def exit_stream(self, layer: int, stream: torch.Tensor) -> torch.Tensor:
        """The stream a row leaving after ``layer`` is read from: through the layer's head, if any."""
        if self.heads is None:
            return stream
        if not self._heads_placed:
            self.heads.place(stream.device, stream.dtype)
            self._heads_placed = True
        return self.heads.apply(layer, stream)

    def first_stage(
        self, layer: int, stream: torch.Tensor, exit_stream: torch.Tensor, previous: torch.Tensor | None,
        thresholds: torch.Tensor,
    ) -> torch.Tensor:
        """The signal over the shortlist's logits: True for rows the confirmation may let leave."""
        shortlist = self.shortlist
        reading = LayerReading(layer, stream, previous, lambda: self.readout.shortlisted(exit_stream, shortlist))
        return self.signal.confident(reading, thresholds)

    def read(
        self, layer: int, stream: torch.Tensor, exit_stream: torch.Tensor, previous: torch.Tensor | None,
        thresholds: torch.Tensor, first: bool,
    ) -> Reading:
        """The signal over the full vocabulary (or, after the step's ``first`` check, over the
        top-K tokens that check kept), for every row."""
        full: list[torch.Tensor] = []

        def read_logits() -> torch.Tensor:
            if self.vocab_top_k is not None and not first:
                return self.readout.pruned(exit_stream, self._top_tokens)
            logits = self.readout(exit_stream)
            if self.vocab_top_k is not None:  # keep each row's top-K tokens for the later checks
                self._top_tokens = logits.topk(self.vocab_top_k, dim=-1).indices
            full.append(logits)
            return logits

        confident = self.signal.confident(LayerReading(layer, stream, previous, read_logits), thresholds)
        return Reading(confident, full[0] if full else None)
