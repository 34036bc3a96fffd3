"""``RowState.leave``, the one place a row leaves: everything an exit means, on fixed shapes."""

from __future__ import annotations

import torch

from vllm_early_exit.model_executor.early_exit.requests import RequestTable
from vllm_early_exit.model_executor.early_exit.rows import RowState
from vllm_early_exit.model_executor.early_exit.stats import ExitCounters

LAYERS = 6


def rows_of(num_rows: int, decode: int, pinned: list[int] | None = None) -> RowState:
    counters = ExitCounters(LAYERS, device=torch.device("cpu"))
    settings = RequestTable(8, LAYERS, 0.5, torch.device("cpu")).rows(num_rows, decode)
    hidden = torch.arange(num_rows * 2, dtype=torch.float32).view(num_rows, 2) + 1
    return RowState(
        hidden, torch.arange(num_rows), torch.arange(num_rows) < decode, settings, LAYERS, counters,
        None if pinned is None else torch.tensor(pinned), pure=pinned is None,
    )


def test_rows_that_leave_are_frozen_counted_and_keep_their_logits():
    rows = rows_of(4, decode=3)  # row 3: padding
    stream = rows.stream() * 10
    first = torch.tensor([True, False, True, False])
    logits_1 = torch.full((4, 5), 1.0)
    rows.leave(first, 1, stream, logits_1)
    assert rows.depths.tolist() == [2, 6, 2, 6]
    assert rows.running.tolist() == [False, True, False, False]
    assert rows.keep.squeeze(1).tolist() == [0.0, 1.0, 0.0, 1.0]
    assert torch.equal(rows.hidden_states[first], torch.zeros(2, 2))
    assert torch.equal(rows.residual[first], stream[first])  # held at the stream they left with

    rows.leave(torch.tensor([False, True, False, False]), 3, stream + 1, torch.full((4, 5), 3.0))
    assert rows.depths.tolist() == [2, 4, 2, 6]
    assert not rows.read_flag()
    assert rows.taken.tolist() == [True, True, True, False]
    assert rows.logits[:, 0].tolist() == [1.0, 3.0, 1.0, 0.0]  # row 3 never took any
    rows.finish(counted=True)
    stats = rows.counters.snapshot()
    assert stats.exits_per_layer == [0, 2, 0, 1, 0, 0] and stats.full_depth_tokens == 0
    assert stats.sampled_from_checks == 3


def test_heads_emit_their_stream_and_the_rest_go_the_full_depth():
    rows = rows_of(3, decode=3)
    stream = rows.stream()
    rows.leave(torch.tensor([False, True, False]), 2, stream, None, exit_stream=stream * 0 + 7)
    hidden, residual = rows.finish(counted=True)
    assert residual[1].tolist() == [7.0, 7.0] and hidden[1].tolist() == [0.0, 0.0]
    assert torch.equal(residual[0], rows.residual[0])
    stats = rows.counters.snapshot()
    assert stats.exits_per_layer[2] == 1 and stats.full_depth_tokens == 2 and stats.sampled_from_checks == 0


def test_replayed_rows_leave_at_their_pin_and_are_not_counted_again():
    rows = rows_of(3, decode=3, pinned=[2, -1, -1])
    everyone = torch.tensor([True, True, True])
    assert rows.pin(everyone, 1).tolist() == [False, True, True]
    assert rows.pin(torch.tensor([False, False, False]), 2).tolist() == [True, False, False]
    rows.leave(rows.pin(torch.tensor([False, True, False]), 2), 2, rows.stream())
    assert rows.depths.tolist() == [3, 3, 6]
    assert rows.counters.snapshot().exits_per_layer[2] == 1  # the live row only


def test_request_settings_live_in_buffers_written_when_a_slot_changes():
    from vllm_early_exit.config import RequestEarlyExit

    own = {"b": RequestEarlyExit(threshold=0.7), "c": RequestEarlyExit(max_layers=3), "d": RequestEarlyExit(enabled=False)}
    asked: list[str] = []

    def settings_of(req_id):
        asked.append(req_id)
        return own.get(req_id)

    table = RequestTable(8, LAYERS, 0.5, torch.device("cpu"))
    table.update(["a", "b", "c"], settings_of)
    rows = table.rows(4, decode=3)
    assert rows.thresholds.tolist() == [0.5, 0.699999988079071, 0.5, 0.5]
    assert rows.last_layers.tolist() == [LAYERS, LAYERS, 2, LAYERS] and rows.budget_layers == {2}
    assert rows.own_thresholds and not rows.any_off
    table.update(["a", "b", "c"], settings_of)
    assert asked == ["a", "b", "c"]  # nothing changed: nothing read again
    table.update(["d", "b"], settings_of)  # "d" moved into slot 0, "c" left
    assert asked == ["a", "b", "c", "d"]
    rows = table.rows(2, decode=2)
    assert rows.allowed.tolist() == [False, True] and rows.any_off and rows.budget_layers == frozenset()
    assert table.last_layers[2].item() == LAYERS  # the emptied slot holds the engine's settings
