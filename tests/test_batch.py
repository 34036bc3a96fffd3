"""Decode-row detection (``early_exit/batch.py``) on every backend's metadata layout.

A row is a decode row only when its request computed its whole prompt before the
step and has one token in it. Metadata objects are vLLM's real classes where they
build on CPU (CPU_ATTN, FlashAttention, Triton); FlashInfer's module needs the
``flashinfer`` package, so a stand-in with the real class's field names is used
(the names are checked against vLLM's source).
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_early_exit.model_executor.early_exit.batch import (
    DecodeBatch,
    Groups,
    current_decode_batch,
    decode_batch,
    decode_groups,
    step_metadata,
)

MAX_REQS = 8


class InputBatch:
    """The fields of the V1 runner's ``InputBatch`` that the detection reads; arrays are
    sized for ``MAX_REQS`` with stale values past the live requests, as after ``condense``."""

    def __init__(self, requests: list[tuple[int, int]], totals: list[int] = ()) -> None:
        """``requests``: (tokens computed before the step, prompt length) per request, in batch order;
        ``totals``: each request's tokens (``num_tokens_no_spec``, read by catch-up engines)."""
        self.req_id_to_index = {f"req-{i}": i for i in range(len(requests))}
        self.num_computed_tokens_cpu = np.full(MAX_REQS, 10_000, dtype=np.int32)
        self.num_prompt_tokens = np.zeros(MAX_REQS, dtype=np.int32)
        self.num_tokens_no_spec = np.full(MAX_REQS, 20_000, dtype=np.int32)
        for i, (computed, prompt) in enumerate(requests):
            self.num_computed_tokens_cpu[i] = computed
            self.num_prompt_tokens[i] = prompt
        self.num_tokens_no_spec[: len(totals)] = totals

    @property
    def req_ids(self) -> list[str]:
        return list(self.req_id_to_index)

    @property
    def num_reqs(self) -> int:
        return len(self.req_id_to_index)


@dataclass
class Step:
    """One step: per request (computed before, prompt length, tokens scheduled), plus padding."""

    requests: list[tuple[int, int, int]]
    padding: int = 0
    cut: tuple[int, ...] = ()
    """Requests whose last row in the step is not sampled (the token budget cut their chunk)."""

    @property
    def lengths(self) -> list[int]:
        return [n for _, _, n in self.requests]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def input_batch(self) -> InputBatch:
        totals = [c + n + (i in self.cut) for i, (c, _, n) in enumerate(self.requests)]
        return InputBatch([(c, p) for c, p, _ in self.requests], totals)

    def query_start_loc(self) -> torch.Tensor:
        # Padded to the runner's request capacity by repeating the last start, as vLLM does.
        starts = np.concatenate([[0], np.cumsum(self.lengths)])
        starts = np.concatenate([starts, np.full(MAX_REQS + 1 - starts.size, starts[-1])])
        return torch.tensor(starts, dtype=torch.int32)

    def common(self) -> dict:
        n = self.num_tokens
        return {
            "num_actual_tokens": n,
            "max_query_len": max(self.lengths),
            "query_start_loc": self.query_start_loc(),
            "max_seq_len": max(c + q for c, _, q in self.requests),
            "seq_lens": torch.tensor([c + q for c, _, q in self.requests], dtype=torch.int32),
            "block_table": torch.zeros(len(self.requests), 4, dtype=torch.int32),
            "slot_mapping": torch.zeros(n + self.padding, dtype=torch.int64),
        }


def build(cls, values: dict):
    """A real metadata dataclass: the layout fields given, other required fields None."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kwargs[f.name] = values[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = None
    return cls(**kwargs)


def cpu_attn(step: Step):
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    return build(CPUAttentionMetadata, step.common())


def flash_attn(step: Step):
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    return build(FlashAttentionMetadata, step.common())


def triton_attn(step: Step):
    from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadata

    return build(TritonAttentionMetadata, step.common())


@dataclass
class FlashInferMetadata:
    """The layout fields of vLLM's ``FlashInferMetadata`` (no ``max_query_len`` or ``query_start_loc``)."""

    num_actual_tokens: int
    slot_mapping: torch.Tensor
    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    num_prefill_tokens: int
    causal: bool = True
    prefill: object = None
    decode: object = None


def flashinfer(step: Step, decode_threshold: int = 1):
    """As FlashInfer's builder splits a reordered batch: leading requests of at most
    ``decode_threshold`` tokens are decodes (one-token prompt chunks included)."""
    lengths = step.lengths
    num_decodes = 0
    while num_decodes < len(lengths) and lengths[num_decodes] <= decode_threshold:
        num_decodes += 1
    decode_tokens = sum(lengths[:num_decodes])
    return FlashInferMetadata(
        num_actual_tokens=step.num_tokens,
        slot_mapping=torch.zeros(step.num_tokens + step.padding, dtype=torch.int64),
        num_decodes=num_decodes,
        num_decode_tokens=decode_tokens,
        num_prefills=len(lengths) - num_decodes,
        num_prefill_tokens=step.num_tokens - decode_tokens,
    )


QUERY_START_LOC_BACKENDS = [cpu_attn, flash_attn, triton_attn]
ALL_BACKENDS = QUERY_START_LOC_BACKENDS + [flashinfer]


def detect(backend, step: Step) -> DecodeBatch | None:
    return decode_batch(backend(step), step.input_batch())


def assert_mixed(batch: DecodeBatch | None, rows: list[int], requests: list[int]) -> None:
    assert batch is not None and not batch.pure
    assert batch.num_tokens == len(rows)
    assert batch.rows.tolist() == rows and batch.rows.dtype == torch.long
    assert batch.requests == tuple(requests)
    assert list(batch.request_indices) == requests


DECODE = (40, 30, 1)  # prompt done, one token: a decode row
PREFIX_HIT = (64, 65, 1)  # all but the last prompt token were prefix-cache hits
LAST_CHUNK = (19, 20, 1)  # the one-token last chunk of a chunked prefill


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_pure_decode_keeps_the_fast_form(backend):
    batch = detect(backend, Step([DECODE, (31, 30, 1), (30, 30, 1)]))
    assert batch == DecodeBatch(3)
    assert batch.pure and list(batch.request_indices) == [0, 1, 2]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("prompt_row", [PREFIX_HIT, LAST_CHUNK])
def test_one_token_prompt_rows_of_a_decode_shaped_step_are_not_decode_rows(backend, prompt_row):
    """max_query_len == 1 yet row 1 is a prompt token: a mixed step without that row."""
    assert_mixed(detect(backend, Step([DECODE, prompt_row, DECODE])), rows=[0, 2], requests=[0, 2])
    assert_mixed(detect(backend, Step([prompt_row, DECODE, DECODE])), rows=[1, 2], requests=[1, 2])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_step_of_one_token_prompt_rows_only_has_no_decode_rows(backend):
    assert detect(backend, Step([PREFIX_HIT])) is None
    assert detect(backend, Step([PREFIX_HIT, LAST_CHUNK])) is None


@pytest.mark.parametrize("backend", QUERY_START_LOC_BACKENDS)
def test_mixed_prefill_and_decode(backend):
    # A 5-token prefill chunk first, then two decode rows, then a one-token last chunk.
    step = Step([(0, 20, 5), DECODE, DECODE, LAST_CHUNK])
    assert_mixed(detect(backend, step), rows=[5, 6], requests=[1, 2])
    step = Step([DECODE, (0, 20, 5), LAST_CHUNK, DECODE])
    assert_mixed(detect(backend, step), rows=[0, 7], requests=[0, 3])


def test_flashinfer_mixed_prefill_and_decode():
    """FlashInfer's batch is reordered decodes first; its one-token prompt chunks count
    as decodes there, and are taken out here."""
    step = Step([DECODE, LAST_CHUNK, DECODE, (0, 20, 5), (3, 9, 6)])
    meta = flashinfer(step)
    assert (meta.num_decodes, meta.num_decode_tokens, meta.num_prefills) == (3, 3, 2)
    assert_mixed(decode_batch(meta, step.input_batch()), rows=[0, 2], requests=[0, 2])
    step = Step([DECODE, DECODE, (0, 20, 5)])
    assert_mixed(detect(flashinfer, step), rows=[0, 1], requests=[0, 1])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_no_decode_rows(backend):
    assert detect(backend, Step([(0, 20, 5), (0, 9, 9)])) is None
    assert detect(backend, Step([(0, 20, 5), PREFIX_HIT])) is None


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_padding_rows_past_num_actual_tokens_are_not_decode_rows(backend):
    assert detect(backend, Step([DECODE, DECODE], padding=6)) == DecodeBatch(2)
    assert_mixed(detect(backend, Step([DECODE, PREFIX_HIT, DECODE], padding=5)), rows=[0, 2], requests=[0, 2])
    if backend is not flashinfer:
        assert_mixed(detect(backend, Step([(0, 20, 5), DECODE], padding=3)), rows=[5], requests=[1])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_speculative_layouts_have_no_decode_rows(backend):
    """Rows of a target model verifying drafts carry several tokens each."""
    kwargs = {"decode_threshold": 3} if backend is flashinfer else {}
    step = Step([(40, 30, 3), (41, 30, 3)])
    assert decode_batch(backend(step, **kwargs), step.input_batch()) is None
    step = Step([(40, 30, 3), DECODE, (41, 30, 2)])
    meta = backend(step, **kwargs)
    if backend is flashinfer:  # one-token rows among multi-token "decodes" cannot be located
        assert decode_batch(meta, step.input_batch()) is None
    else:
        assert_mixed(decode_batch(meta, step.input_batch()), rows=[3], requests=[1])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_without_the_runners_batch_every_step_runs_full_depth(backend):
    """No metadata layout tells a one-token prompt row from a decode row."""
    assert decode_batch(backend(Step([DECODE, DECODE])), None) is None
    assert decode_batch(backend(Step([(0, 20, 5), DECODE])), None) is None


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_metadata_that_disagrees_with_the_batch_runs_full_depth(backend):
    meta = backend(Step([DECODE, DECODE, DECODE]))
    assert decode_batch(meta, Step([DECODE, DECODE]).input_batch()) is None
    assert decode_batch(meta, InputBatch([])) is None


def test_empty_and_dummy_steps():
    assert decode_batch(None, InputBatch([(40, 30)])) is None
    meta = cpu_attn(Step([DECODE]))
    meta.num_actual_tokens = 0
    assert decode_batch(meta, InputBatch([(40, 30)])) is None


def test_entry_point_reads_the_forward_context():
    from vllm.forward_context import ForwardContext, override_forward_context

    step = Step([DECODE, PREFIX_HIT, DECODE])
    meta = cpu_attn(step)

    def under(attn_metadata):
        context = ForwardContext(no_compile_layers={}, attn_metadata=attn_metadata, slot_mapping={})
        with override_forward_context(context):
            return current_decode_batch(step.input_batch())

    assert current_decode_batch(step.input_batch()) is None  # no forward context
    layers = {"model.layers.0.self_attn.attn": meta, "model.layers.1.self_attn.attn": meta}
    assert_mixed(under(layers), rows=[0, 2], requests=[0, 2])
    assert_mixed(under([layers]), rows=[0, 2], requests=[0, 2])
    assert under([layers, layers]) is None  # micro-batches: not mapped to rows
    assert under({}) is None and under(None) is None
    with override_forward_context(ForwardContext(no_compile_layers={}, attn_metadata=layers, slot_mapping={})):
        assert current_decode_batch(None) is None
    assert step_metadata([layers]) is meta


# --- catch-up (skipped_kv: "recompute"): a request's rows [computed, computed + n), its last sampled ---

WAITING = (40, 30, 3)  # two waiting tokens and the new one


def groups(backend, step: Step, max_waiting: int = 4):
    return decode_groups(backend(step), step.input_batch(), max_waiting)


@pytest.mark.parametrize("backend", QUERY_START_LOC_BACKENDS)
def test_catch_up_groups_ride_along_with_their_last_row(backend):
    """A group of 3 beside a prefill chunk, a one-row group and a chunk the budget cut."""
    step = Step([WAITING, (0, 20, 5), DECODE, (50, 30, 2)], cut=(3,))
    batch, capped = groups(backend, step)
    assert capped == ()
    assert_mixed(batch, rows=[0, 1, 2, 8], requests=[0, 0, 0, 2])
    assert batch.groups == Groups(requests=(0, 2), last_rows=(2, 8), sizes=(3, 1))
    assert batch.leaders == (2, 2, 2, 8) and batch.num_live == 2 and batch.groups.rerun_rows == 2
    assert not batch.every_row and not batch.ends_early
    batch, _ = groups(backend, Step([WAITING, DECODE]))
    assert batch.every_row and batch.ends_early and batch.leaders == (2, 2, 2, 3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_catch_up_decode_shaped_steps(backend):
    """One row per request: the pure form (with its groups); a cut one-token chunk runs every layer."""
    batch, capped = groups(backend, Step([DECODE, DECODE]))
    assert batch == DecodeBatch(2, groups=Groups((0, 1), (0, 1), (1, 1))) and batch.pure and capped == ()
    batch, _ = groups(backend, Step([DECODE, DECODE], cut=(0,)))
    assert_mixed(batch, rows=[1], requests=[1])
    assert batch.leaders is None


@pytest.mark.parametrize("backend", QUERY_START_LOC_BACKENDS)
def test_catch_up_recompute_after_preemption_decides_its_last_row(backend):
    """Prompt and generated tokens recomputed in one sampled chunk: the last row is a one-row group;
    a prompt's own prefill (its last row is the prompt's) has none."""
    batch, capped = groups(backend, Step([(32, 40, 20), DECODE]))
    assert capped == ()
    assert_mixed(batch, rows=[19, 20], requests=[0, 1])
    assert batch.groups == Groups((0, 1), (19, 20), (1, 1)) and batch.leaders is None
    assert groups(backend, Step([(0, 40, 40), (32, 40, 8)])) == (None, ())


@pytest.mark.parametrize("backend", QUERY_START_LOC_BACKENDS)
def test_catch_up_groups_past_max_waiting_run_every_layer(backend):
    batch, capped = groups(backend, Step([(40, 30, 5), DECODE]), max_waiting=4)
    assert capped == (5,)
    assert_mixed(batch, rows=[5], requests=[1])
    assert groups(backend, Step([(40, 30, 5)]), max_waiting=4) == (None, (5,))
    assert groups(backend, Step([(40, 30, 5)]), max_waiting=5)[0].groups.sizes == (5,)


def test_the_flashinfer_stand_in_has_the_real_field_names():
    import vllm

    source = Path(vllm.__file__).parent / "v1/attention/backends/flashinfer.py"
    tree = ast.parse(source.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FlashInferMetadata"]
    real = {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)}
    assert {f.name for f in dataclasses.fields(FlashInferMetadata)} <= real
    assert not {"max_query_len", "query_start_loc"} & real
