"""The training loop of ``finetune``: accelerate drives it, so ``accelerate launch`` or
``torchrun`` spread the same command over processes and machines.

A run lives in one folder:

    run.json                what decides it (settings, model, data); --resume checks it
    data/                   the original's replies and top-k (data.py)
    checkpoint.pt           the trainable weights, the optimizer and the progress, every evaluation
    best.pt                 the trainable weights of the best evaluation so far
    finetune_report.json    settings, data, loss per exit layer and held-out figures per evaluation
    finetune_report.md      the same as a table, rewritten at every evaluation
    adapter/                (lora) the best checkpoint's factors (adapter.py)
    model/                  the exit-ready checkpoint vLLM loads: the best weights, merged

Best: among the evaluations whose full-depth agreement with the original keeps ``ceiling``,
the one whose max-prob rule reaches 0.95 agreement at the lowest depth (the untrained model,
evaluated at step 0, is a candidate too: a run never makes the model worse than the original).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_early_exit.tools import console
from vllm_early_exit.tools.finetune import adapter as exit_adapter
from vllm_early_exit.tools.finetune.data import TeacherData, save_whole
from vllm_early_exit.tools.finetune.evaluate import evaluate
from vllm_early_exit.tools.finetune.loss import exit_loss, exit_scale, rotation, top_k_kl
from vllm_early_exit.tools.finetune.readouts import ExitReadouts
from vllm_early_exit.tools.finetune.settings import LORA_MODULES, FinetuneSettings


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    select: torch.Tensor
    """``[batch, seq]`` the reply positions, whose rows the teacher tensors hold in mask order."""
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    tokens: int


def make_batch(data: TeacherData, indices: list[int]) -> Batch:
    """Sequences ``prompt + reply[:-1]``, right-padded; the reply position j (predicting reply
    token j) is ``len(prompt) - 1 + j``."""
    sequences = [data.prompts[i] + data.replies[i][:-1] for i in indices]
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(indices), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    select = torch.zeros_like(ids, dtype=torch.bool)
    for row, (i, seq) in enumerate(zip(indices, sequences)):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        select[row, len(data.prompts[i]) - 1:len(seq)] = True
    return Batch(ids, mask, select, torch.cat([data.top_ids[i] for i in indices]),
                 torch.cat([data.top_logprobs[i] for i in indices]), int(mask.sum()))


def batch_order(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The sequences of ``step``: epochs of a seeded permutation each, cut into batches
    (a resumed run reads the same batches from the same step on)."""
    per_epoch = max(1, n // batch_size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return order[index * batch_size:(index + 1) * batch_size]


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    best_step: int | None = None
    best_key: list | None = None


def selection_key(result: dict, settings: FinetuneSettings) -> list | None:
    """Smaller is better; None: the evaluation lost the ceiling and is never chosen."""
    if result["full_depth_agreement"] < settings.ceiling:
        return None
    depth = result["depth_at"]["0.95"]
    mean_exit = sum(result["exit_agreement"].values()) / len(result["exit_agreement"])
    return [depth if depth is not None else 2.0, -mean_exit]


def build_student(model_path: Path, settings: FinetuneSettings, num_layers: int) -> ExitReadouts:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if settings.method == "lora":
        from peft import LoraConfig, get_peft_model

        # Every layer adapts, those past the deepest exit too: they learn nothing from the
        # exit losses, but they can answer under the anchor for what the earlier layers moved.
        config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                            target_modules=list(LORA_MODULES))
        model = get_peft_model(model, config)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(".layers." in name)
    return ExitReadouts(model, settings.layer_dropout)


def trainable_state(readouts: ExitReadouts) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in readouts.named_parameters() if p.requires_grad}


def load_trainable(readouts: ExitReadouts, state: dict[str, torch.Tensor]) -> None:
    params = dict(readouts.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def train(
    out: Path, model_path: Path, settings: FinetuneSettings, train_data: TeacherData,
    held_out: TeacherData, run_info: dict, resume: bool,
) -> dict:
    """Trains until ``settings.tokens`` sequence tokens have run, evaluating every
    ``eval_every`` steps; returns the report (also written to ``out`` at every evaluation)."""
    from accelerate import Accelerator

    # bfloat16 autocast around the training forward only (not accelerate's mixed precision,
    # which would wrap the model's forward, evaluation included): evaluation stays float32,
    # as the model is served.
    accelerator = Accelerator()
    num_layers = run_info["num_layers"]
    exit_layers = settings.layers_for(num_layers)
    readouts = build_student(model_path, settings, num_layers)
    params = [p for p in readouts.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    progress = Progress()
    checkpoint = out / "checkpoint.pt"
    if resume and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        load_trainable(readouts, saved["trainable"])
        optimizer.load_state_dict(saved["optimizer"])
        progress = Progress(**saved["progress"])
        console.say(f"resumed at step {progress.step} ({progress.tokens:,} tokens trained)")
    student, optimizer = accelerator.prepare(readouts, optimizer)
    plain = accelerator.unwrap_model(student)
    per_step = train_data.tokens() / len(train_data) * settings.batch_size * accelerator.num_processes
    steps = math.ceil(settings.tokens / per_step)
    losses: dict[int, list[float]] = defaultdict(list)

    def write(report_only: bool = False) -> dict:
        report = {**run_info, "settings": settings.as_dict(), "exit_layers": list(exit_layers),
                  "steps": progress.step, "tokens": progress.tokens, "seconds": progress.seconds,
                  "tokens_per_hour": progress.tokens / progress.seconds * 3600 if progress.seconds else None,
                  "best_step": progress.best_step, "history": progress.history}
        if accelerator.is_main_process:
            from vllm_early_exit.tools.finetune.report import write_report

            write_report(report, out)
            if not report_only:
                save_whole({"trainable": trainable_state(plain), "optimizer": optimizer.state_dict(),
                       "progress": progress.__dict__}, checkpoint)
        return report

    def evaluation() -> None:
        if not accelerator.is_main_process:
            return
        result = evaluate(plain, held_out, exit_layers)
        entry = {"step": progress.step, "tokens": progress.tokens, "seconds": round(progress.seconds, 1),
                 "loss": {str(k): sum(v) / len(v) for k, v in sorted(losses.items())}, **result}
        losses.clear()
        progress.history.append(entry)
        key = selection_key(result, settings)
        if key is not None and (progress.best_key is None or key < progress.best_key):
            progress.best_step, progress.best_key = progress.step, key
            save_whole(trainable_state(plain), out / "best.pt")
        depth = result["depth_at"]["0.95"]
        console.say(
            f"step {progress.step:5d}  {progress.tokens:>9,} tokens  full depth {result['full_depth_agreement']:.3f}  "
            f"exits " + " ".join(f"{v:.2f}" for v in result["exit_agreement"].values())
            + f"  depth at 0.95: {'-' if depth is None else f'{depth:.3f}'}"
            + ("  (best)" if progress.best_step == progress.step else "")
        )

    if not progress.history:
        console.say("evaluating the original on the held-out replies (step 0) ...")
        evaluation()
        write()
    student.train()
    with console.phase(f"training ({settings.method}, {settings.tokens:,} tokens)", total=steps) as bar:
        bar.advance(progress.step)
        while progress.tokens < settings.tokens:
            start = time.monotonic()
            order = batch_order(len(train_data), settings.batch_size * accelerator.num_processes,
                                settings.seed, progress.step)
            mine = order[accelerator.process_index::accelerator.num_processes]
            batch = make_batch(train_data, mine)
            layers = rotation(exit_layers, progress.step, settings.exits_per_step)
            with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                readout = student(batch.input_ids, batch.attention_mask, batch.select, layers)
                loss = 0.0
                for layer, logits in readout.items():
                    if layer == num_layers - 1:
                        kl = top_k_kl(logits, batch.top_ids, batch.top_logprobs).mean()
                        weight = settings.anchor_weight
                    else:
                        kl = exit_loss(logits, batch.top_ids, batch.top_logprobs, settings.exit_target).mean()
                        weight = exit_scale(layer, num_layers, settings.exit_weight)
                    loss = loss + weight * kl
                    losses[layer].append(float(kl))
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            progress.step += 1
            progress.tokens += int(accelerator.reduce(torch.tensor(batch.tokens), "sum"))
            progress.seconds += time.monotonic() - start
            bar.advance()
            if progress.step % settings.eval_every == 0 or progress.tokens >= settings.tokens:
                evaluation()
                write()
        bar.done(f"{progress.step} steps, {progress.tokens:,} tokens")
    return write(report_only=True)


def export(out: Path, model_path: Path, settings: FinetuneSettings, report: dict) -> Path:
    """The best checkpoint as the exit-ready model ``out/model`` (and, for LoRA, its factors in
    ``out/adapter``, the file that ships)."""
    readouts = build_student(model_path, settings, report["num_layers"])
    if (out / "best.pt").exists():
        load_trainable(readouts, torch.load(out / "best.pt", weights_only=True))
    best = next((h for h in report["history"] if h["step"] == report["best_step"]), None)
    meta = {"base_model": Path(model_path).name, "method": settings.method, "best_step": report["best_step"],
            "tokens": best["tokens"] if best else 0, "held_out": {k: best[k] for k in (
                "full_depth_agreement", "exit_agreement", "depth_at")} if best else None}
    target = out / "model"
    if settings.method == "lora":
        factors, scale, rank = exit_adapter.lora_factors(readouts.model)
        exit_adapter.save(out / "adapter", factors, scale, rank, meta)
        import shutil

        shutil.rmtree(target, ignore_errors=True)
        return exit_adapter.build_merged(model_path, out / "adapter", target)
    from transformers import AutoTokenizer

    readouts.model.save_pretrained(target)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(target)
    (target / exit_adapter.META).write_text(json.dumps(meta, indent=2) + "\n")
    return target
