"""What a decode step asks of the host: aten ops, and the ops that make the host wait for device data.

A CUDA graph holds a step only when nothing in it reads device data on the host
(``.item()``, ``bool(tensor)``, a device-to-host copy) or makes a shape that
depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``,
``unique`` ...): each of those stops the host until the device has caught up,
and a graph cannot replay a shape it did not capture. ``OpCounter`` is a
``TorchDispatchMode`` that counts every aten op and those host-reading ones;
``StepRecorder`` puts it around a model class's ``forward`` and
``compute_logits`` in a real engine (the model must run in the caller's process:
``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and keeps one record per step.

In a compiled engine the recorder also counts the calls of compiled units
(vLLM's ``support_torch_compile`` modules that compile: the early-exit model's
groups and checked groups, its whole stack, plain vLLM's ``LlamaModel``) and
counts no op inside them, so ``ops`` is then the eager aten ops the host runs
outside compiled code: what a step does between its compiled calls. A host read
inside compiled code would have failed compilation (vLLM compiles with
``fullgraph=True``); count an eager engine to see every op.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ALWAYS_READS_HOST = frozenset({
    "nonzero",
    "argwhere",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "equal",
    "bincount",
    "histc",
})
"""Ops whose result (a Python value, or a shape) depends on device data."""

PYTHON_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")
"""``Tensor`` methods that hand device data to Python. In inference mode (where vLLM runs the
model) ``.item()`` and ``bool(t)`` reach no dispatch mode, so they are counted where Python calls them."""

MAY_READ_HOST = frozenset({"index", "_unsafe_index", "index_put", "index_put_", "_index_put_impl_", "repeat_interleave"})
"""Ops that read the host for some arguments: boolean-mask indices, or ``repeat_interleave``
without ``output_size``."""


def _bool_mask(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype in (torch.bool, torch.uint8)
    if isinstance(value, (list, tuple)):
        return any(_bool_mask(v) for v in value)
    return False


def _device_to_host(func_name: str, args: tuple, kwargs: dict) -> bool:
    """A copy from an accelerator to the host (on a CPU-only engine there is none)."""
    if func_name not in ("_to_copy", "copy_"):
        return False
    if func_name == "copy_":
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type != "cpu"
    device = kwargs.get("device")
    return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"


def reads_host(func, args: tuple, kwargs: dict) -> bool:
    """Whether the aten op ``func`` with these arguments makes the host wait for device data
    or gives a shape that depends on it."""
    name = func._schema.name.split("::")[-1]
    if name in ALWAYS_READS_HOST:
        return True
    if name in ("index", "_unsafe_index"):
        return _bool_mask(args[1])
    if name in ("index_put", "index_put_", "_index_put_impl_"):
        return _bool_mask(args[1])
    if name == "repeat_interleave":
        return isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor) and kwargs.get(
            "output_size"
        ) is None
    return _device_to_host(name, args, kwargs)


class OpCounter(TorchDispatchMode):
    """Counts aten ops, and the host-reading ones by name, while it is active: aten ops through
    the dispatcher, the Python-level reads (``PYTHON_READS``) by wrapping those methods."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.compiled_calls = 0
        self.gaps: list[int] = [0]
        """Ops before the first compiled call, between each two, and after the last."""
        self.names: Counter[str] = Counter()
        self.host_reads: Counter[str] = Counter()
        self._saved: dict[str, object] = {}

    def __enter__(self):
        for name in PYTHON_READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._counted(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, original in self._saved.items():
                setattr(torch.Tensor, name, original)
            self._saved.clear()

    def _counted(self, name: str, original):
        counter = self

        @functools.wraps(original)
        def read(tensor, *args, **kwargs):
            counter.host_reads[name.strip("_")] += 1
            counter.names[name.strip("_")] += 1
            with torch.utils._python_dispatch._disable_current_modes():  # counted once, here
                return original(tensor, *args, **kwargs)

        return read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        self.gaps[-1] += 1
        self.names[func._schema.name.split("::")[-1]] += 1
        if reads_host(func, args, kwargs):
            self.host_reads[func._schema.name.split("::")[-1]] += 1
        return func(*args, **kwargs)


@dataclass
class StepRecord:
    """One engine step: its aten ops and host reads (forward and the ``compute_logits`` after it)."""

    pure_decode: bool
    rows: int
    ops: int = 0
    """Aten ops outside compiled units (in an eager engine: every aten op)."""
    host_reads: dict[str, int] = field(default_factory=dict)
    decisions: int | None = None
    """Decision points the early-exit step reached (None for plain vLLM)."""
    compiled_calls: int = 0
    """Calls of compiled units (none in an eager engine)."""
    between: int = 0
    """Ops between the step's first and last compiled call (the host's work between its units)."""
    names: dict[str, int] = field(default_factory=dict)
    """The ops outside compiled units by name, and the Python-level reads."""

    @property
    def total_host_reads(self) -> int:
        return sum(self.host_reads.values())


def pure_decode(model) -> tuple[bool, int]:
    """Whether the step just run was pure decode, and its rows: the early-exit model says so
    itself; for plain vLLM a step whose every request has one token counts."""
    inner = getattr(model, "model", None)
    step = getattr(inner, "last_step", None)
    if step is not None or hasattr(inner, "exit_counters"):
        return (step is not None and step.pure), (0 if step is None else step.rows)
    from vllm_early_exit.model_executor.early_exit.batch import current_step_metadata

    meta = current_step_metadata()
    rows = int(getattr(meta, "num_actual_tokens", 0) or 0)
    return getattr(meta, "max_query_len", None) == 1 and rows > 0, rows


class StepRecorder:
    """Counts the ops of every step of the models of ``model_cls`` built after ``install``."""

    def __init__(self) -> None:
        self.steps: list[StepRecord] = []

    def install(self, model_cls: type) -> None:
        forward, compute_logits = model_cls.forward, model_cls.compute_logits
        recorder = self
        self._install_compiled_units()

        @functools.wraps(forward)
        def counted_forward(model, *args, **kwargs):
            counter = OpCounter()
            with counter:
                out = forward(model, *args, **kwargs)
            pure, rows = pure_decode(model)
            step = getattr(getattr(model, "model", None), "last_step", None)
            recorder.steps.append(
                StepRecord(
                    pure, rows, counter.ops, dict(counter.host_reads), None if step is None else step.decisions,
                    counter.compiled_calls, sum(counter.gaps[1:-1]), dict(counter.names),
                )
            )
            return out

        @functools.wraps(compute_logits)
        def counted_logits(model, *args, **kwargs):
            counter = OpCounter()
            with counter:
                out = compute_logits(model, *args, **kwargs)
            if recorder.steps:
                last = recorder.steps[-1]
                last.ops += counter.ops
                for name, n in counter.names.items():
                    last.names[name] = last.names.get(name, 0) + n
                for name, n in counter.host_reads.items():
                    last.host_reads[name] = last.host_reads.get(name, 0) + n
            return out

        model_cls.forward = counted_forward
        model_cls.compute_logits = counted_logits

    _installed_units = False

    def _install_compiled_units(self) -> None:
        """Wraps the ``__call__`` of vLLM's compiled module classes the step uses: a call of a
        module that compiles counts as a compiled call, and nothing inside it counts as an op."""
        if StepRecorder._installed_units:
            return
        StepRecorder._installed_units = True
        from vllm.model_executor.models.llama import LlamaModel

        from vllm_early_exit.model_executor.early_exit import groups

        # (the units by the names ``groups`` has them under: also in trees older than ``units.py``)
        names = ("LayerGroup", "CheckedGroup", "ConfirmBranch", "ExitBranch", "FullStack")
        units = [getattr(groups, name, None) for name in names]
        for cls in (LlamaModel, *(unit for unit in units if unit is not None)):
            cls.__call__ = self._compiled_call(cls.__call__)

    @staticmethod
    def _compiled_call(call):
        from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode

        @functools.wraps(call)
        def counted(module, *args, **kwargs):
            counter = _get_current_dispatch_mode()
            if not isinstance(counter, OpCounter) or getattr(module, "do_not_compile", True):
                return call(module, *args, **kwargs)
            counter.compiled_calls += 1
            try:
                with _disable_current_modes():
                    return call(module, *args, **kwargs)
            finally:
                counter.gaps.append(0)

        return counted

    def pure_decode_steps(self) -> list[StepRecord]:
        return [s for s in self.steps if s.pure_decode]

    def summary(self) -> dict[str, Any]:
        """Per pure-decode step: mean aten ops, mean and largest host reads, the reads by name."""
        steps = self.pure_decode_steps()
        if not steps:
            return {"steps": 0}
        names: Counter[str] = Counter()
        ops: Counter[str] = Counter()
        for s in steps:
            names.update(s.host_reads)
            ops.update(s.names)
        return {
            "steps": len(steps),
            "ops_per_step": sum(s.ops for s in steps) / len(steps),
            "compiled_calls_per_step": sum(s.compiled_calls for s in steps) / len(steps),
            "ops_between_compiled_calls_per_step": sum(s.between for s in steps) / len(steps),
            "ops_by_name": {k: v / len(steps) for k, v in ops.most_common()},
            "host_reads_per_step": sum(s.total_host_reads for s in steps) / len(steps),
            "max_host_reads": max(s.total_host_reads for s in steps),
            "host_reads_by_name": {k: v / len(steps) for k, v in sorted(names.items())},
            "decisions_per_step": (
                None if steps[0].decisions is None else sum(s.decisions or 0 for s in steps) / len(steps)
            ),
        }
