"""When AssembleContext asks for the new message's embedding
(services/context/servicer.py): before the session is read, so the two
waits overlap, and never left running past a failed assembly. The session
store and the embedder are stand-ins: this is the servicer's ordering logic
alone (tests/integration/test_context_retrieval.py runs the real ones)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from meshgate.common.v1 import common_pb2
from meshgate.config import Settings
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.context import token_counts
from services.context.servicer import ContextServicer
from services.context.store import session_not_found

MODELS = Settings().models


@pytest.fixture(scope="module")
def counters() -> dict[str, token_counts.PromptCounter]:
    return token_counts.for_models(MODELS)


class Embedder:
    """Records what it was asked and whether its wait was cancelled; never answers."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.cancelled = False
        self.called = asyncio.Event()

    async def embed_or_none(self, text: str, timeout_s: float | None = None):
        self.asked.append(text)
        self.called.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


class Store:
    """A session store whose read waits for the embedding to have been asked
    for, then finds no session."""

    def __init__(self, embedder: Embedder) -> None:
        self._embedder = embedder
        self.embedding_asked_before_read: bool | None = None

    async def read(self, tenant_id: str, session_id: str, at_version: int | None = None):
        # Only a running embedding request can set this: were it asked for
        # after the read, this read would wait until the test's timeout.
        await self._embedder.called.wait()
        self.embedding_asked_before_read = True
        raise session_not_found(session_id)


def request(strategy: int) -> pb.AssembleContextRequest:
    return pb.AssembleContextRequest(
        tenant_id="t",
        session_id="s1",
        new_messages=[
            common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Be brief."),
            common_pb2.Message(role=common_pb2.ROLE_USER, content="Where did Ana move in May?"),
        ],
        model="smollm2",
        max_prompt_tokens=2048,
        strategy=strategy,
    )


async def test_the_question_is_embedded_while_the_session_is_read_and_cancelled_on_failure(
    counters,
) -> None:
    embedder = Embedder()
    store = Store(embedder)
    servicer = ContextServicer(store, MODELS, counters, embedder=embedder)
    with pytest.raises(MeshgateError) as failure:
        await asyncio.wait_for(
            servicer.AssembleContext(request(pb.ASSEMBLY_STRATEGY_ADAPTIVE), None), timeout=30
        )
    assert failure.value.code == grpc.StatusCode.NOT_FOUND
    assert failure.value.reason == Reason.SESSION_NOT_FOUND
    assert store.embedding_asked_before_read
    # The user's message only: system text says nothing of what to retrieve.
    assert embedder.asked == ["Where did Ana move in May?"]
    # The failed assembly leaves no embedding request behind.
    await asyncio.sleep(0)
    assert embedder.cancelled


async def test_no_embedding_is_asked_for_the_newest_strategy(counters) -> None:
    embedder = Embedder()
    # Released at once: this strategy must not wait on an embedding.
    embedder.called.set()
    servicer = ContextServicer(Store(embedder), MODELS, counters, embedder=embedder)
    with pytest.raises(MeshgateError) as failure:
        await asyncio.wait_for(
            servicer.AssembleContext(request(pb.ASSEMBLY_STRATEGY_NEWEST), None), timeout=30
        )
    assert failure.value.reason == Reason.SESSION_NOT_FOUND
    assert embedder.asked == []
