"""Settings: parsing, defaults, and the errors users see at start-up."""

from __future__ import annotations

import json

import pytest

from vllm_early_exit import EarlyExitConfig, EarlyExitConfigError, EarlyExitUnsupportedError

from .conftest import ENGINE_DEFAULTS


def test_defaults_check_from_half_depth_to_second_to_last():
    config = EarlyExitConfig.from_dict({})
    assert config.enabled and config.signal == "max_prob" and config.policy == "all"
    assert config.exit_layers_for(30) == tuple(range(15, 29))
    assert EarlyExitConfig.from_dict({"min_layer": 4}).exit_layers_for(6) == (4,)
    assert EarlyExitConfig.from_dict({"exit_layers": [3, 1]}).exit_layers == (1, 3)


def test_round_trip_through_dict():
    raw = {"signal": "entropy", "threshold": 0.5, "exit_layers": [2, 4], "policy": "quorum", "quorum": 0.5}
    for raw in (raw, {}, {"skipped_kv": "recompute", "max_waiting": 3}):
        config = EarlyExitConfig.from_dict(raw)
        assert EarlyExitConfig.from_dict(config.to_dict()) == config
        json.dumps(config.to_dict())


BAD_SETTINGS = [
    ({"treshold": 0.9}, "treshold"),
    ({"signal": "confidence"}, "early_exit.signal='confidence'.*'entropy', 'gate', 'head', 'margin', 'max_prob', 'saturation'"),
    ({"threshold": 1.5}, r"early_exit.threshold=1.5.*\[0, 1\]"),
    ({"signal": "entropy", "threshold": -0.1}, "early_exit.threshold=-0.1.*>= 0"),
    ({"threshold": "high"}, "early_exit.threshold='high'.*number"),
    ({"policy": "majority"}, "early_exit.policy='majority'.*'all', 'per_token', 'quorum'"),
    ({"policy": "quorum", "quorum": 0}, r"early_exit.quorum=0.*\(0, 1\]"),
    ({"quorum": 0.5}, "early_exit.quorum=0.5.*only applies with policy 'quorum'"),
    ({"enabled": "yes"}, "early_exit.enabled='yes'.*true or false"),
    ({"min_layer": -1}, "early_exit.min_layer=-1"),
    ({"exit_layers": [-1]}, "early_exit.exit_layers=\\[-1\\]"),
    ({"signal": "saturation", "threshold": 1.5}, r"early_exit.threshold=1.5.*'saturation'.*\[-1, 1\]"),
    ({"signal": "head"}, "early_exit.signal='head'.*set early_exit.heads"),
    ({"signal": "gate", "threshold": 0.5}, "early_exit.signal='gate'.*set early_exit.heads"),
    ({"heads": "/nonexistent/heads"}, "early_exit.heads='/nonexistent/heads' is not a heads folder.*train-heads"),
    ({"heads": 3}, "early_exit.heads=3"),
    ({"skip_layers": "2"}, "early_exit.skip_layers='2'"),
    ({"skip_layers": [1, -2]}, "early_exit.skip_layers"),
    ({"exit_layers": "3"}, "early_exit.exit_layers='3'"),
    ({"exit_layers": [2], "min_layer": 1}, "exclusive"),
    ({"log_interval_s": -5}, "early_exit.log_interval_s=-5"),
    # A layer named twice is a typo, not a request for two checks.
    ({"exit_layers": [1, 1]}, r"early_exit.exit_layers=\[1, 1\] in the engine settings is invalid: .*distinct"),
    ({"skip_layers": [2, 2]}, r"early_exit.skip_layers=\[2, 2\] in the engine settings is invalid: .*distinct"),
    # Numbers too large for a float are not numbers (they raised OverflowError).
    ({"threshold": 10**400}, "early_exit.threshold=1000.*is invalid: expected a finite number"),
    ({"log_interval_s": float("inf")}, "early_exit.log_interval_s=inf"),
]


@pytest.mark.parametrize("raw,message", BAD_SETTINGS)
def test_bad_setting_names_key_and_allowed_values(raw, message):
    with pytest.raises(EarlyExitConfigError, match=message):
        EarlyExitConfig.from_dict(raw)


def test_errors_say_where_the_settings_came_from(tmp_path):
    with pytest.raises(EarlyExitConfigError, match=r"early_exit.threshold=7 in --early-exit-config is invalid"):
        EarlyExitConfig.from_cli_value('{"threshold": 7}')
    with pytest.raises(EarlyExitConfigError, match="unknown early_exit setting.*'treshold'.* in --early-exit-config"):
        EarlyExitConfig.from_cli_value('{"treshold": 0.9}')
    with pytest.raises(EarlyExitConfigError, match=r"early_exit.exit_layers=\[1, 1\] in --early-exit-config"):
        EarlyExitConfig.from_cli_value('{"exit_layers": [1, 1]}')
    with pytest.raises(EarlyExitConfigError, match="early_exit.threshold=7 in the engine settings"):
        EarlyExitConfig.from_additional_config({"early_exit": {"threshold": 7}})
    # A settings file that names a heads folder which is not one: the file reader's message, and where.
    path = tmp_path / "settings.json"
    path.write_text('{"heads": "/nonexistent/heads"}')
    with pytest.raises(EarlyExitConfigError, match=r"is not a heads folder.*\(in --early-exit-config\)"):
        EarlyExitConfig.from_cli_value(str(path))


def test_a_key_given_twice_in_early_exit_config_is_refused():
    """JSON keeps the last of two equal keys silently; the first value would be lost without a word."""
    with pytest.raises(EarlyExitConfigError, match="--early-exit-config: key 'threshold' is given twice"):
        EarlyExitConfig.from_cli_value('{"threshold": 0.5, "exit_layers": [1], "threshold": 0.9}')


def test_keys_that_are_not_strings_are_named():
    with pytest.raises(EarlyExitConfigError, match=r"unknown early_exit setting\(s\) \[1, 'x'\]"):
        EarlyExitConfig.from_dict({1: 2, "x": 3})


def test_settings_must_be_an_object():
    with pytest.raises(EarlyExitConfigError, match="JSON object"):
        EarlyExitConfig.from_dict([0.9])


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"exit_layers": [2, 5]}, r"early_exit.exit_layers=\[2, 5\].*6 layers.*\[0, 4\]"),
        ({"min_layer": 5}, r"early_exit.min_layer=5.*6 layers.*\[0, 4\]"),
        ({"skip_layers": [5, 3, 1, 0, 2, 4]}, r"early_exit.skip_layers=\[0, 1, 2, 3, 4, 5\].*names every layer"),
    ],
)
def test_layer_out_of_range(raw, message):
    with pytest.raises(EarlyExitConfigError, match=message):
        EarlyExitConfig.from_dict(raw).exit_layers_for(6)


# The same errors through the real engine: raised by LLM(...) in the calling
# process while vLLM builds its configuration, before an engine process starts
# (an engine failure would surface as vLLM's RuntimeError instead).


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    """A config-only Mistral (LLaMA with sliding-window attention): a close relative early exit refuses."""
    from transformers import MistralConfig

    path = tmp_path_factory.mktemp("tiny_mistral")
    MistralConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=64,
    ).save_pretrained(path)
    return path


def _start(model, **kwargs):
    from vllm import LLM

    return LLM(str(model), skip_tokenizer_init=True, **{**ENGINE_DEFAULTS, **kwargs})


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"exit_layers": [9]}, r"early_exit.exit_layers=\[9\].*6 layers"),
        ({"signal": "confidence"}, "early_exit.signal='confidence'"),
        ({"threshold": 2}, "early_exit.threshold=2"),
        ({"exit_layers": [1, 1]}, r"early_exit.exit_layers=\[1, 1\] in the engine settings.*distinct"),
        ({"skip_layers": list(range(6))}, r"early_exit.skip_layers=\[0, 1, 2, 3, 4, 5\].*names every layer"),
    ],
)
def test_engine_refuses_bad_settings_at_start(tiny_llama, settings, message):
    with pytest.raises(EarlyExitConfigError, match=message):
        _start(tiny_llama, additional_config={"early_exit": settings})


def test_engine_refuses_other_architectures(tiny_mistral):
    message = r"LLaMA-family models \(model_type \['llama', 'qwen2'\]\).*model_type 'mistral'"
    with pytest.raises(EarlyExitUnsupportedError, match=message):
        _start(tiny_mistral, additional_config={"early_exit": {}})
    with pytest.raises(EarlyExitUnsupportedError, match=message):
        _start(tiny_mistral, hf_overrides={"architectures": ["EarlyExitLlamaForCausalLM"]})


def test_engine_refuses_pipeline_parallelism(tiny_llama):
    with pytest.raises(EarlyExitUnsupportedError, match="pipeline parallelism"):
        _start(tiny_llama, additional_config={"early_exit": {}}, pipeline_parallel_size=2)


def test_engine_refuses_lora(tiny_llama):
    with pytest.raises(EarlyExitUnsupportedError, match="does not support LoRA adapters"):
        _start(tiny_llama, additional_config={"early_exit": {}}, enable_lora=True)


def test_engine_refuses_model_runner_v2_when_asked_for(tiny_llama, monkeypatch):
    """Per-request settings cannot reach the model on Model Runner V2: never start on it."""
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(EarlyExitUnsupportedError, match="V1 model runner.*VLLM_USE_V2_MODEL_RUNNER=1"):
        _start(tiny_llama, additional_config={"early_exit": {}})
