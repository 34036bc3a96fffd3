"""Early-exit settings: parsed from a table of fields and checked here.

Users pass the settings as the ``early_exit`` entry of vLLM's
``additional_config`` (offline ``LLM(..., additional_config={"early_exit": {...}})``,
or ``--additional-config`` / ``--early-exit-config`` on the command line).
:meth:`EarlyExitConfig.from_dict` checks every field against ``FIELDS`` (type,
allowed values, message) and then the rules that join two fields; the layer
indices are checked against the model's depth in :meth:`EarlyExitConfig.exit_layers_for`.
Checks that need the loaded model config or the engine settings (model type,
heads against the model's shape, parallelism) are in ``plugin/checks.py``. All
of them run at engine start-up, before any request is served.

A request's own settings (``REQUEST_FIELDS``, read by ``RequestEarlyExit``) follow
the same rules as the engine's: their form is checked when the ``SamplingParams``
is made, and their range against the engine that admits the request (its signal's
threshold range, the model's depth: ``EngineLimits``), before the request is
scheduled. Every message names the key, the value, where it came from (``SOURCES``)
and what is allowed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from vllm_early_exit.errors import EarlyExitConfigError, EarlyExitUnsupportedError, invalid

__all__ = [
    "CONFIG_KEY", "EarlyExitConfig", "EarlyExitConfigError", "EarlyExitUnsupportedError", "EngineLimits",
    "REQUEST_FIELDS", "RequestEarlyExit",
]

CONFIG_KEY = "early_exit"

# Where a value came from, as the error messages say it.
ENGINE_SETTINGS = "the engine settings"
EARLY_EXIT_CONFIG_OPTION = "--early-exit-config"
ADDITIONAL_CONFIG_OPTION = "--additional-config"
REQUEST_EXTRA_ARGS = "the request's extra_args"
REQUEST_VLLM_XARGS = "the request's vllm_xargs"
SOURCES = (ENGINE_SETTINGS, EARLY_EXIT_CONFIG_OPTION, ADDITIONAL_CONFIG_OPTION, REQUEST_EXTRA_ARGS, REQUEST_VLLM_XARGS)

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

# How a pure-decode step is captured on a GPU (``model_executor/early_exit/graphs.py``).
CUDA_GRAPH_MODES: dict[str, str] = {
    "branches": "one CUDA graph per branch of the step, the host reading one flag per decision point",
    "conditional": "the whole step as one CUDA graph whose branches are conditional nodes (torch >= 2.12, one rank)",
}

POLICIES: dict[str, str] = {
    "all": "the step leaves at a layer only when every logits row is confident there",
    "quorum": "the step leaves when at least a share `quorum` of the rows is confident",
    "per_token": "each confident row leaves on its own; the other rows go on",
}


def _fail(key: str, value: Any, allowed: str, source: str = ENGINE_SETTINGS) -> EarlyExitConfigError:
    return invalid(f"early_exit.{key}", value, source, allowed)


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool, not an int too large for a float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_layer_list(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and all(_is_int(x) and x >= 0 for x in value)
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
    Field("threshold", 0.9, _is_number, "expected a finite number", float),
    Field("min_layer", None, _optional(lambda v: _is_int(v) and v >= 0), "expected a layer index >= 0"),
    Field(
        "exit_layers", None, _optional(_is_layer_list),
        "expected a list of distinct layer indices >= 0 ([]: no exit checks)", _layers,
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
    Field(
        "skip_layers", (), _is_layer_list,
        "expected a list of distinct layer indices >= 0 that leaves at least one layer of the model", _layers,
    ),
    Field(
        "compile", None, _optional(lambda v: isinstance(v, bool)),
        "expected true, false, or null (on CPU, compile unless the engine runs with enforce_eager)",
    ),
    Field(
        "max_exit_batch", None, _optional(lambda v: _is_int(v) and v >= 1),
        "expected a number of decode rows >= 1, or null to check steps of any size",
    ),
    Field(
        "cuda_graphs", None, _optional(lambda v: v in CUDA_GRAPH_MODES),
        f"allowed values are {sorted(CUDA_GRAPH_MODES)} or null (piecewise graphs of the compiled groups)",
    ),
)


def _check_together(values: dict[str, Any], given: Mapping[str, Any], source: str) -> None:
    """The rules that join two settings (``values``: converted; ``given``: what the user set)."""
    signal, threshold = values["signal"], values["threshold"]
    low, high, rule = THRESHOLD_RANGES[signal]
    if not low <= threshold <= high:
        raise _fail("threshold", given.get("threshold", threshold), f"for signal {signal!r} {rule}", source)
    if values["exit_layers"] is not None and values["min_layer"] is not None:
        raise EarlyExitConfigError(
            f"early_exit.min_layer and early_exit.exit_layers in {source} are exclusive: "
            "give the first layer or the list of layers, not both."
        )
    if "quorum" in given and values["policy"] != "quorum":
        raise _fail("quorum", given["quorum"], "it only applies with policy 'quorum'", source)
    if values["shortlist"] is not None:
        if signal in ("saturation", "gate"):
            raise _fail(
                "shortlist", given["shortlist"],
                f"a shortlist is the first stage of a logit signal (max_prob, margin, entropy, head); "
                f"signal {signal!r} does not read it", source,
            )
        if values["vocab_top_k"] is not None:
            raise EarlyExitConfigError(
                f"early_exit.shortlist and early_exit.vocab_top_k in {source} are exclusive: both prune the "
                "vocabulary of a check; choose one."
            )
        from vllm_early_exit.model_executor.early_exit.shortlist import read_shortlist

        with _named(source):
            read_shortlist(values["shortlist"])  # a clear error when the file is not a shortlist
    heads = values["heads"]
    if heads is None and signal in HEAD_SIGNALS:
        raise _fail(
            "signal", signal, "it reads trained heads: set early_exit.heads to a folder from `train-heads`", source
        )
    if heads is not None:
        from vllm_early_exit.model_executor.early_exit.heads import read_metadata

        with _named(source):
            meta = read_metadata(Path(heads))  # a clear error when the folder is not a heads folder
        if signal == "gate" and not meta.get("gate_layers"):
            raise _fail(
                "signal", signal,
                f"the heads in {given['heads']!r} were trained without gates (train-heads without --no-gates)",
                source,
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
        max_exit_batch: the most decode rows a step may have for its checks to run;
            a larger step runs the full depth with no check, as plain vLLM would (a
            step reads each layer once for all its rows, so with many rows few steps
            leave early and the checks cost more than they save). Optional: a
            request's tokens then depend on how many requests decode beside it.
            None (the default): check steps of any size.
        cuda_graphs: on a GPU, capture each pure-decode step of vLLM's captured batch sizes
            inside vLLM's full-graph mode: ``"branches"`` (one graph per branch, one host
            read per decision point) or ``"conditional"`` (one graph, conditional nodes).
            None (the default): compiled groups with piecewise graphs. Experimental: not
            yet measured on a GPU.
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
                raise _fail(field.name, value, field.allowed, source)
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
            raise _fail(
                "skip_layers", list(self.skip_layers),
                f"this model has {num_layers} layers, so skipped layers must lie in [0, {num_layers - 1}]", source,
            )
        if len(self.skip_layers) >= num_layers:
            raise _fail(
                "skip_layers", list(self.skip_layers),
                f"it names every layer of this {num_layers}-layer model, so decode tokens would run no layer; "
                "leave at least one layer out", source,
            )
        if self.exit_layers is not None:
            bad = [x for x in self.exit_layers if x > last]
            if bad:
                raise _fail(
                    "exit_layers", list(self.exit_layers),
                    f"this model has {num_layers} layers, so exit layers must lie in [0, {last}]", source,
                )
            return self.exit_layers
        first = num_layers // 2 if self.min_layer is None else self.min_layer
        if first > last:
            raise _fail(
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
        return {k: v for k, v in data.items() if v is not None and v != []}


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


# --- A request's own settings ---------------------------------------------------------------


def _is_flag(value: Any) -> bool:
    return isinstance(value, bool)


def _is_served_flag(value: Any) -> bool:
    """true/false, or 1/0: vLLM's OpenAI server types ``vllm_xargs`` values as str, int, float or
    lists of them, so the JSON true and false of a request reach the engine as 1 and 0."""
    return isinstance(value, bool) or (type(value) is int and value in (0, 1))


@dataclass(frozen=True)
class RequestField:
    """One per-request setting.

    ``name``: its key in ``SamplingParams.extra_args["early_exit"]`` (offline); ``flat``: its key
    at the top level of ``extra_args``, the spelling of the OpenAI API's ``vllm_xargs`` (which
    hold flat values only; offline too). ``valid``/``allowed``: the check of a value's form and
    what the error says is allowed (``valid_flat``/``allowed_flat`` for the flat key, where they
    differ). The engine-dependent range (``EngineLimits``) is checked when an engine admits the
    request. ``meaning``: what the setting does.
    """

    name: str
    flat: str
    default: Any
    valid: Callable[[Any], bool]
    allowed: str
    meaning: str
    valid_flat: Callable[[Any], bool] | None = None
    allowed_flat: str | None = None


REQUEST_FIELDS: tuple[RequestField, ...] = (
    RequestField(
        "enabled", "early_exit_enabled", True, _is_flag,
        "expected true or false",
        "false: this request decodes at full depth, token-identical to plain vLLM (cannot be combined "
        "with threshold or max_layers); true: the engine's early exit (the default)",
        valid_flat=_is_served_flag,
        allowed_flat="expected true or false (or 1 or 0: vLLM's OpenAI server passes the JSON true and false "
        "of vllm_xargs on as 1 and 0)",
    ),
    RequestField(
        "threshold", "early_exit_threshold", None, _is_number,
        "expected a finite number in the range of the engine's signal: [0, 1] for max_prob, margin, head "
        "and gate; [-1, 1] for saturation; >= 0 for entropy (null or absent: the engine's threshold; "
        "vLLM's server refuses null in vllm_xargs); refused by an engine with early_exit.enabled false",
        "replaces the engine's threshold for this request's rows, read as the engine's signal reads it",
    ),
    RequestField(
        "max_layers", "early_exit_max_layers", None, lambda v: _is_int(v) and v >= 1,
        "expected an integer number of layers in [1, the model's layers] (with skip_layers: at least one "
        "layer within the budget must not be skipped; null or absent: no budget); refused by an engine with "
        "early_exit.enabled false",
        "depth budget: the request's decode tokens compute at most this many layers and leave after layer "
        "max_layers - 1 (state propagation fills the rest); exact under policy per_token, under all/quorum "
        "a row past its budget counts as confident",
    ),
)
FLAT_REQUEST_KEYS = {f.flat: f.name for f in REQUEST_FIELDS}
REQUEST_KEYS = sorted(f.name for f in REQUEST_FIELDS)
_REQUEST_FIELD = {f.name: f for f in REQUEST_FIELDS}


def _names_early_exit(key: Any) -> bool:
    """Whether a flat ``extra_args`` key is meant for early exit (any case, ``-`` or ``_``)."""
    return isinstance(key, str) and key.lower().replace("-", "_").startswith(CONFIG_KEY)


@dataclass(frozen=True)
class EngineLimits:
    """What a request's own settings are checked against when an engine admits the request:
    the engine's settings (its signal, whether early exit is on, the skipped layers) and the
    model's depth."""

    signal: str
    num_layers: int
    enabled: bool = True
    skip_layers: tuple[int, ...] = ()

    @classmethod
    def of(cls, settings: EarlyExitConfig, num_layers: int) -> "EngineLimits":
        return cls(settings.signal, num_layers, settings.enabled, tuple(settings.skip_layers))

    @property
    def fewest_layers(self) -> int:
        """The smallest depth budget that leaves a decode token a layer it runs (layers below
        the budget that are all skipped would leave it none)."""
        skipped = set(self.skip_layers)
        return next((i + 1 for i in range(self.num_layers) if i not in skipped), self.num_layers)

    def check(self, given: Mapping[str, tuple[str, Any]], source: str) -> None:
        """``given``: setting name -> (the key as the request spelled it, its value)."""
        if not self.enabled:
            for name in ("threshold", "max_layers"):
                if name in given:
                    key, value = given[name]
                    raise invalid(
                        key, value, source,
                        "early exit is off on this engine (its early_exit.enabled is false), so a request "
                        "cannot bring a threshold or a depth budget",
                    )
        if "threshold" in given:
            key, value = given["threshold"]
            low, high, rule = THRESHOLD_RANGES[self.signal]
            if not low <= value <= high:
                raise invalid(key, value, source, f"this engine's signal is {self.signal!r}: {rule}")
        if "max_layers" in given:
            key, value = given["max_layers"]
            low, high = self.fewest_layers, self.num_layers
            if not low <= value <= high:
                if low == 1:
                    rule = f"this model has {high} layers, so a depth budget must lie in [1, {high}]"
                else:
                    rule = (
                        f"this model has {high} layers and the engine skips layers {list(self.skip_layers)}, "
                        f"so a depth budget must lie in [{low}, {high}] (a smaller one leaves decode tokens "
                        "without any layer)"
                    )
                raise invalid(key, value, source, rule)


@dataclass(frozen=True)
class RequestEarlyExit:
    """One request's own early-exit settings, from ``SamplingParams.extra_args`` (see ``REQUEST_FIELDS``).

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
    def from_extra_args(
        cls, extra_args: Mapping[str, Any] | None, engine: EngineLimits | None = None
    ) -> "RequestEarlyExit | None":
        """None when the request carries no early-exit settings.

        Without ``engine`` only the form of each value is checked (a ``SamplingParams`` is
        made before it meets an engine); with it, also the range the engine allows.
        """
        extra_args = extra_args or {}
        nested = extra_args.get(CONFIG_KEY)
        flat = [k for k in extra_args if k != CONFIG_KEY and _names_early_exit(k)]
        unknown = sorted((k for k in flat if k not in FLAT_REQUEST_KEYS), key=str)
        if unknown:
            raise EarlyExitConfigError(
                f"unknown early-exit key(s) {unknown} in {REQUEST_VLLM_XARGS}; known keys are "
                f"{sorted(FLAT_REQUEST_KEYS)} (or, offline, extra_args['early_exit'] with keys {REQUEST_KEYS})."
            )
        if nested is None and not flat:
            return None
        if nested is not None and flat:
            raise EarlyExitConfigError(
                "per-request early-exit settings given twice: use extra_args['early_exit'] "
                f"or the flat keys {sorted(FLAT_REQUEST_KEYS)}, not both."
            )
        if nested is not None:
            source = REQUEST_EXTRA_ARGS
            if not isinstance(nested, Mapping):
                raise invalid(CONFIG_KEY, nested, source, f"expected an object with keys {REQUEST_KEYS}")
            unknown = sorted(set(nested) - set(REQUEST_KEYS), key=str)
            if unknown:
                raise EarlyExitConfigError(
                    f"unknown per-request early_exit setting(s) {unknown} in {source}; "
                    f"allowed keys are {REQUEST_KEYS}."
                )
            given = {name: (f"{CONFIG_KEY}.{name}", value) for name, value in nested.items()}
        else:
            source = REQUEST_VLLM_XARGS
            given = {FLAT_REQUEST_KEYS[k]: (k, extra_args[k]) for k in flat}
        # null is "not set" for the optional settings (as it is for the engine's optional fields).
        given = {
            name: (key, value) for name, (key, value) in given.items()
            if not (value is None and _REQUEST_FIELD[name].default is None)
        }
        for name, (key, value) in given.items():
            field = _REQUEST_FIELD[name]
            valid, allowed = field.valid, field.allowed
            if source == REQUEST_VLLM_XARGS:
                valid, allowed = field.valid_flat or valid, field.allowed_flat or allowed
            if not valid(value):
                raise invalid(key, value, source, allowed)
        enabled = bool(given["enabled"][1]) if "enabled" in given else True
        if not enabled and len(given) > 1:
            others = " and ".join(key for name, (key, _) in given.items() if name != "enabled")
            raise EarlyExitConfigError(
                f"{others} cannot be combined with {given['enabled'][0]}=false in {source} "
                "(a request with early exit off runs at full depth)."
            )
        if engine is not None:
            engine.check(given, source)
        threshold = given.get("threshold", (None, None))[1]
        return cls(
            enabled=enabled,
            threshold=None if threshold is None else float(threshold),
            max_layers=given.get("max_layers", (None, None))[1],
        )
