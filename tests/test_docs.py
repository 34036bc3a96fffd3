"""The documentation cannot rot: every reference in README.md and docs/ must resolve.

Checked in every Markdown file of the manual (README.md, docs/*.md, benchmarks/results/HISTORY.md
and demo.md), against the repository and the code as they are at test time:

* relative links and images: the file exists, and a ``#anchor`` names a heading of the target;
* file paths in code (``vllm_early_exit/config.py``, ``benchmarks/results/speed.md``, ...);
* commands: ``python -m vllm_early_exit COMMAND --option`` (and ``vllm-early-exit``, and inline
  ``bench --resume``) name a command of ``__main__.COMMANDS`` and options its parser has;
* settings: the settings reference lists exactly ``config.FIELDS`` with their defaults, the
  signals, the policies and ``config.REQUEST_FIELDS``; every settings object in code (JSON or a
  Python dict, ``--early-exit-config``, ``additional_config``, ``extra_args``, ``vllm_xargs``)
  and every ``early_exit.KEY`` uses keys that exist;
* statistics: the counters table lists exactly ``ExitStats.to_dict()``; ``stats.NAME`` in code
  is an attribute of ``ExitStats``; ``vllm:early_exit_*`` metrics are defined in ``plugin/metrics.py``.

The first tests feed the checker broken documents, so it is known to fail when it should.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vllm_early_exit"


def manual_files(root: Path = ROOT) -> list[Path]:
    files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    files += [root / "benchmarks" / "results" / name for name in ("HISTORY.md", "demo.md")]
    return [f for f in files if f.exists()]


# --- reading Markdown ---------------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)


@dataclass
class Doc:
    path: Path
    text: str
    prose: str = ""
    """The text without fenced code blocks (where links live)."""
    code: list[str] = field(default_factory=list)
    """Fenced blocks and inline code spans, each with shell line continuations joined."""
    inline: list[str] = field(default_factory=list)
    """Inline code spans only."""

    @classmethod
    def read(cls, path: Path) -> "Doc":
        text = path.read_text(encoding="utf-8")
        blocks = [m.group(2) for m in FENCE.finditer(text)]
        prose = FENCE.sub("", text)
        inline = [m.group(2) for m in INLINE_CODE.finditer(prose)]
        code = [re.sub(r"\\\n\s*", " ", c) for c in blocks + inline]
        return cls(path, text, prose, code, inline)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(doc: Doc) -> set[str]:
    seen: dict[str, int] = {}
    found = set(HTML_ANCHOR.findall(doc.text))
    for match in HEADING.finditer(doc.prose):
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


# --- the checks -------------------------------------------------------------------------------


def check_links(doc: Doc, root: Path = ROOT) -> list[str]:
    problems = []
    targets = LINK.findall(doc.prose) + REFERENCE.findall(doc.prose)
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        target_path = (doc.path.parent / path_part).resolve() if path_part else doc.path
        if not target_path.exists():
            problems.append(f"{doc.path.name}: link to a missing file: {target}")
            continue
        if root not in target_path.parents and target_path != root:
            problems.append(f"{doc.path.name}: link outside the repository: {target}")
            continue
        if anchor:
            if target_path.suffix != ".md":
                problems.append(f"{doc.path.name}: anchor into a file that is not Markdown: {target}")
            elif anchor not in anchors(Doc.read(target_path)):
                problems.append(f"{doc.path.name}: missing anchor: {target}")
    return problems


PACKAGE_DIRS = {"model_executor": "", "plugin": "", "tools": "", "early_exit": "model_executor", "models": "model_executor"}
"""Paths starting with these name files of the package (``tools/cost.py``, ``early_exit/batch.py``),
under the folder given (or of vLLM's own tree, which docs/vllm_internals.md names the same way)."""


def repo_roots(root: Path = ROOT) -> tuple[str, ...]:
    """Top-level names of the repository that a path in the docs may start with."""
    names = {p.name for p in root.iterdir() if not p.name.startswith(".") or p.name == ".ci"}
    names -= {"build", "dist"}
    return tuple(sorted(names - {p.name for p in root.glob("*.egg-info")}))


def path_pattern(roots: Iterable[str]) -> re.Pattern:
    alternatives = "|".join(re.escape(r) for r in sorted(set(roots) | set(PACKAGE_DIRS), key=len, reverse=True))
    # not inside a longer path or word (site-packages/vllm/..., ~/.cache/...), nor a module (vllm_early_exit.tools)
    return re.compile(rf"(?<![\w./~$<-])((?:{alternatives})(?:/[\w.{{}},*-]*)+|(?:{alternatives})(?=[\s`'\"),;:]|$))")


def expand(path: str) -> list[str]:
    """``speed.{json,md}`` -> both names."""
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [p for option in match.group(1).split(",") for p in expand(path[: match.start()] + option + path[match.end():])]


def _vllm_dir() -> Path | None:
    from importlib.util import find_spec

    spec = find_spec("vllm")
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def check_paths(doc: Doc, root: Path = ROOT) -> list[str]:
    pattern = path_pattern(repo_roots(root))
    problems = []
    for code in doc.code:
        for match in pattern.finditer(code):
            raw = match.group(1).rstrip(".,:;")
            for path in expand(raw):
                # model_executor/..., plugin/..., tools/...: this package's, or vLLM's own (docs/vllm_internals.md)
                first = path.split("/")[0]
                bases = [root] if first not in PACKAGE_DIRS else [
                    base / PACKAGE_DIRS[first] for base in (root / "vllm_early_exit", _vllm_dir()) if base is not None]
                exists = any(
                    any(base.glob(path.rstrip("/"))) if "*" in path else (base / path).exists() for base in bases
                )
                if not exists:
                    problems.append(f"{doc.path.name}: path does not exist: {path}")
    return problems


COMMAND_LINE = re.compile(r"(?:python3? -m vllm_early_exit|vllm-early-exit)((?:[ \t]+[^\s|;&#>)]+)*)")
SHELL_END = {"|", "||", "&&", ";", "#", ">", ">>", "2>&1"}


def parser_options(parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def subparsers(parser) -> dict:
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def check_command(words: list[str], parser, where: str) -> list[str]:
    """``words`` after ``python -m vllm_early_exit``: top-level options, a command, its options."""
    commands = subparsers(parser)
    top = parser_options(parser)
    while words and words[0] in top:
        if words[0] in ("-h", "--help"):
            return []
        words = words[1:]
    if not words:
        return []
    name, options = words[0], words[1:]
    if name.isupper():  # a placeholder: python -m vllm_early_exit COMMAND
        return []
    if name not in commands:
        return [f"{where}: no such command: vllm_early_exit {name} (commands: {sorted(commands)})"]
    known = parser_options(commands[name])
    problems = []
    for word in options:
        if word in SHELL_END:
            break
        if word.startswith("--") and word.split("=")[0] not in known:
            problems.append(f"{where}: `{name}` has no option {word.split('=')[0]}")
    return problems


def check_commands(doc: Doc, parser) -> list[str]:
    problems = []
    for code in doc.code:
        for line in code.splitlines():
            for match in COMMAND_LINE.finditer(line):
                try:
                    words = shlex.split(match.group(1), comments=True)
                except ValueError:
                    words = match.group(1).split()
                problems += check_command(words, parser, doc.path.name)
    commands = subparsers(parser)
    for span in doc.inline:  # `bench --resume`: a command named with an option
        words = span.split()
        if len(words) >= 2 and words[0] in commands and words[1].startswith("--"):
            problems += check_command(words, parser, doc.path.name)
    return problems


def literal_objects(code: str) -> Iterable[tuple[str, dict]]:
    """Every JSON object or Python dict literal in ``code``, with the text before it."""
    for start in (i for i, ch in enumerate(code) if ch == "{"):
        depth = 0
        for end in range(start, len(code)):
            depth += {"{": 1, "}": -1}.get(code[end], 0)
            if depth == 0:
                text = code[start:end + 1]
                value = None
                for parse in (json.loads, ast.literal_eval):
                    try:
                        value = parse(text)
                        break
                    except (ValueError, SyntaxError, TypeError, RecursionError):
                        continue
                if isinstance(value, dict):
                    yield code[max(0, start - 40):start], value
                break


@dataclass(frozen=True)
class Vocabulary:
    """The names the docs may use, read from the code at test time."""

    settings: frozenset[str]
    request: frozenset[str]
    flat_request: frozenset[str]
    stats: frozenset[str]
    metrics_source: str

    @classmethod
    def of_code(cls) -> "Vocabulary":
        from vllm_early_exit import config
        from vllm_early_exit.model_executor.early_exit.stats import ExitStats

        stats = ExitStats(num_layers=2)
        names = set(stats.to_dict()) | {n for n in dir(stats) if not n.startswith("_")}
        return cls(
            settings=frozenset(f.name for f in config.FIELDS),
            request=frozenset(config.REQUEST_KEYS),
            flat_request=frozenset(config.FLAT_REQUEST_KEYS),
            stats=frozenset(names),
            metrics_source=(PACKAGE / "plugin" / "metrics.py").read_text(encoding="utf-8"),
        )


def check_settings_objects(doc: Doc, words: Vocabulary) -> list[str]:
    problems = []
    where = doc.path.name

    def keys_in(obj: dict, allowed: frozenset[str], what: str) -> None:
        unknown = sorted(str(k) for k in obj if k not in allowed)
        if unknown:
            problems.append(f"{where}: unknown {what} key(s) {unknown} in {json.dumps(obj, default=str)[:120]}")

    for code in doc.code:
        for before, obj in literal_objects(code):
            flat = [k for k in obj if isinstance(k, str) and k.startswith("early_exit_")]
            if flat:
                keys_in({k: obj[k] for k in flat}, words.flat_request, "per-request (flat)")
            inner = obj.get("early_exit")
            if isinstance(inner, dict):
                if "extra_args" in before:
                    keys_in(inner, words.request, "per-request")
                elif "additional_config" in before or "additional-config" in before:
                    keys_in(inner, words.settings, "early_exit setting")
                else:
                    keys_in(inner, words.settings | words.request, "early_exit")
            elif "early_exit" not in obj and not flat:
                if "early-exit-config" in before or any(k in words.settings for k in obj if isinstance(k, str)):
                    if not set(obj) & {"model", "prompt", "messages"}:  # an OpenAI request body is no settings object
                        keys_in(obj, words.settings, "early_exit setting")
    for key in re.findall(r"\bearly_exit\.([a-z_]+)\b", doc.text):
        if key not in words.settings | words.request:
            problems.append(f"{where}: no such setting: early_exit.{key}")
    return problems


def check_stats_and_metrics(doc: Doc, words: Vocabulary) -> list[str]:
    problems = []
    for code in doc.code:
        for name in re.findall(r"(?<![\w/])(?:stats|ExitStats)\.([a-z_]\w*)(?!\w)", code):
            if name == "py":  # a file, model_executor/early_exit/stats.py
                continue
            if name not in words.stats:
                problems.append(f"{doc.path.name}: ExitStats has no {name}")
    for name in re.findall(r"vllm:(early_exit_\w+)", doc.text):
        base = name.removesuffix("_total")
        if f'"vllm:{base}"' not in words.metrics_source and f"'vllm:{base}'" not in words.metrics_source:
            problems.append(f"{doc.path.name}: no such metric: vllm:{name}")
    return problems


def table_rows(doc: Doc, header: str) -> list[list[str]]:
    """The rows of the table whose header row starts with ``| header |``: cells, code marks removed."""
    lines = doc.prose.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.strip().startswith("|") and cells and cells[0] == header:
            rows = []
            for row in lines[i + 2:]:
                if not row.strip().startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return rows
    return []


def code_name(cell: str) -> str:
    match = re.match(r"`([^`]*)`", cell)
    return match.group(1) if match else cell


def check_reference_tables(settings_doc: Doc, stats_doc: Doc) -> list[str]:
    """The settings page against ``config`` and the statistics page against ``ExitStats``."""
    from vllm_early_exit import config
    from vllm_early_exit.model_executor.early_exit.stats import ExitStats

    problems = []

    def same(what: str, documented: list[str], code: Iterable[str]) -> None:
        documented_set, code_set = set(documented), set(code)
        if documented_set - code_set:
            problems.append(f"{what}: documented but not in the code: {sorted(documented_set - code_set)}")
        if code_set - documented_set:
            problems.append(f"{what}: in the code but not documented: {sorted(code_set - documented_set)}")
        if len(documented) != len(documented_set):
            problems.append(f"{what}: listed twice: {sorted(n for n in documented_set if documented.count(n) > 1)}")

    rows = table_rows(settings_doc, "key")
    same("settings table (config.FIELDS)", [code_name(r[0]) for r in rows], (f.name for f in config.FIELDS))
    defaults = {f.name: f.convert(f.default) for f in config.FIELDS}
    for row in rows:
        name = code_name(row[0])
        if name in defaults and len(row) > 1:
            default = defaults[name]
            expected = json.dumps(list(default) if isinstance(default, tuple) else default)
            if code_name(row[1]) != expected:
                problems.append(f"settings table: `{name}` default is {expected} in config.py, documented {row[1]!r}")
    same("signals table (config.SIGNALS)", [code_name(r[0]) for r in table_rows(settings_doc, "signal")],
         config.SIGNALS)
    same("policies table (config.POLICIES)", [code_name(r[0]) for r in table_rows(settings_doc, "policy")],
         config.POLICIES)
    request_rows = table_rows(settings_doc, "per-request key")
    same("per-request table (config.REQUEST_FIELDS)", [code_name(r[0]) for r in request_rows], config.REQUEST_KEYS)
    for row in request_rows:
        for f in config.REQUEST_FIELDS:
            if f.name == code_name(row[0]):
                if len(row) < 3 or code_name(row[1]) != f.flat:
                    problems.append(f"per-request table: `{f.name}` is `{f.flat}` in vllm_xargs, documented {row[1:2]}")
                elif code_name(row[2]) != json.dumps(f.default):
                    problems.append(f"per-request table: `{f.name}` default is {json.dumps(f.default)}, "
                                    f"documented {row[2]!r}")
    same("counters table (ExitStats.to_dict())", [code_name(r[0]) for r in table_rows(stats_doc, "counter")],
         ExitStats(num_layers=2).to_dict())
    return problems


def all_problems(root: Path = ROOT) -> list[str]:
    from vllm_early_exit.__main__ import build_parser

    parser = build_parser()
    words = Vocabulary.of_code()
    problems = []
    for path in manual_files(root):
        doc = Doc.read(path)
        problems += check_links(doc, root) + check_paths(doc, root) + check_commands(doc, parser)
        problems += check_settings_objects(doc, words) + check_stats_and_metrics(doc, words)
    problems += check_reference_tables(Doc.read(root / "docs" / "settings.md"), Doc.read(root / "docs" / "metrics.md"))
    return problems


# --- the checker fails when it should ---------------------------------------------------------


@pytest.fixture(scope="module")
def parser():
    from vllm_early_exit.__main__ import build_parser

    return build_parser()


def _doc(tmp_path: Path, text: str, name: str = "page.md") -> Doc:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return Doc.read(path)


def test_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Where it pays today\n", encoding="utf-8")
    good = _doc(tmp_path, "# Top\n\n[a](other.md) [b](other.md#where-it-pays-today) [c](#top) [d](https://x.org/y)\n")
    assert check_links(good, tmp_path) == []
    bad = _doc(tmp_path, "# Top\n\n[a](missing.md) [b](other.md#where-it-pays) [c](#nowhere) ![p](gone.png)\n",
               "bad.md")
    problems = check_links(bad, tmp_path)
    assert len(problems) == 4, problems
    assert any("missing.md" in p for p in problems) and any("gone.png" in p for p in problems)
    assert any("where-it-pays" in p for p in problems) and any("nowhere" in p for p in problems)
    # links inside code blocks are not links
    assert check_links(_doc(tmp_path, "```\n[a](missing.md)\n```\n", "code.md"), tmp_path) == []


def test_anchor_slugs_follow_github():
    assert slug("Where it pays today, and where it does not") == "where-it-pays-today-and-where-it-does-not"
    assert slug("`max_exit_batch`: batches and the step's depth") == "max_exit_batch-batches-and-the-steps-depth"
    assert slug("On a GPU (2026-12-04, H200)") == "on-a-gpu-2026-12-04-h200"


def test_checker_finds_missing_paths(tmp_path):
    doc = _doc(tmp_path, "See `vllm_early_exit/config.py`, `tools/cost.py`, `benchmarks/results/speed.{json,md}`,\n"
                         "`early_exit/kv_fill.py`, and `vllm_early_exit/no_such_module.py`, `benchmarks/results/nothing/`,\n"
                         "`early_exit/no_such_walker.py`.\n"
                         "```bash\n.venv/bin/python benchmarks/no_such_script.py --out /tmp/x\n```\n")
    problems = check_paths(doc)
    assert sorted(p.split(": ")[-1] for p in problems) == [
        "benchmarks/no_such_script.py", "benchmarks/results/nothing/", "early_exit/no_such_walker.py",
        "vllm_early_exit/no_such_module.py"]


def test_checker_finds_missing_commands_and_options(tmp_path, parser):
    doc = _doc(tmp_path, "```bash\npython -m vllm_early_exit demo --prompts 8\n"
                         ".venv/bin/python -m vllm_early_exit calibrate --signal head \\\n    --no-such-option 3\n"
                         "vllm-early-exit benchmark --fast   # a command that does not exist\n"
                         "python -m vllm_early_exit --help\n```\n"
                         "Run `bench --resume`, or `bench --restart`.\n")
    problems = check_commands(doc, parser)
    assert len(problems) == 3, problems
    assert any("--no-such-option" in p for p in problems)
    assert any("no such command: vllm_early_exit benchmark" in p for p in problems)
    assert any("--restart" in p for p in problems)


def test_checker_finds_unknown_settings_keys(tmp_path):
    words = Vocabulary.of_code()
    good = _doc(tmp_path, "```bash\nvllm serve M --early-exit-config '{\"signal\": \"max_prob\", \"threshold\": 0.9}'\n```\n"
                          "`LLM(m, additional_config={\"early_exit\": {\"threshold\": 0.9}})`, "
                          "`SamplingParams(extra_args={\"early_exit\": {\"max_layers\": 20}})`, "
                          "`{\"model\": \"M\", \"prompt\": \"x\", \"vllm_xargs\": {\"early_exit_threshold\": 0.99}}`\n")
    assert check_settings_objects(good, words) == []
    bad = _doc(tmp_path, "```bash\nvllm serve M --early-exit-config '{\"signal\": \"max_prob\", \"treshold\": 0.9}'\n```\n"
                         "`additional_config={\"early_exit\": {\"max_layers\": 20}}` (a request key at the engine), "
                         "`{\"vllm_xargs\": {\"early_exit_depth\": 3}}`, and `early_exit.exit_layer`.\n", "bad.md")
    problems = check_settings_objects(bad, words)
    assert len(problems) == 4, problems
    assert any("treshold" in p for p in problems) and any("max_layers" in p for p in problems)
    assert any("early_exit_depth" in p for p in problems) and any("early_exit.exit_layer" in p for p in problems)


def test_checker_finds_unknown_counters_and_tables(tmp_path):
    words = Vocabulary.of_code()
    doc = _doc(tmp_path, "```python\nstats.mean_layers\nstats.no_such_counter\n```\n"
                         "`vllm:early_exit_decode_tokens_total` and `vllm:early_exit_no_such_metric`\n")
    problems = check_stats_and_metrics(doc, words)
    assert len(problems) == 2 and "no_such_counter" in problems[0] and "no_such_metric" in problems[1], problems
    settings = _doc(tmp_path, "| key | default | meaning |\n|---|---|---|\n| `enabled` | `false` | x |\n"
                              "| `no_such_key` | `1` | x |\n", "settings.md")
    stats = _doc(tmp_path, "| counter | meaning |\n|---|---|\n| `mean_layers` | x |\n", "metrics.md")
    problems = check_reference_tables(settings, stats)
    assert any("no_such_key" in p for p in problems)
    assert any("`enabled` default is true" in p for p in problems)
    assert any("in the code but not documented" in p and "threshold" in p for p in problems)
    assert any("counters table" in p and "decode_tokens" in p for p in problems)


# --- the manual itself --------------------------------------------------------------------------


def test_manual_references_resolve():
    files = manual_files()
    assert ROOT / "README.md" in files and len(files) >= 8, files
    problems = all_problems()
    assert problems == [], "\n".join(problems)


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; the manual (docs/) holds the rest"
    head = "\n".join(lines[:15])
    # the two commands come first
    assert "bash scripts/setup.sh && .venv/bin/python -m vllm_early_exit demo" in head
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in head
    assert (ROOT / ".ci" / "run").read_text().count(".venv/bin/python -m pytest") == 1


def test_project_license_is_an_spdx_string():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["license"] == "Apache-2.0"  # a table is deprecated (setuptools warns)
