"""Calibration with a Learn-then-Test guarantee: the statistics, the real-engine guarantee, the errors.

The statistics in ``risk.py`` are checked against exact rational binomial sums,
closed forms, and a simulation under a null whose risk sits exactly at the
level. The guarantee is checked end to end on a tiny random LLaMA: the command
calibrates on some prompts, and the settings file it writes runs through a real
engine on different prompts, scored by an independent HF-transformers forward pass.
"""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from fractions import Fraction

import pytest

from vllm_early_exit.tools import calibrate as cal
from vllm_early_exit.tools import risk
from vllm_early_exit.__main__ import main as cli
from vllm_early_exit.config import SIGNALS, EarlyExitConfig

from .conftest import one_process_env, tiny_prompts

# --- risk.py ----------------------------------------------------------------------


def exact_binomial_cdf(k: int, n: int, p: Fraction) -> Fraction:
    return sum((math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1)), Fraction(0))


@pytest.mark.parametrize("n", [1, 7, 30, 120])
@pytest.mark.parametrize("p", [Fraction(1, 50), Fraction(1, 10), Fraction(1, 2), Fraction(19, 20)])
def test_binomial_cdf_equals_the_exact_rational_sum(n, p):
    for k in range(-1, n + 1):
        exact = float(exact_binomial_cdf(k, n, p)) if k >= 0 else 0.0
        assert risk.binomial_cdf(k, n, float(p)) == pytest.approx(exact, rel=1e-9, abs=1e-300)


def test_binomial_cdf_is_stable_far_in_the_tail():
    # Terms of about 1e-300 and less: a naive product of floats underflows to 0.
    exact = exact_binomial_cdf(3, 1000, Fraction(1, 2))
    assert risk.binomial_cdf(3, 1000, 0.5) == pytest.approx(float(exact), rel=1e-9)
    assert float(exact) > 0


def test_hoeffding_and_bentkus_p_values_match_their_closed_forms():
    n, alpha = 40, 0.1
    for successes in range(0, 12):
        r = successes / n
        if r >= alpha:  # no evidence against "risk > alpha"
            assert risk.hoeffding_p_value(r, n, alpha) == 1.0
            continue
        kl = (r * math.log(r / alpha) if r else 0.0) + (1 - r) * math.log((1 - r) / (1 - alpha))
        assert risk.hoeffding_p_value(r, n, alpha) == pytest.approx(math.exp(-n * kl), rel=1e-12)
        # Pinsker: the KL form is never weaker than the textbook exp(-2 n (alpha - r)^2).
        assert risk.hoeffding_p_value(r, n, alpha) <= math.exp(-2 * n * (alpha - r) ** 2) + 1e-15
        assert risk.hoeffding_bentkus_p_value(r, n, alpha) == min(
            risk.hoeffding_p_value(r, n, alpha), risk.bentkus_p_value(r, n, alpha)
        )
    for successes in range(0, n + 1):  # Bentkus: e * P(Binomial(n, alpha) <= n r), at most 1
        bentkus = min(1.0, math.e * float(exact_binomial_cdf(successes, n, Fraction(1, 10))))
        assert risk.bentkus_p_value(successes / n, n, alpha) == pytest.approx(bentkus, rel=1e-9)
    # A mean loss at or above the level gives no evidence against the null.
    assert risk.hoeffding_bentkus_p_value(0.1, n, alpha) == 1.0
    assert risk.hoeffding_bentkus_p_value(0.7, n, alpha) == 1.0
    # A mean of n losses that is k/n up to float error counts k, not k + 1.
    assert risk.bentkus_p_value(sum([0.1] * 30) / 30, 30, 0.5) == risk.bentkus_p_value(0.1, 30, 0.5)


def test_p_value_grows_with_the_observed_loss_and_shrinks_with_the_allowed_risk():
    n = 50
    losses = [i / 200 for i in range(201)]
    p = [risk.hoeffding_bentkus_p_value(r, n, 0.2) for r in losses]
    assert all(a <= b + 1e-15 for a, b in zip(p, p[1:]))
    assert p[0] < 1e-4 and p[-1] == 1.0
    by_alpha = [risk.hoeffding_bentkus_p_value(0.05, n, a) for a in (0.06, 0.1, 0.2, 0.4)]
    assert all(a >= b for a, b in zip(by_alpha, by_alpha[1:]))


def _rejection_rate(draw, n: int, alpha: float, delta: float, trials: int, rng: random.Random) -> float:
    rejected = 0
    for _ in range(trials):
        mean = sum(draw(rng) for _ in range(n)) / n
        rejected += risk.hoeffding_bentkus_p_value(mean, n, alpha) <= delta
    return rejected / trials


@pytest.mark.parametrize(
    "name,draw",
    [
        ("bernoulli", lambda rng: float(rng.random() < 0.2)),
        ("uniform", lambda rng: rng.uniform(0.0, 0.4)),
        ("three-point", lambda rng: rng.choice((0.0, 0.0, 0.0, 0.0, 1.0)) if rng.random() < 0.5 else 0.2),
    ],
)
def test_p_value_is_valid_under_a_null_with_risk_exactly_at_the_level(name, draw):
    """Every loss distribution here has mean 0.2 = alpha: rejections must stay within delta."""
    rng = random.Random(1234)
    n, alpha, delta, trials = 40, 0.2, 0.1, 3000
    rate = _rejection_rate(draw, n, alpha, delta, trials, rng)
    assert rate <= delta + 3 * math.sqrt(delta * (1 - delta) / trials), (name, rate)
    # The simulation can tell a valid test from an invalid one: the plug-in rule
    # "reject when the observed risk is below alpha" rejects far more often.
    plug_in = sum(sum(draw(rng) for _ in range(n)) / n < alpha for _ in range(1000)) / 1000
    assert plug_in > 2 * delta


def test_p_value_has_power_when_the_risk_is_well_below_the_level():
    rng = random.Random(5)
    rate = _rejection_rate(lambda r: float(r.random() < 0.05), 100, 0.2, 0.1, 500, rng)
    assert rate > 0.9


def test_fixed_sequence_stops_at_the_first_hypothesis_not_rejected():
    assert risk.fixed_sequence_rejections([0.01, 0.04, 0.2, 0.001], 0.05) == 2
    assert risk.fixed_sequence_rejections([0.5, 0.001], 0.05) == 0
    assert risk.fixed_sequence_rejections([0.05, 0.05], 0.05) == 2
    assert risk.fixed_sequence_rejections([], 0.05) == 0
    with pytest.raises(ValueError, match="delta=1.2"):
        risk.fixed_sequence_rejections([0.1], 1.2)


# --- strict direction and decisions (no engine) -------------------------------------


def _signal_classes():
    from vllm_early_exit.model_executor.early_exit.signals import ExitSignal

    found, todo = {}, [ExitSignal]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found[sub.name] = sub
            todo.append(sub)
    return found


def test_strict_direction_covers_every_signal_and_agrees_with_the_engine():
    assert set(cal.STRICTER) == set(SIGNALS)
    for name, cls in _signal_classes().items():
        assert cal.STRICTER[name] == ("higher" if cls.higher_is_confident else "lower"), name
    assert set(cal.DEFAULT_THRESHOLDS) == set(cal.STRICTER)


def test_candidates_are_tested_from_the_strictest():
    assert cal.strict_order("max_prob", [0.5, 0.99, 0.9, 0.99]) == [0.99, 0.9, 0.5]
    assert cal.strict_order("entropy", [1.0, 0.1, 0.5]) == [0.1, 0.5, 1.0]
    with pytest.raises(cal.CalibrationError, match="--signal 'confidence'.*'entropy'.*'max_prob'"):
        cal.strict_order("confidence", [0.5])


def _runs(agreements: dict[float, list[float]]) -> list[cal.ThresholdRun]:
    return [cal.ThresholdRun(t, a, tokens=len(a), agreeing_tokens=round(sum(a))) for t, a in agreements.items()]


def test_decision_picks_the_most_permissive_threshold_before_the_first_failure():
    good, bad = [1.0] * 60, [0.5] * 60
    runs = _runs({0.99: good, 0.9: good, 0.8: bad, 0.5: good})  # 0.5 would pass, but the sequence stopped
    rows, chosen = cal.decide(runs, target=0.9, delta=0.1)
    assert chosen == 1 and [r.accepted for r in rows] == [True, True, False, False]
    assert [r.tested for r in rows] == [True, True, True, False]
    with pytest.raises(cal.CalibrationError, match="not in strict order"):
        cal.finish(list(reversed(runs)), {"signal": "max_prob"}, target=0.9, delta=0.1, out="unused.json")


# --- command-line errors ---------------------------------------------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--target-agreement", "1.5"], r"--target-agreement: '1.5' is invalid: allowed values lie strictly between 0 and 1"),
        (["--target-agreement", "0.9", "--delta", "0"], r"--delta: '0' is invalid: allowed values lie strictly between 0 and 1"),
        (["--target-agreement", "0.9", "--signal", "confidence"], r"--signal: invalid choice: 'confidence'.*'entropy'.*'max_prob'"),
        (["--target-agreement", "0.9", "--thresholds", "high"], r"--thresholds: 'high' is invalid"),
        (["--target-agreement", "0.9", "--prompts", "0"], r"--prompts: '0' is invalid: allowed values are integers >= 1"),
        (["--target-agreement", "0.9", "--batch", "0"], r"--batch: '0' is invalid: allowed values are integers >= 1"),
    ],
)
def test_bad_option_names_itself_and_the_allowed_values(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli(["calibrate", *argv, "--out", str(tmp_path / "s.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--thresholds", "1.5"], r"--thresholds: candidate 1.5 is invalid for signal 'max_prob'.*\[0, 1\]"),
        (["--signal", "head"], r"early_exit.signal='head'.*set early_exit.heads"),
        (["--base-config", '{"treshold": 1}'], r"--base-config: unknown early_exit setting"),
        (["--base-config", '{"enabled": false}'], r"turn early exit off"),
        (["--model", "unused", "--prompts", "5000"], r"--prompts 5000: the 'calibration' split holds 2000 prompts"),
    ],
)
def test_bad_settings_stop_before_any_engine_starts(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        cli(["calibrate", "--target-agreement", "0.9", *argv, "--out", str(tmp_path / "s.json")])


def test_calibrate_refuses_a_bad_target_before_any_engine_starts(tmp_path):
    with pytest.raises(cal.CalibrationError, match=r"--target-agreement 1.5 is invalid.*between 0 and 1"):
        cal.calibrate(tmp_path, [[1, 2]], {}, target=1.5, delta=0.1, out=tmp_path / "s.json")


# --- the guarantee, on a real engine -------------------------------------------------

CANDIDATES = [0.99, 0.9, 0.7, 0.6, 0.5, 0.3]
TARGET, DELTA, NEW = 0.9, 0.1, 24
HELD_OUT = tiny_prompts(48, seed=202)  # calibration uses seed 101


# Runs in a fresh process: the real command, then the settings file it wrote,
# loaded the way offline users load it, in a real engine on held-out prompts.
CALIBRATE_THEN_SERVE = """
import json, sys
from vllm_early_exit.__main__ import main
argv, model, held_out, max_tokens, result_path = json.loads(sys.argv[1])
try:
    code = main(["calibrate", *argv])
except SystemExit as exc:
    code = exc.code
result = {"code": code}
out = argv[argv.index("--out") + 1]
if code == 0:
    from vllm import LLM, SamplingParams
    from vllm_early_exit import get_exit_stats
    with open(out) as f:
        llm = LLM(model, additional_config={"early_exit": json.load(f)}, dtype="float32",
                  enforce_eager=True, skip_tokenizer_init=True, max_model_len=256, seed=0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in held_out], params, use_tqdm=False)
    result["held_out_outputs"] = [list(o.outputs[0].token_ids) for o in outs]
    result["held_out_stats"] = get_exit_stats(llm).to_dict()
with open(result_path, "w") as f:
    json.dump(result, f)
"""


def _calibrate_argv(tiny_llama, prompt_file, out, max_tokens: int = NEW) -> list[str]:
    return ["--model", str(tiny_llama), "--prompt-file", str(prompt_file), "--prompts", "48",
            "--exit-layers", "1,3", "--policy", "per_token", "--thresholds", ",".join(map(str, CANDIDATES)),
            "--target-agreement", str(TARGET), "--delta", str(DELTA), "--max-tokens", str(max_tokens),
            "--out", str(out)]


@pytest.fixture(scope="module")
def calibrated(tiny_llama, tmp_path_factory):
    """The real command (``python -m vllm_early_exit calibrate``) on 48 token prompts of the tiny model (one early-exit, one plain
    engine), then an engine with the chosen settings on 48 other prompts."""
    work = tmp_path_factory.mktemp("calibrate")
    prompt_file = work / "prompts.json"
    prompt_file.write_text(json.dumps(tiny_prompts(48, seed=101)))
    out = work / "settings.json"
    spec = [_calibrate_argv(tiny_llama, prompt_file, out), str(tiny_llama), HELD_OUT, NEW, str(work / "result.json")]
    proc = subprocess.run([sys.executable, "-c", CALIBRATE_THEN_SERVE, json.dumps(spec)],
                          capture_output=True, text=True, timeout=900, env=one_process_env())
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads((work / "result.json").read_text())
    assert result["code"] == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(cal.report_path(out).read_text())
    return out, report, proc.stdout, result


def _full_model_agreement(model_dir, prompts, outputs) -> list[float]:
    """Per prompt: share of output tokens equal to the HF model's argmax after the same prefix.

    One right-padded batch: under the causal mask, padding after a sequence changes none of its logits.
    """
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sequences = [list(p) + list(o) for p, o in zip(prompts, outputs)]
    width = max(len(s) for s in sequences)
    with torch.no_grad():
        logits = model(torch.tensor([s + [0] * (width - len(s)) for s in sequences])).logits
    shares = []
    for row, prompt, output in zip(logits, prompts, outputs):
        picks = row[len(prompt) - 1 : len(prompt) - 1 + len(output)].argmax(-1).tolist()
        shares.append(sum(a == b for a, b in zip(picks, output)) / len(output))
    return shares


def test_calibrated_settings_keep_the_target_on_held_out_prompts(calibrated, tiny_llama):
    out, report, stdout, served = calibrated
    assert report["status"] == "ok" and "<- chosen" in stdout
    rows = report["thresholds"]
    assert [r["threshold"] for r in rows] == CANDIDATES
    # Accepted thresholds form a prefix of the sequence; the last of them is chosen.
    accepted = [r["accepted"] for r in rows]
    assert accepted == sorted(accepted, reverse=True)
    chosen = max(i for i, a in enumerate(accepted) if a)
    assert report["chosen_threshold"] == CANDIDATES[chosen]
    # Not the trivial answer: a looser threshold than the strictest clearly passes and is chosen ...
    assert chosen > 0 and rows[chosen]["mean_layers"] < 6
    # ... and one that misses the target on these prompts is never accepted.
    assert any(r["agreement"] < TARGET for r in rows)
    assert all(not r["accepted"] for r in rows if r["agreement"] < TARGET)
    # The report's p-values are the Hoeffding-Bentkus p-values of its per-prompt agreements.
    for r in rows:
        losses = [1 - a for a in r["per_prompt_agreement"]]
        expected = risk.hoeffding_bentkus_p_value(sum(losses) / len(losses), len(losses), 1 - TARGET)
        assert r["p_value"] == pytest.approx(expected)
        assert r["mixed_step_tokens"] == 0  # every decode step was pure decode

    # The file holds only early_exit settings, as `vllm serve --early-exit-config FILE` reads them.
    EarlyExitConfig.from_cli_value(str(out))
    settings = json.loads(out.read_text())
    assert settings == {"exit_layers": [1, 3], "policy": "per_token", "signal": "max_prob",
                        "threshold": CANDIDATES[chosen]}

    # Different prompts, through a real engine that read the file as additional_config;
    # scored against an HF-transformers forward pass of the full model.
    assert served["held_out_stats"]["early_exit_tokens"] > 0
    shares = _full_model_agreement(tiny_llama, HELD_OUT, served["held_out_outputs"])
    assert sum(shares) / len(shares) >= TARGET


def test_resume_reuses_the_measurements_of_the_same_run_only(calibrated, tiny_llama, tmp_path, capsys):
    """The run wrote its outputs and scores as it went; --resume decides from them without an engine
    (the same report), and refuses them for another run."""
    import shutil

    from vllm_early_exit.tools.calibrate.runs import measurements_path

    out, report, _, _ = calibrated
    saved = json.loads(measurements_path(out).read_text())
    assert [len(outputs) for outputs, _ in saved["generated"]] == [48] * len(CANDIDATES)
    assert [len(scores) for scores in saved["scores"]] == [48] * len(CANDIDATES)
    assert saved["key"]["thresholds"] == list(CANDIDATES) and saved["key"]["max_tokens"] == NEW

    again = tmp_path / "settings.json"
    shutil.copy(measurements_path(out), measurements_path(again))
    prompt_file = out.parent / "prompts.json"
    assert cli(["calibrate", *_calibrate_argv(tiny_llama, prompt_file, again), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "--resume: the early-exit outputs come from" in printed and "--resume: the full model's scores" in printed
    resumed = json.loads(cal.report_path(again).read_text())
    fields = ("threshold", "agreement", "p_value", "accepted", "exit_stats", "predicted_speed")
    assert [{k: r[k] for k in fields} for r in resumed["thresholds"]] == [
        {k: r[k] for k in fields} for r in report["thresholds"]]
    assert json.loads(again.read_text()) == json.loads(out.read_text())

    with pytest.raises(SystemExit, match="measured with another max_tokens"):
        cli(["calibrate", *_calibrate_argv(tiny_llama, prompt_file, again, max_tokens=NEW + 1), "--resume"])


def test_resume_key_follows_the_contents_of_the_heads_and_shortlist_files(tmp_path):
    """Heads retrained into the same folder (or a rewritten shortlist) make another run for --resume."""
    from vllm_early_exit.tools.calibrate.runs import settings_files_digest

    heads, shortlist = tmp_path / "heads", tmp_path / "shortlist.json"
    heads.mkdir()
    (heads / "heads.json").write_text("{}")
    shortlist.write_text("[1, 2]")
    settings = {"signal": "head", "heads": str(heads), "shortlist": str(shortlist)}
    first = settings_files_digest(settings)
    assert settings_files_digest(dict(settings)) == first
    (heads / "heads.safetensors").write_bytes(b"retrained")
    second = settings_files_digest(settings)
    shortlist.write_text("[1, 3]")
    assert len({first, second, settings_files_digest(settings)}) == 3
    assert settings_files_digest({"signal": "max_prob"}) == settings_files_digest({})


def test_a_target_that_cannot_be_met_yields_no_threshold(calibrated, tmp_path):
    """The same measurements against a target that 48 prompts cannot certify (at most
    0.99^48 = 0.62 > delta even with no loss at all): no settings, an explicit result."""
    _, report, _, _ = calibrated
    runs = [
        cal.ThresholdRun(r["threshold"], r["per_prompt_agreement"], tokens=1, agreeing_tokens=1)
        for r in report["thresholds"]
    ]
    out = tmp_path / "settings.json"
    out.write_text("{}")  # a stale file from an earlier run must not survive
    result = cal.finish(runs, report["base_settings"], target=0.99, delta=DELTA, out=out)
    assert result["status"] == "no_threshold" and result["settings"] is None
    assert not out.exists()
    assert "--prompts" in result["message"] and "--target-agreement" in result["message"]
    assert json.loads(cal.report_path(out).read_text())["status"] == "no_threshold"
    assert not any(r["accepted"] for r in result["thresholds"])


# --- cost: predicted (weight-bytes bound) speed vs plain vLLM ------------------------

TINY_SETTINGS = {"exit_layers": [1, 3], "policy": "per_token", "signal": "max_prob"}


def _exit_stats(full: int = 0, exits: dict[int, int] | None = None) -> dict:
    from vllm_early_exit.model_executor.early_exit.stats import ExitStats

    per_layer = [0] * 6
    for layer, count in (exits or {}).items():
        per_layer[layer] = count
    return ExitStats(6, exits_per_layer=per_layer, full_depth_tokens=full).to_dict()


def _tiny_weights():
    """The tiny LLaMA's parts (conftest.tiny_shape, 6 layers, vocab 512), counted by hand."""
    from vllm_early_exit.tools.cost import WeightBytes

    q = o = 128 * 4 * 32
    kv = 2 * 128 * 2 * 32
    return WeightBytes(num_layers=6, hidden=128, layer=q + kv + o + 3 * 128 * 256, kv_projection=kv,
                       lm_head=512 * 128)


def test_head_checks_are_priced_without_reading_the_heads_folder(tmp_path):
    """``head``/``gate`` settings need a heads folder to validate; the cost model prices them
    from the layout alone: each check a token reaches also reads the head's hidden x hidden matrix."""
    from vllm_early_exit.tools.cost import engine_bytes

    w = _tiny_weights()
    stats = _exit_stats(full=6, exits={1: 4})  # 4 tokens reach the check at 1, 6 reach both
    plain_readout = engine_bytes(w, TINY_SETTINGS, stats)
    for signal in ("head", "gate"):
        heads = {**TINY_SETTINGS, "signal": signal, "heads": str(tmp_path / "not-here")}
        assert engine_bytes(w, heads, stats) - plain_readout == pytest.approx((4 * 1 + 6 * 2) * 128 * 128 / 10)


def test_report_predicts_each_thresholds_speed_from_its_exit_counts(calibrated, tiny_llama):
    from transformers import AutoConfig

    from vllm_early_exit.tools.cost import WeightBytes, predicted_at_batch, predicted_ratio

    _, report, stdout, _ = calibrated
    weights = WeightBytes.of(AutoConfig.from_pretrained(tiny_llama))
    assert weights == _tiny_weights()
    rows = report["thresholds"]
    for r in rows:
        stats = r["exit_stats"]
        # Each threshold's own counters (reset between thresholds): its pure-decode tokens only.
        assert stats["decode_tokens"] == r["decode_tokens"] == 48 * (NEW - 1)
        assert stats["mean_layers"] == pytest.approx(r["mean_layers"])
        settings = {**report["base_settings"], "threshold": r["threshold"]}
        # At the batch it will serve (per_token: a step as deep as its deepest row), and at 1, 8, 32.
        assert report["batch"] == cal.DEFAULT_BATCH == 8
        expected = predicted_at_batch(weights, settings, stats, report["batch"])
        assert r["predicted_speed"] == pytest.approx(expected, rel=1e-12)
        by_batch = r["predicted_speed_by_batch"]
        assert by_batch["1"] == pytest.approx(predicted_ratio(weights, settings, stats), rel=1e-12)
        assert by_batch["8"] == r["predicted_speed"]
        assert by_batch["1"] >= by_batch["8"] >= by_batch["32"]
    assert rows[0]["exit_stats"]["early_exit_tokens"] < rows[-1]["exit_stats"]["early_exit_tokens"]
    assert rows[0]["predicted_speed"] != rows[-1]["predicted_speed"]
    # The verdict: the accepted threshold predicted fastest, and whether it beats plain vLLM.
    accepted = [r for r in rows if r["accepted"]]
    best = max(r["predicted_speed"] for r in accepted)
    assert report["fastest_predicted_speed"] == best
    assert report["fastest_threshold"] in [r["threshold"] for r in accepted if r["predicted_speed"] == best]
    chosen = next(r for r in rows if r["threshold"] == report["chosen_threshold"])
    assert report["chosen_predicted_speed"] == chosen["predicted_speed"]
    # On the tiny model the few exits save less than the checks read (an LM head of 0.44 layer
    # at 2 of 6 layers): the real run is a "keep early exit off" case.
    assert best < 1.0 and report["recommend"] == "off" and report["recommended_threshold"] is None
    assert cal.NO_FASTER in stdout
    assert "predicted (weight-bytes bound)" in report["predicted_speed_basis"]
    # The printed table has the column, labelled as a bound; the chosen row shows its prediction.
    assert "pred. b8*" in stdout and "* pred. b8: predicted (weight-bytes bound)" in stdout and "b1/b8/b32" in stdout
    line = next(l for l in stdout.splitlines() if l.rstrip().endswith("<- chosen"))
    assert f"{chosen['predicted_speed']:.3f}x" in line
    assert report["speed_message"] in stdout


def test_no_setting_predicted_faster_than_plain_says_keep_early_exit_off(tiny_llama, tmp_path, monkeypatch, capsys):
    """Thresholds that never exit (max_prob 1.0, and a forced 0.99999 that the counters say never
    left): both certified (full agreement), but each token pays two checks and saves nothing."""
    import importlib

    from vllm_early_exit.tools.cost import WeightBytes

    cal_cli = importlib.import_module("vllm_early_exit.tools.calibrate.cli")
    decoded = 48 * (NEW - 1)

    def never_exiting(model, prompts, settings, *, target, delta, out, thresholds, max_tokens, dtype, info, resume,
                      batch, reference=None):
        runs = [cal.ThresholdRun(t, [1.0] * len(prompts), tokens=decoded, agreeing_tokens=decoded, mean_layers=6.0,
                                 decode_tokens=decoded, exit_stats=_exit_stats(full=decoded)) for t in thresholds]
        return cal.finish(runs, settings, target=target, delta=delta, out=out, info=info,
                          weights=WeightBytes.from_pretrained(model), batch=batch)

    monkeypatch.setattr(cal_cli, "calibrate", never_exiting)
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps(tiny_prompts(48, seed=101)))
    out = tmp_path / "settings.json"
    assert cli(["calibrate", "--model", str(tiny_llama), "--prompt-file", str(prompt_file), "--exit-layers", "1,3",
                "--thresholds", "1.0,0.99999", "--target-agreement", str(TARGET), "--delta", str(DELTA),
                "--max-tokens", str(NEW), "--batch", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(cal.report_path(out).read_text())
    w = _tiny_weights()
    ratio = w.plain / (w.plain + 2 * w.lm_head)  # every layer, two checks' LM-head readouts, the LM head
    assert ratio < 1.0
    assert [r["predicted_speed"] for r in report["thresholds"]] == [pytest.approx(ratio)] * 2
    assert report["status"] == "ok" and report["chosen_threshold"] == 0.99999
    assert report["recommend"] == "off" and report["recommended_threshold"] is None
    assert report["fastest_predicted_speed"] == pytest.approx(ratio)
    assert cal.NO_FASTER in report["speed_message"] and cal.NO_FASTER in report["message"]
    assert cal.NO_FASTER in printed and f"{ratio:.3f}x plain vLLM at batch 32" in printed
    assert report["batch"] == 32 and "pred. b32*" in printed
    # The settings file stays what --early-exit-config and bench --calibrated read.
    assert EarlyExitConfig.from_cli_value(str(out))["threshold"] == 0.99999
    assert json.loads(out.read_text()) == {**TINY_SETTINGS, "threshold": 0.99999}


def test_a_stricter_threshold_is_recommended_only_when_clearly_faster(tmp_path):
    weights, n = _tiny_weights(), 1000

    def verdict(stricter: dict, looser: dict) -> dict:
        runs = [cal.ThresholdRun(t, [1.0] * 60, tokens=n, agreeing_tokens=n, decode_tokens=n, exit_stats=_exit_stats(**s))
                for t, s in ((0.99, stricter), (0.9, looser))]
        return cal.finish(runs, TINY_SETTINGS, target=0.9, delta=0.1, out=tmp_path / "s.json", weights=weights)

    # Under policy "all" a looser threshold can exit less (its batch stays together): a clear gap.
    report = verdict({"exits": {3: n}}, {"full": n})
    assert report["chosen_threshold"] == 0.9 and report["fastest_threshold"] == 0.99
    assert report["recommend"] == "early_exit" and report["recommended_threshold"] == 0.99
    assert report["fastest_predicted_speed"] > 1.0 >= report["chosen_predicted_speed"]
    assert "recommended: threshold 0.99" in report["message"]
    assert "<- fastest predicted" in cal.format_table(report)
    # A gap under SPEED_MARGIN: the chosen (most permissive) threshold stays recommended.
    report = verdict({"exits": {3: n}}, {"exits": {3: n - 1}, "full": 1})
    assert report["fastest_threshold"] == 0.99
    assert 1.0 < report["chosen_predicted_speed"] < report["fastest_predicted_speed"]
    assert report["fastest_predicted_speed"] < report["chosen_predicted_speed"] * (1 + cal.SPEED_MARGIN)
    assert report["recommend"] == "early_exit" and report["recommended_threshold"] == 0.9
    assert cal.NO_FASTER not in report["message"]


def test_max_exit_batch_is_kept_out_of_the_calibration_runs_and_hinted(tiny_llama, tmp_path, monkeypatch):
    """Calibration decodes in large batches, which ``max_exit_batch`` would leave unchecked: the
    runs go without it, the settings file keeps it, and the report says up to which batch the
    checks are predicted to pay (every token leaving at the first check: at any batch)."""
    import importlib

    runs_module = importlib.import_module("vllm_early_exit.tools.calibrate.runs")
    measured = {}
    n = 48 * (NEW - 1)

    def fake_measure(model, prompts, settings, thresholds, *, max_tokens, dtype, saved, reference=None):
        measured.update(settings)
        return [cal.ThresholdRun(t, [1.0] * len(prompts), tokens=n, agreeing_tokens=n, decode_tokens=n,
                                 exit_stats=_exit_stats(exits={1: n})) for t in thresholds]

    monkeypatch.setattr(runs_module, "measure", fake_measure)
    out = tmp_path / "settings.json"
    report = cal.calibrate(tiny_llama, tiny_prompts(48, seed=101), {**TINY_SETTINGS, "max_exit_batch": 4},
                           target=TARGET, delta=DELTA, out=out, thresholds=[0.99, 0.9], max_tokens=NEW)
    assert "max_exit_batch" not in measured and measured["exit_layers"] == [1, 3]
    assert json.loads(out.read_text())["max_exit_batch"] == 4
    assert report["max_exit_batch_hint"] == 256
    assert '"max_exit_batch": 256' in report["message"]
