"""Exit logits are the sampling logits.

A row that leaves after a full-vocabulary check already has its next-token logits:
the check read its (exit-head) stream through the final norm and the LM head, which
is what vLLM computes from the hidden state the model returns for it. ``ExitLogits``
keeps those logits for the step, and the model's ``compute_logits`` returns them
instead of running the LM head again; only the other rows take the LM head.
Kept for pure-decode steps only, where the model's row ``i`` is vLLM's logits row ``i``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class ExitLogits:
    """The full-vocabulary logits of the rows that left during one step."""

    def __init__(self) -> None:
        self._rows: list[torch.Tensor] = []
        self._logits: list[torch.Tensor] = []
        self._taken: list[torch.Tensor] = []
        self._from_check: list[bool] = []
        self._num_rows: int | None = None

    def begin_step(self) -> None:
        self._rows.clear()
        self._logits.clear()
        self._taken.clear()
        self._from_check.clear()
        self._num_rows = None

    def keep(self, rows: torch.Tensor, logits: torch.Tensor, taken: torch.Tensor, from_check: bool = True) -> None:
        """``logits[i]`` are the sampling logits of token row ``rows[i]`` where ``taken[i]``
        (the row left). The masks are applied once, when the logits are served: no host
        sync per check. ``from_check`` False: full-depth rows' logits, read with deferred
        confirmations (``deferred.py``), not counted as sampled from a check."""
        self._rows.append(rows)
        self._logits.append(logits)
        self._taken.append(taken)
        self._from_check.append(from_check)

    def seal(self, num_rows: int | None) -> None:
        """Ends the step: its logits serve the next ``compute_logits`` of ``num_rows`` rows
        (None: a step whose rows are not vLLM's logits rows; nothing is served)."""
        self._num_rows = num_rows if self._rows else None

    def logits(
        self, hidden_states: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, int, bool]:
        """The logits of ``hidden_states`` (the step's logits rows): the kept ones, and
        ``compute`` (vLLM's LM head) for the rows that did not leave through a full check.
        Also returns how many rows took a check's logits, and whether ``compute`` ran."""
        num_rows = hidden_states.shape[0]
        if self._num_rows != num_rows:
            self.begin_step()
            return compute(hidden_states), 0, True
        taken = torch.cat(self._taken)
        rows, kept = torch.cat(self._rows)[taken], torch.cat(self._logits)[taken]
        counted = [t if check else torch.zeros_like(t) for t, check in zip(self._taken, self._from_check)]
        from_checks = int(torch.cat(counted).sum())
        self.begin_step()
        covered = torch.zeros(num_rows, dtype=torch.bool, device=hidden_states.device)
        covered[rows] = True
        rest = (~covered).nonzero().squeeze(1)
        out = kept.new_empty(num_rows, kept.shape[-1])
        computed = rest.numel() > 0  # one host sync per step
        if computed:
            out[rest] = compute(hidden_states[rest])
        out[rows] = kept
        return out, from_checks, computed
