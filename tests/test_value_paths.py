"""The "Value paths" of docs/architecture.md stay true, and no stage re-reads a value from
the raw configuration once its carrier exists (pure AST, nothing imported).

Each hop of the section is ``N. `fruitdask/module.py:function` -> `name```: the function must
exist in that module (a function or a method) and reference ``name``, which is the next
hop's function or a class of the package (the typed carrier); the last hop of a path may
name something outside the package (PIL's ``resize``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
HOP = re.compile(r"^\d+\. `(?P<path>fruitdask/[\w/]+\.py):(?P<func>\w+)` -> `(?P<name>\w+)`\s*$")


def value_paths(text: str) -> dict[str, list[tuple[str, str, str]]]:
    """The section's paths: heading -> ``[(path, function, name), ...]``."""
    section = text.split("\n## Value paths\n", 1)[1].split("\n## ", 1)[0]
    paths: dict[str, list[tuple[str, str, str]]] = {}
    heading = None
    for line in section.splitlines():
        if line.startswith("### "):
            heading = line[4:].strip()
            paths[heading] = []
        elif (m := HOP.match(line)) and heading:
            paths[heading].append((m["path"], m["func"], m["name"]))
    return paths


def _defs(tree: ast.AST) -> dict[str, list[ast.AST]]:
    out: dict[str, list[ast.AST]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.setdefault(node.name, []).append(node)
    return out


def _names(node: ast.AST) -> set[str]:
    """Every name a function's source mentions: variables, attributes, annotations."""
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            found.add(n.id)
        elif isinstance(n, ast.Attribute):
            found.add(n.attr)
    return found


def _package_classes(root: Path) -> set[str]:
    return {n.name for p in (root / "fruitdask").rglob("*.py")
            for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))) if isinstance(n, ast.ClassDef)}


def broken_hops(text: str, root: Path = ROOT) -> list[str]:
    """What in the section no longer matches the source (empty when all is true)."""
    problems, classes, trees = [], _package_classes(root), {}
    for heading, hops in value_paths(text).items():
        if len(hops) < 2:
            problems.append(f"{heading}: fewer than two hops")
        for i, (path, func, name) in enumerate(hops):
            file = root / path
            if not file.is_file():
                problems.append(f"{heading} hop {i + 1}: no module {path}")
                continue
            tree = trees.setdefault(path, ast.parse(file.read_text(encoding="utf-8")))
            defs = _defs(tree).get(func)
            if not defs:
                problems.append(f"{heading} hop {i + 1}: no function {func} in {path}")
                continue
            if not any(name in _names(d) for d in defs):
                problems.append(f"{heading} hop {i + 1}: {path}:{func} does not reference {name}")
            last = i == len(hops) - 1
            following = hops[i + 1][1] if not last else None
            if not last and name != following and name not in classes and not _defined_function(root, name):
                problems.append(f"{heading} hop {i + 1}: {name} is neither the next hop ({following}) nor a carrier class")
    return problems


def _defined_function(root: Path, name: str) -> bool:
    return any(f"def {name}(" in p.read_text(encoding="utf-8") for p in (root / "fruitdask").rglob("*.py"))


def test_the_three_values_have_their_paths_in_the_architecture_doc():
    paths = value_paths(DOC.read_text(encoding="utf-8"))
    headings = " | ".join(paths)
    for value in ("Image size", "Weights", "Output"):
        assert value in headings, f"docs/architecture.md's Value paths lack {value}"
    assert sum(len(h) for h in paths.values()) >= 40


def test_every_hop_exists_and_hands_the_value_on():
    assert broken_hops(DOC.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("change", [
    ("`fruitdask/lake/tasks.py:featurize_part`", "`fruitdask/lake/tasks.py:featurize_partition`"),  # renamed
    ("`fruitdask/checkpoint.py:featurize_checkpointed` -> `featurize_frame`",
     "`fruitdask/checkpoint.py:featurize_checkpointed` -> `featurize_frame_with`"),  # the next hop renamed
    ("`fruitdask/features/frames.py:featurize_frame`", "`fruitdask/features/gone.py:featurize_frame`"),  # moved away
])
def test_a_renamed_or_removed_hop_is_caught(change):
    old, new = change
    text = DOC.read_text(encoding="utf-8")
    assert old in text
    assert broken_hops(text.replace(old, new))


def test_a_hop_removed_from_the_source_is_caught(tmp_path):
    """The same section over a copy of the package where one hop's function is gone."""
    import shutil

    shutil.copytree(ROOT / "fruitdask", tmp_path / "fruitdask")
    ckpt = tmp_path / "fruitdask" / "checkpoint.py"
    ckpt.write_text(ckpt.read_text(encoding="utf-8").replace("def featurize_checkpointed(", "def featurize_cached("),
                    encoding="utf-8")
    assert any("featurize_checkpointed" in p for p in broken_hops(DOC.read_text(encoding="utf-8"), tmp_path))


#: Raw configuration fields that have a carrier once resolved, and the only functions that
#: may still read them (where the carrier is built, or before it exists).
RAW_READS_ALLOWED = {
    "image_size": {"fruitdask/features/settings.py:from_config"},
    "pooling": {"fruitdask/features/settings.py:from_config"},
    "batch_size": {"fruitdask/features/settings.py:from_config"},
    "output": {"fruitdask/pipeline.py:output_target", "fruitdask/commands/run.py:execute"},
}
#: The modules a run's values pass through after the edge (commands/options and config build them).
RUN_MODULES = ["fruitdask/pipeline.py", "fruitdask/checkpoint.py", "fruitdask/output/record.py",
               "fruitdask/output/publish.py", "fruitdask/commands/run.py",
               "fruitdask/features/settings.py", "fruitdask/features/frames.py", "fruitdask/features/model.py",
               "fruitdask/lake/tasks.py", "fruitdask/lake/update.py", "fruitdask/backends/__init__.py",
               "fruitdask/backends/base.py", "fruitdask/backends/dask/backend.py", "fruitdask/backends/dask/cluster.py",
               "fruitdask/backends/dask/preload.py", "fruitdask/backends/spark/backend.py"]


def _raw_reads(path: str) -> list[tuple[str, str]]:
    """``(function, field)`` for each ``cfg.<field>`` / ``self.cfg.<field>`` read in ``path``."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for n in ast.walk(fn):
            if (isinstance(n, ast.Attribute) and n.attr in RAW_READS_ALLOWED
                    and ((isinstance(n.value, ast.Name) and n.value.id == "cfg")
                         or (isinstance(n.value, ast.Attribute) and n.value.attr == "cfg"))):
                found.append((fn.name, n.attr))
    return found


def test_no_stage_rereads_a_resolved_value_from_the_raw_configuration():
    bad = [f"{path}:{fn} reads cfg.{field}" for path in RUN_MODULES for fn, field in _raw_reads(path)
           if f"{path}:{fn}" not in RAW_READS_ALLOWED[field]]
    assert bad == [], "use the carrier (FeatureSettings, OutputTarget) instead: " + "; ".join(bad)


def test_the_weights_travel_typed():
    """No ``Any`` and no ``hasattr`` on the weights' way to the model."""
    for path, fn in [("fruitdask/features/model.py", "cached_runtime"), ("fruitdask/features/frames.py", "featurize_frame"),
                     ("fruitdask/checkpoint.py", "featurize_checkpointed"), ("fruitdask/lake/tasks.py", "featurize_part")]:
        (node,) = _defs(ast.parse((ROOT / path).read_text(encoding="utf-8")))[fn]
        names = _names(node)
        assert "hasattr" not in names, f"{path}:{fn} tells the weights apart with hasattr"
        args = {a.arg: a.annotation for a in node.args.args}
        weights = args.get("weights") or args.get("job")
        assert weights is not None and ast.unparse(weights) in ("WeightsSource", "FeaturizeJob"), f"{path}:{fn}"
