"""Where the wall time of a decode step goes, branch by branch.

``StepTimer`` times, around a model class's ``forward`` and ``compute_logits`` in a
real engine (the model in the caller's process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
each part of every step as *exclusive* time (a part's time less that of the parts
inside it), so the parts of a step add up to the step:

* ``compiled segment`` / ``compiled check`` / ``compiled confirm`` / ``compiled stack`` /
  ``compiled model``: the calls of compiled units (``groups.LayerGroup``,
  ``groups.CheckedGroup``, ``units.ConfirmBranch``, the whole stack, plain vLLM's ``LlamaModel``);
* ``read``: the host's reads of a step's flag or count (``RowState.read_flag``,
  ``read_count``): the wait for the device, and on the CPU nothing else;
* ``branch run``, ``branch confirm``, ``branch forced``, ``branch exit``, ``branch
  finish``: the eager work of each kind of branch (``DecodeStep.work``) outside the
  compiled calls inside it;
* ``compute_logits``: the LM head (or the logits the step kept) and vLLM's logits
  processing;
* ``host``: the rest of ``forward`` (the step's inputs, the row state, the walk).

On the CPU every op runs as the host issues it, so the wall time of a part is its
cost. On a GPU the host runs ahead of the device and only ``read`` waits: time
there with ``torch.cuda.synchronize`` around the parts, which this does not do.
"""

from __future__ import annotations

import functools
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from vllm_early_exit.tools.step_ops import pure_decode


@dataclass
class TimedStep:
    """One engine step: seconds and calls per part."""

    pure_decode: bool
    rows: int
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)


_ACTIVE: list["StepTimer"] = []
"""The timer the installed parts time into (the last one installed)."""


class StepTimer:
    """Times the parts of every step of the models of a class built after ``install``."""

    def __init__(self) -> None:
        self.steps: list[TimedStep] = []
        self._stack: list[list] = []  # [name, start, seconds of the parts inside]
        self._seconds: Counter[str] = Counter()
        self._calls: Counter[str] = Counter()

    def install(self, model_cls: type) -> None:
        forward, compute_logits = model_cls.forward, model_cls.compute_logits
        timer = self
        _install_parts()
        _ACTIVE[:] = [self]

        @functools.wraps(forward)
        def timed_forward(model, *args, **kwargs):
            timer._seconds, timer._calls = Counter(), Counter()
            out = timer.time("host", forward, model, *args, **kwargs)
            pure, rows = pure_decode(model)
            timer.steps.append(TimedStep(pure, rows, dict(timer._seconds), dict(timer._calls)))
            return out

        @functools.wraps(compute_logits)
        def timed_logits(model, *args, **kwargs):
            timer._seconds, timer._calls = Counter(), Counter()
            out = timer.time("compute_logits", compute_logits, model, *args, **kwargs)
            if timer.steps:
                last = timer.steps[-1]
                for name, seconds in timer._seconds.items():
                    last.seconds[name] = last.seconds.get(name, 0.0) + seconds
                    last.calls[name] = last.calls.get(name, 0) + timer._calls[name]
            return out

        model_cls.forward = timed_forward
        model_cls.compute_logits = timed_logits

    def time(self, name: str, call, *args, **kwargs):
        """``call(*args, **kwargs)``, its exclusive time counted under ``name``."""
        frame = [name, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            return call(*args, **kwargs)
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - frame[1]
            self._seconds[name] += elapsed - frame[2]
            self._calls[name] += 1
            if self._stack:
                self._stack[-1][2] += elapsed

    def pure_decode_steps(self) -> list[TimedStep]:
        return [s for s in self.steps if s.pure_decode]

    def summary(self, skip: int = 2) -> dict[str, Any]:
        """Per pure-decode step (the first ``skip`` left out): mean milliseconds and calls per
        part, and of the whole step."""
        steps = self.pure_decode_steps()[skip:]
        if not steps:
            return {"steps": 0}
        ms: dict[str, float] = defaultdict(float)
        calls: dict[str, float] = defaultdict(float)
        for s in steps:
            for name, seconds in s.seconds.items():
                ms[name] += 1000 * seconds / len(steps)
                calls[name] += s.calls.get(name, 0) / len(steps)
        order = sorted(ms, key=lambda name: -ms[name])
        return {
            "steps": len(steps),
            "step_ms": sum(ms.values()),
            "ms_per_step": {name: ms[name] for name in order},
            "calls_per_step": {name: calls[name] for name in order},
        }


@functools.cache
def _install_parts() -> None:
    """Wraps the step's parts, once per process: each times into the active timer while one of
    its steps runs."""
    from vllm.model_executor.models.llama import LlamaModel

    from vllm_early_exit.model_executor.early_exit.groups import CompiledStack
    from vllm_early_exit.model_executor.early_exit.rows import RowState
    from vllm_early_exit.model_executor.early_exit.step import DecodeStep

    parts = [
        (CompiledStack, "run", lambda *a: "compiled segment"),
        (CompiledStack, "run_checked", lambda *a: "compiled check"),
        (CompiledStack, "run_all", lambda *a: "compiled stack"),
        (CompiledStack, "run_exit", lambda *a: "compiled exit"),
        (CompiledStack, "run_confirm", lambda *a: "compiled confirm"),
        (RowState, "read_flag", lambda *a: "read"),
        (RowState, "read_count", lambda *a: "read"),
        (DecodeStep, "work", lambda step, branch, *a: f"branch {branch.kind}"),
        (LlamaModel, "__call__", lambda module, *a: None if getattr(module, "do_not_compile", True) else "compiled model"),
    ]
    for cls, attr, name_of in parts:
        if hasattr(cls, attr):  # (a tree of the plugin without exit units has no ``run_exit``)
            setattr(cls, attr, _timed(name_of, getattr(cls, attr)))


def _timed(name_of, call):
    @functools.wraps(call)
    def timed(*args, **kwargs):
        timer = _ACTIVE[0] if _ACTIVE else None
        name = None if timer is None or not timer._stack else name_of(*args)
        if name is None:
            return call(*args, **kwargs)
        return timer.time(name, call, *args, **kwargs)

    return timed
