"""When AssembleContext asks for the new message's embedding
(services/context/servicer.py): first, before the new messages are counted
and the session is read, so the waits overlap; and never left running, nor
its failure unretrieved, past a failed assembly. The session store, the
embedder and the counter's wrapper are stand-ins: this is the servicer's
ordering logic alone (tests/integration/test_context_retrieval.py runs the
real ones)."""

from __future__ import annotations

import asyncio
import gc

import grpc
import numpy as np
import pytest

from meshgate.common.v1 import common_pb2
from meshgate.config import Settings
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.embedding import EMBED_TIMEOUT_S, Embedding
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.context import relevance, token_counts
from services.context.servicer import APPEND_EMBED_S_PER_TURN, APPEND_WRITE_MARGIN_S, ContextServicer
from services.context.store import StoredSession, session_not_found
from tests.unit.test_context_session_room import AppendingStore

MODELS = Settings().models


@pytest.fixture(scope="module")
def counters() -> dict[str, token_counts.PromptCounter]:
    return token_counts.for_models(MODELS)


class Embedder:
    """Records what it was asked and whether its wait was cancelled; never answers."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.calls = 0
        self.cancelled = False
        self.called = asyncio.Event()

    async def embed_or_none(self, text: str, timeout_s: float | None = None):
        return await self.embed_all_or_none([text], timeout_s)

    async def embed_all_or_none(self, texts: list[str], timeout_s: float | None = None):
        self.asked.extend(texts)
        self.calls += 1
        self.called.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


class RaisingEmbedder:
    """Fails at once with something embed_or_none does not turn into None."""

    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def embed_or_none(self, text: str, timeout_s: float | None = None):
        self.called.set()
        raise RuntimeError("embedding broke")


class Counter:
    """A real prompt counter that notes, at its first count, whether the
    embedding had already been asked for (its request then started)."""

    def __init__(self, counter: token_counts.PromptCounter, embedder: Embedder) -> None:
        self._counter = counter
        self._embedder = embedder
        self.embedding_asked_before_count: bool | None = None

    def __getattr__(self, name: str):
        return getattr(self._counter, name)

    def _note(self) -> None:
        if self.embedding_asked_before_count is None:
            self.embedding_asked_before_count = self._embedder.called.is_set()

    async def count(self, messages):
        self._note()
        return await self._counter.count(messages)

    async def count_until(self, messages, most: int):
        self._note()
        return await self._counter.count_until(messages, most)


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
    counter = Counter(counters["smollm2"], embedder)
    servicer = ContextServicer(store, MODELS, {**counters, "smollm2": counter}, embedder=embedder)
    with pytest.raises(MeshgateError) as failure:
        await asyncio.wait_for(
            servicer.AssembleContext(request(pb.ASSEMBLY_STRATEGY_ADAPTIVE), None), timeout=30
        )
    assert failure.value.code == grpc.StatusCode.NOT_FOUND
    assert failure.value.reason == Reason.SESSION_NOT_FOUND
    assert store.embedding_asked_before_read
    # Asked for, and its task run up to its request, before the first count:
    # the new messages' count is work the embedding's wait can cover.
    assert counter.embedding_asked_before_count is True
    # The user's message only: system text says nothing of what to retrieve.
    assert embedder.asked == ["Where did Ana move in May?"]
    # The failed assembly leaves no embedding request behind.
    await asyncio.sleep(0)
    assert embedder.cancelled


async def test_the_questions_nameless_form_is_embedded_in_its_call_when_asked_for(counters) -> None:
    embedder = Embedder()
    store = Store(embedder)
    servicer = ContextServicer(store, MODELS, counters, embedder=embedder, embed_nameless_question=True)
    with pytest.raises(MeshgateError) as failure:
        await asyncio.wait_for(
            servicer.AssembleContext(request(pb.ASSEMBLY_STRATEGY_ADAPTIVE), None), timeout=30
        )
    assert failure.value.reason == Reason.SESSION_NOT_FOUND
    assert store.embedding_asked_before_read
    # One call: the question, then its nameless form (relevance.nameless_text).
    assert embedder.asked == ["Where did Ana move in May?", "move"]
    assert embedder.calls == 1
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


async def test_an_embedding_that_failed_before_a_failed_assembly_is_retrieved(counters) -> None:
    embedder = RaisingEmbedder()
    store = Store(embedder)
    servicer = ContextServicer(store, MODELS, counters, embedder=embedder)
    loop = asyncio.get_running_loop()
    unretrieved: list[dict] = []
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    try:
        with pytest.raises(MeshgateError) as failure:
            await asyncio.wait_for(
                servicer.AssembleContext(request(pb.ASSEMBLY_STRATEGY_ADAPTIVE), None), timeout=30
            )
        assert failure.value.reason == Reason.SESSION_NOT_FOUND
        assert store.embedding_asked_before_read
        # The failure's traceback holds AssembleContext's frame, and so the
        # embedding's task: once dropped, the task is collected, and an
        # exception never retrieved would be reported to the handler then.
        del failure
        gc.collect()
    finally:
        loop.set_exception_handler(previous_handler)
    assert [c["message"] for c in unretrieved] == []


class VectorEmbedder:
    """Answers every question with the same vector."""

    async def embed_or_none(self, text: str, timeout_s: float | None = None) -> Embedding:
        return Embedding(np.ones(8, np.float32), "minilm@2")


class UnindexedStore:
    """A session with turns but no vectors (no turn index: stored before
    it, or a rebuild the index does not cover)."""

    def __init__(self) -> None:
        turns = [
            common_pb2.Message(role=common_pb2.ROLE_USER, content="Ana moved to Porto in May."),
            common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="Noted."),
        ]
        self.session = StoredSession(1, 0, 0, turns, {})

    async def read(self, tenant_id: str, session_id: str, at_version: int | None = None):
        return self.session

    async def fill_token_counts(self, *args) -> None:
        pass


async def test_inputs_say_the_words_alone_scored_when_the_turns_have_no_vectors_though_the_question_has(
    counters,
) -> None:
    servicer = ContextServicer(UnindexedStore(), MODELS, counters, embedder=VectorEmbedder())
    response = await asyncio.wait_for(
        servicer.AssembleContext(request(pb.ASSEMBLY_STRATEGY_ADAPTIVE), None), timeout=30
    )
    assert response.inputs.ranking and not response.inputs.dense_scored


class UnavailableEmbedder:
    """The inference service away: every embedding is None."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    async def embed_or_none(self, text: str, timeout_s: float | None = None):
        return await self.embed_all_or_none([text], timeout_s)

    async def embed_all_or_none(self, texts: list[str], timeout_s: float | None = None):
        self.asked.append(texts)
        return None


async def test_the_nameless_forms_embedding_failing_leaves_the_assembly_to_the_words(counters) -> None:
    embedder = UnavailableEmbedder()
    servicer = ContextServicer(
        UnindexedStore(), MODELS, counters, embedder=embedder, embed_nameless_question=True
    )
    response = await asyncio.wait_for(
        servicer.AssembleContext(request(pb.ASSEMBLY_STRATEGY_ADAPTIVE), None), timeout=30
    )
    # Asked for both texts in one call; without them the words alone scored,
    # under the ranking of a service without the nameless form.
    assert embedder.asked == [["Where did Ana move in May?", "move"]]
    assert not response.inputs.dense_scored
    assert response.inputs.ranking == relevance.RANKING
    assert response.messages[-1].content == "Where did Ana move in May?"


async def questions_scored(monkeypatch, counters, asked: pb.AssembleContextRequest) -> list[str]:
    """The question texts ``hybrid_scores`` was given while ``asked`` was assembled."""
    questions = []
    scores = relevance.hybrid_scores

    def recorded(*args, **kwargs):
        questions.append(kwargs.get("question"))
        return scores(*args, **kwargs)

    monkeypatch.setattr(relevance, "hybrid_scores", recorded)
    servicer = ContextServicer(UnindexedStore(), MODELS, counters, embedder=VectorEmbedder())
    await asyncio.wait_for(servicer.AssembleContext(asked, None), timeout=30)
    return questions


async def test_the_new_user_messages_text_reaches_the_scoring(counters, monkeypatch) -> None:
    # relevance.hybrid_scores reads from it whether the question is asked in
    # the first person (relevance.asked_in_first_person): the system message
    # is no part of the question.
    asked = request(pb.ASSEMBLY_STRATEGY_ADAPTIVE)
    assert await questions_scored(monkeypatch, counters, asked) == ["Where did Ana move in May?"]


async def test_several_new_user_messages_reach_the_scoring_as_one_question(counters, monkeypatch) -> None:
    # A follow-up ("and Kate's?") is asked in the first person only through
    # the user's message before it: every new user message counts, the
    # assistant's between them does not.
    follow_up = request(pb.ASSEMBLY_STRATEGY_ADAPTIVE)
    del follow_up.new_messages[1:]
    follow_up.new_messages.extend(
        [
            common_pb2.Message(role=common_pb2.ROLE_USER, content="my budget?"),
            common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="It is 1,200 a month."),
            common_pb2.Message(role=common_pb2.ROLE_USER, content="and Kate's?"),
        ]
    )
    asked = await questions_scored(monkeypatch, counters, follow_up)
    assert asked == ["my budget?\nand Kate's?"]
    assert relevance.asked_in_first_person(asked[0])


class RecordingEmbedder:
    """Notes the timeout each batch of turns was given."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    async def embed_each_or_none(self, texts: list[str], timeout_s: float | None = None):
        self.timeouts.append(timeout_s)
        return [Embedding(np.ones(8, np.float32), "minilm@2") for _ in texts]


class Index:
    def __init__(self) -> None:
        self.vectors = None

    async def write(
        self, tenant_id, session_id, version, features, vectors, created_ms, only_unwritten=False
    ):
        self.vectors = vectors
        return 0


class Deadline:
    """A servicer context whose call has ``left_s`` seconds left (None: no deadline)."""

    def __init__(self, left_s: float | None) -> None:
        self._left_s = left_s

    def time_remaining(self) -> float | None:
        return self._left_s


@pytest.mark.parametrize(
    ("turns", "left_s", "expected_s"),
    [
        # A router turn's two: as long as one text's default (EMBED_TIMEOUT_S),
        # +10 ms a turn, however long the call's deadline.
        (2, 10.0, EMBED_TIMEOUT_S + 2 * APPEND_EMBED_S_PER_TURN),
        (2, None, EMBED_TIMEOUT_S + 2 * APPEND_EMBED_S_PER_TURN),
        # A bulk import: longer, within the call's time left less the write's margin.
        (1024, None, EMBED_TIMEOUT_S + 1024 * APPEND_EMBED_S_PER_TURN),
        (1024, 8.0, 8.0 - APPEND_WRITE_MARGIN_S),
        (1024, 0.1, 0.0),
        # Never past context.append_embed_timeout_s (5 s here).
        (1000, None, 5.0),
    ],
)
async def test_an_appends_turns_are_embedded_within_the_calls_own_deadline(
    counters, turns, left_s, expected_s
) -> None:
    # Not the embedder's 3 s default for one question: an append of many
    # turns past it would store its later turns without vectors, for good.
    embedder, index = RecordingEmbedder(), Index()
    servicer = ContextServicer(
        AppendingStore(),
        MODELS,
        counters,
        index=index,
        embedder=embedder,
        append_embed_timeout_s=5.0 if turns == 1000 else 30.0,
    )
    append = pb.AppendTurnsRequest(
        tenant_id="t",
        session_id="s1",
        any_version=True,
        messages=[
            common_pb2.Message(role=common_pb2.ROLE_USER, content=f"Ana moved to Porto in May, take {n}.")
            for n in range(turns)
        ],
    )
    await asyncio.wait_for(servicer.AppendTurns(append, Deadline(left_s)), timeout=60)
    assert embedder.timeouts == [pytest.approx(expected_s)]
    assert index.vectors is not None and len(index.vectors.rows) == turns
