"""The student's forward: the readouts at chosen layers through the shared final norm and LM
head, at chosen positions only (the LM head over 49k tokens costs about 8 SmolLM2 layers, so
it runs on the reply positions and nowhere else)."""

from __future__ import annotations

import random

import torch
from torch import nn


def causal_lm(model: nn.Module) -> nn.Module:
    """The HF ``*ForCausalLM`` inside a PEFT wrapper (LoRA layers sit in it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class ExitReadouts(nn.Module):
    """``forward(input_ids, attention_mask, select, layers)`` -> ``{layer: logits}``: the readout
    after each of ``layers`` and after the last layer (the model's own logits), at the positions
    ``select`` (a boolean ``[batch, seq]`` mask), rows in mask order."""

    def __init__(self, model: nn.Module, layer_dropout: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.layer_dropout = layer_dropout
        self.num_layers = len(causal_lm(model).model.layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor,
                layers: list[int]) -> dict[int, torch.Tensor]:
        lm = causal_lm(self.model)
        streams: dict[int, torch.Tensor] = {}
        handles = [lm.model.layers[layer].register_forward_hook(self._keep(streams, layer)) for layer in layers]
        handles += self._dropout_hooks(lm)
        try:
            final = lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        finally:
            for handle in handles:
                handle.remove()
        readouts = {layer: lm.lm_head(lm.model.norm(streams[layer][select])) for layer in layers}
        readouts[self.num_layers - 1] = lm.lm_head(final[select])
        return readouts

    @staticmethod
    def _keep(streams: dict, layer: int):
        def hook(module, args, output):
            streams[layer] = output[0] if isinstance(output, tuple) else output
        return hook

    def _dropout_hooks(self, lm: nn.Module) -> list:
        """LayerSkip's layer dropout: in training, layer l is skipped (its output replaced by
        its input) with chance ``layer_dropout * l / (layers - 1)``."""
        if not (self.training and self.layer_dropout > 0):
            return []

        def skip(module, args, output):
            return (args[0], *output[1:]) if isinstance(output, tuple) else args[0]

        last = self.num_layers - 1
        return [layer.register_forward_hook(skip) for i, layer in enumerate(lm.model.layers)
                if random.random() < self.layer_dropout * i / last]
