"""Question embeddings in the cache service: remembered, and shared while
under way.

A semantic lookup embeds its question (in this process by default, or
through the inference service: ``cache.embedder``): most of what a semantic
hit costs. Questions repeat (the same phrasing asked again, the Store right
after a miss), and a vector once fetched stays right for its embedder's
revision (see ``meshgate.embedding.VectorMemo``): each is remembered with
the revision's name (``meshgate.embedding.Embedding``), and answered while
that revision serves (``meshgate.embedding.ServingRevisions``): it answered
this memo's latest miss, or one within the last minute. So while Triton
servers of two revisions serve side by side, each one's vectors are
answered (answering only the latest's embedded about half the repeats
again), and once the upgrade is done the old one's stop a minute after its
last answer: the lookup and the Store put a vector in its revision's
sub-partition, which new entries should no longer join.
The index search and the verifier still run on every lookup; the memo only
spares the embedding (and the hop: the inference service keeps a memo of
its own, which spares Triton for every caller but not the hop). A failed
embedding (None) is not remembered, so the next ask tries again.

An ask of a text already being embedded waits for that call instead of
making another (single flight): this is how an exact-only miss starts the
embedding its semantic lookup will need (``embed_ahead``), and how a lookup
and the Store after it share one. With ``max_entries`` 0 nothing is
remembered, so only asks that overlap share a call.

Each tenant has its own vectors here, as entries and coalesced generations
never cross tenants: a memo shared by all would answer tenant B faster for a
text tenant A asked lately, a timing signal of what another tenant asks.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from meshgate import metrics
from meshgate.embedding import Embedding, EmbedsText, ServingRevisions, VectorMemo
from meshgate.single_flight import Flight, SingleFlight


class EmbeddingMemo:
    """``embedder.embed_or_none`` behind a :class:`VectorMemo` of at most
    ``max_entries`` vectors and one call per text in flight."""

    def __init__(
        self,
        embedder: EmbedsText,
        model: str,
        max_entries: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._embedder = embedder
        self._vectors: VectorMemo[Embedding] = VectorMemo(model, max_entries)
        # The embedders (model and revision) that answered lately: a
        # remembered vector of another is a miss.
        self._serving = ServingRevisions(clock=clock)
        # Run to the end when every asker left: what it makes is remembered
        # for the next (with max_entries 0 it is only lost).
        self._in_flight: SingleFlight[bytes, Embedding | None] = SingleFlight(
            "question embedding", cancel_when_abandoned=False
        )
        counts = metrics.cache().embedding_memo
        self._hits = counts.labels("hit")
        self._misses = counts.labels("miss")

    def __len__(self) -> int:
        return len(self._vectors)

    async def embed_or_none(self, text: str, *, tenant_id: str) -> Embedding | None:
        """``text``'s vector for ``tenant_id``: remembered only for that tenant."""
        vector = self._vector_or_flight(text, tenant_id)
        if isinstance(vector, Flight):
            # A caller that goes away (its Lookup cancelled) ends neither the
            # call nor the others' wait (meshgate/single_flight.py).
            (vector,) = await self._in_flight.wait((vector,))
        return vector

    def embed_ahead(self, text: str, *, tenant_id: str) -> None:
        """Starts embedding ``text`` for an ask expected soon, unless it is
        remembered or under way; never waits and never fails."""
        self._vector_or_flight(text, tenant_id)

    def _vector_or_flight(self, text: str, tenant_id: str) -> Embedding | Flight:
        key = self._vectors.key(text, tenant_id)
        vector = self._vectors.get(key)
        if vector is not None and self._serving.serving(vector.embedder):
            self._hits.inc()
            return vector
        flight = self._in_flight.flight(key)
        if flight is not None:
            if self._vectors.enabled:
                self._hits.inc()  # no Embed call of its own
            return flight
        if self._vectors.enabled:
            self._misses.inc()
        return self._in_flight.start((key,), self._fetch(key, text))

    async def _fetch(self, key: bytes, text: str) -> Embedding | None:
        embedded = await self._embedder.embed_or_none(text)
        if embedded is not None:
            # A read-only view (of the response's bytes, or of the local
            # run's output), shared by every caller: nothing may write into it.
            embedded.vector.flags.writeable = False
            self._serving.answered(embedded.embedder)
            self._vectors.put(key, embedded)
        return embedded

    async def close(self) -> None:
        """Cancels the calls under way, before the channel they use closes."""
        await self._in_flight.cancel_all()
