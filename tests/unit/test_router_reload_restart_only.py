"""A reload that changes a setting the running router cannot take over logs
that it applies only after a restart (services/router/app.py _RESTART_ONLY):
a real router, its Redis never reached, given reloaded settings."""

from __future__ import annotations

import dataclasses

import pytest
from structlog.testing import capture_logs

from tests.unit.test_router_reload_call_bound import router, settings_bounded_at


@pytest.mark.parametrize("setting", ["http_stalled_client_timeout_s", "http_header_timeout_s"])
async def test_a_reloaded_http_timeout_is_logged_as_needing_a_restart(setting):
    # The HTTP server took it when it was made, and is not made again: a
    # change went unapplied without a word.
    settings = settings_bounded_at(0, 0)
    async with router(settings) as (_, service):
        (reload,) = service.reload_hooks
        changed = getattr(settings.router, setting) + 1
        with capture_logs() as logs:
            reload(
                dataclasses.replace(
                    settings, router=dataclasses.replace(settings.router, **{setting: changed})
                )
            )
    warned = [
        entry["setting"]
        for entry in logs
        if entry["event"] == "a changed setting applies only after a restart"
    ]
    assert warned == [f"router.{setting}"]


@pytest.mark.parametrize(
    ("field", "changed"), [("timeout_s", 9.0), ("url", "redis://127.0.0.1:6380/0")], ids=["timeout_s", "url"]
)
async def test_a_reloaded_redis_setting_is_logged_as_needing_a_restart(field, changed):
    # Every redis setting is read once, at setup (the connection, the key
    # store, the notice listener, the context client's stall bound): a
    # changed redis.timeout_s went unapplied without a word.
    settings = settings_bounded_at(0, 0)
    async with router(settings) as (_, service):
        (reload,) = service.reload_hooks
        with capture_logs() as logs:
            reload(
                dataclasses.replace(settings, redis=dataclasses.replace(settings.redis, **{field: changed}))
            )
    warned = [
        entry["setting"]
        for entry in logs
        if entry["event"] == "a changed setting applies only after a restart"
    ]
    assert warned == ["redis"]
