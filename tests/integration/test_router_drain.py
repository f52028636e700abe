"""A router drained (SIGTERM's serving.stop) under session turns, with a
second router beside it and a client channel over both, as `meshgate chat`
makes one: a turn is stored once, and a cut turn says so."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from meshgate import serving
from meshgate.common.v1 import common_pb2
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.errors import error_info
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.cache import app as cache_app
from services.context import app as context_app
from services.context import store as session_store
from services.router import app as router_app
from tests.integration.conftest import running, service_settings
from tests.mesh import bounded_channel, router_channel

# Serial (make test runs it alone): bounds a drain by its grace.
pytestmark = [pytest.mark.integration, pytest.mark.serial]

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


def late_first_append_reply(monkeypatch, delay_s: float, every: bool = False) -> asyncio.Event:
    """Makes the context service answer the next append (``every`` one)
    ``delay_s`` late, once it is stored; the event is set when that append
    has been stored."""
    appended = asyncio.Event()
    append = session_store.SessionStore.append

    async def late_reply(self, *args, **kwargs):
        stored = await append(self, *args, **kwargs)
        if every or not appended.is_set():
            appended.set()
            await asyncio.sleep(delay_s)
        return stored

    monkeypatch.setattr(session_store.SessionStore, "append", late_reply)
    return appended


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
    appending = late_first_append_reply(monkeypatch, 1.5)
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


def refusal_of(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, dict]:
    info = error_info(error)
    return error.code(), info.reason, dict(info.metadata)


async def test_chat_session_streams_end_between_turns_once_the_router_stops(two_routers, monkeypatch):
    """An idle stream ends at once and one in a turn after that turn, each
    with SERVICE_STOPPING and where its session stands, instead of holding
    the router for the whole grace and then ending with a bare UNAVAILABLE
    (its turn stored or not)."""
    _, (service, address), _ = two_routers
    appending = late_first_append_reply(monkeypatch, 1.0)  # the turn is under way when the router stops
    async with bounded_channel(address) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        idle = stub.ChatSession(metadata=AUTH, timeout=60)
        busy = stub.ChatSession(metadata=AUTH, timeout=60)
        for stream in (idle, busy):
            await stream.initial_metadata()
        await busy.write(
            pb.ChatSessionRequest(
                model="tiny-gpt",
                messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="hello there")],
                parameters=common_pb2.GenerationParameters(max_tokens=4),
                cache_policy=pb.CACHE_POLICY_BYPASS,
            )
        )
        await asyncio.wait_for(appending.wait(), 30)
        started = time.monotonic()
        stopping = asyncio.ensure_future(serving.stop(service, grace_s=20))

        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await idle.read()
        code, reason, metadata = refusal_of(ended.value)
        assert (code, reason, metadata) == (grpc.StatusCode.UNAVAILABLE, "SERVICE_STOPPING", {})

        completion = None
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                response = await busy.read()
                if response.HasField("completion"):
                    completion = response.completion
        assert completion is not None, "the turn under way finished"
        code, reason, metadata = refusal_of(ended.value)
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "SERVICE_STOPPING")
        assert metadata == {
            "session_id": completion.session_id,
            "session_version": str(completion.session_version),
        }
        await stopping
        assert time.monotonic() - started < 10, "the streams did not hold the router for its grace"


async def test_a_stream_stopped_after_a_failed_turn_on_another_session_names_no_version_of_the_first(
    two_routers,
):
    """A stream whose turn named another session, and failed there, went
    on with that session, but its SERVICE_STOPPING still gave the version
    the first session had reached: a client resuming the second session
    with it as its expected_session_version is refused. The version given
    is only ever the named session's own."""
    _, (service, address), _ = two_routers

    def turn(text: str, **fields) -> pb.ChatSessionRequest:
        return pb.ChatSessionRequest(
            model="tiny-gpt",
            messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
            parameters=common_pb2.GenerationParameters(max_tokens=2),
            cache_policy=pb.CACHE_POLICY_BYPASS,
            **fields,
        )

    async with bounded_channel(address) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        other = (await stub.CreateSession(pb.CreateSessionRequest(), metadata=AUTH, timeout=10)).session_id
        stream = stub.ChatSession(metadata=AUTH, timeout=60)
        await stream.initial_metadata()
        await stream.write(turn("first, in a session of its own"))
        while not (response := await stream.read()).HasField("completion"):
            pass
        assert response.completion.session_version == 1
        # The other session is at version 0: this strict turn fails there.
        await stream.write(turn("then the other one", session_id=other, expected_session_version=1))
        while not (response := await stream.read()).HasField("failure"):
            pass
        stopping = asyncio.ensure_future(serving.stop(service, grace_s=5))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await stream.read()
        await stopping
    code, reason, metadata = refusal_of(ended.value)
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "SERVICE_STOPPING")
    assert metadata == {"session_id": other}


async def test_turns_still_running_when_the_grace_ends_say_how_much_went_out(two_routers, monkeypatch):
    """A turn longer than the grace (a long generation; here an append whose
    reply is late) was cancelled by gRPC with a bare UNAVAILABLE ("Cancelling
    all calls", no ErrorInfo); the router now ends it just before, saying
    how much of the answer went out."""
    _, (service, address), _ = two_routers
    appended = late_first_append_reply(monkeypatch, 30.0, every=True)
    turn = {
        "model": "tiny-gpt",
        "messages": [common_pb2.Message(role=common_pb2.ROLE_USER, content="hello there")],
        "parameters": common_pb2.GenerationParameters(max_tokens=4),
        "cache_policy": pb.CACHE_POLICY_BYPASS,
    }
    async with bounded_channel(address) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        created = await stub.CreateSession(pb.CreateSessionRequest(), metadata=AUTH, timeout=10)
        chat = stub.Chat(pb.ChatRequest(session_id=created.session_id, **turn), metadata=AUTH, timeout=60)
        session = stub.ChatSession(metadata=AUTH, timeout=60)
        await session.write(pb.ChatSessionRequest(**turn))

        async def refusal(call) -> tuple[grpc.StatusCode, str, dict, list[str]]:
            deltas = []
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async for response in call:
                    deltas.append(response.delta.text)
            return (*refusal_of(ended.value), deltas)

        await asyncio.wait_for(appended.wait(), 30)
        await asyncio.sleep(0.5)  # both turns are being stored
        started = time.monotonic()
        stopping = asyncio.ensure_future(serving.stop(service, grace_s=2.0))
        for call in (chat, session):
            code, reason, metadata, deltas = await refusal(call)
            assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "STREAM_ENDED_EARLY"), call
            # How much went out, and that the turn may be stored: the
            # client must not send it again.
            assert int(metadata["delivered_deltas"]) == len(deltas) > 0
            assert int(metadata["delivered_chars"]) == len("".join(deltas))
            # And the tokens behind them, as the model counted them: each
            # delta is a token or more, and the turn asked for 4 at most.
            assert len(deltas) <= int(metadata["delivered_tokens"]) <= 4, metadata
            assert metadata["turn_may_be_stored"] == "true"
        # The ChatSession's turn created its session: the client learns which.
        assert metadata["session_id"]
        assert time.monotonic() - started < 2.0, "ended by the router before the grace ran out"
        await stopping


async def test_a_turn_whose_append_was_stored_but_answered_late_says_it_may_be_stored(
    redis_url, inference_address, monkeypatch
):
    """An append the context service stored, its reply past the router's
    downstream_timeout_s: the turn failed DEADLINE_EXCEEDED saying nothing
    of it (its client, told it failed, sends it again: stored twice), and
    the stream's stop then gave the version from before it (a strict
    resume at it is refused). The failure, in the stream and as a Chat's
    status, says turn_may_be_stored and the session; the stop names no
    version."""
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.http_listen = ""
    settings.router.downstream_timeout_s = 1.0
    async with contextlib.AsyncExitStack() as stack:
        settings.router.context_address = await stack.enter_async_context(
            running(context_app, "context", settings)
        )
        settings.router.cache_address = await stack.enter_async_context(running(cache_app, "cache", settings))
        service, address = await stack.enter_async_context(router(settings))
        stub = router_service_pb2_grpc.RouterServiceStub(
            await stack.enter_async_context(bounded_channel(address))
        )

        def ask(text: str) -> dict:
            return {
                "model": "tiny-gpt",
                "messages": [common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
                "parameters": common_pb2.GenerationParameters(max_tokens=2),
                "cache_policy": pb.CACHE_POLICY_BYPASS,
            }

        stream = stub.ChatSession(metadata=AUTH, timeout=60)
        await stream.write(pb.ChatSessionRequest(**ask("first")))
        while not (response := await stream.read()).HasField("completion"):
            pass
        session_id = response.completion.session_id
        assert response.completion.session_version == 1

        late_first_append_reply(monkeypatch, 1.5)
        await stream.write(pb.ChatSessionRequest(**ask("second")))
        while not (response := await stream.read()).HasField("failure"):
            pass
        status = status_pb2.Status.FromString(response.failure)
        info = error_details_pb2.ErrorInfo()
        status.details[0].Unpack(info)
        assert status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert info.metadata["turn_may_be_stored"] == "true"
        assert info.metadata["session_id"] == session_id

        late_first_append_reply(monkeypatch, 1.5)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in stub.Chat(pb.ChatRequest(session_id=session_id, **ask("third")), metadata=AUTH):
                pass
        code, _, metadata = refusal_of(failed.value)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (metadata["turn_may_be_stored"], metadata["session_id"]) == ("true", session_id)

        await serving.stop(service, grace_s=2.0)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await stream.read()
        assert refusal_of(ended.value) == (
            grpc.StatusCode.UNAVAILABLE,
            "SERVICE_STOPPING",
            {"session_id": session_id},  # not version 1: the session holds both late turns
        )
        stored = await session_messages(settings, session_id)
        assert stored[::2] == ["first", "second", "third"]
