"""No module of ours binds one top-level name twice.

A second binding replaces the first for every function of the module,
however far above it they are: the cache verifier defined `_DETERMINERS`
twice, and `_IRREGULAR_PARTICIPLES` twice (a set its "'d" reading was
written for, then a dict of the voice check's that silently replaced it);
a test module's second test of one name runs alone. Ruff's F811 sees only
a redefinition of an unused name."""

from __future__ import annotations

import ast
import collections
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = sorted(
    path
    for folder in ("meshgate", "services", "bench", "scripts", "tests")
    for path in (ROOT / folder).rglob("*.py")
    if not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
)


def bound_names(target: ast.expr) -> list[str]:
    """The names an assignment's target binds: a name, or those in a tuple
    or list (starred too); not an attribute's or a subscript's object
    ("X.flags.writeable = False" binds no X)."""
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Starred):
        return bound_names(target.value)
    if isinstance(target, (ast.Tuple, ast.List)):
        return [name for element in target.elts for name in bound_names(element)]
    return []


def bound_twice(tree: ast.Module) -> dict[str, list[int]]:
    """Names bound more than once by the module's own top-level statements:
    assignments (a tuple's or list's names too), annotated ones with a
    value, functions and classes. Not imports, `for`, `with` or augmented
    assignments (none of ours binds a constant so), nor what an `if` binds,
    where two branches are alternatives."""
    lines = collections.defaultdict(list)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            lines[node.name].append(node.lineno)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for name in bound_names(target):
                    lines[name].append(node.lineno)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            lines[node.target.id].append(node.lineno)
    return {name: at for name, at in lines.items() if len(at) > 1}


def test_the_check_finds_a_name_bound_twice():
    tree = ast.parse("A = {1}\ndef f():\n    return A\nA = {2: 3}\nB: int = 1\nclass C: ...\n")
    assert bound_twice(tree) == {"A": [1, 4]}
    assert bound_twice(ast.parse("A, B = 1, 2\n[C, *D] = 3, 4\nA = 3\nD = 5\n")) == {"A": [1, 3], "D": [2, 4]}
    assert bound_twice(ast.parse("E = []\nE.flags = 1\nE[0] = 2\n")) == {}


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_top_level_name_is_bound_twice(path):
    assert bound_twice(ast.parse(path.read_text(), str(path))) == {}
