"""A ChatSession stream opened for an existing session warms it: the router
asks its context service to read the session into memory while the caller's
first message is still coming, and that first turn continues the session.
Real router, context and cache services, a real Triton and a Redis of this
module's own (so what the context service reads from it can be counted)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from meshgate.common.v1 import common_pb2
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.context import app as context_app
from services.router.servicer import SESSION_METADATA_KEY
from tests.integration.conftest import running, running_router, service_settings
from tests.integration.test_context_versions import _data_commands, _own_redis, _settled, _until
from tests.mesh import CALL_TIMEOUT_S, bounded_channel, router_channel

pytestmark = pytest.mark.integration

KEY = "warmup-test-key"
AUTH = [("authorization", f"Bearer {KEY}")]
# The development key's tenant (services/router/auth.py).
TENANT = "dev"


def _turns(*contents: str) -> list[common_pb2.Message]:
    roles = (common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT)
    return [common_pb2.Message(role=roles[i % 2], content=c) for i, c in enumerate(contents)]


@contextlib.asynccontextmanager
async def _mesh(tmp_path, inference_address):
    """(router, the router's context replica, another context replica, the Redis client)."""
    async with contextlib.AsyncExitStack() as stack:
        url, client = await stack.enter_async_context(_own_redis(tmp_path))
        settings = service_settings(url, inference_address, KEY)
        settings.context.inference_address = inference_address
        router_address = await stack.enter_async_context(running_router(settings))
        router = router_service_pb2_grpc.RouterServiceStub(
            await stack.enter_async_context(bounded_channel(router_address))
        )
        routers_context = context_service_pb2_grpc.ContextServiceStub(
            await stack.enter_async_context(router_channel(settings.router.context_address, "context"))
        )
        # Writes through a replica of its own, so the router's never read the session.
        other_address = await stack.enter_async_context(running(context_app, "context", settings))
        other = context_service_pb2_grpc.ContextServiceStub(
            await stack.enter_async_context(router_channel(other_address, "context"))
        )
        yield router, routers_context, other, client


async def _stored_session(context, *contents: str) -> str:
    created = await context.CreateSession(context_pb.CreateSessionRequest(tenant_id=TENANT))
    session_id = created.session.session_id
    await context.AppendTurns(
        context_pb.AppendTurnsRequest(
            tenant_id=TENANT, session_id=session_id, expected_version=0, messages=_turns(*contents)
        )
    )
    return session_id


async def _assemble(context, session_id: str) -> context_pb.AssembleContextResponse:
    return await context.AssembleContext(
        context_pb.AssembleContextRequest(
            tenant_id=TENANT,
            session_id=session_id,
            new_messages=_turns("and now?"),
            model="tiny-gpt",
            max_prompt_tokens=400,
        )
    )


async def test_opening_a_stream_for_a_session_warms_it_and_continues_it(tmp_path, inference_address) -> None:
    async with _mesh(tmp_path, inference_address) as (router, routers_context, other, client):
        # The router's context replica caches only once its change
        # subscription is up: wait until a repeated assembly reads nothing.
        warm_up = await _stored_session(other, "q", "a")

        async def live() -> bool:
            await _assemble(routers_context, warm_up)
            before = await _settled(client)
            await _assemble(routers_context, warm_up)
            return await _data_commands(client) == before

        await _until(live)

        opened = await _stored_session(other, "q0", "a0", "q1", "a1")
        control = await _stored_session(other, "c0", "c1")
        first_message = asyncio.Event()

        async def requests():
            await first_message.wait()
            yield pb.ChatSessionRequest(
                model="tiny-gpt",
                messages=_turns("and then?"),
                parameters=common_pb2.GenerationParameters(max_tokens=4),
                cache_policy=pb.CACHE_POLICY_BYPASS,
            )

        stream = router.ChatSession(
            requests(), metadata=[*AUTH, (SESSION_METADATA_KEY, opened)], timeout=CALL_TIMEOUT_S
        )
        await stream.wait_for_connection()
        await _settled(client)
        # Asked once each (asking warms too): the stream's session is in
        # memory already; the control session, that no stream opened, is not.
        warmed = await routers_context.PrefetchSession(
            context_pb.PrefetchSessionRequest(tenant_id=TENANT, session_id=opened)
        )
        cold = await routers_context.PrefetchSession(
            context_pb.PrefetchSessionRequest(tenant_id=TENANT, session_id=control)
        )
        assert warmed.already_hot
        assert not cold.already_hot
        # And the assembly the first turn will make reads nothing from Redis.
        before = await _settled(client)
        prompt = await _assemble(routers_context, opened)
        assert await _data_commands(client) == before
        assert [m.content for m in prompt.messages] == ["q0", "a0", "q1", "a1", "and now?"]

        # The first turn names no session: it continues the one the stream opened for.
        first_message.set()
        completion = None
        async for response in stream:
            assert not response.HasField("failure"), response
            if response.HasField("completion"):
                completion = response.completion
                break
        stream.cancel()
        assert completion is not None
        assert completion.session_id == opened
        assert completion.session_version == 2
