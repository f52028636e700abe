"""A router drained (SIGTERM's serving.stop) under session turns, with a
second router beside it and a client channel over both, as `meshgate chat`
makes one: a turn is stored once, and a cut turn says so."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from meshgate import serving
from meshgate.common.v1 import common_pb2
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.cache import app as cache_app
from services.context import app as context_app
from services.context import store as session_store
from services.router import app as router_app
from tests.integration.conftest import running, service_settings
from tests.mesh import router_channel

pytestmark = pytest.mark.integration

KEY = "router-drain-test-key"
AUTH = [("authorization", f"Bearer {KEY}")]


@contextlib.asynccontextmanager
async def router(settings):
    """A router in-process whose stop the test decides; yields (service, address)."""
    service = serving.Service("router", router_app.SERVICE_NAMES)
    cleanup = await router_app.setup(service, settings)
    port = await serving.start(service, "127.0.0.1:0", cleanup)
    try:
        yield service, f"127.0.0.1:{port}"
    finally:
        await serving.stop(service, grace_s=0)


def holds_a_call(service: serving.Service) -> bool:
    return service.errors._in_flight > 0


@pytest.fixture
async def two_routers(redis_url, inference_address):
    """Context and cache, and two routers in front of them."""
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.http_listen = ""
    async with contextlib.AsyncExitStack() as stack:
        settings.router.context_address = await stack.enter_async_context(
            running(context_app, "context", settings)
        )
        settings.router.cache_address = await stack.enter_async_context(running(cache_app, "cache", settings))
        one = await stack.enter_async_context(router(settings))
        two = await stack.enter_async_context(router(settings))
        yield settings, one, two


async def session_messages(settings, session_id: str) -> list[str]:
    async with router_channel(settings.router.context_address, "context") as channel:
        stub = context_service_pb2_grpc.ContextServiceStub(channel)
        request = context_pb.GetSessionRequest(tenant_id="dev", session_id=session_id)
        session = (await stub.GetSession(request, timeout=10)).session
    return [message.content for message in session.messages]


async def test_a_session_chat_cut_by_a_drain_while_its_turn_is_saved_is_not_sent_again(
    two_routers, monkeypatch
):
    """A one-piece answer held for the completion (completion_may_carry_text,
    as the CLI asks) has written nothing when its turn is appended; a drain
    whose grace ends before the append's reply ended the call UNAVAILABLE
    with nothing received, and the channel's retry policy sent it again to
    the other router: the turn was stored twice. The router commits the call
    before it appends, so gRPC does not resend it."""
    settings, (one_service, one), (two_service, two) = two_routers
    appending = asyncio.Event()
    append = session_store.SessionStore.append

    async def slow_reply(self, *args, **kwargs):
        stored = await append(self, *args, **kwargs)
        if not appending.is_set():
            appending.set()
            await asyncio.sleep(1.5)  # stored; the reply is late
        return stored

    monkeypatch.setattr(session_store.SessionStore, "append", slow_reply)
    async with serving.client_channel(f"{one},{two}", traced=False) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        created = await stub.CreateSession(pb.CreateSessionRequest(), metadata=AUTH, timeout=10)
        session_id = created.session_id
        request = pb.ChatRequest(
            model="tiny-gpt",
            session_id=session_id,
            messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="only once please")],
            parameters=common_pb2.GenerationParameters(max_tokens=1),
            cache_policy=pb.CACHE_POLICY_BYPASS,
            completion_may_carry_text=True,
        )

        async def chat() -> grpc.StatusCode:
            try:
                async for _ in stub.Chat(request, metadata=AUTH, timeout=30):
                    pass
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        call = asyncio.ensure_future(chat())
        await asyncio.wait_for(appending.wait(), 30)
        holder = one_service if holds_a_call(one_service) else two_service
        assert holds_a_call(holder)
        await serving.stop(holder, grace_s=0.3)
        assert await call == grpc.StatusCode.UNAVAILABLE
    await asyncio.sleep(1.5)  # a resent call would have been appended by now
    assert (await session_messages(settings, session_id)).count("only once please") == 1
