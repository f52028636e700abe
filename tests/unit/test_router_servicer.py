"""The router's gRPC adapter under grpcio-testing: real protobuf requests,
metadata, deadlines and statuses, the pipeline's stages faked; and, where
gRPC's own handling matters (Chat's unary-response handler, a caller gone,
the registration), over a real server on 127.0.0.1 as the router serves it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import datetime
import math
import threading
import types

import grpc
import grpc_testing
import pytest
import structlog.testing
from google.protobuf import message_factory
from google.rpc import error_details_pb2, status_pb2

from meshgate import serving
from meshgate.config import ModelSettings, Settings, TenantSettings, hash_api_key
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from meshgate.router.v1 import admin_service_pb2 as admin_pb
from meshgate.router.v1 import admin_service_pb2_grpc, router_service_pb2_grpc
from meshgate.router.v1 import router_service_pb2 as pb
from services.router import http_edge
from services.router import servicer as servicer_module
from services.router.admin import AdminServicer
from services.router.admission import RATE_LIMITS, TenantCalls, WindowUse
from services.router.app import SERVICE_NAMES
from services.router.auth import Authenticator, CallerGate
from services.router.keys import KeyStore
from services.router.ledger import METRICS
from services.router.pipeline import (
    Answer,
    CacheStatus,
    Completion,
    Delta,
    Hit,
    Pipeline,
    Unlimited,
    replay_pieces,
    replayed_tokens,
)
from services.router.servicer import ADMITTED_METADATA, RouterServicer, add_to_server, completion_proto
from tests.mesh import bounded_channel, held_back, rpc_outcomes
from tests.unit.test_router_pipeline import (
    DELIVERED_BEFORE_THE_BUG,
    BugAfterTwoPieces,
    FakeCache,
    FakeContexts,
    FakeGenerator,
    request,
    user,
)

KEY = "unit-key"
NARROW_KEY = "narrow-key"
ADMIN_KEY = "admin-key"
AUTH = (("authorization", f"Bearer {KEY}"),)
SERVICE = pb.DESCRIPTOR.services_by_name["RouterService"]


class _AioContext:
    """grpc_testing's servicer context with grpc.aio's awaitable
    send_initial_metadata."""

    def __init__(self, context) -> None:
        self._context = context

    async def send_initial_metadata(self, metadata) -> None:
        self._context.send_initial_metadata(metadata)

    def __getattr__(self, name):
        return getattr(self._context, name)


class _AsyncBridge:
    """grpc_testing drives a servicer's methods synchronously on its own
    threads; this runs the asyncio servicer's on one event loop thread,
    after the router's CallerGate (in the context the handler runs in, as on
    a server), and ends a call with a MeshgateError's rich status as
    ErrorInterceptor does."""

    def __init__(self, servicer, gate: CallerGate, loop: asyncio.AbstractEventLoop) -> None:
        self._servicer = servicer
        self._gate = gate
        self._loop = loop

    def _run(self, awaitable, context: contextvars.Context):
        # Each awaitable runs in a task of its own, with a copy of ``context``.
        return context.run(asyncio.run_coroutine_threadsafe, awaitable, self._loop).result(30)

    def _admitted(self, name: str, metadata) -> contextvars.Context:
        """The context the gate left for the handler; raises its refusal."""

        async def gate() -> contextvars.Context:
            await self._gate(f"/{SERVICE.full_name}/{name}", metadata)
            return contextvars.copy_context()

        return self._run(gate(), contextvars.Context())

    def _requests(self, iterator):
        async def pull():
            while (item := await self._loop.run_in_executor(None, next, iterator, None)) is not None:
                yield item

        return pull()

    @staticmethod
    def _end_with(error: MeshgateError, context) -> None:
        # grpc_testing's abort drops trailing metadata (and it lacks
        # abort_with_status): the call ends normally with the status set.
        status = error.to_status()
        context.set_trailing_metadata(status.trailing_metadata)
        context.set_code(status.code)
        context.set_details(status.details)

    def __getattr__(self, name):
        handler = getattr(self._servicer, name)

        def call(request, context):
            try:
                admitted = self._admitted(name, context.invocation_metadata())
            except MeshgateError as error:
                self._end_with(error, context)
                return iter(()) if SERVICE.methods_by_name[name].server_streaming else None
            arguments = request if hasattr(request, "DESCRIPTOR") else self._requests(request)
            result = handler(arguments, _AioContext(context))
            if hasattr(result, "__anext__"):
                return self._stream(result, context, admitted)
            try:
                return self._run(result, admitted)
            except MeshgateError as error:
                self._end_with(error, context)
                return None

        return call

    def _stream(self, responses, context, admitted: contextvars.Context):
        while True:
            try:
                yield self._run(anext(responses), admitted)
            except StopAsyncIteration:
                return
            except MeshgateError as error:
                self._end_with(error, context)
                return


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


class FakeLedger:
    """Usage totals of one fixed day, per tenant."""

    DAY = datetime.date(2026, 3, 31)

    def __init__(self) -> None:
        self.queries: list[tuple[str, datetime.date, datetime.date]] = []

    def today(self) -> datetime.date:
        return self.DAY

    async def usage(self, tenant, first_day, last_day):
        self.queries.append((tenant, first_day, last_day))
        row = dict.fromkeys(METRICS, 0) | {"requests": 3, "prompt_tokens": 40, "latency_ms": 90}
        return {("k2", "m"): row, ("k1", "m"): row | {"requests": 1}} if tenant == "narrow" else {}


def served(loop, cache=None, generator=None, contexts=None, ledger=None):
    servicer = router_servicer(cache, generator, contexts, ledger)
    return grpc_testing.server_from_dictionary(
        {SERVICE: _AsyncBridge(servicer, caller_gate(), loop)},
        grpc_testing.strict_real_time(),
    )


def router_settings() -> Settings:
    """A dev key (any model), a narrow tenant's (model "m") and the admin credential."""
    settings = Settings()
    settings.router.dev_api_key = KEY
    settings.router.admin_api_key_sha256 = [hash_api_key(ADMIN_KEY)]
    settings.router.tenants = [
        TenantSettings(id="narrow", api_key_sha256=[hash_api_key(NARROW_KEY)], models=["m"])
    ]
    settings.models = {
        "m": ModelSettings(context_window_tokens=512, max_output_tokens=64, default_max_tokens=8),
        "other": ModelSettings(max_output_tokens=32, default_max_tokens=8),
    }
    return settings


def caller_gate() -> CallerGate:
    """The router's gate over router_settings(), each tenant's calls capped as configured."""
    settings = router_settings().router
    return CallerGate(Authenticator(settings), TenantCalls(settings.tenant_call_cap()))


def router_servicer(cache=None, generator=None, contexts=None, ledger=None) -> RouterServicer:
    settings = router_settings()
    pipeline = Pipeline(
        settings.router,
        settings.models,
        contexts or FakeContexts(),
        cache or FakeCache(),
        generator or FakeGenerator(),
    )
    return RouterServicer(settings, pipeline, ledger or FakeLedger())


def drain(rpc) -> list:
    """Every response of a terminated call."""
    responses = []
    while True:
        try:
            responses.append(rpc.take_response())
        except ValueError:  # grpc_testing's "No more responses!"
            return responses


def reason_of(trailing_metadata) -> str:
    """The ErrorInfo reason in a call's trailers, as a client reads it."""
    for key, value in trailing_metadata or ():
        if key == "grpc-status-details-bin":
            return _reason(status_pb2.Status.FromString(value))
    return ""


def _reason(status: status_pb2.Status) -> str:
    return _error_info(status).reason


def _error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return info


def delivered_said(status: status_pb2.Status) -> dict[str, str]:
    """The delivered_* metadata of a failure's ErrorInfo."""
    metadata = _error_info(status).metadata
    return {name: value for name, value in metadata.items() if name.startswith("delivered_")}


def trailing_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    return status_pb2.Status.FromString(dict(error.trailing_metadata())["grpc-status-details-bin"])


def test_chat_maps_deltas_and_the_completion(loop):
    server = served(loop)
    rpc = server.invoke_unary_stream(SERVICE.methods_by_name["Chat"], AUTH, request(), 10)
    trailing, code, _ = rpc.termination()
    responses = drain(rpc)
    assert code == grpc.StatusCode.OK
    deltas = [r.delta.text for r in responses if r.HasField("delta")]
    assert "".join(deltas) == "Hello there"
    completion = responses[-1].completion
    assert completion.cache_status == pb.CACHE_STATUS_MISS
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 3)
    assert (completion.deployment, completion.finish_reason) == ("d1", "length")


def test_a_completion_says_each_limited_kinds_tightest_window():
    """What an HTTP answer's x-ratelimit-* headers say, on the gRPC
    completion: per kind, the window with the least left; its reset counted
    from when the completion goes out, not from its admission."""
    windows = (
        WindowUse("requests_per_minute", "tenant", 100, 10, 30_000, said_at_s=1_000.0),
        WindowUse("tokens_per_minute", "tenant", 10_000, 9_990, 1_500, said_at_s=1_000.0),
        WindowUse("requests_per_minute", "model", 20, 19, 59_000, said_at_s=1_000.0),
    )
    completion = Completion(Answer(), CacheStatus.MISS, 0.0, "", 0, "", rate_windows=windows)
    told = completion_proto(completion, now_s=1_002.5).rate_limits
    assert [(w.kind, w.limit, w.remaining, w.reset_ms) for w in told] == [
        (pb.RATE_LIMIT_KIND_REQUESTS_PER_MINUTE, 20, 1, 56_500),
        (pb.RATE_LIMIT_KIND_TOKENS_PER_MINUTE, 10_000, 10, 0),
    ]
    assert not completion_proto(dataclasses.replace(completion, rate_windows=())).rate_limits
    # Each front end names every limit admission tells of (a new one would fail both at its first turn).
    assert set(servicer_module._RATE_LIMIT_KIND) == set(RATE_LIMITS) == set(http_edge._RATE_WINDOWS)


def test_chat_sends_the_last_piece_on_the_completion_only_to_a_client_that_reads_it(loop):
    server = served(loop, generator=FakeGenerator(finish_before_last=True))
    for carry, deltas, carried in ((False, ["Hel", "lo ", "there"], ""), (True, ["Hel", "lo "], "there")):
        chat = request(completion_may_carry_text=carry)
        rpc = server.invoke_unary_stream(SERVICE.methods_by_name["Chat"], AUTH, chat, 10)
        _, code, _ = rpc.termination()
        responses = drain(rpc)
        assert code == grpc.StatusCode.OK
        assert [r.delta.text for r in responses[:-1]] == deltas
        assert responses[-1].completion.text == carried
        assert responses[-1].completion.finish_reason == "length"


def test_chat_session_tells_its_client_it_was_admitted_without_waiting_for_a_turn(loop):
    """The marker a client awaits before its first write (ADMITTED_METADATA):
    sent whether or not a turn ever comes, not with the first answer."""
    server = served(loop)
    rpc = server.invoke_stream_stream(SERVICE.methods_by_name["ChatSession"], AUTH, 10)
    rpc.requests_closed()
    _, code, _ = rpc.termination()
    assert code == grpc.StatusCode.OK
    assert set(ADMITTED_METADATA) <= set(rpc.initial_metadata())


def test_chat_session_carries_the_last_piece_only_on_the_turns_that_ask(loop):
    server = served(loop, generator=FakeGenerator(finish_before_last=True))
    rpc = server.invoke_stream_stream(SERVICE.methods_by_name["ChatSession"], AUTH, 10)
    for carry in (True, False):
        rpc.send_request(
            pb.ChatSessionRequest(model="m", messages=[user("hi")], completion_may_carry_text=carry)
        )
    rpc.requests_closed()
    _, code, _ = rpc.termination()
    responses = drain(rpc)
    assert code == grpc.StatusCode.OK
    turns = [[r.WhichOneof("event") for r in responses[:3]], [r.WhichOneof("event") for r in responses[3:]]]
    assert turns == [["delta", "delta", "completion"], ["delta", "delta", "delta", "completion"]]
    assert [r.delta.text for r in responses[:2]] + [responses[2].completion.text] == ["Hel", "lo ", "there"]
    assert responses[-1].completion.text == ""
    assert responses[2].completion.session_id == responses[-1].completion.session_id != ""


def test_a_short_exact_hit_is_one_message_for_a_client_that_reads_the_completions_text(loop):
    hit = Hit(Answer(text="Paris.", completion_tokens=2), CacheStatus.EXACT_HIT, 1.0)
    server = served(loop, cache=FakeCache(hit))
    chat = request(completion_may_carry_text=True)
    rpc = server.invoke_unary_stream(SERVICE.methods_by_name["Chat"], AUTH, chat, 10)
    _, code, _ = rpc.termination()
    responses = drain(rpc)
    assert code == grpc.StatusCode.OK
    assert [r.WhichOneof("event") for r in responses] == ["completion"]
    assert responses[0].completion.text == "Paris."
    assert responses[0].completion.cache_status == pb.CACHE_STATUS_EXACT_HIT


def test_a_failed_save_sends_the_held_last_piece_before_its_status(loop):
    contexts = FakeContexts()
    contexts.append_error = MeshgateError(grpc.StatusCode.UNAVAILABLE, Reason.REDIS_UNAVAILABLE, "down")
    server = served(loop, generator=FakeGenerator(finish_before_last=True), contexts=contexts)
    chat = request(session_id="s1", completion_may_carry_text=True)
    rpc = server.invoke_unary_stream(SERVICE.methods_by_name["Chat"], AUTH, chat, 10)
    trailing, code, _ = rpc.termination()
    # The failure counts three deltas delivered: the caller holds all three.
    assert [r.delta.text for r in drain(rpc)] == ["Hel", "lo ", "there"]
    assert code == grpc.StatusCode.UNAVAILABLE
    assert reason_of(trailing) == Reason.REDIS_UNAVAILABLE
    info = error_details_pb2.ErrorInfo()
    status_pb2.Status.FromString(dict(trailing)["grpc-status-details-bin"]).details[0].Unpack(info)
    assert info.metadata["delivered_deltas"] == "3"

    rpc = server.invoke_stream_stream(SERVICE.methods_by_name["ChatSession"], AUTH, 10)
    rpc.send_request(
        pb.ChatSessionRequest(
            model="m", session_id="s1", messages=[user("hi")], completion_may_carry_text=True
        )
    )
    rpc.requests_closed()
    _, code, _ = rpc.termination()
    responses = drain(rpc)
    assert code == grpc.StatusCode.OK  # a ChatSession turn fails in the stream
    assert [r.delta.text for r in responses[:-1]] == ["Hel", "lo ", "there"]
    failure = status_pb2.Status.FromString(responses[-1].failure)
    assert _reason(failure) == Reason.REDIS_UNAVAILABLE


def test_chat_maps_a_hit_to_its_status_and_similarity(loop):
    hit = Hit(Answer(text="from the cache"), CacheStatus.SEMANTIC_HIT, 0.9)
    server = served(loop, cache=FakeCache(hit))
    rpc = server.invoke_unary_stream(SERVICE.methods_by_name["Chat"], AUTH, request(), 10)
    _, code, _ = rpc.termination()
    completion = drain(rpc)[-1].completion
    assert code == grpc.StatusCode.OK
    assert completion.cache_status == pb.CACHE_STATUS_SEMANTIC_HIT
    assert completion.cache_similarity == pytest.approx(0.9)


def test_chat_ends_a_failed_turn_with_its_status(loop):
    server = served(loop, generator=FakeGenerator(fail_after=1))
    rpc = server.invoke_unary_stream(SERVICE.methods_by_name["Chat"], AUTH, request(), 10)
    trailing, code, _ = rpc.termination()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert reason_of(trailing) == Reason.STREAM_ENDED_EARLY


class GatedGenerator:
    """Its first piece, then the last only once ``gate`` is set."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def generate(
        self, alias, prompt, parameters, budget, answer, session_id="", read_ahead=True, tenant_id=""
    ):
        yield "Hel"
        await self.gate.wait()
        answer.text, answer.prompt_tokens, answer.completion_tokens = "Hello", 5, 2
        answer.finish_reason, answer.deployment = "stop", "d1"
        yield "lo"


@contextlib.asynccontextmanager
async def serving_router(servicer: RouterServicer):
    """The servicer registered as the router registers it, on a
    ``serving.Service`` as the router's (its interceptors: telemetry, errors
    with their RPC metrics and the router's CallerGate, the mesh guard), on
    127.0.0.1; yields the port."""
    service = serving.Service("router", SERVICE_NAMES)
    service.errors.gate(caller_gate())
    add_to_server(servicer, service.server)
    port = await serving.start(service, "127.0.0.1:0", _nothing)
    try:
        yield port
    finally:
        await serving.stop(service, grace_s=0)


async def _nothing() -> None:
    pass


@contextlib.asynccontextmanager
async def router_stub(servicer: RouterServicer):
    """A client's stub to the servicer served as the router serves it (serving_router)."""
    async with serving_router(servicer) as port, bounded_channel(f"127.0.0.1:{port}") as channel:
        yield router_service_pb2_grpc.RouterServiceStub(channel)


async def test_over_grpc_each_delta_goes_out_as_it_comes_and_the_completion_ends_the_stream():
    generator = GatedGenerator()
    async with router_stub(router_servicer(generator=generator)) as stub:
        call = stub.Chat(request(), metadata=AUTH)
        # The second piece waits for the first delta to reach the client:
        # nothing is held back for the completion it goes out with.
        first = await asyncio.wait_for(call.read(), 10)
        assert first.delta.text == "Hel"
        generator.gate.set()
        rest = []
        while (response := await call.read()) is not grpc.aio.EOF:
            rest.append(response)
        assert await call.code() == grpc.StatusCode.OK
    assert [r.WhichOneof("event") for r in rest] == ["delta", "completion"]
    assert rest[0].delta.text == "lo"
    assert (rest[1].completion.finish_reason, rest[1].completion.usage.completion_tokens) == ("stop", 2)


async def test_over_grpc_a_short_hit_is_the_completion_alone_and_a_failure_its_rich_status():
    hit = Hit(Answer(text="Paris.", completion_tokens=2), CacheStatus.EXACT_HIT, 1.0)
    async with router_stub(router_servicer(cache=FakeCache(hit))) as stub:
        responses = [r async for r in stub.Chat(request(completion_may_carry_text=True), metadata=AUTH)]
    assert [(r.completion.text, r.completion.cache_status) for r in responses] == [
        ("Paris.", pb.CACHE_STATUS_EXACT_HIT)
    ]
    async with router_stub(router_servicer(generator=FakeGenerator(fail_after=1))) as stub:
        call = stub.Chat(request(), metadata=AUTH)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            [r async for r in call]
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason_of(failed.value.trailing_metadata()) == Reason.STREAM_ENDED_EARLY


# A method's kind as gRPC names it, by whether its requests and its responses stream.
KINDS = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}


class RecordingServer:
    """Keeps what add_to_server registers, in place of a server."""

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        self.generic_handlers = generic_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def test_every_router_method_is_registered_by_its_kind_and_chat_with_a_unary_response():
    servicer = router_servicer()
    server = RecordingServer()
    add_to_server(servicer, server)
    assert server.service == SERVICE.full_name
    assert set(server.handlers) == set(SERVICE.methods_by_name)
    (generic,) = server.generic_handlers
    for name, handler in server.handlers.items():
        method = SERVICE.methods_by_name[name]
        assert generic.service(types.SimpleNamespace(method=f"/{SERVICE.full_name}/{name}")) is handler
        behavior = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        )
        if name == "Chat":
            assert (handler.request_streaming, handler.response_streaming) == (False, False)
            assert behavior == servicer.chat_with_status
            assert handler.response_serializer is None  # chat_with_status serializes its messages
        else:
            assert (handler.request_streaming, handler.response_streaming) == (
                method.client_streaming,
                method.server_streaming,
            )
            assert behavior == getattr(servicer, name)
            response_class = message_factory.GetMessageClass(method.output_type)
            assert handler.response_serializer == response_class.SerializeToString
        assert type(handler.request_deserializer(b"")).DESCRIPTOR is method.input_type


async def test_every_router_method_is_served():
    codes = {}
    async with (
        serving_router(router_servicer()) as port,
        bounded_channel(f"127.0.0.1:{port}") as channel,
    ):
        for method in SERVICE.methods:
            kind = KINDS[method.client_streaming, method.server_streaming]
            call = getattr(channel, kind)(f"/{SERVICE.full_name}/{method.name}")
            request = iter((b"",)) if method.client_streaming else b""
            try:
                result = call(request, timeout=10)
                if method.server_streaming:
                    [_ async for _ in result]
                else:
                    await result
            except grpc.aio.AioRpcError as error:
                codes[method.name] = error.code()
    # Each was found (none is unimplemented) and refused by the gate, which asked for a key.
    assert codes == dict.fromkeys(SERVICE.methods_by_name, grpc.StatusCode.UNAUTHENTICATED)


def chat_outcomes() -> collections.Counter:
    return rpc_outcomes("router", "RouterService/Chat")


async def until(condition, what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


class EndlessGenerator:
    """Pieces of 64 KiB for ever; ``pulled`` counts those asked for."""

    def __init__(self) -> None:
        self.pulled = 0

    async def generate(
        self, alias, prompt, parameters, budget, answer, session_id="", read_ahead=True, tenant_id=""
    ):
        while True:
            self.pulled += 1
            yield "x" * 65536


async def test_a_caller_gone_mid_stream_is_cancelled_not_an_internal_error():
    generator = EndlessGenerator()
    async with serving_router(router_servicer(generator=generator)) as port:
        channel = bounded_channel(f"127.0.0.1:{port}")
        call = router_service_pb2_grpc.RouterServiceStub(channel).Chat(request(), metadata=AUTH)
        assert (await call.read()).delta.text
        # The caller reads no more: the router's writes fill the stream's
        # window, and one waits for room when the caller goes.
        pulled = -1
        for _ in range(150):
            if pulled == generator.pulled:
                break
            pulled = generator.pulled
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the router kept pulling pieces for 30 s with no one reading")
        before = chat_outcomes()
        with structlog.testing.capture_logs() as logs:
            await channel.close()
            await until(lambda: chat_outcomes() != before, "the router recorded the call's end")
    assert chat_outcomes() - before == collections.Counter({"CANCELLED": 1})
    assert [entry for entry in logs if entry["event"] == "unhandled error"] == []


class StopsEarly:
    """A pipeline whose turn ends after a delta, with neither a completion
    nor a failure: a bug the router must not pass off as an answer."""

    def run(self, *arguments, **options):
        async def turn():
            yield Delta("Hel")

        return turn()


async def test_a_chat_that_ends_without_its_completion_is_an_internal_error():
    servicer = RouterServicer(router_settings(), StopsEarly(), FakeLedger())
    async with router_stub(servicer) as stub:
        # A caller's megabyte of model name is not logged whole.
        asked = request()
        asked.model = "m" * 1_000_000
        call = stub.Chat(asked, metadata=AUTH)
        responses = []
        with structlog.testing.capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as failed:
            async for response in call:
                responses.append(response)
    # The delta, and no empty message after it passed off as the completion.
    assert [response.WhichOneof("event") for response in responses] == ["delta"]
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert reason_of(failed.value.trailing_metadata()) == Reason.INTERNAL
    # The caller holds the delta, and is told so (none counted its tokens).
    assert delivered_said(trailing_status(failed.value)) == {"delivered_deltas": "1", "delivered_chars": "3"}
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert [entry["event"] for entry in errors] == ["Chat ended without a completion"]
    assert len(errors[0]["model"]) <= 128


async def test_a_hit_replay_the_stop_cuts_midway_says_the_tokens_behind_what_went_out():
    """A paced replay of a 14-token entry, cut by the router's stop after
    three pieces: its STREAM_ENDED_EARLY said no delivered_tokens."""
    settings = router_settings()
    settings.router.replay_piece_chars, settings.router.replay_pause_s = 10, 0.05
    text = "Paris is the capital of France and has been for a long time."
    hit = Hit(Answer(text=text, completion_tokens=14), CacheStatus.EXACT_HIT, 1.0)
    pipeline = Pipeline(settings.router, settings.models, FakeContexts(), FakeCache(hit), FakeGenerator())
    servicer = RouterServicer(settings, pipeline, FakeLedger())
    async with router_stub(servicer) as stub:
        call = stub.Chat(request(), metadata=AUTH)
        texts = [(await call.read()).delta.text for _ in range(3)]
        await servicer.drain(0.0)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for response in call:
                texts.append(response.delta.text)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    said = delivered_said(trailing_status(failed.value))
    # Three pieces (or a fourth, on a slow machine) of its eight: 21 of its
    # 60 characters after three, 14 x 21 / 60 tokens, rounded up.
    sent = "".join(texts)
    assert texts[:3] == ["Paris is ", "the ", "capital "] and len(texts) < 8
    assert said == {
        "delivered_deltas": str(len(texts)),
        "delivered_chars": str(len(sent)),
        "delivered_tokens": str(replayed_tokens(14, len(sent), len(text))),
    }
    assert replayed_tokens(14, 21, len(text)) == 5


async def test_a_hit_replay_its_callers_deadline_cuts_ends_with_the_routers_status():
    """A paced replay (pieces 0.25 s apart) longer than its caller's
    deadline ran on into the caller's own timer: a bare local
    DEADLINE_EXCEEDED, no ErrorInfo, nothing said of what went out (real
    mesh, tiny-gpt: 5 cut replays of 5 so). It ends with the turn's budget,
    as a generation does, with the router's status."""
    settings = router_settings()
    settings.router.replay_piece_chars, settings.router.replay_pause_s = 10, 0.25
    # The margin at its cap, a tenth of the 2 s (0.2 s): the router's status
    # beats the caller's own timer on a loaded machine too (at the default
    # 0.02 s, an event loop stalled 60 ms in 100 lost that race 5 times in 5).
    settings.router.deadline_margin_s = 0.5
    text = "Paris is the capital of France and has been for a long time, since the kings made it so."
    hit = Hit(Answer(text=text, completion_tokens=20), CacheStatus.EXACT_HIT, 1.0)
    pipeline = Pipeline(settings.router, settings.models, FakeContexts(), FakeCache(hit), FakeGenerator())
    async with router_stub(RouterServicer(settings, pipeline, FakeLedger())) as stub:
        texts = []
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for response in stub.Chat(request(), metadata=AUTH, timeout=2.0):
                texts.append(response.delta.text)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert reason_of(failed.value.trailing_metadata()) == Reason.DEADLINE_EXCEEDED
    sent = "".join(texts)
    assert 0 < len(texts) < len(replay_pieces(text, 10))
    assert delivered_said(trailing_status(failed.value)) == {
        "delivered_deltas": str(len(texts)),
        "delivered_chars": str(len(sent)),
        "delivered_tokens": str(replayed_tokens(20, len(sent), len(text))),
    }


class BudgetRecorder(FakeGenerator):
    """Records the seconds each generation's budget leaves it, at its start."""

    def __init__(self) -> None:
        super().__init__()
        self.budgets_s: list[float] = []

    async def generate(self, alias, prompt, parameters, budget, answer, *rest, **options):
        self.budgets_s.append(budget.within(math.inf))
        async for piece in super().generate(alias, prompt, parameters, budget, answer, *rest, **options):
            yield piece


# 60 s reads up to 60.1 s here (gRPC's timeout header rounds it up): the
# margin takes that 0.1 s too. A 1 s deadline gives a tenth at most.
@pytest.mark.parametrize(("timeout_s", "latest_s"), [(60.0, 59.5), (1.0, 0.9 * 1.01)])
async def test_a_turn_ends_its_deadline_margin_before_its_callers_deadline(timeout_s, latest_s):
    """Ended at the caller's deadline itself, the router's DEADLINE_EXCEEDED
    (with delivered_*) lost the race to the caller's own timer (a bare local
    status, no ErrorInfo). The margin is at most a tenth of the time left (a
    1 s deadline keeps 0.9 s of its 1 s), and a turn that completes within it completes."""
    settings = router_settings()
    settings.router.deadline_margin_s = 0.5
    generator = BudgetRecorder()
    pipeline = Pipeline(settings.router, settings.models, FakeContexts(), FakeCache(), generator)
    async with router_stub(RouterServicer(settings, pipeline, FakeLedger())) as stub:
        responses = [r async for r in stub.Chat(request(), metadata=AUTH, timeout=timeout_s)]
        call = stub.ChatSession(metadata=AUTH, timeout=timeout_s)
        await call.write(pb.ChatSessionRequest(model="m", messages=[user("hi")]))
        await call.done_writing()
        turn = [r async for r in call]
    assert responses[-1].HasField("completion") and turn[-1].HasField("completion")
    # What the caller had when the router read it, less the margin: the
    # call's trip and the test's own steps (well under a second) besides.
    assert len(generator.budgets_s) == 2
    for budget_s in generator.budgets_s:
        assert latest_s - 1.0 < budget_s <= latest_s


class SessionBudgets(FakeContexts):
    """Records the seconds each session call's budget leaves it."""

    def __init__(self) -> None:
        super().__init__()
        self.budgets_s: list[float] = []

    async def create_session(self, tenant, budget, request_id="") -> str:
        self.budgets_s.append(budget.within(math.inf))
        return await super().create_session(tenant, budget, request_id)

    async def session_call(self, method, request, tenant, budget):
        self.budgets_s.append(budget.within(math.inf))
        return context_pb.GetSessionResponse()


async def test_a_unary_call_to_another_service_ends_its_deadline_margin_before_its_callers_deadline():
    """GetSession, ListSessions and CreateSession with a 1 s deadline, their
    context service's answers held back (real mesh): the router's call was
    given the caller's whole time, so its DEADLINE_EXCEEDED raced the
    caller's own timer and lost, 9 times in 9 (a bare status, no
    ErrorInfo). Given less the margin (0.5 s here, and the header's 0.1 s),
    as a turn is, the router's status comes first."""
    settings = router_settings()
    settings.router.deadline_margin_s = 0.5
    contexts = SessionBudgets()
    pipeline = Pipeline(settings.router, settings.models, contexts, FakeCache(), FakeGenerator())
    async with router_stub(RouterServicer(settings, pipeline, FakeLedger())) as stub:
        await stub.CreateSession(pb.CreateSessionRequest(), metadata=AUTH, timeout=60)
        await stub.GetSession(pb.GetSessionRequest(session_id="s1"), metadata=AUTH, timeout=60)
    assert len(contexts.budgets_s) == 2
    for budget_s in contexts.budgets_s:
        assert 58.5 < budget_s <= 59.5


async def chat_until_it_fails(stub) -> tuple[list[str], status_pb2.Status]:
    """A Chat's delta texts and the rich status it failed with."""
    texts = []
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for response in stub.Chat(request(), metadata=AUTH):
            texts.append(response.delta.text)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    return texts, trailing_status(failed.value)


async def test_a_bug_in_a_turn_after_pieces_went_out_says_how_much_in_chat_and_chat_session():
    async with router_stub(router_servicer(generator=BugAfterTwoPieces())) as stub:
        texts, status = await chat_until_it_fails(stub)
        assert texts == ["Hel", "lo "]
        assert delivered_said(status) == DELIVERED_BEFORE_THE_BUG
        # A ChatSession turn fails in the stream, which goes on.
        call = stub.ChatSession(metadata=AUTH)
        await call.write(pb.ChatSessionRequest(model="m", messages=[user("hi")]))
        await call.done_writing()
        responses = [response async for response in call]
        assert await call.code() == grpc.StatusCode.OK
    assert [response.delta.text for response in responses[:-1]] == ["Hel", "lo "]
    failure = status_pb2.Status.FromString(responses[-1].failure)
    assert _reason(failure) == Reason.INTERNAL
    assert delivered_said(failure) == DELIVERED_BEFORE_THE_BUG


async def test_a_bug_of_the_servicers_own_after_pieces_went_out_says_how_much(monkeypatch):
    """Mapping the completion to protobuf failed (a bug, injected): the
    error interceptor's INTERNAL knew nothing of the three deltas sent."""

    def broken(completion):
        raise ValueError("bug")

    monkeypatch.setattr(servicer_module, "completion_proto", broken)
    async with router_stub(router_servicer()) as stub:
        with structlog.testing.capture_logs() as logs:
            texts, status = await chat_until_it_fails(stub)
            assert texts == ["Hel", "lo ", "there"]
            assert delivered_said(status) == {"delivered_deltas": "3", "delivered_chars": "11"}
            call = stub.ChatSession(metadata=AUTH)
            await call.write(pb.ChatSessionRequest(model="m", messages=[user("hi")]))
            await call.done_writing()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                [response async for response in call]
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert delivered_said(trailing_status(failed.value)) == {"delivered_deltas": "3", "delivered_chars": "11"}
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == ["router call failed"] * 2


class SettledOutcomes(Unlimited):
    """Admits every turn and keeps the outcome each was settled with."""

    def __init__(self) -> None:
        self.outcomes = []

    async def settle(self, grant, turn, outcome) -> None:
        self.outcomes.append(outcome)


class StreamContext:
    """A ChatSession's servicer context, driven by the test, without a deadline."""

    def __init__(self, metadata) -> None:
        self._metadata = metadata

    def invocation_metadata(self):
        return self._metadata

    async def send_initial_metadata(self, metadata) -> None:
        pass

    def time_remaining(self) -> None:
        return None


async def test_a_chat_session_turn_whose_completion_the_stop_cut_in_its_write_is_settled_completed():
    """The router's stop, near its grace's end, cuts a ChatSession while gRPC
    writes its turn's completion: the stream ends SERVICE_STOPPING, and the
    turn, whole and stored, is settled (and in the tenant's usage) as
    completed, not as one its caller cancelled."""
    settings = router_settings()
    admission = SettledOutcomes()
    pipeline = Pipeline(
        settings.router, settings.models, FakeContexts(), FakeCache(), FakeGenerator(), admission
    )
    servicer = RouterServicer(settings, pipeline, FakeLedger())

    async def client_stays():
        yield pb.ChatSessionRequest(model="m", messages=[user("hello")])
        await asyncio.Event().wait()

    async def call() -> None:
        # In a task of its own, as gRPC runs a call, after the router's gate.
        await caller_gate()(f"/{SERVICE.full_name}/ChatSession", AUTH)
        stream = servicer.ChatSession(client_stays(), StreamContext(AUTH))
        while not (response := await anext(stream)).HasField("completion"):
            pass
        # The handler waits in its yield while gRPC writes the completion.
        await servicer.drain(0.0)
        with pytest.raises(MeshgateError) as stopped:
            await anext(stream)
        assert stopped.value.reason == Reason.SERVICE_STOPPING
        assert stopped.value.metadata["session_version"] == str(response.completion.session_version)

    await asyncio.wait_for(asyncio.create_task(call()), 10)
    assert [(outcome.failure, outcome.cancelled) for outcome in admission.outcomes] == [(None, False)]


def test_chat_without_a_key_is_unauthenticated(loop):
    server = served(loop)
    rpc = server.invoke_unary_stream(SERVICE.methods_by_name["Chat"], (), request(), 10)
    trailing, code, _ = rpc.termination()
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(trailing) == Reason.API_KEY_MISSING


def test_chat_session_reports_a_failed_turn_in_the_stream_and_goes_on(loop):
    server = served(loop)
    rpc = server.invoke_stream_stream(SERVICE.methods_by_name["ChatSession"], AUTH, 10)
    empty = pb.ChatSessionRequest(model="m")
    rpc.send_request(empty)
    rpc.send_request(pb.ChatSessionRequest(model="m", messages=[user("hi")]))
    rpc.requests_closed()
    _, code, _ = rpc.termination()
    responses = drain(rpc)
    assert code == grpc.StatusCode.OK
    failure = status_pb2.Status.FromString(responses[0].failure)
    assert (failure.code, _reason(failure)) == (
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        Reason.EMPTY_MESSAGES,
    )
    completion = responses[-1].completion
    # The valid turn created the session (the refused one did not).
    assert completion.session_id == "s1"
    assert completion.session_version == 4  # FakeContexts' session is at 3


def test_a_chat_session_goes_on_with_the_session_its_first_turn_created_and_may_have_stored_in(loop):
    """The first turn created s1 and its append failed (it may have landed):
    the next turn, naming no session, continues s1 (it created a second one,
    s1 left unknown to its client), and the failure names s1 for the client."""
    contexts = FakeContexts()
    contexts.append_error = MeshgateError(grpc.StatusCode.UNAVAILABLE, Reason.REDIS_UNAVAILABLE, "down")
    server = served(loop, contexts=contexts)
    rpc = server.invoke_stream_stream(SERVICE.methods_by_name["ChatSession"], AUTH, 10)
    rpc.send_request(pb.ChatSessionRequest(model="m", messages=[user("first")]))
    # Read up to the first turn's failure (after its three deltas) before the next turn is sent.
    responses = [rpc.take_response() for _ in range(4)]
    contexts.append_error = None
    rpc.send_request(pb.ChatSessionRequest(model="m", messages=[user("second")]))
    rpc.requests_closed()
    _, code, _ = rpc.termination()
    responses += drain(rpc)
    assert code == grpc.StatusCode.OK
    failure = status_pb2.Status.FromString(responses[3].failure)
    info = error_details_pb2.ErrorInfo()
    failure.details[0].Unpack(info)
    assert (info.reason, info.metadata["session_id"]) == (Reason.REDIS_UNAVAILABLE, "s1")
    assert responses[-1].completion.session_id == "s1"
    assert (contexts.created, contexts.deleted) == (["dev"], [])


def test_a_chat_sessions_first_turn_that_failed_before_storing_leaves_no_session(loop):
    """The first turn created s1, then its generation died before anything
    was stored: s1 is deleted, the failure names no session, and the next
    turn starts one."""
    contexts = FakeContexts()
    generator = FakeGenerator(fail_after=1)
    server = served(loop, generator=generator, contexts=contexts)
    rpc = server.invoke_stream_stream(SERVICE.methods_by_name["ChatSession"], AUTH, 10)
    rpc.send_request(pb.ChatSessionRequest(model="m", messages=[user("first")]))
    # Read up to the first turn's failure before the next turn is sent.
    responses = [rpc.take_response(), rpc.take_response()]
    generator.fail_after = None
    rpc.send_request(pb.ChatSessionRequest(model="m", messages=[user("second")]))
    rpc.requests_closed()
    _, code, _ = rpc.termination()
    responses += drain(rpc)
    assert code == grpc.StatusCode.OK
    failure = status_pb2.Status.FromString(responses[1].failure)
    info = error_details_pb2.ErrorInfo()
    failure.details[0].Unpack(info)
    assert info.reason == Reason.STREAM_ENDED_EARLY
    assert "session_id" not in info.metadata
    assert responses[-1].completion.session_id == "s2"
    assert contexts.deleted == ["s1"]


def failure_info(response: pb.ChatSessionResponse) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo of a ChatSession failure event."""
    info = error_details_pb2.ErrorInfo()
    status_pb2.Status.FromString(response.failure).details[0].Unpack(info)
    return info


def test_a_chat_session_turn_naming_a_session_moves_the_stream_unless_that_session_is_none(loop):
    """The stream is on s1. A turn naming s7 whose generation died, a
    failure that says nothing of s7, moves the stream to s7, the session the
    client chose: the next turn, naming none, goes on s7. A turn naming s9
    that the context refuses SESSION_NOT_FOUND leaves it on s7. A turn
    naming s8 whose append may have been stored moves it too, so the turn
    after it continues s8."""
    contexts = FakeContexts()
    generator = FakeGenerator()
    server = served(loop, generator=generator, contexts=contexts)
    rpc = server.invoke_stream_stream(SERVICE.methods_by_name["ChatSession"], AUTH, 10)
    rpc.send_request(pb.ChatSessionRequest(model="m", messages=[user("first")]))
    responses = [rpc.take_response() for _ in range(4)]
    generator.fail_after = 1
    rpc.send_request(pb.ChatSessionRequest(model="m", session_id="s7", messages=[user("second")]))
    responses += [rpc.take_response() for _ in range(2)]
    generator.fail_after = None
    rpc.send_request(pb.ChatSessionRequest(model="m", messages=[user("third")]))
    responses += [rpc.take_response() for _ in range(4)]
    contexts.missing.add("s9")
    rpc.send_request(pb.ChatSessionRequest(model="m", session_id="s9", messages=[user("none such")]))
    responses += [rpc.take_response()]
    rpc.send_request(pb.ChatSessionRequest(model="m", messages=[user("third again")]))
    responses += [rpc.take_response() for _ in range(4)]
    # As downstream.ContextService.append fails an append whose reply was lost.
    lost = {"session_id": "s8", "turn_may_be_stored": "true"}
    contexts.append_error = MeshgateError(grpc.StatusCode.UNAVAILABLE, Reason.DOWNSTREAM_FAILED, "lost", lost)
    rpc.send_request(pb.ChatSessionRequest(model="m", session_id="s8", messages=[user("fourth")]))
    responses += [rpc.take_response() for _ in range(4)]
    contexts.append_error = None
    rpc.send_request(pb.ChatSessionRequest(model="m", messages=[user("fifth")]))
    rpc.requests_closed()
    _, code, _ = rpc.termination()
    responses += drain(rpc)
    assert code == grpc.StatusCode.OK
    assert responses[3].completion.session_id == "s1"
    assert failure_info(responses[5]).reason == Reason.STREAM_ENDED_EARLY
    assert responses[9].completion.session_id == "s7"
    assert failure_info(responses[10]).reason == Reason.SESSION_NOT_FOUND
    assert responses[14].completion.session_id == "s7"
    assert failure_info(responses[18]).metadata["turn_may_be_stored"] == "true"
    assert responses[-1].completion.session_id == "s8"
    assert [session_id for session_id, _, _ in contexts.appended] == ["s1", "s7", "s7", "s8"]


def test_create_session_and_list_models(loop):
    server = served(loop)
    created, _, code, _ = server.invoke_unary_unary(
        SERVICE.methods_by_name["CreateSession"], AUTH, pb.CreateSessionRequest(), 10
    ).termination()
    assert code == grpc.StatusCode.OK and created.session_id == "s1"
    listed, _, code, _ = server.invoke_unary_unary(
        SERVICE.methods_by_name["ListModels"], AUTH, pb.ListModelsRequest(), 10
    ).termination()
    assert [(m.alias, m.max_output_tokens) for m in listed.models] == [("m", 64), ("other", 32)]
    narrow = (("authorization", f"Bearer {NARROW_KEY}"),)
    listed, _, code, _ = server.invoke_unary_unary(
        SERVICE.methods_by_name["ListModels"], narrow, pb.ListModelsRequest(), 10
    ).termination()
    assert [m.alias for m in listed.models] == ["m"]


def test_chat_refuses_a_model_the_tenant_may_not_use(loop):
    server = served(loop)
    narrow = (("authorization", f"Bearer {NARROW_KEY}"),)
    refused = pb.ChatRequest(model="other", messages=[user("hi")])
    rpc = server.invoke_unary_stream(SERVICE.methods_by_name["Chat"], narrow, refused, 10)
    trailing, code, _ = rpc.termination()
    assert (code, reason_of(trailing)) == (grpc.StatusCode.PERMISSION_DENIED, Reason.MODEL_NOT_ALLOWED)


def get_usage(server, key: str, **request):
    return server.invoke_unary_unary(
        SERVICE.methods_by_name["GetUsage"],
        (("authorization", f"Bearer {key}"),),
        pb.GetUsageRequest(**request),
        10,
    ).termination()


def test_a_tenant_key_reads_its_own_usage_per_key_and_model(loop):
    ledger = FakeLedger()
    server = served(loop, ledger=ledger)
    usage, _, code, _ = get_usage(server, NARROW_KEY, days=7)
    assert code == grpc.StatusCode.OK
    assert (usage.tenant_id, usage.first_day, usage.last_day) == ("narrow", "2026-03-25", "2026-03-31")
    assert [(r.key_id, r.requests, r.prompt_tokens, r.latency_ms_total) for r in usage.rows] == [
        ("k1", 1, 40, 90),
        ("k2", 3, 40, 90),
    ]
    assert ledger.queries == [("narrow", datetime.date(2026, 3, 25), datetime.date(2026, 3, 31))]
    # days unset: today only.
    usage, _, _, _ = get_usage(server, NARROW_KEY, tenant_id="narrow")
    assert (usage.first_day, usage.last_day) == ("2026-03-31", "2026-03-31")


def test_only_the_admin_credential_reads_another_tenants_usage(loop):
    server = served(loop)
    _, trailing, code, _ = get_usage(server, NARROW_KEY, tenant_id="dev")
    assert (code, reason_of(trailing)) == (grpc.StatusCode.PERMISSION_DENIED, Reason.ADMIN_REQUIRED)
    usage, _, code, _ = get_usage(server, ADMIN_KEY, tenant_id="narrow", days=2)
    assert code == grpc.StatusCode.OK and usage.tenant_id == "narrow" and len(usage.rows) == 2
    _, trailing, code, _ = get_usage(server, ADMIN_KEY)
    assert (code, reason_of(trailing)) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.TENANT_REQUIRED)
    # The admin credential is no tenant's key.
    admin = (("authorization", f"Bearer {ADMIN_KEY}"),)
    rpc = server.invoke_unary_unary(SERVICE.methods_by_name["ListModels"], admin, pb.ListModelsRequest(), 10)
    _, trailing, code, _ = rpc.termination()
    assert (code, reason_of(trailing)) == (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_INVALID)


@pytest.mark.parametrize("days", [-1, 401])
def test_a_usage_period_outside_the_retention_is_invalid(loop, days):
    _, trailing, code, _ = get_usage(served(loop), KEY, days=days)
    assert (code, reason_of(trailing)) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_USAGE_PERIOD)


class RecordsTurns:
    """A pipeline that records the tenant of each turn asked of it, and
    answers each with a completion whose text is that tenant's id."""

    def __init__(self) -> None:
        self.tenants: list[str] = []

    def run(self, request, tenant, *arguments, **options):
        self.tenants.append(tenant.id)

        async def turn():
            yield Completion(Answer(), CacheStatus.MISS, 0.0, "", 0, "", text=tenant.id)

        return turn()

    def warm_session(self, tenant, session_id) -> None:
        pass


WRONG_KEY = (("authorization", "Bearer not-a-key"),)
ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)
NARROW = (("authorization", f"Bearer {NARROW_KEY}"),)
# Who is refused, with what reason: the admin credential is no tenant's key.
REFUSED_CALLERS = [
    ((), Reason.API_KEY_MISSING),
    (WRONG_KEY, Reason.API_KEY_INVALID),
    ((("authorization", f"Basic {KEY}"),), Reason.UNSUPPORTED_AUTH_SCHEME),
    (ADMIN, Reason.API_KEY_INVALID),
]


async def test_a_chat_without_a_valid_key_is_refused_before_its_8_mib_request_is_read_or_handled():
    turns = RecordsTurns()
    big = pb.ChatRequest(model="m", messages=[user("x" * (8 << 20))])
    before = chat_outcomes()
    async with router_stub(RouterServicer(router_settings(), turns, FakeLedger())) as stub:
        for metadata, reason in REFUSED_CALLERS:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                [_ async for _ in stub.Chat(big, metadata=metadata, timeout=10)]
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert reason_of(refused.value.trailing_metadata()) == reason
        # A key let in reaches the handler, with its tenant.
        assert [_ async for _ in stub.Chat(request(), metadata=NARROW, timeout=10)]
    assert turns.tenants == ["narrow"]
    # Observed in the RPC metrics as every other refusal is.
    assert chat_outcomes() - before == collections.Counter({"UNAUTHENTICATED": len(REFUSED_CALLERS), "OK": 1})


async def test_a_call_without_a_valid_key_is_refused_without_waiting_for_its_request():
    """A unary Chat whose caller never sends its message: were the key
    checked by the handler, the router would wait for the message until the
    call's deadline; the gate refuses it at once."""
    never = asyncio.Event()
    async with serving_router(router_servicer()) as port, bounded_channel(f"127.0.0.1:{port}") as channel:
        chat = channel.stream_stream(f"/{SERVICE.full_name}/Chat")
        for metadata, reason in REFUSED_CALLERS:
            call = chat(held_back(never), metadata=metadata, timeout=30)
            assert await asyncio.wait_for(call.code(), 10) == grpc.StatusCode.UNAUTHENTICATED
            assert reason_of(await call.trailing_metadata()) == reason
    never.set()


async def test_each_handler_serves_the_tenant_the_gate_let_into_its_own_call():
    """The gate's tenant reaches the handler of every shape (unary, Chat's
    server stream, a bidirectional stream), with calls of two tenants under
    way at once."""
    async with router_stub(RouterServicer(router_settings(), RecordsTurns(), FakeLedger())) as stub:

        async def listed(metadata) -> list[str]:
            response = await stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
            return [model.alias for model in response.models]

        async def chat(metadata) -> str:
            responses = [r async for r in stub.Chat(request(), metadata=metadata, timeout=10)]
            return responses[-1].completion.text

        async def session(metadata) -> list[str]:
            stream = stub.ChatSession(metadata=metadata, timeout=10)
            for _ in range(2):
                await stream.write(pb.ChatSessionRequest(model="m", messages=[user("hi")]))
            await stream.done_writing()
            return [response.completion.text async for response in stream]

        callers = (NARROW, AUTH) * 4
        assert await asyncio.gather(*map(listed, callers)) == [["m"], ["m", "other"]] * 4
        assert await asyncio.gather(*map(chat, callers)) == ["narrow", "dev"] * 4
        assert await asyncio.gather(*map(session, callers)) == [["narrow"] * 2, ["dev"] * 2] * 4
        usage = await stub.GetUsage(pb.GetUsageRequest(tenant_id="narrow"), metadata=ADMIN, timeout=10)
        assert usage.tenant_id == "narrow"


async def test_a_call_whose_request_comes_late_serves_its_own_tenant_not_the_call_let_in_since():
    """A Chat whose caller holds its request back while another tenant's
    Chat is let in and served: each turn is its own caller's. Its handler
    starts only once its request has come, after the other call's gate ran,
    so a caller kept anywhere but the call's own context would be the other
    tenant's."""
    turns = RecordsTurns()
    release = asyncio.Event()
    servicer = RouterServicer(router_settings(), turns, FakeLedger())
    async with serving_router(servicer) as port, bounded_channel(f"127.0.0.1:{port}") as channel:
        chat = channel.stream_stream(f"/{SERVICE.full_name}/Chat")
        late = chat(held_back(release, request().SerializeToString()), metadata=NARROW, timeout=10)
        await asyncio.sleep(0.3)  # its gate has let it in; its handler waits for the request
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        other = [response async for response in stub.Chat(request(), metadata=AUTH, timeout=10)]
        release.set()
        answers = [pb.ChatResponse.FromString(response) async for response in late]
    assert (other[-1].completion.text, answers[-1].completion.text) == ("dev", "narrow")
    assert turns.tenants == ["dev", "narrow"]


async def test_a_router_served_without_its_gate_fails_closed():
    service = serving.Service("router", SERVICE_NAMES)
    add_to_server(router_servicer(), service.server)
    port = await serving.start(service, "127.0.0.1:0", _nothing)
    try:
        async with bounded_channel(f"127.0.0.1:{port}") as channel:
            stub = router_service_pb2_grpc.RouterServiceStub(channel)
            with structlog.testing.capture_logs(), pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=10)
    finally:
        await serving.stop(service, grace_s=0)
    assert failed.value.code() == grpc.StatusCode.INTERNAL


async def test_an_admin_service_served_without_its_gate_fails_closed():
    service = serving.Service("router", SERVICE_NAMES)
    keys = KeyStore(redis=None)  # never reached: the handler refuses first
    admin_service_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(keys, {}, ""), service.server)
    port = await serving.start(service, "127.0.0.1:0", _nothing)
    try:
        async with bounded_channel(f"127.0.0.1:{port}") as channel:
            stub = admin_service_pb2_grpc.AdminServiceStub(channel)
            with structlog.testing.capture_logs(), pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.ListKeys(admin_pb.ListKeysRequest(tenant_id="dev"), timeout=10)
    finally:
        await serving.stop(service, grace_s=0)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
