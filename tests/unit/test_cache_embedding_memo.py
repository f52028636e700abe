"""services/cache/embedding_memo.py: repeats of a text are not embedded again."""

from __future__ import annotations

import asyncio
import gc

import grpc
import numpy as np
import pytest
import structlog.testing

from meshgate import metrics
from meshgate.embedding import REVISION_SILENCE_S, Embedding, VectorMemo
from meshgate.errors import MeshgateError
from services.cache.embedding_memo import EmbeddingMemo
from tests.clocks import Clock


class CountingEmbedder:
    """A vector per text from its characters; None for texts marked as
    failing, an exception (a bug below, not an outage) for texts marked as
    raising. Each call waits for ``release`` (set unless a test clears it)."""

    def __init__(self, failing: frozenset[str] = frozenset(), raising: frozenset[str] = frozenset()) -> None:
        self.asked: list[str] = []
        self.failing = failing
        self.raising = raising
        self.release = asyncio.Event()
        self.release.set()
        self.embedder = "minilm@2"

    async def embed_or_none(self, text: str, timeout_s: float | None = None) -> Embedding | None:
        self.asked.append(text)
        await self.release.wait()
        if text in self.failing:
            return None
        if text in self.raising:
            raise RuntimeError(f"embedding {text!r} broke")
        vector = np.zeros(8, np.float32)
        for position, char in enumerate(text.encode()):
            vector[position % 8] += char
        return Embedding(vector / np.linalg.norm(vector), self.embedder)


def memo_counts() -> tuple[float, float]:
    counter = metrics.cache().embedding_memo
    return counter.labels("hit")._value.get(), counter.labels("miss")._value.get()  # noqa: SLF001


async def test_a_repeated_text_is_embedded_once_and_counted():
    embedder = CountingEmbedder()
    memo = EmbeddingMemo(embedder, "minilm", 8)
    hits, misses = memo_counts()
    first = await memo.embed_or_none("what is the capital of france", tenant_id="acme")
    again = await memo.embed_or_none("what is the capital of france", tenant_id="acme")
    assert embedder.asked == ["what is the capital of france"]
    assert again is first
    assert memo_counts() == (hits + 1, misses + 1)
    # The shared vector cannot be changed by one caller for the others.
    with pytest.raises(ValueError, match="read-only"):
        again.vector[0] = 1.0


async def test_the_key_is_the_exact_text():
    embedder = CountingEmbedder()
    memo = EmbeddingMemo(embedder, "minilm", 8)
    for text in ("Capital of France?", "capital of france?", "Capital of  France?", "Capital of France?"):
        await memo.embed_or_none(text, tenant_id="acme")
    # Case and whitespace are the model's to weigh: three texts, three embeddings.
    assert embedder.asked == ["Capital of France?", "capital of france?", "Capital of  France?"]


async def test_the_least_recently_used_text_goes_first():
    embedder = CountingEmbedder()
    memo = EmbeddingMemo(embedder, "minilm", 2)
    for text in ("a", "b", "a", "c", "a", "b"):
        await memo.embed_or_none(text, tenant_id="acme")
    # "a" was used again before "c" came, so "b" went; then "b" again.
    assert embedder.asked == ["a", "b", "c", "b"]
    assert len(memo) == 2


async def test_a_failed_embedding_is_asked_again():
    embedder = CountingEmbedder(failing=frozenset({"down"}))
    memo = EmbeddingMemo(embedder, "minilm", 8)
    assert await memo.embed_or_none("down", tenant_id="acme") is None
    assert await memo.embed_or_none("down", tenant_id="acme") is None
    assert embedder.asked == ["down", "down"]
    assert len(memo) == 0


async def test_zero_entries_keeps_nothing():
    embedder = CountingEmbedder()
    memo = EmbeddingMemo(embedder, "minilm", 0)
    hits, misses = memo_counts()
    for _ in range(3):
        assert await memo.embed_or_none("same question", tenant_id="acme") is not None
    assert embedder.asked == ["same question"] * 3
    assert len(memo) == 0 and memo_counts() == (hits, misses)


async def test_two_tenants_never_share_a_vector():
    embedder = CountingEmbedder()
    memo = EmbeddingMemo(embedder, "minilm", 8)
    for tenant in ("acme", "globex", "acme", "globex"):
        await memo.embed_or_none("what is the capital of france", tenant_id=tenant)
    # Each tenant's first ask is embedded; its repeat is remembered for it alone.
    assert embedder.asked == ["what is the capital of france"] * 2
    assert len(memo) == 2


@pytest.mark.parametrize("max_entries", [8, 0])
async def test_asks_of_a_text_under_way_share_its_call(max_entries):
    embedder = CountingEmbedder()
    embedder.release.clear()
    memo = EmbeddingMemo(embedder, "minilm", max_entries)
    memo.embed_ahead("same question", tenant_id="acme")
    asks = [asyncio.ensure_future(memo.embed_or_none("same question", tenant_id="acme")) for _ in range(3)]
    other_tenant = asyncio.ensure_future(memo.embed_or_none("same question", tenant_id="globex"))
    await asyncio.sleep(0)
    embedder.release.set()
    vectors = await asyncio.gather(*asks)
    assert all(vector is vectors[0] for vector in vectors)
    await other_tenant
    # One call for the tenant's ahead and its three asks; the other tenant's own.
    assert embedder.asked == ["same question"] * 2
    # Once landed, a later ask finds it remembered, or (no memo) embeds anew.
    await memo.embed_or_none("same question", tenant_id="acme")
    assert len(embedder.asked) == (2 if max_entries else 3)


async def test_a_caller_going_away_leaves_the_shared_call_to_the_others():
    embedder = CountingEmbedder()
    embedder.release.clear()
    memo = EmbeddingMemo(embedder, "minilm", 8)
    leaving = asyncio.ensure_future(memo.embed_or_none("q", tenant_id="acme"))
    staying = asyncio.ensure_future(memo.embed_or_none("q", tenant_id="acme"))
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)
    embedder.release.set()
    assert (await staying) is not None
    assert leaving.cancelled() and embedder.asked == ["q"]


async def test_an_embedding_ahead_that_returns_none_is_asked_again():
    embedder = CountingEmbedder(failing=frozenset({"down"}))
    memo = EmbeddingMemo(embedder, "minilm", 8)
    memo.embed_ahead("down", tenant_id="acme")
    await asyncio.sleep(0.01)
    assert await memo.embed_or_none("down", tenant_id="acme") is None
    assert embedder.asked == ["down", "down"]


async def test_an_embedding_ahead_that_raises_is_asked_again_and_logged_once_each():
    """A raise below is a bug: logged once with its traceback by the single
    flight, never left for the loop to report as never retrieved, and the
    asker gets an INTERNAL error of its own."""
    embedder = CountingEmbedder(raising=frozenset({"broken"}))
    memo = EmbeddingMemo(embedder, "minilm", 8)
    unretrieved: list[dict] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    try:
        with structlog.testing.capture_logs() as logged:
            memo.embed_ahead("broken", tenant_id="acme")
            await asyncio.sleep(0.01)
            # The finished flight is gone: an exception never retrieved would be
            # reported (through the handler above) when the task is collected.
            gc.collect()
            with pytest.raises(MeshgateError) as failed:
                await memo.embed_or_none("broken", tenant_id="acme")
        assert failed.value.code == grpc.StatusCode.INTERNAL
        assert embedder.asked == ["broken", "broken"]
    finally:
        loop.set_exception_handler(None)
    assert unretrieved == []
    assert [entry["event"] for entry in logged] == ["shared work failed"] * 2


async def test_close_cancels_the_calls_under_way():
    embedder = CountingEmbedder()
    embedder.release.clear()
    memo = EmbeddingMemo(embedder, "minilm", 8)
    memo.embed_ahead("q", tenant_id="acme")
    await asyncio.sleep(0)
    await asyncio.wait_for(memo.close(), 5)
    assert embedder.asked == ["q"] and len(memo) == 0


def test_keys_tell_models_scopes_and_texts_apart():
    base = VectorMemo("minilm", 8).key("same", "acme")
    assert base == VectorMemo("minilm", 8).key("same", "acme")
    assert base != VectorMemo("minilm-v2", 8).key("same", "acme")
    assert base != VectorMemo("minilm", 8).key("same", "globex")
    assert base != VectorMemo("minilm", 8).key("same")
    # Length prefixes: no (model, scope, text) reads as another.
    assert VectorMemo("minilm", 8).key("ab") != VectorMemo("minilma", 8).key("b")
    assert VectorMemo("m", 8).key("b", "a") != VectorMemo("m", 8).key("ab")
    assert VectorMemo("m", 8).key("b", "a") != VectorMemo("m", 8).key("", "ab")


async def test_vectors_of_an_earlier_revision_are_not_answered_once_it_has_been_silent_for_the_window():
    # The inference service's Triton upgraded: revision 2's remembered
    # vectors are still answered while it may be serving beside revision 3,
    # and become misses, fetched anew, once it has answered nothing for the
    # window (callers store by a vector's revision: the old one's
    # sub-partition is no place for new entries once the upgrade is done).
    embedder, clock = CountingEmbedder(), Clock()
    memo = EmbeddingMemo(embedder, "minilm", 8, clock=clock)
    assert (await memo.embed_or_none("tides", tenant_id="acme")).embedder == "minilm@2"
    embedder.embedder = "minilm@3"
    clock.now += 1
    assert (await memo.embed_or_none("waves", tenant_id="acme")).embedder == "minilm@3"
    clock.now += REVISION_SILENCE_S - 1
    assert (await memo.embed_or_none("tides", tenant_id="acme")).embedder == "minilm@2"
    clock.now += 0.001
    assert (await memo.embed_or_none("tides", tenant_id="acme")).embedder == "minilm@3"
    assert embedder.asked == ["tides", "waves", "tides"]


async def test_the_revision_that_answered_last_stays_answered_however_long_no_ask_misses():
    # Nothing says it stopped serving: a memo that answered every ask
    # itself for a while does not embed its repeats again.
    embedder, clock = CountingEmbedder(), Clock()
    memo = EmbeddingMemo(embedder, "minilm", 8, clock=clock)
    await memo.embed_or_none("tides", tenant_id="acme")
    clock.now += 10 * REVISION_SILENCE_S
    assert (await memo.embed_or_none("tides", tenant_id="acme")).embedder == "minilm@2"
    assert embedder.asked == ["tides"]


class SideBySideEmbedder:
    """Servers of two minilm revisions behind the inference service,
    answering in turn (a rolling upgrade of Triton's model); each revision
    gives a text another vector."""

    REVISIONS = ("minilm@2", "minilm@3")

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def embed_or_none(self, text: str, timeout_s: float | None = None) -> Embedding:
        revision = self.REVISIONS[len(self.asked) % 2]
        self.asked.append(text)
        return Embedding(self.vector_of(text, revision), revision)

    @staticmethod
    def vector_of(text: str, revision: str) -> np.ndarray:
        vector = np.zeros(8, np.float32)
        for position, char in enumerate(text.encode()):
            vector[position % 8] += char
        if revision == "minilm@3":
            vector = vector[::-1].copy()
        return vector / np.linalg.norm(vector)


async def test_two_revisions_side_by_side_each_vector_is_answered_under_its_own_revision():
    """The lookup picks the sub-partition and the verifier by the name a
    vector comes with: a remembered vector, or one shared in flight, is
    never answered under the other revision's name."""
    embedder = SideBySideEmbedder()
    memo = EmbeddingMemo(embedder, "minilm", 64)
    texts = ("tides", "waves", "currents")
    answered = set()
    for _ in range(6):
        asks = [memo.embed_or_none(text, tenant_id="acme") for text in texts * 2]
        for text, embedded in zip(texts * 2, await asyncio.gather(*asks), strict=True):
            np.testing.assert_array_equal(embedded.vector, embedder.vector_of(text, embedded.embedder))
            answered.add(embedded.embedder)
    assert answered == set(SideBySideEmbedder.REVISIONS)


async def test_repeats_under_two_revisions_side_by_side_are_not_embedded_again():
    """Servers of two revisions answering in turn: a remembered vector was
    answered only if its revision answered the latest call, so about half
    the repeats were embedded again (a simulation of 4,000 asks, half of
    them repeats: 1,006 of 2,037). Both revisions answer well within the
    window here, so every repeat is answered from the memo."""
    embedder, clock = SideBySideEmbedder(), Clock()
    memo = EmbeddingMemo(embedder, "minilm", 256, clock=clock)
    repeats_embedded = 0
    for i in range(100):
        clock.now += 1
        await memo.embed_or_none(f"question {i}", tenant_id="acme")
        asked = len(embedder.asked)
        repeat = await memo.embed_or_none(f"question {i // 2}", tenant_id="acme")
        repeats_embedded += len(embedder.asked) - asked
        np.testing.assert_array_equal(
            repeat.vector, embedder.vector_of(f"question {i // 2}", repeat.embedder)
        )
    assert repeats_embedded == 0
    assert len(embedder.asked) == 100
