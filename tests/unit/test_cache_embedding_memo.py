"""services/cache/embedding_memo.py: repeats of a text are not embedded again."""

from __future__ import annotations

import numpy as np
import pytest

from meshgate import metrics
from meshgate.embedding import VectorMemo
from services.cache.embedding_memo import EmbeddingMemo


class CountingEmbedder:
    """A vector per text from its characters; None for texts marked as failing."""

    def __init__(self, failing: frozenset[str] = frozenset()) -> None:
        self.asked: list[str] = []
        self.failing = failing

    async def embed_or_none(self, text: str, timeout_s: float | None = None) -> np.ndarray | None:
        self.asked.append(text)
        if text in self.failing:
            return None
        vector = np.zeros(8, np.float32)
        for position, char in enumerate(text.encode()):
            vector[position % 8] += char
        return vector / np.linalg.norm(vector)


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
    np.testing.assert_array_equal(first, again)
    assert memo_counts() == (hits + 1, misses + 1)
    # The shared vector cannot be changed by one caller for the others.
    with pytest.raises(ValueError, match="read-only"):
        again[0] = 1.0


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
