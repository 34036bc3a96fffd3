"""An independent early-exit reference written on HF transformers.

Greedy decoding with the weights of an HF ``LlamaForCausalLM``, its own K/V
cache and attention, and the early-exit rule of the product: the prompt runs
at full depth; every decode token leaves after ``exit_layer``; the deeper
layers get K/V at that position from the exit-layer residual stream (state
propagation), or, with ``propagate=False``, get none (later tokens attend only
to the positions those layers really computed). ``ExactFill`` gives them the K/V the full
model computes instead (the token runs them anyway, for their K/V), and ``CatchUpReference``
adds the engine's ``max_waiting`` rule of ``skipped_kv: "recompute"``, whose K/V that is.

HF's ``Qwen2ForCausalLM`` has the same modules (its q/k/v projections carry a
bias, which ``nn.Linear`` applies), so it works here unchanged (``test_qwen2.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


class ReferenceDecoder:
    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model.eval().float()
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos, sin = self.model.model.rotary_emb(x, positions[None])
        q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
        return q[0], k[0]

    def _project_kv(self, layer, x_normed, positions):
        attn = layer.self_attn
        t = x_normed.shape[0]
        q = attn.q_proj(x_normed).view(t, self.num_heads, self.head_dim).transpose(0, 1)
        k = attn.k_proj(x_normed).view(t, self.num_kv_heads, self.head_dim).transpose(0, 1)
        v = attn.v_proj(x_normed).view(t, self.num_kv_heads, self.head_dim).transpose(0, 1)
        q, k = self._rotate(x_normed, positions, q, k)
        return q, k, v

    def _attention(self, index, layer, x_normed, positions, cache):
        q, k, v = self._project_kv(layer, x_normed, positions)
        self._store(index, k, v, positions, cache)
        return self._attend(layer, q, cache[index], positions, x_normed.shape[0])

    def _store(self, index, k, v, positions, cache):
        """Layer ``index``'s cache gets K/V ``[kv_heads, rows, head_dim]`` at ``positions``."""
        keys, values, key_pos = cache[index]
        cache[index] = (torch.cat([keys, k], dim=1), torch.cat([values, v], dim=1), torch.cat([key_pos, positions]))

    def _layer(self, index, hidden, positions, cache):
        """Decoder layer ``index`` on the stream ``hidden`` (its K/V into the cache)."""
        layer = self.model.model.layers[index]
        hidden = hidden + self._attention(index, layer, layer.input_layernorm(hidden), positions, cache)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _attend(self, layer, q, entry, positions, rows):
        """The layer's attention output for queries ``q`` at ``positions`` over the cached ``entry``."""
        keys, values, key_pos = entry
        group = self.num_heads // self.num_kv_heads
        keys = keys.repeat_interleave(group, dim=0)
        values = values.repeat_interleave(group, dim=0)
        scores = (q @ keys.transpose(1, 2)) * self.head_dim**-0.5
        mask = key_pos[None, :] <= positions[:, None]
        scores = scores.masked_fill(~mask[None], float("-inf"))
        out = torch.softmax(scores, dim=-1) @ values
        out = out.transpose(0, 1).reshape(rows, -1)
        return layer.self_attn.o_proj(out)

    def _readout(self, hidden, head=None):
        last = hidden[-1:]
        if head is not None:
            weight, bias = head
            last = last + last @ weight.T + bias
        return self.model.lm_head(self.model.model.norm(last))[0]

    def _fill_kv(self, index, hidden, positions, cache):
        """State propagation: layer ``index`` gets K/V at ``positions`` from the stream ``hidden``."""
        layer = self.model.model.layers[index]
        _, k, v = self._project_kv(layer, layer.input_layernorm(hidden), positions)
        self._store(index, k, v, positions, cache)

    def _fill_exit(self, exit_layer, hidden, positions, cache):
        """K/V of the layers after ``exit_layer`` for a token that left there with stream ``hidden``."""
        for index in range(exit_layer + 1, self.num_layers):
            self._fill_kv(index, hidden, positions, cache)

    def _step(
        self, token_ids, positions, cache, exit_layers, threshold, propagate,
        vocab_top_k=None, heads=None, skip_layers=(), signal="max_prob", shortlist=None,
    ):
        """One forward; returns (greedy token, exit layer or None, max-prob per check layer,
        readout top token per check layer).

        With ``vocab_top_k`` the first check keeps its top-K token ids and later checks
        take the softmax over those tokens only. ``heads``: layer -> (weight, bias) of
        exit heads read at check layers (and emitted on exit). ``skip_layers`` are not
        run; their K/V comes from the stream that passes them. ``signal="saturation"``
        compares the cosine of the streams after and before a check layer instead of max-prob.
        ``shortlist`` (token ids): a check is confident only when the max-prob over those
        tokens' logits and then over the full vocabulary both reach the threshold; the
        recorded confidence is the first stage's when it fails, else the full one.
        """
        hidden = self.model.model.embed_tokens(token_ids)
        layers = self.model.model.layers
        heads = heads or {}
        exit_layer, confidences, tops, top_k_tokens = None, {}, {}, None
        for index in range(len(layers)):
            if index in skip_layers:
                self._fill_kv(index, hidden, positions, cache)
                continue
            before = hidden
            hidden = self._layer(index, hidden, positions, cache)
            if index in exit_layers and signal == "saturation":
                confidence = float(torch.cosine_similarity(hidden[-1], before[-1], dim=0))
                confidences[index] = confidence
                if confidence >= threshold:
                    exit_layer = index
                    break
            elif index in exit_layers:
                logits = self._readout(hidden, heads.get(index))
                if vocab_top_k is not None:
                    if top_k_tokens is None:
                        top_k_tokens = logits.topk(vocab_top_k).indices
                    else:
                        logits = logits[top_k_tokens]
                if shortlist is not None:
                    first = float(torch.softmax(logits[shortlist], -1).max())
                    if first < threshold:
                        confidences[index] = first
                        continue
                confidence = float(torch.softmax(logits, -1).max())
                confidences[index] = confidence
                tops[index] = int(logits.argmax())
                if confidence >= threshold:
                    exit_layer = index
                    break
        if exit_layer is not None and propagate:
            self._fill_exit(exit_layer, hidden, positions, cache)
        head = heads.get(exit_layer) if exit_layer is not None else None
        return int(self._readout(hidden, head).argmax()), exit_layer, confidences, tops

    @torch.no_grad()
    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        exit_layers: tuple[int, ...] = (),
        threshold: float = 0.0,
        propagate: bool = True,
        vocab_top_k: int | None = None,
        heads: dict | None = None,
        skip_layers: tuple[int, ...] = (),
        signal: str = "max_prob",
        shortlist: list[int] | None = None,
        teacher: list[int] | None = None,
    ) -> Trace:
        """Greedy decoding with the max-prob rule at ``exit_layers`` for decode tokens.

        ``threshold=0`` forces every decode token out at the first check layer.
        ``heads`` and ``skip_layers`` apply to decode tokens as in ``_step``.
        ``teacher``: tokens fed back instead of the reference's own picks (teacher forcing),
        so that ``tokens[i]`` is what the reference picks after ``teacher[:i]``; a
        difference then costs one position, not every later one.
        """
        empty = torch.empty(self.num_kv_heads, 0, self.head_dim)
        cache = [(empty, empty, torch.empty(0, dtype=torch.long)) for _ in range(self.num_layers)]
        token, _, _, _ = self._step(torch.tensor(prompt), torch.arange(len(prompt)), cache, (), 0.0, True)
        trace = Trace([token], [], [], [])
        if teacher is not None:
            max_new_tokens = len(teacher)
        while len(trace.tokens) < max_new_tokens:
            position = torch.tensor([len(prompt) + len(trace.tokens) - 1])
            fed = token if teacher is None else teacher[len(trace.tokens) - 1]
            token, exit_layer, confidences, tops = self._step(
                torch.tensor([fed]), position, cache, exit_layers, threshold, propagate,
                vocab_top_k, heads, skip_layers, signal, shortlist,
            )
            trace.tokens.append(token)
            trace.exit_layers.append(exit_layer)
            trace.confidences.append(confidences)
            trace.readout_tokens.append(tops)
        return trace


class ExactFill(ReferenceDecoder):
    """A token that leaves still runs the deeper layers, for their K/V only: every later token
    reads the K/V the full model computes (it saves nothing here; ``benchmarks/kv_fill_probe.py``
    measures it as the bound of every fill)."""

    def _fill_exit(self, exit_layer, hidden, positions, cache):
        for index in range(exit_layer + 1, self.num_layers):
            hidden = self._layer(index, hidden, positions, cache)


class CatchUpReference(ExactFill):
    """The engine's ``skipped_kv: "recompute"``: exact K/V of the layers a token left before
    (the engine runs the token again with its request's next ones until a step runs every
    layer, which writes the same K/V), and its cap: a token whose request already has
    ``max_waiting`` tokens waiting runs every layer with no check, which completes them all."""

    def __init__(self, model: LlamaForCausalLM, max_waiting: int) -> None:
        super().__init__(model)
        self.max_waiting = max_waiting
        self.waiting = 0
        """Tokens of the sequence being decoded that left early since the last full-depth one."""

    def generate(self, *args, **kwargs) -> Trace:
        self.waiting = 0
        return super().generate(*args, **kwargs)

    def _step(self, token_ids, positions, cache, exit_layers, *args, **kwargs):
        capped = self.waiting + 1 > self.max_waiting  # the group of waiting tokens and this one is too large
        out = super()._step(token_ids, positions, cache, () if capped else exit_layers, *args, **kwargs)
        self.waiting = self.waiting + 1 if out[1] is not None else 0
        return out


@dataclass
class Trace:
    """Greedy tokens, and per decode token its exit layer (None: full depth), and per check
    layer its max-prob and (full-vocabulary checks) its readout's top token."""

    tokens: list[int]
    exit_layers: list[int | None]
    confidences: list[dict[int, float]]
    readout_tokens: list[dict[int, int]]
