"""A reload (serving.reload_configuration) is taken whole or not at all: a
hook that raises part-way gives the settings in use back to the hooks it
reached, and the file watcher goes on watching."""

from __future__ import annotations

import asyncio

from meshgate import serving
from meshgate.config import Settings, load_settings


def service_with(path, *hooks) -> serving.Service:
    # Called from async tests only: grpc.aio's server wants a running loop.
    service = serving.Service("router", [])
    service.config_path = str(path)
    service.reload_hooks.extend(hooks)
    service.settings_in_use = load_settings(path, environ={})
    return service


def write_ttl(path, ttl_s: int) -> None:
    path.write_text(f"[cache]\nttl_s = {ttl_s}\n")


async def test_a_hook_that_raises_part_way_leaves_every_hook_on_the_settings_in_use(tmp_path):
    path = tmp_path / "meshgate.toml"
    write_ttl(path, 60)
    taken: list[int] = []

    def refuses_ttl_120(settings: Settings) -> None:
        if settings.cache.ttl_s == 120:
            raise ValueError("a value load_settings let through")

    service = service_with(path, lambda settings: taken.append(settings.cache.ttl_s), refuses_ttl_120)
    write_ttl(path, 120)
    assert not serving.reload_configuration(service)
    # The first hook took 120, then 60 again: nothing half-applied.
    assert taken == [120, 60]
    assert service.settings_in_use.cache.ttl_s == 60
    write_ttl(path, 90)
    assert serving.reload_configuration(service)
    assert taken[-1] == 90 and service.settings_in_use.cache.ttl_s == 90


async def test_the_file_watcher_outlives_a_hook_that_raises(tmp_path):
    path = tmp_path / "meshgate.toml"
    write_ttl(path, 60)
    taken: list[int] = []

    def hook(settings: Settings) -> None:
        taken.append(settings.cache.ttl_s)
        if settings.cache.ttl_s == 120:
            raise RuntimeError("refused")

    service = service_with(path, hook)
    watcher = asyncio.create_task(serving.watch_configuration(service, poll_s=0.01))
    await asyncio.sleep(0.05)  # it has read the file's state to compare with
    try:
        for ttl_s in (120, 90):
            write_ttl(path, ttl_s)
            async with asyncio.timeout(5):
                while ttl_s not in taken:
                    await asyncio.sleep(0.01)
        assert not watcher.done()
        assert taken[-1] == 90 and service.settings_in_use.cache.ttl_s == 90
    finally:
        watcher.cancel()


async def test_a_service_without_reload_hooks_reloads_nothing(tmp_path):
    path = tmp_path / "meshgate.toml"
    write_ttl(path, 60)
    assert not serving.reload_configuration(service_with(path))


async def test_a_hook_that_refuses_the_settings_in_use_too_is_logged_not_raised(tmp_path):
    """Putting the settings in use back can fail too (a hook that raises
    whatever it is given): the reload says so and the service stays up."""
    path = tmp_path / "meshgate.toml"
    write_ttl(path, 60)

    def always_refuses(settings: Settings) -> None:
        raise RuntimeError("refused")

    service = service_with(path, always_refuses)
    write_ttl(path, 90)
    assert not serving.reload_configuration(service)
    assert service.settings_in_use.cache.ttl_s == 60
