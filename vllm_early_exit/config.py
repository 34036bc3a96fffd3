"""The engine's early-exit settings: parsed from a table of fields and checked here.

Users pass the settings as the ``early_exit`` entry of vLLM's
``additional_config`` (offline ``LLM(..., additional_config={"early_exit": {...}})``,
or ``--additional-config`` / ``--early-exit-config`` on the command line).
:meth:`EarlyExitConfig.from_dict` checks every field against ``FIELDS`` (type,
allowed values, message) and then the rules that join two fields; the layer
indices are checked against the model's depth in :meth:`EarlyExitConfig.exit_layers_for`.
Checks that need the loaded model config or the engine settings (model type,
heads against the model's shape, parallelism) are in ``plugin/checks.py``. All
of them run at engine start-up, before any request is served.

A request's own settings (``REQUEST_FIELDS``, read by ``RequestEarlyExit``) are in
``request_settings.py``; the rules both follow (where a value came from, ``SOURCES``; the
signals and their threshold ranges; the checks of a value's type) in ``field_rules.py``.
Every message names the key, the value, where it came from and what is allowed. This
module is the settings' public face: it re-exports the names of both.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from vllm_early_exit.errors import EarlyExitConfigError, EarlyExitUnsupportedError
from vllm_early_exit.field_rules import (
    ADDITIONAL_CONFIG_OPTION,
    CONFIG_KEY,
    EARLY_EXIT_CONFIG_OPTION,
    ENGINE_SETTINGS,
    REQUEST_EXTRA_ARGS,
    REQUEST_VLLM_XARGS,
    SIGNALS,
    SOURCES,
    THRESHOLD_RANGES,
    fail,
    is_int,
    is_number,
)
from vllm_early_exit.files import read_metadata, read_shortlist
from vllm_early_exit.request_settings import (
    FLAT_REQUEST_KEYS,
    REQUEST_FIELDS,
    REQUEST_KEYS,
    EngineLimits,
    RequestEarlyExit,
    RequestField,
)

__all__ = [
    "ADDITIONAL_CONFIG_OPTION", "CONFIG_KEY", "CUDA_GRAPH_MODES", "EARLY_EXIT_CONFIG_OPTION", "ENGINE_SETTINGS",
    "FIELDS", "FLAT_REQUEST_KEYS", "HEAD_SIGNALS", "POLICIES", "REQUEST_EXTRA_ARGS", "REQUEST_FIELDS",
    "REQUEST_KEYS", "REQUEST_VLLM_XARGS", "SIGNALS", "SKIPPED_KV", "SOURCES", "THRESHOLD_RANGES", "EarlyExitConfig",
    "EarlyExitConfigError", "EarlyExitUnsupportedError", "EngineLimits", "Field", "RequestEarlyExit",
    "RequestField",
]

# Signals that read a trained heads folder.
HEAD_SIGNALS = ("head", "gate")

# How a pure-decode step is captured on a GPU (``model_executor/early_exit/graphs.py``).
CUDA_GRAPH_MODES: dict[str, str] = {
    "branches": "one CUDA graph per branch of the step, the host reading one flag per decision point",
    "conditional": "the whole step as one CUDA graph whose branches are conditional nodes (torch >= 2.12, one rank)",
}

# What the layers a decode token skipped hold for the tokens after it (``skipped_kv``).
SKIPPED_KV: dict[str, str] = {
    "propagate": "state propagation: the deeper layers' K/V from the stream the token left with",
    "recompute": "catch-up: the token waits, and its request's next step runs it again with the new token, "
                 "until a step runs every layer (exact K/V, as plain vLLM's)",
}

POLICIES: dict[str, str] = {
    "all": "the step leaves at a layer only when every logits row is confident there",
    "quorum": "the step leaves when at least a share `quorum` of the rows is confident",
    "per_token": "each confident row leaves on its own; the other rows go on",
}


def _is_layer_list(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and all(is_int(x) and x >= 0 for x in value)
        and len(set(value)) == len(value)
    )


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
    Field("threshold", 0.9, is_number, "expected a finite number", float),
    Field("min_layer", None, _optional(lambda v: is_int(v) and v >= 0), "expected a layer index >= 0"),
    Field(
        "exit_layers", None, _optional(_is_layer_list),
        "expected a list of distinct layer indices >= 0 ([]: no exit checks)", _layers,
    ),
    Field("policy", "all", lambda v: v in POLICIES, f"allowed values are {sorted(POLICIES)}"),
    Field("quorum", 0.75, lambda v: is_number(v) and 0.0 < v <= 1.0, "expected a share in (0, 1]", float),
    Field(
        "log_interval_s", 10.0, lambda v: is_number(v) and v >= 0,
        "expected seconds >= 0 (0 turns logging off)", float,
    ),
    Field(
        "vocab_top_k", None, _optional(lambda v: is_int(v) and v >= 2),
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
    Field(
        "skip_layers", (), _is_layer_list,
        "expected a list of distinct layer indices >= 0 that leaves at least one layer of the model", _layers,
    ),
    Field(
        "compile", None, _optional(lambda v: isinstance(v, bool)),
        "expected true, false, or null (on CPU, compile unless the engine runs with enforce_eager)",
    ),
    Field(
        "max_exit_batch", None, _optional(lambda v: is_int(v) and v >= 1),
        "expected a number of decode rows >= 1, or null to check steps of any size",
    ),
    Field(
        "cuda_graphs", None, _optional(lambda v: v in CUDA_GRAPH_MODES),
        f"allowed values are {sorted(CUDA_GRAPH_MODES)} or null (piecewise graphs of the compiled groups)",
    ),
    Field("skipped_kv", "propagate", lambda v: v in SKIPPED_KV, f"allowed values are {sorted(SKIPPED_KV)}"),
    Field(
        "max_waiting", 16, lambda v: is_int(v) and v >= 1,
        "expected a number of tokens >= 1 (the most decode tokens of a request that wait for their deeper "
        "layers; with skipped_kv 'recompute' only)",
    ),
)


def _check_together(values: dict[str, Any], given: Mapping[str, Any], source: str) -> None:
    """The rules that join two settings (``values``: converted; ``given``: what the user set)."""
    signal, threshold = values["signal"], values["threshold"]
    low, high, rule = THRESHOLD_RANGES[signal]
    if not low <= threshold <= high:
        raise fail("threshold", given.get("threshold", threshold), f"for signal {signal!r} {rule}", source)
    if values["exit_layers"] is not None and values["min_layer"] is not None:
        raise EarlyExitConfigError(
            f"early_exit.min_layer and early_exit.exit_layers in {source} are exclusive: "
            "give the first layer or the list of layers, not both."
        )
    if "quorum" in given and values["policy"] != "quorum":
        raise fail("quorum", given["quorum"], "it only applies with policy 'quorum'", source)
    if values["shortlist"] is not None:
        if signal in ("saturation", "gate"):
            raise fail(
                "shortlist", given["shortlist"],
                f"a shortlist is the first stage of a logit signal (max_prob, margin, entropy, head); "
                f"signal {signal!r} does not read it", source,
            )
        if values["vocab_top_k"] is not None:
            raise EarlyExitConfigError(
                f"early_exit.shortlist and early_exit.vocab_top_k in {source} are exclusive: both prune the "
                "vocabulary of a check; choose one."
            )
        with _named(source):
            read_shortlist(values["shortlist"])  # a clear error when the file is not a shortlist
    _check_skipped_kv(values, given, source)
    heads = values["heads"]
    if heads is None and signal in HEAD_SIGNALS:
        raise fail(
            "signal", signal, "it reads trained heads: set early_exit.heads to a folder from `train-heads`", source
        )
    if heads is not None:
        with _named(source):
            meta = read_metadata(Path(heads))  # a clear error when the folder is not a heads folder
        if signal == "gate" and not meta.get("gate_layers"):
            raise fail(
                "signal", signal,
                f"the heads in {given['heads']!r} were trained without gates (train-heads without --no-gates)",
                source,
            )


def _check_skipped_kv(values: dict[str, Any], given: Mapping[str, Any], source: str) -> None:
    """``skipped_kv: "recompute"`` keeps every K/V a token reads exact: nothing may write another."""
    if values["skipped_kv"] != "recompute":
        if "max_waiting" in given:
            raise fail("max_waiting", given["max_waiting"], "it only applies with skipped_kv 'recompute'", source)
        return
    if values["skip_layers"]:
        raise fail(
            "skip_layers", given["skip_layers"],
            "with skipped_kv 'recompute' no layer may be skipped: its K/V would be propagated, never recomputed "
            "(leave skip_layers empty, or use skipped_kv 'propagate')", source,
        )
    if values["cuda_graphs"] is not None:
        raise fail(
            "cuda_graphs", given["cuda_graphs"],
            "the captured steps hold one token per request, and skipped_kv 'recompute' runs a request's waiting "
            "tokens beside its new one (leave cuda_graphs unset, or use skipped_kv 'propagate')", source,
        )


class _named:
    """Adds where the settings came from to a settings error raised by a file reader."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> None:
        if isinstance(exc, EarlyExitConfigError) and self.source not in str(exc):
            raise EarlyExitConfigError(f"{exc} (in {self.source})") from None


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
        max_exit_batch: the most requests a step may decode for its checks to run
            (with ``skipped_kv: "recompute"`` a request's waiting tokens ride in its one
            group); a larger step runs the full depth with no check, as plain vLLM would (a
            step reads each layer once for all its rows, so with many rows few steps
            leave early and the checks cost more than they save). Optional: a
            request's tokens then depend on how many requests decode beside it.
            None (the default): check steps of any size.
        cuda_graphs: on a GPU, capture each pure-decode step of vLLM's captured batch sizes
            inside vLLM's full-graph mode: ``"branches"`` (one graph per branch, one host
            read per decision point) or ``"conditional"`` (one graph, conditional nodes).
            None (the default): compiled groups with piecewise graphs. Experimental: not
            yet measured on a GPU.
        skipped_kv: the K/V of the layers a decode token left before (``SKIPPED_KV``;
            ``"recompute"``: ``plugin/catch_up.py``).
        max_waiting: with ``"recompute"``, the most tokens of a request that wait: a group
            of more rows (its waiting tokens and the new one) runs every layer.
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
    cuda_graphs: str | None = None
    skipped_kv: str = "propagate"
    max_waiting: int = 16

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, source: str = ENGINE_SETTINGS) -> "EarlyExitConfig":
        """Parses and checks a settings dict (``None`` or ``{}`` gives the defaults).

        ``source`` (one of ``SOURCES``) is where the settings came from, for the messages.
        """
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise EarlyExitConfigError(
                f"early_exit settings in {source} must be a JSON object (dict), got {type(raw).__name__}."
            )
        known = [f.name for f in FIELDS]
        unknown = sorted(set(raw) - set(known), key=str)
        if unknown:
            raise EarlyExitConfigError(
                f"unknown early_exit setting(s) {unknown} in {source}; allowed keys are {sorted(known)}."
            )
        values: dict[str, Any] = {}
        for field in FIELDS:
            value = raw.get(field.name, field.default)
            if not field.valid(value):
                raise fail(field.name, value, field.allowed, source)
            values[field.name] = field.convert(value)
        _check_together(values, raw, source)
        return cls(**values)

    @classmethod
    def from_additional_config(
        cls, additional_config: Mapping[str, Any] | None, source: str = ENGINE_SETTINGS
    ) -> "EarlyExitConfig":
        """Reads the ``early_exit`` entry of vLLM's ``additional_config``."""
        return cls.from_dict((additional_config or {}).get(CONFIG_KEY), source)

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
            raw = json.loads(text, object_pairs_hook=_refuse_repeated_keys(option))
        except json.JSONDecodeError as exc:
            raise EarlyExitConfigError(f"{option} {value!r}: invalid JSON ({exc}).") from None
        cls.from_dict(raw, option)
        return raw

    @property
    def catches_up(self) -> bool:
        """Decode tokens that left early are run again until a step runs every layer (``skipped_kv``)."""
        return self.enabled and self.skipped_kv == "recompute"

    @property
    def may_compile(self) -> bool:
        """Whether the layer groups compile when the engine compiles (``compile`` not false; the
        start-up checks run ``compile: null`` eagerly where it is not the default)."""
        return self.enabled and self.compile is not False

    def exit_layers_for(self, num_layers: int, source: str = ENGINE_SETTINGS) -> tuple[int, ...]:
        """The layers after which checks run, checked against the model's depth
        (and the skipped layers: decode tokens must keep at least one layer).

        A check after the last layer would save nothing, so the last allowed
        index is ``num_layers - 2``.
        """
        last = num_layers - 2
        if self.skip_layers and self.skip_layers[-1] >= num_layers:
            raise fail(
                "skip_layers", list(self.skip_layers),
                f"this model has {num_layers} layers, so skipped layers must lie in [0, {num_layers - 1}]", source,
            )
        if len(self.skip_layers) >= num_layers:
            raise fail(
                "skip_layers", list(self.skip_layers),
                f"it names every layer of this {num_layers}-layer model, so decode tokens would run no layer; "
                "leave at least one layer out", source,
            )
        if self.exit_layers is not None:
            bad = [x for x in self.exit_layers if x > last]
            if bad:
                raise fail(
                    "exit_layers", list(self.exit_layers),
                    f"this model has {num_layers} layers, so exit layers must lie in [0, {last}]", source,
                )
            return self.exit_layers
        first = num_layers // 2 if self.min_layer is None else self.min_layer
        if first > last:
            raise fail(
                "min_layer", self.min_layer,
                f"this model has {num_layers} layers, so min_layer must lie in [0, {last}]", source,
            )
        return tuple(range(first, last + 1))

    def check_layers_for(self, num_layers: int, source: str = ENGINE_SETTINGS) -> frozenset[int]:
        """The layers where a check runs: the exit layers, less the skipped ones
        (a skipped layer leaves the stream as it was)."""
        return frozenset(self.exit_layers_for(num_layers, source)) - frozenset(self.skip_layers)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.exit_layers is not None:
            data["exit_layers"] = list(self.exit_layers)
        data["skip_layers"] = list(self.skip_layers)
        # Settings that only apply beside another are left out where they do not (from_dict refuses them).
        inapplicable = {"quorum": self.policy != "quorum", "max_waiting": self.skipped_kv != "recompute"}
        return {k: v for k, v in data.items() if v is not None and v != [] and not inapplicable.get(k)}


assert [(f.name, f.default) for f in fields(EarlyExitConfig)] == [
    (f.name, f.convert(f.default)) for f in FIELDS
], "FIELDS and EarlyExitConfig must list the same settings with the same defaults"


def _refuse_repeated_keys(option: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A ``json.loads`` hook: a key given twice in one object is an error (JSON keeps the last silently)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                raise EarlyExitConfigError(
                    f"{option}: key {key!r} is given twice ({json.dumps(seen[key])} and {json.dumps(value)}); "
                    "give each setting once."
                )
            seen[key] = value
        return seen

    return pairs
