"""A session id the context service refuses names the request's field it
came in: ForkSession takes two (its source's session_id and the fork's
new_session_id), and a bad new_session_id was reported as a bad session_id.
Checked before anything is read: the store below is never connected."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio as redis

from meshgate.config import Settings
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.context import token_counts
from services.context.servicer import ContextServicer
from services.context.store import SessionStore

MODELS = {"tiny-gpt": Settings().models["tiny-gpt"]}


@pytest.fixture(scope="module")
def servicer() -> ContextServicer:
    store = SessionStore(redis.Redis(), ttl_s=0, max_turns=0, max_session_bytes=0)
    return ContextServicer(store, MODELS, token_counts.for_models(MODELS))


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"session_id": "source", "new_session_id": "a b"}, "new_session_id"),
        ({"session_id": "x" * 129, "new_session_id": "fork"}, "session_id"),
        ({"session_id": "a b"}, "session_id"),
    ],
)
async def test_a_fork_names_the_session_id_it_refuses(servicer, request_fields, field) -> None:
    """Taken before: ForkSession(session_id="source", new_session_id="a b")
    was refused "session_id must be 1 to 128 characters of [A-Za-z0-9_-]",
    with no field in its ErrorInfo, naming the source that was fine."""
    with pytest.raises(MeshgateError) as refused:
        await servicer.ForkSession(pb.ForkSessionRequest(tenant_id="t", **request_fields), None)
    assert (refused.value.code, refused.value.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_SESSION_ID,
    )
    assert refused.value.metadata == {"field": field}
    assert refused.value.message.startswith(f"{field} must be 1 to 128 characters")


async def test_a_bad_session_id_elsewhere_names_its_field(servicer) -> None:
    with pytest.raises(MeshgateError) as refused:
        await servicer.GetSession(pb.GetSessionRequest(tenant_id="t", session_id="a b"), None)
    assert refused.value.reason == Reason.INVALID_SESSION_ID
    assert refused.value.metadata == {"field": "session_id"}
