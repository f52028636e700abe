"""A session turn rides out a context service restart: a call that failed
UNAVAILABLE waits (bounded) for the router's channel to be ready and is sent
once more; a stateless turn never waits, and a service that stays away is
still reported UNAVAILABLE."""

from __future__ import annotations

import asyncio
import types

import grpc
import pytest

from meshgate.common.v1 import common_pb2
from meshgate.config import RouterSettings
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.errors import MeshgateError
from meshgate.mesh_auth import TenantTokens
from services.router import downstream
from services.router.auth import Tenant
from services.router.pipeline import Budget


def unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="connection refused"
    )


class Method:
    """A unary stub method failing UNAVAILABLE ``failures`` times, then answering."""

    def __init__(self, answer, failures: int) -> None:
        self.answer = answer
        self.failures = failures
        self.calls = 0

    async def __call__(self, request, **options):
        self.calls += 1
        if self.calls <= self.failures:
            raise unavailable()
        return self.answer


class Channel:
    """Ready ``after_s`` seconds after first asked (never when None)."""

    def __init__(self, after_s: float | None) -> None:
        self.after_s = after_s
        self.asked = 0

    async def channel_ready(self) -> None:
        self.asked += 1
        if self.after_s is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.after_s)


def service(channel: Channel, failures: int) -> tuple[downstream.ContextService, types.SimpleNamespace]:
    stub = types.SimpleNamespace(
        AssembleContext=Method(context_pb.AssembleContextResponse(session_version=4), failures),
        CreateSession=Method(
            context_pb.CreateSessionResponse(session=context_pb.Session(session_id="s-new")), failures
        ),
    )
    return downstream.ContextService(stub, TenantTokens(None, 60), RouterSettings(), channel=channel), stub


def turn(session_id: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        tenant=Tenant("t1", frozenset({"*"})),
        session_id=session_id,
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="hi")],
        model_alias="m1",
        model=types.SimpleNamespace(context_window_tokens=512),
        max_tokens=16,
        budget=Budget.of(5.0),
    )


async def test_a_session_turn_is_sent_again_once_the_channel_is_ready():
    channel = Channel(after_s=0.05)
    context, stub = service(channel, failures=1)
    messages, version = await context.assemble(turn("s1"))
    assert (messages, version) == ([], 4)
    assert stub.AssembleContext.calls == 2
    assert channel.asked == 1


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
