"""The early-exit LLaMA model class registered with vLLM.

``EarlyExitLlamaForCausalLM`` is vLLM's ``LlamaForCausalLM`` with its decoder
stack replaced by ``EarlyExitLlamaModel`` (through the ``_init_model`` hook).
Steps with prefill tokens only and vLLM's dummy runs take the full stack; steps
with decode tokens run the layer loop below, which skips the ``skip_layers``
(filling their K/V) and lets rows leave after a check layer or at their
request's depth budget. The loop walks the stack layer by layer (eager) or, with
``compile``, group by compiled group (``groups.py``). Weights, weight loading,
LoRA and sampling are vLLM's.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.compilation.decorators import ignore_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

from vllm_early_exit.model_executor.early_exit.batch import DecodeBatch, current_decode_batch
from vllm_early_exit.config import EarlyExitConfig
from vllm_early_exit.model_executor.early_exit.decision import ExitDecider, LogitReadout
from vllm_early_exit.model_executor.early_exit.groups import CompiledStack, compiling, group_bounds
from vllm_early_exit.model_executor.early_exit.kv_fill import KVPropagator, check_kv_fill_supported
from vllm_early_exit.plugin.metrics import SharedCounters
from vllm_early_exit.plugin.requests import RequestRows, RowSettings
from vllm_early_exit.model_executor.early_exit.stats import ExitStats, PeriodicStatsLogger


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
        self.decider = ExitDecider(config, num_layers)
        self.kv_fill = KVPropagator(self.layers)
        self.exit_stats = ExitStats(num_layers, skip_layers=config.skip_layers)
        first_rank = get_tensor_model_parallel_rank() == 0
        self.stats_logger = PeriodicStatsLogger(config.log_interval_s, enabled=config.enabled and first_rank)
        served = vllm_config.model_config.served_model_name
        self.shared_counters = (
            SharedCounters.from_env(
                served if isinstance(served, str) else served[0], num_layers, config.skip_layers
            )
            if config.enabled and first_rank
            else None
        )
        self.request_rows = RequestRows.of_loading_runner() if config.enabled else None
        if config.enabled:
            check_kv_fill_supported(self.layers[self.start_layer : self.end_layer])
        self.compiled_stack = (
            CompiledStack(
                vllm_config,
                self.layers,
                group_bounds(
                    self.start_layer,
                    self.end_layer,
                    self.decider.check_layers,
                    self.decider.skip_layers,
                    cut_before_checks=self.decider.needs_previous,
                ),
                prefix,
            )
            if config.enabled and config.compile and compiling(vllm_config)
            else None
        )
        # One layer per segment: the eager walk (also the compiled model's walk for
        # steps whose budgets fall between its cuts).
        self.layer_segments = [(i, i + 1) for i in range(self.start_layer, self.end_layer)]

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        batch = None
        if self.decider.enabled:
            batch = current_decode_batch(self.request_rows.input_batch if self.request_rows else None)
        if batch is None:
            return self._full_depth(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

        settings = (
            self.request_rows.settings(
                batch.request_indices, self.decider.threshold, self.config.num_hidden_layers, positions.device
            )
            if self.request_rows is not None
            else None
        )
        exit_off = settings is not None and settings.allowed is not None
        if self.decider.policy.per_row:
            # Skipping is for every decode row: a request with early exit off keeps its step full depth.
            full_depth = exit_off and bool(self.decider.skip_layers)
        else:
            # The step leaves as a whole: not while it prefills too, nor when a request turned early exit off.
            full_depth = exit_off or not batch.pure
        if full_depth:
            self._count(None, batch.num_tokens)
            return self._full_depth(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        return self._decode(hidden_states, positions, batch, _on_token_rows(settings, batch, hidden_states.shape[0]))

    def _full_depth(self, input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs):
        """Every layer for every row: vLLM's own forward, or the compiled groups in turn."""
        stack = self.compiled_stack
        if stack is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual, keep = torch.zeros_like(hidden_states), hidden_states.new_ones(hidden_states.shape[0], 1)
        for bounds in stack.bounds:
            hidden_states, residual = stack.run(bounds, positions, hidden_states, residual, keep)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def _decode(
        self, hidden_states: torch.Tensor, positions: torch.Tensor, batch: DecodeBatch, settings: RowSettings
    ) -> torch.Tensor:
        """The layer loop of a step with decode tokens, with their exits and skipped layers.

        Only decode rows leave or skip; in a mixed step the prefill rows run every
        layer beside them. ``settings``: per-row request settings, indexed by token
        row. Returns the final-normed hidden states.
        """
        decider = self.decider
        decider.begin_step()
        points = decider.check_layers | settings.budget_layers
        residual = None
        previous = None
        rows = batch.num_tokens
        # The step's decode rows (built once per step).
        decode_rows = torch.arange(rows, device=positions.device) if batch.pure else batch.rows
        # Decode rows still running; None while every row of a pure-decode step runs
        # (per-row tensors are then sliced, not gathered).
        remaining: torch.Tensor | None = None if batch.pure else batch.rows
        # Rows (of all the step's rows, padding and prefill included) still running; None: every row.
        # Eager walk: their indices (``running``); compiled groups: a 0/1 mask over rows (``keep``).
        running: torch.Tensor | None = None
        keep: torch.Tensor | None = None
        # (rows, stream they emit) for rows that left through an exit head.
        emitted: list[tuple[torch.Tensor, torch.Tensor]] = []

        def of_candidates(per_row: torch.Tensor | None) -> torch.Tensor | None:
            if per_row is None:
                return None
            return per_row[:rows] if remaining is None else per_row[remaining]

        # Compiled groups when the step's decision points all fall on their cuts
        # (a per-request budget elsewhere walks the layers one by one).
        stack = self.compiled_stack
        grouped = stack is not None and stack.covers(points)
        if grouped:
            residual, keep = torch.zeros_like(hidden_states), hidden_states.new_ones(hidden_states.shape[0], 1)
        segments = stack.bounds if grouped else self.layer_segments

        for first, stop in segments:
            index = stop - 1  # the segment's last layer, where a decision may follow
            if decider.needs_previous and index in decider.check_layers:
                previous = _stream(hidden_states, residual)
            skipped = first in decider.skip_layers  # skipped layers are segments of their own
            if skipped and batch.pure:
                self.kv_fill.fill(positions, _stream(hidden_states, residual), (first,))
            elif grouped:
                rows_in = keep
                if skipped:  # decode rows of a mixed step hold their stream through it
                    rows_in = keep.clone()
                    rows_in[remaining] = 0
                hidden_states, residual = stack.run((first, stop), positions, hidden_states, residual, rows_in)
            else:
                before = _stream(hidden_states, residual) if skipped else None
                if running is None:
                    hidden_states, residual = self.layers[index](positions, hidden_states, residual)
                else:
                    hidden_states, residual = self._run_layer_for(
                        self.layers[index], positions, hidden_states, residual, running
                    )
                if before is not None:
                    # Decode rows of a mixed step skip the layer: keep their stream as it
                    # was (the layer's attention wrote their K/V from it, as a fill would).
                    hidden_states[remaining] = 0
                    residual[remaining] = before[remaining]
            if index not in points:
                continue
            candidates = decode_rows if remaining is None else remaining
            if candidates.numel() == 0:
                continue
            if residual is None:  # only layers skipped so far
                residual = torch.zeros_like(hidden_states)
            # A new tensor: the fused add+norm of the next layer works in place.
            stream = hidden_states + residual
            leave = decider.rows_to_exit(
                index,
                of_candidates(stream),
                candidates,
                step_rows=stream.shape[0],
                previous=of_candidates(previous),
                thresholds=of_candidates(settings.thresholds),
                allowed=of_candidates(settings.allowed),
                forced=None if settings.last_layers is None else of_candidates(settings.last_layers) <= index,
            )
            leaving = candidates[leave]
            count = leaving.numel()  # the step's one host sync per check
            if count == 0:
                continue
            self.exit_stats.record(index, count)
            if decider.heads is not None:
                emitted.append((leaving, decider.exit_stream(index, stream[leaving])))
            if count == candidates.numel() and batch.pure:
                # Every logits row has left: fill the deeper layers' K/V and stop.
                self.kv_fill.fill(positions, stream, range(index + 1, self.end_layer))
                self._publish()
                return self._final_norm(stream, emitted)
            # Freeze the leaving rows: hidden 0 and residual = their stream, so every
            # deeper layer's input norm sees the exit-layer stream (state propagation
            # through the layer's own attention) and the final norm reads it.
            hidden_states[leaving] = 0
            residual[leaving] = stream[leaving]
            if grouped:
                keep[leaving] = 0
            else:
                if running is None:
                    running = torch.arange(hidden_states.shape[0], device=stream.device)
                running = running[~torch.isin(running, leaving)]
            remaining = candidates[~leave]

        self.exit_stats.record(None, rows if remaining is None else remaining.numel())
        self._publish()
        return self._final_norm(_stream(hidden_states, residual), emitted)

    def _final_norm(self, stream: torch.Tensor, emitted: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The final norm of each row's last stream; rows that left through a head emit the head's stream."""
        for leaving, exit_stream in emitted:
            stream[leaving] = exit_stream
        return self.norm(stream)

    @staticmethod
    def _run_layer_for(
        layer: nn.Module,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        running: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decoder layer where only ``running`` rows take the MLP.

        Attention runs for every row: for frozen rows it writes K/V from their
        exit-layer stream, which is what state propagation writes.
        """
        hidden_states, residual = layer.input_layernorm(hidden_states, residual)
        hidden_states = layer.self_attn(positions=positions, hidden_states=hidden_states)
        hidden, res = layer.post_attention_layernorm(hidden_states[running], residual[running])
        hidden = layer.mlp(hidden)
        out = torch.zeros_like(hidden_states).index_copy_(0, running, hidden)
        return out, residual.index_copy_(0, running, res)

    def _count(self, exit_layer: int | None, rows: int) -> None:
        self.exit_stats.record(exit_layer, rows)
        self._publish()

    def _publish(self) -> None:
        self.stats_logger.maybe_log(self.exit_stats)
        if self.shared_counters is not None:
            self.shared_counters.publish(self.exit_stats)


def _on_token_rows(settings: RowSettings | None, batch: DecodeBatch, num_rows: int) -> RowSettings:
    """Request settings (one row per decode token) moved onto the step's token rows."""
    if settings is None:
        return RowSettings(None, None)
    if batch.pure:
        return settings

    def scatter(values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            return None
        out = values.new_zeros(num_rows)
        out[batch.rows] = values
        return out

    return RowSettings(
        allowed=scatter(settings.allowed),
        thresholds=scatter(settings.thresholds),
        last_layers=scatter(settings.last_layers),
        budget_layers=settings.budget_layers,
    )


def _stream(hidden_states: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The residual stream in vLLM's fused layout (``residual`` is None before the first layer)."""
    return hidden_states if residual is None else hidden_states + residual


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
