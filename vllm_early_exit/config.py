"""Early-exit settings: the one place where they are parsed and validated.

Users pass the settings as the ``early_exit`` entry of vLLM's
``additional_config`` (offline ``LLM(..., additional_config={"early_exit": {...}})``,
or ``--additional-config`` / ``--early-exit-config`` on the command line).
Everything that can be checked without the model is checked in
:meth:`EarlyExitConfig.from_dict`; the layer indices are checked against the
model's depth in :meth:`EarlyExitConfig.exit_layers_for`. Both run at engine
start-up, before any request is served.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

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

# Signals whose threshold is a probability in [0, 1].
PROBABILITY_SIGNALS = ("max_prob", "margin", "head", "gate")
# Signals that read a trained heads folder.
HEAD_SIGNALS = ("head", "gate")

POLICIES: dict[str, str] = {
    "all": "the step leaves at a layer only when every logits row is confident there",
    "quorum": "the step leaves when at least a share `quorum` of the rows is confident",
    "per_token": "each confident row leaves on its own; the other rows go on",
}


class EarlyExitConfigError(ValueError):
    """An early-exit setting is invalid. The message names the key and what is allowed."""


class EarlyExitUnsupportedError(ValueError):
    """The model or an engine setting cannot be combined with early exit (the message says why)."""


def _fail(key: str, value: Any, allowed: str) -> EarlyExitConfigError:
    return EarlyExitConfigError(
        f"early_exit.{key}={value!r} is invalid: {allowed}."
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class EarlyExitConfig:
    """Validated early-exit settings.

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
        skip_layers: layers (0-based) that every decode token skips; their K/V is
            filled from the residual stream that passes them.
        compile: compile the layers between decision points as groups (``groups.py``)
            with vLLM's torch.compile, and on CUDA capture them as piecewise CUDA
            graphs. False: the model runs eagerly (``enforce_eager``).
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
    skip_layers: tuple[int, ...] = ()
    compile: bool = False

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "EarlyExitConfig":
        """Parses and checks a settings dict (``None`` or ``{}`` gives the defaults)."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise EarlyExitConfigError(
                f"early_exit settings must be a JSON object (dict), got {type(raw).__name__}."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise EarlyExitConfigError(
                f"unknown early_exit setting(s) {unknown}; allowed keys are {sorted(known)}."
            )
        values = dict(raw)

        enabled = values.get("enabled", cls.enabled)
        if not isinstance(enabled, bool):
            raise _fail("enabled", enabled, "expected true or false")

        signal = values.get("signal", cls.signal)
        if signal not in SIGNALS:
            raise _fail("signal", signal, f"allowed values are {sorted(SIGNALS)}")

        threshold = values.get("threshold", cls.threshold)
        if not _is_number(threshold) or not math.isfinite(threshold):
            raise _fail("threshold", threshold, "expected a finite number")
        if signal in PROBABILITY_SIGNALS and not 0.0 <= threshold <= 1.0:
            raise _fail("threshold", threshold, f"for signal {signal!r} it must lie in [0, 1]")
        if signal == "saturation" and not -1.0 <= threshold <= 1.0:
            raise _fail("threshold", threshold, "for signal 'saturation' (a cosine similarity) it must lie in [-1, 1]")
        if signal == "entropy" and threshold < 0.0:
            raise _fail("threshold", threshold, "for signal 'entropy' it must be >= 0 (nats)")

        min_layer = values.get("min_layer", cls.min_layer)
        if min_layer is not None and (not _is_int(min_layer) or min_layer < 0):
            raise _fail("min_layer", min_layer, "expected a layer index >= 0")

        exit_layers = values.get("exit_layers", cls.exit_layers)
        if exit_layers is not None:
            if isinstance(exit_layers, (str, bytes)) or not isinstance(exit_layers, (list, tuple)):
                raise _fail("exit_layers", exit_layers, "expected a list of layer indices")
            if not all(_is_int(x) and x >= 0 for x in exit_layers):
                raise _fail("exit_layers", exit_layers, "expected a list of layer indices >= 0 ([]: no exit checks)")
            if min_layer is not None:
                raise EarlyExitConfigError(
                    "early_exit.min_layer and early_exit.exit_layers are exclusive: "
                    "give the first layer or the list of layers, not both."
                )
            exit_layers = tuple(sorted(set(exit_layers)))

        policy = values.get("policy", cls.policy)
        if policy not in POLICIES:
            raise _fail("policy", policy, f"allowed values are {sorted(POLICIES)}")

        quorum = values.get("quorum", cls.quorum)
        if not _is_number(quorum) or not 0.0 < quorum <= 1.0:
            raise _fail("quorum", quorum, "expected a share in (0, 1]")
        if "quorum" in values and policy != "quorum":
            raise _fail("quorum", quorum, "it only applies with policy 'quorum'")

        log_interval_s = values.get("log_interval_s", cls.log_interval_s)
        if not _is_number(log_interval_s) or log_interval_s < 0:
            raise _fail("log_interval_s", log_interval_s, "expected seconds >= 0 (0 turns logging off)")

        vocab_top_k = values.get("vocab_top_k", cls.vocab_top_k)
        if vocab_top_k is not None and (not _is_int(vocab_top_k) or vocab_top_k < 2):
            raise _fail("vocab_top_k", vocab_top_k, "expected a number of tokens >= 2, or null for the full vocabulary")

        heads = values.get("heads", cls.heads)
        if heads is not None:
            if not isinstance(heads, str) or not heads:
                raise _fail("heads", heads, "expected the path of a heads folder (from `train-heads`)")
            from vllm_early_exit.model_executor.early_exit.heads import read_metadata

            meta = read_metadata(Path(heads).expanduser())
            if signal == "gate" and not meta.get("gate_layers"):
                raise _fail("signal", signal, f"the heads in {heads!r} were trained without gates (train-heads without --no-gates)")
            heads = str(Path(heads).expanduser())
        elif signal in HEAD_SIGNALS:
            raise _fail("signal", signal, "it reads trained heads: set early_exit.heads to a folder from `train-heads`")

        skip_layers = values.get("skip_layers", cls.skip_layers)
        if isinstance(skip_layers, (str, bytes)) or not isinstance(skip_layers, (list, tuple)) or not all(
            _is_int(x) and x >= 0 for x in skip_layers
        ):
            raise _fail("skip_layers", skip_layers, "expected a list of layer indices >= 0")
        skip_layers = tuple(sorted(set(skip_layers)))

        compile_groups = values.get("compile", cls.compile)
        if not isinstance(compile_groups, bool):
            raise _fail("compile", compile_groups, "expected true or false")

        return cls(
            enabled=enabled,
            signal=signal,
            threshold=float(threshold),
            min_layer=min_layer,
            exit_layers=exit_layers,
            policy=policy,
            quorum=float(quorum),
            log_interval_s=float(log_interval_s),
            vocab_top_k=vocab_top_k,
            heads=heads,
            skip_layers=skip_layers,
            compile=compile_groups,
        )

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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.exit_layers is not None:
            data["exit_layers"] = list(self.exit_layers)
        data["skip_layers"] = list(self.skip_layers)
        return {k: v for k, v in data.items() if v is not None and v != []}


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
