"""The early-exit LLaMA model classes registered with vLLM.

``EarlyExitLlamaForCausalLM`` is vLLM's ``LlamaForCausalLM`` with its decoder
stack replaced by ``EarlyExitLlamaModel`` (through the ``_init_model`` hook).
Steps without decode tokens and vLLM's dummy runs take the full stack; a step
with decode tokens is walked down the stack by ``DecodeStep`` (``early_exit/step.py``)
on fixed shapes: run a segment of layers, check, leave or go on. Before the walk
the model reads, on the host, what the runner holds for the step
(``early_exit/runner.py``): its decode rows and the requests' own settings, which
it keeps in persistent buffers (``early_exit/requests.py``). ``compute_logits``
reuses the logits rows left with. Weights, weight loading and sampling are vLLM's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from vllm.compilation.decorators import ignore_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

from vllm_early_exit.config import EarlyExitConfig
from vllm_early_exit.model_executor.early_exit.batch import DecodeBatch
from vllm_early_exit.model_executor.early_exit.catch_up import WaitingTokens
from vllm_early_exit.model_executor.early_exit.checks import ExitCheck, LogitReadout
from vllm_early_exit.model_executor.early_exit.graphs import GraphedSteps
from vllm_early_exit.model_executor.early_exit.groups import CompiledStack, compiling
from vllm_early_exit.model_executor.early_exit.kv_fill import KVPropagator, check_kv_fill_supported
from vllm_early_exit.model_executor.early_exit.plan import StepPlan, plan
from vllm_early_exit.model_executor.early_exit.policies import make_policy
from vllm_early_exit.model_executor.early_exit.replay import ExitRecord, note_step
from vllm_early_exit.model_executor.early_exit.requests import RequestTable, RowSettings
from vllm_early_exit.model_executor.early_exit.rows import RowState
from vllm_early_exit.model_executor.early_exit.runner import RunnerView
from vllm_early_exit.model_executor.early_exit.stats import CounterFile, ExitCounters
from vllm_early_exit.model_executor.early_exit.step import DecodeStep, StepLog


@ignore_torch_compile  # the decisions sit between segments: only ``LayerGroup``s compile
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
        self.check = ExitCheck(config, num_layers)
        self.policy = make_policy(config.policy, config.quorum)
        first_rank = get_tensor_model_parallel_rank() == 0
        served = vllm_config.model_config.served_model_name
        counter_file = (
            CounterFile.from_env(served if isinstance(served, str) else served[0], num_layers, config.skip_layers)
            if config.enabled and first_rank
            else None
        )
        self.exit_counters = ExitCounters(
            num_layers, config.skip_layers, counter_file, config.log_interval_s if config.enabled and first_rank else 0
        )
        self.runner = RunnerView.of_loading_runner() if config.enabled else None
        # A catch-up engine recomputes a preempted request at full depth, which is exact: no replay.
        replays = self.runner is not None and not config.catches_up
        self.exit_record = ExitRecord(num_layers, self.runner.live_requests) if replays else None
        self.waiting = WaitingTokens(num_layers) if config.catches_up and self.runner is not None else None
        """With ``skipped_kv: "recompute"``: the requests whose tokens wait after the last step."""
        scheduler = vllm_config.scheduler_config
        self.requests = RequestTable(
            max(scheduler.max_num_seqs, scheduler.max_num_batched_tokens), num_layers, config.threshold,
            torch.get_default_device(),  # the device vLLM builds the model on
        )
        if config.enabled:
            check_kv_fill_supported(self.layers[self.start_layer : self.end_layer])
        self._plans: dict[frozenset[int], StepPlan] = {}
        self.engine_plan = self.plan_with(frozenset())
        self.compiled_stack = (
            CompiledStack(
                vllm_config, self.layers, self.engine_plan, prefix, checks=self.check.fusable,
                confirms=self.check.confirmation_fusable,
            )
            if config.may_compile and compiling(vllm_config)
            else None
        )
        self.kv_propagator = KVPropagator(self.layers, self.start_layer, self.end_layer, self.check.check_layers)
        self.decode_step = DecodeStep(
            self.layers, self.start_layer, self.end_layer, self.check, self.policy, self.kv_propagator,
            self.exit_counters, self.norm, self.compiled_stack, fills_exits=not config.catches_up,
        )
        if self.compiled_stack is not None:
            self.compiled_stack.bind(
                self.decode_step.stage, self.decode_step.exit_output, self.check.prepare, not self.check.two_stage,
                self.exit_counters.rows, self.check.heads is not None, self.decode_step.confirmation,
            )
        self.last_step: StepLog | None = None
        """What the host knows of the last step with decode rows (None: a full-depth step)."""
        self.step_logits: tuple[StepLog, torch.Tensor, torch.Tensor] | None = None
        """The last step's kept logits of its sampled rows (its log, the logits, which rows took them)."""

    def plan_with(self, extra_points: frozenset[int]) -> StepPlan:
        """The step plan with the engine's decision points and ``extra_points`` (budget ends,
        replayed exits), made once per set of points."""
        if extra_points not in self._plans:
            self._plans[extra_points] = plan(
                self.start_layer, self.end_layer, self.check.check_layers, self.exit_config.skip_layers,
                extra_points, cut_before_checks=self.check.reads_previous,
            )
        return self._plans[extra_points]

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        step = self.prepare_step(positions)
        return self.run_step(step, input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def run_step(self, step, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        """A prepared step (``prepare_step``) walked eagerly, or every layer when it is None."""
        if step is None:
            return self._full_depth(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        batch, settings = step
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        num_rows = positions.shape[0]
        rows = RowState(
            hidden_states, positions, self._decode_rows(batch, num_rows, positions.device), settings,
            self.config.num_hidden_layers, self.exit_counters, self._pins(batch, num_rows, positions.device),
            pure=batch.ends_early, leaders=self._leaders(batch, num_rows, positions.device),
        )
        points = settings.budget_layers | batch.pinned_layers
        branches = self.decode_step.branches(self.plan_with(points), rows, points)
        return self.walk(batch, rows, lambda log: self.decode_step.run(branches, rows, log))

    def prepare_step(self, positions: torch.Tensor) -> tuple[DecodeBatch, RowSettings] | None:
        """The host's work before a step (no device read): its decode rows and their settings;
        None when the step runs every layer for every row (counted when it has decode rows)."""
        self.last_step, self.step_logits = None, None
        if self.runner is None:
            return None
        self.kv_propagator.ensure_kv_projections()
        batch = self._step_batch(positions.device)
        if batch is None:
            return None
        self.runner.write_settings(self.requests)
        num_rows = positions.shape[0]
        settings = (
            self.requests.rows(num_rows, batch.num_tokens)
            if batch.pure
            else self.requests.scattered(num_rows, batch.rows, batch.request_indices)
        )
        if self._runs_full_depth(batch, settings):
            self._count_full_depth(batch)
            return None
        return batch, settings

    def _step_batch(self, device: torch.device) -> DecodeBatch | None:
        """The step's decode rows: with replayed exits after a preemption, or in an engine that
        catches up, its decode groups (their waiting tokens and the requests that run every
        layer for want of room to wait counted)."""
        counters = self.exit_counters
        if self.waiting is None:
            batch, replayed = self.runner.decode_batch(
                self.exit_record, self.policy.per_row, bool(self.exit_config.skip_layers), device
            )
            counters.replayed_tokens += replayed
            return batch
        self.waiting.clear()
        batch, capped = self.runner.decode_groups(self.exit_config.max_waiting)
        if capped:
            counters.rows[self.config.num_hidden_layers] += len(capped)
            counters.rerun_rows += sum(capped) - len(capped)
        if batch is not None:
            counters.rerun_rows += batch.groups.rerun_rows
        return batch

    def walk(self, batch: DecodeBatch, rows: RowState, run: Callable[[StepLog], torch.Tensor]) -> torch.Tensor:
        """Runs a step's branches (``run``: eagerly, or replaying graphs) and records it."""
        log = StepLog(batch.ends_early, batch.num_tokens)
        hidden_states = run(log)
        self.last_step = log
        last_rows = None
        if self.waiting is not None:
            groups = batch.groups
            last_rows = torch.tensor(groups.last_rows, dtype=torch.long, device=rows.depths.device)
            self.waiting.note(self.runner.request_ids(groups.requests), groups.sizes, rows.depths[last_rows])
        elif batch.num_live:
            depths = rows.depths[: batch.num_tokens] if batch.pure else rows.depths[batch.rows]
            note_step(self.exit_record, self.runner.input_batch, batch, depths.clone())
        if batch.ends_early and rows.logits is not None:
            self.step_logits = (log, *self._sampled(batch, rows, last_rows))
        self.exit_counters.after_step()
        return hidden_states

    @staticmethod
    def _sampled(
        batch: DecodeBatch, rows: RowState, last_rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept logits, and which rows took them, of the rows vLLM samples, in request order:
        the decode rows of a pure-decode step, each group's last row in a catch-up step of groups only."""
        if batch.pure:
            return rows.logits[: batch.num_tokens], rows.taken[: batch.num_tokens]
        return rows.logits.index_select(0, last_rows), rows.taken.index_select(0, last_rows)

    def capture_rows(self, input_ids: torch.Tensor, positions: torch.Tensor) -> RowState:
        """The persistent rows a captured pure-decode step of ``len(positions)`` rows runs on
        (every row a decode row, each row's settings from the request table's slots)."""
        num_rows = positions.shape[0]
        decode = torch.ones(num_rows, dtype=torch.bool, device=positions.device)
        return RowState(
            self.embed_input_ids(input_ids), positions, decode, self.requests.rows(num_rows, num_rows),
            self.config.num_hidden_layers, self.exit_counters,
        )

    @staticmethod
    def _decode_rows(batch: DecodeBatch, num_rows: int, device: torch.device) -> torch.Tensor:
        """The decode rows of the step as a mask over its token rows."""
        if batch.pure:
            return torch.arange(num_rows, device=device) < batch.num_tokens
        decode = torch.zeros(num_rows, dtype=torch.bool, device=device)
        decode[batch.rows] = True
        return decode

    @staticmethod
    def _leaders(batch: DecodeBatch, num_rows: int, device: torch.device) -> torch.Tensor | None:
        """Per token row, the row that decides for it (``RowState.leaders``); None when every row
        decides for itself."""
        if batch.leaders is None:
            return None
        leaders = torch.arange(num_rows, device=device)
        leaders[batch.rows] = torch.tensor(batch.leaders, dtype=torch.long, device=device)
        return leaders

    @staticmethod
    def _pins(batch: DecodeBatch, num_rows: int, device: torch.device) -> torch.Tensor | None:
        """Per token row, the layer a replayed row leaves after (-1: it decides live)."""
        if batch.pinned is None:
            return None
        pinned = torch.full((num_rows,), -1, dtype=torch.long, device=device)
        pinned[batch.rows] = torch.tensor(batch.pinned, dtype=torch.long, device=device)
        return pinned

    def _runs_full_depth(self, batch: DecodeBatch, settings: RowSettings) -> bool:
        """Steps that run every layer for every row with no check."""
        if self._over_exit_batch(batch, settings):
            self.exit_counters.unchecked_steps += 1
            return True
        if self.policy.per_row:
            # Skipping is for every decode row: a request with early exit off keeps its step full depth.
            return settings.any_off and bool(self.exit_config.skip_layers)
        # The step leaves as a whole: not while it prefills too (but for replayed rows of a
        # recompute, ``replay.py``), nor when a request turned early exit off.
        return settings.any_off or not (batch.ends_early or batch.num_live == 0)

    def _over_exit_batch(self, batch: DecodeBatch, settings: RowSettings) -> bool:
        """More requests decoding than ``max_exit_batch`` (a catch-up group counts once): the step
        runs the full depth unchecked, unless a row is replayed after preemption (it must leave
        where it left) or has a depth budget."""
        limit = self.exit_config.max_exit_batch
        return (
            limit is not None and batch.num_requests > limit and batch.pinned is None and not settings.budget_layers
        )

    def _count_full_depth(self, batch: DecodeBatch) -> None:
        """A step with decode rows that runs every layer for every row: counted as such."""
        counters = self.exit_counters
        self.last_step = StepLog(batch.ends_early, batch.num_tokens)
        if batch.ends_early:
            counters.step(None)
        counters.rows[self.config.num_hidden_layers] += batch.num_live
        counters.after_step()

    def _full_depth(self, input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs):
        """Every layer for every row: vLLM's own forward, or the compiled whole stack."""
        stack = self.compiled_stack
        if stack is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        hidden_states, residual = stack.run_all(positions, hidden_states)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def take_step_logits(self, num_rows: int) -> tuple[bool, torch.Tensor, torch.Tensor] | None:
        """The kept logits of the last step, once, if it sampled ``num_rows`` rows that may all
        have left (a pure-decode step, or a catch-up step of groups only): (whether every row
        took them, the logits, which rows took them)."""
        kept, self.step_logits = self.step_logits, None
        if kept is None or kept[1].shape[0] != num_rows:
            return None
        log, logits, taken = kept
        return log.logits_complete, logits, taken


class EarlyExitLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's LLaMA with early exit between decoder layers.

    Selected by the plugin when ``additional_config`` carries ``early_exit``
    settings, or explicitly with ``hf_overrides={"architectures": [...]}``.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.model.check.bind_readout(LogitReadout(self.model.norm, self.lm_head, self.logits_processor))
        mode = self.model.exit_config.cuda_graphs
        self.graphed_steps = GraphedSteps(self.model, mode) if mode and self.model.runner is not None else None
        """With ``cuda_graphs``: the captured decode steps vLLM's full-graph wrapper replays (``plugin/graphs.py``)."""

    def take_waiting(self) -> dict[str, int] | None:
        """``{req_id: waiting tokens}`` of the last step, once, for the scheduler (``plugin/rewind.py``);
        None when the engine does not catch up (``skipped_kv: "propagate"``)."""
        waiting = self.model.waiting
        return None if waiting is None else waiting.take()

    def load_weights(self, weights):
        """vLLM's loading, then the K/V-only projections state propagation fills with
        (built before vLLM post-processes the weights, while ``qkv_proj`` holds a plain matrix)."""
        loaded = super().load_weights(weights)
        if self.model.exit_config.enabled:
            self.model.kv_propagator.build_kv_projections()
        return loaded

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """vLLM's logits, but rows that left through a full-vocabulary check keep that check's logits
        (when every row did, the LM head does not run)."""
        kept = self.model.take_step_logits(hidden_states.shape[0])
        if kept is None:
            if self.model.last_step is not None and self.model.last_step.pure:
                self.model.exit_counters.sampling_products += 1
            return super().compute_logits(hidden_states)
        complete, logits, taken = kept
        if complete:
            return logits
        self.model.exit_counters.sampling_products += 1
        return torch.where(taken.unsqueeze(1), logits, super().compute_logits(hidden_states))

    def _init_model(
        self,
        vllm_config: VllmConfig,
        prefix: str = "",
        layer_type: type[nn.Module] = LlamaDecoderLayer,
    ) -> EarlyExitLlamaModel:
        return EarlyExitLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
