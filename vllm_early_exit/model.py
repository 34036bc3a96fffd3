"""The early-exit LLaMA model class registered with vLLM.

``EarlyExitLlamaForCausalLM`` is vLLM's ``LlamaForCausalLM`` with its decoder
stack replaced by ``EarlyExitLlamaModel`` (through the ``_init_model`` hook).
Steps with prefill tokens and vLLM's dummy runs take ``LlamaModel.forward``
unchanged; pure-decode steps run the layer loop below, which may leave after a
check layer. Weights, weight loading, LoRA and sampling are vLLM's.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

from .batch import current_decode_batch
from .config import EarlyExitConfig
from .decision import ExitDecider, LogitReadout
from .kv_fill import KVPropagator, check_kv_fill_supported
from .metrics import SharedCounters
from .requests import RequestRows
from .stats import ExitStats, PeriodicStatsLogger


class EarlyExitLlamaModel(LlamaModel):
    """``LlamaModel`` whose pure-decode steps may leave the layer stack early."""

    def __init__(
        self,
        *,
        vllm_config: VllmConfig,
        prefix: str = "",
        layer_type: type[nn.Module] = LlamaDecoderLayer,
    ) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        config = EarlyExitConfig.from_additional_config(vllm_config.additional_config)
        num_layers = self.config.num_hidden_layers
        self.exit_config = config
        self.decider = ExitDecider(config, num_layers)
        self.kv_fill = KVPropagator(self.layers)
        self.exit_stats = ExitStats(num_layers)
        first_rank = get_tensor_model_parallel_rank() == 0
        self.stats_logger = PeriodicStatsLogger(config.log_interval_s, enabled=config.enabled and first_rank)
        served = vllm_config.model_config.served_model_name
        self.shared_counters = (
            SharedCounters.from_env(served if isinstance(served, str) else served[0], num_layers)
            if config.enabled and first_rank
            else None
        )
        self.request_rows = RequestRows.of_loading_runner() if config.enabled else None
        if config.enabled:
            check_kv_fill_supported(self.layers[self.start_layer : self.end_layer])

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        batch = current_decode_batch() if self.decider.enabled else None
        if batch is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

        rows = batch.num_tokens
        row_settings = (
            self.request_rows.settings(rows, self.decider.threshold, positions.device)
            if self.request_rows is not None
            else None
        )
        if row_settings is not None and row_settings.any_disabled:
            # A request turned early exit off: the whole step runs at full depth.
            self._count(None, rows)
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        thresholds = row_settings.thresholds if row_settings is not None else None

        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        exit_layer = None
        for index in range(self.start_layer, self.end_layer):
            hidden_states, residual = self.layers[index](positions, hidden_states, residual)
            if index in self.decider.check_layers:
                # A new tensor: the fused add+norm of the next layer works in place.
                stream = hidden_states + residual
                if self.decider.should_exit(stream[:rows], thresholds):
                    self.kv_fill.fill(positions, stream, range(index + 1, self.end_layer))
                    exit_layer = index
                    break

        self._count(exit_layer, rows)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def _count(self, exit_layer: int | None, rows: int) -> None:
        self.exit_stats.record(exit_layer, rows)
        self.stats_logger.maybe_log(self.exit_stats)
        if self.shared_counters is not None:
            self.shared_counters.publish(self.exit_stats)


class EarlyExitLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's LLaMA with early exit between decoder layers.

    Selected by the plugin when ``additional_config`` carries ``early_exit``
    settings, or explicitly with ``hf_overrides={"architectures": [...]}``.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.model.decider.bind_readout(
            LogitReadout(self.model.norm, self.lm_head, self.logits_processor)
        )

    def _init_model(
        self,
        vllm_config: VllmConfig,
        prefix: str = "",
        layer_type: type[nn.Module] = LlamaDecoderLayer,
    ) -> EarlyExitLlamaModel:
        return EarlyExitLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
