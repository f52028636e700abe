"""A service's bound on calls in flight (meshgate/serving.py bound_calls,
meshgate/errors.py ErrorInterceptor.bound), over a real socket: the call
past the bound is refused with RESOURCE_EXHAUSTED / SERVICE_BUSY and its
ErrorInfo, health checks are not, and a call that ends however (answered,
cancelled by its caller) makes room again. The servicer is a stand-in whose
GetSession waits until released: this is the server's logic alone
(tests/integration/test_router_call_bound.py runs a real router)."""

from __future__ import annotations

import asyncio
import collections
import contextlib

import grpc
import pytest
import structlog.testing
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate import serving
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.errors import CallGate, MeshgateError, error_info, from_rpc_error, retry_after_s
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as router_pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.router.servicer import ADMITTED_METADATA
from tests.mesh import bounded_channel, rpc_outcomes

LIMIT = 2
# What refuse_without_pass lets in (and every other test's gateless server ignores).
PASS = (("pass", "yes"),)


class HeldSessions(
    context_service_pb2_grpc.ContextServiceServicer, router_service_pb2_grpc.RouterServiceServicer
):
    """GetSession (unary-unary), Chat (unary-stream) and ChatSession
    (stream-stream) answer once ``release`` is set; ``entered`` counts the
    calls that reached them."""

    def __init__(self) -> None:
        self.entered = 0
        self.release = asyncio.Event()

    async def GetSession(self, request, context):
        self.entered += 1
        await self.release.wait()
        return pb.GetSessionResponse(session=pb.Session(session_id=request.session_id))

    async def Chat(self, request, context):
        self.entered += 1
        await self.release.wait()
        yield router_pb.ChatResponse()

    async def ChatSession(self, request_iterator, context):
        self.entered += 1
        # As the router's does: its client writes only once admitted.
        await context.send_initial_metadata(ADMITTED_METADATA)
        await self.release.wait()
        # A turn, then its answer: ended before the client's write was read,
        # the call would race that write (grpc/grpc#36066 again).
        await anext(aiter(request_iterator))
        yield router_pb.ChatSessionResponse()


async def nothing() -> None:
    pass


@contextlib.asynccontextmanager
async def bounded(limit: int, uncounted_services: tuple[str, ...] = (), gate: CallGate | None = None):
    """(a ContextService stub, its servicer, a health stub, a RouterService
    stub) on a server bounded at ``limit``, its calls checked by ``gate``
    where given; the servicer serves both services (the RouterService for
    calls of the streaming shapes)."""
    service = serving.Service("context", ["meshgate.context.v1.ContextService"])
    servicer = HeldSessions()
    context_service_pb2_grpc.add_ContextServiceServicer_to_server(servicer, service.server)
    router_service_pb2_grpc.add_RouterServiceServicer_to_server(servicer, service.server)
    service.bound_calls(limit, uncounted_services)
    if gate is not None:
        service.errors.gate(gate)
    port = await serving.start(service, "127.0.0.1:0", nothing)
    try:
        async with bounded_channel(f"127.0.0.1:{port}") as channel:
            yield (
                context_service_pb2_grpc.ContextServiceStub(channel),
                servicer,
                health_pb2_grpc.HealthStub(channel),
                router_service_pb2_grpc.RouterServiceStub(channel),
            )
    finally:
        await serving.stop(service, grace_s=0)


def get(stub, name: str, metadata=PASS):
    request = pb.GetSessionRequest(tenant_id="t", session_id=name)
    return stub.GetSession(request, metadata=metadata, timeout=10)


async def until(condition) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


async def refusal(stub) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await get(stub, "one-too-many")
    return refused.value


async def holds_the_bound_again(stub, servicer: HeldSessions) -> None:
    """Once earlier calls have ended, exactly LIMIT calls are admitted again
    and the next one refused: every call ended was counted out once (a
    count that went below zero would admit more)."""
    servicer.release = asyncio.Event()
    entered = servicer.entered
    held = [get(stub, f"held-again{n}") for n in range(LIMIT)]
    await until(lambda: servicer.entered == entered + LIMIT)
    assert (await refusal(stub)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert servicer.entered == entered + LIMIT
    servicer.release.set()
    await asyncio.gather(*held)


async def test_the_call_past_the_bound_is_refused_with_error_info_then_served_again() -> None:
    async with bounded(LIMIT) as (stub, servicer, health, _):
        held = [get(stub, f"s{n}") for n in range(LIMIT)]
        await until(lambda: servicer.entered == LIMIT)

        refused = await refusal(stub)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(refused)
        assert info.reason == Reason.SERVICE_BUSY
        assert dict(info.metadata) == {
            "limit": "max_concurrent_rpcs",
            "scope": "replica",
            "limit_value": str(LIMIT),
            "service": "context",
        }
        # When to retry, as the limits say it; a router that meets it for
        # good answers its caller UNAVAILABLE with a RetryInfo of its own.
        assert retry_after_s(refused) == 1
        passed_on = from_rpc_error(refused, "context")
        assert (passed_on.code, passed_on.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.DOWNSTREAM_FAILED)
        assert "max_concurrent_rpcs" not in passed_on.message
        # Refused before the servicer: it saw only the held calls.
        assert servicer.entered == LIMIT
        # Health checks are not ours to bound: a busy replica still says how it is.
        assert (
            await health.Check(health_pb2.HealthCheckRequest())
        ).status == health_pb2.HealthCheckResponse.SERVING

        servicer.release.set()
        assert [(await call).session.session_id for call in held] == [f"s{n}" for n in range(LIMIT)]
        # The answered calls made room: served again, up to the bound.
        answers = await asyncio.gather(*(get(stub, f"again{n}") for n in range(LIMIT)))
        assert [a.session.session_id for a in answers] == [f"again{n}" for n in range(LIMIT)]
        await holds_the_bound_again(stub, servicer)


async def chat(router):
    """A unary-stream call: its first response, once the call has ended."""
    call = router.Chat(router_pb.ChatRequest(), timeout=10)
    return await ended(call, await call.read())


async def chat_session(router):
    """A stream-stream call: its first response to one request, once the
    call has ended."""
    call = router.ChatSession(timeout=10)
    # As RouterService.ChatSession's clients do: a stream refused at open
    # ends trailers-only, and a write racing that end makes grpc.aio report
    # its own INTERNAL in place of the refusal (grpc/grpc#36066; a clean-clone
    # run failed so). Its read raises the refusal.
    if (await call.initial_metadata()).get(ADMITTED_METADATA[0][0]) is None:
        await call.read()
        raise AssertionError("a call ended trailers-only with no error")
    await call.write(router_pb.ChatSessionRequest())
    return await ended(call, await call.read())


async def ended(call, response):
    """``response``, once ``call``'s status has come: the server counts a
    call out when its handler ends, before it sends the status, but not
    before the client reads the response. A test that went on at the first
    response could find the call still counted and the next calls refused
    past the bound (the stream-stream case failed once in a unit run under
    load, its output not kept: this is the race it could have met)."""
    if (await call.code()) != grpc.StatusCode.OK:
        raise AssertionError(await call.details())
    return response


@pytest.mark.parametrize("shape", [chat, chat_session], ids=["unary_stream", "stream_stream"])
async def test_a_streaming_call_past_the_bound_is_refused_too(shape) -> None:
    async with bounded(LIMIT) as (stub, servicer, _, router):
        held = [get(stub, f"s{n}") for n in range(LIMIT)]
        await until(lambda: servicer.entered == LIMIT)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await shape(router)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(refused.value).reason == Reason.SERVICE_BUSY
        assert servicer.entered == LIMIT
        servicer.release.set()
        await asyncio.gather(*held)
        # Admitted once there is room, and counted out when it ends.
        assert await shape(router) is not None
        await holds_the_bound_again(stub, servicer)


async def test_a_call_its_caller_cancelled_makes_room() -> None:
    async with bounded(LIMIT) as (stub, servicer, _, _):
        held = [get(stub, f"s{n}") for n in range(LIMIT)]
        await until(lambda: servicer.entered == LIMIT)
        assert (await refusal(stub)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        held[0].cancel()

        async def served() -> bool:
            call = get(stub, "after-cancel")
            await until(lambda: servicer.entered > LIMIT or call.done())
            if call.done():
                # Refused: the server had not seen the cancellation yet.
                assert (await call.code()) == grpc.StatusCode.RESOURCE_EXHAUSTED
                return False
            servicer.release.set()
            return (await call).session.session_id == "after-cancel"

        for _ in range(50):
            if await served():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the cancelled call never made room")
        await held[1]
        await holds_the_bound_again(stub, servicer)


async def test_no_bound_refuses_nothing() -> None:
    async with bounded(0) as (stub, servicer, _, _):
        held = [get(stub, f"s{n}") for n in range(8 * LIMIT)]
        await until(lambda: servicer.entered == 8 * LIMIT)
        servicer.release.set()
        assert len(await asyncio.gather(*held)) == 8 * LIMIT


async def test_the_calls_of_an_uncounted_service_are_never_counted_nor_refused() -> None:
    # As the router's AdminService: the operator's way in stays open.
    async with bounded(LIMIT, ("meshgate.context.v1.ContextService",)) as (stub, servicer, _, _):
        held = [get(stub, f"s{n}") for n in range(4 * LIMIT)]
        await until(lambda: servicer.entered == 4 * LIMIT)
        servicer.release.set()
        assert len(await asyncio.gather(*held)) == 4 * LIMIT


async def refuse_without_pass(method: str, metadata) -> None:
    """A gate as the router's CallerGate: metadata in, a refusal or nothing out."""
    if ("pass", "yes") not in tuple(metadata or ()):
        raise MeshgateError(grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_MISSING, "no pass")
    if method.endswith("/ChatSession"):
        raise RuntimeError("a gate's bug")


async def test_the_gate_refuses_before_the_bound_counts_and_a_call_it_refuses_takes_no_place() -> None:
    async with bounded(LIMIT, gate=refuse_without_pass) as (stub, servicer, health, router):
        # Refused by the gate, before the handler: more of them than the
        # bound, and the bound still admits LIMIT calls after them.
        for name in ("a", "b", "c"):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await get(stub, name, metadata=())
            assert (refused.value.code(), error_info(refused.value).reason) == (
                grpc.StatusCode.UNAUTHENTICATED,
                Reason.API_KEY_MISSING,
            )
        assert servicer.entered == 0
        held = [get(stub, f"s{n}") for n in range(LIMIT)]
        await until(lambda: servicer.entered == LIMIT)
        # With the bound held, a call the gate refuses is told why, not
        # that the replica is busy: it was never counted; one it lets in is.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await get(stub, "keyless", metadata=())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await refusal(stub)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # A gate's own failure is an internal error, never a crash; health
        # checks are not ours to gate.
        with structlog.testing.capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as failed:
            [_ async for _ in router.ChatSession(iter(()), metadata=PASS, timeout=10)]
        assert (failed.value.code(), error_info(failed.value).reason) == (
            grpc.StatusCode.INTERNAL,
            Reason.INTERNAL,
        )
        assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == ["unhandled error"]
        assert (
            await health.Check(health_pb2.HealthCheckRequest())
        ).status == health_pb2.HealthCheckResponse.SERVING
        servicer.release.set()
        await asyncio.gather(*held)
        assert servicer.entered == LIMIT


def get_session_outcomes() -> collections.Counter:
    return rpc_outcomes("context", "ContextService/GetSession")


async def test_a_call_whose_caller_hangs_up_while_the_gate_awaits_is_observed_as_cancelled() -> None:
    checking = asyncio.Event()

    async def never_answers(method: str, metadata) -> None:
        """A gate as the router's waiting on its key's lookup, which never comes."""
        checking.set()
        await asyncio.Event().wait()

    before = get_session_outcomes()
    async with bounded(LIMIT, gate=never_answers) as (stub, servicer, _, _):
        call = get(stub, "hung-up")
        await asyncio.wait_for(checking.wait(), 10)
        call.cancel()
        await until(lambda: get_session_outcomes() - before == collections.Counter({"CANCELLED": 1}))
        assert servicer.entered == 0
