"""Train exit heads and gates on a model's own predictions: no labels, no other model.

``python -m vllm_early_exit train-heads`` teacher-forces ShareGPT conversations
(the ``train`` split only: first user turn and its reply, in the chat template)
through the HF model and records, at every position, the residual stream after
each head layer and the model's own final stream and top next tokens.

Heads (tuned-lens style, arXiv 2407.21082): the head of layer ``l`` maps the
stream ``h`` after that layer to ``h + h W^T + b``, read through the model's
frozen final norm and LM head. Training has two stages:

1. per layer, a closed-form ridge regression from the layer's stream to the final
   stream (rescaled to the layer's stream norm: the final norm ignores scale);
2. Adam on KL(full model || head) of the next-token distributions, all heads in
   the same steps. The KL of a step is taken over a candidate vocabulary: every
   row's top teacher tokens plus tokens drawn from those the teacher ranks high
   anywhere in the data (a model whose vocabulary fits in ``--candidates`` uses
   all of it). On SmolLM2 this was 16x faster than the full-vocabulary KL and
   gave the same held-out agreement and KL (within 0.01).

Designs: ``affine`` (full ``W``) and ``low_rank`` (``W = U V`` of rank
``--rank``, started from the reduced-rank ridge solution; stored multiplied
out). ``--design compare`` trains both and keeps, for the whole file, the one
with the better mean held-out top-1 agreement with the full model.

Gates (arXiv 2412.01455): a logistic classifier per layer over
:func:`heads.gate_features` that predicts "the head's token is the full
model's token". Gates are fitted on the held-out conversations (the heads never
saw them); their accuracy is measured by two-fold cross-fitting there.

Held-out numbers use the full vocabulary. The training core,
:func:`train_exit_heads`, takes token sequences and a model folder, so it runs on
any LLaMA or Qwen2 checkpoint without a tokenizer.
"""

from vllm_early_exit.model_executor.early_exit.heads import default_layers
from vllm_early_exit.tools.train_heads.cli import add_arguments, load_config_and_check, run, settings_from_args
from vllm_early_exit.tools.train_heads.data import render_conversations, sharegpt_train_conversations
from vllm_early_exit.tools.train_heads.fitting import AffineHead, LowRankHead, initial_heads, ridge_fit, train_heads
from vllm_early_exit.tools.train_heads.gates import auc, evaluate, fit_gate, fit_logistic
from vllm_early_exit.tools.train_heads.report import table, write_report
from vllm_early_exit.tools.train_heads.settings import CHOICES, DESIGNS, TrainHeadsError, TrainSettings
from vllm_early_exit.tools.train_heads.streams import PrefixSet, Readout, Streams, collect_streams
from vllm_early_exit.tools.train_heads.training import train_exit_heads

__all__ = [
    "CHOICES", "DESIGNS", "AffineHead", "LowRankHead", "PrefixSet", "Readout", "Streams", "TrainHeadsError",
    "TrainSettings", "add_arguments", "auc", "collect_streams", "default_layers", "evaluate", "fit_gate",
    "fit_logistic", "initial_heads", "load_config_and_check", "render_conversations", "ridge_fit", "run",
    "settings_from_args", "sharegpt_train_conversations", "table", "train_exit_heads", "train_heads",
    "write_report",
]
