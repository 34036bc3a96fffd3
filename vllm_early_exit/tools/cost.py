"""The cost model: weight bytes read per decode token, plain vLLM against an early-exit engine.

Decoding small batches is bound by reading weights, so the ratio of weights read
per token is the speed-up a setting can reach at best on such a machine. Per decode
token, plain vLLM reads every layer and the LM head. An early-exit engine reads:

* the layers the token runs (up to its exit layer, less the skipped layers);
* the K/V projection of every layer it does not run (the k and v rows of
  ``qkv_proj``: the fill reads no q rows, ``kv_fill.FoldedKV``);
* at each check layer it reaches, the check's readout: the full LM head, the
  shortlist's rows of it (plus the full head to confirm, counted for the tokens
  that leave there), the pruned rows of ``vocab_top_k`` after the first check, and
  the exit head's matrix; nothing for forced exits or saturation;
* the LM head once more, unless the token was sampled from its check's logits.

Counted from an engine's measured exit counters (``ExitStats.to_dict()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LAYOUT_KEYS = ("exit_layers", "min_layer", "skip_layers")
"""The settings that decide which layers run and which check (``EarlyExitConfig.check_layers_for``)."""

PREDICTED = "predicted (weight-bytes bound)"
"""How every number of this model is labelled: a bound on weight bytes read, not a measured speed."""


@dataclass(frozen=True)
class WeightBytes:
    """Parameter counts of one model's parts (bytes up to the dtype's size, which cancels)."""

    num_layers: int
    hidden: int
    layer: int
    kv_projection: int
    lm_head: int

    @classmethod
    def of(cls, config) -> "WeightBytes":
        """From an HF config of a LLaMA-family model."""
        hidden, inter = config.hidden_size, config.intermediate_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        q = hidden * config.num_attention_heads * head_dim
        kv = 2 * hidden * config.num_key_value_heads * head_dim
        layer = q + kv + config.num_attention_heads * head_dim * hidden + 3 * hidden * inter
        return cls(config.num_hidden_layers, hidden, layer, kv, config.vocab_size * hidden)

    @classmethod
    def from_pretrained(cls, model: str) -> "WeightBytes":
        """From a model folder's HF config (``config.json``)."""
        from transformers import AutoConfig

        return cls.of(AutoConfig.from_pretrained(model))

    @property
    def plain(self) -> int:
        return self.num_layers * self.layer + self.lm_head


def _check_cost(weights: WeightBytes, settings: dict[str, Any], first: bool) -> float:
    """Weights one check's readout reads for a row that reaches it (without confirmation)."""
    from vllm_early_exit.model_executor.early_exit.signals import make_signal

    signal_name = settings.get("signal", "max_prob")
    if signal_name != "gate" and make_signal(signal_name).always_confident(settings.get("threshold", 0.9)):
        return 0.0  # a forced exit reads nothing
    if signal_name == "saturation":
        return 0.0
    head = weights.hidden * weights.hidden if settings.get("heads") else 0
    if settings.get("shortlist"):
        from vllm_early_exit.model_executor.early_exit.shortlist import read_shortlist

        return head + len(read_shortlist(settings["shortlist"])["tokens"]) * weights.hidden
    top_k = settings.get("vocab_top_k")
    if top_k and not first:
        return head + top_k * weights.hidden
    return head + weights.lm_head


def engine_bytes(weights: WeightBytes, settings: dict[str, Any], stats: dict[str, Any]) -> float:
    """Mean weights read per decode token by an engine with ``settings`` that counted ``stats``."""
    from vllm_early_exit.config import EarlyExitConfig

    # Only the layer layout matters here; the other settings (a heads folder, a shortlist)
    # are priced by ``_check_cost`` and need not exist on this machine.
    config = EarlyExitConfig.from_dict({k: settings[k] for k in LAYOUT_KEYS if k in settings})
    checks = sorted(config.check_layers_for(weights.num_layers))
    skipped = set(config.skip_layers)
    tokens = stats["decode_tokens"]
    if not tokens:
        return float(weights.plain)
    exits = list(stats["exits_per_layer"])
    # exits[l] tokens left after layer l; full-depth tokens "leave" after the last layer.
    exits[-1] += stats["full_depth_tokens"]
    total = 0.0
    for layer, count in enumerate(exits):
        if not count:
            continue
        run = sum(1 for l in range(layer + 1) if l not in skipped)
        filled = weights.num_layers - run
        reached = [c for c in checks if c <= layer]
        reads = sum(_check_cost(weights, settings, i == 0) for i, _ in enumerate(reached))
        confirm = weights.lm_head if settings.get("shortlist") and layer in checks else 0
        total += count * (run * weights.layer + filled * weights.kv_projection + reads + confirm)
    total += (tokens - stats.get("sampled_from_checks", 0)) * weights.lm_head
    return total / tokens


def predicted_ratio(weights: WeightBytes, settings: dict[str, Any], stats: dict[str, Any]) -> float:
    """Plain vLLM's weights read per decode token over the engine's: the weight-bound speed-up."""
    return weights.plain / engine_bytes(weights, settings, stats)


def predicted_speed(
    weights: WeightBytes | None, settings: dict[str, Any], stats: dict[str, Any] | None
) -> float | None:
    """:func:`predicted_ratio`, or None without a model's weights or any decode token counted."""
    if weights is None or not stats or not stats.get("decode_tokens"):
        return None
    return predicted_ratio(weights, settings, stats)
