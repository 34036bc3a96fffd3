"""The rows of one step on their way down the stack: the one place a row leaves.

Every row of the step stays in it to its end, so every tensor keeps the step's
shape. An update gives new tensors that the rows take (``RowState.take``: a
compiled unit's outputs need no copy); a captured step's rows are *persistent*
and copy them into tensors that keep their addresses from the first layer to the
last, as CUDA graphs captured between decision points need (``graphs.py``). A row
that leaves after layer L is *frozen*: its hidden state becomes 0 and its
residual the stream it left with, and every later segment holds it there
(``kv_fill.run_layers_holding``), so each deeper layer's attention writes its K/V
from that stream, which is what state propagation writes. ``leave_rows`` records
everything an exit means, on the device and for every row at once, tensors in
and out (``RowState.leave`` takes its outputs, a compiled check returns them):
the depth it reached, the frozen stream, the stream it emits (its exit head's),
the logits it is sampled from, and the counters.

Which rows decide: the decode rows that are still running (``running``). Prompt
rows of a mixed step and padding rows never leave. A replayed row of a recompute
after preemption (``pinned >= 0``) leaves exactly after its recorded layer and is
not counted as an exit again. In a catch-up step (``skipped_kv: "recompute"``) a
request's waiting tokens ride along with its new token: they do not decide, leave
when it leaves (``lead``) and are not counted as exits.
"""

from __future__ import annotations

import torch

from vllm_early_exit.model_executor.early_exit.requests import RowSettings
from vllm_early_exit.model_executor.early_exit.stats import ExitCounters


class RowState:
    """Hidden state, residual and the rows' exit bookkeeping of one step (``[rows]`` tensors)."""

    def __init__(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        decode: torch.Tensor,
        settings: RowSettings,
        num_layers: int,
        counters: ExitCounters,
        pinned: torch.Tensor | None = None,
        pure: bool = True,
        leaders: torch.Tensor | None = None,
    ) -> None:
        self.hidden_states = hidden_states.clone()
        self.residual = torch.zeros_like(hidden_states)
        self.positions = positions
        self.settings = settings
        self.counters = counters
        self.pure = pure
        """No prompt row: the stack may end early when no row runs."""
        self.num_layers = num_layers
        self.decode = decode
        """Decode rows (boolean ``[rows]``): the rows that may leave."""
        self.running = decode.clone()
        """Decode rows still running."""
        self.pinned = pinned
        """Per row, the layer after which a replayed row leaves (-1: it decides live); None: none."""
        self.leaders = leaders
        """Per row, the row that decides for it (``[rows]``, long): in a catch-up step, the last row of
        its request's group (``batch.Groups``); None when every row decides for itself."""
        live = decode if pinned is None else decode & (pinned < 0)
        if leaders is not None:
            live = live & (leaders == torch.arange(leaders.shape[0], device=leaders.device))
        self.live = live
        """Decode rows that decide live (counted as exits)."""
        self.depths = torch.full_like(decode, num_layers, dtype=torch.int16)
        """Per row, the depth code of its walk (``replay.py``): last layer run + 1."""
        self.keep = hidden_states.new_ones(hidden_states.shape[0], 1)
        """1.0 for rows that run the next layers, 0.0 for frozen rows."""
        self.previous = torch.empty_like(hidden_states)
        """The stream entering the current check layer, for signals that read it."""
        self.passing = torch.zeros_like(decode)
        """Rows that passed the current check's first stage (a shortlist), waiting for its confirmation."""
        self.flag = torch.zeros((), dtype=torch.bool, device=decode.device)
        """What the host reads after a branch: does any row still run (or pass the first stage)."""
        self.count = torch.zeros((), dtype=torch.long, device=decode.device)
        """After a shortlist's first stage: how many rows its confirmation reads."""
        self.output = torch.empty_like(hidden_states)
        """The stack's output: every row's last stream through the final norm."""
        self.logits: torch.Tensor | None = None
        """Per row, the full-vocabulary logits it left with (``taken``), for sampling."""
        self.taken = torch.zeros_like(decode)
        self.emitted: torch.Tensor | None = None
        """Per row, the stream it emits when it left through an exit head (``emits``)."""
        self.emits = torch.zeros_like(decode)
        self.persistent = False
        """The tensors keep their addresses from step to step (a captured step's rows, ``graphs.py``):
        ``take`` copies into them."""

    def load(self, hidden_states: torch.Tensor, decode: torch.Tensor) -> None:
        """Starts another pure-decode step in these tensors (a captured step's persistent rows):
        its embeddings and its decode rows; every other tensor as a new ``RowState`` has it."""
        self.hidden_states.copy_(hidden_states)
        self.residual.zero_()
        self.decode.copy_(decode)
        self.running.copy_(decode)
        self.depths.fill_(self.num_layers)
        self.keep.fill_(1.0)
        self.passing.zero_()
        self.flag.zero_()
        self.count.zero_()
        self.taken.zero_()
        self.emits.zero_()

    def take(self, **state: torch.Tensor) -> None:
        """New values of the rows' state (by attribute name), from an exit or a compiled unit:
        the tensors themselves, or copied into the persistent ones (where they exist)."""
        for name, value in state.items():
            current = getattr(self, name)
            if self.persistent and current is not None:
                current.copy_(value)
            else:
                setattr(self, name, value)

    def stream(self) -> torch.Tensor:
        """Every row's residual stream, as a new tensor (vLLM's fused add+norm may work in place)."""
        return self.hidden_states + self.residual

    def advance(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> None:
        """The state after a segment's layers."""
        self.hidden_states.copy_(hidden_states)
        self.residual.copy_(residual)

    def deciding(self) -> torch.Tensor:
        """The rows whose vote counts at a decision: decode rows still running that decide live."""
        return self.running & self.live

    def forced(self, layer: int) -> torch.Tensor:
        """Rows whose depth budget ends after ``layer``: they leave whether confident or not."""
        return self.running & (self.settings.last_layers <= layer)

    def pin(self, leave: torch.Tensor, layer: int) -> torch.Tensor:
        """``leave`` with replayed rows leaving exactly after their recorded layer."""
        return pin(leave, self.pinned, self.running, layer)

    @property
    def plain(self) -> bool:
        """A pure-decode step with no replayed rows and no rows that ride along with their group's
        last row (``skipped_kv: "recompute"``): the steps a compiled decision serves."""
        return self.pure and self.pinned is None and self.leaders is None

    def check_inputs(self) -> dict[str, torch.Tensor]:
        """The row tensors every compiled check reads (``units.LAYER_ARGS`` but the positions, and
        ``units.ROW_ARGS``), by name."""
        inputs = {name: getattr(self, name) for name in ("hidden_states", "residual", "keep", "running", "live")}
        return {**inputs, "allowed": self.settings.allowed, "thresholds": self.settings.thresholds}

    def state(self) -> dict[str, torch.Tensor | None]:
        """The tensors an exit updates (``leave_rows``), by attribute name."""
        return {name: getattr(self, name) for name in STATE}

    def leave(
        self,
        leave: torch.Tensor,
        layer: int,
        stream: torch.Tensor,
        logits: torch.Tensor | None = None,
        exit_stream: torch.Tensor | None = None,
        read: torch.Tensor | None = None,
    ) -> None:
        """Rows in ``leave`` (a subset of ``running``) leave after ``layer`` at ``stream``
        (``leave_rows``; its logits are kept in a pure-decode step only). The flag is written in
        place, where a step run as one program reads it (``graphs.ConditionalProgram``)."""
        out = leave_rows(self.state(), self.counters.rows, leave, layer, stream, logits if self.pure else None,
                         exit_stream, read)
        self.flag.copy_(out.pop("flag"))
        self.take(**out)

    def read_flag(self) -> bool:
        """The step's one host read per decision."""
        return bool(self.flag.item())

    def read_count(self) -> int:
        """A shortlist gate's one host read: how many rows its confirmation reads (0: it is shut)."""
        return int(self.count.item())

    def finish(self, counted: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden state and residual at the end of the stack, in vLLM's fused layout (the final
        norm adds them as vLLM's own forward does); rows that left through a head hold its stream.
        ``counted``: the walk reached the last layer, and the rows still running went the full depth."""
        if counted:
            self.counters.full_depth(self.running & self.live)
        return finished(self.hidden_states, self.residual, self.emitted, self.emits)


def finished(
    hidden_states: torch.Tensor, residual: torch.Tensor, emitted: torch.Tensor | None, emits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden state and residual at the end of the stack (``RowState.finish``): rows that left
    through a head (``emits``) hold its stream (``emitted``)."""
    if emitted is None:
        return hidden_states, residual
    column = emits.unsqueeze(1)
    return torch.where(column, 0.0, hidden_states), torch.where(column, emitted, residual)


STATE = ("hidden_states", "residual", "keep", "running", "live", "depths", "logits", "taken", "emitted", "emits")
"""The row tensors an exit reads or updates (``live`` is only read; ``logits`` and ``emitted`` are
None until a first exit keeps some)."""


def pin(leave: torch.Tensor, pinned: torch.Tensor | None, running: torch.Tensor, layer: int) -> torch.Tensor:
    """``leave`` with replayed rows (``pinned >= 0``) leaving exactly after their recorded layer."""
    if pinned is None:
        return leave
    return torch.where(pinned >= 0, running & (pinned == layer), leave)


def lead(leave: torch.Tensor, leaders: torch.Tensor | None) -> torch.Tensor:
    """``leave`` with every row leaving when the row that decides for it does (``RowState.leaders``)."""
    return leave if leaders is None else leave.index_select(0, leaders)


def leave_rows(
    rows: dict[str, torch.Tensor | None],
    counts: torch.Tensor,
    leave: torch.Tensor,
    layer: int,
    stream: torch.Tensor,
    logits: torch.Tensor | None = None,
    exit_stream: torch.Tensor | None = None,
    read: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Everything rows in ``leave`` (a subset of ``running``) leaving after ``layer`` at
    ``stream`` means, as tensors in and out (``rows``: the ``STATE`` tensors; the returned ones
    replace them): their depth, the frozen stream, their emitted stream and sampling logits,
    and ``flag``: does any row still run. The counters (``counts``: ``ExitCounters.rows``) are
    added to in place. The one definition ``RowState.leave`` and the compiled checks
    (``groups.CheckedGroup``) share.

    ``logits``: the full-vocabulary logits read at this layer, of every row or, with ``read``
    (row indices), of those rows: the leaving rows are sampled from theirs (pass None where
    they are not, in a step with prompt rows); ``exit_stream``: every row's stream through
    the layer's exit head (the leaving rows emit theirs)."""
    column = leave.unsqueeze(1)
    running, live = rows["running"] & ~leave, rows["live"]
    out = {
        "depths": rows["depths"].masked_fill(leave, layer + 1),
        "hidden_states": rows["hidden_states"].masked_fill(column, 0.0),
        "residual": torch.where(column, stream, rows["residual"]),
        "keep": rows["keep"].masked_fill(column, 0.0),
        "running": running,
    }
    counts[layer] += (leave & live).sum()
    if exit_stream is not None:
        emitted = rows["emitted"]
        out["emitted"] = torch.where(column, exit_stream, 0.0 if emitted is None else emitted)
        out["emits"] = rows["emits"] | leave
    if logits is not None:
        kept = rows["logits"]
        if read is None:
            out["logits"] = torch.where(column, logits, 0.0 if kept is None else kept)
            taken = leave
        else:
            if kept is None:
                kept = logits.new_zeros(leave.shape[0], logits.shape[1])
            taken = torch.zeros_like(leave).index_fill_(0, read, True) & leave
            chosen = torch.where(taken[read].unsqueeze(1), logits, kept.index_select(0, read))
            out["logits"] = kept.index_copy(0, read, chosen)
        out["taken"] = rows["taken"] | taken
        counts[counts.shape[0] - 1] += (taken & live).sum()
    out["flag"] = running.any()
    return out
