"""``make test`` type-checks the commands and the modules they call (``[tool.mypy]`` in
pyproject.toml): a changed signature fails there, not in a user's shell.

The #30 crash, replayed: ``fruitdask table`` called ``storage_settings(args, args.output,
args.output)`` after the helper had become ``storage_settings(args)``; every ``table`` action
died with a TypeError and no test ran it. mypy, as ``make test`` runs it, refuses that call.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _mypy(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    src = tmp_path / "caller.py"
    src.write_text("import argparse\n\nfrom fruitdask.commands.options import storage_settings\n\n\n"
                   "def command(args: argparse.Namespace) -> None:\n" + body)
    return subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports",
                           "--no-incremental", "--python-version", "3.10", str(src)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_mypy_refuses_the_call_that_crashed_table(tmp_path: Path) -> None:
    bad = _mypy(tmp_path, "    storage_settings(args, args.output, args.output)\n")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert 'Too many arguments for "storage_settings"' in bad.stdout
    good = _mypy(tmp_path, "    storage_settings(args)\n")
    assert good.returncode == 0, good.stdout + good.stderr


def test_make_test_runs_mypy_over_the_commands() -> None:
    recipe = (REPO / "Makefile").read_text().split("\ntest: install-test\n", 1)[1].split("\n\n", 1)[0]
    assert "$(PY) -m mypy" in recipe and recipe.index("mypy") < recipe.index("pytest")
    config = (REPO / "pyproject.toml").read_text().split("[tool.mypy]", 1)[1]
    assert '"fruitdask/commands"' in config.split("\n[", 1)[0]
