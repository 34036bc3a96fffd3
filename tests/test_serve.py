"""`vllm serve --enable-early-exit`: a real server on 127.0.0.1 and the real `openai` client."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import run_engine
from .server import fetch_metrics, free_port, metric_value, running_server, serve_command

# Random weights over a 49k vocabulary give low probabilities: 0.03 splits them.
SETTINGS = {"exit_layers": [1, 3], "threshold": 0.03}


@pytest.fixture(scope="module")
def server(tiny_chat_llama):
    with running_server(tiny_chat_llama, "--enable-early-exit", "--early-exit-config", json.dumps(SETTINGS)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=300)


def _counters(url: str, model: str) -> dict:
    text = fetch_metrics(url)
    return {
        "decode": metric_value(text, "vllm:early_exit_decode_tokens_total", model_name=model),
        "early": metric_value(text, "vllm:early_exit_early_tokens_total", model_name=model),
        "full": metric_value(text, "vllm:early_exit_full_depth_tokens_total", model_name=model),
        "layers": [
            metric_value(text, "vllm:early_exit_layer_exits_total", model_name=model, layer=str(layer))
            for layer in range(6)
        ],
        "mean": metric_value(text, "vllm:early_exit_mean_layers", model_name=model),
    }


def test_completions_chat_and_streaming(client, tiny_chat_llama):
    model = str(tiny_chat_llama)
    completion = client.completions.create(model=model, prompt="Hello, my name is", max_tokens=12, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens == 12

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=12, temperature=0
    )
    assert chat.choices[0].message.content

    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=12,
            temperature=0,
            stream=True,
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and streamed


def test_metrics_match_offline_statistics(server, client, tiny_chat_llama):
    """The server's counters move with a request exactly as the offline counters do for it."""
    model = str(tiny_chat_llama)
    before = _counters(server, model)
    assert before["decode"] is not None, "the early-exit metrics are missing from /metrics"
    prompt = list(range(1000, 1020))
    out = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    after = _counters(server, model)

    offline = run_engine(tiny_chat_llama, [(prompt, 24)], early_exit=SETTINGS)
    stats = offline["stats"][0]
    assert after["decode"] - before["decode"] == stats["decode_tokens"] == 23
    assert after["early"] - before["early"] == stats["early_exit_tokens"]
    assert after["full"] - before["full"] == stats["full_depth_tokens"]
    assert [a - b for a, b in zip(after["layers"], before["layers"])] == stats["exits_per_layer"]
    assert stats["early_exit_tokens"] > 0, "this setting should exit some tokens on the tiny model"
    assert out.choices[0].text


def test_64_concurrent_requests(server, client, tiny_chat_llama):
    model = str(tiny_chat_llama)
    decode_before = _counters(server, model)["decode"]

    def one(i: int) -> int:
        r = client.completions.create(model=model, prompt=f"Request {i}: count to ten.", max_tokens=8, temperature=0)
        return r.usage.completion_tokens

    with ThreadPoolExecutor(max_workers=64) as pool:
        tokens = list(pool.map(one, range(64)))
    assert len(tokens) == 64 and all(t >= 1 for t in tokens)
    after = _counters(server, model)
    assert after["decode"] > decode_before
    assert after["mean"] is not None and 0 < after["mean"] <= 6
    # Still serving.
    assert client.models.list().data[0].id == model


def test_additional_config_spelling_is_equivalent(tiny_chat_llama):
    settings = json.dumps({"early_exit": SETTINGS})
    with running_server(tiny_chat_llama, "--additional-config", settings) as url:
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        client.completions.create(model=str(tiny_chat_llama), prompt=list(range(1000, 1020)), max_tokens=6, temperature=0)
        assert _counters(url, str(tiny_chat_llama))["decode"] == 5


@pytest.mark.parametrize(
    "config,message",
    [
        ('{"treshold": 0.9}', "unknown early_exit setting"),
        ('{"threshold": 7}', "early_exit.threshold=7"),
        ('{"exit_layers": [12]}', r"early_exit.exit_layers=\[12\].*6 layers"),
        ("/nonexistent/early_exit.json", "not inline JSON and not a readable file"),
    ],
)
def test_bad_early_exit_config_stops_the_server(tiny_chat_llama, config, message):
    import re

    proc = subprocess.run(
        serve_command(tiny_chat_llama, free_port(), "--early-exit-config", config),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert re.search(message, proc.stdout + proc.stderr)
    assert "Starting vLLM API server" not in proc.stdout + proc.stderr


def test_request_with_early_exit_off_is_plain_vllm_while_others_exit(server, client, tiny_chat_llama):
    model = str(tiny_chat_llama)
    prompt = list(range(2000, 2020))
    before = _counters(server, model)

    def plain_request():
        return client.completions.create(
            model=model, prompt=prompt, max_tokens=16, temperature=0,
            extra_body={"ignore_eos": True, "vllm_xargs": {"early_exit_enabled": False}},
        )

    def exiting_request(i: int):
        return client.completions.create(
            model=model, prompt=[3000 + i] * 12, max_tokens=32, temperature=0,
            # Threshold 0 for these: they leave at the first check layer whenever they can.
            extra_body={"ignore_eos": True, "vllm_xargs": {"early_exit_threshold": 0.0}},
        )

    with ThreadPoolExecutor(max_workers=5) as pool:
        others = [pool.submit(exiting_request, i) for i in range(4)]
        off = pool.submit(plain_request).result()
        [f.result() for f in others]

    reference = run_engine(tiny_chat_llama, [(prompt, 16)])["outputs"][0]
    served = client.completions.create(
        model=model, prompt=prompt, max_tokens=16, temperature=0, logprobs=0,
        extra_body={"ignore_eos": True, "vllm_xargs": {"early_exit_enabled": False}, "return_token_ids": True},
    )
    assert served.choices[0].token_ids == reference
    assert off.choices[0].text == served.choices[0].text
    assert _counters(server, model)["early"] > before["early"], "the other requests should have exited"


def test_bad_request_settings_get_http_400(client, tiny_chat_llama):
    import openai

    with pytest.raises(openai.BadRequestError, match="early_exit.threshold"):
        client.completions.create(
            model=str(tiny_chat_llama), prompt="hi", max_tokens=4,
            extra_body={"vllm_xargs": {"early_exit_threshold": "high"}},
        )
