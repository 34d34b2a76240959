"""The size rule of README.md's Layout: no module under src/privmed over MAX_MODULE_LINES lines and no
function over MAX_FUNCTION_LINES lines (its docstring and decorators included), unless its docstring
says why it must be one, in a sentence that starts with KEPT_WHOLE. Read from the source with `ast`,
so that the rule holds for every module, imported or not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "privmed"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
KEPT_WHOLE = "Kept whole:"


def _too_long(root: Path) -> list[str]:
    """'path: what' for each module or function past its limit without a KEPT_WHOLE reason."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        name = path.relative_to(root.parent)
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES and KEPT_WHOLE not in (ast.get_docstring(tree) or ""):
            found.append(f"{name}: {lines} lines")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - first + 1
            if length > MAX_FUNCTION_LINES and KEPT_WHOLE not in (ast.get_docstring(node) or ""):
                found.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_module_or_function_past_its_length():
    assert len(list(SRC.rglob("*.py"))) > 50, SRC  # it reads privmed's own source
    assert _too_long(SRC) == []


def test_the_rule_finds_what_it_should(tmp_path):
    """A fake package: a long module, a long function, and the same two with a reason."""
    pkg = tmp_path / "fake"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (pkg / "long_function.py").write_text(f"def f():\n{body}\n")
    (pkg / "kept_function.py").write_text(f'def f():\n    """{KEPT_WHOLE} one loop."""\n{body}\n')
    filler = "\n".join(f"y{i} = {i}" for i in range(MAX_MODULE_LINES + 1))
    (pkg / "long_module.py").write_text(filler + "\n")
    (pkg / "kept_module.py").write_text(f'"""{KEPT_WHOLE} one table."""\n' + filler + "\n")
    assert _too_long(pkg) == [
        f"fake/long_function.py:1 f: {MAX_FUNCTION_LINES + 1} lines",
        f"fake/long_module.py: {MAX_MODULE_LINES + 1} lines",
    ]


@pytest.mark.parametrize("limit", [MAX_MODULE_LINES, MAX_FUNCTION_LINES])
def test_the_limits_are_the_readmes(limit):
    readme = (SRC.parents[1] / "README.md").read_text()
    assert f"{limit} lines" in readme
