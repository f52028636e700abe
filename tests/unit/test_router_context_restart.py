"""A session turn rides out a context service restart: a call that failed
UNAVAILABLE waits (bounded) for the router's channel to be ready and is sent
once more; a stateless turn never waits, and a service that stays away is
still reported UNAVAILABLE. A busy replica (SERVICE_BUSY, the request not
read) is treated as not taken too; any other RESOURCE_EXHAUSTED is not."""

from __future__ import annotations

import asyncio
import time
import types

import grpc
import pytest
import structlog.testing

from meshgate.common.v1 import common_pb2
from meshgate.config import RouterSettings
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.errors import BUSY_RETRY_AFTER_S, MeshgateError, from_rpc_error, retry_info
from meshgate.mesh_auth import TenantTokens
from meshgate.reasons import Reason
from services.router import downstream
from services.router.auth import Tenant
from services.router.pipeline import Answer, Appended, Budget, SummarySpend


def unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="connection refused"
    )


def rpc_error(error: MeshgateError) -> grpc.aio.AioRpcError:
    """``error`` as a caller of our services receives it: its ErrorInfo in the trailers."""
    status = error.to_status()
    return grpc.aio.AioRpcError(
        status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata), details=status.details
    )


def busy(domain: str = "meshgate", service: str = "context", retry_s: float = 0.01) -> grpc.aio.AioRpcError:
    """A ``service`` replica at its max_concurrent_rpcs (meshgate/errors.py
    ErrorInterceptor.bound), asking for a retry after ``retry_s``."""
    return rpc_error(
        MeshgateError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.SERVICE_BUSY,
            "busy",
            {"limit": "max_concurrent_rpcs", "scope": "replica", "limit_value": "1", "service": service},
            domain,
            [retry_info(retry_s)],
        )
    )


def session_full() -> grpc.aio.AioRpcError:
    return rpc_error(
        MeshgateError(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.SESSION_FULL, "full", {"unit": "bytes"})
    )


class Channel:
    """Ready ``after_s`` seconds after first asked (never when None)."""

    def __init__(self, after_s: float | None) -> None:
        self.after_s = after_s
        self.asked = 0
        self.ready = False

    async def channel_ready(self) -> None:
        self.asked += 1
        if self.after_s is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.after_s)
        self.ready = True


class Method:
    """A unary stub method failing ``failures`` times (with ``failure()``,
    UNAVAILABLE unless told), then answering; it notes each request and
    whether the channel was ready."""

    def __init__(self, answer, failures: int, channel: Channel, failure=unavailable) -> None:
        self.answer = answer
        self.failures = failures
        self.failure = failure
        self.channel = channel
        self.calls = 0
        self.requests = []
        self.ready_when_called: list[bool] = []

    async def __call__(self, request, **options):
        self.calls += 1
        self.requests.append(request)
        self.ready_when_called.append(self.channel.ready)
        if self.calls <= self.failures:
            raise self.failure()
        return self.answer


def service(
    channel: Channel, failures: int, failure=unavailable
) -> tuple[downstream.ContextService, types.SimpleNamespace]:
    stub = types.SimpleNamespace(
        AssembleContext=Method(
            context_pb.AssembleContextResponse(session_version=4), failures, channel, failure
        ),
        CreateSession=Method(
            context_pb.CreateSessionResponse(session=context_pb.Session(session_id="s-new")),
            failures,
            channel,
            failure,
        ),
        AppendTurns=Method(
            context_pb.AppendTurnsResponse(
                version=7,
                summary_usage=[
                    context_pb.SummaryUsage(model="m", prompt_tokens=90, completion_tokens=9, summaries=1)
                ],
            ),
            failures,
            channel,
            failure,
        ),
    )
    return downstream.ContextService(stub, TenantTokens(None, 60), RouterSettings(), channel=channel), stub


def turn(session_id: str, budget_s: float = 5.0) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        tenant=Tenant("t1", frozenset({"*"})),
        session_id=session_id,
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="hi")],
        model_alias="m1",
        model=types.SimpleNamespace(context_window_tokens=512),
        max_tokens=16,
        expected_version=None,
        budget=Budget.of(budget_s),
        turn_id="turn-1",
    )


async def test_a_session_turn_is_sent_again_once_the_channel_is_ready():
    channel = Channel(after_s=0.05)
    context, stub = service(channel, failures=1)
    assembled = await context.assemble(turn("s1"))
    assert (assembled.messages, assembled.version) == ([], 4)
    assert stub.AssembleContext.calls == 2
    assert channel.asked == 1
    # Sent again only once the channel is ready, not at once.
    assert stub.AssembleContext.ready_when_called == [False, True]


async def test_creating_a_session_rides_out_a_restart_too():
    context, stub = service(Channel(after_s=0.0), failures=1)
    assert await context.create_session(Tenant("t1", frozenset({"*"})), Budget.of(5.0)) == "s-new"
    assert stub.CreateSession.calls == 2


async def test_a_stateless_turn_never_waits_and_goes_on_without_context():
    channel = Channel(after_s=0.0)
    context, stub = service(channel, failures=1)
    assert await context.assemble(turn("")) is None
    assert stub.AssembleContext.calls == 1
    assert channel.asked == 0


async def test_a_service_that_stays_away_is_reported_unavailable_after_the_grace(monkeypatch):
    monkeypatch.setattr(downstream, "_CONTEXT_RESTART_GRACE_S", 0.05)
    context, stub = service(Channel(after_s=None), failures=5)
    with pytest.raises(MeshgateError) as raised:
        await context.assemble(turn("s1"))
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert stub.AssembleContext.calls == 1


async def test_the_second_attempt_is_the_last():
    context, stub = service(Channel(after_s=0.0), failures=5)
    with pytest.raises(MeshgateError) as raised:
        await context.assemble(turn("s1"))
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert stub.AssembleContext.calls == 2


async def test_a_spent_budget_neither_waits_nor_sends_again():
    channel = Channel(after_s=0.0)
    context, stub = service(channel, failures=1)
    with pytest.raises(MeshgateError) as raised:
        await context.assemble(turn("s1", budget_s=0.0))
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert stub.AssembleContext.calls == 1


async def test_the_wait_for_the_channel_ends_with_the_turns_budget():
    # The grace (3 s) is longer than what is left of the turn: the turn's budget decides.
    context, stub = service(Channel(after_s=None), failures=5)
    started = time.monotonic()
    with pytest.raises(MeshgateError) as raised:
        await asyncio.wait_for(context.assemble(turn("s1", budget_s=0.1)), timeout=2.0)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < downstream._CONTEXT_RESTART_GRACE_S / 2
    assert stub.AssembleContext.calls == 1


async def test_an_append_waits_for_the_channel_and_keeps_its_turn_id(monkeypatch):
    monkeypatch.setattr(downstream, "_APPEND_RETRY_DELAY_S", 0.0)
    channel = Channel(after_s=0.01)
    context, stub = service(channel, failures=2)
    # The reply of the attempt that got one: the summaries' spend its first
    # application took (a reply lost to the restart) comes with it, to bill.
    spend = SummarySpend("m", 90, 9, 1)
    assert await context.append(turn("s1"), "s1", 3, Answer(text="fine")) == Appended(7, (spend,))
    # Its own three attempts, the later ones once the channel is ready,
    # all under one turn id: a reply lost to the restart is answered, not applied twice.
    assert stub.AppendTurns.calls == 3
    assert stub.AppendTurns.ready_when_called == [False, True, True]
    assert len({request.turn_id for request in stub.AppendTurns.requests}) == 1
    assert stub.AppendTurns.requests[0].turn_id


async def test_an_append_to_a_service_that_stays_away_fails_when_its_channel_is_not_ready_in_the_grace(
    monkeypatch,
):
    # Sent again on a channel still not ready, it could only fail at once.
    monkeypatch.setattr(downstream, "_APPEND_RETRY_DELAY_S", 0.0)
    monkeypatch.setattr(downstream, "_CONTEXT_RESTART_GRACE_S", 0.02)
    context, stub = service(Channel(after_s=None), failures=5)
    with pytest.raises(MeshgateError) as raised:
        await context.append(turn("s1"), "s1", 3, Answer(text="fine"))
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert stub.AppendTurns.calls == 1


async def test_a_session_assembly_a_busy_replica_refused_is_sent_again_after_its_retry_info():
    context, stub = service(Channel(after_s=0.0), failures=1, failure=lambda: busy(retry_s=0.05))
    started = time.monotonic()
    assert await context.assemble(turn("s1")) is not None
    assert stub.AssembleContext.calls == 2
    # Its RetryInfo's delay, not the default second.
    assert 0.05 <= time.monotonic() - started < downstream.BUSY_RETRY_AFTER_S


async def test_a_busy_replica_is_not_waited_for_past_the_turns_budget():
    context, stub = service(Channel(after_s=0.0), failures=1, failure=lambda: busy(retry_s=5.0))
    started = time.monotonic()
    with pytest.raises(MeshgateError) as raised:
        await context.assemble(turn("s1", budget_s=1.0))
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert stub.AssembleContext.calls == 1
    assert time.monotonic() - started < 1.0


async def test_a_busy_context_replica_degrades_a_stateless_turn():
    channel = Channel(after_s=0.0)
    context, stub = service(channel, failures=1, failure=busy)
    assert await context.assemble(turn("")) is None
    assert stub.AssembleContext.calls == 1


@pytest.mark.parametrize("failure", [session_full, lambda: busy(domain="elsewhere.example")])
async def test_another_resource_exhausted_neither_degrades_a_stateless_turn_nor_is_sent_again(failure):
    context, stub = service(Channel(after_s=0.0), failures=5, failure=failure)
    with pytest.raises(MeshgateError) as raised:
        await context.assemble(turn(""))
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.AssembleContext.calls == 1


async def test_an_append_a_busy_replica_refused_is_sent_again_under_its_turn_id(monkeypatch):
    monkeypatch.setattr(downstream, "_APPEND_RETRY_DELAY_S", 0.0)
    context, stub = service(Channel(after_s=0.0), failures=2, failure=busy)
    assert (await context.append(turn("s1"), "s1", 3, Answer(text="fine"))).version == 7
    assert stub.AppendTurns.calls == 3
    assert len({request.turn_id for request in stub.AppendTurns.requests}) == 1


async def test_a_busy_answer_naming_a_service_behind_the_context_service_is_its_answer():
    # The context service took the call; the inference replica behind it was busy.
    context, stub = service(Channel(after_s=0.0), failures=5, failure=lambda: busy(service="inference"))
    with pytest.raises(MeshgateError):
        await context.assemble(turn(""))
    assert stub.AssembleContext.calls == 1


async def test_a_final_busy_refusal_is_the_routers_unavailable_with_its_own_retry_info(monkeypatch):
    monkeypatch.setattr(downstream, "_APPEND_RETRY_DELAY_S", 0.0)
    context, stub = service(Channel(after_s=0.0), failures=5, failure=busy)
    with pytest.raises(MeshgateError) as raised:
        await context.append(turn("s1"), "s1", 3, Answer(text="fine"))
    assert stub.AppendTurns.calls == downstream._APPEND_ATTEMPTS
    failure = raised.value
    assert (failure.code, failure.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.DOWNSTREAM_FAILED)
    # Nothing of the replica's limit reaches the caller.
    assert failure.metadata == {"service": "context", "code": "RESOURCE_EXHAUSTED"}
    assert "max_concurrent_rpcs" not in failure.message
    assert failure.details == [retry_info(BUSY_RETRY_AFTER_S)]


async def test_a_downstream_retry_info_is_not_passed_on():
    # When to retry the context call is not when to retry the turn.
    def full_with_retry_info() -> grpc.aio.AioRpcError:
        full = MeshgateError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.SESSION_FULL, "full", details=[retry_info(1)]
        )
        return rpc_error(full)

    context, stub = service(Channel(after_s=0.0), failures=5, failure=full_with_retry_info)
    with pytest.raises(MeshgateError) as raised:
        await context.append(turn("s1"), "s1", 3, Answer(text="fine"))
    assert raised.value.reason == Reason.SESSION_FULL
    assert list(raised.value.details) == []


async def test_an_append_refused_session_full_is_not_sent_again(monkeypatch):
    monkeypatch.setattr(downstream, "_APPEND_RETRY_DELAY_S", 0.0)
    context, stub = service(Channel(after_s=0.0), failures=5, failure=session_full)
    with pytest.raises(MeshgateError) as raised:
        await context.append(turn("s1"), "s1", 3, Answer(text="fine"))
    assert (raised.value.code, raised.value.reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.SESSION_FULL,
    )
    assert stub.AppendTurns.calls == 1


def redis_unavailable() -> grpc.aio.AioRpcError:
    return rpc_error(
        MeshgateError(grpc.StatusCode.UNAVAILABLE, Reason.REDIS_UNAVAILABLE, "session store unavailable")
    )


class SlowFailure:
    """A failure that takes ``after_s`` to come, as the context service's
    REDIS_UNAVAILABLE does when its Redis stops answering (its timeout)."""

    def __init__(self, method: Method, after_s: float) -> None:
        self.method, self.after_s = method, after_s

    async def __call__(self, request, **options):
        await asyncio.sleep(self.after_s)
        return await self.method(request, **options)


@pytest.mark.parametrize("call", ["append", "assemble"])
async def test_a_redis_that_stopped_answering_is_not_waited_for_again(call):
    """REDIS_UNAVAILABLE after the whole Redis timeout is a Redis that stopped
    answering: a turn's append was sent three times, each waiting it out."""
    context = downstream.ContextService(
        types.SimpleNamespace(), TenantTokens(None, 60), RouterSettings(), Channel(0.0), redis_timeout_s=0.05
    )
    method = Method(context_pb.AppendTurnsResponse(version=7), 5, context._channel, redis_unavailable)
    if call == "append":
        context._stub.AppendTurns = SlowFailure(method, 0.06)
        attempt = context.append(turn("s1"), "s1", 3, Answer(text="hello"))
    else:
        method.answer = context_pb.AssembleContextResponse(session_version=4)
        context._stub.AssembleContext = SlowFailure(method, 0.06)
        attempt = context.assemble(turn("s1"))
    with pytest.raises(MeshgateError) as raised:
        await attempt
    assert (raised.value.code, raised.value.reason) == (grpc.StatusCode.UNAVAILABLE, "REDIS_UNAVAILABLE")
    assert method.calls == 1


async def test_a_redis_restarting_is_still_ridden_out():
    """A restarting Redis refuses at once: the append is sent again."""
    context = downstream.ContextService(
        types.SimpleNamespace(), TenantTokens(None, 60), RouterSettings(), Channel(0.0), redis_timeout_s=0.05
    )
    method = Method(context_pb.AppendTurnsResponse(version=7), 1, context._channel, redis_unavailable)
    context._stub.AppendTurns = method
    appended = await context.append(turn("s1"), "s1", 3, Answer(text="hello"))
    assert appended.version == 7
    assert method.calls == 2


def cancelled_by_its_stop() -> grpc.aio.AioRpcError:
    """What grpc-core answers a call its server took in but had not handed
    to a handler when it stopped (grpc/grpc#41785): CANCELLED, no ErrorInfo."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), details="CANCELLED"
    )


async def test_a_session_turn_the_context_services_stop_cancelled_rides_out_its_restart():
    """A CANCELLED the router did not ask for (a cancel of its own is
    asyncio.CancelledError) is the stopping service's UNAVAILABLE: sent
    again once the channel is ready, as after a refused connection. The
    turn failed CANCELLED before, telling the router's caller it cancelled."""
    context, stub = service(Channel(after_s=0.0), failures=1, failure=cancelled_by_its_stop)
    assembled = await context.assemble(turn("s1"))
    assert (assembled.messages, assembled.version) == ([], 4)
    assert stub.AssembleContext.calls == 2


async def test_a_cancelled_context_call_degrades_a_stateless_turn():
    context, stub = service(Channel(after_s=0.0), failures=1, failure=cancelled_by_its_stop)
    assert await context.assemble(turn("")) is None
    assert stub.AssembleContext.calls == 1


async def test_a_cancelled_context_call_that_stays_so_is_unavailable_to_the_caller(monkeypatch):
    monkeypatch.setattr(downstream, "_CONTEXT_RESTART_GRACE_S", 0.05)
    context, _ = service(Channel(after_s=None), failures=5, failure=cancelled_by_its_stop)
    with pytest.raises(MeshgateError) as raised:
        await context.create_session(Tenant("t1", frozenset({"*"})), Budget.of(5.0))
    failure = raised.value
    assert (failure.code, failure.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.DOWNSTREAM_FAILED)
    # The code received stays in the metadata, for the logs and the curious.
    assert failure.metadata == {"service": "context", "code": "CANCELLED"}


def test_a_cancelled_status_with_error_info_keeps_its_reason_as_unavailable():
    """A meshgate status with CANCELLED (the inference service's
    TRITON_CANCELLED: Triton ended the request, the router did not) is
    passed on UNAVAILABLE with its reason."""
    received = rpc_error(
        MeshgateError(grpc.StatusCode.CANCELLED, Reason.TRITON_CANCELLED, "cancelled", {"model": "m"})
    )
    failure = from_rpc_error(received, "inference")
    assert (failure.code, failure.reason, failure.metadata) == (
        grpc.StatusCode.UNAVAILABLE,
        Reason.TRITON_CANCELLED,
        {"model": "m"},
    )
    assert downstream.not_taken(received, "inference")


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, Reason.TENANT_TOKEN_INVALID),
        (grpc.StatusCode.UNAUTHENTICATED, Reason.TENANT_TOKEN_MISSING),
        (grpc.StatusCode.PERMISSION_DENIED, Reason.TENANT_MISMATCH),
        (grpc.StatusCode.PERMISSION_DENIED, Reason.PEER_NOT_ALLOWED),
        (grpc.StatusCode.PERMISSION_DENIED, Reason.METHOD_NOT_ALLOWED),
    ],
)
def test_the_meshs_refusal_of_a_services_own_credentials_is_not_the_callers(code, reason):
    """A service behind the router refusing the router's certificate or
    tenant token (its key renewed before the service saw the new
    certificate) says the mesh is misconfigured: the router's caller, whose
    API key is good, must not get UNAUTHENTICATED (a 401 on the HTTP edge)
    nor the refusal's words, which name internal settings; the log says."""
    received = rpc_error(
        MeshgateError(
            code, reason, "signed with the key of no certificate in mesh.router_cert_file", {"k": "v"}
        )
    )
    with structlog.testing.capture_logs() as logged:
        failure = from_rpc_error(received, "context")
    assert (failure.code, failure.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.DOWNSTREAM_FAILED)
    assert failure.metadata == {"service": "context", "code": code.name}
    assert "router_cert_file" not in failure.message
    (line,) = [entry for entry in logged if entry.get("reason") == reason]
    assert line["downstream"] == "context" and "router_cert_file" in line["details"]
    assert "service" not in line, "every line's service is the one that writes it"


@pytest.mark.parametrize(
    ("deadline_s", "held_ms"),
    [
        # The caller's deadline bounds it: the turn cannot append after it.
        (7.0, 7000),
        # Without one, the longest the router lets the turn take: its
        # generation (max_generation_s, 300 s), one call before it and its
        # append's three tries (downstream_timeout_s, 10 s each).
        (None, 340_000),
    ],
)
async def test_an_assembly_holds_room_for_its_append_no_longer_than_the_turn_may_take(deadline_s, held_ms):
    """A router killed mid-turn never releases its hold: the hold's own
    time is what gives the room back."""
    context, stub = service(Channel(0.0), failures=0)
    stub.AppendTurns = Method(context_pb.AppendTurnsResponse(version=5), 0, context._channel)
    held = turn("s1")
    # A clock that stands still: the deadline is exactly this far off.
    held.budget = Budget(None if deadline_s is None else 100.0 + deadline_s, lambda: 100.0)
    await context.assemble(held)
    [request] = stub.AssembleContext.requests
    assert (request.append_reservation.hold_id, request.append_reservation.hold_for_ms) == ("turn-1", held_ms)
    # The append names the hold, which its script releases.
    await context.append(held, "s1", 4, Answer(text="hello"))
    assert stub.AppendTurns.requests[0].turn_id == "turn-1"
