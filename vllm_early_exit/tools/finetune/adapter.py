"""The exit adapter file: the LoRA factors of an exit-aware fine-tune, and the one function that
merges them into a checkpoint vLLM loads.

A folder holds ``exit_adapter.safetensors`` (per adapted linear layer ``NAME.lora_A`` ``[rank,
in]`` and ``NAME.lora_B`` ``[out, rank]``, float16: SmolLM2's at rank 8 is about 5 MB) and
``exit_adapter.json`` (rank, scale, the base model's name and what the fine-tune measured).
Merging adds ``scale * B @ A`` to each named weight: the exit-ready model is a plain HF
checkpoint of the original's architecture, so vLLM and the plugin load it as they load the
original, and the merge needs neither PEFT nor a GPU.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

WEIGHTS = "exit_adapter.safetensors"
META = "exit_adapter.json"


def lora_factors(model) -> tuple[dict[str, torch.Tensor], float, int]:
    """``({name.lora_A / name.lora_B: tensor}, scale, rank)`` of a PEFT LoRA model, names as in
    the HF checkpoint (``model.layers.0.self_attn.q_proj``)."""
    factors, scales, ranks = {}, set(), set()
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        plain = name.removeprefix("base_model.model.")
        a = module.lora_A["default"].weight.detach()
        factors[f"{plain}.lora_A"] = a.clone()
        factors[f"{plain}.lora_B"] = module.lora_B["default"].weight.detach().clone()
        scales.add(float(module.scaling["default"]))
        ranks.add(a.shape[0])
    if not factors:
        raise ValueError("the model has no LoRA layers to export")
    if len(scales) != 1 or len(ranks) != 1:
        raise ValueError(f"LoRA layers with different scales {scales} or ranks {ranks}")
    return factors, scales.pop(), ranks.pop()


def save(folder: Path, factors: dict[str, torch.Tensor], scale: float, rank: int, meta: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in factors.items()}, str(folder / WEIGHTS))
    (folder / META).write_text(json.dumps({"rank": rank, "scale": scale, **meta}, indent=2) + "\n")


def load(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (WEIGHTS, META):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not an exit adapter folder: {name} is missing")
    return load_file(str(folder / WEIGHTS)), json.loads((folder / META).read_text())


def merge_into(weights: dict[str, torch.Tensor], factors: dict[str, torch.Tensor], scale: float) -> None:
    """Adds ``scale * B @ A`` to every adapted weight of ``weights`` (a state dict), in place."""
    names = sorted({key.rsplit(".", 1)[0] for key in factors})
    for name in names:
        key = f"{name}.weight"
        if key not in weights:
            raise KeyError(f"the adapter adapts {name}, which the model does not have")
        a, b = factors[f"{name}.lora_A"].float(), factors[f"{name}.lora_B"].float()
        weights[key] += (scale * (b @ a)).to(weights[key].dtype)


def build_merged(base: Path, adapter: Path, out: Path) -> Path:
    """Writes the exit-ready checkpoint ``out``: the ``base`` HF checkpoint with the adapter in
    ``adapter`` merged, and the base's tokenizer where it has one. Once: a folder with a ``config.json`` is done.
    Written into a temporary folder and renamed, so an interrupted build never counts as done."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_early_exit.tools.engines import has_tokenizer

    out = Path(out)
    if (out / "config.json").exists():
        return out
    factors, meta = load(adapter)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    state = model.state_dict()
    with torch.no_grad():
        merge_into(state, factors, float(meta["scale"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=".merge-"))
    try:
        model.save_pretrained(staging)
        if has_tokenizer(base):
            AutoTokenizer.from_pretrained(base).save_pretrained(staging)
        shutil.copy(Path(adapter) / META, staging / META)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
