"""Qwen2 checkpoints (``model_type: qwen2``) under early exit, against the HF transformers reference.

Two tiny random Qwen2 checkpoints (``conftest.make_tiny_qwen2``: non-zero q/k/v
biases; ``tiny_qwen2`` with an untied LM head, ``tiny_qwen2_tied`` with tied
embeddings) run on the early-exit LLaMA model with ``qkv_bias`` set
(``model_executor/models/qwen2_early_exit.py``). The reference is
``ReferenceDecoder`` on HF's own ``Qwen2ForCausalLM``.

One subprocess runs these engines one after another, each with its engine core
in that process (``python test_qwen2.py SPEC.json OUT.json`` is the runner):

* ``plain``: plain vLLM (``Qwen2ForCausalLM``) on ``tiny_qwen2``;
* ``off``: early exit with ``enabled: false`` on the same prompts;
* ``main``: ``policy: per_token``, checks after layers 1 and 3, threshold 0.3, four
  requests in one batch: two with the engine's threshold, one with threshold 0
  (leaves at layer 1 every step) and one with early exit off;
* ``compiled``: ``compile: true`` with ``skip_layers: [2]`` and a forced exit at
  layer 4, on ``tiny_qwen2_tied``;
* ``tp2``: ``main`` with tensor parallelism 2 (two worker processes);
* ``heads``: random exit heads and gates (``test_heads.random_heads``) read at layers
  1 and 3 with the ``gate`` signal.

``vllm serve --enable-early-exit`` runs in its own processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

NEW = 24
THRESHOLD = 0.3  # on tiny_qwen2 with these prompts: exits at layers 1 and 3, and full-depth tokens
MAIN = {"exit_layers": [1, 3], "threshold": THRESHOLD, "policy": "per_token", "log_interval_s": 0}
FORCED_1 = {"early_exit": {"threshold": 0.0}}
OFF = {"early_exit": {"enabled": False}}
HEAD_LAYERS = (1, 3)
HEAD_THRESHOLD = 0.5
HEADS = {"signal": "gate", "exit_layers": list(HEAD_LAYERS), "threshold": HEAD_THRESHOLD, "policy": "per_token",
         "log_interval_s": 0}
COMPILED = {
    "skip_layers": [2], "exit_layers": [4], "threshold": 0.0, "policy": "per_token", "compile": True,
    "log_interval_s": 0,
}


# --- the runner (in the subprocess) ----------------------------------------------------------------


def _loaded_model(model) -> dict:
    """What vLLM built: the class and the q/k/v bias it loaded into each layer."""
    biases = [layer.self_attn.qkv_proj.bias for layer in model.model.layers]
    return {
        "class": type(model).__name__,
        "qkv_bias_abs_sum": [None if b is None else float(b.abs().sum()) for b in biases],
        "o_proj_bias": [layer.self_attn.o_proj.bias is not None for layer in model.model.layers],
        "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
    }


def run_all(spec: dict) -> dict:
    import gc

    from vllm import LLM, SamplingParams

    from vllm_early_exit import get_exit_stats
    from vllm_early_exit.tools.engines import shutdown_engine

    results = {}
    for name, run in spec["runs"].items():
        os.environ.update(run.get("env", {}))  # read by the workers this engine starts
        kwargs = dict(run["engine"])
        if run.get("early_exit") is not None:
            kwargs["additional_config"] = {"early_exit": run["early_exit"]}
        llm = LLM(run["model"], **kwargs)
        params = [
            SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, extra_args=extra)
            for _, n, extra in run["requests"]
        ]
        outs = llm.generate([{"prompt_token_ids": p} for p, _, _ in run["requests"]], params, use_tqdm=False)
        result = {"outputs": [list(o.outputs[0].token_ids) for o in outs], "model": llm.apply_model(_loaded_model)[0]}
        if run.get("early_exit") is not None:
            per_rank = [s.to_dict() for s in get_exit_stats(llm, all_ranks=True)]
            result["stats"], result["stats_per_rank"] = per_rank[0], per_rank
            result["layer_groups"] = llm.collective_rpc("early_exit_layer_groups")[0]
            result["kv_projections"] = llm.collective_rpc("early_exit_kv_projections")
        results[name] = result
        shutdown_engine(llm)
        del llm
        gc.collect()
        for key in run.get("env", {}):
            del os.environ[key]
    return results


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    with open(sys.argv[2], "w") as f:
        json.dump(run_all(spec), f)
    sys.exit(0)


# --- the tests ---------------------------------------------------------------------------------------

# No relative imports at module level: tensor-parallel workers spawned by the runner
# re-import this file as ``__mp_main__`` (outside any package).


def _engine(**overrides) -> dict:
    from .conftest import ENGINE_DEFAULTS

    return {**ENGINE_DEFAULTS, "skip_tokenizer_init": True, **overrides}


def _prompts(n: int, seed: int) -> list[list[int]]:
    from .conftest import tiny_prompts

    return tiny_prompts(n, seed=seed)


def _reference(path: Path):
    import torch
    from transformers import Qwen2ForCausalLM

    from .reference import ReferenceDecoder

    return ReferenceDecoder(Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32))


@pytest.fixture(scope="module")
def reference(tiny_qwen2):
    return _reference(tiny_qwen2)


@pytest.fixture(scope="module")
def tied_reference(tiny_qwen2_tied):
    return _reference(tiny_qwen2_tied)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return _prompts(4, seed=7)


def main_requests(prompts) -> list[list]:
    return [[prompts[0], NEW, None], [prompts[1], NEW, None], [prompts[2], NEW, FORCED_1], [prompts[3], NEW, OFF]]


@pytest.fixture(scope="module")
def traces(reference, prompts):
    """The reference's threshold traces for the two requests with the engine's settings."""
    traces = [reference.generate(p, NEW, exit_layers=(1, 3), threshold=THRESHOLD) for p in prompts[:2]]
    # No decision sits near the threshold, so float noise cannot flip one.
    assert min(abs(c - THRESHOLD) for t in traces for step in t.confidences for c in step.values()) > 1e-3
    return traces


@pytest.fixture(scope="module")
def compiled_prompts() -> list[list[int]]:
    return _prompts(3, seed=23)


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """Random heads and gates for ``tiny_qwen2``, saved in the product's heads format."""
    from .test_heads import random_heads

    return random_heads(128, 512, layers=HEAD_LAYERS, seed=6).save(tmp_path_factory.mktemp("qwen2_heads"))


@pytest.fixture(scope="module")
def head_traces(reference, heads, prompts):
    from vllm_early_exit.model_executor.early_exit.heads import ExitHeads

    weights = ExitHeads.load(heads).weights
    traces = [reference.generate(p, NEW, exit_layers=HEAD_LAYERS, threshold=HEAD_THRESHOLD, heads=weights)
              for p in prompts[:3]]
    assert min(abs(c - HEAD_THRESHOLD) for t in traces for step in t.confidences for c in step.values()) > 1e-3
    return traces


@pytest.fixture(scope="module")
def runs(tiny_qwen2, tiny_qwen2_tied, prompts, compiled_prompts, heads, tmp_path_factory) -> dict:
    from .conftest import one_process_env

    work = tmp_path_factory.mktemp("qwen2_runs")
    full = [[p, NEW, None] for p in prompts]
    spec = {
        "runs": {
            "plain": {"model": str(tiny_qwen2), "engine": _engine(), "requests": full},
            "off": {"model": str(tiny_qwen2), "engine": _engine(), "requests": full, "early_exit": {"enabled": False}},
            "main": {"model": str(tiny_qwen2), "engine": _engine(), "requests": main_requests(prompts), "early_exit": MAIN},
            "compiled": {
                "model": str(tiny_qwen2_tied), "engine": _engine(enforce_eager=False),
                "requests": [[p, NEW, None] for p in compiled_prompts], "early_exit": COMPILED,
            },
            "tp2": {
                "model": str(tiny_qwen2), "engine": _engine(tensor_parallel_size=2),
                "requests": main_requests(prompts), "early_exit": MAIN, "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
            },
            "heads": {
                "model": str(tiny_qwen2), "engine": _engine(), "requests": [[p, NEW, None] for p in prompts[:3]],
                "early_exit": {**HEADS, "heads": str(heads)},
            },
        }
    }
    (work / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, __file__, str(work / "spec.json"), str(work / "out.json")],
        capture_output=True, text=True, timeout=900, check=False,
        env=one_process_env(),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"engine run failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads((work / "out.json").read_text())


def exit_counts(exit_layers, num_layers: int) -> list[int]:
    counts = Counter(layer for layer in exit_layers if layer is not None)
    return [counts.get(layer, 0) for layer in range(num_layers)]


def test_checkpoints_have_qkv_biases_and_the_expected_heads(tiny_qwen2, tiny_qwen2_tied):
    """Non-zero q/k/v biases, no o_proj or MLP bias; the tied checkpoint stores no LM head."""
    from safetensors.torch import load_file

    for path, tied in ((tiny_qwen2, False), (tiny_qwen2_tied, True)):
        weights = load_file(path / "model.safetensors")
        for layer in range(6):
            for proj in ("q_proj", "k_proj", "v_proj"):
                assert weights[f"model.layers.{layer}.self_attn.{proj}.bias"].abs().sum() > 1
        assert not [name for name in weights if name.endswith(".bias") and "_proj" in name and "self_attn" not in name]
        assert not [name for name in weights if "o_proj.bias" in name]
        assert ("lm_head.weight" in weights) is not tied
        config = json.loads((path / "config.json").read_text())
        assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is tied
        assert "qkv_bias" not in config  # the plugin sets it on the loaded config, not in the checkpoint


def test_reference_matches_hf_generate(reference, prompts):
    """The reference at full depth is HF's own greedy decoding of the Qwen2 model."""
    import torch

    for prompt in prompts[:1]:
        hf = reference.model.generate(
            torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False
        )[0, len(prompt):].tolist()
        assert reference.generate(prompt, NEW).tokens == hf


def test_plain_vllm_matches_hf_and_the_biases_matter(runs, reference, prompts):
    import torch

    full = [reference.generate(p, NEW).tokens for p in prompts]
    assert runs["plain"]["outputs"] == full, "plain vLLM and HF must agree for the exact comparisons below"
    # The same model with its q/k/v biases zeroed decodes differently: an engine
    # that dropped the checkpoint's biases could not match the reference.
    saved = {}
    with torch.no_grad():
        for i, layer in enumerate(reference.model.model.layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                bias = getattr(layer.self_attn, proj).bias
                saved[i, proj] = bias.clone()
                bias.zero_()
        try:
            assert reference.generate(prompts[0], NEW).tokens != full[0]
        finally:
            for (i, proj), value in saved.items():
                getattr(reference.model.model.layers[i].self_attn, proj).bias.copy_(value)


def test_exits_disabled_is_plain_vllm_on_the_early_exit_class(runs):
    off = runs["off"]
    assert off["outputs"] == runs["plain"]["outputs"]
    assert off["stats"]["decode_tokens"] == 0
    loaded = off["model"]
    assert loaded["class"] == "EarlyExitLlamaForCausalLM" and runs["plain"]["model"]["class"] == "Qwen2ForCausalLM"
    assert all(s is not None and s > 1 for s in loaded["qkv_bias_abs_sum"]), "q/k/v biases were not loaded"
    assert loaded["qkv_bias_abs_sum"] == pytest.approx(runs["plain"]["model"]["qkv_bias_abs_sum"], rel=1e-6)
    assert not any(loaded["o_proj_bias"]) and not loaded["tied"]


def test_threshold_exits_match_reference_with_state_propagation(runs, reference, traces, prompts):
    main = runs["main"]
    assert main["outputs"][:2] == [t.tokens for t in traces]
    no_fill = [
        reference.generate(p, NEW, exit_layers=(1, 3), threshold=THRESHOLD, propagate=False).tokens
        for p in prompts[:2]
    ]
    assert no_fill != main["outputs"][:2], "without K/V propagation (with bias) the reference decodes differently"
    layers = [e for t in traces for e in t.exit_layers]
    assert layers.count(1) and layers.count(3) and layers.count(None)


def test_forced_exit_and_early_exit_off_beside_exiting_rows(runs, reference, traces, prompts):
    """In the same batch: a request with threshold 0 leaves at layer 1 every step, a request with early exit
    off gets plain vLLM's tokens; the exit counters are the reference's exits of the three exiting requests."""
    main = runs["main"]
    forced = reference.generate(prompts[2], NEW, exit_layers=(1,)).tokens
    assert main["outputs"][2] == forced
    assert forced != runs["plain"]["outputs"][2], "a forced exit should change this random model's output"
    assert main["outputs"][3] == runs["plain"]["outputs"][3]
    layers = [e for t in traces for e in t.exit_layers] + [1] * (NEW - 1)
    assert main["stats"]["exits_per_layer"] == exit_counts(layers, 6)


def test_compiled_groups_with_skip_layers_on_tied_embeddings(runs, tied_reference, compiled_prompts):
    compiled = runs["compiled"]
    assert compiled["model"]["tied"]
    assert compiled["layer_groups"] == [
        *({"layers": [first, stop], "compiled": True} for first, stop in ((0, 2), (2, 3), (3, 5), (5, 6))),
        {"layers": [0, 6], "compiled": True, "full_depth": True},
    ]
    rule = {"skip_layers": (2,), "exit_layers": (4,), "threshold": 0.0}
    expected = [tied_reference.generate(p, NEW, **rule).tokens for p in compiled_prompts]
    assert compiled["outputs"] == expected
    assert expected != [tied_reference.generate(p, NEW).tokens for p in compiled_prompts]
    stats = compiled["stats"]
    assert stats["exits_per_layer"][4] == stats["decode_tokens"] == len(compiled_prompts) * (NEW - 1)
    # The skipped layer's and the deeper layers' K/V (with their k/v biases) came from the
    # K/V-only projections built at load time.
    assert compiled["kv_projections"] == [list(range(6))]


def test_tensor_parallel_two_ranks_match_one(runs):
    tp2 = runs["tp2"]
    assert tp2["outputs"] == runs["main"]["outputs"]
    ranks = tp2["stats_per_rank"]
    assert len(ranks) == 2
    assert ranks[0] == ranks[1], "both ranks must take the same decisions"
    assert ranks[0] == runs["main"]["stats"]


# --- start-up refusals (in this process, before an engine starts) -----------------------------------


def _config_only(tmp_path: Path, source: Path, **changes) -> Path:
    config = json.loads((source / "config.json").read_text())
    config.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 3},
            r"use_sliding_window=True \(sliding_window=64, max_window_layers=3\).*sliding-window attention "
            r"is not supported \(allowed: use_sliding_window false",
        ),
        ({"layer_types": ["full_attention"] * 3 + ["sliding_attention"] * 3}, "sliding-window attention"),
        ({"attention_bias": True}, r"attention_bias=True.*no o_proj bias \(allowed: attention_bias false or unset\)"),
        ({"qk_norm": True}, r"qk_norm=True.*\(allowed: qk_norm false or unset\)"),
    ],
)
def test_unsupported_qwen2_settings_are_refused_at_start(tiny_qwen2, tmp_path, changes, message):
    from vllm import LLM

    from vllm_early_exit import EarlyExitUnsupportedError

    model = _config_only(tmp_path, tiny_qwen2, **changes)
    with pytest.raises(EarlyExitUnsupportedError, match="does not support this Qwen2 model.*" + message):
        LLM(str(model), **_engine(), additional_config={"early_exit": {}})


# --- vllm serve --enable-early-exit ------------------------------------------------------------------

SERVE_SETTINGS = {"exit_layers": [1, 3], "threshold": THRESHOLD}


@pytest.fixture(scope="module")
def served_qwen2(tiny_qwen2, tmp_path_factory) -> Path:
    """``tiny_qwen2`` with a word-level tokenizer over its 512 ids (vllm serve loads a tokenizer)."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("served_qwen2")
    for item in tiny_qwen2.iterdir():
        shutil.copy(item, path / item.name)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 512)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(path)
    return path


def test_vllm_serve_enable_early_exit(served_qwen2, reference, traces, prompts):
    """Through the OpenAI API: the engine's threshold, a request's threshold 0 and a request with early
    exit off each give the reference's tokens, and /metrics counts the reference's exits."""
    from openai import OpenAI

    from .server import fetch_metrics, metric_value, running_server

    model = str(served_qwen2)
    with running_server(served_qwen2, "--enable-early-exit", "--early-exit-config", json.dumps(SERVE_SETTINGS)) as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

        def tokens(prompt, xargs=None):
            out = client.completions.create(
                model=model, prompt=prompt, max_tokens=NEW, temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True, "vllm_xargs": xargs or {}},
            )
            return out.choices[0].token_ids

        assert tokens(prompts[0]) == traces[0].tokens
        assert tokens(prompts[2], {"early_exit_threshold": 0.0}) == reference.generate(prompts[2], NEW, exit_layers=(1,)).tokens
        assert tokens(prompts[3], {"early_exit_enabled": False}) == reference.generate(prompts[3], NEW).tokens
        text = fetch_metrics(url)

    def metric(name, **labels):
        return metric_value(text, name, model_name=model, **labels)

    exits = exit_counts(traces[0].exit_layers + [1] * (NEW - 1), 6)
    assert metric("vllm:early_exit_decode_tokens_total") == 3 * (NEW - 1)
    assert metric("vllm:early_exit_early_tokens_total") == sum(exits)
    assert [metric("vllm:early_exit_layer_exits_total", layer=str(layer)) for layer in range(6)] == exits


def test_exit_heads_and_gates_match_reference(runs, reference, head_traces, prompts):
    """Check layers read through trained-format heads, decide on their gates and emit the heads' tokens."""
    result = runs["heads"]
    assert result["outputs"] == [t.tokens for t in head_traces]
    layers = [e for t in head_traces for e in t.exit_layers]
    assert layers.count(1) and layers.count(3), "the heads should let rows leave at both check layers"
    assert result["stats"]["exits_per_layer"] == exit_counts(layers, 6)
    plain_rule = [reference.generate(p, NEW, exit_layers=HEAD_LAYERS, threshold=HEAD_THRESHOLD).tokens
                  for p in prompts[:3]]
    assert plain_rule != result["outputs"], "without the heads the same rule should decode differently"
