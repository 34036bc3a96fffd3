"""Decode steps run as the conditional-node program a GPU would capture, on the CPU.

``install()`` (in the engine's process, before it starts) replaces the host's walk
of a step's branches (``DecodeStep.run``) with ``graphs.ProgramRun``: every branch
in layer order under its predicate, the predicates computed on the device from
the branches' flags, the engine's counters folded from the device's visit counts.
On a GPU the same program is one CUDA graph whose predicated branches are IF nodes
(``graphs.ConditionalStepGraph``); here ``graphs.host_when`` evaluates each
predicate on the host, so the program's logic runs in a real engine on the CPU.
"""

from __future__ import annotations

ENV = "EARLY_EXIT_TEST_STEP_PROGRAM"


def install() -> None:
    from vllm_early_exit.model_executor.early_exit import graphs
    from vllm_early_exit.model_executor.early_exit.step import DecodeStep

    runs: dict[int, graphs.ProgramRun] = {}

    def run(self, branches, rows, log):
        program = runs.get(id(branches))
        if program is None:
            program = runs[id(branches)] = graphs.ProgramRun(graphs.ConditionalProgram.of(branches), rows.flag.device)
        program.execute(lambda branch: self.work(branch, rows), rows.flag, graphs.host_when)
        for node, taken in zip(program.program.nodes, program.predicates):
            if bool(taken):
                self.count(node.branch, log)
        program.fold(self.counters, rows.pure)
        return rows.output

    DecodeStep.run = run
