"""The sweep of what expired sessions leave in their tenants' records
(services/context/tenant_sweep.py) over a real Redis: a tenant whose
sessions expire with no create or page of its own after them keeps their
listing entries and record fields until a pass of the sweep, which leaves
the live ones (a session renewed past its first due time too) and nothing
of a tenant with none left. The tests drive the sweep's ticks themselves;
the sessions expire by Redis's own TTL."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as redis
import structlog.testing

from services.context import store as session_store
from services.context import tenant_sweep
from tests.integration.test_context_service import USER, msg

pytestmark = pytest.mark.integration

BOUND = 1 << 30
# A tick SCANs SCAN_COUNT keys of a Redis that every test of the session shares.
MOST_TICKS = 10_000


@pytest.fixture
async def client(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def stores(client: redis.Redis) -> tuple[session_store.SessionStore, session_store.SessionStore]:
    """One store whose sessions expire a second after their last write, one
    whose live ten minutes: a session the first created and the second
    appended to has been renewed past its first due time."""
    return (
        session_store.SessionStore(client, 1, max_bytes_per_tenant=BOUND),
        session_store.SessionStore(client, 600, max_bytes_per_tenant=BOUND),
    )


async def expired(client: redis.Redis, tenant: str, session_ids: list[str]) -> None:
    """Waits (at most 10 s) until Redis has expired every one of the sessions."""
    deadline = time.monotonic() + 10
    while any([await client.exists(session_store.session_key(tenant, s)) for s in session_ids]):
        assert time.monotonic() < deadline, "the sessions never expired"
        await asyncio.sleep(0.1)


# The tick itself, whatever the background_sweeps_idle fixture does to the class's.
_TICK = tenant_sweep.TenantSweep.tick


async def a_pass(sweep: tenant_sweep.TenantSweep) -> int:
    """Ticks until a pass of the sweep has ended; returns how many ticks."""
    for ticks in range(1, MOST_TICKS + 1):
        if await _TICK(sweep):
            return ticks
    pytest.fail(f"no pass ended in {MOST_TICKS} ticks")


def sweep_of(store: session_store.SessionStore, client: redis.Redis) -> tenant_sweep.TenantSweep:
    return tenant_sweep.TenantSweep(client, store.listing, store.holdings)


async def listed(client: redis.Redis, tenant: str) -> tuple[list[str], list[str]]:
    """The session ids of the tenant's listing's members: (newest, due)."""
    ids = []
    for part in ("newest", "due"):
        members = await client.zrange(session_store.listing_key(tenant, part), 0, -1)
        ids.append(sorted(member.partition(b":")[2].decode() for member in members))
    return ids[0], ids[1]


def tenant_keys(tenant: str) -> list[str]:
    """Every key the tenant has apart from its sessions': its listing and record."""
    return [
        session_store.listing_key(tenant, "newest"),
        session_store.listing_key(tenant, "due"),
        session_store.holdings_key(tenant, "bytes"),
        session_store.holdings_key(tenant, "expiry"),
    ]


async def counted(client: redis.Redis, tenant: str) -> tuple[list[str], list[str]]:
    """The session ids the tenant's record holds: (fields' sessions, expiry's)."""
    fields = await client.hkeys(session_store.holdings_key(tenant, "bytes"))
    expiries = await client.zrange(session_store.holdings_key(tenant, "expiry"), 0, -1)
    return (
        sorted({f.decode()[2:] for f in fields if f != b"total"}),
        sorted(e.decode() for e in expiries),
    )


async def test_a_quiet_tenants_expired_sessions_leave_its_listing_and_record_at_a_sweep(
    client, tenant
) -> None:
    short, long = stores(client)
    gone = [f"expired{n}" for n in range(5)]
    for session_id in [*gone, "renewed"]:
        await short.create(tenant, session_id)
    await long.create(tenant, "fresh")
    await long.append(tenant, "renewed", 0, [msg(USER, "hello")], {})
    await expired(client, tenant, gone)
    # Redis expired them; nothing of the tenant's came after: all is still there.
    everything = sorted([*gone, "fresh", "renewed"])
    assert await listed(client, tenant) == (everything, everything)
    assert await counted(client, tenant) == (everything, everything)
    due = session_store.listing_key(tenant, "due")
    # Past its first due time, a second after its creation, alive for ten minutes.
    first_due = await client.zscore(
        due, session_store.listed_member("renewed", (await long.read(tenant, "renewed")).create_time_ms)
    )
    # Created after the expired ones, it falls due a few ms after the last of
    # them has gone (a CI run: 1 ms short): wait for Redis's clock to pass it.
    deadline = time.monotonic() + 5
    while True:
        seconds, micros = await client.time()
        if first_due < seconds * 1000 + micros // 1000:
            break
        assert time.monotonic() < deadline, "its first due time never passed"
        await asyncio.sleep(0.01)

    await a_pass(sweep_of(long, client))

    assert await listed(client, tenant) == (["fresh", "renewed"], ["fresh", "renewed"])
    assert await counted(client, tenant) == (["fresh", "renewed"], ["fresh", "renewed"])
    renewed_due = await client.zscore(
        due, session_store.listed_member("renewed", (await long.read(tenant, "renewed")).create_time_ms)
    )
    seconds, micros = await client.time()
    # Given its TTL left, so no sweep checks it again before then.
    assert renewed_due > seconds * 1000 + micros // 1000 + 500_000
    total = int(await client.hget(session_store.holdings_key(tenant, "bytes"), "total"))
    assert total == sum(
        int(v)
        for f, v in (await client.hgetall(session_store.holdings_key(tenant, "bytes"))).items()
        if f != b"total"
    )
    # Sorted: created in the same millisecond, they are listed by id, newest first.
    assert sorted(s.session_id for s in (await long.listing.page(tenant, 10)).sessions) == [
        "fresh",
        "renewed",
    ]


async def test_a_tenant_whose_every_session_expired_is_left_nothing_in_redis(client, tenant) -> None:
    short, _ = stores(client)
    gone = [f"expired{n}" for n in range(3)]
    for session_id in gone:
        await short.create(tenant, session_id)
    await expired(client, tenant, gone)
    await a_pass(sweep_of(short, client))
    assert await client.exists(*tenant_keys(tenant)) == 0


async def test_a_tenant_whose_last_session_was_deleted_is_left_nothing_in_redis(client, tenant) -> None:
    """The delete's drop of the last session left the record's hash holding
    its total alone, with no sorted set left for a sweep to find it by."""
    _, long = stores(client)
    await long.create(tenant, "only")
    await long.delete(tenant, "only")
    assert await client.exists(*tenant_keys(tenant)) == 0


async def test_a_tick_sweeps_a_bounded_share_of_a_tenant_and_the_pass_the_rest(
    client, tenant, monkeypatch
) -> None:
    """Two entries a tenant a tick: a tenant of five expired sessions is
    swept a share at a time, and the pass ends only once none is left."""
    monkeypatch.setattr(tenant_sweep, "ENTRIES_PER_TENANT", 2)
    short, _ = stores(client)
    gone = [f"expired{n}" for n in range(5)]
    for session_id in gone:
        await short.create(tenant, session_id)
    await expired(client, tenant, gone)
    sweep = sweep_of(short, client)
    left = []
    for _ in range(MOST_TICKS):
        ended = await sweep.tick()
        newest, _ = await listed(client, tenant)
        left.append(len(newest))
        if ended:
            break
    # Never more than two at a time; none left when the pass ended.
    shares = [before - after for before, after in zip([5, *left], left) if before != after]
    assert shares == [2, 2, 1] and left[-1] == 0
    assert await counted(client, tenant) == ([], [])


async def made_by_an_older_replica(sessions: session_store.SessionStore, tenant: str, session_id: str) -> int:
    """Makes a session as a context service from before the listing did (its
    create script alone, no listing call); returns its creation time."""
    outcome = await sessions._create(
        keys=session_store.session_keys(tenant, session_id), args=[sessions._ttl_s, ""]
    )
    return int(outcome[1])


async def test_live_sessions_missing_from_the_listing_are_listed_by_a_pass_once_each(
    client, tenant, background_sweeps_idle
) -> None:
    """Made before the listing existed (or by an older replica during the
    upgrade): ListSessions never showed them, for their whole life. A pass
    of the sweep lists each once, under its own creation time; a session
    deleted before the pass is not listed, and another pass changes nothing."""
    _, long = stores(client)
    await long.create(tenant, "listed")
    created = {
        session_id: await made_by_an_older_replica(long, tenant, session_id)
        for session_id in ("older", "talked")
    }
    await long.append(tenant, "talked", 0, [msg(USER, "hello")], {})
    await made_by_an_older_replica(long, tenant, "deleted")
    await long.delete(tenant, "deleted")
    assert [s.session_id for s in (await long.listing.page(tenant, 10)).sessions] == ["listed"]

    await a_pass(sweep_of(long, client))

    everything = ["listed", "older", "talked"]
    assert await listed(client, tenant) == (everything, everything)
    page = await long.listing.page(tenant, 10)
    assert sorted(s.session_id for s in page.sessions) == everything
    assert {s.session_id: s.create_time_ms for s in page.sessions if s.session_id != "listed"} == created
    assert [s.turn_count for s in page.sessions if s.session_id == "talked"] == [1]
    # Checked in the pass (they were due at once): given their TTL left.
    seconds, micros = await client.time()
    scores = await client.zrange(session_store.listing_key(tenant, "due"), 0, -1, withscores=True)
    assert all(score > seconds * 1000 + micros // 1000 + 500_000 for _, score in scores)

    await a_pass(sweep_of(long, client))
    assert await listed(client, tenant) == (everything, everything)


async def test_a_session_deleted_while_the_sweep_lists_it_is_not_listed_for_good(
    client, tenant, background_sweeps_idle
) -> None:
    """The sweep reads a session's creation time in its slot and lists it
    in the tenant's: a delete between the two (its unlisting finding
    nothing yet) would leave an entry of a session gone, which without a
    session TTL only a page would ever prune. The entry is due at once, and
    the pass's check of the tenant's due entries unlists it."""
    kept_forever = session_store.SessionStore(client, 0, max_bytes_per_tenant=BOUND)
    for session_id in ("raced", "kept"):
        await made_by_an_older_replica(kept_forever, tenant, session_id)
    sweep = sweep_of(kept_forever, client)
    read = kept_forever.listing._creation_times
    raced = []

    async def deleted_once_read(sessions: list[tuple[str, str]]) -> list[int | None]:
        created = await read(sessions)
        if (tenant, "raced") in sessions:
            await kept_forever.delete(tenant, "raced")
            raced.append(sessions)
        return created

    kept_forever.listing._creation_times = deleted_once_read
    await a_pass(sweep)
    assert raced, "the sweep never read the session"
    assert await listed(client, tenant) == (["kept"], ["kept"])
    # The one left lives with no TTL: never due again.
    due = await client.zrange(session_store.listing_key(tenant, "due"), 0, -1, withscores=True)
    assert [score for _, score in due] == [float("inf")]


async def test_a_session_key_of_another_type_fails_no_create_nor_its_tenants_listing(client, tenant) -> None:
    """A listed session whose meta key holds a set: once its entry was due,
    every create of the tenant answered INTERNAL though it made its session,
    and every page of its listing failed (a review)."""
    short, long = stores(client)
    await short.create(tenant, "damaged")
    await long.create(tenant, "kept")
    meta = session_store.session_key(tenant, "damaged")
    await client.delete(meta)
    await client.sadd(meta, "not a session")
    try:
        await asyncio.sleep(1.2)  # its entry is due: the next create checks it
        await long.create(tenant, "after")
        page = await long.listing.page(tenant, 10)
        assert sorted(s.session_id for s in page.sessions) == ["after", "kept"]
        assert await listed(client, tenant) == (["after", "kept"], ["after", "kept"])
    finally:
        await client.delete(meta)


async def test_a_tenant_whose_records_fail_to_sweep_holds_up_no_other(client, tenant) -> None:
    """A tenant whose sweep fails (its listing's key of another type) went
    back to the front of the queue at each tick, and no other tenant was
    ever swept again (a review)."""
    short, long = stores(client)
    broken = f"{tenant}-broken"
    await short.create(broken, "s")
    due = session_store.listing_key(broken, "due")
    await client.delete(due)
    await client.set(due, "not a sorted set")
    gone = ["e0", "e1"]
    for session_id in gone:
        await short.create(tenant, session_id)
    await expired(client, tenant, gone)
    try:
        await a_pass(sweep_of(long, client))
        assert await client.exists(*tenant_keys(tenant)) == 0
    finally:
        await client.delete(*tenant_keys(broken))


async def test_a_meta_whose_fields_are_no_numbers_holds_up_no_sweep(client, tenant) -> None:
    """A key of a session's meta name whose create_time_ms is no number
    (another program's write) raised in the batch of every session a SCAN
    found, before the cursor was saved: every tick failed at the same keys,
    and no session found unlisted was ever listed (a review)."""
    _, long = stores(client)
    broken = session_store.session_key(f"{tenant}-broken", "s")
    await client.hset(broken, mapping={"version": 1, "create_time_ms": "not a number"})
    seconds, micros = await client.time()
    # A live session its listing lacks, as one made before the listing existed.
    await client.hset(
        session_store.session_key(tenant, "unlisted"),
        mapping={"version": 0, "create_time_ms": seconds * 1000 + micros // 1000, "update_time_ms": 0},
    )
    try:
        await a_pass(sweep_of(long, client))
        assert (await listed(client, tenant))[0] == ["unlisted"]
    finally:
        await client.delete(broken, *session_store.session_keys(tenant, "unlisted"), *tenant_keys(tenant))


async def test_only_keys_that_hold_no_sessions_are_warned_of_not_sessions_gone(client, tenant) -> None:
    """A listed session that expired is unlisted in silence: the warning is
    for keys another program wrote (a review: every expiry read as one)."""
    short, long = stores(client)
    await short.create(tenant, "expiring")
    await short.create(tenant, "damaged")
    meta = session_store.session_key(tenant, "damaged")
    try:
        await expired(client, tenant, ["expiring", "damaged"])
        await client.sadd(meta, "not a session")
        await asyncio.sleep(0.1)  # both entries due (a second after their creation)
        with structlog.testing.capture_logs() as logged:
            assert await long.listing.checked_due(tenant, 10) == 2
        warned = [entry["member"] for entry in logged if entry["log_level"] == "warning"]
        assert [member.rpartition(":")[2] for member in warned] == ["damaged"]
        assert await listed(client, tenant) == ([], [])
    finally:
        await client.delete(meta, *tenant_keys(tenant))
