"""Deferred confirmations: per-token exits whose full readout waits for the step's LM head.

With ``policy: "per_token"`` and a ``shortlist``, a row leaves after a check layer
when the signal over the shortlist's logits (the first stage) and then over the
full vocabulary (the confirmation) both say so. A confirmation reads the whole LM
head, and in a batch some row passes the first stage at almost every check: read
at once, each check would cost a full LM head for a few rows. In a pure-decode
step the confirmations wait instead. A row that passes the first stage keeps
running (in a batch the rows go down the stack together, so running costs it
nothing), and its stream at that check is kept as a ``PendingExit``. The pending
exits are confirmed together:

* at the end of the stack, in the same product as the step's sampling logits
  (which vLLM would otherwise compute in ``compute_logits``): the deferred
  confirmations cost no LM head of their own;
* at a check where every running row passed the first stage (the step may end
  there; one row alone always does), or where the pending rows reach the
  step's row count (the end's product then at most doubles).

Each row leaves after the earliest layer whose confirmation passes, exactly as if
every check had confirmed at once. A row whose exit is confirmed later than the
check it leaves at ran the layers between: their K/V, written from the stream it
went on with, is written again from the stream it left with (``KVPropagator.fill``
of its rows), so every layer it did not need holds propagated K/V as after an
immediate exit; its sampling logits are its confirmation's. Rows whose
confirmation fails go on as if they had never passed the first stage.

Steps with replayed rows (``replay.py``), per-request depth budgets or prefill
rows confirm at once, as every other policy does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PendingExit:
    """Rows that passed the first stage after ``layer``, waiting for their confirmation."""

    layer: int
    rows: torch.Tensor
    """Their token rows."""
    stream: torch.Tensor
    """Their residual stream after ``layer`` (what state propagation fills from)."""
    exit_stream: torch.Tensor
    """The stream their readout reads (through the layer's exit head, when heads are set)."""
    previous: torch.Tensor | None
    """Their stream entering ``layer``, for signals that read it."""
    thresholds: torch.Tensor | None
    """Their own thresholds (None: the engine's)."""


@dataclass(frozen=True)
class ConfirmedExit:
    """Rows that leave after ``layer``, with what they leave with."""

    layer: int
    rows: torch.Tensor
    stream: torch.Tensor
    exit_stream: torch.Tensor
    logits: torch.Tensor
    """Their full-vocabulary logits: their sampling logits."""


class DeferredExits:
    """The step's pending exits, in layer order."""

    def __init__(self) -> None:
        self.pending: list[PendingExit] = []
        self.rows = 0
        """How many rows are pending (a row pending at two checks counts twice)."""

    def __bool__(self) -> bool:
        return bool(self.pending)

    def add(self, exit: PendingExit) -> None:
        self.pending.append(exit)
        self.rows += exit.rows.shape[0]

    def take(self) -> list[PendingExit]:
        """The pending exits; none is pending afterwards."""
        pending, self.pending, self.rows = self.pending, [], 0
        return pending


def earliest(
    pending: list[PendingExit], verdicts: list[torch.Tensor], logits: list[torch.Tensor], num_rows: int
) -> list[ConfirmedExit]:
    """Each row's earliest confirmed exit (``verdicts``/``logits`` per pending exit, in layer order;
    ``num_rows``: the step's token rows). Exits without a confirmed row are left out."""
    taken = torch.zeros(num_rows, dtype=torch.bool, device=pending[0].rows.device)
    confirmed = []
    for exit, verdict, exit_logits in zip(pending, verdicts, logits):
        ok = verdict & ~taken[exit.rows]
        picked = ok.nonzero().squeeze(1)  # one host sync per pending exit
        if picked.numel() == 0:
            continue
        rows = exit.rows[picked]
        taken[rows] = True
        confirmed.append(
            ConfirmedExit(exit.layer, rows, exit.stream[picked], exit.exit_stream[picked], exit_logits[picked])
        )
    return confirmed
