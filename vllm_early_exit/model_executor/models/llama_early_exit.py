"""The early-exit LLaMA model classes registered with vLLM.

``EarlyExitLlamaForCausalLM`` is vLLM's ``LlamaForCausalLM`` with its decoder
stack replaced by ``EarlyExitLlamaModel`` (through the ``_init_model`` hook).
Steps without decode tokens and vLLM's dummy runs take the full stack; steps
with decode tokens are walked down the stack by a walker (``early_exit/walkers.py``:
eager, or compiled groups with ``compile``), which lets decode rows leave after a
check layer or at their request's depth budget and skip the ``skip_layers``.
``compute_logits`` reuses the logits of rows that left through a full-vocabulary
check (``early_exit/exit_logits.py``). Weights, weight loading and sampling are vLLM's.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.compilation.decorators import ignore_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

from vllm_early_exit.config import EarlyExitConfig
from vllm_early_exit.model_executor.early_exit.batch import DecodeBatch, current_step_metadata, decode_batch
from vllm_early_exit.model_executor.early_exit.decision import ExitDecider, LogitReadout
from vllm_early_exit.model_executor.early_exit.groups import CompiledStack, compiling, group_bounds
from vllm_early_exit.model_executor.early_exit.kv_fill import KVPropagator, check_kv_fill_supported
from vllm_early_exit.model_executor.early_exit.replay import ExitRecord, note_step, with_replay
from vllm_early_exit.model_executor.early_exit.stats import ExitStats, PeriodicStatsLogger
from vllm_early_exit.model_executor.early_exit.step import NO_ROW_SETTINGS, RowSettings, StepState
from vllm_early_exit.model_executor.early_exit.walkers import EagerWalker, GroupedWalker, Walker
from vllm_early_exit.plugin.metrics import SharedCounters
from vllm_early_exit.plugin.requests import RequestRows


@ignore_torch_compile  # the decisions are Python between layers: only ``LayerGroup``s compile
class EarlyExitLlamaModel(LlamaModel):
    """``LlamaModel`` whose decode tokens may leave the layer stack early."""

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
        self.exit_stats = ExitStats(num_layers, skip_layers=config.skip_layers)
        self.decider = ExitDecider(config, num_layers, self.exit_stats)
        first_rank = get_tensor_model_parallel_rank() == 0
        self.stats_logger = PeriodicStatsLogger(config.log_interval_s, enabled=config.enabled and first_rank)
        served = vllm_config.model_config.served_model_name
        self.shared_counters = (
            SharedCounters.from_env(served if isinstance(served, str) else served[0], num_layers, config.skip_layers)
            if config.enabled and first_rank
            else None
        )
        self.request_rows = RequestRows.of_loading_runner() if config.enabled else None
        self.pure_decode_rows: int | None = None
        """The last step's token rows when it was pure decode (its logits rows), else None."""
        self.exit_record = (
            ExitRecord(num_layers, self.request_rows.runner.requests) if self.request_rows is not None else None
        )
        if config.enabled:
            check_kv_fill_supported(self.layers[self.start_layer : self.end_layer])
        self.compiled_stack = (
            CompiledStack(vllm_config, self.layers, self._group_bounds(), prefix)
            if config.may_compile and compiling(vllm_config)
            else None
        )
        self.kv_propagator = KVPropagator(self.layers, self.start_layer, self.end_layer, self.decider.check_layers)
        parts = (self.layers, self.start_layer, self.end_layer, self.decider, self.kv_propagator, self.exit_stats)
        self.eager_walker = EagerWalker(*parts)
        self.grouped_walker = (
            GroupedWalker(*parts, stack=self.compiled_stack) if self.compiled_stack is not None else None
        )

    def _group_bounds(self) -> list[tuple[int, int]]:
        decider = self.decider
        return group_bounds(
            self.start_layer, self.end_layer, decider.check_layers, decider.skip_layers,
            cut_before_checks=decider.needs_previous,
        )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        self.decider.begin_step()
        if self.decider.enabled:
            self.kv_propagator.ensure_kv_projections()
        batch = self._decode_batch(positions.device) if self.decider.enabled else None
        self.pure_decode_rows = batch.num_tokens if batch is not None and batch.pure else None
        if batch is None:
            return self._full_depth(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        settings = self._row_settings(batch, positions.device)
        unchecked = self._over_exit_batch(batch, settings)
        if unchecked or self._keeps_full_depth(batch, settings):
            self.exit_stats.unchecked_steps += unchecked
            if batch.pure:
                self.exit_stats.record_step(None)
            self._count(None, batch.num_live)
            return self._full_depth(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        settings = settings.on_token_rows(batch, hidden_states.shape[0])
        points = self.decider.check_layers | settings.budget_layers | batch.pinned_layers
        state = StepState(
            hidden_states, positions, batch, settings, points, self.config.num_hidden_layers, self.decider.defers
        )
        hidden_states = self._walker(points).walk(state)
        self.decider.exit_logits.seal(batch.num_tokens if batch.pure else None)
        if batch.num_live:
            note_step(self.exit_record, self.request_rows.input_batch, batch, state.decode_depths())
        self._publish()
        return hidden_states

    def _decode_batch(self, device: torch.device) -> DecodeBatch | None:
        """The step's decode rows, with the replayed rows of recomputes after preemption (``replay.py``)."""
        if self.request_rows is None:
            return None  # no step is taken as decode without the runner's batch (``batch.py``)
        meta, input_batch = current_step_metadata(), self.request_rows.input_batch
        batch = decode_batch(meta, input_batch)
        if meta is None:
            return batch
        per_row = self.decider.policy.per_row
        replay = self.exit_record.replay(meta, input_batch, skips=bool(self.decider.skip_layers), live_last=per_row)
        if replay is None:
            return batch
        self.exit_stats.replayed_tokens += sum(p >= 0 for p in replay.pinned)
        return with_replay(batch, replay, meta, keep_live=per_row, device=device)

    def _row_settings(self, batch: DecodeBatch, device: torch.device) -> RowSettings:
        """The decode rows' own request settings (one row per decode token)."""
        if self.request_rows is None:
            return NO_ROW_SETTINGS
        settings = self.request_rows.settings(
            batch.request_indices, self.decider.threshold, self.config.num_hidden_layers, device
        )
        return NO_ROW_SETTINGS if settings is None else settings

    def _keeps_full_depth(self, batch: DecodeBatch, settings: RowSettings) -> bool:
        if self.decider.policy.per_row:
            # Skipping is for every decode row: a request with early exit off keeps its step full depth.
            return settings.any_off and bool(self.decider.skip_layers)
        # The step leaves as a whole: not while it prefills too (but for replayed rows of a
        # recompute, ``replay.py``), nor when a request turned early exit off.
        return settings.any_off or not (batch.pure or batch.num_live == 0)

    def _over_exit_batch(self, batch: DecodeBatch, settings: RowSettings) -> bool:
        """More decode rows than ``max_exit_batch``: the step runs the full depth unchecked, unless
        a row is replayed after preemption (it must leave where it left) or has a depth budget."""
        limit = self.exit_config.max_exit_batch
        return limit is not None and batch.num_tokens > limit and batch.pinned is None and not settings.budget_layers

    def _walker(self, points: frozenset[int]) -> Walker:
        """Compiled groups when the step's decision points all fall on their cuts
        (a per-request budget elsewhere walks the layers one by one)."""
        grouped = self.grouped_walker
        return grouped if grouped is not None and self.compiled_stack.covers(points) else self.eager_walker

    def _full_depth(self, input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs):
        """Every layer for every row: vLLM's own forward, or the compiled whole stack."""
        stack = self.compiled_stack
        if stack is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        hidden_states, residual = stack.run_all(positions, hidden_states)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def _count(self, exit_layer: int | None, rows: int) -> None:
        self.exit_stats.record(exit_layer, rows)
        self._publish()

    def _publish(self) -> None:
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

    def load_weights(self, weights):
        """vLLM's loading, then the K/V-only projections state propagation fills with
        (built before vLLM post-processes the weights, while ``qkv_proj`` holds a plain matrix)."""
        loaded = super().load_weights(weights)
        if self.model.exit_config.enabled:
            self.model.kv_propagator.build_kv_projections()
        return loaded

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """vLLM's logits, but rows that left through a full-vocabulary check keep that check's logits."""
        stats = self.model.exit_stats
        logits, reused, computed = self.model.decider.exit_logits.logits(hidden_states, super().compute_logits)
        stats.sampled_from_checks += reused
        if computed and self.model.pure_decode_rows == hidden_states.shape[0]:
            stats.sampling_products += 1
        return logits

    def _init_model(
        self,
        vllm_config: VllmConfig,
        prefix: str = "",
        layer_type: type[nn.Module] = LlamaDecoderLayer,
    ) -> EarlyExitLlamaModel:
        return EarlyExitLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
