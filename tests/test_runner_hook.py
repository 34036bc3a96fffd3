"""The runner reaches the model from the code that builds it: the load hook (``plugin/loading.py``).

vLLM's V1 runner builds the model inside its ``load_model``; the plugin wraps that method so
the runner hands itself over for the length of the call, and the model takes it while it is
constructed (``RunnerView.of_loading_runner``). Nothing is read from the call stack: outside a
load, or with a runner that is not V1, the model refuses to start.
"""

from __future__ import annotations

import types

import pytest

from vllm_early_exit.errors import EarlyExitUnsupportedError
from vllm_early_exit.model_executor.early_exit.runner import RunnerView, loading
from vllm_early_exit.plugin.loading import _wrap_load_model, install_runner_hook, runner_classes

from .conftest import run_engine, tiny_prompts


def v1_like_runner():
    return types.SimpleNamespace(input_batch=object(), requests={})


def test_the_model_takes_the_runner_that_is_loading_it():
    runner = v1_like_runner()
    with loading(runner):
        assert RunnerView.of_loading_runner().runner is runner
    with pytest.raises(EarlyExitUnsupportedError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        RunnerView.of_loading_runner()  # no load under way


def test_a_runner_without_v1_state_is_refused_and_the_stack_is_not_searched():
    self = v1_like_runner()  # a V1-looking ``self`` up the call stack, as vLLM's runner is  # noqa: F841
    with loading(types.SimpleNamespace(req_states=object())):  # Model Runner V2 keeps neither
        with pytest.raises(EarlyExitUnsupportedError, match="V1 model runner"):
            RunnerView.of_loading_runner()
    with pytest.raises(EarlyExitUnsupportedError):
        RunnerView.of_loading_runner()


def test_the_wrapped_load_model_hands_the_runner_over_for_the_call_only():
    seen = []

    def load_model(runner, load_dummy_weights=False):
        seen.append((RunnerView.of_loading_runner().runner, load_dummy_weights))
        return "model"

    runner = v1_like_runner()
    assert _wrap_load_model(load_model)(runner, load_dummy_weights=True) == "model"
    assert seen == [(runner, True)]
    with pytest.raises(EarlyExitUnsupportedError):
        RunnerView.of_loading_runner()


def test_the_hook_wraps_this_platforms_v1_runner_once():
    install_runner_hook()
    classes = runner_classes()
    assert classes and all(getattr(c.load_model, "__early_exit_hook__", False) for c in classes)
    before = [c.__dict__["load_model"] for c in classes if "load_model" in c.__dict__]
    install_runner_hook()  # register() runs again in the same process: nothing is wrapped twice
    assert [c.__dict__["load_model"] for c in classes if "load_model" in c.__dict__] == before


def test_per_request_settings_reach_a_model_built_in_vllms_own_processes(tiny_llama):
    """vLLM's default process layout (engine core and worker in processes of their own): a
    request with early exit off decodes at full depth beside requests forced to leave."""
    prompts = tiny_prompts(2, seed=5)
    requests = [(prompts[0], 6, {"early_exit": {"enabled": False}}), (prompts[1], 6)]
    forced = {"exit_layers": [1], "threshold": 0.0}
    early = run_engine(tiny_llama, requests, early_exit=forced, one_process=False)
    plain = run_engine(tiny_llama, [(p, n) for p, n, *_ in requests])
    assert early["outputs"][0] == plain["outputs"][0]
    assert early["stats"][0]["early_exit_tokens"] > 0
