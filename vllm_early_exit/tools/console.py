"""The command line's console: the project's own lines on the terminal, the rest in a log file.

``python -m vllm_early_exit COMMAND`` runs inside :func:`session`. vLLM's engines are
spawned processes that inherit file descriptors 1 and 2, and compilers and C++
libraries write to them directly, so the session points both descriptors at
``<cache>/logs/COMMAND.log`` (``os.dup2``); Python's ``sys.stderr`` (logging,
warnings, vLLM's logger through ``VLLM_LOGGING_STREAM``, progress bars of
libraries) writes to descriptor 2 and lands there too. ``sys.stdout`` is moved
onto a copy of the terminal, so a tool's ``print`` still shows. ``-v`` (verbose)
leaves both descriptors alone: everything shows, as without the session (and so
does a caller that replaced ``sys.stdout`` or ``sys.stderr`` itself, such as pytest).

A tool reports its work as phases (:func:`phase`): one line each, ``starting plain
vLLM (compiling, about 60 s) ... 71 s``, with a live count of seconds and an
optional bar on a terminal. What code inside a phase prints goes to the log, so
the phase stays one line. Without a session (tests, scripts, the benchmarks'
own entry points) the same calls print plain lines to ``sys.stdout``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TextIO

LOG_TAIL_LINES = 30
"""Lines of the log shown on the terminal when a command fails."""


@dataclass
class _Session:
    command: str
    verbose: bool
    log_path: Path | None = None
    terminal: TextIO | None = None
    """Where the console writes: the terminal (a copy of descriptor 1 while it points at the log)."""
    saved: list[int] = field(default_factory=list)
    """Copies of the terminal's descriptors 1 and 2, to put back when a command fails."""


_session: _Session | None = None


def log_dir() -> Path:
    from vllm_early_exit.tools.assets import cache_dir

    return cache_dir() / "logs"


def log_path() -> Path | None:
    """The log file of the running command (None: no session, or ``-v``)."""
    return _session.log_path if _session is not None else None


def verbose() -> bool:
    return _session is None or _session.verbose


def _out() -> TextIO:
    if _session is not None and _session.terminal is not None:
        return _session.terminal
    return sys.stdout


def say(text: str = "") -> None:
    """One line of the command's own output (the terminal, also inside a phase)."""
    out = _out()
    out.write(text + "\n")
    out.flush()


def duration(seconds: float) -> str:
    """``48 s``, ``2 min 05 s``."""
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


@contextmanager
def session(command: str, verbose: bool = False) -> Iterator[None]:
    """Runs a command with vLLM's output and third-party warnings in ``<cache>/logs/COMMAND.log``.

    On a failure the descriptors go back to the terminal first, the log's last lines and
    its path are shown, and the exception goes on (its traceback then prints normally).
    A caller that has put its own ``sys.stdout`` or ``sys.stderr`` in place (a test's capture,
    a program that embeds the command) keeps them: the session then redirects nothing.
    """
    global _session
    if verbose or sys.stdout is not sys.__stdout__ or sys.stderr is not sys.__stderr__:
        _session = _Session(command, verbose=True)
        try:
            yield
        finally:
            _session = None
        return
    path = log_dir() / f"{command}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "w", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives until the process ends
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding=sys.stdout.encoding or "utf-8", errors="replace")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    # vLLM's logger writes to sys.stdout by default; in this process that is the terminal now.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    original_stdout = sys.stdout
    sys.stdout = terminal
    _session = _Session(command, verbose=False, log_path=path, terminal=terminal, saved=saved)
    say(f"log: {path} (vLLM's output and warnings; -v shows them here)")
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (None, 0):
            raise
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        sys.stdout = original_stdout
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            _show_tail(path, terminal)
        terminal.write(f"the full log: {path}\n")
        terminal.flush()
        raise
    finally:
        # Descriptors 1 and 2 stay on the log until the process ends: engines that stop at
        # interpreter exit log there too.
        _session = None


def _show_tail(path: Path, out: IO[str]) -> None:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return
    tail = [line for line in lines if line.strip()][-LOG_TAIL_LINES:]
    if tail:
        out.write(f"--- the last {len(tail)} lines of the log ---\n" + "\n".join(tail) + "\n---\n")


class Phase:
    """The handle of a running :func:`phase`: ``advance()`` moves its bar, ``done()`` sets the end note."""

    def __init__(self, text: str, total: int | None) -> None:
        self.text = text
        self.total = total
        self.count = 0
        self.result: str | None = None
        self.start = time.monotonic()

    def advance(self, steps: int = 1) -> None:
        self.count += steps

    def done(self, result: str) -> None:
        """What the line says at the end instead of the time alone (the time still follows)."""
        self.result = result

    def line(self, final: bool) -> str:
        """``text [bar] 3/6 ... 12 s`` while it runs; ``text ... result, 37 s`` at the end."""
        seconds = duration(time.monotonic() - self.start)
        if final:
            return f"{self.text} ... {self.result + ', ' if self.result else ''}{seconds}"
        bar = ""
        if self.total:
            filled = round(20 * min(self.count, self.total) / self.total)
            bar = f" [{'#' * filled}{'.' * (20 - filled)}] {self.count}/{self.total}"
        return f"{self.text}{bar} ... {seconds}"


@contextmanager
def phase(text: str, total: int | None = None) -> Iterator[Phase]:
    """One line for one phase of a command: ``text ... 12 s`` (with a bar of ``total`` steps).

    On a terminal the line counts the seconds as they pass. In a session (not ``-v``),
    what the code inside prints goes to the log. Nested phases print their own lines.
    """
    handle = Phase(text, total)
    out = _out()
    live = not verbose() and out.isatty()
    quiet = _session is not None and not _session.verbose
    stop = threading.Event()
    ticker = None
    if live:
        def tick() -> None:
            while not stop.wait(1.0):
                out.write("\r" + handle.line(final=False))
                out.flush()

        out.write(handle.line(final=False))
        out.flush()
        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
    elif quiet:
        out.write(f"{text} ...")  # completed on the same line below: nothing else writes here
        out.flush()
    else:
        say(f"{text} ...")
    original_stdout = sys.stdout
    if quiet:
        sys.stdout = sys.stderr  # the log
    try:
        yield handle
    except BaseException:
        if ticker is not None or quiet:
            out.write(" failed\n")
            out.flush()
        raise
    finally:
        sys.stdout = original_stdout
        stop.set()
        if ticker is not None:
            ticker.join()
    if live:
        out.write("\r" + handle.line(final=True) + "\033[K\n")
        out.flush()
    elif quiet:
        out.write(handle.line(final=True)[len(text) + len(" ..."):] + "\n")
        out.flush()
    else:
        say(handle.line(final=True))
