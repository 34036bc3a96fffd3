"""What decides a ``finetune`` run: :class:`FinetuneSettings` and its checks.

Every field is recorded in the run's ``run.json``; ``--resume`` continues a run only
when the settings, the model and the data it was started with are the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
"""What the plugin serves, so what an exit-ready model may be."""

METHODS = ("lora", "full")
EXIT_TARGETS = ("soft", "hard")
"""``lora``: low-rank adapters on every decoder layer, merged at the end (the default);
``full``: every decoder weight trains (for comparison: it moves the full-depth output faster)."""

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FinetuneError(ValueError):
    """A ``finetune`` setting that cannot work; the message names it and what is allowed."""


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that decides the result of a fine-tune (recorded in ``run.json``)."""

    exit_layers: tuple[int, ...] | None = None
    """Layers (0-based) whose readout learns to match the original's final distribution;
    None: :func:`default_exit_layers`."""
    method: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lr: float = 2e-4
    batch_size: int = 4
    """Sequences (prompt + the original's reply) per step."""
    tokens: int = 500_000
    """Training budget: sequence tokens run through the model, prompts included."""
    exits_per_step: int = 3
    """Exit layers read per step, rotating through ``exit_layers`` (all of them when there are
    fewer): each readout costs an LM-head product over the reply positions, about 8 SmolLM2
    layers a token there; reply positions are about half of a sequence's tokens."""
    exit_weight: float = 0.1
    """Weight of an exit layer's KL, times (layer + 1) / layers: deeper exits weigh more. Small: an
    early readout starts several nats from the original (SmolLM2: about 11 after layer 20, 1.5 after 28)
    against a last layer at 0, and with weight 1 the exit losses moved the full depth off the
    original on 17% of held-out tokens within 36k training tokens."""
    exit_target: str = "soft"
    """What an exit learns. ``soft``: the original's distribution (KL over its top-k), as
    Kangaroo and EE-Tuning distil. ``hard``: the original's greedy token (cross-entropy), so that
    the exit's max-prob estimates the chance its token is the original's -- the question greedy
    early exit asks. An exit that learns the distribution is as unsure as the original wherever
    the original is (its top token has probability below 0.9 at 66% of SmolLM2's reply
    positions), so the max-prob rule cannot let it leave there, right or not."""
    anchor_weight: float = 10.0
    """Weight of the last layer's KL to the original: holds the full-depth output."""
    teacher_top_k: int = 20
    """The original's top tokens per position kept from generation; the KL runs over these
    and the rest of the mass as one more outcome."""
    layer_dropout: float = 0.0
    """Largest chance that a layer is skipped in a training step (LayerSkip), rising linearly
    with depth from 0 at the first layer; 0 (the default): off."""
    eval_every: int = 50
    """Steps between held-out evaluations (the best checkpoint is chosen among them)."""
    ceiling: float = 0.99
    """The full-depth agreement with the original a checkpoint must keep to be chosen."""
    bf16: bool = True
    """Train under bfloat16 autocast (weights and evaluation stay float32)."""
    seed: int = 0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["exit_layers"] = list(self.exit_layers) if self.exit_layers is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> FinetuneSettings:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("exit_layers") is not None:
            values["exit_layers"] = tuple(values["exit_layers"])
        return cls(**values)

    def layers_for(self, num_layers: int) -> tuple[int, ...]:
        return self.exit_layers if self.exit_layers is not None else default_exit_layers(num_layers)

    def check(self, num_layers: int) -> None:
        """Raises :class:`FinetuneError` naming the first setting that cannot work."""
        last = num_layers - 2
        layers = self.layers_for(num_layers)
        if not layers:
            raise FinetuneError("--exit-layers is empty; give at least one layer index")
        bad = [layer for layer in layers if not 0 <= layer <= last]
        if bad:
            raise FinetuneError(
                f"--exit-layers {','.join(map(str, layers))}: layers {bad} are out of range; this model has "
                f"{num_layers} layers, so exit layers must lie in [0, {last}] (the last layer is the anchor)"
            )
        if len(set(layers)) != len(layers):
            raise FinetuneError(f"--exit-layers {','.join(map(str, layers))} names a layer twice")
        if self.exit_target not in EXIT_TARGETS:
            raise FinetuneError(f"--exit-target {self.exit_target!r} is unknown; allowed: {', '.join(EXIT_TARGETS)}")
        if self.method not in METHODS:
            raise FinetuneError(f"--method {self.method!r} is unknown; allowed: {', '.join(METHODS)}")
        positive = {"--lr": self.lr, "--lora-rank": self.lora_rank, "--lora-alpha": self.lora_alpha,
                    "--batch-size": self.batch_size, "--exits-per-step": self.exits_per_step,
                    "--teacher-top-k": self.teacher_top_k, "--eval-every": self.eval_every}
        for name, value in positive.items():
            if not value > 0:
                raise FinetuneError(f"{name} {value} must be > 0")
        for name, value in {"--exit-weight": self.exit_weight, "--anchor-weight": self.anchor_weight}.items():
            if not value >= 0:
                raise FinetuneError(f"{name} {value} must be >= 0")
        if not 0 <= self.layer_dropout < 1:
            raise FinetuneError(f"--layer-dropout {self.layer_dropout} must lie in [0, 1)")
        if not 0 < self.ceiling <= 1:
            raise FinetuneError(f"--ceiling {self.ceiling} must lie in (0, 1]")

    def check_budget(self, tokens_per_step: float) -> None:
        """Refuses a budget that does not reach one evaluation after the first."""
        needed = tokens_per_step * self.eval_every
        if self.tokens < needed:
            raise FinetuneError(
                f"--tokens {self.tokens} is too small to train: one evaluation interval (--eval-every "
                f"{self.eval_every} steps of --batch-size {self.batch_size} sequences) takes about "
                f"{needed:,.0f} tokens of this data; give at least that, or a smaller --eval-every"
            )


def default_exit_layers(num_layers: int) -> tuple[int, ...]:
    """Every second layer from two thirds of the stack to the second-to-last (SmolLM2: 20, 22, ...,
    28): where a calibrated exit can land (the readouts of SmolLM2's layers 16 and 18 start 10-12
    nats from the original; pulling them there moves the whole trunk)."""
    last = num_layers - 2
    first = (2 * num_layers) // 3
    layers = list(range(last - 2 * ((last - first) // 2), last + 1, 2))
    return tuple(layers)
