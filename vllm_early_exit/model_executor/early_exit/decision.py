"""Where the exit decision is made.

``ExitDecider`` reads a layer's residual stream through the final norm and the
shared LM head (``LogitReadout``), after the layer's trained exit head when
``heads`` are set, asks the configured signal which rows are confident, and asks
the configured policy which rows leave. Rows past their request's depth budget
leave whether confident or not.

With ``vocab_top_k`` K (dynamic vocabulary pruning), the first check of a step
scores the full vocabulary and keeps each row's top-K tokens; later checks of
the step score only those K rows of the LM head, so they cost K/vocab of a
full check. The signal then reads a distribution over the K kept tokens.

With ``shortlist`` (``shortlist.py``), a check is two stages: the signal over the
logits of a static token shortlist, then, for the rows that pass, over the full
vocabulary; a row is confident only when both say so. A check whose rows all say
"stay" at the first stage costs a few percent of an LM head. The full readout runs
only for rows the policy could let leave: under ``all`` or ``quorum`` a step whose
first stage already keeps it in the stack takes no confirmation
(``ExitStats.full_readouts`` counts the readouts taken).

The full-vocabulary logits of rows that leave are kept (``exit_logits.py``): vLLM
samples from them instead of running the LM head again.

With ``per_token`` and a shortlist, pure-decode steps defer the confirmation
(``deferred.py``): the walker asks ``first_stage`` at each check and ``confirm``
once for every pending row, in the product that also reads the step's sampling logits.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_early_exit.config import EarlyExitConfig
from vllm_early_exit.model_executor.early_exit.deferred import PendingExit
from vllm_early_exit.model_executor.early_exit.exit_logits import ExitLogits
from vllm_early_exit.model_executor.early_exit.heads import ExitHeads
from vllm_early_exit.model_executor.early_exit.policies import make_policy
from vllm_early_exit.model_executor.early_exit.shortlist import Shortlist
from vllm_early_exit.model_executor.early_exit.signals import LayerReading, make_signal
from vllm_early_exit.model_executor.early_exit.stats import ExitStats


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
        return self.of_normed(self.norm(stream))

    def of_normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of rows already through the final norm (what vLLM's ``compute_logits`` reads)."""
        logits = self.logits_processor(self.lm_head, hidden)
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


class ExitDecider:
    """Decides, at a check layer, which rows of a pure-decode step leave there."""

    def __init__(self, config: EarlyExitConfig, num_layers: int, stats: ExitStats) -> None:
        self.enabled = config.enabled
        self.stats = stats
        """Counts the full-vocabulary readouts."""
        self.skip_layers = frozenset(config.skip_layers)
        self.check_layers = config.check_layers_for(num_layers)
        self.threshold = config.threshold
        self.heads = ExitHeads.load(config.heads) if config.heads else None
        self.signal = make_signal(config.signal, self.heads)
        # A threshold no score can fail: every check is a forced exit and reads nothing.
        self.forced = self.signal.always_confident(config.threshold)
        self.policy = make_policy(config.policy, config.quorum)
        self.vocab_top_k = config.vocab_top_k
        self.shortlist = Shortlist(config.shortlist) if config.shortlist else None
        self.exit_logits = ExitLogits()
        self.readout: LogitReadout | None = None
        self._top_tokens: torch.Tensor | None = None
        self._heads_placed = False

    @property
    def defers(self) -> bool:
        """True when ``per_token`` checks may defer their confirmations (``deferred.py``): rows
        leave one by one and the shortlist stage picks the rows a full readout must confirm."""
        return (
            self.policy.per_row
            and self.shortlist is not None
            and self.signal.reads_logits
            and self.vocab_top_k is None
            and not self.forced
        )

    @property
    def needs_previous(self) -> bool:
        """True when the signal reads the stream entering a check layer."""
        return self.signal.needs_previous

    def bind_readout(self, readout: LogitReadout) -> None:
        self.readout = readout

    def begin_step(self) -> None:
        """Forgets the previous step's top-K tokens and kept logits."""
        self._top_tokens = None
        self.exit_logits.begin_step()

    def exit_stream(self, layer: int, stream: torch.Tensor) -> torch.Tensor:
        """The stream a row leaving after ``layer`` is read from: through the layer's head, if any."""
        if self.heads is None:
            return stream
        if not self._heads_placed:
            self.heads.place(stream.device, stream.dtype)
            self._heads_placed = True
        return self.heads.apply(layer, stream)

    def _logits(self, stream: torch.Tensor, rows: torch.Tensor, step_rows: int) -> tuple[torch.Tensor, bool]:
        """The rows' logits, and whether they cover the full vocabulary."""
        if self.vocab_top_k is None:
            self.stats.full_readouts += 1
            return self.readout(stream), True
        if self._top_tokens is None:
            self.stats.full_readouts += 1
            # First check of the step: score the full vocabulary and keep each row's top-K.
            logits = self.readout(stream)
            self._top_tokens = torch.zeros(step_rows, self.vocab_top_k, dtype=torch.long, device=stream.device)
            self._top_tokens[rows] = logits.topk(self.vocab_top_k, dim=-1).indices
            return logits, True
        return self.readout.pruned(stream, self._top_tokens[rows]), False

    def rows_to_exit(
        self,
        layer: int,
        stream: torch.Tensor,
        rows: torch.Tensor,
        *,
        step_rows: int,
        previous: torch.Tensor | None = None,
        thresholds: torch.Tensor | None = None,
        allowed: torch.Tensor | None = None,
        forced: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Boolean mask over ``rows``: the rows that leave after ``layer``; None when the host
        already knows that none does (every row failed the shortlist stage).

        ``stream``: residual stream of ``rows`` (the step's logits rows still
        running, of ``step_rows``); ``previous``: their stream entering the layer
        (for signals that read it); ``thresholds``: their own thresholds (None: the
        engine's); ``allowed``: False for rows that must not leave (None: all may);
        ``forced``: True for rows that reached their depth budget (None: none).
        Leaving rows whose full logits were read have them kept for sampling.
        """
        assert self.readout is not None, "the LM head was not bound to the exit decider"
        read: tuple[torch.Tensor | None, torch.Tensor] | None = None  # (which rows have full logits, those)
        if layer not in self.check_layers:  # a budget layer only
            confident = torch.zeros(rows.shape[0], dtype=torch.bool, device=stream.device)
        elif self.forced and thresholds is None:
            confident = torch.ones(rows.shape[0], dtype=torch.bool, device=stream.device)
        else:
            threshold = self.threshold if thresholds is None else thresholds
            confident, read = self._confident(layer, stream, rows, step_rows, previous, threshold, allowed, forced)
            if confident is None:  # every row stays
                if forced is None:
                    return None
                confident = torch.zeros(rows.shape[0], dtype=torch.bool, device=stream.device)
        if allowed is not None:
            confident = confident & allowed
        if forced is not None:
            confident = confident | forced
        leave = self.policy.rows_to_exit(confident)
        if read is not None:
            read_rows, logits = read
            if read_rows is None:
                self.exit_logits.keep(rows, logits, leave)
            else:
                self.exit_logits.keep(rows[read_rows], logits, leave[read_rows])
        return leave

    def _confident(self, layer, stream, rows, step_rows, previous, threshold, allowed=None, forced=None):
        """The signal's verdict per row (None: every row stays, known on the host), and the
        full logits it read (which rows, the logits)."""
        exit_stream = self.exit_stream(layer, stream) if self.signal.reads_logits else stream
        if self.shortlist is not None:
            confident = self._shortlist_stage(layer, stream, exit_stream, previous, threshold)
            # The confirmation can only take rows away, so the rows the policy would let leave
            # were every first-stage pass confirmed bound what it can decide: only they are read.
            may_leave = confident if allowed is None else confident & allowed
            may_leave = self.policy.rows_to_exit(may_leave if forced is None else may_leave | forced)
            confident = confident & may_leave
            if not bool(confident.any()):  # every row stays: the full readout is spared
                return None, None
            picked = confident.nonzero().squeeze(1)
            stream, exit_stream, rows = stream[picked], exit_stream[picked], rows[picked]
            previous = None if previous is None else previous[picked]
            if isinstance(threshold, torch.Tensor):
                threshold = threshold[picked]
        else:
            picked = None
        full: list[torch.Tensor] = []

        def read_logits() -> torch.Tensor:
            logits, is_full = self._logits(exit_stream, rows, step_rows)
            if is_full:
                full.append(logits)
            return logits

        verdict = self.signal.confident(LayerReading(layer, stream, previous, read_logits), threshold)
        if picked is not None:
            confident = torch.zeros_like(confident)
            confident[picked] = verdict
            verdict = confident
        # ``picked``: which of the rows the full logits belong to (None: all of them).
        return verdict, (picked, full[0]) if full else None

    def _shortlist_stage(self, layer, stream, exit_stream, previous, threshold) -> torch.Tensor:
        """The signal over the shortlist's logits: True for rows that may go on to the full readout."""
        reading = LayerReading(layer, stream, previous, lambda: self.readout.shortlisted(exit_stream, self.shortlist))
        return self.signal.confident(reading, threshold)

    def first_stage(
        self,
        layer: int,
        stream: torch.Tensor,
        previous: torch.Tensor | None = None,
        thresholds: torch.Tensor | None = None,
        allowed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows that pass the shortlist stage after ``layer`` and may leave there
        (boolean ``[rows]``), and the stream their readout reads (through the layer's head)."""
        exit_stream = self.exit_stream(layer, stream)
        threshold = self.threshold if thresholds is None else thresholds
        passing = self._shortlist_stage(layer, stream, exit_stream, previous, threshold)
        return (passing if allowed is None else passing & allowed), exit_stream

    def confirm(
        self, pending: list[PendingExit], final: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """The full-vocabulary confirmation of deferred exits, in one LM-head product.

        Returns, per pending exit, the signal's verdict for its rows and their logits; and the
        logits of ``final`` (rows already through the final norm, read in the same product:
        the step's sampling logits) or None.
        """
        parts = ([] if final is None else [final]) + [self.readout.norm(torch.cat([p.exit_stream for p in pending]))]
        logits = self.readout.of_normed(torch.cat(parts))
        self.stats.full_readouts += 1
        final_logits = None if final is None else logits[: final.shape[0]]
        sizes = [p.rows.shape[0] for p in pending]
        per_exit = list(logits[logits.shape[0] - sum(sizes) :].split(sizes))
        verdicts = [
            self.signal.confident(
                LayerReading(p.layer, p.stream, p.previous, lambda part=part: part),
                self.threshold if p.thresholds is None else p.thresholds,
            )
            for p, part in zip(pending, per_exit)
        ]
        return verdicts, per_exit, final_logits
