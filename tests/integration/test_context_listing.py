"""The tenant's listing of its sessions (ContextService.ListSessions,
store.SessionListing) over a real Redis: newest first, a page at a time;
creates, forks and deletes keep it true, entries of sessions gone (expired,
deleted with their unlisting lost, created again under their id) are pruned
by the page that meets them or by the next create that finds them due,
and a session that lives through a whole listing is listed exactly once
while sessions are created and deleted between its pages."""

from __future__ import annotations

import contextlib
import urllib.parse
import uuid

import grpc
import pytest
import redis.asyncio as redis

from meshgate.context.v1 import context_service_pb2 as pb
from services.context import store as session_store
from services.context.servicer import _drawn_session_id
from services.context.tenant_sweep import TenantSweep
from tests.integration.test_context_service import USER, failure, make_settings, msg, running
from tests.integration.test_context_tenant_sweep import a_pass
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

TTL_S = 600


@pytest.fixture
async def client(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
async def stub(redis_url: str):
    async with running(make_settings(redis_url)) as stub:
        yield stub


async def listed_ids(sessions: session_store.SessionStore, tenant: str, size: int = 1000) -> list[str]:
    """Every session the tenant's listing shows, page after page."""
    ids: list[str] = []
    after = None
    while True:
        page = await sessions.listing.page(tenant, size, after)
        ids += [listed.session_id for listed in page.sessions]
        if page.following is None:
            return ids
        after = page.following


async def entries(client: redis.Redis, tenant: str) -> tuple[int, int]:
    """How many members the tenant's listing holds: (newest, due)."""
    return (
        await client.zcard(session_store.listing_key(tenant, "newest")),
        await client.zcard(session_store.listing_key(tenant, "due")),
    )


async def now_of(client: redis.Redis) -> int:
    """Redis's clock, in ms, as the listing's scripts read it."""
    seconds, micros = await client.time()
    return seconds * 1000 + micros // 1000


async def expire(client: redis.Redis, tenant: str, session_id: str) -> None:
    """What Redis's expiry does to a session: every key goes, and nothing of
    ours runs (its listing entry stays)."""
    await client.delete(*session_store.session_keys(tenant, session_id))


async def test_sessions_are_listed_newest_first_a_page_at_a_time(stub, tenant) -> None:
    created = []
    for turns in range(5):
        session = (await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))).session
        for turn in range(turns):
            await stub.AppendTurns(
                pb.AppendTurnsRequest(
                    tenant_id=tenant,
                    session_id=session.session_id,
                    any_version=True,
                    messages=[msg(USER, f"turn {turn}"), msg(USER, "and more")],
                )
            )
        created.append(session)
    # The order the listing promises, from what each create answered.
    newest_first = sorted(created, key=lambda s: (s.create_time_ms, s.session_id), reverse=True)

    pages = []
    token = ""
    while True:
        page = await stub.ListSessions(
            pb.ListSessionsRequest(tenant_id=tenant, page_size=2, page_token=token)
        )
        pages.append([listed.session_id for listed in page.sessions])
        token = page.next_page_token
        if not token:
            break
    assert [len(page) for page in pages] == [2, 2, 1]
    assert sum(pages, []) == [s.session_id for s in newest_first]

    everything = (await stub.ListSessions(pb.ListSessionsRequest(tenant_id=tenant))).sessions
    assert everything[0] == pb.SessionSummary(
        session_id=newest_first[0].session_id,
        version=created.index(newest_first[0]),
        create_time_ms=newest_first[0].create_time_ms,
        update_time_ms=everything[0].update_time_ms,
        turn_count=2 * created.index(newest_first[0]),
    )
    for listed in everything:
        read = (
            await stub.GetSession(pb.GetSessionRequest(tenant_id=tenant, session_id=listed.session_id))
        ).session
        assert (listed.version, listed.create_time_ms, listed.update_time_ms, listed.turn_count) == (
            read.version,
            read.create_time_ms,
            read.update_time_ms,
            len(read.messages),
        )


async def test_a_tenant_lists_only_its_own_sessions_and_pages(stub, tenant) -> None:
    other = f"other-{uuid.uuid4().hex[:8]}"
    mine = [
        (await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))).session.session_id
        for _ in range(3)
    ]
    # Another tenant's session under an id the first tenant uses too.
    await stub.CreateSession(pb.CreateSessionRequest(tenant_id=other, session_id=mine[0]))
    await stub.CreateSession(pb.CreateSessionRequest(tenant_id=other))

    first = await stub.ListSessions(pb.ListSessionsRequest(tenant_id=tenant, page_size=1))
    assert first.next_page_token
    theirs = await stub.ListSessions(pb.ListSessionsRequest(tenant_id=other))
    assert len(theirs.sessions) == 2 and not set(s.session_id for s in theirs.sessions) & (
        set(mine) - {mine[0]}
    )
    ours = await stub.ListSessions(pb.ListSessionsRequest(tenant_id=tenant))
    assert sorted(s.session_id for s in ours.sessions) == sorted(mine)

    # The first tenant's token names a place in its listing only.
    code, reason, _ = await failure(
        stub.ListSessions(pb.ListSessionsRequest(tenant_id=other, page_token=first.next_page_token))
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    altered = first.next_page_token[:-1] + ("A" if first.next_page_token[-1] != "A" else "B")
    code, reason, _ = await failure(
        stub.ListSessions(pb.ListSessionsRequest(tenant_id=tenant, page_token=altered))
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    code, reason, _ = await failure(stub.ListSessions(pb.ListSessionsRequest(tenant_id=tenant, page_size=-1)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_SIZE")
    code, reason, _ = await failure(stub.ListSessions(pb.ListSessionsRequest()))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TENANT_REQUIRED")


async def test_a_deleted_session_leaves_the_listing(client, tenant) -> None:
    sessions = session_store.SessionStore(client, TTL_S)
    for session_id in ("kept", "deleted"):
        await sessions.create(tenant, session_id)
    assert await entries(client, tenant) == (2, 2)
    await sessions.delete(tenant, "deleted")
    assert await entries(client, tenant) == (1, 1)
    assert await listed_ids(sessions, tenant) == ["kept"]


def a_send(method: str) -> session_store.RequestIdSend:
    """A send under a request id whose session's id the caller drew (as
    the servicer draws it), of a create or a fork: its one request."""
    return session_store.RequestIdSend(f"digest of a {method}", method == "create", f"{method}-of-before")


async def test_forks_are_listed_once_however_often_their_request_is_sent(client, tenant) -> None:
    sessions = session_store.SessionStore(client, TTL_S)
    await sessions.create(tenant, "source")
    await sessions.append(tenant, "source", 0, [msg(USER, "hello")], {})
    await sessions.fork(tenant, "source", 1, "fork")
    # A request id's fork (its id drawn from the request id: servicer.py), sent twice.
    for _ in range(2):
        await sessions.fork(tenant, "source", 1, "fork-of-a-request", a_send("fork"))
    assert sorted(await listed_ids(sessions, tenant)) == ["fork", "fork-of-a-request", "source"]
    assert await entries(client, tenant) == (3, 3)


async def test_a_resend_of_a_request_id_lists_what_its_first_send_left_unlisted(
    client, tenant, background_sweeps_idle
) -> None:
    """A create or fork whose listing was lost after its script (Redis
    failed between the two; the call answered UNAVAILABLE): the resend of
    its request id, answered with the same session, lists it (and not a
    background sweep of a context service of this module's, which lists
    what it finds unlisted, between the two)."""
    sessions = session_store.SessionStore(client, TTL_S)
    await sessions.create(tenant, "created", a_send("create"))
    await sessions.append(tenant, "created", 0, [msg(USER, "hello")], {})
    await sessions.fork(tenant, "created", 1, "forked", a_send("fork"))
    await client.delete(*(session_store.listing_key(tenant, part) for part in ("newest", "due")))
    assert await listed_ids(sessions, tenant) == []
    await sessions.create(tenant, "created", a_send("create"))
    await sessions.fork(tenant, "created", 1, "forked", a_send("fork"))
    assert sorted(await listed_ids(sessions, tenant)) == ["created", "forked"]


async def test_an_entry_whose_unlisting_was_lost_is_pruned_by_the_page_that_meets_it(client, tenant) -> None:
    """Expired, or deleted by a replica whose unlisting failed: its session
    is gone and its entry stays until a page reads it."""
    sessions = session_store.SessionStore(client, TTL_S)
    for session_id in ("older", "expired", "newer"):
        await sessions.create(tenant, session_id)
    await expire(client, tenant, "expired")
    # Sorted: made in one millisecond, they are listed by id (a flake seen here).
    assert sorted(await listed_ids(sessions, tenant)) == ["newer", "older"]
    assert await entries(client, tenant) == (2, 2)


async def test_an_earlier_life_of_a_session_id_is_not_listed_for_the_current_one(client, tenant) -> None:
    """An id deleted (its unlisting lost) or expired, then created again:
    its earlier life's entry names another creation time, and is pruned,
    not listed as the session now under that id."""
    sessions = session_store.SessionStore(client, TTL_S)
    created_ms = await sessions.create(tenant, "again")
    earlier = session_store.listed_member("again", created_ms - 60_000)
    await client.zadd(session_store.listing_key(tenant, "newest"), {earlier: 0})
    await client.zadd(session_store.listing_key(tenant, "due"), {earlier: 0})
    page = await sessions.listing.page(tenant, 10)
    assert [(listed.session_id, listed.create_time_ms) for listed in page.sessions] == [("again", created_ms)]
    assert await entries(client, tenant) == (1, 1)


async def test_a_create_prunes_due_entries_of_expired_sessions_unlisted(client, tenant) -> None:
    """A tenant that never lists: each create checks the entries whose
    sessions' TTLs have passed (here as if they had), unlists those gone
    and gives those still live their TTL left."""
    sessions = session_store.SessionStore(client, TTL_S)
    for session_id in ("expired", "renewed"):
        await sessions.create(tenant, session_id)
    await expire(client, tenant, "expired")
    due = session_store.listing_key(tenant, "due")
    members = await client.zrange(due, 0, -1)
    await client.zadd(due, dict.fromkeys(members, 0))

    await sessions.create(tenant, "new")
    assert await entries(client, tenant) == (2, 2)
    now_ms = await now_of(client)
    scores = dict(await client.zrange(due, 0, -1, withscores=True))
    renewed = [member for member in scores if member.endswith(b":renewed")]
    assert len(renewed) == 1
    # When it would expire now: its TTL left, not the 0 it was given.
    assert now_ms + (TTL_S - 60) * 1000 < scores[renewed[0]] <= now_ms + TTL_S * 1000
    assert sorted(await listed_ids(sessions, tenant)) == ["new", "renewed"]


async def test_a_page_reads_a_bounded_number_of_entries_of_sessions_gone(client, tenant) -> None:
    """Twenty newer sessions expired above two live ones: a page of two
    reads at most LISTING_ROUNDS rounds of them, answers none, and names
    where the next page goes on, rather than read the tenant's whole listing."""
    sessions = session_store.SessionStore(client, TTL_S)
    for n in range(2):
        await sessions.create(tenant, f"live{n}")
    for n in range(20):
        await sessions.create(tenant, f"gone{n:02d}")
        await expire(client, tenant, f"gone{n:02d}")
    page = await sessions.listing.page(tenant, 2)
    assert page.sessions == [] and page.following is not None
    # Two read a round, four rounds: eight pruned, the rest left to read.
    assert session_store.LISTING_ROUNDS == 4
    assert await entries(client, tenant) == (14, 14)
    assert sorted(await listed_ids(sessions, tenant, size=2)) == ["live0", "live1"]
    assert await entries(client, tenant) == (2, 2)


async def test_sessions_lasting_through_a_listing_are_listed_once_while_others_come_and_go(
    client, tenant
) -> None:
    """Between every two pages, a session the listing has passed and one it
    has yet to reach are deleted, and two are created: a listing by offset
    would skip or repeat sessions then; by place, each session that lives
    through it is listed once, and one deleted before its page reached it
    not at all."""
    sessions = session_store.SessionStore(client, TTL_S)
    lasting = [f"lasting{n:02d}" for n in range(30)]
    passing = [f"passing{n:02d}" for n in range(30)]
    # Interleaved in creation order, so deletes fall before and after every page's place.
    for kept, going in zip(lasting, passing, strict=True):
        await sessions.create(tenant, kept)
        await sessions.create(tenant, going)
    listed: list[str] = []
    deleted_unreached: set[str] = set()
    created = 0
    after = None
    while True:
        page = await sessions.listing.page(tenant, 4, after)
        listed += [listed_session.session_id for listed_session in page.sessions]
        if page.following is None:
            break
        after = page.following
        # The oldest left, yet to be reached (newest first), and the newest left, passed.
        for going in (passing.pop(0), passing.pop()) if len(passing) > 1 else ():
            await sessions.delete(tenant, going)
            if going not in listed:
                deleted_unreached.add(going)
        for _ in range(2):
            await sessions.create(tenant, f"new{created:02d}")
            created += 1
    counted = {session_id: listed.count(session_id) for session_id in set(listed)}
    assert all(count == 1 for count in counted.values()), counted
    assert set(lasting) <= set(listed)
    assert deleted_unreached and not deleted_unreached & set(listed)
    # More deletes and creates than pages: every gap between pages had some.
    assert created > 20


# Above cache.report_replication_timeout_s (1 s), as the settings' check requires.
STALLED_COMMAND_TIMEOUT_S = 1.5


@contextlib.asynccontextmanager
async def through_a_proxy(redis_url: str):
    """A context service whose Redis traffic goes through a TcpProxy: (stub, proxy).
    A command the proxy stalls is waited for redis.timeout_s: 1.5 s here, not
    the default 3 s (the test stalls three; each failure is the same at
    either), and still hundreds of times what a command to this Redis takes."""
    proxy = TcpProxy(urllib.parse.urlsplit(redis_url).port)
    settings = make_settings(f"redis://127.0.0.1:{await proxy.start()}/0")
    settings.redis.timeout_s = STALLED_COMMAND_TIMEOUT_S
    try:
        async with running(settings) as stub:
            yield stub, proxy
    finally:
        await proxy.close()


async def made(client: redis.Redis, tenant: str) -> list[str]:
    """The ids of the tenant's sessions in Redis."""
    keys = [key async for key in client.scan_iter(match=f"mg:context:{{*:{tenant}}}:meta")]
    return sorted(key.decode().partition("{")[2].partition(":")[0] for key in keys)


async def test_a_create_or_fork_without_a_request_id_whose_listing_fails_is_answered(
    client, redis_url, tenant, background_sweeps_idle
) -> None:
    """Redis fails between a session's script and its listing (here: the
    listing's command never reaches it, and its connection times out). A
    create or fork with no request id was answered UNAVAILABLE, the session
    made: its caller's resend made a second one. It is answered; the
    session is unlisted until a pass of the tenant sweep lists it (it
    stayed unlisted for its life: the sweep walked listings, not
    sessions). With a request id, UNAVAILABLE still: the resend is answered
    with the same session, and lists it."""
    sessions = session_store.SessionStore(client, TTL_S)
    async with through_a_proxy(redis_url) as (stub, proxy):
        await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, session_id="source"))
        # The listing's member, "<create ms>:<id>": in its command alone.
        proxy.stall_when_sent(b":fork\r\n")
        fork = pb.ForkSessionRequest(tenant_id=tenant, session_id="source", version=0, new_session_id="fork")
        forked = await stub.ForkSession(fork)
        assert forked.session.session_id == "fork"
        proxy.stall_when_sent(b":created\r\n")
        create = pb.CreateSessionRequest(tenant_id=tenant, session_id="created")
        assert (await stub.CreateSession(create)).session.session_id == "created"
        assert await made(client, tenant) == ["created", "fork", "source"]
        assert await listed_ids(sessions, tenant) == ["source"]

        with_request_id = pb.ForkSessionRequest(
            tenant_id=tenant, session_id="source", version=0, request_id=str(uuid.uuid4())
        )
        drawn = _drawn_session_id(with_request_id.request_id)
        proxy.stall_when_sent(f":{drawn}\r\n".encode())
        code, reason, _ = await failure(stub.ForkSession(with_request_id))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "REDIS_UNAVAILABLE")
        assert drawn in await made(client, tenant) and drawn not in await listed_ids(sessions, tenant)
        assert (await stub.ForkSession(with_request_id)).session.session_id == drawn
        assert sorted(await listed_ids(sessions, tenant)) == sorted(["source", drawn])
        assert len(await made(client, tenant)) == 4

        await a_pass(TenantSweep(client, sessions.listing, sessions.holdings))
        listed = [
            s.session_id for s in (await stub.ListSessions(pb.ListSessionsRequest(tenant_id=tenant))).sessions
        ]
        assert sorted(listed) == sorted(["created", "fork", "source", drawn])
        assert await entries(client, tenant) == (4, 4)
