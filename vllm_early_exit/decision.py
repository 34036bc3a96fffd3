"""Where the exit decision is made.

``ExitDecider`` reads a layer's residual stream through the final norm and the
shared LM head (``LogitReadout``), asks the configured signal which rows are
confident, and asks the configured policy whether the step leaves.
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


class ExitDecider:
    """Decides, after a check layer, whether the pure-decode step leaves there."""

    def __init__(self, config: EarlyExitConfig, num_layers: int) -> None:
        self.enabled = config.enabled
        self.check_layers = frozenset(config.exit_layers_for(num_layers))
        self.threshold = config.threshold
        self.signal = make_signal(config.signal)
        self.policy = make_policy(config.policy, config.quorum)
        self.readout: LogitReadout | None = None

    def bind_readout(self, readout: LogitReadout) -> None:
        self.readout = readout

    def rows_to_exit(
        self,
        stream: torch.Tensor,
        thresholds: torch.Tensor | None = None,
        allowed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Boolean ``[rows]``: the rows that leave after this layer.

        ``stream``: residual stream (hidden + residual) of the rows still running;
        ``thresholds``: their own thresholds (None: the engine's); ``allowed``:
        False for rows that must not leave (None: all may).
        """
        assert self.readout is not None, "the LM head was not bound to the exit decider"
        threshold = self.threshold if thresholds is None else thresholds
        confident = self.signal.confident(self.readout(stream), threshold)
        if allowed is not None:
            confident = confident & allowed
        return self.policy.rows_to_exit(confident)
