"""Qwen2 checkpoints on the early-exit LLaMA model.

A Qwen2 decoder layer is a LLaMA decoder layer with a bias on the q, k and v
projections (none on ``o_proj``, none in the MLP): same RMSNorms, SwiGLU MLP,
neox-style rotary, grouped-query attention, parameter names and optional tied
embeddings. vLLM's ``LlamaDecoderLayer`` builds exactly that when the HF config
carries ``qkv_bias`` (it serves InternLM3 that way). So a Qwen2 checkpoint runs
on ``EarlyExitLlamaForCausalLM`` unchanged, with ``qkv_bias=True`` set on its
config by the start-up checks (``plugin/checks.py`` calls
:func:`adapt_qwen2_config` while vLLM builds its ``VllmConfig``, before the
config travels to the engine and worker processes).

Why not a subclass of vLLM's ``Qwen2ForCausalLM``: the early-exit model is a
``LlamaModel`` subclass (the decode step, K/V fill, compiled groups, kept logits); a
Qwen2 copy would repeat all of it for a one-flag difference. Why not a second
registered architecture: the plugin picks the architecture from
``additional_config`` before the model's config is read, so one architecture for
both families keeps ``--enable-early-exit`` and ``hf_overrides`` working the same
for LLaMA and Qwen2 checkpoints.

What vLLM's own Qwen2 model does that the LLaMA layer does not is refused here
with the setting's name: sliding-window attention, ``qk_norm``, dual-chunk
attention, bidirectional (embedding) models, and an ``attention_bias`` flag that
would give the LLaMA layer an ``o_proj`` bias Qwen2 does not have.
"""

from __future__ import annotations

from vllm_early_exit.errors import EarlyExitUnsupportedError

QWEN2_MODEL_TYPE = "qwen2"


def adapt_qwen2_config(hf_config, model: str) -> None:
    """Refuses what the early-exit LLaMA layer cannot reproduce, then sets ``qkv_bias``."""

    def refuse(setting: str, reason: str) -> None:
        raise EarlyExitUnsupportedError(
            f"early exit does not support this Qwen2 model ({model}): {setting}; {reason}"
        )

    layer_types = list(getattr(hf_config, "layer_types", None) or [])
    if getattr(hf_config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        refuse(
            f"use_sliding_window={getattr(hf_config, 'use_sliding_window', None)!r} "
            f"(sliding_window={getattr(hf_config, 'sliding_window', None)!r}, "
            f"max_window_layers={getattr(hf_config, 'max_window_layers', None)!r})",
            "sliding-window attention is not supported (allowed: use_sliding_window false and every "
            "layer_types entry 'full_attention'). Start it without early exit.",
        )
    if getattr(hf_config, "qk_norm", False):
        refuse("qk_norm=True", "per-head q/k norms are not supported (allowed: qk_norm false or unset).")
    if getattr(hf_config, "dual_chunk_attention_config", None):
        refuse(
            "dual_chunk_attention_config is set",
            "dual-chunk attention is not supported (allowed: dual_chunk_attention_config unset).",
        )
    if not getattr(hf_config, "is_causal", True):
        refuse("is_causal=False", "early exit is for causal decoding (allowed: is_causal true or unset).")
    for name in ("attention_bias", "bias"):
        if getattr(hf_config, name, False):
            refuse(
                f"{name}={getattr(hf_config, name)!r}",
                f"Qwen2 has no o_proj bias (allowed: {name} false or unset).",
            )
    if getattr(hf_config, "qkv_bias", True) is not True:
        refuse(f"qkv_bias={hf_config.qkv_bias!r}", "Qwen2's q/k/v projections have a bias (allowed: qkv_bias true or unset).")
    hf_config.qkv_bias = True
