"""Early-exit settings: parsed from a table of fields and checked here.

Users pass the settings as the ``early_exit`` entry of vLLM's
``additional_config`` (offline ``LLM(..., additional_config={"early_exit": {...}})``,
or ``--additional-config`` / ``--early-exit-config`` on the command line).
:meth:`EarlyExitConfig.from_dict` checks every field against ``FIELDS`` (type,
allowed values, message) and then the rules that join two fields; the layer
indices are checked against the model's depth in :meth:`EarlyExitConfig.exit_layers_for`.
Checks that need the loaded model config or the engine settings (model type,
heads against the model's shape, parallelism) are in ``plugin/checks.py``. All
of them run at engine start-up, before any request is served. A request's own
settings (``RequestEarlyExit``) are checked when the request is made.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from vllm_early_exit.errors import EarlyExitConfigError, EarlyExitUnsupportedError

__all__ = ["CONFIG_KEY", "EarlyExitConfig", "EarlyExitConfigError", "EarlyExitUnsupportedError", "RequestEarlyExit"]

CONFIG_KEY = "early_exit"

# Signal name -> how ``threshold`` is read for it.
SIGNALS: dict[str, str] = {
    "max_prob": "exit when the top-1 probability >= threshold (0 <= threshold <= 1)",
    "margin": "exit when top-1 minus top-2 probability >= threshold (0 <= threshold <= 1)",
    "entropy": "exit when the entropy of the distribution (nats) <= threshold (threshold >= 0)",
    "saturation": "exit when the cosine similarity of this layer's residual stream and the previous "
    "layer's >= threshold (-1 <= threshold <= 1); needs no LM-head product",
    "head": "exit when the trained exit head's top-1 probability >= threshold (0 <= threshold <= 1); "
    "needs `heads`",
    "gate": "exit when the trained gate's probability that this layer's token is the final one "
    ">= threshold (0 <= threshold <= 1); needs `heads` trained with gates",
}

# Signal -> (lowest, highest threshold, what the message says).
_PROBABILITY = (0.0, 1.0, "it must lie in [0, 1]")
THRESHOLD_RANGES: dict[str, tuple[float, float, str]] = {
    "max_prob": _PROBABILITY,
    "margin": _PROBABILITY,
    "head": _PROBABILITY,
    "gate": _PROBABILITY,
    "saturation": (-1.0, 1.0, "(a cosine similarity) it must lie in [-1, 1]"),
    "entropy": (0.0, math.inf, "it must be >= 0 (nats)"),
}
# Signals that read a trained heads folder.
HEAD_SIGNALS = ("head", "gate")

POLICIES: dict[str, str] = {
    "all": "the step leaves at a layer only when every logits row is confident there",
    "quorum": "the step leaves when at least a share `quorum` of the rows is confident",
    "per_token": "each confident row leaves on its own; the other rows go on",
}


def _fail(key: str, value: Any, allowed: str) -> EarlyExitConfigError:
    return EarlyExitConfigError(f"early_exit.{key}={value!r} is invalid: {allowed}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_layer_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(_is_int(x) and x >= 0 for x in value)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _layers(value: Any) -> tuple[int, ...] | None:
    return None if value is None else tuple(sorted(set(value)))


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Field:
    """One setting: its default, the check of a given value, what the error says is allowed, its conversion."""

    name: str
    default: Any
    valid: Callable[[Any], bool]
    allowed: str
    convert: Callable[[Any], Any] = _same


FIELDS: tuple[Field, ...] = (
    Field("enabled", True, lambda v: isinstance(v, bool), "expected true or false"),
    Field("signal", "max_prob", lambda v: v in SIGNALS, f"allowed values are {sorted(SIGNALS)}"),
    Field("threshold", 0.9, lambda v: _is_number(v) and math.isfinite(v), "expected a finite number", float),
    Field("min_layer", None, _optional(lambda v: _is_int(v) and v >= 0), "expected a layer index >= 0"),
    Field(
        "exit_layers", None, _optional(_is_layer_list),
        "expected a list of layer indices >= 0 ([]: no exit checks)", _layers,
    ),
    Field("policy", "all", lambda v: v in POLICIES, f"allowed values are {sorted(POLICIES)}"),
    Field("quorum", 0.75, lambda v: _is_number(v) and 0.0 < v <= 1.0, "expected a share in (0, 1]", float),
    Field(
        "log_interval_s", 10.0, lambda v: _is_number(v) and v >= 0,
        "expected seconds >= 0 (0 turns logging off)", float,
    ),
    Field(
        "vocab_top_k", None, _optional(lambda v: _is_int(v) and v >= 2),
        "expected a number of tokens >= 2, or null for the full vocabulary",
    ),
    Field(
        "heads", None, _optional(lambda v: isinstance(v, str) and bool(v)),
        "expected the path of a heads folder (from `train-heads`)",
        lambda v: None if v is None else str(Path(v).expanduser()),
    ),
    Field(
        "shortlist", None, _optional(lambda v: isinstance(v, str) and bool(v)),
        "expected the path of a shortlist file (from `python -m vllm_early_exit shortlist`)",
        lambda v: None if v is None else str(Path(v).expanduser()),
    ),
    Field("skip_layers", (), _is_layer_list, "expected a list of layer indices >= 0", _layers),
    Field(
        "compile", None, _optional(lambda v: isinstance(v, bool)),
        "expected true, false, or null (on CPU, compile unless the engine runs with enforce_eager)",
    ),
    Field(
        "max_exit_batch", None, _optional(lambda v: _is_int(v) and v >= 1),
        "expected a number of decode rows >= 1, or null to check steps of any size",
    ),
)


def _check_together(values: dict[str, Any], given: Mapping[str, Any]) -> None:
    """The rules that join two settings (``values``: converted; ``given``: what the user set)."""
    signal, threshold = values["signal"], values["threshold"]
    low, high, rule = THRESHOLD_RANGES[signal]
    if not low <= threshold <= high:
        raise _fail("threshold", given.get("threshold", threshold), f"for signal {signal!r} {rule}")
    if values["exit_layers"] is not None and values["min_layer"] is not None:
        raise EarlyExitConfigError(
            "early_exit.min_layer and early_exit.exit_layers are exclusive: "
            "give the first layer or the list of layers, not both."
        )
    if "quorum" in given and values["policy"] != "quorum":
        raise _fail("quorum", given["quorum"], "it only applies with policy 'quorum'")
    if values["shortlist"] is not None:
        if signal in ("saturation", "gate"):
            raise _fail(
                "shortlist", given["shortlist"],
                f"a shortlist is the first stage of a logit signal (max_prob, margin, entropy, head); "
                f"signal {signal!r} does not read it",
            )
        if values["vocab_top_k"] is not None:
            raise EarlyExitConfigError(
                "early_exit.shortlist and early_exit.vocab_top_k are exclusive: both prune the vocabulary "
                "of a check; choose one."
            )
        from vllm_early_exit.model_executor.early_exit.shortlist import read_shortlist

        read_shortlist(values["shortlist"])  # a clear error when the file is not a shortlist
    heads = values["heads"]
    if heads is None and signal in HEAD_SIGNALS:
        raise _fail("signal", signal, "it reads trained heads: set early_exit.heads to a folder from `train-heads`")
    if heads is not None:
        from vllm_early_exit.model_executor.early_exit.heads import read_metadata

        meta = read_metadata(Path(heads))  # a clear error when the folder is not a heads folder
        if signal == "gate" and not meta.get("gate_layers"):
            raise _fail(
                "signal", signal,
                f"the heads in {given['heads']!r} were trained without gates (train-heads without --no-gates)",
            )


@dataclass(frozen=True)
class EarlyExitConfig:
    """Validated early-exit settings (one attribute per entry of ``FIELDS``).

    Attributes:
        enabled: run exit checks at all. ``False`` gives plain full-depth decoding.
        signal: confidence signal read from a layer's residual stream through the
            final norm and the shared LM head (see ``SIGNALS``).
        threshold: confidence threshold; its meaning depends on ``signal``.
        min_layer: first layer (0-based) where checks run when ``exit_layers`` is
            not given. Default: half the stack.
        exit_layers: layers (0-based) after which checks run. Default: every layer
            from ``min_layer`` to the second-to-last.
        policy: how per-row confidence becomes a decision for the step (see ``POLICIES``).
        quorum: share of rows that must be confident, for ``policy="quorum"``.
        log_interval_s: seconds between the engine's early-exit log lines (0: never).
        vocab_top_k: dynamic vocabulary pruning: the first check of a step keeps each
            row's top-K tokens and later checks score only those. None: full vocabulary.
        heads: folder of trained exit heads (``train-heads``). Check layers then read
            their stream through their head, and a row that leaves emits its head's token.
        shortlist: a token shortlist file (``shortlist`` command): checks first read the
            signal over these tokens' logits, and only rows that pass read the full
            vocabulary to confirm (``model_executor/early_exit/shortlist.py``).
        skip_layers: layers (0-based) that every decode token skips; their K/V is
            filled from the residual stream that passes them.
        compile: compile the layers between decision points as groups
            (``model_executor/early_exit/groups.py``) with vLLM's torch.compile, and on
            CUDA capture them as piecewise CUDA graphs. False: the model runs eagerly.
            None (the default): on CPU, as vLLM does, compile unless the engine runs
            with ``enforce_eager``; on other platforms run eagerly (compiled groups are
            not measured there yet).
        max_exit_batch: the most decode rows a step may have for its checks to run;
            a larger step runs the full depth with no check, as plain vLLM would (a
            step reads each layer once for all its rows, so with many rows few steps
            leave early and the checks cost more than they save). Optional: a
            request's tokens then depend on how many requests decode beside it.
            None (the default): check steps of any size.
    """

    enabled: bool = True
    signal: str = "max_prob"
    threshold: float = 0.9
    min_layer: int | None = None
    exit_layers: tuple[int, ...] | None = None
    policy: str = "all"
    quorum: float = 0.75
    log_interval_s: float = 10.0
    vocab_top_k: int | None = None
    heads: str | None = None
    shortlist: str | None = None
    skip_layers: tuple[int, ...] = ()
    compile: bool | None = None
    max_exit_batch: int | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "EarlyExitConfig":
        """Parses and checks a settings dict (``None`` or ``{}`` gives the defaults)."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise EarlyExitConfigError(
                f"early_exit settings must be a JSON object (dict), got {type(raw).__name__}."
            )
        known = [f.name for f in FIELDS]
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise EarlyExitConfigError(f"unknown early_exit setting(s) {unknown}; allowed keys are {sorted(known)}.")
        values: dict[str, Any] = {}
        for field in FIELDS:
            value = raw.get(field.name, field.default)
            if not field.valid(value):
                raise _fail(field.name, value, field.allowed)
            values[field.name] = field.convert(value)
        _check_together(values, raw)
        return cls(**values)

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> "EarlyExitConfig":
        """Reads the ``early_exit`` entry of vLLM's ``additional_config``."""
        return cls.from_dict((additional_config or {}).get(CONFIG_KEY))

    @classmethod
    def from_cli_value(cls, value: str, option: str = "--early-exit-config") -> dict[str, Any]:
        """A command-line settings value (``option``): inline JSON, or the path of a JSON file.

        Returns the raw dict after checking it, so it can travel in ``additional_config``.
        """
        text = value.strip()
        if not text.startswith("{"):
            try:
                with open(text, encoding="utf-8") as f:
                    text = f.read()
            except OSError as exc:
                raise EarlyExitConfigError(
                    f"{option} {value!r}: not inline JSON and not a readable file ({exc.strerror})."
                ) from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EarlyExitConfigError(f"{option} {value!r}: invalid JSON ({exc}).") from None
        cls.from_dict(raw)
        return raw

    @property
    def may_compile(self) -> bool:
        """Whether the layer groups compile when the engine compiles (``compile`` not false; the
        start-up checks run ``compile: null`` eagerly where it is not the default)."""
        return self.enabled and self.compile is not False

    def exit_layers_for(self, num_layers: int) -> tuple[int, ...]:
        """The layers after which checks run, checked against the model's depth.

        A check after the last layer would save nothing, so the last allowed
        index is ``num_layers - 2``.
        """
        last = num_layers - 2
        if self.skip_layers and self.skip_layers[-1] >= num_layers:
            raise _fail(
                "skip_layers", list(self.skip_layers),
                f"this model has {num_layers} layers, so skipped layers must lie in [0, {num_layers - 1}]",
            )
        if self.exit_layers is not None:
            bad = [x for x in self.exit_layers if x > last]
            if bad:
                raise _fail(
                    "exit_layers", list(self.exit_layers),
                    f"this model has {num_layers} layers, so exit layers must lie in [0, {last}]",
                )
            return self.exit_layers
        first = num_layers // 2 if self.min_layer is None else self.min_layer
        if first > last:
            raise _fail(
                "min_layer", self.min_layer,
                f"this model has {num_layers} layers, so min_layer must lie in [0, {last}]",
            )
        return tuple(range(first, last + 1))

    def check_layers_for(self, num_layers: int) -> frozenset[int]:
        """The layers where a check runs: the exit layers, less the skipped ones
        (a skipped layer leaves the stream as it was)."""
        return frozenset(self.exit_layers_for(num_layers)) - frozenset(self.skip_layers)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.exit_layers is not None:
            data["exit_layers"] = list(self.exit_layers)
        data["skip_layers"] = list(self.skip_layers)
        return {k: v for k, v in data.items() if v is not None and v != []}


assert [(f.name, f.default) for f in fields(EarlyExitConfig)] == [
    (f.name, f.convert(f.default)) for f in FIELDS
], "FIELDS and EarlyExitConfig must list the same settings with the same defaults"


FLAT_REQUEST_KEYS = {
    "early_exit_enabled": "enabled",
    "early_exit_threshold": "threshold",
    "early_exit_max_layers": "max_layers",
}
REQUEST_KEYS = sorted(FLAT_REQUEST_KEYS.values())


def _flag(key: str, value: Any) -> bool:
    """true/false, also as 1/0 or "true"/"false" (the OpenAI API's vllm_xargs carry no booleans)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise EarlyExitConfigError(f"{key}={value!r} is invalid: expected true or false.")


@dataclass(frozen=True)
class RequestEarlyExit:
    """One request's own early-exit settings, from ``SamplingParams.extra_args``.

    Offline: ``extra_args={"early_exit": {"enabled": False}}`` or
    ``{"early_exit": {"threshold": 0.5}}``. Through the OpenAI API, whose
    ``vllm_xargs`` hold only flat values: ``"vllm_xargs": {"early_exit_enabled": false}``
    or ``{"early_exit_threshold": 0.5}``; the flat keys also work offline.
    ``enabled: false`` keeps every step this request is in at full depth, so its
    greedy output is token-identical to plain vLLM. ``threshold`` replaces the
    engine's threshold for this request's rows (read as the engine's signal reads it).
    ``max_layers`` is the request's depth budget: its decode tokens compute at most
    that many layers and leave after layer ``max_layers - 1`` (state propagation
    fills the rest). Exact under ``policy: "per_token"``; under ``all``/``quorum``
    a row past its budget counts as confident, so it no longer holds the step back.
    """

    enabled: bool = True
    threshold: float | None = None
    max_layers: int | None = None

    @classmethod
    def from_extra_args(cls, extra_args: Mapping[str, Any] | None) -> "RequestEarlyExit | None":
        """None when the request carries no early-exit settings."""
        extra_args = extra_args or {}
        nested = extra_args.get(CONFIG_KEY)
        flat = {FLAT_REQUEST_KEYS[k]: v for k, v in extra_args.items() if k in FLAT_REQUEST_KEYS}
        if nested is None and not flat:
            return None
        if nested is not None and flat:
            raise EarlyExitConfigError(
                "per-request early-exit settings given twice: use extra_args['early_exit'] "
                f"or the flat keys {sorted(FLAT_REQUEST_KEYS)}, not both."
            )
        if nested is not None and not isinstance(nested, Mapping):
            raise EarlyExitConfigError(
                f"extra_args.early_exit={nested!r} is invalid: expected an object with keys {REQUEST_KEYS}."
            )
        raw = dict(nested) if nested is not None else flat
        unknown = sorted(set(raw) - set(REQUEST_KEYS))
        if unknown:
            raise EarlyExitConfigError(
                f"unknown per-request early_exit setting(s) {unknown}; allowed keys are {REQUEST_KEYS}."
            )
        enabled = _flag("early_exit.enabled", raw.get("enabled", True))
        threshold = raw.get("threshold")
        if threshold is not None and (not _is_number(threshold) or not math.isfinite(threshold)):
            raise EarlyExitConfigError(
                f"early_exit.threshold={threshold!r} in the request is invalid: expected a finite number "
                "(read as the engine's signal reads its threshold; saturation thresholds may be negative)."
            )
        max_layers = raw.get("max_layers")
        if isinstance(max_layers, str) and max_layers.isdigit():  # vllm_xargs may carry strings
            max_layers = int(max_layers)
        if max_layers is not None and (not _is_int(max_layers) or max_layers < 1):
            raise EarlyExitConfigError(
                f"early_exit.max_layers={max_layers!r} in the request is invalid: expected a number of layers >= 1."
            )
        if max_layers is not None and not enabled:
            raise EarlyExitConfigError(
                "early_exit.max_layers cannot be combined with enabled=false in one request "
                "(enabled=false runs the request at full depth)."
            )
        return cls(
            enabled=enabled,
            threshold=None if threshold is None else float(threshold),
            max_layers=max_layers,
        )
