"""Where the exit decision is made.

``ExitDecider`` reads a layer's residual stream through the final norm and the
shared LM head (``LogitReadout``), asks the configured signal which rows are
confident, and asks the configured policy which rows leave.

With ``vocab_top_k`` K (dynamic vocabulary pruning), the first check of a step
scores the full vocabulary and keeps each row's top-K tokens; later checks of
the step score only those K rows of the LM head, so they cost K/vocab of a
full check. The signal then reads a distribution over the K kept tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import EarlyExitConfig
from .policies import make_policy
from .signals import make_signal


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

    def shortlist(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """LM-head rows of each row's top-``k`` tokens: ``[rows, k, hidden]``."""
        return self.lm_head.weight[logits.topk(k, dim=-1).indices]

    def pruned(self, stream: torch.Tensor, shortlist: torch.Tensor) -> torch.Tensor:
        """Logits of the shortlisted tokens only: ``[rows, k]``."""
        hidden = self.norm(stream).to(shortlist.dtype)
        return torch.bmm(shortlist, hidden.unsqueeze(-1)).squeeze(-1) * self.logits_processor.scale


class ExitDecider:
    """Decides, after a check layer, whether the pure-decode step leaves there."""

    def __init__(self, config: EarlyExitConfig, num_layers: int) -> None:
        self.enabled = config.enabled
        self.check_layers = frozenset(config.exit_layers_for(num_layers))
        self.threshold = config.threshold
        self.signal = make_signal(config.signal)
        self.policy = make_policy(config.policy, config.quorum)
        self.vocab_top_k = config.vocab_top_k
        self.readout: LogitReadout | None = None
        self._shortlist: torch.Tensor | None = None

    def bind_readout(self, readout: LogitReadout) -> None:
        self.readout = readout

    def begin_step(self) -> None:
        """Forgets the previous step's vocabulary shortlist."""
        self._shortlist = None

    def _logits(self, stream: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.vocab_top_k is None:
            return self.readout(stream)
        if self._shortlist is None:
            # First check of the step: every row is still running, so shortlist
            # row i belongs to step row i.
            logits = self.readout(stream)
            self._shortlist = self.readout.shortlist(logits, self.vocab_top_k)
            return logits
        return self.readout.pruned(stream, self._shortlist[rows])

    def rows_to_exit(
        self,
        stream: torch.Tensor,
        rows: torch.Tensor,
        thresholds: torch.Tensor | None = None,
        allowed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Boolean mask over ``rows``: the rows that leave after this layer.

        ``stream``: residual stream (hidden + residual) of ``rows``, the step's
        logits rows still running; ``thresholds``: their own thresholds (None:
        the engine's); ``allowed``: False for rows that must not leave (None: all may).
        """
        assert self.readout is not None, "the LM head was not bound to the exit decider"
        threshold = self.threshold if thresholds is None else thresholds
        confident = self.signal.confident(self._logits(stream, rows), threshold)
        if allowed is not None:
            confident = confident & allowed
        return self.policy.rows_to_exit(confident)
