"""Trained exit heads and gates: the file format, and applying them to a layer's stream.

A heads folder (written by ``python -m vllm_early_exit train-heads``) holds:

``heads.json``
    ``{"format": "vllm-early-exit-heads", "version": 1, "base_model": {...},
    "design": ..., "layers": [...], "gate_layers": [...], "gate_features": [...],
    "training": {...}}``. ``base_model`` records the model the heads were trained
    on (``num_hidden_layers``, ``hidden_size``, ``vocab_size`` and its path);
    the engine refuses heads whose shapes do not match the served model.
``heads.safetensors``
    Per head layer ``l``: ``head.l.weight`` ``[hidden, hidden]`` and ``head.l.bias``
    ``[hidden]``. A head maps the residual stream ``h`` after layer ``l`` to
    ``h + h @ weight.T + bias`` (a tuned-lens style correction: zero weights are
    the identity), which is then read through the model's own final norm and LM
    head. Low-rank designs are stored multiplied out, so every design loads the same way.
    Per gate layer ``l``: ``gate.l.weight`` ``[len(gate_features)]`` and
    ``gate.l.bias`` ``[1]``: a logistic classifier over :func:`gate_features`
    that predicts "the token read at this layer equals the full model's token".
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_early_exit.errors import EarlyExitConfigError
from vllm_early_exit.files import (  # the format and its reader live in the leaf module the settings read too
    HEADS_CONFIG_FILE as CONFIG_FILE,
    HEADS_FORMAT as FORMAT,
    HEADS_VERSION as VERSION,
    HEADS_WEIGHTS_FILE as WEIGHTS_FILE,
    read_metadata,
)

GATE_FEATURES = ("max_prob", "margin", "entropy", "saturation")


def default_layers(num_layers: int) -> list[int]:
    """Where heads go (and checks run) by default: every second layer from a third of the stack to the second-to-last."""
    return list(range(num_layers // 3, num_layers - 1, 2))


def gate_features(logits: torch.Tensor, stream: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """The gate's inputs per row, ``[rows, 4]`` float32 (order of ``GATE_FEATURES``).

    ``logits``: the layer's readout (through its head when heads are loaded);
    ``stream`` / ``previous``: residual stream after this layer and after the one before.
    Entropy is divided by ``log(vocab)`` so every feature lies in [0, 1] or [-1, 1].
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    top2 = probs.topk(2, dim=-1).values
    entropy = -(probs * log_probs).sum(dim=-1) / math.log(logits.shape[-1])
    saturation = torch.cosine_similarity(stream.float(), previous.float(), dim=-1)
    return torch.stack([top2[:, 0], top2[:, 0] - top2[:, 1], entropy, saturation], dim=-1)


@dataclass
class ExitHeads:
    """Exit heads (and optionally gates) for some layers of one base model."""

    base_model: dict[str, Any]
    layers: tuple[int, ...]
    weights: dict[int, tuple[torch.Tensor, torch.Tensor]]
    design: str = "affine"
    gates: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    # --- reading and writing -------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> "ExitHeads":
        from safetensors.torch import load_file

        folder = Path(path)
        meta = read_metadata(folder)
        tensors = load_file(str(folder / WEIGHTS_FILE))
        try:
            weights = {
                int(l): (tensors[f"head.{l}.weight"].float(), tensors[f"head.{l}.bias"].float())
                for l in meta["layers"]
            }
            gates = {
                int(l): (tensors[f"gate.{l}.weight"].float(), tensors[f"gate.{l}.bias"].float())
                for l in meta.get("gate_layers", [])
            }
        except KeyError as exc:
            raise EarlyExitConfigError(f"early_exit.heads={str(folder)!r}: {WEIGHTS_FILE} lacks tensor {exc}.") from None
        return cls(
            base_model=meta["base_model"],
            layers=tuple(int(l) for l in meta["layers"]),
            weights=weights,
            design=meta.get("design", "affine"),
            gates=gates,
            training=meta.get("training", {}),
        )

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for layer, (weight, bias) in self.weights.items():
            tensors[f"head.{layer}.weight"] = weight.detach().float().contiguous()
            tensors[f"head.{layer}.bias"] = bias.detach().float().contiguous()
        for layer, (weight, bias) in self.gates.items():
            tensors[f"gate.{layer}.weight"] = weight.detach().float().contiguous()
            tensors[f"gate.{layer}.bias"] = bias.detach().float().reshape(1).contiguous()
        save_file(tensors, str(folder / WEIGHTS_FILE))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "base_model": self.base_model,
            "design": self.design,
            "layers": sorted(self.weights),
            "gate_layers": sorted(self.gates),
            "gate_features": list(GATE_FEATURES),
            "training": self.training,
        }
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    # --- checks ----------------------------------------------------------------

    def check_base(self, num_layers: int, hidden_size: int, vocab_size: int, where: str) -> None:
        """Refuses heads trained on a model of another shape."""
        want = {"num_hidden_layers": num_layers, "hidden_size": hidden_size, "vocab_size": vocab_size}
        have = {k: self.base_model.get(k) for k in want}
        if have != want:
            raise EarlyExitConfigError(
                f"early_exit.heads={where!r} were trained for a model with {have}, "
                f"but the served model has {want}. Train heads for this model with "
                "`python -m vllm_early_exit train-heads`."
            )

    def check_layers(self, layers: Iterable[int], where: str, gates: bool = False) -> None:
        """Every check layer needs a head (and a gate for ``signal: "gate"``)."""
        have = set(self.gates if gates else self.weights)
        missing = sorted(set(layers) - have)
        if missing:
            kind = "gates" if gates else "heads"
            raise EarlyExitConfigError(
                f"early_exit.heads={where!r} has {kind} for layers {sorted(have)}, but checks run "
                f"at layers {missing} too. Set early_exit.exit_layers to layers that have {kind}."
            )

    # --- applying ----------------------------------------------------------------

    def place(self, device: torch.device, dtype: torch.dtype) -> None:
        """Moves the tensors (in place) to where the model's streams live."""
        for pairs in (self.weights, self.gates):
            for layer, (weight, bias) in pairs.items():
                pairs[layer] = (weight.to(device, dtype), bias.to(device, dtype))

    def apply(self, layer: int, stream: torch.Tensor) -> torch.Tensor:
        """The head's corrected stream ``h + h W^T + b`` for the rows of ``stream``."""
        weight, bias = self.weights[layer]
        return stream + torch.nn.functional.linear(stream, weight, bias)

    def gate_probability(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Probability per row that this layer's token equals the full model's."""
        weight, bias = self.gates[layer]
        return torch.sigmoid(features.float() @ weight.float() + bias.float())
