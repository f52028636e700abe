"""Recent question embeddings, kept in the cache service.

A semantic lookup embeds its question through the inference service (a
gRPC hop, Triton's minilm): most of what a semantic hit costs. Questions
repeat (the same phrasing asked again, a Store right after a miss on
another replica), and a vector once fetched stays right (see
``meshgate.embedding.VectorMemo``). The index search and the verifier still
run on every lookup; the memo only spares the embedding and the hop (the
inference service keeps a memo of its own, which spares Triton for every
caller but not the hop). A failed embedding (None) is not remembered, so
the next ask tries again.

Each tenant has its own vectors here, as entries and coalesced generations
never cross tenants: a memo shared by all would answer tenant B faster for a
text tenant A asked lately, a timing signal of what another tenant asks.
"""

from __future__ import annotations

import numpy as np

from meshgate import metrics
from meshgate.embedding import Embedder, VectorMemo


class EmbeddingMemo:
    """``embedder.embed_or_none`` behind a :class:`VectorMemo` of at most
    ``max_entries`` vectors (0: every call goes to ``embedder``)."""

    def __init__(self, embedder: Embedder, model: str, max_entries: int) -> None:
        self._embedder = embedder
        self._vectors: VectorMemo[np.ndarray] = VectorMemo(model, max_entries)
        counts = metrics.cache().embedding_memo
        self._hits = counts.labels("hit")
        self._misses = counts.labels("miss")

    def __len__(self) -> int:
        return len(self._vectors)

    async def embed_or_none(
        self, text: str, *, tenant_id: str, timeout_s: float | None = None
    ) -> np.ndarray | None:
        """``text``'s vector for ``tenant_id``: remembered only for that tenant."""
        if not self._vectors.enabled:
            return await self._embedder.embed_or_none(text, timeout_s)
        key = self._vectors.key(text, tenant_id)
        vector = self._vectors.get(key)
        if vector is not None:
            self._hits.inc()
            return vector
        self._misses.inc()
        vector = await self._embedder.embed_or_none(text, timeout_s)
        if vector is not None:
            # A read-only view of the response's bytes, shared by every
            # caller: nothing may write into it.
            vector.flags.writeable = False
            self._vectors.put(key, vector)
        return vector
