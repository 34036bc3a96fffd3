"""The methods of the quality benchmark: their threshold sweeps, engine settings and skip sets.

Threshold signals get one early-exit engine each (:func:`method_settings`); the
``skip`` method gets one engine per static skip set (:func:`skip_settings`), grown
along the layers' block influence (:func:`block_influence`, ShortGPT) unless given.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


METHODS = ("max_prob", "margin", "entropy", "saturation", "head", "gate", "skip")
THRESHOLD_SIGNALS = METHODS[:-1]
HEAD_METHODS = ("head", "gate")
# Thresholds per signal, loosest first. Training-free readings of SmolLM2's middle
# layers are often confidently wrong, so the sweeps reach very strict values (on 48
# evaluation prompts, max_prob 0.999 at layers 10-28 kept 0.936 token agreement).
# Saturation is a cliff on SmolLM2: at 0.95 nearly every token leaves at layer 10, at 0.99 almost none.
DEFAULT_THRESHOLDS: dict[str, list[float]] = {
    "max_prob": [0.99, 0.999, 0.9999, 0.99999],
    "margin": [0.98, 0.998, 0.9998, 0.99998],
    "entropy": [0.1, 0.01, 0.001, 0.0001],
    "saturation": [0.97, 0.98, 0.985, 0.99],
    "head": [0.9, 0.99, 0.999, 0.9999],
    "gate": [0.6, 0.8, 0.9, 0.97],
}


@dataclass
class Options:
    model: str
    prompts: int
    max_tokens: int
    methods: list[str]
    thresholds: dict[str, list[float]]
    exit_layers: list[int] | None
    heads: str
    skip_sets: list[list[int]] | None
    skip_sizes: list[int]
    calibration_prompts: int
    humaneval: int
    humaneval_tokens: int
    humaneval_timeout_s: float
    dtype: str
    out: Path
    smoke: bool = False
    merge: bool = False
    reference: str | None = None
    """The checkpoint plain vLLM runs: the references and the full model's choices come from it
    (None: ``model``; for an exit-ready model, the original it was tuned from)."""


def _heads_layers(heads: str, signal: str) -> list[int]:
    from vllm_early_exit.model_executor.early_exit.heads import read_metadata

    meta = read_metadata(Path(heads))
    return sorted(meta["gate_layers"] if signal == "gate" else meta["layers"])


def method_settings(signal: str, opts: Options, num_layers: int) -> dict:
    """The engine's early_exit settings for a threshold signal (checked; raises EarlyExitConfigError)."""
    from vllm_early_exit.config import EarlyExitConfig
    from vllm_early_exit.model_executor.early_exit.heads import default_layers

    settings: dict = {"signal": signal, "threshold": opts.thresholds[signal][0], "policy": "per_token", "log_interval_s": 0}
    if signal in HEAD_METHODS:
        if not Path(opts.heads).is_dir():
            raise FileNotFoundError(
                f"heads folder {opts.heads} does not exist; train heads with "
                "`python -m vllm_early_exit train-heads` or pass --heads DIR"
            )
        settings["heads"] = opts.heads
        EarlyExitConfig.from_dict(settings)  # a clear error when the folder is not usable
        layers = opts.exit_layers or _heads_layers(opts.heads, signal)
        settings["exit_layers"] = [l for l in layers if l <= num_layers - 2]
    else:
        settings["exit_layers"] = opts.exit_layers or default_layers(num_layers)
    EarlyExitConfig.from_dict(settings).exit_layers_for(num_layers)
    return settings


def skip_settings(layers: list[int]) -> dict:
    """Static layer skipping alone: no exit checks."""
    return {"skip_layers": layers, "exit_layers": [], "policy": "per_token", "log_interval_s": 0}


def block_influence(model: str, texts: Sequence[str]) -> list[float]:
    """Per layer: 1 - mean cosine similarity of its input and output residual stream (ShortGPT),
    over all positions of ``texts`` in the chat template, with transformers in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_early_exit.tools.assets import chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    layers = hf.config.num_hidden_layers
    sums = torch.zeros(layers, dtype=torch.float64)
    count = 0
    streams: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: streams.append(out[0] if isinstance(out, tuple) else out))
        for layer in hf.model.layers
    ]
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(chat_prompt(tokenizer, text), return_tensors="pt", add_special_tokens=False)
                streams.clear()
                embeds = hf.model.embed_tokens(ids.input_ids)
                hf.model(inputs_embeds=embeds)
                # The input of layer 0 is the embedding; of layer l > 0, layer l-1's output.
                inputs = [embeds[0]] + [s[0] for s in streams[:-1]]
                for layer, (a, b) in enumerate(zip(inputs, (s[0] for s in streams))):
                    sums[layer] += torch.cosine_similarity(a.double(), b.double(), dim=-1).sum()
                count += ids.input_ids.shape[1]
    finally:
        for hook in hooks:
            hook.remove()
    del hf
    gc.collect()
    return [1.0 - float(s / count) for s in sums]


def skip_order(influence: Sequence[float]) -> list[int]:
    """Layers that may be skipped, least influential first. The first and the last layer
    are never skipped (they reshape the stream the most)."""
    return sorted(range(1, len(influence) - 1), key=lambda l: influence[l])


def skip_sets_from_influence(influence: Sequence[float], sizes: Sequence[int]) -> list[list[int]]:
    """Growing skip sets: the ``k`` least influential layers for each ``k`` in ``sizes``."""
    order = skip_order(influence)
    return [sorted(order[:k]) for k in sizes if 0 < k <= len(order)]


def parse_skip_sets(text: str) -> list[list[int]] | None:
    """``"auto"`` -> None; ``"27;26,27"`` -> [[27], [26, 27]]."""
    if text.strip() == "auto":
        return None
    try:
        return [sorted({int(x) for x in group.split(",")}) for group in text.split(";") if group.strip()]
    except ValueError:
        raise SystemExit(f"--skip-sets {text!r}: expected 'auto' or layer lists like '27;26,27;25,26,27'") from None
