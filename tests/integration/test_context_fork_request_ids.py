"""ForkSession's request_id (AIP-155) through the real context service over
a real Redis: a resend of a fork's request, its reply lost, is answered with
the fork the first send made instead of making a second one, unseen, that
holds the tenant's bytes (context.max_bytes_per_tenant); sends at once make
one fork; the same id with another request is refused; the request that
made the fork is kept with it, for its life; a fork a replica of before
made is answered to a resend here. The router's resend after an
UNAVAILABLE: tests/integration/test_router_session_api.py."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from meshgate import request_ids
from meshgate.context.v1 import context_service_pb2 as pb
from services.context import servicer
from services.context import store as session_store
from tests.integration.test_context_service import ASSISTANT, USER, failure, msg, new_session, running
from tests.integration.test_context_tenant_holdings import bounded, counted

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def stub(redis_url: str):
    async with running(bounded(redis_url, 1024 * 1024)) as stub:
        yield stub


async def sessions_of(client, tenant: str) -> set[str]:
    """The ids of the tenant's sessions in Redis, whatever counted them."""
    metas = [key.decode() async for key in client.scan_iter(match=f"mg:context:{{*:{tenant}}}:meta")]
    return {meta.split("{", 1)[1].split(":", 1)[0] for meta in metas}


async def source_of(stub, tenant: str) -> str:
    return await new_session(stub, tenant, msg(USER, "Where do the crates go?"), msg(ASSISTANT, "Lisbon."))


async def test_a_resend_of_a_forks_request_id_is_answered_with_that_fork(stub, tenant, redis_client) -> None:
    """Two sends of one fork, as a client whose reply was lost sends them,
    made two forks, each counted on the tenant's bound. With a request_id
    the second is the first's answer (in either case of the id), and
    nothing more is made or counted, even once the source is deleted."""
    source = await source_of(stub, tenant)
    request_id = str(uuid.uuid4())
    fork = pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=1, request_id=request_id)
    first = await stub.ForkSession(fork)
    held = await counted(redis_client, tenant)
    fork.request_id = request_id.upper()
    assert await stub.ForkSession(fork) == first
    assert await sessions_of(redis_client, tenant) == {source, first.session.session_id}
    assert await counted(redis_client, tenant) == held
    await stub.DeleteSession(pb.DeleteSessionRequest(tenant_id=tenant, session_id=source))
    assert await stub.ForkSession(fork) == first
    forked = pb.GetSessionRequest(tenant_id=tenant, session_id=first.session.session_id)
    messages = (await stub.GetSession(forked)).session.messages
    assert [m.content for m in messages] == ["Where do the crates go?", "Lisbon."]
    # Without one, each send is a fork of its own.
    source = await source_of(stub, tenant)
    plain = pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=1)
    assert (await stub.ForkSession(plain)).session.session_id != (
        await stub.ForkSession(plain)
    ).session.session_id


async def test_sends_of_one_request_id_at_once_make_one_fork(stub, tenant, redis_client) -> None:
    source = await source_of(stub, tenant)
    fork = pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=1, request_id=str(uuid.uuid4()))
    answers = await asyncio.gather(*(stub.ForkSession(fork) for _ in range(8)))
    assert all(answer == answers[0] for answer in answers)
    assert await sessions_of(redis_client, tenant) == {source, answers[0].session.session_id}
    record = await counted(redis_client, tenant)
    assert record[b"total"] == record[f"s:{source}".encode()] * 2


async def test_a_request_id_sent_with_another_request_is_refused(stub, tenant, redis_client) -> None:
    source = await source_of(stub, tenant)
    request_id = str(uuid.uuid4())
    await stub.ForkSession(
        pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=1, request_id=request_id)
    )
    other = await new_session(stub, tenant)
    for request in (
        pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=0, request_id=request_id),
        pb.ForkSessionRequest(tenant_id=tenant, session_id=other, version=0, request_id=request_id),
    ):
        code, reason, _ = await failure(stub.ForkSession(request))
        assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert len(await sessions_of(redis_client, tenant)) == 3
    # Another tenant's same id is another request.
    elsewhere = await source_of(stub, f"{tenant}-b")
    await stub.ForkSession(
        pb.ForkSessionRequest(tenant_id=f"{tenant}-b", session_id=elsewhere, version=0, request_id=request_id)
    )
    for request_id, new_session_id in (
        ("not-a-uuid", ""),
        (str(uuid.uuid1()), ""),
        (uuid.uuid4().hex, ""),
        (str(uuid.uuid4()), "named"),
    ):
        bad = pb.ForkSessionRequest(
            tenant_id=tenant,
            session_id=source,
            version=1,
            request_id=request_id,
            new_session_id=new_session_id,
        )
        code, reason, _ = await failure(stub.ForkSession(bad))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST_ID"), request_id


async def test_the_request_that_made_a_fork_is_kept_with_it_for_its_life(stub, tenant, redis_client) -> None:
    """The fork's meta names the request that made it (written by the
    script that makes the fork; no record of its own beside it, as replicas
    of before kept for 24 hours, past which a resend was SESSION_EXISTS):
    a resend is answered while the fork lives. Once the fork is deleted, a
    resend is refused SESSION_NOT_FOUND: it made the fork again, holding
    the source's turns the user had deleted it to be rid of (a review)."""
    source = await source_of(stub, tenant)
    fork = pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=1, request_id=str(uuid.uuid4()))
    first = await stub.ForkSession(fork)
    fork_id = first.session.session_id
    meta = session_store.session_key(tenant, fork_id)
    assert await redis_client.hget(meta, "request_digest") == request_ids.digest(fork).encode()
    assert not await redis_client.exists(session_store.fork_request_key(tenant, fork_id))
    # A day on, or more: nothing of the fork's own expires before it does.
    assert await stub.ForkSession(fork) == first

    await stub.DeleteSession(pb.DeleteSessionRequest(tenant_id=tenant, session_id=fork_id))
    assert (await failure(stub.ForkSession(fork)))[:2] == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    assert fork_id not in await sessions_of(redis_client, tenant)
    # The mark lasts the request id's retention, in the fork's slot.
    mark = session_store.deleted_key(tenant, fork_id)
    assert 0 < await redis_client.ttl(mark) <= session_store.DELETED_MARK_TTL_S
    # A second delete leaves it (it deleted it: a resend made the fork again).
    await failure(stub.DeleteSession(pb.DeleteSessionRequest(tenant_id=tenant, session_id=fork_id)))
    assert 0 < await redis_client.ttl(mark) <= session_store.DELETED_MARK_TTL_S
    assert (await failure(stub.ForkSession(fork)))[:2] == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")


async def test_sessions_that_replicas_of_before_drew_from_a_request_id_answer_its_resends(
    stub, tenant, redis_client
) -> None:
    """Replicas of before drew a fork's id apart from a create's (under its
    own label, its request in a record of its own beside it for 24 hours).
    A resend of their fork that reaches this replica (a rolling upgrade, a
    router's resend after an UNAVAILABLE) is answered with that fork, not
    made a second time at the id drawn now, and another request under its
    id is refused; their create is at the id both methods draw now, with no
    request in its meta: a create's resend is answered with it, a fork under
    its id refused. Both made here as those replicas left them."""
    source = await source_of(stub, tenant)
    request_id = str(uuid.uuid4())
    fork = pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=1, request_id=request_id)
    fork_id = servicer._fork_id_of_before(request_id)
    named = pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=1, new_session_id=fork_id)
    made = await stub.ForkSession(named)
    record = session_store.fork_request_key(tenant, fork_id)
    await redis_client.set(record, f"{request_ids.digest(fork)} {made.session.create_time_ms}", ex=600)
    held = await counted(redis_client, tenant)
    assert await stub.ForkSession(fork) == made
    assert await sessions_of(redis_client, tenant) == {source, fork_id}
    assert await counted(redis_client, tenant) == held
    for other in (
        stub.ForkSession(
            pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=0, request_id=request_id)
        ),
        stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, request_id=request_id)),
    ):
        code, reason, _ = await failure(other)
        assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    # Its deletion takes its record: a resend then makes the fork anew, at the id drawn now.
    await stub.DeleteSession(pb.DeleteSessionRequest(tenant_id=tenant, session_id=fork_id))
    assert not await redis_client.exists(record)
    assert (await stub.ForkSession(fork)).session.session_id == servicer._drawn_session_id(request_id)

    request_id = str(uuid.uuid4())
    created_id = servicer._drawn_session_id(request_id)
    created = await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, session_id=created_id))
    assert (
        await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, request_id=request_id)) == created
    )
    fork = pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=1, request_id=request_id)
    code, reason, _ = await failure(stub.ForkSession(fork))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert created_id in await sessions_of(redis_client, tenant)
