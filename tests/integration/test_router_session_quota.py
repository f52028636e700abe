"""A session turn of a tenant whose sessions hold context.max_bytes_per_tenant,
through the real router in front of real context, cache and inference
services (real Redis, real Triton). The turn that first finds the bound is
refused by its append, after its answer went out (the bound is counted in a
record of the tenant's, which the assembly does not read); the context
replica remembers that refusal, so the tenant's later turns are refused
SESSION_QUOTA_EXCEEDED before anything is generated for them (no delta, no
token billed), while they would pass the bound on what it last held as
that replica found it (a delete there gives room at once), within
store.QUOTA_REFUSAL_KEPT_S."""

from __future__ import annotations

import uuid

import grpc
import pytest

from meshgate.common.v1 import common_pb2
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.errors import error_info
from meshgate.router.v1 import router_service_pb2 as pb
from services.context import store as session_store
from tests.integration.conftest import (
    answer_of,
    keyed_tenants,
    router_and_context,
    service_settings,
)
from tests.integration.test_router_session_full import refused, stored, until_requests

pytestmark = pytest.mark.integration

# Room for a few turns of QUESTION (each ~2.3 KB as the bound counts it:
# its bytes, the answer's and 1,024 a turn) after the session's own, and
# once they fill it, for another session but not another turn.
MAX_BYTES_PER_TENANT = 7488 + 2 * session_store.SESSION_OVERHEAD_BYTES
QUESTION = "q" * 200
USER = common_pb2.ROLE_USER


@pytest.fixture(scope="module")
async def mesh(redis_url, inference_address):
    """(router stub, context stub, tenant id, auth metadata): one context
    replica, the tenant's sessions bounded at MAX_BYTES_PER_TENANT, for a
    tenant of this module's alone."""
    tenant = f"quota-{uuid.uuid4().hex[:8]}"
    settings = service_settings(redis_url, inference_address)
    settings.context.max_bytes_per_tenant = MAX_BYTES_PER_TENANT
    auth = keyed_tenants(settings, tenant)
    async with router_and_context(settings) as (router, context):
        yield router, context, tenant, auth[tenant]


def turn(session_id: str, text: str = QUESTION) -> pb.ChatRequest:
    return pb.ChatRequest(
        model="tiny-gpt",
        session_id=session_id,
        messages=[common_pb2.Message(role=USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=3, temperature=0.0),
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )


async def until_refused_by_its_append(router, session_id: str, auth) -> tuple[int, dict[str, str]]:
    """Turns on the session until one is refused by its append: the deltas
    that refused turn delivered, and its ErrorInfo's metadata."""
    for _ in range(MAX_BYTES_PER_TENANT // 2000 + 1):
        deltas = 0
        try:
            async for response in router.Chat(turn(session_id), metadata=auth):
                deltas += response.HasField("delta")
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            assert (error.code(), info.reason) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "SESSION_QUOTA_EXCEEDED",
            ), error
            return deltas, dict(info.metadata)
    pytest.fail("the tenant's sessions never reached their bound")


async def test_a_tenant_refused_at_its_bound_is_refused_before_generating_on_its_next_turn(mesh) -> None:
    router, context, tenant, auth = mesh
    session_id = (await router.CreateSession(pb.CreateSessionRequest(), metadata=auth)).session_id
    deltas, at_append = await until_refused_by_its_append(router, session_id, auth)
    # The turn that found the bound: its answer went out, then its append failed.
    assert deltas > 0
    assert int(at_append["delivered_deltas"]) == deltas
    held = await stored(context, tenant, session_id)
    before = await until_requests(router, auth, held[0] + 1)

    # The next turn of the tenant is refused as that append was, before
    # anything is generated for it: no delta, no token billed.
    code, reason, metadata = await refused(router.Chat(turn(session_id), metadata=auth))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_QUOTA_EXCEEDED")
    assert metadata == {
        "limit": "max_bytes_per_tenant",
        "scope": "tenant",
        "limit_value": str(MAX_BYTES_PER_TENANT),
        "bytes": at_append["bytes"],
    }
    # So is a turn on another of its sessions.
    other = (await router.CreateSession(pb.CreateSessionRequest(), metadata=auth)).session_id
    assert (await refused(router.Chat(turn(other), metadata=auth)))[1] == "SESSION_QUOTA_EXCEEDED"
    row = await until_requests(router, auth, before.requests + 2)
    assert (row.failures, row.completion_tokens) == (before.failures + 2, before.completion_tokens)
    assert await stored(context, tenant, session_id) == held

    # A delete on this replica gives the bytes back and ends the memory at
    # once: the next turn is answered and stored.
    await context.DeleteSession(context_pb.DeleteSessionRequest(tenant_id=tenant, session_id=session_id))
    text, completion = await answer_of(router.Chat(turn(other, "and now?"), metadata=auth))
    assert completion.session_version == 1
    assert await stored(context, tenant, other) == (1, ["and now?", text])
