"""ForkSession's request_id (AIP-155) through the real context service over
a real Redis: a resend of a fork's request, its reply lost, is answered with
the fork the first send made instead of making a second one, unseen, that
holds the tenant's bytes (context.max_bytes_per_tenant); sends at once make
one fork; the same id with another request is refused; the record that
answers a resend lives FORK_REQUEST_RETENTION_S, or until the fork is
deleted. The router's resend after an UNAVAILABLE:
tests/integration/test_router_session_api.py."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from meshgate.context.v1 import context_service_pb2 as pb
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


async def test_the_record_lives_its_retention_or_until_the_fork_is_deleted(
    stub, tenant, redis_client
) -> None:
    """The record is kept FORK_REQUEST_RETENTION_S, or session_ttl_s where
    shorter (here 600 s: a fork never written expires then, and a record
    kept longer would answer a resend with a fork that is gone); past it a
    resend acts anew (the fork's id is the request id's: SESSION_EXISTS
    while it lives). A deletion of the fork takes its record: a resend then
    makes it again."""
    source = await source_of(stub, tenant)
    fork = pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=1, request_id=str(uuid.uuid4()))
    fork_id = (await stub.ForkSession(fork)).session.session_id
    record = session_store.fork_request_key(tenant, fork_id)
    left_s = await redis_client.ttl(record)
    assert 600 - 5 < left_s <= await redis_client.ttl(session_store.session_key(tenant, fork_id)) <= 600
    assert session_store.FORK_REQUEST_RETENTION_S == 24 * 3600  # as the protos say
    # As when its time is up.
    await redis_client.pexpire(record, 1)
    await asyncio.sleep(0.01)
    code, reason, _ = await failure(stub.ForkSession(fork))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "SESSION_EXISTS")

    fork.request_id = str(uuid.uuid4())
    fork_id = (await stub.ForkSession(fork)).session.session_id
    await stub.DeleteSession(pb.DeleteSessionRequest(tenant_id=tenant, session_id=fork_id))
    assert not await redis_client.exists(session_store.fork_request_key(tenant, fork_id))
    again = await stub.ForkSession(fork)
    assert again.session.session_id == fork_id
    assert fork_id in await sessions_of(redis_client, tenant)
