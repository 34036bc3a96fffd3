"""A request's own early-exit settings (``REQUEST_FIELDS``, read by ``RequestEarlyExit``).

They follow the same rules as the engine's (``field_rules.py``): their form is checked when
the ``SamplingParams`` is made, and their range against the engine that admits the request
(its signal's threshold range, the model's depth: ``EngineLimits``), before the request is
scheduled. Offline they come as ``extra_args["early_exit"]``; through the OpenAI API as the
flat ``vllm_xargs`` keys (``early_exit_threshold``, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vllm_early_exit.errors import EarlyExitConfigError, invalid
from vllm_early_exit.field_rules import (
    CONFIG_KEY,
    REQUEST_EXTRA_ARGS,
    REQUEST_VLLM_XARGS,
    THRESHOLD_RANGES,
    is_int,
    is_number,
)

__all__ = ["FLAT_REQUEST_KEYS", "REQUEST_FIELDS", "REQUEST_KEYS", "EngineLimits", "RequestEarlyExit", "RequestField"]


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
        "threshold", "early_exit_threshold", None, is_number,
        "expected a finite number in the range of the engine's signal: [0, 1] for max_prob, margin, head "
        "and gate; [-1, 1] for saturation; >= 0 for entropy (null or absent: the engine's threshold; "
        "vLLM's server refuses null in vllm_xargs); refused by an engine with early_exit.enabled false",
        "replaces the engine's threshold for this request's rows, read as the engine's signal reads it",
    ),
    RequestField(
        "max_layers", "early_exit_max_layers", None, lambda v: is_int(v) and v >= 1,
        "expected an integer number of layers in [1, the model's layers] (with skip_layers: at least one "
        "layer within the budget must not be skipped; null or absent: no budget); refused by an engine with "
        "early_exit.enabled false or with skipped_kv 'recompute'",
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
    catches_up: bool = False
    """The engine runs tokens that left early again until a step runs every layer (``skipped_kv``)."""

    @classmethod
    def of(cls, settings, num_layers: int) -> "EngineLimits":
        """``settings``: the engine's ``EarlyExitConfig``."""
        return cls(settings.signal, num_layers, settings.enabled, tuple(settings.skip_layers), settings.catches_up)

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
        if "max_layers" in given and self.catches_up:
            key, value = given["max_layers"]
            raise invalid(
                key, value, source,
                "this engine runs tokens that left early again until a step runs every layer (its "
                "early_exit.skipped_kv is 'recompute'), so it cannot keep a depth budget",
            )
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
