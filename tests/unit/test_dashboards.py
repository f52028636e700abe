"""Every Grafana panel in deploy/grafana/ queries only series the services export."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from meshgate import metrics

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
