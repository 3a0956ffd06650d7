"""The docs cannot drift from the commands (issue #30).

Every command line the documentation shows a user (fenced code blocks and inline code spans
of README.md, docs/**/*.md and k8s/README.md) that starts with ``fruitdask``, ``python -m
fruitdask`` or ``make`` is checked against the real parser of :mod:`fruitdask.cli` and the
Makefile's targets: the sub-command exists, every flag exists on that sub-command, every
value of a flag or positional with choices is one of them. Placeholders (``OUTPUT``,
``DIR_OR_URI``, ``...``, ``[options]``, ``$VAR``, ``<name>``) are accepted where a value goes,
``a|b|c`` alternatives are checked one by one. The top-level ``--help`` is checked against
what ``run`` does today.
"""

from __future__ import annotations

import argparse
import functools
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fruitdask import cli

ROOT = Path(__file__).resolve().parents[1]
#: Tokens that stand for "more of the same" or "the other options": nothing to check.
ELISIONS = {"...", "…", "[options]", "[...]", "[…]"}
#: A value that names what goes there rather than being it: OUTPUT, $VERSION, <release>, ...
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*|\$.*|<[^>]*>|.*(\.\.\.|…).*")
#: Shell operators that separate one command from the next on a line.
SEPARATORS = {"&&", "||", ";", "|"}
#: ``--flag``, ``--flag value``, ``--flag=value``, and several of them: a span of prose checked as flags.
FLAG_SPAN = re.compile(r"--[a-z][a-z0-9-]*(=\S+| (?!-)\S+)?( --[a-z][a-z0-9-]*(=\S+| (?!-)\S+)?)*")
FENCE = re.compile(r"^\s*(```|~~~)")
SPAN = re.compile(r"(?<!`)`([^`]+)`(?!`)")


@dataclass(frozen=True)
class DocCommand:
    """One command line of a document: where it is, and its words."""

    where: str  # path:line, with " (inline)" for a code span of prose or a table
    text: str
    words: tuple[str, ...]  # from ``fruitdask``/``make`` on, environment assignments dropped


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "k8s" / "README.md"]


# --- collecting ---------------------------------------------------------------------------


def collect(path: Path) -> list[DocCommand]:
    """The fruitdask and make commands of one Markdown file, fenced and inline."""
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    found: list[DocCommand] = []
    for lineno, text in _fenced_lines(path):
        found += _commands(f"{rel}:{lineno}", text, comments=True)
    for lineno, text in _inline_spans(path):
        found += _commands(f"{rel}:{lineno} (inline)", text, comments=False) or _flag_span(f"{rel}:{lineno} (inline)", text)
    return found


def _flag_span(where: str, text: str) -> list[DocCommand]:
    """A span such as ``--backend dask|spark`` in prose, when some sub-command has that flag
    (flags of other tools, ``docker --network``, are theirs to check)."""
    if not FLAG_SPAN.fullmatch(text):  # a quoted message such as `--output 's3://b' is a bucket root` is no command
        return []
    words = text.split()
    if not any(words[0].partition("=")[0] in p._option_string_actions for p in _subparsers().values()):
        return []
    return [DocCommand(where, text, ("<flag>", *words))]


def _fenced_lines(path: Path) -> list[tuple[int, str]]:
    """Lines inside ``` fences, ``\\`` continuations joined, a leading ``$ `` prompt dropped."""
    out: list[tuple[int, str]] = []
    fenced, pending, start = False, "", 0
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced, pending = not fenced, ""
            continue
        if not fenced:
            continue
        if not pending:
            start, line = lineno, re.sub(r"^\s*\$ ", "", line)
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def _inline_spans(path: Path) -> list[tuple[int, str]]:
    """Code spans outside fences, found per paragraph (a span may wrap onto the next line);
    ``\\|`` (a pipe escaped inside a table cell) is a plain ``|``."""
    out: list[tuple[int, str]] = []
    paragraph: list[tuple[int, str]] = []
    fenced = False
    for lineno, line in [*enumerate(path.read_text().splitlines(), 1), (0, "")]:
        if FENCE.match(line):
            fenced = not fenced
        if fenced or FENCE.match(line) or not line.strip():
            text = " ".join(t for _, t in paragraph)
            for m in SPAN.finditer(text):
                out.append((_line_of(paragraph, m.start()), m.group(1).replace("\\|", "|")))
            paragraph = []
            continue
        paragraph.append((lineno, line))
    return out


def _line_of(paragraph: list[tuple[int, str]], offset: int) -> int:
    """The line number of character ``offset`` of the paragraph's joined text."""
    for lineno, text in paragraph:
        if offset <= len(text):
            return lineno
        offset -= len(text) + 1
    return paragraph[-1][0]


def _commands(where: str, text: str, *, comments: bool) -> list[DocCommand]:
    """The commands of one shell line that start with fruitdask, python -m fruitdask or make."""
    if not re.match(r"\s*(\$ )?([A-Za-z_][A-Za-z0-9_]*=\S* )*(fruitdask|python[0-9.]* -m fruitdask|make)(?=\s|$)", text):  # not "fruitdask: error: ..."
        return []
    try:
        words = shlex.split(text, comments=comments)
    except ValueError as e:  # an unbalanced quote: reported, never skipped
        return [DocCommand(where, text, ("<unparsable>", str(e)))]
    found, segment = [], []
    for word in [*words, "&&"]:
        if word not in SEPARATORS:
            segment.append(word)
            continue
        while segment and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", segment[0]):
            segment.pop(0)  # AWS_PROFILE=x python -m fruitdask ...
        if len(segment) >= 3 and re.fullmatch(r"python[0-9.]*", segment[0]) and segment[1:3] == ["-m", "fruitdask"]:
            segment = segment[2:]
        if segment and segment[0] in ("fruitdask", "make"):
            found.append(DocCommand(where, text.strip(), tuple(segment)))
        segment = []
    return found


# --- checking -----------------------------------------------------------------------------


def problems(cmd: DocCommand) -> list[str]:
    """What in ``cmd`` the parser (or the Makefile) does not have; empty when it is right."""
    head, *rest = cmd.words
    if head == "<unparsable>":
        return [f"cannot split the line: {rest[0]}"]
    if head == "make":
        return _make_problems(rest)
    if head == "<flag>":
        return _flag_problems(rest)
    return _fruitdask_problems(rest)


def _fruitdask_problems(words: list[str]) -> list[str]:
    words = [w for w in (_unbracket(w) for w in _join_angles(words)) if w and w not in ELISIONS]
    if not words or words[0].startswith("-"):
        return _option_problems(cli.build_parser(), words, "fruitdask")
    found = []
    for name in words[0].split("|"):
        if name not in cli.COMMAND_MODULES:
            found.append(f"no sub-command {name!r} (fruitdask has {', '.join(cli.COMMAND_MODULES)})")
        else:
            found += _option_problems(_subparser(name), words[1:], f"fruitdask {name}")
    return found


@functools.cache
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    """Every sub-command's parser, by name, as ``python -m fruitdask NAME`` builds it."""
    parsers = {}
    for name in cli.COMMAND_MODULES:
        parser = cli.build_parser(name)
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parsers[name] = action.choices[name]
    return parsers


def _subparser(name: str) -> argparse.ArgumentParser:
    return _subparsers()[name]


def _flag_problems(words: list[str]) -> list[str]:
    """A flag named alone in prose: right if one sub-command with that flag takes these values."""
    flag = words[0].partition("=")[0]
    checks = [_option_problems(p, words, f"fruitdask {n}") for n, p in _subparsers().items() if flag in p._option_string_actions]
    return [] if any(not c for c in checks) else checks[0]


def _option_problems(parser: argparse.ArgumentParser, words: list[str], prog: str) -> list[str]:
    """Flags, their values and the positionals of one (sub-)parser."""
    found: list[str] = []
    positionals = list(parser._get_positional_actions())
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word.startswith("-") and len(word) > 1 and not re.fullmatch(r"-[0-9.]+", word):
            flag, eq, value = word.partition("=")
            action = parser._option_string_actions.get(flag)
            if action is None:
                found.append(f"{prog} has no flag {flag}")
                if not eq and i < len(words) and not words[i].startswith("-"):
                    i += 1  # its value, most likely: not a stray positional
                continue
            if action.nargs == 0:
                if eq:
                    found.append(f"{prog} {flag} takes no value")
                continue
            if not eq and i < len(words):
                value, i = words[i], i + 1
            found += _choice_problems(action, value, f"{prog} {flag}")
        elif not positionals:
            found.append(f"{prog} takes no argument {word!r}")
        else:
            action = positionals[0]
            if action.nargs not in ("+", "*"):
                positionals.pop(0)
            found += _choice_problems(action, word, f"{prog} {action.metavar or action.dest}")
    return found


def _choice_problems(action: argparse.Action, value: str, what: str) -> list[str]:
    if not action.choices or not value:
        return []
    return [f"{what}: {alt!r} is not one of {', '.join(map(str, action.choices))}"
            for alt in value.split("|") if alt not in action.choices and not PLACEHOLDER.fullmatch(alt)]


def _join_angles(words: list[str]) -> list[str]:
    """``<the same file>`` is one placeholder, not three words."""
    out: list[str] = []
    for word in words:
        if out and out[-1].startswith("<") and ">" not in out[-1]:
            out[-1] += " " + word
        else:
            out.append(word)
    return out


def _unbracket(word: str) -> str:
    """``[--top`` and ``3]`` of an optional part ``[--top 3]`` are ``--top`` and ``3``."""
    return word if word in ELISIONS else word.lstrip("[").rstrip("]")


def make_targets() -> set[str]:
    """The Makefile's targets (pattern and variable-named ones left out)."""
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([^\s#:=][^:=]*):(?!=)", line)
        if m and not line.startswith(("\t", ".")):
            targets.update(t for t in m.group(1).split() if "$" not in t and "%" not in t)
    return targets


def _make_problems(words: list[str]) -> list[str]:
    targets = make_targets()
    return [f"the Makefile has no target {w!r} (it has {', '.join(sorted(targets))})"
            for w in words if not w.startswith("-") and "=" not in w and w not in ELISIONS and w not in targets]


def check(paths: list[Path]) -> tuple[list[DocCommand], list[str]]:
    """Every command of ``paths``, and one line per problem: ``path:line: problem: the line``."""
    commands = [c for p in paths for c in collect(p)]
    report = [f"{c.where}: {p}: {c.text}" for c in commands for p in problems(c)]
    return commands, report


# --- the tests ----------------------------------------------------------------------------


def test_every_documented_command_matches_the_parser_and_the_makefile():
    commands, report = check(doc_files())
    assert not report, "commands in the docs that the CLI or the Makefile does not have:\n" + "\n".join(report)
    # The collector must not go blind: it finds commands of every kind, fenced and inline,
    # and every sub-command of the CLI is shown somewhere.
    assert len(commands) >= 250, len(commands)
    assert sum("(inline)" not in c.where for c in commands) >= 25
    assert sum(c.words[0] == "make" for c in commands) >= 15
    assert sum(c.text.startswith("python -m fruitdask") for c in commands) >= 25
    assert sum(c.words[0] == "fruitdask" and "--" in " ".join(c.words) for c in commands) >= 30
    assert sum(c.words[0] == "<flag>" for c in commands) >= 150
    shown = {c.words[1] for c in commands if c.words[0] == "fruitdask" and len(c.words) > 1}
    assert set(cli.COMMAND_MODULES) <= {n for s in shown for n in s.split("|")}


def test_the_checker_reports_a_misspelled_flag_a_bad_choice_and_a_missing_target(tmp_path):
    """Drift is caught: a planted misspelled flag, an unknown sub-command, a wrong choice, a
    Makefile target that does not exist and a flag of another command, each reported with its
    file and line, in a fenced block (continuation, prompt, comment) and in an inline span;
    while the same commands spelled right pass."""
    doc = tmp_path / "planted.md"
    doc.write_text(
        "Some prose with `fruitdask table history OUT --limt 3` inline.\n\n"
        "```sh\n"
        "$ fruitdask table history OUT --limit 3     # right\n"
        "AWS_PROFILE=x python -m fruitdask run --input s3://b/in \\\n"
        "    --outptu OUT --pooling none\n"
        "python -m fruitdask featurize --input DIR   # no such command\n"
        "fruitdask table history|show|purge OUTPUT\n"
        "fruitdask run --backend ray\n"
        "make image && make deploy\n"
        "fruitdask serve --model M --top 3 --limit 2\n"
        "```\n"
        "| a | table cell: `fruitdask table history\\|show OUTPUT` |\n"
    )
    commands, report = check([doc])
    assert len(commands) == 10, commands
    expected = [
        "planted.md:5: fruitdask run has no flag --outptu",
        "planted.md:7: no sub-command 'featurize'",
        "planted.md:8: fruitdask table action: 'purge' is not one of history, vacuum, compact, show",
        "planted.md:9: fruitdask run --backend: 'ray' is not one of dask, spark",
        "planted.md:10: the Makefile has no target 'deploy'",
        "planted.md:11: fruitdask serve has no flag --limit",
        "planted.md:1 (inline): fruitdask table has no flag --limt",
    ]
    assert len(report) == len(expected), "\n".join(report)
    for line, want in zip(report, expected, strict=True):
        assert line.startswith(f"{tmp_path}/{want}"), (line, want)


def test_top_level_help_describes_what_run_does_today(tmp_path):
    """Fails on the code before this change: its description was 'reduce with
    IncrementalPCA, write Parquet'."""
    proc = subprocess.run([sys.executable, "-m", "fruitdask", "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "Parquet" not in text
    for words in ("Delta table", "new or changed images", "VGG16", "Dask or Spark", "PCA", "one commit", "EU regions"):
        assert words in text, (words, text)
    for name in cli.COMMAND_MODULES:
        assert name in text
