"""One rule for every entrance: early-exit values drawn as users type them (Hypothesis).

Each draw is checked against a plain statement of the rules written here (``engine_problems``,
``request_problems``): refused with the plugin's error (offline) or HTTP 400 (served) when the
rules say it is wrong, accepted and honoured when they say it is right.

* Most draws go to the validation functions directly: engine settings (``from_dict``, and
  ``--early-exit-config`` text), a request's ``extra_args`` (its form alone, and against an
  engine), and flat ``vllm_xargs`` as vLLM's own OpenAI request model delivers them.
* A real engine (tiny random LLaMA, this file run as a script in a fresh process) takes a
  handful of drawn requests through ``LLM.generate``: a refused one raises the plugin's error,
  an accepted one decodes as the HF reference does with that setting.
* A real ``vllm serve`` takes the issue's values and a handful of drawn ones over HTTP.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vllm_early_exit.config import (
    EARLY_EXIT_CONFIG_OPTION,
    ENGINE_SETTINGS,
    FIELDS,
    REQUEST_EXTRA_ARGS,
    REQUEST_FIELDS,
    REQUEST_VLLM_XARGS,
    EarlyExitConfig,
    EarlyExitConfigError,
    EngineLimits,
    RequestEarlyExit,
)

LAYERS = 6  # the tiny models' depth
# The engine of the engine and server draws: checks after layers 1 and 3.
ENGINE = {"exit_layers": [1, 3], "threshold": 0.5}
SERVED = {"exit_layers": [1, 3], "threshold": 0.03}  # random weights over a 49k vocabulary: low probabilities
NEW_TOKENS = 8

# --- The rules, stated plainly ------------------------------------------------------------------

RANGES = {"max_prob": (0, 1), "margin": (0, 1), "head": (0, 1), "gate": (0, 1), "saturation": (-1, 1),
          "entropy": (0, math.inf)}
POLICY_NAMES = ("all", "quorum", "per_token")
FLAT = {"early_exit_enabled": "enabled", "early_exit_threshold": "threshold", "early_exit_max_layers": "max_layers"}


def real(v) -> bool:
    """A finite number a float can hold; booleans are not numbers."""
    if type(v) is int:
        return abs(v) <= sys.float_info.max
    return type(v) is float and math.isfinite(v)


def count(v, low: int) -> bool:
    return type(v) is int and v >= low


def layer_list(v) -> bool:
    return type(v) in (list, tuple) and all(count(x, 0) for x in v) and len(set(v)) == len(v)


def engine_problems(raw: dict, layers: int = LAYERS) -> list[str]:
    """What a message about these engine settings may name (empty: they are valid).

    Drawn settings never name ``heads`` or ``shortlist`` (files), so ``head`` and ``gate``
    signals are wrong for want of heads."""
    unknown = [k for k in raw if k not in {f.name for f in FIELDS}]
    if unknown:
        return ["unknown early_exit setting"]
    bad = []
    value = raw.get
    if "enabled" in raw and type(raw["enabled"]) is not bool:
        bad.append("enabled")
    signal = value("signal", "max_prob")
    if signal not in ("max_prob", "margin", "entropy", "saturation"):
        bad.append("signal")
    threshold = value("threshold", 0.9)
    if not real(threshold):
        bad.append("threshold")
    elif signal in RANGES and not RANGES[signal][0] <= threshold <= RANGES[signal][1]:
        bad.append("threshold")
    if value("min_layer") is not None and not count(value("min_layer"), 0):
        bad.append("min_layer")
    if value("exit_layers") is not None and not layer_list(value("exit_layers")):
        bad.append("exit_layers")
    if value("policy", "all") not in POLICY_NAMES:
        bad.append("policy")
    if "quorum" in raw and not (real(raw["quorum"]) and 0 < raw["quorum"] <= 1 and value("policy") == "quorum"):
        bad.append("quorum")
    if "log_interval_s" in raw and not (real(raw["log_interval_s"]) and raw["log_interval_s"] >= 0):
        bad.append("log_interval_s")
    if value("vocab_top_k") is not None and not count(value("vocab_top_k"), 2):
        bad.append("vocab_top_k")
    if "skip_layers" in raw and not layer_list(raw["skip_layers"]):
        bad.append("skip_layers")
    if value("compile") is not None and type(value("compile")) is not bool:
        bad.append("compile")
    if value("max_exit_batch") is not None and not count(value("max_exit_batch"), 1):
        bad.append("max_exit_batch")
    recompute = value("skipped_kv", "propagate") == "recompute"
    if value("skipped_kv", "propagate") not in ("propagate", "recompute"):
        bad.append("skipped_kv")
    if "max_waiting" in raw and not (count(raw["max_waiting"], 1) and recompute):
        bad.append("max_waiting")
    if recompute and layer_list(value("skip_layers", ())) and value("skip_layers"):
        bad.append("skip_layers")
    if value("exit_layers") is not None and value("min_layer") is not None:
        bad.append("exclusive")
    if bad:
        return [b if b in ("exclusive",) else f"early_exit.{b}=" for b in bad]
    # Against the model's depth.
    skip = set(value("skip_layers", ()))
    if any(x >= layers for x in skip) or skip >= set(range(layers)):
        bad.append("skip_layers")
    if value("exit_layers") is not None:
        if any(x > layers - 2 for x in value("exit_layers")):
            bad.append("exit_layers")
    elif (layers // 2 if value("min_layer") is None else value("min_layer")) > layers - 2:
        bad.append("min_layer")
    return [f"early_exit.{b}=" for b in bad]


def names_early_exit(key) -> bool:
    return isinstance(key, str) and key.lower().replace("-", "_").startswith("early_exit")


@dataclass
class Verdict:
    """What a request's settings should meet: ``form`` problems (refused wherever they are
    checked), ``engine`` problems (refused by the engine that admits them), each as the text a
    message may name; ``settings``: the settings an engine honours when there is none."""

    form: list[str] = field(default_factory=list)
    engine: list[str] = field(default_factory=list)
    settings: RequestEarlyExit | None = None
    source: str | None = None

    @property
    def refused(self) -> bool:
        return bool(self.form or self.engine)


def request_problems(extra_args: dict, limits: EngineLimits) -> Verdict:
    nested = extra_args.get("early_exit")
    flat = [k for k in extra_args if k != "early_exit" and names_early_exit(k)]
    if any(k not in FLAT for k in flat):
        return Verdict(form=["unknown early-exit key"])
    if nested is None and not flat:
        return Verdict()
    if nested is not None and flat:
        return Verdict(form=["given twice"])
    if nested is not None:
        source = REQUEST_EXTRA_ARGS
        if not isinstance(nested, dict):
            return Verdict(form=["early_exit="], source=source)
        if any(k not in ("enabled", "threshold", "max_layers") for k in nested):
            return Verdict(form=["unknown per-request early_exit setting"], source=source)
        given = {name: (f"early_exit.{name}", v) for name, v in nested.items()}
    else:
        source = REQUEST_VLLM_XARGS
        given = {FLAT[k]: (k, extra_args[k]) for k in flat}
    given = {name: kv for name, kv in given.items() if not (name != "enabled" and kv[1] is None)}  # null: not set
    verdict = Verdict(source=source)
    if "enabled" in given:
        key, v = given["enabled"]
        if not (type(v) is bool or (source == REQUEST_VLLM_XARGS and type(v) is int and v in (0, 1))):
            verdict.form.append(f"{key}=")
    if "threshold" in given and not real(given["threshold"][1]):
        verdict.form.append(f"{given['threshold'][0]}=")
    if "max_layers" in given and not count(given["max_layers"][1], 1):
        verdict.form.append(f"{given['max_layers'][0]}=")
    enabled = bool(given["enabled"][1]) if "enabled" in given else True
    if not verdict.form and not enabled and len(given) > 1:
        verdict.form.append("cannot be combined")
    if verdict.form:
        return verdict
    threshold = given.get("threshold", (None, None))[1]
    budget = given.get("max_layers", (None, None))[1]
    if not limits.enabled and (threshold is not None or budget is not None):
        verdict.engine.append("early exit is off on this engine")
    low, high = RANGES[limits.signal]
    if threshold is not None and not low <= threshold <= high:
        verdict.engine.append(f"{given['threshold'][0]}=")
    unskipped = [layer for layer in range(limits.num_layers) if layer not in limits.skip_layers]
    if budget is not None and not unskipped[0] + 1 <= budget <= limits.num_layers:
        verdict.engine.append(f"{given['max_layers'][0]}=")
    verdict.settings = RequestEarlyExit(enabled, None if threshold is None else float(threshold), budget)
    return verdict


def _vllm_errors() -> tuple[type[Exception], ...]:
    from vllm.exceptions import VLLMValidationError  # a ValueError in vLLM 0.26, not in 0.32

    return (ValueError, VLLMValidationError)


VLLM_ERRORS = _vllm_errors()


def vllm_refuses_integers(value) -> bool:
    """vLLM 0.32 refuses integers outside 64 bits anywhere in ``extra_args`` (its own check)."""
    if isinstance(value, dict):
        return any(vllm_refuses_integers(x) for pair in value.items() for x in pair)
    if isinstance(value, (list, tuple)):
        return any(vllm_refuses_integers(x) for x in value)
    return isinstance(value, int) and not -(2**63) <= value < 2**64


def assert_names(message: str, expected: list[str], source: str | None) -> None:
    assert any(text in message for text in expected), f"{message!r} names none of {expected}"
    if source is not None and "given twice" not in message:
        assert source in message, f"{message!r} does not say it came from {source}"


# --- What users type -----------------------------------------------------------------------------

HUGE = st.sampled_from([99999999999, 2**63, 2**64, 10**400, -(10**400)])
ODD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e-300, 1.0000001, 1e308])
TEXT = st.sampled_from(["", "0.5", "true", "false", "yes", "1", "none", "max_prob", "3"]) | st.text(max_size=6)
SCALAR = st.none() | st.booleans() | st.integers(-3, 12) | HUGE | st.floats(-2, 10) | ODD_FLOATS | TEXT
ANYTHING = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=2),
                        max_leaves=4)
LAYER_LISTS = st.lists(st.integers(-1, 7), max_size=7) | st.lists(st.integers(0, 5), unique=True, max_size=6)


def either(valid, *junk):
    """Plausible values most of the time, and what else users type."""
    return st.one_of(valid, valid, *junk, SCALAR)


ENGINE_VALUES = {
    "enabled": either(st.booleans(), st.sampled_from([0, 1, "true"])),
    "signal": either(st.sampled_from(["max_prob", "margin", "entropy", "saturation"]),
                     st.sampled_from(["head", "gate", "confidence", "MAX_PROB"])),
    "threshold": either(st.floats(-1.5, 1.5), st.floats(0, 20), ODD_FLOATS, HUGE),
    "min_layer": either(st.integers(0, 5), st.integers(-2, 9)),
    "exit_layers": either(LAYER_LISTS, st.just([1, 1]), st.just((3, 1))),
    "policy": either(st.sampled_from(POLICY_NAMES), st.just("majority")),
    "quorum": either(st.floats(0, 1), st.floats(-1, 2)),
    "log_interval_s": either(st.floats(0, 100), ODD_FLOATS),
    "vocab_top_k": either(st.integers(2, 600), st.integers(-1, 2)),
    "skip_layers": either(LAYER_LISTS, st.just(list(range(LAYERS)))),
    "compile": either(st.none() | st.booleans()),
    "max_exit_batch": either(st.integers(1, 64), st.integers(-1, 1)),
    "skipped_kv": either(st.sampled_from(["propagate", "recompute"]), st.sampled_from(["exact", "Recompute"])),
    "max_waiting": either(st.integers(1, 64), st.integers(-1, 1)),
}
TYPOS = st.dictionaries(st.sampled_from(["treshold", "exit_layer", "Threshold", "early_exit", "max_layers"]), SCALAR,
                        max_size=1)
ENGINE_SETTINGS_DRAWS = st.tuples(st.fixed_dictionaries({}, optional=ENGINE_VALUES), TYPOS).map(
    lambda pair: {**pair[0], **pair[1]}
)

REQUEST_VALUES = {
    "enabled": either(st.booleans(), st.sampled_from([0, 1, 2, "true", "false", 1.0])),
    "threshold": either(
        st.floats(-1.5, 1.5), st.floats(0, 20), st.sampled_from([-0.5, 7, 1.0000001]), ODD_FLOATS, HUGE
    ),
    "max_layers": either(st.integers(1, LAYERS), st.sampled_from([0, 7, 99999999999, 2.5, "3", True]), HUGE),
}
REQUEST_NESTED = st.fixed_dictionaries({}, optional=REQUEST_VALUES)
REQUEST_FLAT = st.fixed_dictionaries({}, optional={f"early_exit_{k}": v for k, v in REQUEST_VALUES.items()})
OTHER_KEYS = st.dictionaries(
    st.sampled_from(["early_exit_bogus", "early_exit_treshold", "Early_Exit_Threshold", "early-exit-threshold",
                     "early_exits", "my_key", "seed_note"]),
    SCALAR, max_size=1,
)


@st.composite
def one_request(draw) -> dict:
    """One or two of a request's settings, nested (offline) or flat (the vllm_xargs spelling)."""
    names = draw(st.lists(st.sampled_from(sorted(REQUEST_VALUES)), min_size=1, max_size=2, unique=True))
    values = {name: draw(REQUEST_VALUES[name]) for name in names}
    if draw(st.booleans()):
        return {"early_exit": values}
    return {f"early_exit_{name}": value for name, value in values.items()}


REQUEST_DRAWS = st.one_of(
    one_request(),
    REQUEST_NESTED.map(lambda d: {"early_exit": d}),
    REQUEST_FLAT,
    st.tuples(REQUEST_FLAT | REQUEST_NESTED.map(lambda d: {"early_exit": d}), OTHER_KEYS).map(
        lambda pair: {**pair[0], **pair[1]}
    ),
    st.builds(lambda v: {"early_exit": v}, ANYTHING),
)


@st.composite
def engine_limits(draw) -> EngineLimits:
    layers = draw(st.integers(1, 40))
    skip = draw(st.lists(st.integers(0, layers - 1), unique=True, max_size=layers - 1))
    return EngineLimits(draw(st.sampled_from(sorted(RANGES))), layers, draw(st.booleans()), tuple(sorted(skip)))


# Random draws on a developer's machine, the same draws in CI (Hypothesis's "ci" profile, chosen
# when CI=true, derandomizes); no example database written into the work tree.
FAST = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# --- Validation functions, directly ----------------------------------------------------------


@FAST
@given(raw=ENGINE_SETTINGS_DRAWS)
@example(raw={"exit_layers": [1, 1]})  # the issue's: a duplicate, and no layer left to decode tokens
@example(raw={"skip_layers": list(range(LAYERS))})
def test_engine_settings_follow_the_rules(raw):
    expected = engine_problems(raw)
    for source in (ENGINE_SETTINGS, EARLY_EXIT_CONFIG_OPTION):
        try:
            if source == ENGINE_SETTINGS:
                config = EarlyExitConfig.from_dict(raw, source)
            else:  # the same settings typed on the command line
                config = EarlyExitConfig.from_dict(EarlyExitConfig.from_cli_value(json.dumps(raw)), source)
            config.check_layers_for(LAYERS, source)
        except EarlyExitConfigError as exc:
            assert expected, f"{raw} refused: {exc}"
            assert_names(str(exc), expected, source)
            continue
        assert not expected, f"{raw} accepted, but {expected}"
        assert config.threshold == float(raw.get("threshold", 0.9))
        assert config.skip_layers == tuple(sorted(raw.get("skip_layers", ())))
        if raw.get("exit_layers") is not None:
            assert config.exit_layers_for(LAYERS) == tuple(sorted(raw["exit_layers"]))


@FAST
@given(extra_args=REQUEST_DRAWS, limits=engine_limits())
def test_request_settings_follow_the_rules(extra_args, limits):
    from vllm import SamplingParams

    import vllm_early_exit

    vllm_early_exit.register()
    verdict = request_problems(extra_args, limits)
    # Its form, where a SamplingParams is made (no engine yet).
    try:
        SamplingParams(max_tokens=4, extra_args=extra_args)
    except EarlyExitConfigError as exc:
        assert verdict.form, f"{extra_args} refused for its form: {exc}"
        assert_names(str(exc), verdict.form, verdict.source)
    except VLLM_ERRORS as exc:  # vLLM's own check of extra_args
        assert vllm_refuses_integers(extra_args), exc
    else:
        assert not verdict.form, f"{extra_args} made, but {verdict.form}"
    # Against an engine, as the engine admits it.
    try:
        settings_ = RequestEarlyExit.from_extra_args(extra_args, limits)
    except EarlyExitConfigError as exc:
        assert verdict.refused, f"{extra_args} refused by {limits}: {exc}"
        assert_names(str(exc), verdict.form or verdict.engine, verdict.source)
    else:
        assert not verdict.refused, f"{extra_args} admitted by {limits}, but {verdict.form + verdict.engine}"
        assert settings_ == verdict.settings


FLAT_KEYS = st.sampled_from([*FLAT, "early_exit_bogus", "Early_Exit_Threshold", "early-exit-max-layers", "early_exit",
                             "my_key"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 12) | HUGE | st.floats(-2, 10) | ODD_FLOATS | TEXT,
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(TEXT, inner, max_size=1), max_leaves=3,
)
SERVED_XARGS = st.one_of(
    st.dictionaries(FLAT_KEYS, JSON_VALUES, min_size=1, max_size=2),
    one_request().filter(lambda extra_args: "early_exit" not in extra_args),
    st.fixed_dictionaries({}, optional={"early_exit_enabled": st.booleans(), "early_exit_threshold": st.floats(-1, 2),
                                        "early_exit_max_layers": st.integers(-1, LAYERS + 2)}).filter(bool),
)
SERVED_LIMITS = EngineLimits("max_prob", LAYERS)


def served_verdict(xargs: dict):
    """The request vLLM's OpenAI server builds from a JSON body with these ``vllm_xargs`` (its own
    request model; None when the model refuses it: HTTP 400 before the plugin is asked) and the
    verdict of the rules on what it delivers."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    body = json.loads(json.dumps({"model": "m", "prompt": [5, 6, 7], "max_tokens": 4, "vllm_xargs": xargs}))
    try:
        request = CompletionRequest.model_validate(body)
    except ValidationError:
        return None, None
    return request, request_problems(request.vllm_xargs, SERVED_LIMITS)


@FAST
@given(xargs=SERVED_XARGS)
def test_served_values_follow_the_rules(xargs):
    """Flat ``vllm_xargs`` as a JSON body carries them, through vLLM's own request model and the
    SamplingParams it builds, then the engine's admission check."""
    import vllm_early_exit
    from vllm_early_exit.plugin.hooks import EarlyExitRequestError, check_request

    vllm_early_exit.register()
    request, verdict = served_verdict(xargs)
    if request is None:
        return  # vLLM's schema refused it (HTTP 400)
    try:
        params = request.to_sampling_params(4, {})
        check_request(params.extra_args, SERVED_LIMITS)
    except EarlyExitRequestError as exc:
        assert verdict.refused, f"{xargs} refused: {exc}"
        assert_names(str(exc), verdict.form or verdict.engine, verdict.source)
        return
    except VLLM_ERRORS as exc:
        assert vllm_refuses_integers(request.vllm_xargs), exc
        return
    assert not verdict.refused, f"{xargs} admitted, but {verdict.form + verdict.engine}"
    # JSON true and false reach the engine as 1 and 0, and mean what they say.
    if isinstance(xargs.get("early_exit_enabled"), bool) and len(xargs) == 1:
        assert verdict.settings.enabled is xargs["early_exit_enabled"]


def test_request_field_table_lists_each_key():
    """The table the README's reference reads: both spellings, the allowed values, the meaning."""
    assert {f.flat: f.name for f in REQUEST_FIELDS} == FLAT
    assert all(f.allowed and f.meaning for f in REQUEST_FIELDS)
    assert "[0, 1] for max_prob" in next(f.allowed for f in REQUEST_FIELDS if f.name == "threshold")


# --- A real engine ---------------------------------------------------------------------------------

ISSUE_OFFLINE = [
    ({"early_exit": {"threshold": -0.5}},
     "early_exit.threshold=-0.5 in the request's extra_args is invalid: this engine's signal is 'max_prob': "
     "it must lie in [0, 1]."),
    ({"early_exit": {"threshold": 7}}, "early_exit.threshold=7 in the request's extra_args is invalid: "
     "this engine's signal is 'max_prob': it must lie in [0, 1]."),
    ({"early_exit": {"max_layers": 99999999999}}, "early_exit.max_layers=99999999999 in the request's extra_args "
     "is invalid: this model has 6 layers, so a depth budget must lie in [1, 6]."),
    ({"early_exit": {"enabled": 1}}, "early_exit.enabled=1 in the request's extra_args is invalid: "
     "expected true or false."),
    ({"early_exit_bogus": 1}, "unknown early-exit key(s) ['early_exit_bogus'] in the request's vllm_xargs"),
]


@pytest.fixture(scope="module")
def engine_run(tiny_llama, tmp_path_factory):
    from .in_process import run_script

    return run_script(__file__, tmp_path_factory.mktemp("validation") / "engine.json", tiny_llama, timeout=600)


def test_issue_values_are_refused_by_the_engine(engine_run):
    assert engine_run["issue"] == [message for _, message in ISSUE_OFFLINE]


def test_drawn_requests_are_refused_or_honoured_by_the_engine(engine_run):
    draws = engine_run["draws"]
    refused = [d for d in draws if d["outcome"] == "refused"]
    honoured = [d for d in draws if d["outcome"] == "honoured"]
    assert len(refused) >= 3 and len(honoured) >= 3, draws
    assert engine_run["still_serving"]


def _engine_draws(llm, reference, prompts) -> list[dict]:
    """Hypothesis draws, each one request through ``LLM.generate`` of an engine with ``ENGINE``."""
    from vllm import SamplingParams

    from vllm_early_exit import get_exit_stats, reset_exit_stats

    limits = EngineLimits("max_prob", LAYERS)
    records: list[dict] = []

    def reference_tokens(prompt, settings_: RequestEarlyExit):
        """The reference's tokens for a setting it can state (None where it cannot)."""
        if not settings_.enabled:
            return reference.generate(prompt, NEW_TOKENS).tokens
        threshold = ENGINE["threshold"] if settings_.threshold is None else settings_.threshold
        budget = settings_.max_layers
        if budget is not None and budget <= 2:  # leaves after layer budget - 1, before a check can pass
            return reference.generate(prompt, NEW_TOKENS, exit_layers=(budget - 1,), threshold=0.0).tokens
        if budget is not None and budget < LAYERS:
            return None
        trace = reference.generate(prompt, NEW_TOKENS, exit_layers=(1, 3), threshold=threshold)
        margins = [abs(c - threshold) for step in trace.confidences for c in step.values()]
        return trace.tokens if min(margins, default=1.0) > 1e-3 else None  # a near tie: float noise may flip it

    @settings(max_examples=20, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(extra_args=one_request(), which=st.integers(0, len(prompts) - 1))
    # Valid values of each kind, whatever the draws bring: a threshold, a budget between two
    # checks (honoured as a budget: no token deeper), both, and early exit off.
    @example(extra_args={"early_exit": {"threshold": 0.3}}, which=0)
    @example(extra_args={"early_exit_max_layers": 4}, which=1)
    @example(extra_args={"early_exit": {"threshold": 0.9, "max_layers": 5}}, which=2)
    @example(extra_args={"early_exit_enabled": 0}, which=2)
    def draw(extra_args, which):
        verdict = request_problems(extra_args, limits)
        prompt = prompts[which]
        reset_exit_stats(llm)
        try:
            params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, extra_args=extra_args)
            out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        except EarlyExitConfigError as exc:
            assert verdict.refused, f"{extra_args} refused: {exc}"
            assert_names(str(exc), verdict.form or verdict.engine, verdict.source)
            records.append({"extra_args": repr(extra_args), "outcome": "refused", "message": str(exc)})
            return
        except VLLM_ERRORS as exc:
            assert vllm_refuses_integers(extra_args), exc
            return
        assert not verdict.refused, f"{extra_args} decoded, but {verdict.form + verdict.engine}"
        tokens = list(out[0].outputs[0].token_ids)
        own = verdict.settings or RequestEarlyExit()
        expected = reference_tokens(prompt, own)
        if expected is not None:
            assert tokens == expected, (extra_args, tokens, expected)
        stats = get_exit_stats(llm)
        if own.max_layers is not None:  # no decode token went past its budget
            assert sum(stats.exits_per_layer[own.max_layers:]) == 0 and (
                own.max_layers == LAYERS or stats.full_depth_tokens == 0
            ), (extra_args, stats.to_dict())
        records.append({"extra_args": repr(extra_args), "outcome": "honoured",
                        "compared": "reference" if expected is not None else "budget"})

    draw()
    return records


def run_engine_checks(model: str) -> dict:
    import torch
    from transformers import LlamaForCausalLM
    from vllm import LLM, SamplingParams

    from tests.conftest import ENGINE_DEFAULTS, tiny_prompts
    from tests.reference import ReferenceDecoder

    llm = LLM(model, skip_tokenizer_init=True, **ENGINE_DEFAULTS, additional_config={"early_exit": ENGINE})
    reference = ReferenceDecoder(LlamaForCausalLM.from_pretrained(model, dtype=torch.float32))
    prompts = tiny_prompts(3, seed=7)
    issue = []
    for extra_args, _ in ISSUE_OFFLINE:
        try:
            llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=2, extra_args=extra_args),
                         use_tqdm=False)
            issue.append("accepted")
        except EarlyExitConfigError as exc:
            issue.append(str(exc) if "unknown" not in str(exc) else str(exc).split(";")[0])
    draws = _engine_draws(llm, reference, prompts)
    # The engine keeps serving good requests after refusing bad ones.
    out = llm.generate([{"prompt_token_ids": prompts[1]}], SamplingParams(max_tokens=4, temperature=0.0,
                       ignore_eos=True), use_tqdm=False)
    return {"issue": issue, "draws": draws, "still_serving": len(out[0].outputs[0].token_ids) == 4}


# --- A real server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_chat_llama):
    from .server import running_server

    with running_server(tiny_chat_llama, "--early-exit-config", json.dumps(SERVED)) as url:
        yield url


def _post(url: str, model: Path, xargs: dict, *, stream: bool = False, chat: bool = False, prompt=(5, 6, 7, 8)):
    import httpx

    body = {"model": str(model), "max_tokens": NEW_TOKENS, "temperature": 0, "stream": stream, "ignore_eos": True,
            "vllm_xargs": xargs}
    if chat:
        body["messages"] = [{"role": "user", "content": "Hello"}]
    else:
        body.update(prompt=list(prompt), return_token_ids=True)
    # json.dumps writes NaN and Infinity as Python's json reads them (the server's parser).
    return httpx.post(f"{url}/v1/{'chat/completions' if chat else 'completions'}", content=json.dumps(body),
                      headers={"Content-Type": "application/json"}, timeout=300)


ISSUE_SERVED = [
    ({"early_exit_threshold": -0.5}, "early_exit_threshold=-0.5 in the request's vllm_xargs is invalid: "
     "this engine's signal is 'max_prob': it must lie in [0, 1]."),
    ({"early_exit_threshold": 7}, "early_exit_threshold=7 in the request's vllm_xargs is invalid"),
    ({"early_exit_max_layers": 99999999999}, "early_exit_max_layers=99999999999 in the request's vllm_xargs is "
     "invalid: this model has 6 layers, so a depth budget must lie in [1, 6]."),
    ({"early_exit_bogus": 1}, "unknown early-exit key(s) ['early_exit_bogus'] in the request's vllm_xargs; known "
     "keys are ['early_exit_enabled', 'early_exit_max_layers', 'early_exit_threshold']"),
    ({"early_exit_enabled": "yes"}, "early_exit_enabled='yes' in the request's vllm_xargs is invalid"),
]


@pytest.mark.parametrize("xargs,message", ISSUE_SERVED)
def test_issue_values_get_http_400_streamed_or_not(served, tiny_chat_llama, xargs, message):
    for stream in (False, True):
        response = _post(served, tiny_chat_llama, xargs, stream=stream)
        assert response.status_code == 400, (stream, response.text)
        assert message in response.json()["error"]["message"]
    assert _post(served, tiny_chat_llama, xargs, chat=True, stream=True).status_code == 400


@pytest.fixture(scope="module")
def chat_reference(tiny_chat_llama):
    import torch
    from transformers import LlamaForCausalLM

    from .reference import ReferenceDecoder

    return ReferenceDecoder(LlamaForCausalLM.from_pretrained(tiny_chat_llama, dtype=torch.float32))


@settings(max_examples=10, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(xargs=SERVED_XARGS)
@example(xargs={"early_exit_threshold": 0.5})
@example(xargs={"early_exit_enabled": False})
@example(xargs={"early_exit_max_layers": 1})
def test_drawn_served_values_are_refused_or_honoured(served, tiny_chat_llama, chat_reference, xargs):
    request, verdict = served_verdict(xargs)
    response = _post(served, tiny_chat_llama, xargs)
    if request is None or vllm_refuses_integers(request.vllm_xargs):
        assert response.status_code == 400, (xargs, response.text)
        return
    if verdict.refused:
        assert response.status_code == 400, (xargs, response.text)
        assert_names(response.json()["error"]["message"], verdict.form or verdict.engine, verdict.source)
        return
    assert response.status_code == 200, (xargs, response.text)
    tokens = response.json()["choices"][0]["token_ids"]
    own = verdict.settings or RequestEarlyExit()
    prompt = [5, 6, 7, 8]
    if not own.enabled:
        assert tokens == chat_reference.generate(prompt, NEW_TOKENS).tokens
    elif own.max_layers is not None and own.max_layers <= 2:
        assert tokens == chat_reference.generate(prompt, NEW_TOKENS, exit_layers=(own.max_layers - 1,)).tokens
    elif own.max_layers in (None, LAYERS):
        threshold = SERVED["threshold"] if own.threshold is None else own.threshold
        trace = chat_reference.generate(prompt, NEW_TOKENS, exit_layers=(1, 3), threshold=threshold)
        if min(abs(c - threshold) for step in trace.confidences for c in step.values()) > 1e-3:
            assert tokens == trace.tokens, xargs


def test_command_line_start_up_refuses_settings_that_leave_no_layer(tiny_llama):
    """Checked against the model at start-up, and named as the option that gave it: the
    ``vllm serve`` path (its engine-args parser, ``from_cli_args``, ``create_engine_config``), in
    this process, up to where the server would start its engine."""
    import vllm_early_exit
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vllm_early_exit.register()
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args([
        "--model", str(tiny_llama), "--dtype", "float32", "--max-model-len", "512", "--skip-tokenizer-init",
        "--early-exit-config", '{"skip_layers": [5, 4, 3, 2, 1, 0]}',
    ])
    message = (r"early_exit.skip_layers=\[0, 1, 2, 3, 4, 5\] in --early-exit-config is invalid: it names every "
               "layer of this 6-layer model")
    with pytest.raises(EarlyExitConfigError, match=message):
        AsyncEngineArgs.from_cli_args(args).create_engine_config()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(sys.argv[1], "w") as f:
        json.dump(run_engine_checks(sys.argv[2]), f)
