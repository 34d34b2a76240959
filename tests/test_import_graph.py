"""The import graph of src/privmed, read from the source with `ast` (nothing is imported): no
circles, and the layers point one way.

Every `import` and `from ... import` is an edge, wherever it stands: at module level, inside a
function (a lazy import) or under `if TYPE_CHECKING:` (relative imports resolved). So a circle that
Python happens to survive because one side imports late, or only for annotations, still fails here.
`from pkg import name` is an edge to the module pkg.name where that is a module, else to pkg.
Importing pkg.mod runs pkg/__init__.py too, but that implicit edge is not counted (a package whose
__init__ imports its own modules would otherwise be a circle with each of them).

Layers:
- nothing under data/, models/, tasks/ or privacy/ imports federation/, report/, audit/, the CLI
  modules (cli, privacy_cli, flower_cli) or api;
- nothing in those packages, federation/, report/ or audit/ imports the root package `privmed`,
  whose lazy `run` is api.run (the version is privmed._version);
- data/ and models/ do not import tasks/, which sits above them (the k-space maths they share is
  privmed.kspace), and privmed.kspace imports no privmed module.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "privmed"

LOWER = ("data", "models", "tasks", "privacy")
UPPER = ("federation", "report", "audit", "cli", "api")
NO_ROOT = LOWER + ("federation", "report", "audit")
BELOW_TASKS = ("data", "models")
LEAVES = ("kspace",)

Graph = dict[str, dict[str, tuple[str, int]]]  # module -> {imported module: (file, line)}


def modules(src: Path, root: str = ROOT) -> dict[str, tuple[Path, bool]]:
    """Every module under src/root: dotted name -> (file, is a package's __init__)."""
    out = {}
    for path in sorted((src / root).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _known(name: str, mods: dict) -> str | None:
    """The longest prefix of dotted `name` that is one of `mods` (None: outside the package)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _base(node: ast.ImportFrom, name: str, is_pkg: bool) -> str:
    """The absolute module a `from` import names, relative levels resolved against `name`."""
    if not node.level:
        return node.module or ""
    parts = name.split(".") if is_pkg else name.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def import_graph(src: Path = SRC, root: str = ROOT) -> Graph:
    mods = modules(src, root)
    graph: Graph = {}
    for name, (path, is_pkg) in mods.items():
        edges = graph.setdefault(name, {})
        where = str(path.relative_to(src))
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [_known(a.name, mods) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _base(node, name, is_pkg)
                targets = [_known(f"{base}.{a.name}", mods) if f"{base}.{a.name}" in mods else _known(base, mods)
                           for a in node.names]
            else:
                continue
            for t in targets:
                if t is not None and t != name:
                    edges.setdefault(t, (where, node.lineno))
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """One circle through each set of modules that import each other (in a depth-first order):
    each a list of module names whose last imports the first."""
    found, seen, done = [], set(), set()

    def visit(node: str, stack: list[str], on_stack: set[str]) -> None:
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, {})):
            if nxt in on_stack:
                circle = stack[stack.index(nxt):]
                if frozenset(circle) not in seen:
                    seen.add(frozenset(circle))
                    found.append(list(circle))
            elif nxt not in done:
                visit(nxt, stack, on_stack)
        stack.pop()
        on_stack.discard(node)
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node, [], set())
    return found


def describe(circle: list[str], graph: Graph) -> str:
    steps = []
    for a, b in zip(circle, circle[1:] + circle[:1]):
        where, line = graph[a][b]
        steps.append(f"{a} ({where}:{line} imports {b})")
    return " -> ".join(steps) + f" -> {circle[0]}"


def _under(name: str, tops: tuple[str, ...], root: str = ROOT) -> bool:
    return any(name == f"{root}.{t}" or name.startswith(f"{root}.{t}.") for t in tops)


def layer_violations(graph: Graph, root: str = ROOT) -> list[str]:
    bad = []
    for a, edges in sorted(graph.items()):
        for b, (where, line) in sorted(edges.items()):
            why = None
            if _under(a, LOWER, root) and _under(b, UPPER, root):
                why = "a lower layer (data, models, tasks, privacy) imports an upper one"
            elif _under(a, NO_ROOT, root) and b == root:
                why = f"imports the root package, which hands out api.run (version: {root}._version)"
            elif _under(a, BELOW_TASKS, root) and _under(b, ("tasks",), root):
                why = "data and models sit below tasks"
            elif _under(a, LEAVES, root) and b.split(".")[0] == root:
                why = "a leaf module (torch, numpy and MONAI only) imports privmed"
            if why:
                bad.append(f"{where}:{line}: {a} imports {b}: {why}")
    return bad


# ------------------------------------------------------------------------------------------ tests


def test_the_graph_is_read():
    """The reader sees the package's imports (an empty graph would pass everything below)."""
    graph = import_graph()
    assert len(graph) > 100
    assert "privmed.federation.evaluation" in graph["privmed.federation.runner"]
    assert "privmed.kspace" in graph["privmed.models.cascade"]  # module level
    assert "privmed.federation.robust" in graph["privmed.federation.experiment"]
    assert "privmed.api" in graph["privmed"]  # a function-level (lazy) import


def test_no_import_circles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(describe(c, graph) for c in found)


def test_layers_point_one_way():
    bad = layer_violations(import_graph())
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


# The README's layout, bottom up: a module imports only from its own layer or one below it.
README_LAYERS = (
    ("catalog", "config", "errors", "io", "_version"),
    ("kspace",),
    ("data", "models", "tasks", "privacy"),
    ("federation",),
    ("audit", "report"),
    ("cli", "api", "flower_server", "dashboard", "tune", "__main__"),
)


def _layer(name: str, root: str = ROOT) -> int | None:
    top = name.split(".")[1] if name.count(".") else None
    return next((i for i, tops in enumerate(README_LAYERS) if top in tops), None)


def test_every_module_has_its_layer_in_the_readme_and_imports_none_above_it():
    graph = import_graph()
    unplaced = sorted({n.split(".")[1] for n in graph if n != ROOT and _layer(n) is None})
    assert not unplaced, f"modules in no layer of README_LAYERS (and the README's Layout): {unplaced}"
    bad = [f"{where}:{line}: {a} (layer {_layer(a) + 1}) imports {b} (layer {_layer(b) + 1})"
           for a, edges in sorted(graph.items()) if a != ROOT
           for b, (where, line) in sorted(edges.items()) if b != ROOT and _layer(b) > _layer(a)]
    assert not bad, "imports of a higher layer than the README's Layout allows:\n" + "\n".join(bad)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / ROOT / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_checks_catch_circles_through_relative_lazy_and_annotation_imports(tmp_path):
    src = _package(tmp_path, {
        "__init__.py": "def __getattr__(name):\n    from privmed.api import run\n    return run\n",
        "api.py": "from privmed.federation import runner\n",
        "federation/__init__.py": "",
        "federation/runner.py": "from .summary import x\n",
        "federation/summary.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import api\n",
        "tasks/__init__.py": "",
        "tasks/a.py": "def f():\n    from privmed.tasks import b\n",
        "tasks/b.py": "from . import a\nfrom privmed.report.html import R\n",
        "report/__init__.py": "",
        "report/html.py": "R = 1\n",
        "models/__init__.py": "import privmed.tasks.a\n",
        "data/__init__.py": "import privmed\n",
    })
    graph = import_graph(src)
    assert graph["privmed.tasks.b"] == {"privmed.tasks.a": ("privmed/tasks/b.py", 1),
                                        "privmed.report.html": ("privmed/tasks/b.py", 2)}
    found = {frozenset(c) for c in cycles(graph)}
    assert found == {frozenset({"privmed.api", "privmed.federation.runner", "privmed.federation.summary"}),
                     frozenset({"privmed.tasks.a", "privmed.tasks.b"})}
    message = describe(next(c for c in cycles(graph) if "privmed.tasks.a" in c), graph)
    assert message == ("privmed.tasks.a (privmed/tasks/a.py:2 imports privmed.tasks.b) -> "
                       "privmed.tasks.b (privmed/tasks/b.py:1 imports privmed.tasks.a) -> privmed.tasks.a")
    bad = layer_violations(graph)
    assert [line.split(": ")[1] for line in bad] == [
        "privmed.data imports privmed", "privmed.models imports privmed.tasks.a",
        "privmed.tasks.b imports privmed.report.html",
    ]
