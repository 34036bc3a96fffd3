"""The oracle command on a real engine, checked against the HF reference."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from .conftest import one_process_env

THRESHOLDS = (0.5, 0.9, 0.99, 0.999)


def _oracle(model, out, *options) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_early_exit", "oracle", "--model", str(model),
         "--prompts", "3", "--max-tokens", "10", "--max-skip", "1", "--check-layers", "1,2,3,4",
         "--thresholds", ",".join(str(t) for t in THRESHOLDS), "--out", str(out), *options],
        capture_output=True, text=True, timeout=900, env=one_process_env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("oracle.json", "oracle.md", "oracle.png"):
        assert (out / name).stat().st_size > 0
    assert "## Per-token oracle (teacher-forced)" in (out / "oracle.md").read_text()
    return json.loads((out / "oracle.json").read_text())


@pytest.fixture(scope="module")
def oracle_report(tiny_chat_llama, tmp_path_factory):
    return _oracle(tiny_chat_llama, tmp_path_factory.mktemp("oracle"))


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


def test_resume_keeps_what_a_stopped_run_measured(oracle_report, tiny_chat_llama, tmp_path):
    """A run stopped after two skip sets: the resumed run reuses its depth budgets and
    scores, and scores only the rest."""
    from vllm_early_exit.tools.oracle import resumed_report

    report = oracle_report
    layers = report["num_layers"]
    stopped = {**report, "complete": False, "skip_path": report["skip_path"][:1]}
    stopped["scores"] = {key: report["scores"][key] for key in ("", "0")}
    stopped["scores"]["0"] = [1.0, 1.0]  # a score only a resumed run can carry: layer 0 must win
    # Budget outputs only a resumed run can carry: prompt 0 already right at depth 1.
    stopped["outputs_per_depth"] = [list(per_depth) for per_depth in report["outputs_per_depth"]]
    stopped["outputs_per_depth"][0] = [report["outputs_full_depth"][0]] * layers
    (tmp_path / "oracle.json").write_text(json.dumps(stopped))
    resumed = _oracle(tiny_chat_llama, tmp_path, "--resume")
    assert resumed["complete"]
    assert resumed["min_depths"] == [1, *report["min_depths"][1:]]
    assert resumed["skip_path"][1] == {"skip_layers": [0], "token_agreement": 1.0, "identical": 1.0}
    assert resumed["scores"] == {**report["scores"], "0": [1.0, 1.0]}
    # A run with other lengths is refused with the reason.
    expected = {key: report[key] for key in ("model", "num_layers", "max_tokens", "prompt_token_ids")}
    with pytest.raises(SystemExit, match="another max_tokens"):
        resumed_report(tmp_path, {**expected, "max_tokens": 11})


def test_per_token_oracle_reads_each_layer_as_the_reference_does(oracle_report, chat_reference):
    """Teacher-forced on the full-depth outputs, the reference reads every layer (no exit):
    the first right layer of each position, the check layers' max-probs, and the max-prob
    rule's agreement and depth at each threshold must be what the report says."""
    report = oracle_report
    tokens = report["token_oracle"]
    layers = report["num_layers"]
    checks = tokens["check_layers"]
    assert checks == [1, 2, 3, 4]
    earliest, max_probs, traces = [], [], []
    for prompt, full in zip(report["prompt_token_ids"], report["outputs_full_depth"]):
        trace = chat_reference.generate(prompt, len(full), exit_layers=tuple(range(layers)), threshold=2.0, teacher=full)
        for k, target in enumerate(full[1:]):
            readouts = trace.readout_tokens[k]
            right = [layer for layer in range(layers) if readouts[layer] == target]
            earliest.append(right[0] + 1 if right else layers)
            max_probs.append([trace.confidences[k][layer] for layer in checks])
            traces.append((readouts, trace.confidences[k], target))
    assert tokens["positions"] == len(earliest)
    assert tokens["earliest_right"] == earliest
    assert tokens["depth_every_token_right"] == pytest.approx(sum(earliest) / len(earliest) / layers)
    flat = [p for row in tokens["max_probs_at_checks"] for p in row]
    assert flat == pytest.approx([p for row in max_probs for p in row], abs=1e-4)
    assert [r["threshold"] for r in tokens["max_prob"]] == list(THRESHOLDS)
    for row in tokens["max_prob"]:
        exits = [next((layer for layer in checks if conf[layer] >= row["threshold"]), layers - 1) for _, conf, _ in traces]
        right = [readouts[layer] == target for layer, (readouts, _, target) in zip(exits, traces)]
        assert row["token_agreement"] == pytest.approx(sum(right) / len(right))
        assert row["depth"] == pytest.approx(sum(layer + 1 for layer in exits) / len(exits) / layers)
    depths = [tokens["oracle_depth"][str(a)] for a in (0.99, 0.95, 0.9)]
    reachable = [d for d in depths if d is not None]
    assert reachable == sorted(reachable, reverse=True)
    assert all(d <= tokens["depth_every_token_right"] for d in reachable)


def test_oracle_depth_lets_the_deepest_tokens_leave_wrong():
    """Hand-counted: four tokens, six layers; the fourth is right at no layer."""
    from vllm_early_exit.tools.oracle import oracle_depth

    earliest = torch.tensor([3, 6, 2, 6])
    somewhere = torch.tensor([True, True, True, False])
    assert oracle_depth(earliest, somewhere, 6, 0.75) == pytest.approx((3 + 6 + 2 + 1) / 4 / 6)
    assert oracle_depth(earliest, somewhere, 6, 0.5) == pytest.approx((3 + 2 + 1 + 1) / 4 / 6)
    assert oracle_depth(earliest, somewhere, 6, 0.25) == pytest.approx((2 + 1 + 1 + 1) / 4 / 6)
    assert oracle_depth(earliest, somewhere, 6, 1.0) is None  # the fourth is never right
