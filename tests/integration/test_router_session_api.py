"""A tenant's own sessions managed through the real router (GetSession,
ListSessions, DeleteSession, ForkSession, RevertSession, PinToSession, UnpinFromSession)
in front of real context, cache and inference services (real Redis, real
Triton): each acts on the caller's tenant's session, another tenant's key
finds none (NOT_FOUND, SESSION_NOT_FOUND, as for one that does not exist),
and the context service's refusals of bad input come through as it gives
them. A delete gives the tenant its bytes back
(context.max_bytes_per_tenant): the next turn that did not fit is answered."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import urllib.parse
import uuid

import grpc
import pytest
import redis.asyncio

from meshgate.common.v1 import common_pb2
from meshgate.config import Settings, TenantSettings, hash_api_key
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.errors import error_info, retry_after_s
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.cache import app as cache_app
from services.context import app as context_app
from services.context import store as session_store
from services.router import app as router_app
from tests.integration.conftest import (
    answer_of,
    keyed_tenants,
    router_and_context,
    running,
    service_settings,
)
from tests.integration.test_router_session_full import refused, stored
from tests.mesh import bounded_channel, mesh_settings, router_channel
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

# Room for several turns of a short question as the bound counts them (their
# bytes, the answer's and 1,024 a message) beside two sessions: each test's
# tenant is its own, so one's sessions never fill another's room. What the
# room leaves after the quota test's last turn (less than another turn's
# question) is the same whatever a session counts.
MAX_BYTES_PER_TENANT = 14976 + 2 * session_store.SESSION_OVERHEAD_BYTES
TENANTS = ("manage", "pins", "quota", "strict", "other", "listing", "neighbour")
USER = common_pb2.ROLE_USER
FACT = "The user's cat is called Zanzibar."


@pytest.fixture(scope="module")
async def mesh(redis_url, inference_address):
    """(router stub, context stub, {name: (tenant id, auth metadata)}): one
    context replica, each tenant's sessions bounded at MAX_BYTES_PER_TENANT."""
    run = uuid.uuid4().hex[:8]
    tenants = {name: f"{name}-{run}" for name in TENANTS}
    settings = service_settings(redis_url, inference_address)
    settings.context.max_bytes_per_tenant = MAX_BYTES_PER_TENANT
    auth = keyed_tenants(settings, *tenants.values())
    async with router_and_context(settings) as (router, context):
        yield router, context, {name: (tenant, auth[tenant]) for name, tenant in tenants.items()}


def turn(session_id: str, text: str, **fields) -> pb.ChatRequest:
    return pb.ChatRequest(
        model="tiny-gpt",
        session_id=session_id,
        messages=[common_pb2.Message(role=USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=3, temperature=0.0),
        cache_policy=pb.CACHE_POLICY_BYPASS,
        **fields,
    )


async def new_session(router, auth) -> str:
    return (await router.CreateSession(pb.CreateSessionRequest(), metadata=auth)).session_id


async def status_of(call) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """A unary call that must fail: its code and its ErrorInfo's reason and metadata."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    info = error_info(caught.value)
    assert info is not None, caught.value
    return caught.value.code(), info.reason, dict(info.metadata)


def each_method(session_id: str) -> dict[str, object]:
    """A request of each session method of the router, on ``session_id``."""
    return {
        "GetSession": pb.GetSessionRequest(session_id=session_id),
        "DeleteSession": pb.DeleteSessionRequest(session_id=session_id),
        "ForkSession": pb.ForkSessionRequest(session_id=session_id, version=1),
        "RevertSession": pb.RevertSessionRequest(session_id=session_id, version=0),
        "PinToSession": pb.PinToSessionRequest(session_id=session_id, fact=FACT),
        "UnpinFromSession": pb.UnpinFromSessionRequest(session_id=session_id, fact=FACT),
    }


async def test_a_tenant_reads_back_forks_and_reverts_its_session(mesh) -> None:
    router, context, tenants = mesh
    tenant, auth = tenants["manage"]
    session_id = await new_session(router, auth)
    first, _ = await answer_of(router.Chat(turn(session_id, "first"), metadata=auth))
    second, _ = await answer_of(router.Chat(turn(session_id, "second"), metadata=auth))

    session = (await router.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=auth)).session
    assert (session.session_id, session.version) == (session_id, 2)
    assert [m.content for m in session.messages] == ["first", first, "second", second]
    assert session.create_time_ms <= session.update_time_ms

    forked = await router.ForkSession(pb.ForkSessionRequest(session_id=session_id, version=1), metadata=auth)
    assert forked.session_id != session_id and forked.version == 1
    assert await stored(context, tenant, forked.session_id) == (1, ["first", first])

    # A strict revert from a version the session has left is refused.
    stale = router.RevertSession(
        pb.RevertSessionRequest(session_id=session_id, version=1, expected_version=1), metadata=auth
    )
    assert (await status_of(stale))[:2] == (grpc.StatusCode.ABORTED, "VERSION_CONFLICT")
    assert await stored(context, tenant, session_id) == (2, ["first", first, "second", second])
    reverted = await router.RevertSession(
        pb.RevertSessionRequest(session_id=session_id, version=1, expected_version=2), metadata=auth
    )
    assert reverted.version == 3
    session = (await router.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=auth)).session
    assert (session.version, [m.content for m in session.messages]) == (3, ["first", first])
    # Turns go on from the version the revert made; the fork is untouched.
    _, completion = await answer_of(
        router.Chat(turn(session_id, "third", expected_session_version=3), metadata=auth)
    )
    assert completion.session_version == 4
    assert await stored(context, tenant, forked.session_id) == (1, ["first", first])


async def test_a_pinned_fact_is_in_every_later_turns_prompt_until_unpinned(mesh) -> None:
    router, context, tenants = mesh
    tenant, auth = tenants["pins"]
    session_id = await new_session(router, auth)
    await answer_of(router.Chat(turn(session_id, "hello"), metadata=auth))
    # The same session, without the pin: a fork taken before it.
    unpinned = (
        await router.ForkSession(pb.ForkSessionRequest(session_id=session_id, version=1), metadata=auth)
    ).session_id

    pin = pb.PinToSessionRequest(session_id=session_id, fact=FACT)
    assert (await router.PinToSession(pin, metadata=auth)).pin_count == 1
    assert (await router.PinToSession(pin, metadata=auth)).pin_count == 1  # pinned already
    by_index = pb.PinToSessionRequest(session_id=session_id, message_index=0)
    assert (await router.PinToSession(by_index, metadata=auth)).pin_count == 2
    session = (await router.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=auth)).session
    assert (list(session.pinned_turns), list(session.pinned_facts)) == ([0], [FACT])

    # The next turn's prompt holds the fact: what the context assembles for
    # it, and the tokens the model was given, beyond those of the fork's.
    assembled = await context.AssembleContext(
        context_pb.AssembleContextRequest(
            tenant_id=tenant,
            session_id=session_id,
            new_messages=[common_pb2.Message(role=USER, content="what is my cat called?")],
            model="tiny-gpt",
            max_prompt_tokens=200,
        )
    )
    assert FACT in [m.content for m in assembled.messages if m.role == common_pb2.ROLE_SYSTEM]
    assert context_pb.SOURCE_PINNED_FACT in [entry.source for entry in assembled.manifest.entries]
    _, with_pin = await answer_of(router.Chat(turn(session_id, "what is my cat called?"), metadata=auth))
    _, without = await answer_of(router.Chat(turn(unpinned, "what is my cat called?"), metadata=auth))
    assert with_pin.usage.prompt_tokens > without.usage.prompt_tokens

    unpin = pb.UnpinFromSessionRequest(session_id=session_id, fact=FACT)
    assert (await router.UnpinFromSession(unpin, metadata=auth)).pin_count == 1
    session = (await router.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=auth)).session
    assert (list(session.pinned_turns), list(session.pinned_facts)) == ([0], [])
    code, reason, _ = await status_of(router.UnpinFromSession(unpin, metadata=auth))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "PIN_NOT_FOUND")


async def test_a_tenant_deletes_its_session_and_has_its_bytes_back(mesh) -> None:
    router, context, tenants = mesh
    tenant, auth = tenants["quota"]
    session_id = await new_session(router, auth)
    other = await new_session(router, auth)
    # Turns until the tenant's sessions hold their bound: the one that finds
    # it is refused by its append, and the next before generating.
    answered = 0
    while True:
        try:
            await answer_of(router.Chat(turn(session_id, "q" * 200), metadata=auth))
        except grpc.aio.AioRpcError as error:
            assert error_info(error).reason == "SESSION_QUOTA_EXCEEDED", error
            break
        answered += 1
        assert answered < MAX_BYTES_PER_TENANT // 1000, "the tenant's sessions never reached their bound"
    assert answered > 0
    code, reason, _ = await refused(router.Chat(turn(other, "and now?"), metadata=auth))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_QUOTA_EXCEEDED")

    await router.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), metadata=auth)
    code, reason, metadata = await refused(router.Chat(turn(session_id, "still there?"), metadata=auth))
    assert (code, reason, metadata) == (
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
        {"session_id": session_id},
    )
    gone = router.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=auth)
    assert (await status_of(gone))[:2] == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    # Its bytes are the tenant's again: the turn refused before is answered.
    text, completion = await answer_of(router.Chat(turn(other, "and now?"), metadata=auth))
    assert completion.session_version == 1
    assert await stored(context, tenant, other) == (1, ["and now?", text])


async def test_another_tenants_session_is_not_found_and_left_as_it_was(mesh) -> None:
    router, context, tenants = mesh
    tenant, auth = tenants["strict"]
    _, others_auth = tenants["other"]
    session_id = await new_session(router, auth)
    text, _ = await answer_of(router.Chat(turn(session_id, "mine"), metadata=auth))
    missing = uuid.uuid4().hex

    for method, request in each_method(session_id).items():
        refusal = await status_of(getattr(router, method)(request, metadata=others_auth))
        # Exactly what that tenant is told of a session that does not exist.
        code, reason, metadata = await status_of(
            getattr(router, method)(each_method(missing)[method], metadata=others_auth)
        )
        assert refusal == (code, reason, {**metadata, "session_id": session_id}), method
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND"), method

    # Nothing of it changed: its turns, its version, no pin, not deleted.
    assert await stored(context, tenant, session_id) == (1, ["mine", text])
    pin = pb.PinToSessionRequest(session_id=session_id, fact=FACT)
    assert (await router.PinToSession(pin, metadata=auth)).pin_count == 1


async def test_a_tenant_lists_its_own_sessions_and_no_other_tenants(mesh) -> None:
    """ListSessions acts for the caller's key's tenant, as the other session
    methods do (its request names none): newest first, a page at a time,
    a page token good for that tenant's listing only."""
    router, _, tenants = mesh
    _, auth = tenants["listing"]
    _, neighbours_auth = tenants["neighbour"]
    mine = [await new_session(router, auth) for _ in range(3)]
    theirs = await new_session(router, neighbours_auth)
    await answer_of(router.Chat(turn(mine[0], "hello"), metadata=auth))

    pages, token = [], ""
    while True:
        page = await router.ListSessions(pb.ListSessionsRequest(page_size=2, page_token=token), metadata=auth)
        pages.append(list(page.sessions))
        token = page.next_page_token
        if not token:
            break
    assert [len(page) for page in pages] == [2, 1]
    listed = sum(pages, [])
    assert sorted(s.session_id for s in listed) == sorted(mine)
    assert listed == sorted(listed, key=lambda s: (s.create_time_ms, s.session_id), reverse=True)
    chatted = next(s for s in listed if s.session_id == mine[0])
    assert (chatted.version, chatted.turn_count) == (1, 2)
    assert chatted.create_time_ms <= chatted.update_time_ms
    neighbours = await router.ListSessions(pb.ListSessionsRequest(), metadata=neighbours_auth)
    assert [s.session_id for s in neighbours.sessions] == [theirs] and not neighbours.next_page_token

    first = await router.ListSessions(pb.ListSessionsRequest(page_size=1), metadata=auth)
    not_theirs = router.ListSessions(
        pb.ListSessionsRequest(page_token=first.next_page_token), metadata=neighbours_auth
    )
    assert (await status_of(not_theirs))[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    negative = router.ListSessions(pb.ListSessionsRequest(page_size=-1), metadata=auth)
    assert (await status_of(negative))[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_SIZE")

    await router.DeleteSession(pb.DeleteSessionRequest(session_id=mine[1]), metadata=auth)
    left = await router.ListSessions(pb.ListSessionsRequest(), metadata=auth)
    assert sorted(s.session_id for s in left.sessions) == sorted([mine[0], mine[2]])


async def test_bad_input_gets_the_context_services_status_through_the_router(mesh) -> None:
    router, _, tenants = mesh
    _, auth = tenants["strict"]
    session_id = await new_session(router, auth)

    for method, request in each_method("").items():
        code, reason, _ = await status_of(getattr(router, method)(request, metadata=auth))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SESSION_ID"), method

    fork = router.ForkSession(pb.ForkSessionRequest(session_id=session_id, version=7), metadata=auth)
    code, reason, metadata = await status_of(fork)
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND")
    assert (metadata["version"], metadata["current_version"]) == ("7", "0")
    revert = router.RevertSession(pb.RevertSessionRequest(session_id=session_id, version=-1), metadata=auth)
    assert (await status_of(revert))[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VERSION")
    no_pin = router.PinToSession(pb.PinToSessionRequest(session_id=session_id), metadata=auth)
    assert (await status_of(no_pin))[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PIN")
    no_turn = router.PinToSession(
        pb.PinToSessionRequest(session_id=session_id, message_index=3), metadata=auth
    )
    assert (await status_of(no_turn))[:2] == (grpc.StatusCode.NOT_FOUND, "PIN_TARGET_NOT_FOUND")
    # No session has a turn at -1: the request is invalid, nothing is missing.
    negative = router.PinToSession(
        pb.PinToSessionRequest(session_id=session_id, message_index=-1), metadata=auth
    )
    assert (await status_of(negative))[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PIN")

    # Without a key, no call reaches the context service.
    code, reason, _ = await status_of(router.GetSession(pb.GetSessionRequest(session_id=session_id)))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING")


@contextlib.asynccontextmanager
async def with_replies_dropped(redis_url: str):
    """A router, cache and context service whose Redis traffic goes through
    a TcpProxy: yields (router stub, context stub, tenant, auth metadata,
    proxy, a client of the Redis itself)."""
    tenant = f"lost-{uuid.uuid4().hex[:8]}"
    auth = (("authorization", f"Bearer key-{tenant}"),)
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.context.max_bytes_per_tenant = MAX_BYTES_PER_TENANT
    settings.router.tenants = [TenantSettings(id=tenant, api_key_sha256=[hash_api_key(f"key-{tenant}")])]
    proxy = TcpProxy(urllib.parse.urlsplit(redis_url).port)
    proxied = dataclasses.replace(
        settings, redis=dataclasses.replace(settings.redis, url=f"redis://127.0.0.1:{await proxy.start()}/0")
    )
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(proxy.close)
        client = redis.asyncio.from_url(redis_url)
        stack.push_async_callback(client.aclose)
        settings.router.context_address = await stack.enter_async_context(
            running(context_app, "context", proxied)
        )
        settings.router.cache_address = await stack.enter_async_context(running(cache_app, "cache", settings))
        router_address = await stack.enter_async_context(running(router_app, "router", settings))
        router = router_service_pb2_grpc.RouterServiceStub(
            await stack.enter_async_context(bounded_channel(router_address))
        )
        context = context_service_pb2_grpc.ContextServiceStub(
            await stack.enter_async_context(router_channel(settings.router.context_address, "context"))
        )
        yield router, context, tenant, auth, proxy, client


async def drop_the_reply_of(proxy: TcpProxy, client, script: str, send) -> asyncio.Future:
    """The call ``send()`` makes, with the reply to its first run of
    ``script`` in Redis dropped: the connection breaks after Redis ran it."""
    # Loaded, so that the script runs on its first send (EVALSHA).
    proxy.hold_when_sent((await client.script_load(script)).encode())
    sent = asyncio.ensure_future(send())
    for _ in range(200):
        if proxy.drop_held():
            return sent
        await asyncio.sleep(0.05)
    pytest.fail("the script never reached Redis")


async def test_a_strict_revert_whose_reply_is_lost_is_not_sent_again(redis_url) -> None:
    """The context service's revert runs in Redis and its reply never comes
    back (the connection breaks): the context service answers UNAVAILABLE
    (REDIS_UNAVAILABLE), the revert done. Sent again, the revert would find
    the session at the version the first made and be refused ABORTED
    (VERSION_CONFLICT), its caller told that a revert that was done was not.
    The router answers UNAVAILABLE (the outcome unknown), and the session
    holds the one revert."""
    async with with_replies_dropped(redis_url) as (router, context, tenant, auth, proxy, client):
        session_id = await new_session(router, auth)
        revert = pb.RevertSessionRequest(session_id=session_id, version=0, expected_version=0)
        sent = await drop_the_reply_of(
            proxy, client, session_store._REVERT, lambda: router.RevertSession(revert, metadata=auth)
        )
        code, reason, _ = await status_of(sent)
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "REDIS_UNAVAILABLE")
        assert await stored(context, tenant, session_id) == (1, [])


async def test_a_fork_whose_reply_is_lost_is_sent_again_under_its_request_id(redis_url) -> None:
    """The fork's script ran and its reply was lost: the router answered
    UNAVAILABLE, and its caller's resend made a second fork beside the
    first, which no one knew of and nothing counted on the tenant's bound
    (its count is set after the script). With a request_id, the router
    sends it again itself, and is answered the fork the first send made
    (counted then): one fork, its answer the same to the caller's resend."""
    async with with_replies_dropped(redis_url) as (router, context, tenant, auth, proxy, client):
        source = await new_session(router, auth)
        fork = pb.ForkSessionRequest(session_id=source, version=0, request_id=str(uuid.uuid4()))
        sent = await drop_the_reply_of(
            proxy, client, session_store._FORK_CREATE, lambda: router.ForkSession(fork, metadata=auth)
        )
        forked = await sent
        assert forked.session_id != source and forked.version == 0
        assert await router.ForkSession(fork, metadata=auth) == forked
        sessions = [key async for key in client.scan_iter(match=f"mg:context:{{*:{tenant}}}:meta")]
        assert len(sessions) == 2
        held = await client.hgetall(session_store.holdings_key(tenant, "bytes"))
        assert int(held[b"total"]) == 2 * session_store.held_by(0, 0)


async def test_a_fork_without_a_request_id_whose_reply_is_lost_is_answered_listed_and_counted(
    redis_url,
) -> None:
    """The fork's script ran and its reply was lost, the caller having sent
    no request_id: the router answered UNAVAILABLE, and the fork lived on
    unknown to anyone, neither listed (ListSessions showed the source
    alone) nor counted on the tenant's bound (1,280 bytes counted, one
    session's), until it expired. The router draws a request id for such a
    fork, as for a create: its own resend is answered with the fork, which
    is listed and counted then."""
    async with with_replies_dropped(redis_url) as (router, _, tenant, auth, proxy, client):
        source = await new_session(router, auth)
        fork = pb.ForkSessionRequest(session_id=source, version=0)
        sent = await drop_the_reply_of(
            proxy, client, session_store._FORK_CREATE, lambda: router.ForkSession(fork, metadata=auth)
        )
        forked = await sent
        sessions = [key async for key in client.scan_iter(match=f"mg:context:{{*:{tenant}}}:meta")]
        assert sorted(key.decode() for key in sessions) == sorted(
            session_store.session_keys(tenant, session_id)[0] for session_id in (source, forked.session_id)
        )
        listed = await router.ListSessions(pb.ListSessionsRequest(), metadata=auth)
        assert sorted(s.session_id for s in listed.sessions) == sorted([source, forked.session_id])
        held = await client.hgetall(session_store.holdings_key(tenant, "bytes"))
        assert int(held[b"total"]) == 2 * session_store.held_by(0, 0)


async def test_a_pin_with_a_stale_expected_version_is_refused_through_the_router(redis_url) -> None:
    """The router passes expected_version on: the caller read message 0 at
    version 1, and a revert and another turn since put another message
    there."""
    async with with_replies_dropped(redis_url) as (router, context, tenant, auth, _, _):
        session_id = await new_session(router, auth)
        here = {"tenant_id": tenant, "session_id": session_id}

        async def append(content: str) -> int:
            request = context_pb.AppendTurnsRequest(
                **here, any_version=True, messages=[common_pb2.Message(role=USER, content=content)]
            )
            return (await context.AppendTurns(request)).version

        read_at = await append("read by the caller")
        await router.RevertSession(pb.RevertSessionRequest(session_id=session_id, version=0), metadata=auth)
        now = await append("put there since")
        pin = pb.PinToSessionRequest(session_id=session_id, message_index=0, expected_version=read_at)
        code, reason, metadata = await status_of(router.PinToSession(pin, metadata=auth))
        assert (code, reason, metadata["current_version"]) == (
            grpc.StatusCode.ABORTED,
            "VERSION_CONFLICT",
            str(now),
        )
        pin.expected_version = now
        assert (await router.PinToSession(pin, metadata=auth)).pin_count == 1


async def test_a_create_whose_reply_is_lost_makes_one_session(redis_url) -> None:
    """The create's script ran and its reply was lost: the router sends a
    CreateSession again after an UNAVAILABLE (serving.RETRYABLE_METHODS),
    and each send made a session, one no caller knew of, held against the
    tenant's bound until it expired. The router gives each create a request
    id (one it draws where the caller sent none): its resend is answered
    with the session the first send made, counted once."""
    async with with_replies_dropped(redis_url) as (router, _, tenant, auth, proxy, client):
        sent = await drop_the_reply_of(
            proxy,
            client,
            session_store._CREATE,
            lambda: router.CreateSession(pb.CreateSessionRequest(), metadata=auth),
        )
        created = await sent
        sessions = [key async for key in client.scan_iter(match=f"mg:context:{{*:{tenant}}}:meta")]
        assert [key.decode() for key in sessions] == [
            session_store.session_keys(tenant, created.session_id)[0]
        ]
        held = await client.hgetall(session_store.holdings_key(tenant, "bytes"))
        assert int(held[b"total"]) == session_store.held_by(0, 0)


async def test_a_fork_under_a_creates_request_id_is_refused_through_the_router(mesh) -> None:
    """One request id, two requests: the fork made a second session beside
    the created one, its id drawn apart. It is refused; the create's resend
    still gets its session."""
    router, _, tenants = mesh
    _, auth = tenants["manage"]
    create = pb.CreateSessionRequest(request_id=str(uuid.uuid4()))
    created = await router.CreateSession(create, metadata=auth)
    fork = pb.ForkSessionRequest(session_id=created.session_id, version=0, request_id=create.request_id)
    code, reason, _ = await status_of(router.ForkSession(fork, metadata=auth))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert await router.CreateSession(create, metadata=auth) == created


async def test_a_callers_resend_of_a_create_under_its_request_id_gets_the_same_session(redis_url) -> None:
    async with with_replies_dropped(redis_url) as (router, _, tenant, auth, _, client):
        create = pb.CreateSessionRequest(request_id=str(uuid.uuid4()))
        first = await router.CreateSession(create, metadata=auth)
        assert await router.CreateSession(create, metadata=auth) == first
        sessions = [key async for key in client.scan_iter(match=f"mg:context:{{*:{tenant}}}:meta")]
        assert len(sessions) == 1
        code, reason, _ = await status_of(
            router.CreateSession(pb.CreateSessionRequest(request_id="not-a-uuid"), metadata=auth)
        )
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST_ID")


async def test_a_turn_on_an_alias_the_context_service_lacks_is_retryable_not_not_found(
    redis_url, inference_address
) -> None:
    """A review: a reload adding an alias reaches the router before the
    context service (its file watch takes 1-2 s), or the context service
    refused it; a session turn on the alias, which ListModels listed, was
    refused NOT_FOUND MODEL_NOT_FOUND (HTTP 404, which no client retries).
    It is the mesh's, retryable: UNAVAILABLE with a RetryInfo, and nothing
    stored. A stateless turn is sent as is, as when the context service is away."""
    tenant = f"aliases-{uuid.uuid4().hex[:8]}"
    settings = service_settings(redis_url, inference_address)
    auth = keyed_tenants(settings, tenant)[tenant]
    context_settings = dataclasses.replace(settings, models=dict(settings.models))
    settings.models["chat"] = settings.models["tiny-gpt"]
    async with contextlib.AsyncExitStack() as stack:
        settings.router.context_address = await stack.enter_async_context(
            running(context_app, "context", context_settings)
        )
        settings.router.cache_address = await stack.enter_async_context(running(cache_app, "cache", settings))
        address = await stack.enter_async_context(running(router_app, "router", settings))
        channel = await stack.enter_async_context(bounded_channel(address))
        router = router_service_pb2_grpc.RouterServiceStub(channel)
        session_id = await new_session(router, auth)
        request = turn(session_id, "hello")
        request.model = "chat"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await answer_of(router.Chat(request, metadata=auth))
        info = error_info(caught.value)
        assert (caught.value.code(), info.reason, dict(info.metadata)) == (
            grpc.StatusCode.UNAVAILABLE,
            "DOWNSTREAM_FAILED",
            {"service": "context", "code": "NOT_FOUND"},
        )
        assert retry_after_s(caught.value) == 2.0
        got = await router.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=auth)
        assert got.session.version == 0
        request.session_id = ""
        text, completion = await answer_of(router.Chat(request, metadata=auth))
        assert completion.usage.completion_tokens > 0
