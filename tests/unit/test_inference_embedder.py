"""meshgate.embedding.InferenceEmbedder against a stand-in for the inference
service's Embed that refuses what the real one refuses (more than
inference.max_embed_texts texts a call): the embedder's splitting and its
one deadline alone (tests/integration/test_context_retrieval.py appends
through the real services)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from meshgate.config import InferenceSettings
from meshgate.embedding import EMBED_CALLS_AGAIN_ROUNDS, InferenceEmbedder
from meshgate.inference.v1 import inference_service_pb2

LIMIT = InferenceSettings.max_embed_texts
DIMENSIONS = 4


def _refusal(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    no_metadata = grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, no_metadata, no_metadata, details)


def vector_of(text: str) -> np.ndarray:
    """The stand-in's vector for ``text``: its number, so order shows."""
    return np.full(DIMENSIONS, float(text.removeprefix("turn ")), np.float32)


class EmbedService:
    """Embed as the inference service answers it: at most ``LIMIT`` texts,
    each call taking ``delay_s`` (DEADLINE_EXCEEDED past the caller's
    timeout), a call holding a text of ``failing`` UNAVAILABLE."""

    def __init__(self, delay_s: float = 0.0, failing: frozenset[str] = frozenset()) -> None:
        self.delay_s = delay_s
        self.failing = failing
        self.calls: list[tuple[int, float]] = []
        # What the answers name as having made the vectors.
        self.model, self.revision = "minilm", "2"

    async def Embed(self, request, timeout: float):  # noqa: N802 - the stub's method name
        texts = list(request.texts)
        self.calls.append((len(texts), timeout))
        if len(texts) > LIMIT:
            raise _refusal(grpc.StatusCode.INVALID_ARGUMENT, f"at most {LIMIT} texts per call")
        if self.delay_s > timeout:
            await asyncio.sleep(timeout)
            raise _refusal(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        await asyncio.sleep(self.delay_s)
        if self.failing.intersection(texts):
            raise _refusal(grpc.StatusCode.UNAVAILABLE, "gone")
        vectors = np.stack([vector_of(text) for text in texts]).astype("<f4")
        return inference_service_pb2.EmbedResponse(
            vectors=vectors.tobytes(), dimensions=DIMENSIONS, model=self.model, model_revision=self.revision
        )


def turns(count: int) -> list[str]:
    return [f"turn {i}" for i in range(count)]


async def test_an_append_of_more_texts_than_one_call_takes_gets_every_vector() -> None:
    service = EmbedService()
    texts = turns(2 * LIMIT + 44)
    vectors = await InferenceEmbedder(service).embed_each_or_none(texts)
    assert [size for size, _ in service.calls] == [LIMIT, LIMIT, 44]
    assert len(vectors) == len(texts)
    for text, embedded in zip(texts, vectors, strict=True):
        np.testing.assert_array_equal(embedded.vector, vector_of(text))
        assert embedded.embedder == "minilm@2"


async def test_a_lower_limit_from_the_settings_is_followed() -> None:
    service = EmbedService()
    vectors = await InferenceEmbedder(service, max_texts_per_call=10).embed_each_or_none(turns(25))
    assert [size for size, _ in service.calls] == [10, 10, 5]
    assert all(vector is not None for vector in vectors)


async def test_a_failed_call_costs_only_its_own_texts_their_vectors() -> None:
    texts = turns(3 * LIMIT)
    service = EmbedService(failing=frozenset({texts[LIMIT + 5]}))
    vectors = await InferenceEmbedder(service).embed_each_or_none(texts)
    assert len(service.calls) == 3
    assert all(vector is None for vector in vectors[LIMIT : 2 * LIMIT])
    for text, embedded in zip(texts[:LIMIT] + texts[2 * LIMIT :], vectors[:LIMIT] + vectors[2 * LIMIT :]):
        np.testing.assert_array_equal(embedded.vector, vector_of(text))


async def test_the_calls_share_one_deadline() -> None:
    # Each call takes 40 ms of a 100 ms deadline. How many land depends on
    # how busy the machine is (a call may take longer than 40 ms), so what
    # is asserted holds at any speed: each call gets what the earlier ones
    # left, never the whole deadline again; a call given less than its 40 ms
    # misses, and no call is made once the deadline is spent.
    delay_s = 0.04
    service = EmbedService(delay_s=delay_s)
    texts = turns(5 * LIMIT)
    vectors = await InferenceEmbedder(service).embed_each_or_none(texts, timeout_s=0.1)
    timeouts = [timeout for _, timeout in service.calls]
    # Each call lasts at least 40 ms (or all the time left): three at most.
    assert 1 <= len(timeouts) <= 3
    # (The microsecond allows for float rounding and timers firing early.)
    assert timeouts[0] <= 0.1 + 1e-6
    for earlier, later in zip(timeouts, timeouts[1:]):
        assert later <= earlier - delay_s + 1e-6
    for call, timeout in enumerate(timeouts):
        landed = timeout >= delay_s
        assert all((vector is not None) == landed for vector in vectors[call * LIMIT : (call + 1) * LIMIT])
    assert all(vector is None for vector in vectors[len(timeouts) * LIMIT :])


async def test_all_or_none_over_the_limit_is_one_array_or_none() -> None:
    texts = turns(LIMIT + 1)
    embedded = await InferenceEmbedder(EmbedService()).embed_all_or_none(texts)
    assert embedded.rows.shape == (LIMIT + 1, DIMENSIONS) and embedded.embedder == "minilm@2"
    np.testing.assert_array_equal(embedded.rows[LIMIT], vector_of(texts[LIMIT]))
    failing = EmbedService(failing=frozenset({texts[LIMIT]}))
    assert await InferenceEmbedder(failing).embed_all_or_none(texts) is None


async def test_all_or_none_stops_at_the_first_failed_call() -> None:
    texts = turns(3 * LIMIT)
    service = EmbedService(failing=frozenset({texts[0]}))
    assert await InferenceEmbedder(service).embed_all_or_none(texts) is None
    assert [size for size, _ in service.calls] == [LIMIT]


async def test_one_text_is_one_call() -> None:
    service = EmbedService()
    embedded = await InferenceEmbedder(service).embed_or_none("turn 7")
    np.testing.assert_array_equal(embedded.vector, vector_of("turn 7"))
    assert embedded.embedder == "minilm@2"
    assert [size for size, _ in service.calls] == [1]


async def test_vectors_are_named_for_the_revision_that_made_them_or_not_taken() -> None:
    # The name comes from the answer, not from this process's own code: a
    # rolling upgrade runs callers and inference services of two revisions.
    service = EmbedService()
    service.revision = "3"
    assert (await InferenceEmbedder(service).embed_or_none("turn 1")).embedder == "minilm@3"
    # Calls answered by two revisions (upgraded after the first): one set of
    # rows, the newer's, the first call asked again.
    texts = turns(LIMIT + 1)
    answered = service.Embed

    async def upgraded_midway(request, timeout: float):  # noqa: N802
        response = await answered(request, timeout)
        service.revision = "4"
        return response

    service.Embed = upgraded_midway
    calls = len(service.calls)
    assert (await InferenceEmbedder(service).embed_all_or_none(texts)).embedder == "minilm@4"
    assert [size for size, _ in service.calls[calls:]] == [LIMIT, 1, LIMIT]
    # An inference service that names no revision (older than the field): no vectors.
    service.Embed = answered
    service.revision = ""
    assert await InferenceEmbedder(service).embed_or_none("turn 1") is None


class RevisionPerCall(EmbedService):
    """Embed answered by servers of several revisions side by side (an
    upgrade under way): call ``n`` by ``revisions(n)``, counting from 0."""

    def __init__(self, revisions) -> None:
        super().__init__()
        self.revisions = revisions

    async def Embed(self, request, timeout: float):  # noqa: N802 - the stub's method name
        self.revision = self.revisions(len(self.calls))
        return await super().Embed(request, timeout)


async def test_all_or_none_over_calls_of_two_revisions_asks_the_older_ones_calls_again() -> None:
    # Revisions 3 and 2 in turn, call by call: the three calls answered 3, 2,
    # 3 were None; the second is asked again (2 again), and again (3).
    service = RevisionPerCall(lambda call: ("3", "2")[call % 2])
    texts = turns(25)
    embedded = await InferenceEmbedder(service, max_texts_per_call=10).embed_all_or_none(texts)
    assert embedded is not None and embedded.embedder == "minilm@3"
    np.testing.assert_array_equal(embedded.rows, np.stack([vector_of(text) for text in texts]))
    assert [size for size, _ in service.calls] == [10, 10, 5, 10, 10]


async def test_all_or_none_over_revisions_that_never_agree_is_none_after_bounded_rounds() -> None:
    # Each call a newer revision than the last: asking again never ends on one.
    service = RevisionPerCall(lambda call: str(2 + call))
    embedded = await InferenceEmbedder(service, max_texts_per_call=1).embed_all_or_none(["turn 1", "turn 2"])
    assert embedded is None
    # 2 and 3; the first again (4), then the second (5).
    assert len(service.calls) == 2 + EMBED_CALLS_AGAIN_ROUNDS
