"""The scheduler of catch-up engines (``skipped_kv: "recompute"``): waiting tokens are given back.

``CatchUpScheduler`` is vLLM's ``Scheduler`` with one change, after each step's output:
for every request whose tokens left the stack early in that step, the runner's output
carries how many of its tokens wait (``rewind.REWIND_ATTRIBUTE``: ``{req_id: w}``, the
rows of the request's group in that step), and ``request.num_computed_tokens`` goes back
by ``w``. vLLM's next ``schedule()`` then gives the request ``w + 1`` tokens (its waiting
tokens and the one just sampled), which the runner takes from its token buffer at their
positions and whose K/V vLLM's attention writes again in their slots. It is the rewind
vLLM does itself for rejected speculative tokens (``update_from_output``): nothing is
freed, no block changes, and ``num_in_flight_tokens`` has already been balanced by the
stock ``update_from_output``. Requests that finished in the step, or that are no longer
running, are not touched.

This module is imported only where vLLM builds the scheduler (the engine core), through
``SchedulerConfig.scheduler_cls`` (``catch_up.py``).
"""

from __future__ import annotations

import logging

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from vllm_early_exit.plugin.rewind import REWIND_ATTRIBUTE

logger = logging.getLogger("vllm_early_exit")


class CatchUpScheduler(Scheduler):
    """vLLM's scheduler; a request's tokens that left early are scheduled again (module docstring)."""

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        waiting = getattr(model_runner_output, REWIND_ATTRIBUTE, None)
        if waiting:
            self.rewind(waiting, scheduler_output.num_scheduled_tokens)
        return outputs

    def rewind(self, waiting: dict[str, int], scheduled: dict[str, int]) -> None:
        """Gives each running request in ``waiting`` back that many computed tokens."""
        for req_id, count in waiting.items():
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished (or preempted) in this step: nothing waits any more
            if not 0 < count <= min(scheduled.get(req_id, 0), request.num_computed_tokens):
                logger.warning(
                    "Early exit: request %s reports %d waiting tokens but ran %d in the step; not rewound.",
                    req_id, count, scheduled.get(req_id, 0),
                )
                continue
            request.num_computed_tokens -= count
