"""Exit adapters on a frozen trunk, measured offline before any engine code is written.

Design (b) of the exit-ready issue (Kangaroo 2404.18911, EE-Tuning 2402.00518): the trunk is
the original, untouched, so the model's full-depth output is the original's by construction
(ceiling 1.0). After each exit layer L a small block that carries context -- one decoder layer
(attention + MLP, started as a copy of the model's last layer) and its own copy of the final
norm -- maps layer L's stream to the original's final distribution through the shared LM head:

    readout_L = lm_head(norm_L(adapter_L(h_L)))

Trained by self-distillation on the teacher data of ``finetune`` (the original's greedy
replies with its top-20 at every reply token; KL over the top-k and the rest of the mass,
``loss.top_k_kl``). The trunk being frozen, each sequence's streams at the exit layers are
computed once and cached; only the adapters train.

Scored on the held-out replies, teacher-forced, against the original's tokens, as
``finetune``'s evaluation scores a tuned model (the oracle's max-prob rule), with two depths:
``depth``, trunk layers only (what the rule's figure is elsewhere), and ``depth with adapters``,
which adds one layer for every adapter a token runs (each check runs its adapter; a token that
leaves at none runs them all) -- the weight bytes an engine would read.

    python benchmarks/exit_adapter_probe.py --data RUN/data --work DIR [--epochs 2]

``--data``: a ``finetune`` run's data folder. Streams, the adapters after every epoch and the
results are written as they are made; a stopped run continues where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from vllm_early_exit.tools.finetune.data import TeacherData, save_whole
from vllm_early_exit.tools.finetune.evaluate import AGREEMENTS, THRESHOLDS, lowest_depth
from vllm_early_exit.tools.finetune.loss import top_k_kl
from vllm_early_exit.tools.oracle import TokenReadouts, max_prob_exits

RESULTS = Path("benchmarks/results/finetune")


class ExitAdapter(nn.Module):
    """A final norm of its own after one decoder layer (``layer``: attention and MLP) or, as
    Kangaroo's, its attention alone (``attention``: about a quarter of a SmolLM2 layer's
    weights), all started from the model's last ones; or, without context, the tuned-lens affine
    map of ``train-heads`` (``affine``: ``h + W h + b``, started at the identity)."""

    def __init__(self, model: nn.Module, design: str) -> None:
        super().__init__()
        last = model.model.layers[-1]
        self.design = design
        if design == "layer":
            self.layer = copy.deepcopy(last)
        elif design == "affine":
            self.affine = nn.Linear(model.config.hidden_size, model.config.hidden_size)
            nn.init.zeros_(self.affine.weight)
            nn.init.zeros_(self.affine.bias)
        else:
            self.input_layernorm = copy.deepcopy(last.input_layernorm)
            self.self_attn = copy.deepcopy(last.self_attn)
        self.norm = copy.deepcopy(model.model.norm)

    def forward(self, stream: torch.Tensor, position_embeddings) -> torch.Tensor:
        if self.design == "layer":
            return self.norm(self.layer(stream, position_embeddings=position_embeddings))
        if self.design == "affine":
            return self.norm(stream + self.affine(stream))
        attended, _ = self.self_attn(self.input_layernorm(stream), position_embeddings, None)
        return self.norm(stream + attended)

    def weights(self) -> int:
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith("norm"))


class Probe:
    def __init__(self, model_path: Path, layers: list[int], work: Path, streams: Path, target: str,
                 design: str = "layer") -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layers = layers
        self.num_layers = len(self.model.model.layers)
        self.work = work
        self.streams_dir = streams
        self.target = target
        streams.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        self.adapters = nn.ModuleDict({str(layer): ExitAdapter(self.model, design) for layer in layers})
        self.adapter_cost = self.adapters[str(layers[0])].weights() / sum(
            p.numel() for p in self.model.model.layers[-1].parameters())
        """An adapter's weights as a share of a decoder layer's: what a check adds to a token's depth."""
        self.adapters.requires_grad_(True)

    def rope(self, length: int):
        positions = torch.arange(length)[None]
        dummy = torch.zeros(1, length, self.model.config.hidden_size)
        return self.model.model.rotary_emb(dummy, positions)

    @torch.no_grad()
    def streams(self, data: TeacherData, split: str, chunk: int = 64) -> list[dict[int, torch.Tensor]]:
        """Per sequence, ``{layer: [1, seq, hidden]}`` (float16 on disk) of prompt + reply[:-1]."""
        out = []
        for start in range(0, len(data), chunk):
            path = self.streams_dir / f"{split}-{start // chunk:04d}.pt"
            if not path.exists():
                t0 = time.time()
                part = []
                for prompt, reply in zip(data.prompts[start:start + chunk], data.replies[start:start + chunk]):
                    ids = torch.tensor(prompt + reply[:-1])[None]
                    hidden = self.model.model(input_ids=ids, output_hidden_states=True).hidden_states
                    part.append({layer: hidden[layer + 1].half() for layer in self.layers})
                save_whole(part, path)
                print(f"streams {split} {start + len(part)}/{len(data)} ({time.time() - t0:.0f} s)", flush=True)
            out += torch.load(path, weights_only=True)
        return out

    def readout(self, layer: int, stream: torch.Tensor, rope, select: slice) -> torch.Tensor:
        hidden = self.adapters[str(layer)](stream.float(), rope)
        return self.model.lm_head(hidden[0, select])

    def train(self, data: TeacherData, streams, epochs: int, until: int, lr: float, accumulate: int, log) -> None:
        """Train up to epoch ``until`` of ``epochs`` (the cosine schedule spans all of them)."""
        params = [p for p in self.adapters.parameters()]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        steps = epochs * math.ceil(len(data) / accumulate)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        done = 0
        ckpt = self.work / "adapters.pt"
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=True)
            self.adapters.load_state_dict(state["adapters"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            done = state["epochs"]
        for epoch in range(done, until):
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch)).tolist()
            t0, losses = time.time(), {layer: [] for layer in self.layers}
            for i, seq in enumerate(order):
                prompt, reply = data.prompts[seq], data.replies[seq]
                select = slice(len(prompt) - 1, None)
                rope = self.rope(len(prompt) + len(reply) - 1)
                total = 0.0
                for layer in self.layers:
                    logits = self.readout(layer, streams[seq][layer], rope, select)
                    kl = self.loss(logits, data.top_ids[seq], data.top_logprobs[seq])
                    losses[layer].append(float(kl))
                    total = total + kl
                (total / accumulate).backward()
                if (i + 1) % accumulate == 0 or i + 1 == len(order):
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    sched.step()
                    opt.zero_grad()
                if (i + 1) % 64 == 0:
                    recent = {layer: sum(v[-64:]) / len(v[-64:]) for layer, v in losses.items()}
                    print(f"epoch {epoch + 1} seq {i + 1}/{len(order)} {time.time() - t0:.0f} s kl "
                          + " ".join(f"L{l}={v:.2f}" for l, v in recent.items()), flush=True)
            log.append({"epoch": epoch + 1, "seconds": time.time() - t0, "reply_tokens": data.reply_tokens(),
                        "train_kl": {str(l): sum(v) / len(v) for l, v in losses.items()}})
            save_whole({"adapters": self.adapters.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "epochs": epoch + 1}, ckpt)

    def loss(self, logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor) -> torch.Tensor:
        """``soft``: KL to the original's distribution; ``hard``: cross-entropy on its greedy token,
        so that the exit's max-prob estimates the chance that its token is the original's."""
        if self.target == "hard":
            return torch.nn.functional.cross_entropy(logits, top_ids[:, 0])
        return top_k_kl(logits, top_ids, top_logprobs).mean()

    @torch.no_grad()
    def readouts(self, data: TeacherData, streams, adapted: bool) -> TokenReadouts:
        """Each exit layer's readout (through its adapter when ``adapted``), the last layer the original's."""
        norm, head = self.model.model.norm, self.model.lm_head
        tops, probs, targets = [], [], []
        for seq, (prompt, reply) in enumerate(zip(data.prompts, data.replies)):
            select = slice(len(prompt) - 1, None)
            rope = self.rope(len(prompt) + len(reply) - 1)
            top = torch.full((len(reply), self.num_layers), -1, dtype=torch.long)
            prob = torch.zeros(len(reply), self.num_layers)
            for layer in self.layers:
                stream = streams[seq][layer]
                logits = self.readout(layer, stream, rope, select) if adapted else head(norm(stream[0, select].float()))
                best = torch.softmax(logits, -1).max(-1)
                top[:, layer], prob[:, layer] = best.indices, best.values
            top[:, -1], prob[:, -1] = torch.tensor(reply), 1.0  # the trunk is the original: its own token
            tops.append(top)
            probs.append(prob)
            targets.append(torch.tensor(reply))
        return TokenReadouts(torch.cat(tops), torch.cat(probs), torch.cat(targets))

    def score(self, r: TokenReadouts, adapters: bool, layers: list[int] | None = None) -> dict:
        """The max-prob rule's frontier with checks after ``layers`` (default: every exit layer)."""
        layers = self.layers if layers is None else layers
        right = r.right.float().mean(0)
        frontier = []
        checks = torch.tensor(layers)
        for threshold in THRESHOLDS:
            agree, depth = max_prob_exits(r, layers, threshold)
            confident = r.max_prob[:, checks] >= threshold
            # adapters run per token: as many as the checks it passed, including the one it left at
            ran = torch.where(confident.any(1), confident.int().argmax(1) + 1, len(layers)).float().mean()
            extra = float(ran) * self.adapter_cost / self.num_layers if adapters else 0.0
            frontier.append({"threshold": threshold, "agreement": float(agree.float().mean()),
                             "depth": depth, "depth_with_adapters": depth + extra})
        return {
            "exit_agreement": {str(layer): float(right[layer]) for layer in layers},
            "depth_at": {str(a): lowest_depth(frontier, a) for a in AGREEMENTS},
            "depth_with_adapters_at": {str(a): lowest_depth(frontier, a, "depth_with_adapters") for a in AGREEMENTS},
            "frontier": frontier,
        }


def export_heads(probe: Probe, folder: Path, record: dict, held: TeacherData, held_streams) -> dict:
    """The affine adapters as an exit-heads folder the engine reads (``--heads``): ``h + W h + b``
    read through the model's OWN final norm (the adapters' norms, about 1% off it, are dropped).
    Returns the held-out scores of exactly that reading."""
    from vllm_early_exit.model_executor.early_exit.heads import ExitHeads

    config = probe.model.config
    with torch.no_grad():
        for adapter in probe.adapters.values():
            adapter.norm.weight.copy_(probe.model.model.norm.weight)
    ExitHeads(
        base_model={"num_hidden_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                    "vocab_size": config.vocab_size, "path": str(probe.model.name_or_path)},
        layers=tuple(probe.layers),
        weights={layer: (a.affine.weight.detach().clone(), a.affine.bias.detach().clone())
                 for layer, a in ((int(k), v) for k, v in probe.adapters.items())},
        design="affine", gates={}, training=record,
    ).save(folder)
    readouts = probe.readouts(held, held_streams, adapted=True)
    return {"folder": str(folder), **probe.score(readouts, adapters=True), "fewer_checks": fewer_checks(probe, readouts)}


def fewer_checks(probe: Probe, readouts: TokenReadouts) -> dict:
    """Depth (with the adapters' cost) at 0.95 and 0.9 agreement for checks at one or two of the
    exit layers: each check costs its adapter for every token that reaches it."""
    from itertools import combinations

    out = {}
    for n in (1, 2):
        for layers in combinations(probe.layers, n):
            scored = probe.score(readouts, adapters=True, layers=list(layers))
            out[",".join(map(str, layers))] = {"depth_at": scored["depth_at"],
                                                "depth_with_adapters_at": scored["depth_with_adapters_at"]}
    return out


def main() -> None:
    from vllm_early_exit.tools.assets import smollm2_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--streams", type=Path, help="cache of the exit layers' streams (default WORK/streams)")
    parser.add_argument("--target", choices=("soft", "hard"), default="soft",
                        help="soft: KL to the original's top-k; hard: cross-entropy on its greedy token")
    parser.add_argument("--adapter", choices=("layer", "attention", "affine"), default="layer",
                        help="layer: a decoder layer per exit; attention: its attention alone (Kangaroo); "
                             "affine: train-heads' context-free map")
    parser.add_argument("--layers", default="16,18,20,22,24")
    parser.add_argument("--train", type=int, default=512, help="training sequences used (default 512)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--export-heads", type=Path, help="with --adapter affine: write the trained adapters, "
                        "read through the model's own final norm, as an exit-heads folder for --heads")
    parser.add_argument("--out", type=Path, default=RESULTS / "exit_adapters.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = [int(x) for x in args.layers.split(",")]
    probe = Probe(smollm2_checkpoint(), layers, args.work, args.streams or args.work / "streams", args.target,
                  args.adapter)
    train = TeacherData.load_split(args.data, "train")
    train = TeacherData(*(getattr(train, name)[:args.train] for name in ("prompts", "replies", "top_ids", "top_logprobs")))
    held = TeacherData.load_split(args.data, "held-out")
    held_streams = probe.streams(held, "held-out")
    train_streams = probe.streams(train, "train")
    log_path = args.work / "log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else []
    result = {"layers": layers, "adapter_cost_layers": probe.adapter_cost, "train_sequences": len(train),
              "train_reply_tokens": train.reply_tokens(), "held_out_positions": held.reply_tokens(),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "original_confident_share": {str(t): float((torch.cat(held.top_logprobs)[:, 0].exp() >= t).float().mean())
                                           for t in THRESHOLDS},
              "plain": probe.score(probe.readouts(held, held_streams, adapted=False), adapters=False)}

    def score_epoch() -> None:
        readouts = probe.readouts(held, held_streams, adapted=True)
        log[-1]["held_out"] = probe.score(readouts, adapters=True)
        log[-1]["fewer_checks"] = fewer_checks(probe, readouts)
        log_path.write_text(json.dumps(log, indent=1))
        args.out.write_text(json.dumps(result | {"epochs": log}, indent=1))
        print(json.dumps({k: log[-1]["held_out"][k] for k in ("exit_agreement", "depth_at", "depth_with_adapters_at")}),
              flush=True)

    for epoch in range(len(log) + 1, args.epochs + 1):
        probe.train(train, train_streams, args.epochs, epoch, args.lr, args.accumulate, log)
        score_epoch()
    if log and "fewer_checks" not in log[-1]:  # a run from before the fewer-checks scores
        probe.adapters.load_state_dict(torch.load(args.work / "adapters.pt", weights_only=True)["adapters"])
        score_epoch()
    if args.export_heads and args.adapter == "affine" and log:
        probe.adapters.load_state_dict(torch.load(args.work / "adapters.pt", weights_only=True)["adapters"])
        record = {"method": f"benchmarks/exit_adapter_probe.py, target {args.target}, {len(log)} epochs",
                  "settings": result["settings"], "data": {"train_sequences": len(train)}}
        result["exported_heads"] = export_heads(probe, args.export_heads, record, held, held_streams)
        args.out.write_text(json.dumps(result | {"epochs": log}, indent=1))
        print(json.dumps({k: result["exported_heads"][k] for k in ("exit_agreement", "depth_at")}), flush=True)


if __name__ == "__main__":
    main()
