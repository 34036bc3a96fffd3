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

Per token is the bound of one request decoding alone. In a batch, a step reads a
layer's weights once for all its rows, so what counts is how deep the step runs:
under ``per_token`` a row that left rides along until every row of the step has
left, and a step is as deep as its deepest row. :func:`step_bytes` prices the
steps an engine counted (``step_exits_per_layer``: where each pure-decode step
stopped, and the LM-head products it took); :func:`predicted_at_batch` predicts
steps of ``batch`` rows from the per-token exit counts of any run (a calibration
run, say), taking the rows of a step as independent draws of those counts.
"""

from __future__ import annotations

import bisect
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


def _check_reads(weights: WeightBytes, settings: dict[str, Any], first: bool) -> tuple[float, int]:
    """What one check's readout reads for the rows that reach it, without confirmations: weights
    beside full LM-head products, and how many full LM-head products (0 or 1)."""
    from vllm_early_exit.model_executor.early_exit.signals import make_signal

    signal_name = settings.get("signal", "max_prob")
    if signal_name != "gate" and make_signal(signal_name).always_confident(settings.get("threshold", 0.9)):
        return 0.0, 0  # a forced exit reads nothing
    if signal_name == "saturation":
        return 0.0, 0
    head = weights.hidden * weights.hidden if settings.get("heads") else 0
    if settings.get("shortlist"):
        from vllm_early_exit.model_executor.early_exit.shortlist import read_shortlist

        return head + len(read_shortlist(settings["shortlist"])["tokens"]) * weights.hidden, 0
    top_k = settings.get("vocab_top_k")
    if top_k and not first:
        return head + top_k * weights.hidden, 0
    return head, 1


class _Layout:
    """The check layers and skipped layers of ``settings`` on this model, with what each check
    reads (``_check_reads``, priced once: a shortlist's size comes from its file)."""

    def __init__(self, weights: WeightBytes, settings: dict[str, Any]) -> None:
        from vllm_early_exit.config import EarlyExitConfig

        # Only the layer layout matters here; the other settings (a heads folder, a shortlist)
        # are priced by ``_check_reads`` and need not exist on this machine.
        config = EarlyExitConfig.from_dict({k: settings[k] for k in LAYOUT_KEYS if k in settings})
        self.checks = sorted(config.check_layers_for(weights.num_layers))
        self.skipped = set(config.skip_layers)
        self.reads = [_check_reads(weights, settings, i == 0) for i in range(len(self.checks))]

    def reached(self, layer: int) -> list[tuple[float, int]]:
        """What the checks a token or step reaches when it stops after ``layer`` read."""
        return self.reads[: bisect.bisect_right(self.checks, layer)]


def _stack_bytes(weights: WeightBytes, layer: int, skipped: set[int]) -> float:
    """Layers run up to ``layer`` (0-based, inclusive) and the K/V filled of every other layer."""
    run = sum(1 for l in range(layer + 1) if l not in skipped)
    return run * weights.layer + (weights.num_layers - run) * weights.kv_projection


def _ends(exits_per_layer: list[int], full_depth: int) -> list[int]:
    """Counts per layer after which a token (or step) stopped, full depth counted at the last layer."""
    ends = list(exits_per_layer)
    ends[-1] += full_depth
    return ends


def engine_bytes(weights: WeightBytes, settings: dict[str, Any], stats: dict[str, Any]) -> float:
    """Mean weights read per decode token by an engine with ``settings`` that counted ``stats``."""
    layout = _Layout(weights, settings)
    tokens = stats["decode_tokens"]
    if not tokens:
        return float(weights.plain)
    total = 0.0
    for layer, count in enumerate(_ends(stats["exits_per_layer"], stats["full_depth_tokens"])):
        if not count:
            continue
        reads = sum(cheap + full * weights.lm_head for cheap, full in layout.reached(layer))
        confirm = weights.lm_head if settings.get("shortlist") and layer in layout.checks else 0
        total += count * (_stack_bytes(weights, layer, layout.skipped) + reads + confirm)
    total += (tokens - stats.get("sampled_from_checks", 0)) * weights.lm_head
    return total / tokens


def step_bytes(weights: WeightBytes, settings: dict[str, Any], stats: dict[str, Any]) -> float | None:
    """Mean weights read per pure-decode step by an engine that counted ``stats``, from where its
    steps stopped (``step_exits_per_layer``; ``unchecked_steps`` ran every layer and no check)
    and the full LM-head products it took (its checks' ``full_readouts`` and the
    ``sampling_products``); None when it counted no step."""
    steps = stats.get("decode_steps", 0)
    if not steps:
        return None
    layout = _Layout(weights, settings)
    unchecked = stats.get("unchecked_steps", 0)  # every layer, no check (``max_exit_batch``)
    total = unchecked * weights.num_layers * weights.layer
    for layer, count in enumerate(_ends(stats["step_exits_per_layer"], stats["full_depth_steps"] - unchecked)):
        if count:
            cheap = sum(cheap for cheap, _ in layout.reached(layer))
            total += count * (_stack_bytes(weights, layer, layout.skipped) + cheap)
    total += (stats.get("full_readouts", 0) + stats.get("sampling_products", 0)) * weights.lm_head
    return total / steps


def batch_bytes(weights: WeightBytes, settings: dict[str, Any], stats: dict[str, Any], batch: int) -> float:
    """Mean weights read per ``per_token`` decode step of ``batch`` rows, each row an independent
    draw of the per-token exits in ``stats``: the step stops after layer ``l`` with probability
    ``F(l)^batch - F(l-1)^batch`` (``F``: share of tokens gone by ``l``). A step reads, once for
    all its rows, the layers down to its deepest row, the fill of the rest, every check it
    reaches, and LM-head products: without a shortlist one per full-vocabulary check reached,
    plus one for sampling when some row went the full depth (a row that left is sampled from its
    check's logits); with a shortlist, one confirmation at each check where some row leaves
    (``1 - (1 - q_c)^batch`` for a check where a share ``q_c`` of the tokens leaves) and the
    sampling product when some row went the full depth; one product for sampling alone when the
    checks read no logits (a forced exit, saturation)."""
    from vllm_early_exit.model_executor.early_exit.signals import make_signal

    layout = _Layout(weights, settings)
    tokens = stats["decode_tokens"]
    if not tokens:
        return float(weights.plain)
    reads_logits = make_signal(settings.get("signal", "max_prob")).reads_logits
    single = not reads_logits or _check_reads(weights, settings, True) == (0.0, 0)  # sampling alone
    two_stage = not single and bool(settings.get("shortlist"))
    ends = _ends(stats["exits_per_layer"], stats["full_depth_tokens"])
    total, gone, before = 0.0, 0, 0.0
    last = weights.num_layers - 1
    for layer, count in enumerate(ends):
        gone += count
        share = (gone / tokens) ** batch - before
        before += share
        if share <= 0.0:
            continue
        reads = layout.reached(layer)
        heads = 0 if two_stage else 1 if single else sum(full for _, full in reads) + (layer == last)
        total += share * (_stack_bytes(weights, layer, layout.skipped) + sum(cheap for cheap, _ in reads) + heads * weights.lm_head)
    if two_stage:  # a confirmation where some row leaves, the sampling product where some row went on
        total += sum(1.0 - (1.0 - count / tokens) ** batch for count in ends if count) * weights.lm_head
    return total


def predicted_ratio(weights: WeightBytes, settings: dict[str, Any], stats: dict[str, Any]) -> float:
    """Plain vLLM's weights read per decode token over the engine's: the weight-bound speed-up."""
    return weights.plain / engine_bytes(weights, settings, stats)


def predicted_at_batch(weights: WeightBytes, settings: dict[str, Any], stats: dict[str, Any], batch: int) -> float:
    """Plain vLLM's weights read per decode step over the engine's, at ``batch`` rows a step.

    Per token (:func:`predicted_ratio`) at batch 1 and for the ``all`` / ``quorum`` policies,
    whose rows leave together (their exit counts are already the steps' at the batches they
    were counted at); :func:`batch_bytes` for ``per_token`` at larger batches; 1.0 above the
    settings' ``max_exit_batch`` (such steps run as plain vLLM)."""
    if batch < 1:
        raise ValueError(f"batch {batch!r} is invalid: allowed values are integers >= 1.")
    limit = settings.get("max_exit_batch")
    if limit is not None and batch > limit:
        return 1.0  # every layer, no check: plain vLLM's weights
    if batch == 1 or settings.get("policy", "all") != "per_token":
        return predicted_ratio(weights, settings, stats)
    return weights.plain / batch_bytes(weights, settings, stats, batch)


def predicted_step_ratio(weights: WeightBytes, settings: dict[str, Any], stats: dict[str, Any]) -> float | None:
    """Plain vLLM's weights read per decode step over the engine's measured steps (:func:`step_bytes`)."""
    engine = step_bytes(weights, settings, stats)
    return None if engine is None else weights.plain / engine


def predicted_speed(
    weights: WeightBytes | None, settings: dict[str, Any], stats: dict[str, Any] | None, batch: int = 1
) -> float | None:
    """:func:`predicted_at_batch`, or None without a model's weights or any decode token counted."""
    if weights is None or not stats or not stats.get("decode_tokens"):
        return None
    return predicted_at_batch(weights, settings, stats, batch)


def exit_batch_hint(
    weights: WeightBytes, settings: dict[str, Any], stats: dict[str, Any], largest: int = 256
) -> int | None:
    """The largest batch (up to ``largest``) at which ``settings`` are predicted faster than
    plain vLLM, for ``max_exit_batch``; None when not even one request alone is. The prediction
    does not grow with the batch (a step is as deep as its deepest row), so the search stops at
    the first batch that does not pay."""
    unguarded = {k: v for k, v in settings.items() if k != "max_exit_batch"}
    hint = None
    for batch in range(1, largest + 1):
        if predicted_at_batch(weights, unguarded, stats, batch) <= 1.0:
            break
        hint = batch
    return hint
