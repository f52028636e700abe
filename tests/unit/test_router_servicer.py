"""The router's gRPC adapter under grpcio-testing: real protobuf requests,
metadata, deadlines and statuses, the pipeline's stages faked; no sockets."""

from __future__ import annotations

import asyncio
import threading

import grpc
import grpc_testing
import pytest
from google.rpc import error_details_pb2, status_pb2

from meshgate.config import ModelSettings, Settings, TenantSettings, hash_api_key
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from services.router.auth import Authenticator
from services.router.pipeline import Answer, CacheStatus, Hit, Pipeline
from services.router.servicer import RouterServicer
from tests.unit.test_router_pipeline import FakeCache, FakeContexts, FakeGenerator, request, user

KEY = "unit-key"
NARROW_KEY = "narrow-key"
AUTH = (("authorization", f"Bearer {KEY}"),)
SERVICE = pb.DESCRIPTOR.services_by_name["RouterService"]


class _AsyncBridge:
    """grpc_testing drives a servicer's methods synchronously on its own
    threads; this runs the asyncio servicer's on one event loop thread, and
    ends a call with a MeshgateError's rich status as ErrorInterceptor does."""

    def __init__(self, servicer, loop: asyncio.AbstractEventLoop) -> None:
        self._servicer = servicer
        self._loop = loop

    def _run(self, awaitable):
        return asyncio.run_coroutine_threadsafe(awaitable, self._loop).result(30)

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
            arguments = request if hasattr(request, "DESCRIPTOR") else self._requests(request)
            result = handler(arguments, context)
            if hasattr(result, "__anext__"):
                return self._stream(result, context)
            try:
                return self._run(result)
            except MeshgateError as error:
                self._end_with(error, context)
                return None

        return call

    def _stream(self, responses, context):
        while True:
            try:
                yield self._run(anext(responses))
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


def served(loop, cache=None, generator=None, contexts=None):
    settings = Settings()
    settings.router.dev_api_key = KEY
    settings.router.tenants = [
        TenantSettings(id="narrow", api_key_sha256=[hash_api_key(NARROW_KEY)], models=["m"])
    ]
    settings.models = {
        "m": ModelSettings(context_window_tokens=512, max_output_tokens=64, default_max_tokens=8),
        "other": ModelSettings(max_output_tokens=32, default_max_tokens=8),
    }
    pipeline = Pipeline(
        settings.router,
        settings.models,
        contexts or FakeContexts(),
        cache or FakeCache(),
        generator or FakeGenerator(),
    )
    servicer = RouterServicer(settings, Authenticator(settings.router), pipeline)
    return grpc_testing.server_from_dictionary(
        {SERVICE: _AsyncBridge(servicer, loop)}, grpc_testing.strict_real_time()
    )


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
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return info.reason


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
