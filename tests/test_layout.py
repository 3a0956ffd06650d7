"""The shape of the package: the CLI is thin and imports flow one way (issue #12).

Every ``import`` counts, function-level ones included: a lazy import still makes a cycle,
only a later one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fruitdask

PACKAGE = Path(fruitdask.__file__).resolve().parent
#: Where no import cycle may start (the rest of the package is checked by its owners).
ACYCLIC = ("fruitdask.cli", "fruitdask.commands", "fruitdask.bench", "fruitdask.storage")


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _import_graph() -> dict[str, set[str]]:
    """Module -> the fruitdask modules it imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A path of imports from ``start`` back to itself, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_commands_never_import_the_dispatcher():
    graph = _import_graph()
    offenders = sorted(m for m, deps in graph.items() if m.startswith("fruitdask.commands") and "fruitdask.cli" in deps)
    assert not offenders, f"{offenders} import fruitdask.cli: put what they share in fruitdask/commands/options.py"


def test_no_import_cycles_in_the_cli_commands_bench_and_storage():
    graph = _import_graph()
    cycles = [c for m in sorted(graph) if m.startswith(ACYCLIC) and (c := _cycle_from(m, graph))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_help_does_not_import_tensorflow():
    code = ("import sys\nfrom fruitdask import cli\ncli.build_parser()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'pyspark')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "[]"
