"""AssembleContext's at_version without a session: a stateless assembly is at
version 0 (its inputs say so, and rebuild it with at_version 0); any other
version is refused, not ignored. Checked before anything is read: the store
below is never connected."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio as redis

from meshgate.common.v1 import common_pb2
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


def stateless(**fields) -> pb.AssembleContextRequest:
    return pb.AssembleContextRequest(
        tenant_id="t",
        new_messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="hello")],
        model="tiny-gpt",
        max_prompt_tokens=400,
        **fields,
    )


async def test_a_stateless_assembly_at_a_version_but_0_is_refused(servicer) -> None:
    """Taken before (a real context service on real Redis): at_version 5
    answered as if unset, the new messages alone and the same assembly_id,
    as though version 5 of some session had been read."""
    with pytest.raises(MeshgateError) as refused:
        await servicer.AssembleContext(stateless(at_version=5), None)
    assert (refused.value.code, refused.value.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_VERSION,
    )
    assert refused.value.metadata == {"field": "at_version"}


async def test_a_stateless_assembly_is_rebuilt_from_its_inputs_at_version_0(servicer) -> None:
    assembled = await servicer.AssembleContext(stateless(), None)
    rebuilt = await servicer.AssembleContext(stateless(at_version=assembled.inputs.session_version), None)
    assert assembled.inputs.session_version == 0
    assert rebuilt.assembly_id == assembled.assembly_id
