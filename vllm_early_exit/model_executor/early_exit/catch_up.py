"""What the model tells the scheduler after a catch-up step: which requests' tokens wait.

In an engine with ``skipped_kv: "recompute"`` a decode token that leaves the stack early
does not get its deeper layers' K/V; it waits. Its request's group in a step
(``batch.Groups``: its waiting tokens and its new one) leaves after the layer its last row
leaves at, so when that row leaves early every row of the group waits, and the scheduler
gives the request those rows back (``plugin/scheduler.py``): its next step runs them again
with the new token, from layer 0, until a step takes the group through every layer.

``WaitingTokens`` keeps the last step's groups with their last rows' depth codes on the
device (no host read during the step) and hands ``{req_id: rows}`` over once, when the
runner builds the step's output (``plugin/rewind.py``); by then the sampler has read the
device, so the copy waits for nothing.
"""

from __future__ import annotations

import torch


class WaitingTokens:
    """The requests whose group left early in the last step, with how many of their tokens wait."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._step: tuple[list[str], tuple[int, ...], torch.Tensor] | None = None

    def clear(self) -> None:
        """A new step began: nothing of the last one is reported any more."""
        self._step = None

    def note(self, req_ids: list[str], sizes: tuple[int, ...], depths: torch.Tensor) -> None:
        """The step's groups: their requests' ids, their rows and their last rows' depth codes
        (last layer run + 1; the model's depth when the group ran every layer)."""
        self._step = (req_ids, sizes, depths)

    def take(self) -> dict[str, int]:
        """``{req_id: waiting tokens}`` of the last step, once."""
        step, self._step = self._step, None
        if step is None:
            return {}
        req_ids, sizes, depths = step
        return {
            req_id: size for req_id, size, depth in zip(req_ids, sizes, depths.tolist()) if depth < self.num_layers
        }
