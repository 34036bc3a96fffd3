"""The branch chain of a decode step (``early_exit/branches.py``): which branches exist for a
configuration, and which ones a step takes for the flags the host reads. This is the capture
plan the GPU path captures one graph per branch from (``graphs.py``); it is plain Python."""

from __future__ import annotations

from vllm_early_exit.model_executor.early_exit.branches import BranchPlan
from vllm_early_exit.model_executor.early_exit.plan import plan

CHECKS = [20, 22, 24, 26, 28]
ENGINE = plan(0, 30, CHECKS)


def names(branches) -> list[str]:
    return [b.name for b in branches]


def test_one_stage_checks_read_one_flag_per_check():
    chain = BranchPlan.of(ENGINE, pure=True, two_stage=False, certain=False, full_checks=CHECKS)
    assert sorted(names(chain.branches)) == sorted(
        ["run 0-20", "run 21-22", "run 23-24", "run 25-26", "run 27-28", "run 29-29", "finish"]
        + [f"exit {layer}" for layer in CHECKS]
    )
    assert names(chain.walk([True] * 5)) == [
        "run 0-20", "run 21-22", "run 23-24", "run 25-26", "run 27-28", "run 29-29", "finish",
    ]
    assert names(chain.walk([True, True, False])) == ["run 0-20", "run 21-22", "run 23-24", "exit 24"]
    assert chain.flag_reads == 5
    assert all(b.full_readout for b in chain.branches if b.kind == "run" and b.segment.decision)


def test_a_shortlist_gate_opens_a_confirmation():
    chain = BranchPlan.of(ENGINE, pure=True, two_stage=True, certain=False, full_checks=CHECKS)
    assert names(chain.walk([False] * 5)) == [
        "run 0-20", "run 21-22", "run 23-24", "run 25-26", "run 27-28", "run 29-29", "finish",
    ]
    # Gate at 20 opens, some row still runs; gate at 22 opens and every row has left.
    assert names(chain.walk([True, True, True, False])) == [
        "run 0-20", "confirm 20", "run 21-22", "confirm 22", "exit 22",
    ]
    assert chain.flag_reads == 10
    assert sum(b.decisions for b in chain.walk([True, True, True, False])) == 4
    assert [b.full_readout for b in chain.walk([True, False])] == [False, True, False]


def test_a_forced_exit_reads_nothing():
    chain = BranchPlan.of(plan(0, 30, [14]), pure=True, two_stage=True, certain=True)
    assert names(chain.walk([])) == ["run 0-14", "exit 14"]
    assert chain.flag_reads == 0


def test_steps_with_prompt_rows_never_end_early():
    chain = BranchPlan.of(ENGINE, pure=False, two_stage=False, certain=False, full_checks=CHECKS)
    assert chain.flag_reads == 0
    assert "exit" not in {b.kind for b in chain.branches}
    gated = BranchPlan.of(ENGINE, pure=False, two_stage=True, certain=False, full_checks=CHECKS)
    assert gated.flag_reads == 5  # the gates only
    assert names(gated.walk([False, True, False, False, False])) == [
        "run 0-20", "run 21-22", "confirm 22", "run 23-24", "run 25-26", "run 27-28", "run 29-29", "finish",
    ]


def test_a_budget_end_beside_a_shut_gate_lets_its_rows_leave():
    steps = plan(0, 30, [20, 28], extra_points=[24])
    chain = BranchPlan.of(steps, pure=True, two_stage=True, certain=False, full_checks=[20, 28], forced_points=[24, 28])
    # Gate 20 shut, a row runs on after its budget's end at 24, gate 28 shut: the budget rows leave.
    assert names(chain.walk([False, True, False, True])) == [
        "run 0-20", "run 21-24", "run 25-28", "forced 28", "run 29-29", "finish",
    ]
    assert names(chain.walk([False, False])) == ["run 0-20", "run 21-24", "exit 24"]
    assert names(chain.walk([True, True, True, True, False])) == [
        "run 0-20", "confirm 20", "run 21-24", "run 25-28", "confirm 28", "exit 28",
    ]


def test_vocab_pruning_reads_the_full_vocabulary_at_the_first_check_only():
    chain = BranchPlan.of(ENGINE, pure=True, two_stage=False, certain=False, full_checks=[20])
    assert [b.full_readout for b in chain.walk([True] * 5) if b.segment is not None and b.segment.decision] == [
        True, False, False, False, False,
    ]


def test_the_conditional_program_takes_the_branches_the_host_would():
    """Every flag sequence: the predicated straight-line program (one IF node per branch, none
    nested) takes exactly the branches the host's walk takes."""
    import itertools

    from vllm_early_exit.model_executor.early_exit.graphs import MAX_IF_NODES, ConditionalProgram

    chains = {
        "one-stage": BranchPlan.of(ENGINE, pure=True, two_stage=False, certain=False, full_checks=CHECKS),
        "shortlist": BranchPlan.of(ENGINE, pure=True, two_stage=True, certain=False, full_checks=CHECKS),
        "forced": BranchPlan.of(plan(0, 30, [14]), pure=True, two_stage=False, certain=True),
    }
    sizes = {}
    for name, chain in chains.items():
        program = ConditionalProgram.of(chain)
        sizes[name] = program.if_nodes
        program.check_size()
        for flags in itertools.product([False, True], repeat=chain.flag_reads):
            path = list(chain.walk(list(flags)))
            assert program.taken(list(flags)) == path, (name, flags)
    assert sizes == {"one-stage": 11, "shortlist": 16, "forced": 1}
    assert max(sizes.values()) <= MAX_IF_NODES


def test_conditional_nodes_say_why_they_are_missing_here():
    import torch

    from vllm_early_exit.model_executor.early_exit.graphs import conditional_nodes

    available, why = conditional_nodes()
    if not torch.cuda.is_available():
        assert not available and why == "no CUDA device"


def test_captured_steps_are_refused_where_there_is_no_cuda(tiny_llama):
    """``cuda_graphs`` stops start-up with the plugin's message on a machine without CUDA."""
    import pytest
    import torch

    from vllm_early_exit import EarlyExitUnsupportedError

    from .test_settings import _start

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(EarlyExitUnsupportedError, match=r"early_exit.cuda_graphs='branches' is unsupported here: .*not CUDA"):
        _start(tiny_llama, additional_config={"early_exit": {"cuda_graphs": "branches"}})
