"""No result is lost to a missing optional package.

Every command writes and prints its results before it draws; without matplotlib (the ``tools``
extra) the plot is skipped with one line that names the command that installs it. Here
``import matplotlib`` fails in the test process (``sys.modules["matplotlib"] = None``), and the
demo's result path, then every command's plot, runs on results it would have measured.
"""

from __future__ import annotations

import json
import sys

import pytest

from vllm_early_exit.tools import bench, demo, oracle_report, serve_bench
from vllm_early_exit.tools.optional import TOOLS_EXTRA, available, draw, require
from vllm_early_exit.tools.quality import report as quality_report


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert not available("matplotlib")


def demo_summary() -> dict:
    row = {"tokens_per_s": 120.0, "ratio": 1.2, "mean_layers": 24.0, "unchecked_steps": 0,
           "token_agreement": 0.9, "identical_outputs": 0.5, "prefix_agreement": 0.8}
    plain = {**row, "tokens_per_s": 100.0, "ratio": 1.0, "mean_layers": 30.0, "token_agreement": 1.0}
    return {"model": "SmolLM2-135M-Instruct", "num_layers": 30, "prompts": 8, "alone": 2, "max_tokens": 16,
            "rounds": 1, "dtype": "float32", "settings": {"faster": {"threshold": 0.9, "log_interval_s": 0}},
            "legs": {"together": {demo.PLAIN: plain, "faster": row}}, "machine": {"cpus": 2, "vllm": "0.32.0"},
            "seconds": 480.0}


def test_the_demo_writes_and_prints_its_results_without_matplotlib(no_matplotlib, tmp_path, capsys):
    summary = demo_summary()
    demo.report(summary, tmp_path)
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "demo.json").read_text()) == summary
    assert all(line.strip() in printed for line in demo.format_table(summary))  # the table came out
    assert "demo.png not drawn: matplotlib is not installed" in printed and TOOLS_EXTRA in printed
    assert "Traceback" not in printed and not (tmp_path / "demo.png").exists()


@pytest.mark.parametrize("module", [demo, bench, serve_bench, oracle_report], ids=lambda m: m.__name__.split(".")[-1])
def test_no_command_draws_without_matplotlib(no_matplotlib, module, tmp_path, capsys):
    """``draw`` never calls the plot (it would fail on these empty results) and says why."""
    assert draw(module.plot, {}, tmp_path / "x.png") is None
    assert TOOLS_EXTRA in capsys.readouterr().out and not (tmp_path / "x.png").exists()


def test_quality_plots_are_skipped_with_one_line(no_matplotlib, tmp_path, capsys):
    quality_report.draw_plots({}, tmp_path)
    assert capsys.readouterr().out.count("matplotlib is not installed") == 1
    assert not list(tmp_path.iterdir())


def test_a_missing_package_is_named_with_its_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(SystemExit, match=r"ray is not installed \(the Ray Serve and Ray Data examples need it\): "
                                         r"pip install 'vllm-early-exit\[ray\]'"):
        require("ray")
