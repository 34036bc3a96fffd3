"""How much of early exit's quality goes to the K/V of the layers a token skips, and what a
learned fill gives back -- measured offline, free-running, before any engine code is written.

A decode token that leaves after check layer ``L`` still needs K/V in layers ``L+1..``; state
propagation (the engine's rule) writes ``k, v = kv_proj_j(norm_j(h_L))``, the exit stream as if
it were layer ``j``'s input. Every later token attends to it. Teacher-forced scores hide this
(every earlier token has the original's K/V), so a setting calibrated in the engine agrees less
than the teacher-forced figures promise. Four ways, decoded with the same exit rule:

* ``exact``: the token runs the deeper layers for their K/V anyway (what no fill can beat; it
  saves nothing);
* ``propagate``: the engine's state propagation;
* ``learned``: per check layer ``L`` and deeper layer ``j``, the least-squares map from the exit
  stream (RMS-normalized, as the engine's folded fill takes it) to the original's k and v of
  layer ``j`` at that position, fitted on the teacher data's replies. It has the shape of the
  engine's folded K/V projection (one product per fill, plus a bias), so it would cost the same;
* ``catch_up``: a token that left waits, and every later token carries the waiting ones through
  each layer it runs before it attends there (``CatchUp``): exact K/V with no layer's weights
  read twice. ``carried rows`` counts the rows it adds per layer run; ``waiting`` the tokens a
  step would re-run if the engine re-scheduled them with the next token (vLLM's own multi-token
  query: the tokens since the last one that ran every layer).

Decoding is the suite's independent HF reference of the rule (``tests/reference.py``), greedy,
with the exit heads of ``train-heads`` / ``exit_adapter_probe.py --export-heads`` and the
max-prob rule at every head layer. Agreement is the engine's token agreement: each generated
token against the original's pick after the same (own) prefix.

    python benchmarks/kv_fill_probe.py --data RUN/data --heads HEADS --work DIR

Results (JSON, Markdown, PNG) go to ``benchmarks/results/finetune/kv_fill.*`` as each setting
finishes; a stopped run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.reference import ExactFill, ReferenceDecoder  # noqa: E402  (the suite's reference of the rule)
from vllm_early_exit.tools.assets import smollm2_checkpoint  # noqa: E402
from vllm_early_exit.tools.finetune.data import TeacherData  # noqa: E402

RESULTS = Path("benchmarks/results/finetune")
FILLS = ("exact", "propagate", "learned", "catch_up")
BUCKETS = ((1, 1), (2, 4), (5, 15), (16, 1 << 30))


def rms_normalized(stream: torch.Tensor, eps: float) -> torch.Tensor:
    return stream * torch.rsqrt(stream.pow(2).mean(-1, keepdim=True) + eps)


class FillFit:
    """Least squares of the deeper layers' k, v (before rotary) on the normalized exit stream."""

    def __init__(self, model: LlamaForCausalLM, layers: list[int]) -> None:
        self.model, self.layers = model, layers
        self.num_layers = model.config.num_hidden_layers
        self.eps = model.config.rms_norm_eps
        self.hidden = model.config.hidden_size
        self.gram = {layer: torch.zeros(self.hidden + 1, self.hidden + 1, dtype=torch.float64) for layer in layers}
        self.cross = {layer: 0 for layer in layers}

    def kv(self, hidden_states, j: int) -> torch.Tensor:
        """``[positions, 2 * kv_size]``: layer ``j``'s k and v of its real input."""
        layer = self.model.model.layers[j]
        x = layer.input_layernorm(hidden_states[j])
        return torch.cat([layer.self_attn.k_proj(x), layer.self_attn.v_proj(x)], -1)

    def features(self, hidden_states, layer: int) -> torch.Tensor:
        x = rms_normalized(hidden_states[layer + 1], self.eps)
        return torch.cat([x, torch.ones_like(x[..., :1])], -1)

    @torch.no_grad()
    def add(self, ids: list[int], reply_from: int) -> None:
        hidden = self.model.model(input_ids=torch.tensor(ids)[None], output_hidden_states=True).hidden_states
        hidden = [h[0, reply_from:] for h in hidden]
        targets = {j: self.kv(hidden, j) for j in range(min(self.layers) + 1, self.num_layers)}
        for layer in self.layers:
            x = self.features(hidden, layer).double()
            y = torch.cat([targets[j] for j in range(layer + 1, self.num_layers)], -1).double()
            self.gram[layer] += x.T @ x
            self.cross[layer] = self.cross[layer] + x.T @ y

    def solve(self, ridge: float) -> dict[str, torch.Tensor]:
        out = {}
        for layer in self.layers:
            gram = self.gram[layer]
            scale = gram.diagonal()[:-1].mean()
            solution = torch.linalg.solve(gram + ridge * scale * torch.eye(len(gram), dtype=gram.dtype),
                                          self.cross[layer])
            out[f"fill.{layer}.weight"] = solution[:-1].T.float().contiguous()
            out[f"fill.{layer}.bias"] = solution[-1].float().contiguous()
        return out

    def propagation(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The engine's rule as the same kind of map: the deeper layers' k/v rows with their
        input-norm weight folded in, no bias."""
        rows = []
        for j in range(layer + 1, self.num_layers):
            deeper = self.model.model.layers[j]
            weight = torch.cat([deeper.self_attn.k_proj.weight, deeper.self_attn.v_proj.weight])
            rows.append(weight * deeper.input_layernorm.weight)
        weight = torch.cat(rows)
        return weight, torch.zeros(len(weight))

    @torch.no_grad()
    def errors(self, fills: dict[str, torch.Tensor], held: TeacherData) -> dict:
        """Relative error of each map's k and v over the held-out replies, per check layer."""
        sums = {name: {layer: torch.zeros(2) for layer in self.layers} for name in ("propagate", "learned")}
        norms = {layer: torch.zeros(2) for layer in self.layers}
        kv_size = self.model.model.layers[0].self_attn.k_proj.out_features
        for prompt, reply in zip(held.prompts, held.replies):
            ids = prompt + reply[:-1]
            hidden = self.model.model(input_ids=torch.tensor(ids)[None], output_hidden_states=True).hidden_states
            hidden = [h[0, len(prompt):] for h in hidden]
            for layer in self.layers:
                x = self.features(hidden, layer)[:, :-1]
                y = torch.cat([self.kv(hidden, j) for j in range(layer + 1, self.num_layers)], -1)
                maps = {"propagate": self.propagation(layer),
                        "learned": (fills[f"fill.{layer}.weight"], fills[f"fill.{layer}.bias"])}
                target = y.view(len(y), -1, 2, kv_size)
                norms[layer] += target.pow(2).sum((0, 1, 3))
                for name, (weight, bias) in maps.items():
                    error = (torch.nn.functional.linear(x, weight, bias).view_as(target) - target)
                    sums[name][layer] += error.pow(2).sum((0, 1, 3))
        return {name: {str(layer): {"k": float((sums[name][layer][0] / norms[layer][0]).sqrt()),
                                    "v": float((sums[name][layer][1] / norms[layer][1]).sqrt())}
                       for layer in self.layers} for name in sums}


class LearnedFill(ReferenceDecoder):
    """The deeper layers' K/V from the fitted map of the exit stream."""

    def __init__(self, model: LlamaForCausalLM, fills: dict[str, torch.Tensor]) -> None:
        super().__init__(model)
        self.fills = fills
        self.eps = model.config.rms_norm_eps

    def _fill_exit(self, exit_layer, hidden, positions, cache):
        weight, bias = self.fills[f"fill.{exit_layer}.weight"], self.fills[f"fill.{exit_layer}.bias"]
        kv = torch.nn.functional.linear(rms_normalized(hidden, self.eps), weight, bias)
        kv = kv.view(len(hidden), self.num_layers - exit_layer - 1, 2, self.num_kv_heads, self.head_dim)
        for offset, index in enumerate(range(exit_layer + 1, self.num_layers)):
            k = kv[:, offset, 0].transpose(0, 1)
            v = kv[:, offset, 1].transpose(0, 1)
            _, k = self._rotate(hidden, positions, k, k)
            self._store(index, k, v, positions, cache)


class CatchUp:
    """FREE's and EE-LLM's deep pass, as a paged engine could run it: a token that left keeps its
    exit stream, and every later token that runs a layer carries the waiting tokens through that
    layer first (one more row in the same weights), replacing their filled K/V there with the
    real one. A token reads only layers it runs, so it never reads a fill: the K/V it attends to
    is exact by construction, and the fill (``propagate`` here) is never read."""

    ridden = 0
    """Layer rows carried for waiting tokens."""

    def generate(self, *args, **kwargs):
        self.waiting = []
        return super().generate(*args, **kwargs)

    def _fill_exit(self, exit_layer, hidden, positions, cache):
        super()._fill_exit(exit_layer, hidden, positions, cache)
        self.waiting.append([positions, hidden, exit_layer])

    def _layer(self, index, hidden, positions, cache):
        for entry in self.waiting:
            at, stream, done = entry
            if done == index - 1:  # carried through this layer first: its K/V here becomes exact
                entry[1], entry[2] = super()._layer(index, stream, at, cache), index
                self.ridden += 1
        self.waiting = [e for e in self.waiting if e[2] < self.num_layers - 1]
        return super()._layer(index, hidden, positions, cache)

    def _store(self, index, k, v, positions, cache):
        """A carried token's K/V replaces its fill at its position; other K/V is appended."""
        keys, values, key_pos = cache[index]
        slot = (key_pos == positions[0]).nonzero() if len(positions) == 1 else ()
        if len(slot) == 0:
            return super()._store(index, k, v, positions, cache)
        keys, values, slot = keys.clone(), values.clone(), int(slot)
        keys[:, slot], values[:, slot] = k[:, 0], v[:, 0]
        cache[index] = (keys, values, key_pos)


class PropagateCatchUp(CatchUp, ReferenceDecoder):
    pass


def load_heads(folder: Path) -> tuple[list[int], dict]:
    meta = json.loads((folder / "heads.json").read_text())
    tensors = load_file(folder / "heads.safetensors")
    layers = list(meta["layers"])
    return layers, {layer: (tensors[f"head.{layer}.weight"], tensors[f"head.{layer}.bias"]) for layer in layers}


@torch.no_grad()
def decode(decoder: ReferenceDecoder, model: LlamaForCausalLM, prompts, layers, heads, threshold: float,
           max_tokens: int) -> dict:
    """Per-position agreement with the original on the decoder's own prefix, and depth."""
    num_layers = decoder.num_layers
    right, depth, waiting = [], [], []
    exits = [0] * num_layers
    ridden = getattr(decoder, "ridden", 0)
    for prompt in prompts:
        trace = decoder.generate(prompt, max_tokens, exit_layers=tuple(layers), threshold=threshold, heads=heads)
        logits = model(input_ids=torch.tensor(prompt + trace.tokens)[None]).logits[0]
        picks = logits[len(prompt) - 1:-1].argmax(-1).tolist()
        right.append([a == b for a, b in zip(trace.tokens, picks)])
        depth.append([num_layers] + [num_layers if e is None else e + 1 for e in trace.exit_layers])
        run = 0  # tokens that left since the last one that ran every layer
        for exit_layer in trace.exit_layers:
            if exit_layer is not None:
                exits[exit_layer] += 1
            waiting.append(run)
            run = 0 if exit_layer is None else run + 1
    tokens = sum(len(r) for r in right)
    by_position = {}
    for first, last in BUCKETS:
        cells = [r[i] for r in right for i in range(first - 1, min(last, len(r)))]
        by_position[f"{first}-{last}" if last < 1 << 30 else f"{first}+"] = sum(cells) / max(len(cells), 1)
    return {"agreement": sum(map(sum, right)) / tokens,
            "mean_layers": sum(map(sum, depth)) / tokens,
            "decode_mean_layers": sum(sum(d[1:]) for d in depth) / max(tokens - len(depth), 1),
            "tokens": tokens, "by_position": by_position,
            "carried_rows_per_layer": (getattr(decoder, "ridden", 0) - ridden) / sum(map(sum, depth)),
            "waiting_per_decode_token": sum(waiting) / max(len(waiting), 1),
            "waiting_max": max(waiting, default=0),
            "stats": {"decode_tokens": len(waiting), "exits_per_layer": exits,
                      "full_depth_tokens": len(waiting) - sum(exits), "sampled_from_checks": sum(exits)}}


def predicted(run: dict, layers: list[int], shortlist: str | None) -> float | None:
    """The cost model's weight-bytes limit at batch 1 (``tools/cost.py``) of the run's exits, the
    checks read through ``shortlist`` (or the full LM head), the exit's K/V filled."""
    if "stats" not in run:
        return None
    from vllm_early_exit.tools.cost import WeightBytes, predicted_ratio

    settings = {"exit_layers": layers, "signal": "head", "heads": "exit heads", "threshold": 0.9}
    if shortlist:
        settings["shortlist"] = shortlist
    return predicted_ratio(WeightBytes.from_pretrained(str(smollm2_checkpoint())), settings, run["stats"])


def write_report(result: dict, out: Path) -> None:
    lines = ["# State propagation against exact and learned K/V fills", "",
             f"{result['model']} | exit heads `{result['heads']}` (checks after layers "
             f"{', '.join(map(str, result['layers']))}) | fit on {result['fit_sequences']} training replies "
             f"({result['fit_positions']} positions), ridge {result['ridge']} | "
             f"{result['eval_prompts']} held-out prompts x {result['max_tokens']} tokens, greedy, free-running, "
             "agreement against the original on the decoder's own prefix (the engine's token agreement). "
             "Decoder: the suite's HF reference of the rule (`tests/reference.py`). `limit b1`: the cost "
             "model's weight-bytes bound at batch 1 (`tools/cost.py`) of the run's exits, every exit's K/V "
             "filled (catch-up needs no fill and reads slightly less), checks through the full LM head or "
             f"the shortlist `{Path(result.get('shortlist') or '-').name}` (its decisions taken as the "
             "full-vocabulary rule's).", "",
             "## Fill error on held-out replies (relative RMS error of the deeper layers' k / v)", "",
             "| check layer | propagate k | propagate v | learned k | learned v |", "|---|---|---|---|---|"]
    errors = result.get("errors", {})
    for layer in result["layers"]:
        p, lrn = errors["propagate"][str(layer)], errors["learned"][str(layer)]
        lines.append(f"| {layer} | {p['k']:.3f} | {p['v']:.3f} | {lrn['k']:.3f} | {lrn['v']:.3f} |")
    lines += ["", "## Free-running decoding", "",
              "| threshold | fill | agreement | mean layers (decode tokens) | pos 1 | 2-4 | 5-15 | 16+ "
              "| carried rows per layer | waiting tokens per step (max) | limit b1, full-vocabulary checks "
              "| limit b1, shortlist checks |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, run in result["runs"].items():
        threshold, fill = key.split("/")
        pos = run["by_position"]
        lines.append(f"| {threshold} | {fill} | {run['agreement']:.3f} | {run['decode_mean_layers']:.2f} | "
                     + " | ".join(f"{v:.3f}" for v in pos.values())
                     + f" | {run.get('carried_rows_per_layer', 0):.3f} | "
                     + (f"{run['waiting_per_decode_token']:.2f} ({run['waiting_max']})" if "waiting_max" in run else "-")
                     + "".join(f" | {limit:.3f}" if limit else " | -" for limit in (
                         predicted(run, result["layers"], None), predicted(run, result["layers"], result.get("shortlist"))))
                     + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(result, out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for fill, marker in zip(FILLS, "osdx"):
        runs = [(run["decode_mean_layers"], run["agreement"]) for key, run in result["runs"].items()
                if key.endswith("/" + fill)]
        if runs:
            runs.sort()
            ax.plot(*zip(*runs), marker=marker, label=fill)
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("mean layers run per decode token")
    ax.set_ylabel("token agreement with the original")
    ax.set_title("Exit heads, free-running: K/V fill of skipped layers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a finetune run's teacher data folder")
    parser.add_argument("--heads", type=Path, required=True, help="an exit-heads folder (affine heads)")
    parser.add_argument("--work", type=Path, required=True, help="where the fitted fills are kept")
    parser.add_argument("--fit-sequences", type=int, default=256)
    parser.add_argument("--ridge", type=float, default=1e-3)
    parser.add_argument("--prompts", type=int, default=48, help="held-out prompts decoded")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--thresholds", default="0.9,0.95,0.99")
    parser.add_argument("--fills", default=",".join(FILLS))
    parser.add_argument("--out", type=Path, default=RESULTS / "kv_fill")
    parser.add_argument("--shortlist", help="a shortlist file, to price checks read through it")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = LlamaForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32).eval()
    layers, heads = load_heads(args.heads)
    args.work.mkdir(parents=True, exist_ok=True)
    fill_path = args.work / "fill.safetensors"
    train, held = TeacherData.load_split(args.data, "train"), TeacherData.load_split(args.data, "held-out")
    fit = FillFit(model, layers)
    json_path = args.out.with_suffix(".json")
    result = json.loads(json_path.read_text()) if json_path.exists() else {"runs": {}}
    if not fill_path.exists():
        t0, positions = time.time(), 0
        for i, (prompt, reply) in enumerate(zip(train.prompts[:args.fit_sequences], train.replies)):
            fit.add(prompt + reply[:-1], len(prompt) - 1)
            positions += len(reply)
            if (i + 1) % 32 == 0:
                print(f"fit {i + 1}/{args.fit_sequences} ({time.time() - t0:.0f} s)", flush=True)
        save_file(fit.solve(args.ridge), fill_path)
        result["fit_positions"] = positions
    fills = load_file(fill_path)
    result.update(model="SmolLM2-135M-Instruct", heads=str(args.heads), layers=layers, ridge=args.ridge,
                  fit_sequences=args.fit_sequences, eval_prompts=args.prompts, max_tokens=args.max_tokens,
                  shortlist=args.shortlist)
    result.setdefault("fit_positions", None)
    if "errors" not in result:
        result["errors"] = fit.errors(fills, TeacherData(held.prompts[:16], held.replies[:16], [], []))
        json_path.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["errors"], indent=1), flush=True)
    decoders = {"exact": ExactFill(model), "propagate": ReferenceDecoder(model), "learned": LearnedFill(model, fills),
                "catch_up": PropagateCatchUp(model)}
    prompts = held.prompts[:args.prompts]
    for threshold in [float(t) for t in args.thresholds.split(",")]:
        for fill in args.fills.split(","):
            key = f"{threshold}/{fill}"
            if key in result["runs"]:
                continue
            t0 = time.time()
            result["runs"][key] = decode(decoders[fill], model, prompts, layers, heads, threshold, args.max_tokens)
            json_path.write_text(json.dumps(result, indent=1))
            write_report(result, args.out)
            print(key, json.dumps(result["runs"][key]), f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
