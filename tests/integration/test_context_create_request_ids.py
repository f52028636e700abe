"""CreateSession's request_id (AIP-155) through the real context service
over a real Redis: a resend of a create, its reply lost, is answered with
the session the first send made instead of making a second one, unseen,
that holds the tenant's bytes (context.max_bytes_per_tenant) until it
expires; sends at once make one session, and a create and a fork sent at
once under one id one session between them. The router's own resend after an
UNAVAILABLE: tests/integration/test_router_session_api.py."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.errors import error_info
from services.context import store as session_store
from tests.integration.test_context_fork_request_ids import sessions_of
from tests.integration.test_context_service import USER, failure, msg, new_session, running
from tests.integration.test_context_tenant_holdings import bounded, counted

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def stub(redis_url: str):
    async with running(bounded(redis_url, 1024 * 1024)) as stub:
        yield stub


async def test_a_resend_of_a_creates_request_id_is_answered_with_that_session(
    stub, tenant, redis_client
) -> None:
    """Two sends of one create, as a client whose reply was lost sends
    them, made two sessions. With a request_id the second gets the first's
    answer (in either case of the id), even once the session was written
    to, and nothing more is made or counted. Once the session is deleted, a
    resend is refused SESSION_NOT_FOUND: it made the deleted id again,
    empty, and every other holder of the id wrote into it (a review)."""
    request_id = str(uuid.uuid4())
    create = pb.CreateSessionRequest(tenant_id=tenant, request_id=request_id)
    first = await stub.CreateSession(create)
    assert first.session.version == 0
    held = await counted(redis_client, tenant)
    create.request_id = request_id.upper()
    assert await stub.CreateSession(create) == first
    assert await sessions_of(redis_client, tenant) == {first.session.session_id}
    assert await counted(redis_client, tenant) == held
    here = {"tenant_id": tenant, "session_id": first.session.session_id}
    await stub.AppendTurns(pb.AppendTurnsRequest(**here, expected_version=0, messages=[msg(USER, "hello")]))
    # The count lost with the first send's reply is set again by the resend.
    await redis_client.delete(session_store.holdings_key(tenant, "bytes"))
    assert await stub.CreateSession(create) == first
    assert (await counted(redis_client, tenant))[b"total"] > held[b"total"]
    assert (await stub.GetSession(pb.GetSessionRequest(**here))).session.version == 1
    await stub.DeleteSession(pb.DeleteSessionRequest(**here))
    session_id = first.session.session_id
    assert await failure(stub.CreateSession(create)) == (
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
        {"session_id": session_id},
    )
    assert (await failure(stub.GetSession(pb.GetSessionRequest(**here))))[1] == "SESSION_NOT_FOUND"
    assert session_id not in await sessions_of(redis_client, tenant)
    # A second delete (a resend of its own, or the router's cleanup retried)
    # leaves the mark: it deleted it, and the create's resend made the
    # deleted session again (a review).
    assert (await failure(stub.DeleteSession(pb.DeleteSessionRequest(**here))))[1] == "SESSION_NOT_FOUND"
    assert (await failure(stub.CreateSession(create)))[1] == "SESSION_NOT_FOUND"
    assert session_id not in await sessions_of(redis_client, tenant)
    # The same request id with another request is another request's.
    other = await new_session(stub, tenant)
    fork = pb.ForkSessionRequest(tenant_id=tenant, session_id=other, request_id=request_id)
    assert (await failure(stub.ForkSession(fork)))[1] == "REQUEST_ID_REUSED"


async def test_sends_of_one_request_id_at_once_make_one_session(stub, tenant, redis_client) -> None:
    create = pb.CreateSessionRequest(tenant_id=tenant, request_id=str(uuid.uuid4()))
    answers = await asyncio.gather(*(stub.CreateSession(create) for _ in range(8)))
    assert len({answer.SerializeToString() for answer in answers}) == 1
    assert await sessions_of(redis_client, tenant) == {answers[0].session.session_id}


async def test_a_fork_under_a_creates_request_id_is_refused(stub, tenant, redis_client) -> None:
    """A request id names one request: a fork sent under a create's made
    another session (each method drew its id apart). It is refused while
    the created session lives, and the create's resend is still answered
    with its session."""
    request_id = str(uuid.uuid4())
    create = pb.CreateSessionRequest(tenant_id=tenant, request_id=request_id)
    created = await stub.CreateSession(create)
    source = created.session.session_id
    fork = pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=0, request_id=request_id)
    code, reason, _ = await failure(stub.ForkSession(fork))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert await sessions_of(redis_client, tenant) == {source}
    assert await stub.CreateSession(create) == created


async def test_a_create_under_a_forks_request_id_is_refused(stub, tenant, redis_client) -> None:
    """The other way round: a create sent under a fork's request id made a
    session beside the fork. It is refused while the fork lives, and the
    fork's resend is still answered with its fork."""
    source = await new_session(stub, tenant)
    request_id = str(uuid.uuid4())
    fork = pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=0, request_id=request_id)
    forked = await stub.ForkSession(fork)
    create = pb.CreateSessionRequest(tenant_id=tenant, request_id=request_id)
    code, reason, _ = await failure(stub.CreateSession(create))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert await sessions_of(redis_client, tenant) == {source, forked.session.session_id}
    assert await stub.ForkSession(fork) == forked


async def test_bad_request_ids_are_refused(stub, tenant, redis_client) -> None:
    for request_id, session_id in (
        ("not-a-uuid", ""),
        (str(uuid.uuid1()), ""),
        (uuid.uuid4().hex, ""),
        (str(uuid.uuid4()), "named"),
    ):
        bad = pb.CreateSessionRequest(tenant_id=tenant, request_id=request_id, session_id=session_id)
        code, reason, _ = await failure(stub.CreateSession(bad))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST_ID"), request_id
    assert await sessions_of(redis_client, tenant) == set()


async def test_a_create_and_a_fork_sent_at_once_under_one_request_id_make_one_session(
    stub, tenant, redis_client
) -> None:
    """A create and a fork sent at the same moment under one request id: of
    each such pair one is answered and the other refused REQUEST_ID_REUSED,
    never both made. Each method drew its session's id apart and looked for
    the other's with a read of its own before its script (check, then act,
    across two slots): 64 pairs sent at once made both sessions in most of
    them."""
    source = await new_session(stub, tenant)
    pairs = 64
    request_ids = [str(uuid.uuid4()) for _ in range(pairs)]
    sends = [
        send
        for request_id in request_ids
        for send in (
            stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, request_id=request_id)),
            stub.ForkSession(
                pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=0, request_id=request_id)
            ),
        )
    ]
    outcomes = await asyncio.gather(*sends, return_exceptions=True)
    made = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    both_made = sum(
        not isinstance(create, BaseException) and not isinstance(fork, BaseException)
        for create, fork in zip(outcomes[::2], outcomes[1::2], strict=True)
    )
    assert both_made == 0, f"both were answered in {both_made} of {pairs} pairs"
    assert len(made) == pairs
    for error in refused:
        assert isinstance(error, grpc.aio.AioRpcError), error
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS, error
        assert error_info(error).reason == "REQUEST_ID_REUSED"
    assert await sessions_of(redis_client, tenant) == {source} | {
        answer.session.session_id for answer in made
    }
