"""``train-heads`` on tiny random LLaMA checkpoints: real HF models, real training, no mocks.

Sequences are random tokens: the "labels" are the tiny model's own predictions,
exactly as for a real model. The module runs torch on one thread: on a shared
2-core machine the tiny model's many small operations are far faster so.
"""

from __future__ import annotations

import random

import pytest
import torch

from vllm_early_exit.__main__ import main
from vllm_early_exit.model_executor.early_exit.heads import GATE_FEATURES, ExitHeads
from vllm_early_exit.tools.train_heads import TrainSettings, default_layers, train_exit_heads

from .conftest import make_tiny_llama

LAYERS = (1, 3)
SETTINGS = TrainSettings(layers=LAYERS, design="compare", rank=16, epochs=4, batch_size=256, seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_sequences(count: int, length: int = 48, seed: int = 0, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_heads_llama"), seed=5)


@pytest.fixture(scope="module")
def trained(model_dir):
    return train_exit_heads(model_dir, random_sequences(64), SETTINGS, data={"source": "random tokens"})


def test_default_layers_follow_the_stack():
    assert default_layers(30) == [10, 12, 14, 16, 18, 20, 22, 24, 26, 28]
    assert default_layers(6) == [2, 4]


def test_same_seed_gives_identical_heads_and_another_seed_does_not(model_dir):
    # 64 candidate tokens of 512: the sampled-vocabulary path of the KL runs too.
    settings = TrainSettings(**{**SETTINGS.__dict__, "design": "affine", "epochs": 2, "candidates": 64})
    sequences = random_sequences(16, length=32, seed=1)
    first = train_exit_heads(model_dir, sequences, settings)
    again = train_exit_heads(model_dir, sequences, settings)
    other = train_exit_heads(model_dir, sequences, TrainSettings(**{**settings.__dict__, "seed": 1}))
    for layer in LAYERS:
        for a, b in zip(first.weights[layer], again.weights[layer]):
            assert torch.equal(a, b)
        for a, b in zip(first.gates[layer], again.gates[layer]):
            assert torch.equal(a, b)
    assert not torch.equal(first.weights[LAYERS[0]][0], other.weights[LAYERS[0]][0])


def test_saved_folder_loads_with_base_model_layers_and_gates(model_dir, trained, tmp_path):
    trained.save(tmp_path / "heads")
    heads = ExitHeads.load(tmp_path / "heads")
    assert heads.layers == LAYERS and sorted(heads.gates) == list(LAYERS)
    assert heads.base_model == {
        "path": str(model_dir), "architecture": "LlamaForCausalLM",
        "num_hidden_layers": 6, "hidden_size": 128, "vocab_size": 512,
    }
    heads.check_base(6, 128, 512, where="test")
    assert heads.design in ("affine", "low_rank")
    for layer in LAYERS:
        weight, bias = heads.weights[layer]
        assert weight.shape == (128, 128) and bias.shape == (128,)
        gate_weight, gate_bias = heads.gates[layer]
        assert gate_weight.shape == (len(GATE_FEATURES),) and gate_bias.shape == (1,)
    training = heads.training
    assert training["designs"] == ["affine", "low_rank"] and training["chosen"] == heads.design
    assert [row["layer"] for row in training["per_layer"]] == list(LAYERS)
    for row in training["per_layer"]:
        assert {"plain_agreement", "affine_agreement", "low_rank_agreement", "gate_accuracy"} <= set(row)
    # The low-rank design is stored multiplied out: its weights have the requested rank.
    if heads.design == "low_rank":
        assert int(torch.linalg.matrix_rank(heads.weights[LAYERS[0]][0])) <= SETTINGS.rank


def unseen_scores(model_dir, heads) -> list[dict[str, float]]:
    """Per head layer, agreement with the full model's token and KL to it, of the plain readout and
    the head, scored here, independently of the trainer: fresh sequences, HF hidden states, argmax."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = torch.tensor(random_sequences(12, seed=99))
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    final = torch.log_softmax(out.logits, dim=-1)

    def read(stream):
        return torch.log_softmax(model.lm_head(model.model.norm(stream)), dim=-1)

    def agreement(log_probs):
        return float((log_probs.argmax(-1) == final.argmax(-1)).float().mean())

    def kl(log_probs):
        return float((final.exp() * (final - log_probs)).sum(-1).mean())

    def cross_entropy(log_probs):  # on the full model's top token
        return float(-log_probs.gather(-1, final.argmax(-1, keepdim=True)).mean())

    scores = []
    for layer in LAYERS:
        stream = out.hidden_states[layer + 1]  # the stream after `layer`
        with torch.no_grad():
            plain, head = read(stream), read(heads.apply(layer, stream))
        scores.append({"plain_agreement": agreement(plain), "head_agreement": agreement(head),
                       "plain_kl": kl(plain), "head_kl": kl(head),
                       "plain_ce": cross_entropy(plain), "head_ce": cross_entropy(head)})
    return scores


def test_trained_heads_beat_the_plain_readout_on_unseen_sequences(model_dir, trained):
    scores = unseen_scores(model_dir, trained)
    for layer, s in zip(LAYERS, scores):
        assert s["head_kl"] < 0.9 * s["plain_kl"], layer
    assert sum(s["head_agreement"] - s["plain_agreement"] for s in scores) > 0.04


def test_hard_target_heads_learn_the_full_models_token(model_dir):
    """``--target hard``: from the same closed-form start and batches as ``soft``, the heads end
    with a lower cross-entropy on the full model's top token on unseen sequences."""
    settings = TrainSettings(**{**SETTINGS.__dict__, "design": "affine", "gates": False})
    soft, hard = (train_exit_heads(model_dir, random_sequences(64), TrainSettings(**{**settings.__dict__, "target": t}))
                  for t in ("soft", "hard"))
    assert "cross-entropy on the full model's top token" in hard.training["method"]
    for layer, s, h in zip(LAYERS, unseen_scores(model_dir, soft), unseen_scores(model_dir, hard)):
        assert h["head_ce"] < s["head_ce"] < s["plain_ce"], layer


def test_the_hard_loss_is_the_cross_entropy_on_the_teachers_top_token():
    from vllm_early_exit.tools.train_heads.fitting import hard_to_teacher

    head = torch.tensor([[0.4, 0.2, 0.4]]).log()
    teacher = torch.tensor([[1.0, 3.0, 2.0]])  # its top token: 1
    assert float(hard_to_teacher(head, teacher)) == pytest.approx(-float(torch.tensor(0.2).log()), abs=1e-6)


def test_gates_score_better_than_guessing_the_majority(trained):
    for row in trained.training["per_layer"]:
        assert row["gate_auc"] > 0.6, row


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layers", "2,5"],
         "--layers 2,5: layers [5] are out of range; this model has 6 layers, so head layers must lie in [0, 4]"),
        (["--design", "mlp"], "--design 'mlp' is unknown; allowed: affine, low_rank, compare"),
        (["--rank", "128", "--design", "low_rank"], "--rank 128 is out of range; this model's hidden size is 128"),
        (["--epochs", "-1"], "--epochs -1 must be >= 0"),
        (["--target", "medium"], "--target 'medium' is unknown; allowed: soft, hard"),
    ],
)
def test_cli_refuses_bad_settings_with_the_option_and_allowed_values(model_dir, tmp_path, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(["train-heads", "--model", str(model_dir), "--out", str(tmp_path / "h"), *extra])
    assert message in str(exc.value)
    assert not (tmp_path / "h").exists()


def test_sharegpt_training_data_is_the_train_split_only(smollm2):
    from transformers import AutoTokenizer

    from vllm_early_exit.tools.assets import chat_prompt, sharegpt_split
    from vllm_early_exit.tools.train_heads import render_conversations, sharegpt_train_conversations

    conversations = sharegpt_train_conversations(20)
    users = [user for user, _ in conversations]
    assert users == sharegpt_split("train", 20)
    held_apart = set(sharegpt_split("calibration", 300)) | set(sharegpt_split("evaluation", 300))
    assert not held_apart & set(users)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    user, reply = conversations[0]
    assert reply
    (sequence,) = render_conversations(tokenizer, [(user, reply)], max_len=10_000)
    prompt = tokenizer.encode(chat_prompt(tokenizer, user), add_special_tokens=False)
    assert sequence[: len(prompt)] == prompt and len(sequence) > len(prompt)
    assert render_conversations(tokenizer, [(user, reply)], max_len=50) == [sequence[:50]]


def test_cli_needs_out_with_a_model(model_dir):
    with pytest.raises(SystemExit) as exc:
        main(["train-heads", "--model", str(model_dir)])
    assert "--out is required with --model" in str(exc.value)


def test_token_ids_outside_the_vocabulary_are_refused(model_dir):
    from vllm_early_exit.tools.train_heads import TrainHeadsError

    with pytest.raises(TrainHeadsError, match=r"sequence 1 holds token ids \[600\] outside this model's vocabulary \[0, 511\]"):
        train_exit_heads(model_dir, [[5, 6, 7], [1, 2, 600]], SETTINGS)
