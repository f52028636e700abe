"""The fault suite runs only when asked for (`make chaos`, i.e. pytest -m
chaos): it starts a whole mesh and a second Triton and kills processes for
a minute or two, longer than `make test` should take."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "chaos" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="the fault suite runs with `make chaos` (pytest -m chaos)")
    for item in items:
        if "chaos" in item.keywords:
            item.add_marker(skip)
