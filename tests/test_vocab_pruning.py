"""``vocab_top_k``: later checks of a step score only the first check's top-K tokens."""

from __future__ import annotations

import pytest

from vllm_early_exit import EarlyExitConfigError

from .conftest import MIXED, NEW_TOKENS, run_engine
from .test_correctness import exit_counts
from .test_settings import _start


def test_shortlist_covering_the_vocabulary_decides_as_full_scoring(tiny_llama, reference, mixed_traces):
    """K = the whole vocabulary: the pruned path (gathered LM-head rows, batched matmul)
    must give exactly the decisions of full scoring, so the reference's tokens and exits."""
    prompts, traces = mixed_traces
    result = run_engine(tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit={**MIXED, "vocab_top_k": 512})
    assert result["outputs"] == [t.tokens for t in traces]
    assert result["stats"][0]["exits_per_layer"] == exit_counts(traces, reference.num_layers)


def test_small_shortlist_matches_reference_pruning(tiny_llama, reference, mixed_traces):
    """K = 8: the later check (layer 3) reads a softmax over the 8 tokens the layer-1
    check kept, as the reference does; tokens still come from the full vocabulary."""
    prompts, _ = mixed_traces
    layers, threshold = tuple(MIXED["exit_layers"]), MIXED["threshold"]
    traces = [reference.generate(p, NEW_TOKENS, exit_layers=layers, threshold=threshold, vocab_top_k=8) for p in prompts]
    margins = [abs(c - threshold) for t in traces for step in t.confidences for c in step.values()]
    assert min(margins) > 1e-3
    result = run_engine(tiny_llama, [(p, NEW_TOKENS) for p in prompts], early_exit={**MIXED, "vocab_top_k": 8})
    assert result["outputs"] == [t.tokens for t in traces]
    assert result["stats"][0]["exits_per_layer"] == exit_counts(traces, reference.num_layers)
    # Pruning made the layer-3 check more confident than full scoring.
    _, full = mixed_traces
    assert exit_counts(traces, reference.num_layers)[3] > exit_counts(full, reference.num_layers)[3]


def test_vocab_top_k_is_checked_at_start(tiny_llama):
    with pytest.raises(EarlyExitConfigError, match="early_exit.vocab_top_k=100000.*512 tokens"):
        _start(tiny_llama, additional_config={"early_exit": {"vocab_top_k": 100000}})
    with pytest.raises(EarlyExitConfigError, match="early_exit.vocab_top_k=1"):
        _start(tiny_llama, additional_config={"early_exit": {"vocab_top_k": 1}})
