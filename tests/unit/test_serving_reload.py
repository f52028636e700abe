"""A reload (serving.reload_configuration) is taken whole or not at all: a
hook that raises part-way gives the settings in use back to the hooks it
reached, and the file watcher goes on watching."""

from __future__ import annotations

import asyncio
import os

import structlog

from meshgate import serving
from meshgate.config import Settings, load_settings


def service_with(path, *hooks) -> serving.Service:
    # Called from async tests only: grpc.aio's server wants a running loop.
    service = serving.Service("router", [])
    service.config_path = str(path)
    service.reload_hooks.extend(hooks)
    # As serving.main reads it: the file's state, then its settings.
    service.config_state = serving._file_state(path)
    service.settings_in_use = load_settings(path)
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


async def test_the_file_watcher_does_not_reload_an_edit_a_sighup_reloaded(tmp_path):
    """The watch compared the file with how it found it itself: an edit that
    a SIGHUP had reloaded already was reloaded a second time."""
    path = tmp_path / "meshgate.toml"
    write_ttl(path, 60)
    taken: list[int] = []
    service = service_with(path, lambda settings: taken.append(settings.cache.ttl_s))
    watcher = asyncio.create_task(serving.watch_configuration(service, poll_s=0.01))
    await asyncio.sleep(0.05)  # watching
    try:
        write_ttl(path, 90)
        assert serving.reload_configuration(service)  # SIGHUP's, before the watch looks
        await asyncio.sleep(0.1)  # ten looks
        assert taken == [90]
    finally:
        watcher.cancel()


class Looks:
    """The file watcher's sleep, in the test's hands: look() lets it take
    one look at the file and returns once it has (it sleeps again)."""

    def __init__(self) -> None:
        self._go: asyncio.Queue[None] = asyncio.Queue()
        self._sleeping: asyncio.Queue[None] = asyncio.Queue()

    async def sleep(self, seconds: float) -> None:
        self._sleeping.put_nowait(None)
        await self._go.get()

    async def watching(self) -> None:
        await self._sleeping.get()

    async def look(self) -> None:
        self._go.put_nowait(None)
        await self._sleeping.get()


async def test_the_file_watcher_applies_a_change_once_it_has_settled(tmp_path):
    """A file rewritten in place and caught part-way can parse (cut before
    its tenants): the watch applied it at its next look, and for up to a
    second every tenant was gone. It now waits for the file to look the
    same on two looks in a row."""
    path = tmp_path / "meshgate.toml"
    settings, tenants = "[cache]\nttl_s = 60\n", '[[router.tenants]]\nid = "acme"\n'
    path.write_text(settings + tenants)
    taken: list[tuple[int, list[str]]] = []
    service = service_with(
        path, lambda new: taken.append((new.cache.ttl_s, [tenant.id for tenant in new.router.tenants]))
    )
    looks = Looks()
    watcher = asyncio.create_task(serving.watch_configuration(service, sleep=looks.sleep))
    await looks.watching()
    try:
        path.write_text(settings.replace("60", "90"))  # the rewrite, half-way
        await looks.look()
        path.write_text(settings.replace("60", "90") + tenants)  # and done
        await looks.look()
        assert taken == []  # changed since the look before
        await looks.look()
        assert taken == [(90, ["acme"])]
        await looks.look()
        assert taken == [(90, ["acme"])]
    finally:
        watcher.cancel()


async def test_the_file_watcher_sees_a_replacement_that_keeps_mtime_and_size(tmp_path):
    """`cp -p`, `rsync -t`: a new file put in place with the old one's mtime
    and size was never applied by the watch (a review)."""
    path = tmp_path / "meshgate.toml"
    write_ttl(path, 60)
    taken: list[int] = []
    service = service_with(path, lambda new: taken.append(new.cache.ttl_s))
    before = os.stat(path)
    replacement = tmp_path / "meshgate.toml.new"
    write_ttl(replacement, 90)
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, path)
    looks = Looks()
    watcher = asyncio.create_task(serving.watch_configuration(service, sleep=looks.sleep))
    await looks.watching()
    try:
        await looks.look()
        await looks.look()
        assert taken == [90]
    finally:
        watcher.cancel()


async def test_the_file_watcher_reloads_a_file_that_never_settles(tmp_path):
    """A file rewritten before every look (a loop re-rendering it) never
    looked the same twice and was never applied (a review): it is after
    UNSETTLED_LOOKS looks."""
    path = tmp_path / "meshgate.toml"
    write_ttl(path, 60)
    taken: list[int] = []
    service = service_with(path, lambda new: taken.append(new.cache.ttl_s))
    looks = Looks()
    watcher = asyncio.create_task(serving.watch_configuration(service, sleep=looks.sleep))
    await looks.watching()
    try:
        for look in range(serving.UNSETTLED_LOOKS):
            assert taken == []
            write_ttl(path, 90 + look % 2)  # another size or mtime each time
            os.utime(path, ns=(look, look))
            await looks.look()
        assert len(taken) == 1 and taken[0] in (90, 91)
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


REFUSED = "configuration refused; keeping the one in use"
UNCHANGED = "configuration unchanged since it was refused; keeping the one in use"


async def test_one_refused_edit_is_logged_once_whether_the_watcher_or_sighup_reads_it(tmp_path):
    """The file watch reloads an edit, and so does the SIGHUP an operator
    sends after it: one bad edit logged two identical refusals."""
    path = tmp_path / "meshgate.toml"
    write_ttl(path, 60)
    service = service_with(path, lambda settings: None)
    write_ttl(path, -5)
    with structlog.testing.capture_logs() as logs:
        # The watcher's reload, then SIGHUP's, of the same content.
        assert not serving.reload_configuration(service)
        assert not serving.reload_configuration(service)
    assert [entry["event"] for entry in logs] == [REFUSED, UNCHANGED]
    # Another bad edit is refused in its own words.
    path.write_text("[cache]\nttl_s = -6\n")
    with structlog.testing.capture_logs() as logs:
        assert not serving.reload_configuration(service)
    assert [entry["event"] for entry in logs] == [REFUSED]
    assert "-6" in logs[0]["error"]


async def test_a_refused_edit_made_again_after_a_good_one_is_refused_again(tmp_path):
    path = tmp_path / "meshgate.toml"
    write_ttl(path, 60)
    service = service_with(path, lambda settings: None)
    write_ttl(path, -5)
    assert not serving.reload_configuration(service)
    write_ttl(path, 90)
    assert serving.reload_configuration(service)
    write_ttl(path, -5)
    with structlog.testing.capture_logs() as logs:
        assert not serving.reload_configuration(service)
    assert [entry["event"] for entry in logs] == [REFUSED]
    assert service.settings_in_use.cache.ttl_s == 90


async def test_an_edit_a_hook_refused_is_tried_again_by_the_next_reload(tmp_path):
    """A hook may refuse for a file the settings name (a context service's
    tokenizer or chat template not there yet): the next reload of the same
    content hands it to the hooks again, where a refusal of the content
    itself is not (above). A review put the missing file in place and sent
    SIGHUP: "unchanged since it was refused", until the settings file was
    edited."""
    path = tmp_path / "meshgate.toml"
    write_ttl(path, 60)
    taken: list[int] = []
    refusing = [True]

    def refuses_ttl_120_once(settings: Settings) -> None:
        taken.append(settings.cache.ttl_s)
        if settings.cache.ttl_s == 120 and refusing[0]:
            raise ValueError("a file the settings name is not there yet")

    service = service_with(path, refuses_ttl_120_once)
    write_ttl(path, 120)
    with structlog.testing.capture_logs() as logs:
        assert not serving.reload_configuration(service)
        refusing[0] = False
        assert serving.reload_configuration(service)
    assert [entry["event"] for entry in logs] == [
        "configuration refused by the service; keeping the one in use",
        "configuration reloaded",
    ]
    # Refused, the settings in use handed back; then taken.
    assert taken == [120, 60, 120]
    assert service.settings_in_use.cache.ttl_s == 120


async def test_a_reload_allowing_a_tenant_an_alias_that_does_not_exist_is_refused_naming_both(tmp_path):
    """A reload is judged as a start is (load_settings): a tenant's models
    naming no configured alias kept the tenant's old models no more than it
    was refused; it loaded, and the tenant lost the model at request time."""
    path = tmp_path / "meshgate.toml"
    tenant = '[[router.tenants]]\nid = "acme"\napi_key_sha256 = ["' + "a" * 64 + '"]\n'
    path.write_text(tenant + 'models = ["tiny-gpt"]\n')
    taken: list[list[str]] = []
    service = service_with(path, lambda settings: taken.append(settings.router.tenants[0].models))
    path.write_text(tenant + 'models = ["tiny-gtp"]\n')
    with structlog.testing.capture_logs() as logs:
        assert not serving.reload_configuration(service)
    assert taken == []
    assert service.settings_in_use.router.tenants[0].models == ["tiny-gpt"]
    assert [entry["event"] for entry in logs] == [REFUSED]
    assert "router.tenants 'acme': models: unknown model alias(es) ['tiny-gtp']" in logs[0]["error"]


async def test_a_reload_with_a_cost_limit_under_one_nano_usd_is_refused(tmp_path):
    path = tmp_path / "meshgate.toml"
    path.write_text('[[router.tenants]]\nid = "a"\nlimits = { cost_usd_per_day = 1e-9 }\n')
    taken: list[Settings] = []
    service = service_with(path, taken.append)
    path.write_text('[[router.tenants]]\nid = "a"\nlimits = { cost_usd_per_day = 5e-10 }\n')
    assert not serving.reload_configuration(service)
    assert not taken and service.settings_in_use.router.tenants[0].limits.cost_usd_per_day == 1e-9


async def test_a_file_emptied_while_the_service_runs_is_refused(tmp_path):
    """An empty file loads as every default: no tenants, and the dev tenant
    on with the public key. A bug hunt: a router whose file a failed
    redirection emptied refused its tenants' keys and admitted
    mg-dev-local-key, within a second (the file watch)."""
    path = tmp_path / "meshgate.toml"
    path.write_text(
        '[router]\ndev_tenant = false\n[[router.tenants]]\nid = "acme"\napi_key_sha256 = ["'
        + "a" * 64
        + '"]\n'
    )
    taken: list[Settings] = []
    service = service_with(path, taken.append)
    # Table headers alone set nothing either (a generator that failed partway).
    for emptied in ("", "\n# nothing here yet\n", "[router]\n", "[router]\n[cache]\n"):
        path.write_text(emptied)
        with structlog.testing.capture_logs() as logs:
            assert not serving.reload_configuration(service)
        assert [entry["event"] for entry in logs] == [REFUSED]
        assert "holds no settings" in logs[0]["error"]
    assert taken == []
    assert [tenant.id for tenant in service.settings_in_use.router.tenants] == ["acme"]


async def test_a_reload_that_lost_its_tenants_does_not_turn_the_dev_tenant_on(tmp_path):
    """A review's finding: a file cut before its [[router.tenants]] (a
    generator failing partway) but still setting something else passed the
    empty-file guard; the dev tenant, derived on (no tenant, no admin
    credential), refused acme's key and admitted the public one. Only a
    file that says router.dev_tenant = true turns it on in a reload."""
    path = tmp_path / "meshgate.toml"
    head = '[router]\nlisten = "127.0.0.1:50990"\n'
    tenant = '[[router.tenants]]\nid = "acme"\napi_key_sha256 = ["' + "a" * 64 + '"]\n'
    path.write_text(head + tenant)
    taken: list[Settings] = []
    service = service_with(path, taken.append)
    assert not service.settings_in_use.router.dev_tenant
    path.write_text(head)
    with structlog.testing.capture_logs() as logs:
        assert not serving.reload_configuration(service)
    assert [entry["event"] for entry in logs] == [REFUSED]
    assert "set router.dev_tenant = true" in logs[0]["error"]
    assert taken == [] and [t.id for t in service.settings_in_use.router.tenants] == ["acme"]
    # Said so, it is taken.
    path.write_text(head.replace("[router]\n", "[router]\ndev_tenant = true\n"))
    assert serving.reload_configuration(service)
    assert service.settings_in_use.router.dev_tenant and not service.settings_in_use.router.tenants


async def test_an_empty_file_is_reloaded_where_the_service_runs_on_its_defaults(tmp_path):
    """Settings from the environment alone (an empty file beside them): a
    SIGHUP changes nothing and is not refused."""
    path = tmp_path / "meshgate.toml"
    path.write_text("")
    service = service_with(path, lambda settings: None)
    with structlog.testing.capture_logs() as logs:
        assert serving.reload_configuration(service)
    assert [entry["event"] for entry in logs] == ["configuration reloaded"]


async def test_a_file_rewritten_while_it_is_reloaded_is_judged_by_the_bytes_loaded(tmp_path, monkeypatch):
    """A rewrite in place (truncated, then written) that lands between the
    reload's reads: the review of the emptied-file fix had the empty read
    loaded and the full file then judged not empty, so the defaults were
    applied. One read: what is loaded is what is judged."""
    full = (
        '[router]\ndev_tenant = false\n[[router.tenants]]\nid = "acme"\napi_key_sha256 = ["'
        + "a" * 64
        + '"]\n'
    )
    path = tmp_path / "meshgate.toml"
    path.write_text(full)
    taken: list[Settings] = []
    service = service_with(path, taken.append)
    path.write_text("")
    built = serving.settings_from_document

    def then_written_again(document, environ=None):
        settings = built(document, environ)
        path.write_text(full)  # the rest of the rewrite, after the read
        return settings

    monkeypatch.setattr(serving, "settings_from_document", then_written_again)
    with structlog.testing.capture_logs() as logs:
        assert not serving.reload_configuration(service)
    assert [entry["event"] for entry in logs] == [REFUSED]
    assert taken == []
    monkeypatch.setattr(serving, "settings_from_document", built)
    # The whole file, read next, is not the refused (empty) content: loaded.
    assert serving.reload_configuration(service)
    assert [tenant.id for tenant in taken[-1].router.tenants] == ["acme"]
