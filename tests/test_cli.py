"""The command line: ``--help`` of every command, and the console that keeps vLLM's output in a log.

Fast (seconds): the console is checked in a real subprocess that spawns a child process (as vLLM
spawns its engines), logs through vLLM's logger, warns, and writes to file descriptors 1 and 2.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vllm_early_exit.__main__ import COMMANDS, PROG, build_parser

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_help_lists_every_command_on_one_line():
    result = _run([sys.executable, "-m", "vllm_early_exit", "--help"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name, command in COMMANDS.items():
        mine = [line for line in lines if line.split()[:1] == [name]]
        assert len(mine) == 1, f"{name}: {mine}"
        assert command.summary in mine[0] and len(mine[0]) <= 100, mine[0]
    assert "-v, --verbose" in result.stdout


def test_the_installed_script_is_the_same_command_line():
    script = Path(sys.executable).parent / "vllm-early-exit"
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e . installs it)")
    result = _run([str(script), "--help"])
    assert result.returncode == 0 and "fetch-model" in result.stdout, result.stderr


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_with_examples_that_parse(name, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as done:
        parser.parse_args([name, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: {PROG} {name}" in text
    assert "example" in text and "-v, --verbose" in text
    for example in COMMANDS[name].examples:
        assert f"{PROG} {example}" in text
        args = parser.parse_args(shlex.split(example))  # every example is a valid command line
        assert args.command == name


CHILD = textwrap.dedent("""
    import logging, multiprocessing, os, sys, warnings

    def child():
        print("child stdout line", flush=True)
        print("child stderr line", file=sys.stderr, flush=True)

    if __name__ == "__main__":
        from vllm_early_exit.tools import console
        with console.session("clitest", verbose="-v" in sys.argv):
            print("own line from print")
            with console.phase("starting an engine (compiling, about 1 s)") as step:
                print("printed inside a phase")
                os.write(1, b"raw write to descriptor 1\\n")
                os.write(2, b"raw write to descriptor 2\\n")
                warnings.warn("a third-party warning")
                if "--light" not in sys.argv:  # importing vLLM takes seconds: once is enough
                    from vllm.logger import init_logger
                    init_logger("vllm.clitest").warning("a line of vLLM's logger")
                p = multiprocessing.get_context("spawn").Process(target=child)
                p.start(); p.join()
                step.done("ready")
            console.say("the result table")
            if "--fail" in sys.argv:
                raise RuntimeError("the engine died")
""")

NOISE = ("printed inside a phase", "raw write to descriptor 1", "raw write to descriptor 2",
         "a third-party warning", "a line of vLLM's logger", "child stdout line", "child stderr line")


@pytest.fixture(scope="module")
def child_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("console") / "child.py"
    path.write_text(CHILD)
    return path


def test_console_keeps_the_engines_output_in_the_log(child_script, tmp_path):
    result = _run([sys.executable, str(child_script)], env={"VLLM_EARLY_EXIT_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    log = tmp_path / "logs" / "clitest.log"
    shown = result.stdout + result.stderr
    assert f"log: {log}" in result.stdout
    assert "own line from print" in result.stdout and "the result table" in result.stdout
    assert "starting an engine (compiling, about 1 s) ... ready, " in result.stdout
    for line in NOISE:
        assert line not in shown, f"{line!r} reached the terminal:\n{shown}"
        assert line in log.read_text(), f"{line!r} is not in the log"
    assert len(result.stdout.splitlines()) == 4, result.stdout


def test_verbose_shows_everything(child_script, tmp_path):
    result = _run([sys.executable, str(child_script), "-v", "--light"], env={"VLLM_EARLY_EXIT_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    shown = result.stdout + result.stderr
    for line in [*NOISE[:4], *NOISE[5:], "own line from print", "the result table"]:
        assert line in shown, f"{line!r} is missing with -v"
    assert not (tmp_path / "logs" / "clitest.log").exists()


def test_a_failing_command_shows_the_log_tail(child_script, tmp_path):
    result = _run([sys.executable, str(child_script), "--fail", "--light"],
                  env={"VLLM_EARLY_EXIT_CACHE": str(tmp_path)})
    assert result.returncode != 0
    log = tmp_path / "logs" / "clitest.log"
    assert "lines of the log" in result.stdout and "child stdout line" in result.stdout
    assert f"the full log: {log}" in result.stdout
    assert "RuntimeError: the engine died" in result.stderr  # the traceback reaches the terminal


def test_demo_table_and_plot(tmp_path):
    from vllm_early_exit.tools import demo

    def row(ratio: float, agreement: float, layers: float, unchecked: int = 0) -> dict:
        return {"tokens_per_s": 100 * ratio, "ratio": ratio, "mean_layers": layers, "unchecked_steps": unchecked,
                "token_agreement": agreement, "identical_outputs": agreement ** 8, "prefix_agreement": agreement}

    legs = {
        "together": {"plain vLLM": row(1.0, 1.0, 30), "calibrated": row(1.01, 1.0, 30, 127),
                     "faster": row(0.87, 0.85, 24.1)},
        "alone": {"plain vLLM": row(1.0, 1.0, 30), "calibrated": row(0.99, 0.99, 29.6),
                  "faster": row(1.15, 0.86, 23.6)},
    }
    summary = {"model": "SmolLM2-135M-Instruct", "prompts": 32, "alone": 4, "max_tokens": 64, "legs": legs,
               "machine": {"cpus": 2, "vllm": "0.32.0"}}
    lines = demo.format_table(summary)
    assert len(lines) == 2 + 2 * 4
    assert "127 steps unchecked" in lines[4] and lines[9].split()[:3] == ["faster", "115.0", "1.150x"]
    demo.plot(summary, tmp_path / "demo.png")
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    described = demo.describe({**demo.CALIBRATED, "shortlist": "/x.json"})
    assert described == "max_prob >= 0.995 after layers 26, 28, per_token, shortlist, max_exit_batch 2"
