"""The benchmark scripts and tools name fruitdask's modules and functions directly; a refactor
that moves one (issue #33 moved VGG16 behind the runtime seam) must not leave a script that
fails only when someone runs it. Nothing is executed: every ``from fruitdask... import name``
must resolve, and every ``module.attr`` on an imported fruitdask module must exist.

Fails on the code before this test's commit: ``benchmarks/serve_bench.py`` and
``benchmarks/predict_latency.py`` called ``features.model.cached_model``, and
``benchmarks/cluster_lifecycle.py`` ``model.build_vgg16``, none of which existed any more."""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "benchmarks").glob("*.py")) + sorted((REPO / "tools").glob("*.py"))


def _unresolved(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    modules: dict[str, types.ModuleType] = {}
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fruitdask"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                value = getattr(module, alias.name, None)
                if value is None:
                    try:
                        value = importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{node.module}.{alias.name}")
                        continue
                if isinstance(value, types.ModuleType):
                    modules[alias.asname or alias.name] = value
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if not hasattr(modules[node.value.id], node.attr):
                missing.append(f"{node.value.id}.{node.attr}")
    return missing


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_fruitdask_name_a_script_uses_exists(path: Path) -> None:
    assert _unresolved(path) == [], f"{path.relative_to(REPO)} names what fruitdask no longer has"
