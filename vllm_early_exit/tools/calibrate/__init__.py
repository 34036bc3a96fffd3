"""``python -m vllm_early_exit calibrate``: a threshold with a Learn-then-Test guarantee.

Procedure (Angelopoulos et al., "Learn then Test", 2021; as in CALM):

1. One early-exit engine (the base settings) decodes every calibration prompt at
   every candidate threshold, greedily with a fixed ``max_tokens``; each request
   carries its candidate as its own threshold (``extra_args``), so one engine
   serves all of them. Per threshold, the prompts enter the engine while its
   scheduler is paused (``engines.generate_together``; in waves of at most
   ``PREFILL_TOKENS`` prompt tokens) and prefill in one step, so every later
   step is pure decode: a decode token that
   shares a step with a prefill runs the full depth, which would make the
   calibration look better than deployment. The engine's counters give each
   threshold's mean depth.
2. One plain engine scores every output: per generated token, is it the token
   the full-depth model picks after the same prefix (``full_model_choices``).
3. Loss of a prompt = 1 - share of its generated tokens the full model agrees
   with (in [0, 1]); risk of a threshold = the expected loss over prompts. For
   each threshold the null hypothesis "risk > 1 - target" gets a
   Hoeffding-Bentkus p-value (``risk.py``). Thresholds are tested in a fixed
   order, strictest first, each at level ``delta``, stopping at the first one
   not rejected; the most permissive rejected threshold is chosen.
4. Cost: each threshold's exit counts give its predicted (weight-bytes bound)
   speed vs plain vLLM at the batch it will serve (``--batch``, default
   ``DEFAULT_BATCH``; ``tools/cost.py``: the weights a decode step reads, plain
   over early exit, with a ``per_token`` step as deep as its deepest row; a limit
   where decoding is bound by reading weights, not a measurement). The report names the accepted threshold predicted
   fastest and recommends it over the chosen one only when it is predicted more
   than ``SPEED_MARGIN`` faster (every accepted threshold holds the guarantee at
   once, so choosing among them keeps it); when no accepted threshold is
   predicted faster than plain vLLM, it says so and ``recommend`` is ``"off"``.

What the guarantee is: with probability at least ``1 - delta`` over the draw of
the calibration prompts, the chosen settings' expected per-prompt agreement
(the mean over prompts of each prompt's share of agreeing tokens: a macro
average) is at least ``target`` on prompts drawn from the same distribution,
with the same model, settings, ``max_tokens`` and greedy decoding.

What it is not: a bound for any single prompt or output; a bound on the share
of tokens pooled over prompts (micro agreement) or on exact-match rates; a
statement about other prompt distributions (the calibration prompts must be
exchangeable with deployment prompts: ShareGPT's calibration split stands in for
real traffic here), sampling temperatures, output lengths, or task quality.
Agreement is with the full model's next token after the early-exit engine's own
prefix, not with the full model's own continuation. Under ``policy`` ``all`` or
``quorum`` exits depend on the batch, so it holds for batches like the
calibration batches (one threshold's prompts together); ``per_token`` has no
such dependence. Decode tokens that share a step with a prefill run the full
depth in deployment too; calibration counts them (report: ``mixed_step_tokens``).
"""

from vllm_early_exit.tools.calibrate.cli import EXIT_NO_THRESHOLD, add_arguments, load_prompts, main, run
from vllm_early_exit.tools.calibrate.ltt import (
    DEFAULT_THRESHOLDS,
    STRICTER,
    CalibrationError,
    ThresholdResult,
    ThresholdRun,
    build_settings,
    check_level,
    check_signal,
    check_thresholds,
    decide,
    finish,
    format_table,
    report_path,
    strict_order,
)
from vllm_early_exit.tools.calibrate.runs import (
    MAX_BATCH,
    PREFILL_TOKENS,
    calibrate,
    generate_at_thresholds,
    measure,
    score_outputs,
)
from vllm_early_exit.tools.calibrate.speed import DEFAULT_BATCH, NO_FASTER, REPORTED_BATCHES, SPEED_MARGIN, speed_verdict

__all__ = [
    "DEFAULT_BATCH", "DEFAULT_THRESHOLDS", "EXIT_NO_THRESHOLD", "MAX_BATCH", "NO_FASTER", "PREFILL_TOKENS",
    "REPORTED_BATCHES", "SPEED_MARGIN",
    "STRICTER", "CalibrationError",
    "ThresholdResult", "ThresholdRun", "add_arguments", "build_settings", "calibrate", "check_level",
    "check_signal", "check_thresholds", "decide", "finish", "format_table", "generate_at_thresholds",
    "load_prompts", "main", "measure", "report_path", "run", "score_outputs", "speed_verdict", "strict_order",
]
