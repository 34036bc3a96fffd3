"""CUDA graphs of a decode step: one graph per branch, or one graph with conditional nodes.

A pure-decode step is a chain of branches (``branches.py``) that read nothing on
the host and update the step's rows in place (``rows.py``), so each branch can be
captured as it is. Two ways to replay a step, behind one interface (``StepGraphs``):

* ``BranchGraphs``: one CUDA graph per branch; the host replays a branch, reads
  its flag when it has one, and replays the next (one host read per decision).
  Works with every torch, and with tensor parallelism (the collectives sit
  inside the graphs, as in vLLM's own full graphs);
* ``ConditionalStepGraph``: one CUDA graph for the whole step, in which every
  branch is the body of a conditional (IF) node (``ConditionalProgram``): the
  step replays once and reads nothing. Needs torch >= 2.12 (``CUDAGraph.
  begin_capture_to_if_node``), CUDA >= 12.4 and one rank (NCCL collectives do
  not instantiate beside conditional nodes); :func:`conditional_nodes` says
  whether this process has them.

Both capture per batch size, on a persistent ``RowState`` (its tensors keep their
addresses between replays; the step's inputs are copied in before a replay),
from vLLM's graph pool, after every branch has run once eagerly (so nothing is
built or compiled inside a capture).

``ConditionalProgram`` is plain Python: the branches in layer order, each with
the predicate under which the step takes it. A branch's predicate is computed on
the device from the predicates and flags of the branches before it, so no IF
node nests in another and a step has as many IF nodes as branches, less one
(11 for five one-stage checks, 16 with a shortlist; torch 2.12 allows about 31).
``ConditionalProgram.execute`` runs it with any ``when`` (an IF node on a GPU,
a host test on the CPU), which is how the CPU tests check the program.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_early_exit.model_executor.early_exit.branches import EXIT, FINISH, Branch, BranchPlan
from vllm_early_exit.model_executor.early_exit.rows import RowState

MAX_IF_NODES = 31
"""Conditional nodes one capture may hold (torch 2.12)."""


def conditional_nodes() -> tuple[bool, str]:
    """Whether this process can capture conditional (IF) nodes, and if not, why."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if not hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node"):
        return False, f"torch {torch.__version__} has no CUDA graph conditional nodes (they need torch >= 2.12)"
    if torch.version.cuda is not None and tuple(int(x) for x in torch.version.cuda.split(".")[:2]) < (12, 4):
        return False, f"CUDA {torch.version.cuda} has no conditional nodes (they need CUDA >= 12.4)"
    return True, ""


@dataclass(frozen=True)
class Node:
    """A branch of the program, and the predicates it feeds: ``(successor index, polarity)``;
    polarity None: taken whenever this branch is, True / False: when its flag is."""

    index: int
    branch: Branch
    successors: tuple[tuple[int, bool | None], ...]


@dataclass(frozen=True)
class ConditionalProgram:
    """A branch chain as straight-line code of predicated branches (see the module docstring)."""

    nodes: tuple[Node, ...]

    @classmethod
    def of(cls, chain: BranchPlan) -> ConditionalProgram:
        branches = chain.branches  # in layer order: a branch before every branch it leads to
        assert branches[0] is chain.start, "the chain starts at its first segment"
        index = {id(b): i for i, b in enumerate(branches)}
        nodes = []
        for i, branch in enumerate(branches):
            successors = []
            if branch.reads_flag:
                for polarity, successor in ((True, branch.on_true), (False, branch.on_false)):
                    if successor is not None:
                        successors.append((index[id(successor)], polarity))
            elif branch.on_true is not None:
                successors.append((index[id(branch.on_true)], None))
            assert all(j > i for j, _ in successors), "a branch feeds only later branches"
            nodes.append(Node(i, branch, tuple(successors)))
        return cls(tuple(nodes))

    @property
    def if_nodes(self) -> int:
        return len(self.nodes) - 1

    def check_size(self) -> None:
        if self.if_nodes > MAX_IF_NODES:
            raise ValueError(
                f"a step of {len(self.nodes)} branches needs {self.if_nodes} conditional nodes, "
                f"more than the {MAX_IF_NODES} one CUDA graph capture allows; use fewer check layers"
            )

    def execute(
        self,
        take: Callable[[Branch], None],
        flag: torch.Tensor,
        when: Callable[[torch.Tensor, Callable[[], None]], None],
        predicates: list[torch.Tensor],
    ) -> None:
        """Runs the program: ``take(branch)`` under ``when(predicate, body)``; ``flag`` is the
        rows' flag each branch writes; ``predicates``: one bool scalar per node (device tensors
        allocated before any conditional body), set here."""
        for predicate in predicates:
            predicate.zero_()
        predicates[0].fill_(True)
        for node in self.nodes:
            entered = predicates[node.index]
            if node.index == 0:
                take(node.branch)
            else:
                when(entered, lambda branch=node.branch: take(branch))
            for successor, polarity in node.successors:
                condition = entered if polarity is None else entered & (flag if polarity else ~flag)
                predicates[successor] |= condition

    def taken(self, flags: list[bool]) -> list[Branch]:
        """The branches the program takes when the flags read in order are ``flags`` (host
        emulation, as ``BranchPlan.walk`` walks them)."""
        flags, path = iter(flags), []
        entered = [node.index == 0 for node in self.nodes]
        for node in self.nodes:
            if not entered[node.index]:
                continue
            path.append(node.branch)
            value = next(flags) if node.branch.reads_flag else None
            for successor, polarity in node.successors:
                entered[successor] |= polarity is None or polarity == value
        return path


def host_when(predicate: torch.Tensor, body: Callable[[], None]) -> None:
    """``when`` for running a program on the host: the body runs if the predicate holds."""
    if bool(predicate.item()):
        body()


class ProgramRun:
    """A ``ConditionalProgram`` with its predicates, and on the device how many steps took
    each branch (``visits``): what the host counts itself when it walks the branches."""

    def __init__(self, program: ConditionalProgram, device: torch.device) -> None:
        self.program = program
        self.predicates = [torch.zeros((), dtype=torch.bool, device=device) for _ in program.nodes]
        self.visits = torch.zeros(len(program.nodes), dtype=torch.long, device=device)

    def execute(self, take: Callable[[Branch], None], flag: torch.Tensor, when) -> None:
        self.program.execute(take, flag, when, self.predicates)
        self.visits += torch.stack(self.predicates).long()

    def fold(self, counters, pure: bool) -> None:
        """Adds the steps' counts to ``counters`` (one copy) and starts counting again."""
        visits = self.visits.tolist()
        self.visits.zero_()
        for node, count in zip(self.program.nodes, visits):
            branch = node.branch
            counters.full_readouts += count * branch.full_readout
            if branch.kind == EXIT:
                counters.step_exits_per_layer[branch.layer] += count
            elif branch.kind == FINISH and pure:
                counters.full_depth_steps += count


class StepGraphs(ABC):
    """Captured decode steps of one batch size: ``capture`` once, then ``replay`` per step."""

    @abstractmethod
    def capture(self, chain: BranchPlan, take: Callable[[Branch], None], rows, pool) -> None:
        """Runs every branch of ``chain`` once eagerly (``take``), then captures it on ``rows``."""

    @abstractmethod
    def replay(self, rows) -> torch.Tensor:
        """One step on ``rows`` (its inputs loaded): the stack's output."""


class BranchGraphs(StepGraphs):
    """One CUDA graph per branch, the host reading the flags between them."""

    def __init__(self) -> None:
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.chain: BranchPlan | None = None

    def capture(self, chain: BranchPlan, take: Callable[[Branch], None], rows, pool) -> None:
        self.chain = chain
        for branch in chain.branches:  # warm every branch eagerly first
            take(branch)
        torch.cuda.synchronize()
        for branch in chain.branches:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                take(branch)
            self.graphs[id(branch)] = graph

    def replay(self, rows, on_branch: Callable[[Branch], None] = lambda b: None) -> torch.Tensor:
        branch = self.chain.start
        while branch is not None:
            on_branch(branch)
            self.graphs[id(branch)].replay()
            branch = branch.next(rows.read_flag() if branch.reads_flag else None)
        return rows.output


class ConditionalStepGraph(StepGraphs):
    """The whole step as one CUDA graph whose branches are conditional nodes (no host read).

    The host's counts of a step (where it stopped, the readouts it took) are counted on the
    device (``ProgramRun.visits``) and folded into the counters when they are read."""

    def __init__(self) -> None:
        self.graph: torch.cuda.CUDAGraph | None = None
        self.run: ProgramRun | None = None

    def capture(self, chain: BranchPlan, take: Callable[[Branch], None], rows, pool) -> None:
        available, why = conditional_nodes()
        if not available:
            raise RuntimeError(f"conditional CUDA graph nodes are not available: {why}")
        program = ConditionalProgram.of(chain)
        program.check_size()
        self.run = ProgramRun(program, rows.flag.device)
        for branch in chain.branches:  # warm every branch eagerly first
            take(branch)
        torch.cuda.synchronize()

        def when(predicate: torch.Tensor, body: Callable[[], None]) -> None:
            graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
            graph.begin_capture_to_if_node(predicate)
            try:
                body()
            finally:
                graph.end_capture_to_conditional_node()

        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.run.execute(take, rows.flag, when)

    def replay(self, rows) -> torch.Tensor:
        self.graph.replay()
        return rows.output


class GraphedSteps:
    """A model's captured decode steps, by vLLM's batch descriptor (one per captured batch size).

    Called (``plugin/graphs.py``) where vLLM would replay its full CUDA graph of the model: for
    a uniform decode batch, on vLLM's persistent inputs and attention metadata. The first call
    per descriptor (vLLM's capture phase) captures the step's branches on persistent rows
    (``mode``: ``"branches"``, one graph per branch; ``"conditional"``, one graph with IF nodes)
    and the full-depth forward as one graph. Later calls prepare the step on the host
    (``prepare_step``) and replay: the branches when the step is the captured kind (pure
    decode, no depth budget or replayed row, the same forced-exit certainty), the full-depth
    graph when every row runs every layer, else the step runs uncaptured (as it would without
    graphs).
    """

    MODES = ("branches", "conditional")

    def __init__(self, model, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(f"early-exit CUDA graphs {mode!r} is invalid: allowed values are {list(self.MODES)}")
        self.model = model
        self.mode = mode
        self.entries: dict = {}

    def __call__(self, descriptor, pool, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        entry = self.entries.get(descriptor)
        if entry is None:
            entry = self.entries[descriptor] = self._capture(pool, input_ids, positions, intermediate_tensors, **kwargs)
        model = self.model
        step = model.prepare_step(positions)
        if step is None:
            entry["full"].replay()
            return entry["full_output"]
        batch, settings = step
        rows: RowState = entry["rows"]
        step_kind = batch.pure and batch.pinned is None and not settings.budget_layers
        if not step_kind or model.decode_step.certain_of(settings) != entry["certain"]:
            return model.run_step(step, input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        rows.load(model.embed_input_ids(input_ids), torch.arange(positions.shape[0], device=positions.device) < batch.num_tokens)
        graphs: StepGraphs = entry["graphs"]
        decode_step = model.decode_step

        def replay(log):
            if isinstance(graphs, BranchGraphs):
                return graphs.replay(rows, lambda branch: (decode_step.count(branch, log), decode_step.tally(branch, True)))
            return graphs.replay(rows)

        return model.walk(batch, rows, replay)

    def _capture(self, pool, input_ids, positions, intermediate_tensors, **kwargs) -> dict:
        from vllm.compilation.monitor import validate_cudagraph_capturing_enabled

        validate_cudagraph_capturing_enabled()
        model = self.model
        rows = model.capture_rows(input_ids, positions)
        rows.persistent = True  # every branch writes into these tensors, as the graphs replay them
        chain = model.decode_step.branches(model.engine_plan, rows, frozenset())
        graphs: StepGraphs = BranchGraphs() if self.mode == "branches" else ConditionalStepGraph()
        graphs.capture(chain, lambda branch: model.decode_step.work(branch, rows), rows, pool)
        if isinstance(graphs, ConditionalStepGraph):
            model.exit_counters.sources.append(lambda counters: graphs.run.fold(counters, True))
        full = torch.cuda.CUDAGraph()
        model._full_depth(input_ids, positions, intermediate_tensors, None, **kwargs)  # warm it up
        with torch.cuda.graph(full, pool=pool):
            output = model._full_depth(input_ids, positions, intermediate_tensors, None, **kwargs)
        return {
            "rows": rows, "graphs": graphs, "certain": model.decode_step.certain(rows),
            "full": full, "full_output": output,
        }
