"""Recent question embeddings, kept in the cache service.

A semantic lookup embeds its question through the inference service (a
gRPC hop, Triton's minilm): most of what a semantic hit costs. Questions
repeat (the same phrasing asked again, a Store right after a miss on
another replica), and an embedding is a pure function of the embedding
model and the text, so a vector once fetched stays right: nothing to
invalidate, only a bound on memory (1.5 KiB a vector at 384 dimensions).
The index search and the verifier still run on every lookup; the memo
only spares the embedding.

Keyed on the embedding model and a digest of the exact text (no folding of
case or whitespace: the model may tell those apart). A failed embedding
(None) is not remembered, so the next ask tries again.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np

from meshgate import metrics
from meshgate.embedding import Embedder


class EmbeddingMemo:
    """``embedder.embed_or_none`` behind an LRU of at most ``max_entries``
    vectors (0: every call goes to ``embedder``)."""

    def __init__(self, embedder: Embedder, model: str, max_entries: int) -> None:
        self._embedder = embedder
        self._max_entries = max_entries
        self._model = model.encode()
        self._vectors: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        self._counts = metrics.cache().embedding_memo
        self._hits = self._counts.labels("hit")
        self._misses = self._counts.labels("miss")

    def __len__(self) -> int:
        return len(self._vectors)

    def _key(self, text: str) -> bytes:
        digest = hashlib.blake2b(digest_size=16, person=b"mg-embed-memo")
        # The model's name length-prefixed: no model and text pair reads as another.
        digest.update(len(self._model).to_bytes(4, "little"))
        digest.update(self._model)
        digest.update(text.encode())
        return digest.digest()

    async def embed_or_none(self, text: str, timeout_s: float | None = None) -> np.ndarray | None:
        if self._max_entries <= 0:
            return await self._embedder.embed_or_none(text, timeout_s)
        key = self._key(text)
        vector = self._vectors.get(key)
        if vector is not None:
            self._vectors.move_to_end(key)
            self._hits.inc()
            return vector
        self._misses.inc()
        vector = await self._embedder.embed_or_none(text, timeout_s)
        if vector is not None:
            # A read-only view of the response's bytes, shared by every
            # caller: nothing may write into it.
            vector.flags.writeable = False
            self._vectors[key] = vector
            self._vectors.move_to_end(key)
            while len(self._vectors) > self._max_entries:
                self._vectors.popitem(last=False)
        return vector
