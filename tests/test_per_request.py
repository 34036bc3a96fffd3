"""Per-request control: a request's own early-exit threshold, or early exit off."""

from __future__ import annotations

import pytest

from vllm_early_exit.config import EarlyExitConfigError, RequestEarlyExit

from .conftest import EVEN_TOKENS, MIXED, NEW_TOKENS, run_engine, tiny_prompts

FORCED = {"exit_layers": [1, 3], "threshold": 0.0}


def test_request_with_early_exit_off_matches_plain_vllm_in_a_mixed_batch(tiny_llama):
    """Request 0 turns early exit off; the others leave at layer 1 whenever they can."""
    prompts = tiny_prompts(4, seed=21)
    off = {"early_exit": {"enabled": False}}
    requests = [(prompts[0], 12, off)] + [(p, NEW_TOKENS) for p in prompts[1:]]
    early = run_engine(tiny_llama, requests, batched=True, early_exit=FORCED)
    plain = run_engine(tiny_llama, [(p, n) for p, n, *_ in requests], batched=True)
    assert early["outputs"][0] == plain["outputs"][0]
    # The others did exit once request 0 was done, so their outputs differ from plain.
    assert early["stats"][0]["early_exit_tokens"] > 0
    assert early["outputs"][1:] != plain["outputs"][1:]


def test_request_threshold_replaces_the_engine_threshold(tiny_llama, mixed_traces):
    """The engine forces exits (threshold 0); requests that ask for threshold 0.5 decode
    exactly as an engine whose threshold is 0.5 (checked against the HF reference there)."""
    prompts, traces = mixed_traces
    flat = {"early_exit_threshold": MIXED["threshold"]}  # the OpenAI API's vllm_xargs spelling
    nested = {"early_exit": {"threshold": MIXED["threshold"]}}
    result = run_engine(
        tiny_llama,
        [(prompts[0], NEW_TOKENS, flat), (prompts[1], NEW_TOKENS, nested), (prompts[2], NEW_TOKENS)],
        early_exit=FORCED,
    )
    assert result["outputs"][:2] == [t.tokens for t in traces[:2]]
    # The third request has no settings of its own: it leaves at layer 1 every step.
    assert result["outputs"][2] != traces[2].tokens


def test_request_settings_hold_with_two_stage_checks(tiny_llama, reference, even_shortlist):
    """per_token with a shortlist, four requests in one batch: one turns early exit off, one
    brings its own threshold; each request decodes as the reference does with its own settings
    (off: full depth), through both stages of every check."""
    prompts = tiny_prompts(4, seed=7)
    engine_threshold, own = 0.2, 0.3
    rule = {"exit_layers": (1, 3), "shortlist": EVEN_TOKENS}
    expected = [
        reference.generate(prompts[0], NEW_TOKENS).tokens,
        reference.generate(prompts[1], NEW_TOKENS, threshold=own, **rule).tokens,
        *(reference.generate(p, NEW_TOKENS, threshold=engine_threshold, **rule).tokens for p in prompts[2:]),
    ]
    requests = [
        (prompts[0], NEW_TOKENS, {"early_exit": {"enabled": False}}),
        (prompts[1], NEW_TOKENS, {"early_exit": {"threshold": own}}),
        *((p, NEW_TOKENS) for p in prompts[2:]),
    ]
    settings = {"exit_layers": [1, 3], "threshold": engine_threshold, "policy": "per_token",
                "shortlist": str(even_shortlist)}
    result = run_engine(tiny_llama, requests, early_exit=settings, batched=True)
    assert result["outputs"] == expected
    assert result["stats"][0]["early_exit_tokens"] > 0


@pytest.mark.parametrize(
    "extra_args,message",
    [
        ({"early_exit": {"threshold": "high"}}, "early_exit.threshold='high' in the request's extra_args is invalid"),
        ({"early_exit_enabled": "maybe"}, "early_exit_enabled='maybe' in the request's vllm_xargs is invalid: "
         "expected true or false"),
        # Booleans are booleans: 1 is refused where a request can say true (offline, nested).
        ({"early_exit": {"enabled": 1}}, "early_exit.enabled=1 in the request's extra_args is invalid: "
         "expected true or false"),
        ({"early_exit_enabled": "true"}, "early_exit_enabled='true' in the request's vllm_xargs is invalid"),
        ({"early_exit_enabled": 2}, "early_exit_enabled=2 in the request's vllm_xargs is invalid"),
        ({"early_exit": {"depth": 3}}, "unknown per-request early_exit setting.*'depth'.*allowed keys are "
         r"\['enabled', 'max_layers', 'threshold'\]"),
        # An unknown flat key is refused as an unknown nested one is (a typo must not pass silently).
        ({"early_exit_bogus": 1}, r"unknown early-exit key\(s\) \['early_exit_bogus'\] in the request's vllm_xargs; "
         r"known keys are \['early_exit_enabled', 'early_exit_max_layers', 'early_exit_threshold'\]"),
        ({"early_exit_treshold": 0.5, "seed_of_mine": 1}, "unknown early-exit key.*'early_exit_treshold'"),
        ({"early_exit": {"enabled": False}, "early_exit_threshold": 0.5}, "given twice"),
        ({"early_exit": {"max_layers": 0}}, "early_exit.max_layers=0.*expected an integer number of layers in \\[1, "),
        ({"early_exit_max_layers": 2.5}, "early_exit_max_layers=2.5 in the request's vllm_xargs"),
        ({"early_exit_max_layers": "3"}, "early_exit_max_layers='3' in the request's vllm_xargs"),
        ({"early_exit": {"threshold": float("nan")}}, "early_exit.threshold=nan"),
        ({"early_exit": {"enabled": False, "max_layers": 3}},
         "early_exit.max_layers cannot be combined with early_exit.enabled=false in the request's extra_args"),
        ({"early_exit_enabled": 0, "early_exit_threshold": 0.5},
         "early_exit_threshold cannot be combined with early_exit_enabled=false"),
    ],
)
def test_bad_request_settings_are_refused_when_the_request_is_made(extra_args, message):
    import vllm_early_exit
    from vllm import SamplingParams

    vllm_early_exit.register()  # what vLLM does in every process
    with pytest.raises(EarlyExitConfigError, match=message):
        SamplingParams(max_tokens=4, extra_args=extra_args)
    with pytest.raises(EarlyExitConfigError, match=message):
        RequestEarlyExit.from_extra_args(extra_args)
