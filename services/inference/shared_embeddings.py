"""One Triton call per text, however many callers ask for it at about the same time.

An embedding is a pure function of the embedding model and the text, and
the same text is asked for more than once in a row: a session turn's
question by the context service (assembly's query vector) and by the cache
(its semantic lookup), then again by the context service when it appends
the turn; a question asked again on another cache replica. Every one of
those callers reaches this service, so it is the one place that can see
them all. Here:

- texts already in flight share that call: a later caller waits for the
  first one's vectors (single-flight), and a text repeated within one
  request is sent once;
- a bounded LRU keeps recent vectors (``meshgate.embedding.VectorMemo``,
  ``inference.embedding_memo_entries``; 0 keeps none, in-flight texts are
  still shared). Each vector is kept under the revision of the model that
  made it (``revision_of``), and answered while that revision serves
  (``meshgate.embedding.ServingRevisions``: it answered the latest fetch, or
  one within the last minute), all of a request's from one revision: while
  servers of two revisions serve side by side, each revision's vectors are
  answered (answering only the latest's fetched about half the repeats
  again), none under another's name; once the upgrade is done the old
  revision's stop a minute after its last answer, since callers keep what
  they store by a vector's revision (the cache's sub-partition, the
  context's turn index). A request whose texts two revisions answered (its
  chunks, a flight it joined, or its remembered texts and its fetched
  ones, on servers of two revisions) has the fewer embedded again by the
  revision that made the most (``fetch(texts, revision)``: on a server of
  that revision where one is known), at most ``EMBED_AGAIN_ROUNDS`` times,
  so that its answer names one revision instead of being refused.

A shared call belongs to no caller (``meshgate.single_flight``): a caller
that leaves (cancelled, its deadline passed) does not end it for the
others. When the last one waiting leaves it is cancelled: nobody wants its
vectors, and cancelling the Triton call cancels the request inside Triton.
A failure reaches each waiter as its own copy of the error, so that no two
RPCs raise one exception object.

Keys are the memo's digests of the model and the text (16 bytes; a text may
be up to a megabyte). The cache service's question memo
(services/cache/embedding_memo.py) keeps the same kind of memo in front of
this RPC: it spares the hop, this spares Triton.

Shared across tenants, knowingly. Embed acts for no tenant: the cache and
the context service call it with their own mesh certificates and no tenant
token (only the router mints those, for calls to context and cache), so
this service cannot tell whose text it embeds. A text embedded or in flight
lately answers without its Triton call, for whoever asks; a turn that needs
a text embedded (the cache's semantic lookup, context assembly) can be
that much faster when another tenant asked the same exact text just before.
The cache's own memo, in front of this, is per tenant and so adds no such
signal. ``inference.embedding_memo_entries = 0`` removes the memo's part;
in-flight sharing stays (docs/mesh-trust.md).
"""

from __future__ import annotations

import asyncio
import collections.abc
import time
import typing

import grpc

from meshgate import metrics
from meshgate.embedding import ServingRevisions, VectorMemo
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from meshgate.single_flight import Flight, SingleFlight

# The embedding model's max_batch_size: larger requests are split, and a
# flight is one ModelInfer of at most this many texts.
EMBED_BATCH = 64

# How many times a request answered by two revisions has its other
# revision's texts embedded again before it is refused (the servicer's
# EMBEDDER_CHANGED): one when the servers' revisions hold still (a server
# of the chosen revision answers them), a second for a server that changed
# its revision meanwhile, or texts no server of it could take. Bounded: an
# upgrade whose servers change faster than that costs a retry, not a loop.
EMBED_AGAIN_ROUNDS = 2

V = typing.TypeVar("V")


class Fetch(typing.Protocol[V]):
    """The servicer's Triton work for at most ``batch_size`` texts: one value
    per text (the servicer's: the revision that made it and its float32
    vector, as bytes). ``revision``: sent to a server that last answered that
    revision, where one can take it ("": whichever the balancer chooses)."""

    def __call__(self, texts: list[str], revision: str = "") -> collections.abc.Awaitable[list[V]]: ...


class SharedEmbeddings(typing.Generic[V]):
    """``fetch`` behind single-flight per text and an LRU of at most ``max_entries`` vectors.

    Texts to fetch go in flights of at most ``batch_size`` (the embedding
    model's max_batch_size), each its own fetch: a text that joins one waits
    for that chunk alone and shares only its failure, not the rest of
    another caller's request. A flight fails as DEADLINE_EXCEEDED after
    ``timeout_s`` (None: no limit): it waits for no one caller's deadline,
    so without this a hung call would stay in flight, and every later ask
    for its texts would join it, for as long as one waiter stays.
    """

    def __init__(
        self,
        fetch: Fetch[V],
        max_entries: int,
        model: str = "",
        *,
        batch_size: int = EMBED_BATCH,
        timeout_s: float | None = None,
        revision_of: collections.abc.Callable[[V], str] = lambda vector: "",
        clock: collections.abc.Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._revision_of = revision_of
        # The revisions that answered lately: only their vectors are answered.
        self._serving = ServingRevisions(clock=clock)
        self._batch_size = batch_size
        self._timeout_s = timeout_s
        # Keyed by the revision that made a vector and the text's key.
        self._memo: VectorMemo[V] = VectorMemo(model, max_entries)
        # Each text in flight, and the fetch that will answer it (with every
        # text of its chunk); cancelled when the last caller waiting leaves.
        # A text embedded again for one revision is in flight as (revision, key).
        self._in_flight: SingleFlight[bytes | tuple[str, bytes], dict[bytes, V]] = SingleFlight(
            "embedding fetch", cancel_when_abandoned=True
        )
        counts = metrics.inference().embedding_texts
        self._from_triton = counts.labels("triton")
        self._shared = counts.labels("shared")
        self._from_memo = counts.labels("memo")

    def __len__(self) -> int:
        return len(self._memo)

    async def vectors(self, texts: collections.abc.Sequence[str]) -> list[V]:
        """Each text's vector, in order, all of one revision where the
        servers allow (the servicer refuses the rest): remembered by a
        serving revision, else in flight, else fetched (whichever revision
        answers); then the texts of other revisions than the one that made
        most of them, again (:meth:`_of_one_revision`)."""
        keys = [self._memo.key(text) for text in texts]
        remembered = self._remembered(keys)
        found: dict[bytes, V] = {}
        joined: dict[bytes, Flight[dict[bytes, V]]] = {}
        missing: dict[bytes, str] = {}
        for key, text in zip(keys, texts):
            if key in found or key in joined or key in missing:
                self._shared.inc()
            elif (vector := remembered.get(key)) is not None:
                found[key] = vector
                self._from_memo.inc()
            elif (flight := self._in_flight.flight(key)) is not None:
                joined[key] = flight
                self._shared.inc()
            else:
                missing[key] = text
        found.update(await self._fetched(joined, missing))
        await self._of_one_revision(found, dict(zip(keys, texts)))
        return [found[key] for key in keys]

    async def _of_one_revision(self, found: dict[bytes, V], texts: dict[bytes, str]) -> None:
        """Makes ``found`` one revision's: the texts another revision made
        are taken from the memo or embedded again (in flights of their own,
        shared by requests that want the same text of the same revision) by
        the revision that made the most, the last to answer among equals, at
        most EMBED_AGAIN_ROUNDS times. Fewer texts to embed again than
        refusing the whole request, which its caller would send again whole,
        to be split between the revisions again."""
        chosen = ""
        for _ in range(EMBED_AGAIN_ROUNDS):
            made: dict[str, list[bytes]] = collections.defaultdict(list)
            for key, vector in found.items():
                made[self._revision_of(vector)].append(key)
            if len(made) < 2:
                return
            # Among equals, the one chosen before: the last to answer would
            # be the other after a round it failed, and the rounds would
            # swap the two halves of a request back and forth.
            latest = {revision: rank for rank, revision in enumerate(self._serving.latest_first())}
            chosen = max(
                made,
                key=lambda revision: (
                    len(made[revision]),
                    revision == chosen,
                    -latest.get(revision, len(latest)),
                ),
            )
            joined: dict[bytes, Flight[dict[bytes, V]]] = {}
            missing: dict[bytes, str] = {}
            for revision, held in made.items():
                if revision == chosen:
                    continue
                for key in held:
                    if (vector := self._memo.get((chosen, key))) is not None:
                        found[key] = vector
                        self._from_memo.inc()
                    elif (flight := self._in_flight.flight((chosen, key))) is not None:
                        joined[key] = flight
                        self._shared.inc()
                    else:
                        missing[key] = texts[key]
            found.update(await self._fetched(joined, missing, chosen))

    async def _fetched(
        self, joined: dict[bytes, Flight[dict[bytes, V]]], missing: dict[bytes, str], revision: str = ""
    ) -> dict[bytes, V]:
        """The vectors of the flights ``joined`` and of ``missing``, fetched
        now in flights of at most ``batch_size`` (of ``revision``, where a
        server of it is known: then in flight under (revision, key))."""
        if missing:
            self._from_triton.inc(len(missing))
            pending = list(missing.items())
            for start in range(0, len(pending), self._batch_size):
                chunk = dict(pending[start : start + self._batch_size])
                in_flight_as = [(revision, key) for key in chunk] if revision else chunk
                flight = self._in_flight.start(in_flight_as, self._run(chunk, revision))
                joined.update(dict.fromkeys(chunk, flight))
        found: dict[bytes, V] = {}
        if joined:
            # Each flight once, in the order first needed (its failure first).
            flights = list(dict.fromkeys(joined.values()))
            for chunk_vectors in await self._in_flight.wait(flights):
                found.update((key, vector) for key, vector in chunk_vectors.items() if key in joined)
        return found

    def _remembered(self, keys: list[bytes]) -> dict[bytes, V]:
        """The vectors remembered for ``keys`` of one serving revision, the
        one that made the most of them (the last to answer among equals):
        an answer names one revision, so a request's texts remembered by
        another are fetched again, not answered beside them."""
        texts = set(keys)
        chosen: tuple[str, list[bytes]] = ("", [])
        for revision in self._serving.latest_first():
            held = [key for key in texts if (revision, key) in self._memo]
            if len(held) > len(chosen[1]):
                chosen = (revision, held)
        revision, held = chosen
        return {key: vector for key in held if (vector := self._memo.get((revision, key))) is not None}

    async def _run(self, texts: dict[bytes, str], revision: str = "") -> dict[bytes, V]:
        """The chunk's vectors by key, remembered."""
        try:
            async with asyncio.timeout(self._timeout_s):
                vectors = await self._fetch(list(texts.values()), revision)
        except TimeoutError:
            message = f"the embedding model did not answer within {self._timeout_s} s"
            raise MeshgateError(
                grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED, message
            ) from None
        if len(vectors) != len(texts):
            message = f"{len(vectors)} vectors fetched for {len(texts)} texts"
            raise MeshgateError(grpc.StatusCode.INTERNAL, Reason.BAD_EMBEDDING, message)
        by_key = dict(zip(texts, vectors))
        for key, vector in by_key.items():
            revision = self._revision_of(vector)
            self._serving.answered(revision)
            self._memo.put((revision, key), vector)
        return by_key
