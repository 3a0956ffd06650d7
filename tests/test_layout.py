"""The shape of the CLI: the dispatcher is thin, commands never import it back, and
``--help`` stays light (issue #12). The package-wide guards (no import cycle, no function
over 60 lines) are in ``test_architecture.py``; this file reuses its import graph.
"""

from __future__ import annotations

import subprocess
import sys

from test_architecture import import_graph


def test_commands_never_import_the_dispatcher():
    graph = import_graph()
    offenders = sorted(m for m, deps in graph.items() if m.startswith("fruitdask.commands") and "fruitdask.cli" in deps)
    assert not offenders, f"{offenders} import fruitdask.cli: put what they share in fruitdask/commands/options.py"


def test_help_does_not_import_tensorflow():
    code = ("import sys\nfrom fruitdask import cli\ncli.build_parser()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'pyspark')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "[]"


def test_every_module_has_its_line_in_the_architecture_map():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "architecture.md").read_text()
    modules = sorted(str(p.relative_to(root)) for p in (root / "fruitdask").rglob("*.py"))
    # A package __init__ that is only its one-line docstring needs no line of its own.
    trivial = {m for m in modules if m.endswith("__init__.py") and len((root / m).read_text().splitlines()) <= 1}
    missing = [m for m in modules if f"`{m}`" not in text and m not in trivial]
    assert not missing, f"docs/architecture.md has no line for {missing}"
