"""Guards on the shape of the package, read from its source (pure AST, nothing imported).

* No function or method longer than :data:`MAX_FUNCTION_LINES` lines, from its ``def``
  line to its last line.
* No import cycle between ``fruitdask`` modules, counting every import anywhere in a module:
  at module level and inside functions (lazy imports too), relative ones resolved,
  ``from pkg import submodule`` counted as an import of the submodule, and a package's
  ``__init__`` importing its own submodules counted like any other module.
* Layers import only downwards: every such import goes to a module of the same layer or of
  a lower one in :data:`LAYERS` (docs/architecture.md, "Layers"), unless
  :data:`ALLOWED_UPWARD` names it with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fruitdask"
MAX_FUNCTION_LINES = 60


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, str, int]]:
    """``(file, def line, qualified name, length)`` of each function longer than ``limit``."""
    found = []

    def visit(node: ast.AST, prefix: str, rel: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                length = child.end_lineno - child.lineno + 1
                if length > limit:
                    found.append((rel, child.lineno, name, length))
                visit(child, f"{name}.", rel)
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.", rel)
            else:
                visit(child, prefix, rel)

    for path in _modules().values():
        visit(_tree(path), "", str(path.relative_to(PACKAGE.parent)))
    return sorted(found)


def _resolve(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The package modules an import statement of ``module`` loads."""

    def owner(name: str) -> str | None:  # the longest known module that ``name`` lies in
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Import):
        targets = {owner(alias.name) for alias in node.names}
    else:
        if node.level:
            base = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        targets = set()
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            targets.add(sub if sub in known else owner(source))
    return {t for t in targets if t}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in its body."""
    modules = _modules(package)
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _resolve(node, name, is_package, known)
        graph[name] = edges - {name}
    return graph


#: The layers, bottom to top: a module imports modules of its own layer or of lower ones,
#: never of a higher one. A module's layer is that of the longest entry that names it or a
#: package above it; the root package's entry (``fruitdask``: its ``__version__``) names
#: only itself, so a new top-level module must be placed here.
LAYERS: dict[str, int] = {
    # 0 base: what every layer may use
    "fruitdask": 0,
    "fruitdask.errors": 0,
    "fruitdask.logs": 0,
    "fruitdask.config": 0,
    "fruitdask.progress": 0,
    "fruitdask.runinfo": 0,
    "fruitdask.catalogue": 0,
    # 1 storage: the only layer that knows fsspec/s3fs, and the tables' schema
    "fruitdask.storage": 1,
    "fruitdask.schema": 1,
    # 2 stages: pure transforms every engine calls (featurize, reduce: the PCA estimator, its strategies, its result)
    "fruitdask.features": 2,
    "fruitdask.reduce": 2,
    "fruitdask.pca_moments": 2,
    "fruitdask.pca_streamed": 2,
    "fruitdask.reduction": 2,
    # 3 the output: the features table, checkpoints, the run's files, names, record and publishing
    "fruitdask.lake": 3,
    "fruitdask.checkpoint": 3,
    "fruitdask.output": 3,
    # 4 engines: where the stages run (Dask, Spark)
    "fruitdask.backends": 4,
    # 5 the report of a run: above the engines, so no backend draws or builds it
    "fruitdask.report": 5,
    # 6 what drives a run or reads one back; the pipeline hands the output's publish the
    # report's drawings because they are published inside the output's lock, before ``_SUCCESS``
    "fruitdask.pipeline": 6,
    "fruitdask.classifier": 6,
    # 7 long-running uses of them
    "fruitdask.bench": 7,
    "fruitdask.serve": 7,
    # 8 entry points: the CLI, its commands, ``python -m`` modules
    "fruitdask.commands": 8,
    "fruitdask.cli": 8,
    "fruitdask.__main__": 8,
    "fruitdask.bench.__main__": 8,
}
LAYER_NAMES = ("base", "storage", "stages", "output", "engines", "report", "run", "services", "entry points")

#: ``(importer, imported) -> reason`` for an upward import that must stay; keep it short.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def layer_of(module: str, layers: dict[str, int] = LAYERS) -> int | None:
    """The layer of ``module``: its longest entry in ``layers`` (a top-level entry names only itself)."""
    name = module
    while name:
        if name in layers and ("." in name or name == module):
            return layers[name]
        name = name.rpartition(".")[0]
    return None


def upward_imports(
    graph: dict[str, set[str]], layers: dict[str, int] = LAYERS, allowed: dict[tuple[str, str], str] | None = None
) -> list[tuple[str, int, str, int]]:
    """``(importer, its layer, imported, its layer)`` for each import into a higher layer
    not in ``allowed`` (modules without a layer are :func:`unlayered`'s business)."""
    allowed = ALLOWED_UPWARD if allowed is None else allowed
    found = []
    for module, targets in graph.items():
        low = layer_of(module, layers)
        for target in targets:
            high = layer_of(target, layers)
            if low is not None and high is not None and high > low and (module, target) not in allowed:
                found.append((module, low, target, high))
    return sorted(found)


def unlayered(graph: dict[str, set[str]], layers: dict[str, int] = LAYERS) -> list[str]:
    return sorted(m for m in graph if layer_of(m, layers) is None)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle path (first module repeated at the end) per strongly connected component."""
    return [_cycle_through(min(c), c, graph) for c in knots(graph)]


def knots(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module: each holds a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm; the package is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(components, key=min)


def _cycle_through(start: str, component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from ``start`` back to itself inside ``component`` (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a cycle but no path returns to it")


def test_no_function_is_longer_than_60_lines():
    offenders = long_functions()
    listing = "\n".join(f"  {f}:{line} {name} ({n} lines)" for f, line, name, n in offenders)
    assert not offenders, (
        f"{len(offenders)} functions longer than {MAX_FUNCTION_LINES} lines (def line to last line); "
        f"split them into named steps:\n{listing}"
    )


def test_no_import_cycle_between_fruitdask_modules():
    graph = import_graph()
    cycles = import_cycles(graph)
    listing = "\n".join(
        "  " + " -> ".join(c) + (f"  (one of the cycles among {', '.join(sorted(k))})" if len(k) > len(c) - 1 else "")
        for c, k in zip(cycles, knots(graph), strict=True)
    )
    assert not cycles, (
        f"{len(cycles)} import cycles between fruitdask modules (lazy imports inside functions count); "
        f"move the shared piece into a module both can import:\n{listing}"
    )


def test_the_guards_see_what_they_guard():
    """The checks themselves: the graph has the package's real edges, a cycle is found."""
    graph = import_graph()
    assert "fruitdask.cli" in graph and "fruitdask.backends.dask.cluster" in graph
    assert "fruitdask.errors" in graph["fruitdask.backends.dask.cluster"]  # module level, absolute
    assert "fruitdask.backends.dask.kube_connect" in graph["fruitdask.backends.dask.cluster"]  # lazy, in a function
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_every_module_has_a_layer():
    missing = unlayered(import_graph())
    assert not missing, f"modules with no entry in LAYERS (tests/test_architecture.py): {missing}; place each in a layer"


def test_layers_import_only_downwards():
    offenders = upward_imports(import_graph())
    listing = "\n".join(f"  {m} ({LAYER_NAMES[a]}, {a}) -> {t} ({LAYER_NAMES[b]}, {b})" for m, a, t, b in offenders)
    assert not offenders, (
        f"{len(offenders)} imports go up a layer (lazy imports inside functions count). Move the piece both need "
        f"down, or have the caller above pass it in as an argument (docs/architecture.md, Layers):\n{listing}"
    )


def test_every_allowed_upward_import_is_still_one():
    graph = import_graph()
    stale = [(m, t) for m, t in ALLOWED_UPWARD
             if t not in graph.get(m, set()) or (layer_of(t) or 0) <= (layer_of(m) or 0)]
    assert not stale, f"ALLOWED_UPWARD entries no longer needed, remove them: {stale}"
    assert all(reason.strip() for reason in ALLOWED_UPWARD.values()), "every allowed upward import says why"


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """On a synthetic package: a lazy import from a lower layer into a higher one is found,
    a downward one is not, an allowed one is not, and a module no entry names has no layer."""
    pkg = tmp_path / "pkg"
    (pkg / "top").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("import os\n\n\ndef f():\n    from pkg.top import cmd\n    return cmd\n")
    (pkg / "top" / "__init__.py").write_text("")
    (pkg / "top" / "cmd.py").write_text("from ..low import f\n")
    (pkg / "stray.py").write_text("")
    layers = {"pkg": 0, "pkg.low": 0, "pkg.top": 1}
    graph = import_graph(pkg)
    assert graph["pkg.low"] == {"pkg.top.cmd"} and graph["pkg.top.cmd"] == {"pkg.low"}
    assert upward_imports(graph, layers, allowed={}) == [("pkg.low", 0, "pkg.top.cmd", 1)]
    assert upward_imports(graph, layers, allowed={("pkg.low", "pkg.top.cmd"): "a reason"}) == []
    assert unlayered(graph, layers) == ["pkg.stray"]
    assert layer_of("pkg.top.cmd", layers) == 1 and layer_of("pkg", layers) == 0
