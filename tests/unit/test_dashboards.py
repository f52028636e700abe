"""Every Grafana panel in deploy/grafana/ queries only series the services
export, and an error rate leaves out the codes meshgate top's does."""

from __future__ import annotations

import json
import pathlib
import re

import grpc
import pytest

from meshgate import metrics, top

DASHBOARDS = sorted((pathlib.Path(__file__).resolve().parents[2] / "deploy" / "grafana").glob("*.json"))
# Every series the services export carries one of these prefixes (label
# names never do), so a query naming none of them is itself a mistake.
_OURS = re.compile(r"\b((?:meshgate|process)_[a-zA-Z0-9_]+)")


def panels():
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            yield pytest.param(path.name, panel, id=f"{path.stem}: {panel['title']}")


def test_the_five_dashboards_are_there():
    assert {path.stem for path in DASHBOARDS} == {"overview", "models", "cache", "context", "triton-backends"}


@pytest.mark.parametrize(("name", "panel"), list(panels()))
def test_every_query_names_exported_series(name, panel):
    exported = metrics.exported_series()
    assert panel["targets"], f"{name}: panel {panel['title']!r} has no query"
    for target in panel["targets"]:
        named = _OURS.findall(target["expr"])
        assert named, f"{name}: {panel['title']!r} names no meshgate metric: {target['expr']}"
        unknown = sorted(set(named) - exported)
        assert not unknown, f"{name}: {panel['title']!r} queries series nobody exports: {unknown}"


def test_template_variables_query_exported_series():
    exported = metrics.exported_series()
    for path in DASHBOARDS:
        for variable in json.loads(path.read_text())["templating"]["list"]:
            if variable["type"] == "query":
                assert set(_OURS.findall(variable["query"])) <= exported, (path.name, variable["name"])


def test_the_check_catches_a_misspelled_series():
    assert "meshgate_router_time_to_first_token_seconds_bucket" in metrics.exported_series()
    assert "meshgate_router_time_to_first_token_bucket" not in metrics.exported_series()


# A label matcher on the RPCs' status code: code!="OK", code!~"OK|CANCELLED".
_CODE_LEFT_OUT = re.compile(r'\bcode\s*(!=|!~)\s*"([^"]*)"')


def _codes_left_out(expr: str) -> set[str]:
    """The gRPC codes ``expr``'s negative code matchers leave out (a
    Prometheus regex matches the whole value)."""
    left_out: set[str] = set()
    for operator, value in _CODE_LEFT_OUT.findall(expr):
        if operator == "!=":
            left_out.add(value)
        else:
            left_out.update(code.name for code in grpc.StatusCode if re.fullmatch(value, code.name))
    return left_out


def test_an_error_rate_leaves_out_the_codes_meshgate_top_does():
    """ "Errors by reason" counted CANCELLED (a caller that hung up, the
    router's own dropped speculative generation) as the service failing,
    where meshgate top's ERR/s leaves it out."""
    error_rates = [
        target["expr"]
        for path in DASHBOARDS
        for panel in json.loads(path.read_text())["panels"]
        for target in panel["targets"]
        if "meshgate_rpc_requests_total" in target["expr"] and "OK" in _codes_left_out(target["expr"])
    ]
    assert error_rates, "no panel shows an error rate"
    for expr in error_rates:
        assert _codes_left_out(expr) == top.NOT_SERVICE_ERRORS, expr
