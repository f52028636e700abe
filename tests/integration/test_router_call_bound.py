"""router.max_concurrent_rpcs on a real router (in front of real context and
cache services, real Redis): with its ChatSession streams open up to the
bound, however idle, the next call is refused with RESOURCE_EXHAUSTED /
SERVICE_BUSY and its ErrorInfo, while AdminService calls are still served
(not counted), and once a stream closes the router serves again. And
router.max_session_streams_per_tenant: one tenant's streams past its cap are
refused at open with TOO_MANY_SESSION_STREAMS, another tenant's are not, and
a stream cancelled, or whose client went away, frees its slot. And
router.max_concurrent_rpcs_per_tenant: a tenant holding its cap of Chat
calls whose messages never come is refused its next call before its request
is read with TOO_MANY_CALLS_IN_FLIGHT, another tenant is served, and a held
call ending (cancelled, its client gone, its deadline passed) frees its
place. Calls without a valid key are refused before their requests are read
and take no place under the bound. A ChatSession client learns whether its
stream was admitted before its first write, so it always reads a refusal's
status."""

from __future__ import annotations

import asyncio
import collections
import contextlib

import grpc
import pytest

from meshgate.common.v1 import common_pb2
from meshgate.config import Settings, TenantSettings, hash_api_key
from meshgate.errors import error_info
from meshgate.reasons import Reason
from meshgate.router.v1 import admin_service_pb2 as admin_pb
from meshgate.router.v1 import admin_service_pb2_grpc, router_service_pb2_grpc
from meshgate.router.v1 import router_service_pb2 as pb
from tests.integration.conftest import running_router
from tests.mesh import (
    CALL_TIMEOUT_S,
    bounded_channel,
    chat_session_admitted,
    held_back,
    mesh_settings,
    rpc_outcomes,
)

pytestmark = pytest.mark.integration

KEY = "call-bound-test-key"
AUTH = (("authorization", f"Bearer {KEY}"),)
ADMIN_KEY = "call-bound-admin-key"
ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)
OTHER_KEY = "call-bound-other-tenant-key"
OTHER = (("authorization", f"Bearer {OTHER_KEY}"),)
# A tenant that holds nothing: its calls probe the router's bound.
PROBE_KEY = "call-bound-probe-tenant-key"
PROBE = (("authorization", f"Bearer {PROBE_KEY}"),)
# A tenant that holds its cap of calls in capped_router.
HOLDER_KEY = "call-bound-holder-tenant-key"
HOLDER = (("authorization", f"Bearer {HOLDER_KEY}"),)
LIMIT = 2
STREAMS_CAP = 2
# Room for STREAMS_CAP streams, the one refused past them and a few more
# opened while refused ones are still being counted out (a call is, a
# moment after its caller has its status): the stream cap is then what
# refuses a tenant's streams, not this one.
CALLS_CAP = STREAMS_CAP + 4
CHAT = f"/{pb.DESCRIPTOR.services_by_name['RouterService'].full_name}/Chat"


@pytest.fixture(scope="module")
async def router(redis_url):
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.router.dev_api_key = KEY
    # Low enough to fill. Each tenant's calls and streams below it, as the
    # settings require: the bound is held by one stream of each of two
    # tenants, and a third one's calls find it full.
    settings.router.max_concurrent_rpcs = LIMIT
    settings.router.max_concurrent_rpcs_per_tenant = LIMIT - 1
    settings.router.max_session_streams_per_tenant = LIMIT - 1
    settings.router.tenants = [tenant("other", OTHER_KEY), tenant("probe", PROBE_KEY)]
    settings.router.admin_api_key_sha256 = [hash_api_key(ADMIN_KEY)]
    async with contextlib.AsyncExitStack() as stack:
        address = await stack.enter_async_context(running_router(without_embedder(settings)))
        channel = await stack.enter_async_context(bounded_channel(address))
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        yield router_service_pb2_grpc.RouterServiceStub(channel), admin, channel


@pytest.fixture(scope="module")
async def capped_router(redis_url):
    """(a router whose tenants may each hold STREAMS_CAP ChatSession streams
    and CALLS_CAP calls in flight, its address); the replica's bound is the
    default, far above them."""
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.router.dev_api_key = KEY
    settings.router.tenants = [tenant("other", OTHER_KEY), tenant("holder", HOLDER_KEY)]
    settings.router.max_session_streams_per_tenant = STREAMS_CAP
    settings.router.max_concurrent_rpcs_per_tenant = CALLS_CAP
    async with contextlib.AsyncExitStack() as stack:
        address = await stack.enter_async_context(running_router(without_embedder(settings)))
        channel = await stack.enter_async_context(bounded_channel(address))
        yield router_service_pb2_grpc.RouterServiceStub(channel), address


def tenant(tenant_id: str, key: str) -> TenantSettings:
    return TenantSettings(id=tenant_id, api_key_sha256=[hash_api_key(key)], models=["*"])


def without_embedder(settings: Settings) -> Settings:
    # Nothing here embeds: no model loaded for it.
    settings.context.embedder = settings.cache.embedder = "inference"
    return settings


def open_stream(router, metadata) -> grpc.aio.StreamStreamCall:
    """A ChatSession stream, bounded as the channels' calls are (tests/mesh.py)."""
    return router.ChatSession(metadata=metadata, timeout=CALL_TIMEOUT_S)


async def list_models(router, metadata=PROBE) -> pb.ListModelsResponse | grpc.aio.AioRpcError:
    try:
        return await router.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error


async def until_served(router, metadata=PROBE) -> pb.ListModelsResponse:
    """A ListModels served, once the calls that held the bound (or the
    caller's cap) have been counted out (within 5 s)."""
    for _ in range(200):
        served = await list_models(router, metadata)
        if isinstance(served, pb.ListModelsResponse):
            return served
        await asyncio.sleep(0.025)
    raise AssertionError(f"still refused after 5 s: {served}")


async def test_calls_past_the_bound_are_refused_with_service_busy_until_a_stream_closes(router) -> None:
    router, admin, _ = router
    # Idle streams (no turn sent) count while open. A stream reaches the
    # router a moment after it is opened, so one may arrive after a
    # ListModels of the loop below, and be the call refused: it is then
    # opened again, until the bound is held by streams alone.
    tenants = (AUTH, OTHER)
    assert len(tenants) == LIMIT
    streams: list = [None] * LIMIT
    for _ in range(200):
        for slot, metadata in enumerate(tenants):
            if streams[slot] is None or streams[slot].done():
                streams[slot] = open_stream(router, metadata)
                await streams[slot].wait_for_connection()
        refused = await list_models(router)
        if isinstance(refused, grpc.aio.AioRpcError):
            break
        await asyncio.sleep(0.025)
    else:
        raise AssertionError("ListModels was never refused")
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(refused)
    assert info.reason == Reason.SERVICE_BUSY
    assert (info.metadata["limit"], info.metadata["limit_value"], info.metadata["service"]) == (
        "max_concurrent_rpcs",
        str(LIMIT),
        "router",
    )
    # The operator's way in is not counted: a key can still be revoked.
    listed = await admin.ListKeys(admin_pb.ListKeysRequest(tenant_id="dev"), metadata=ADMIN, timeout=10)
    assert isinstance(listed, admin_pb.ListKeysResponse)
    still_full = await list_models(router)
    assert isinstance(still_full, grpc.aio.AioRpcError), "the streams no longer hold the bound"
    assert error_info(still_full).reason == Reason.SERVICE_BUSY
    # A stream that ends makes room.
    streams[0].cancel()
    assert (await until_served(router)).models
    streams[1].cancel()


async def failure_of(call) -> grpc.aio.AioRpcError:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the call was served")


async def test_calls_without_a_valid_key_take_no_place_and_are_refused_before_their_requests(
    router,
) -> None:
    """More calls than the bound, from callers without a valid key (or a
    tenant's key on the AdminService), each of which never sends its
    message: each is refused at once, and then a tenant's call is served.
    Were the key checked after the request was read, each would wait for
    its message until its deadline, holding a place."""
    router, _, channel = router
    never = asyncio.Event()
    chat = channel.stream_stream(CHAT)
    admin_service = admin_pb.DESCRIPTOR.services_by_name["AdminService"].full_name
    list_keys = channel.stream_stream(f"/{admin_service}/ListKeys")
    refused = [
        *(chat(held_back(never), metadata=(), timeout=CALL_TIMEOUT_S) for _ in range(LIMIT + 1)),
        chat(held_back(never), metadata=(("authorization", "Bearer not-a-key"),), timeout=CALL_TIMEOUT_S),
        list_keys(held_back(never), metadata=AUTH, timeout=CALL_TIMEOUT_S),
    ]
    failures = await asyncio.wait_for(asyncio.gather(*map(failure_of, refused)), 10)
    assert [(failure.code(), error_info(failure).reason) for failure in failures] == [
        *[(grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_MISSING)] * (LIMIT + 1),
        (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_INVALID),
        (grpc.StatusCode.PERMISSION_DENIED, Reason.ADMIN_REQUIRED),
    ]
    # Only the streams of the test before may still be being counted out.
    assert (await until_served(router)).models
    never.set()
    # A request of 8 MiB from a caller without a key: the same refusal.
    text = "x" * (8 << 20)
    big = pb.ChatRequest(model="tiny", messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)])
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        [_ async for _ in router.Chat(big, timeout=10)]
    assert (failed.value.code(), error_info(failed.value).reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        Reason.API_KEY_MISSING,
    )


def assert_tenant_refusal(refused: grpc.aio.AioRpcError, reason: Reason, limit: str, cap: int) -> None:
    """``refused`` is a tenant cap's refusal: RESOURCE_EXHAUSTED with its
    reason and the cap in ErrorInfo."""
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(refused)
    assert info.reason == reason
    assert dict(info.metadata) == {"limit": limit, "scope": "tenant", "limit_value": str(cap)}


async def admitted(stream) -> pb.ChatSessionResponse | grpc.aio.AioRpcError:
    """A turn with no messages on ``stream``, written only once the router
    has admitted it (tests/mesh.py chat_session_admitted): an admitted stream
    answers it with a failure in the stream (it stays open); a refused one
    is only read, for the status it ended with."""
    try:
        if await chat_session_admitted(stream):
            await stream.write(pb.ChatSessionRequest())
        return await stream.read()
    except grpc.aio.AioRpcError as error:
        return error


async def until_admitted(router) -> grpc.aio.StreamStreamCall:
    """A stream of AUTH's tenant admitted, once the streams it held have
    been counted out (within 5 s)."""
    for _ in range(200):
        stream = open_stream(router, AUTH)
        answer = await admitted(stream)
        if isinstance(answer, pb.ChatSessionResponse):
            return stream
        assert error_info(answer).reason == Reason.TOO_MANY_SESSION_STREAMS
        await asyncio.sleep(0.025)
    raise AssertionError("no slot was freed")


async def test_a_tenant_past_its_session_streams_is_refused_at_open_and_a_stream_ended_frees_its_slot(
    capped_router,
) -> None:
    router, address = capped_router
    held = [open_stream(router, AUTH) for _ in range(STREAMS_CAP - 1)]
    # One of them through a channel of its own, which goes away as a killed client's would.
    own_channel = bounded_channel(address)
    held.append(open_stream(router_service_pb2_grpc.RouterServiceStub(own_channel), AUTH))
    for stream in held:
        assert (await admitted(stream)).failure, "a stream under the cap was not admitted"

    refused = await admitted(open_stream(router, AUTH))
    assert isinstance(refused, grpc.aio.AioRpcError), refused
    assert_tenant_refusal(
        refused, Reason.TOO_MANY_SESSION_STREAMS, "max_session_streams_per_tenant", STREAMS_CAP
    )
    # Another tenant is not held back by this one's streams.
    others = [open_stream(router, OTHER) for _ in range(STREAMS_CAP)]
    for stream in others:
        assert (await admitted(stream)).failure

    # A cancelled stream frees its slot, and a client gone away frees its own.
    held[0].cancel()
    held[0] = await until_admitted(router)
    await own_channel.close()
    held[-1] = await until_admitted(router)
    assert isinstance(await admitted(open_stream(router, AUTH)), grpc.aio.AioRpcError)
    for stream in held + others:
        stream.cancel()


async def test_a_client_that_awaits_admission_before_writing_always_reads_the_refusal(capped_router) -> None:
    """The router tells an admitted stream so before any turn is written,
    and a refused one nothing (trailers-only): a client that waits for that
    before its first write never writes to a call already ended, which
    grpc.aio would report as its own INTERNAL in place of the router's
    status (grpc/grpc#36066). Without the signal, an admitted stream's
    initial metadata would come with its first answer, after a turn: the
    wait for it before writing one times out (chat_session_admitted)."""
    router, _ = capped_router
    held = [await until_admitted(router) for _ in range(STREAMS_CAP)]
    refusals = collections.Counter()
    for _ in range(50):
        for metadata in (AUTH, (("authorization", "Bearer not-a-key"),)):
            refused = await admitted(open_stream(router, metadata))
            assert isinstance(refused, grpc.aio.AioRpcError), refused
            refusals[refused.code(), error_info(refused).reason] += 1
    assert refusals == {
        (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.TOO_MANY_SESSION_STREAMS): 50,
        (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_INVALID): 50,
    }
    for stream in held:
        stream.cancel()


def held_chat(channel: grpc.aio.Channel, timeout: float = CALL_TIMEOUT_S):
    """Opens a Chat of HOLDER's whose request never comes: its call is open,
    its message held back, until it is cancelled, its client goes or its
    deadline passes. A function, so that a refused one can be opened again."""
    return lambda: channel.stream_stream(CHAT)(held_back(asyncio.Event()), metadata=HOLDER, timeout=timeout)


async def until_holder_refused(router, held: list, openers: list) -> grpc.aio.AioRpcError:
    """HOLDER's ListModels refused, once its calls ``held`` (each opened by
    the opener at its index) all hold a place (within 5 s). A call reaches
    the router a moment after it is opened, and one that arrives while a
    call of HOLDER's that has ended is still being counted out (a ListModels
    is, a moment after its caller has the answer) is refused: it is then
    opened again, until the cap is held by ``held`` alone."""
    for _ in range(200):
        # First, so that HOLDER's last ListModels is counted out meanwhile.
        await asyncio.sleep(0.025)
        for slot, call in enumerate(held):
            if call.done():
                held[slot] = openers[slot]()
        refused = await list_models(router, HOLDER)
        if isinstance(refused, grpc.aio.AioRpcError):
            return refused
    raise AssertionError("HOLDER's ListModels was never refused")


async def test_a_tenant_at_its_cap_of_calls_is_refused_before_its_request_until_a_held_call_ends(
    capped_router,
) -> None:
    router, address = capped_router
    before = rpc_outcomes("router", "RouterService/ListModels")
    channel = bounded_channel(address)
    # The last through a channel of its own, which goes away as a killed client's would.
    own_channel = bounded_channel(address)
    openers = [held_chat(channel) for _ in range(CALLS_CAP - 1)] + [held_chat(own_channel)]
    held = [open_call() for open_call in openers]
    refused = await until_holder_refused(router, held, openers)
    assert_tenant_refusal(
        refused, Reason.TOO_MANY_CALLS_IN_FLIGHT, "max_concurrent_rpcs_per_tenant", CALLS_CAP
    )
    # Another tenant is not held back by this one's calls.
    assert (await list_models(router, OTHER)).models
    # The refusal is in the RPC metrics, as the router's other refusals are.
    assert (rpc_outcomes("router", "RouterService/ListModels") - before)["RESOURCE_EXHAUSTED"] == 1
    # A cancelled call frees its place.
    held[0].cancel()
    assert (await until_served(router, HOLDER)).models
    # A call whose deadline passes with its message never sent frees its
    # place: it held one (the tenant at its cap again) until then.
    openers[0] = held_chat(channel, timeout=5)
    held[0] = openers[0]()
    await until_holder_refused(router, held, openers)
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        [_ async for _ in held[0]]
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (await until_served(router, HOLDER)).models
    # A client gone away frees the places of its calls.
    openers[0] = held_chat(channel)
    held[0] = openers[0]()
    await until_holder_refused(router, held, openers)
    await own_channel.close()
    assert (await until_served(router, HOLDER)).models
    for call in held:
        call.cancel()
    await channel.close()
