"""The oracle command on a real engine, checked against the HF reference."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def oracle_report(tiny_chat_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("oracle")
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_early_exit", "oracle", "--model", str(tiny_chat_llama),
         "--prompts", "3", "--max-tokens", "10", "--max-skip", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("oracle.json", "oracle.md", "oracle.png"):
        assert (out / name).stat().st_size > 0
    return json.loads((out / "oracle.json").read_text())


@pytest.fixture(scope="module")
def chat_reference(tiny_chat_llama):
    from transformers import LlamaForCausalLM

    from .reference import ReferenceDecoder

    return ReferenceDecoder(LlamaForCausalLM.from_pretrained(tiny_chat_llama, dtype=torch.float32))


def test_min_depth_is_the_shallowest_identical_depth(oracle_report, chat_reference):
    report = oracle_report
    layers = report["num_layers"]
    for prompt, full, depth in zip(report["prompt_token_ids"], report["outputs_full_depth"], report["min_depths"]):
        assert chat_reference.generate(prompt, 10).tokens == full

        def at_depth(d):  # every decode token leaves after layer d - 1
            if d == layers:
                return full
            return chat_reference.generate(prompt, 10, exit_layers=(d - 1,), threshold=0.0).tokens

        assert at_depth(depth) == full
        assert all(at_depth(d) != full for d in range(1, depth))
    assert report["mean_min_depth"] == pytest.approx(sum(report["min_depths"]) / len(report["min_depths"]))


def test_skip_sets_are_scored_as_skip_layers_decode(oracle_report, chat_reference):
    report = oracle_report
    assert [len(s["skip_layers"]) for s in report["skip_path"]] == [0, 1]
    assert report["skip_path"][0]["identical"] == 1.0
    chosen = report["skip_path"][1]
    identical = [
        chat_reference.generate(prompt, 10, skip_layers=tuple(chosen["skip_layers"])).tokens == full
        for prompt, full in zip(report["prompt_token_ids"], report["outputs_full_depth"])
    ]
    assert chosen["identical"] == pytest.approx(sum(identical) / len(identical))
