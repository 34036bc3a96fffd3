"""The one GGUF -> HF converter: SmolLM2 (``assets.smollm2_checkpoint``) and the models
``fetch-model`` assembles (``models.py``) become HF checkpoints that vLLM loads."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from vllm_early_exit.tools.optional import require


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
    require("gguf")  # transformers reads the file with them: name the extra rather than fail inside it
    require("accelerate")
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
