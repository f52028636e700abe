"""The catalogue of error reasons is the only place a reason is spelled."""

from __future__ import annotations

import ast
import pathlib
import re

from meshgate.reasons import Reason

ROOT = pathlib.Path(__file__).resolve().parents[2]
CATALOGUE = ROOT / "meshgate" / "reasons.py"


def _sources():
    for folder in ("meshgate", "services"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != CATALOGUE and not path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                yield path


def test_no_service_spells_a_reason_as_a_string():
    names = set(Reason.__members__)
    spelled = [
        f"{path.relative_to(ROOT)}:{node.lineno}: {node.value}"
        for path in _sources()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
    ]
    assert spelled == []


def _reason_argument(call: ast.Call) -> ast.expr | None:
    """The reason a call passes, if it raises one: MeshgateError(code, reason,
    ...) or a helper whose first parameter is the reason."""
    name = getattr(call.func, "id", None) or getattr(call.func, "attr", None)
    position = 1 if name == "MeshgateError" else 0
    if name == "MeshgateError" or name in _REASON_FIRST:
        for keyword in call.keywords:
            if keyword.arg == "reason":
                return keyword.value
        return call.args[position] if len(call.args) > position else None
    return None


_REASON_FIRST = {"invalid_argument", "not_found", "unavailable", "aborted", "_unauthenticated"}


def test_no_reason_is_raised_outside_the_catalogue():
    # Catches a new reason spelled at the raise before anyone added it here.
    literal = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in _sources()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(reason := _reason_argument(node), ast.Constant)
        and isinstance(reason.value, str)
    ]
    assert literal == []


def test_every_reason_is_documented():
    body = next(node for node in ast.parse(CATALOGUE.read_text()).body if isinstance(node, ast.ClassDef)).body
    documented = {
        statement.targets[0].id
        for statement, following in zip(body, body[1:], strict=False)
        if isinstance(statement, ast.Assign)
        and isinstance(following, ast.Expr)
        and isinstance(following.value, ast.Constant)
        and following.value.value.strip()
    }
    assert documented == set(Reason.__members__)


def test_a_reason_is_its_own_name():
    for name, member in Reason.__members__.items():
        assert member == name
        assert str(member) == name


def test_the_errors_doc_names_only_catalogued_reasons():
    table = (ROOT / "docs" / "errors.md").read_text()
    named = set(re.findall(r"`([A-Z][A-Z0-9_]{3,})`", table))
    # Named in the compatibility note, as what callers used to see.
    retired = {"NO_MESSAGES", "MISSING_MESSAGES", "MISSING_TENANT", "GENERATION_INCOMPLETE"}
    retired.add("CONTEXT_UNAVAILABLE")
    assert named - retired <= set(Reason.__members__)
    assert {"EMPTY_MESSAGES", "VERSION_CONFLICT", "NO_DEPLOYMENT_AVAILABLE"} <= named


def test_every_reason_is_documented_in_the_errors_doc():
    """A caller reads docs/errors.md's table (and the paragraph on the
    internal ports' reasons) to handle a reason: fourteen raised by the
    services were in neither."""
    errors = (ROOT / "docs" / "errors.md").read_text()
    assert [reason.value for reason in Reason if f"`{reason.value}`" not in errors] == []
