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
  still shared). Nothing is ever stale: only memory bounds it.

A shared call belongs to no caller. It runs as its own task, and each caller
waits for it shielded, so a caller that leaves (cancelled, its deadline
passed) does not end it for the others. When the last one waiting leaves it
is cancelled: nobody wants its vectors, and cancelling the Triton call
cancels the request inside Triton. A failure reaches each waiter as its own
copy of the error, so that no two RPCs raise one exception object.

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
in-flight sharing stays (README: Trust inside the mesh).
"""

from __future__ import annotations

import asyncio
import collections.abc
import typing

import grpc
import structlog

from meshgate import metrics
from meshgate.embedding import VectorMemo
from meshgate.errors import MeshgateError, internal_error
from meshgate.reasons import Reason

log = structlog.get_logger(__name__)

# The embedding model's max_batch_size: larger requests are split, and a
# flight is one ModelInfer of at most this many texts.
EMBED_BATCH = 64

# The servicer's Triton work for at most ``batch_size`` texts: one float32
# vector per text, as bytes.
Fetch = collections.abc.Callable[[list[str]], collections.abc.Awaitable[list[bytes]]]


class _Flight:
    """One fetch under way: its texts' futures, and who waits for them."""

    __slots__ = ("futures", "task", "waiters")

    def __init__(self, futures: dict[bytes, asyncio.Future]) -> None:
        self.futures = futures
        self.task: asyncio.Task | None = None
        self.waiters = 0


class SharedEmbeddings:
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
        fetch: Fetch,
        max_entries: int,
        model: str = "",
        *,
        batch_size: int = EMBED_BATCH,
        timeout_s: float | None = None,
    ) -> None:
        self._fetch = fetch
        self._batch_size = batch_size
        self._timeout_s = timeout_s
        self._memo: VectorMemo[bytes] = VectorMemo(model, max_entries)
        # Each text in flight, and the flight that will answer it.
        self._in_flight: dict[bytes, _Flight] = {}
        counts = metrics.inference().embedding_texts
        self._from_triton = counts.labels("triton")
        self._shared = counts.labels("shared")
        self._from_memo = counts.labels("memo")

    def __len__(self) -> int:
        return len(self._memo)

    async def vectors(self, texts: collections.abc.Sequence[str]) -> list[bytes]:
        """Each text's vector, in order."""
        keys = [self._memo.key(text) for text in texts]
        found: dict[bytes, bytes] = {}
        joined: dict[bytes, _Flight] = {}
        missing: dict[bytes, str] = {}
        for key, text in zip(keys, texts):
            if key in found or key in joined or key in missing:
                self._shared.inc()
            elif (vector := self._memo.get(key)) is not None:
                found[key] = vector
                self._from_memo.inc()
            elif (flight := self._in_flight.get(key)) is not None:
                joined[key] = flight
                self._shared.inc()
            else:
                missing[key] = text
        if missing:
            self._from_triton.inc(len(missing))
            pending = list(missing.items())
            for start in range(0, len(pending), self._batch_size):
                chunk = dict(pending[start : start + self._batch_size])
                joined.update(dict.fromkeys(chunk, self._start(chunk)))
        if joined:
            found.update(await self._wait(joined))
        return [found[key] for key in keys]

    def _start(self, texts: dict[bytes, str]) -> _Flight:
        loop = asyncio.get_running_loop()
        flight = _Flight({key: loop.create_future() for key in texts})
        for key in texts:
            self._in_flight[key] = flight
        flight.task = asyncio.create_task(self._run(flight, list(texts.values())))
        return flight

    async def _run(self, flight: _Flight, texts: list[str]) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                vectors = await self._fetch(texts)
            if len(vectors) != len(texts):
                message = f"{len(vectors)} vectors fetched for {len(texts)} texts"
                raise MeshgateError(grpc.StatusCode.INTERNAL, Reason.BAD_EMBEDDING, message)
        except asyncio.CancelledError:
            # Only when nobody waits any more (_leave): no one to tell.
            for future in flight.futures.values():
                future.cancel()
            raise
        except Exception as error:  # noqa: BLE001 - every waiter gets it, as its own status
            failure = self._failure(error)
            for future in flight.futures.values():
                future.set_exception(failure)
                # A waiter that left meanwhile never reads it: no "never retrieved" warning.
                future.exception()
            return
        finally:
            self._land(flight)
        for (key, future), vector in zip(flight.futures.items(), vectors):
            future.set_result(vector)
            self._memo.put(key, vector)

    def _failure(self, error: Exception) -> MeshgateError:
        """What a failed flight's waiters raise: a status with ErrorInfo,
        made once here, whatever the fetch raised."""
        if isinstance(error, MeshgateError):
            return error
        if isinstance(error, TimeoutError):
            message = f"the embedding model did not answer within {self._timeout_s} s"
            return MeshgateError(grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED, message)
        # A bug: its details go to the log, not to every caller.
        log.error("embedding fetch failed", exc_info=error)
        return internal_error()

    def _land(self, flight: _Flight) -> None:
        """Its texts are no longer in flight (a later ask starts afresh or finds the memo)."""
        for key in flight.futures:
            if self._in_flight.get(key) is flight:
                del self._in_flight[key]

    async def _wait(self, joined: dict[bytes, _Flight]) -> dict[bytes, bytes]:
        flights = set(joined.values())
        for flight in flights:
            flight.waiters += 1
        try:
            futures = [flight.futures[key] for key, flight in joined.items()]
            # Shielded: leaving must not cancel a future other callers wait on.
            await asyncio.shield(asyncio.gather(*futures, return_exceptions=True))
        finally:
            for flight in flights:
                self._leave(flight)
        vectors = {}
        for key, future in zip(joined, futures):
            if future.cancelled():
                raise asyncio.CancelledError
            if (error := future.exception()) is not None:
                _raise_own(error)
            vectors[key] = future.result()
        return vectors

    def _leave(self, flight: _Flight) -> None:
        flight.waiters -= 1
        if flight.waiters == 0 and flight.task is not None and not flight.task.done():
            # Nobody wants these vectors: out of flight now, so a caller that
            # comes next starts its own call instead of joining a cancelled one.
            self._land(flight)
            flight.task.cancel()


def _raise_own(error: BaseException) -> typing.NoReturn:
    """The same failure as an exception object of this waiter's own (its
    traceback is its own RPC's); _run made it a MeshgateError."""
    assert isinstance(error, MeshgateError)
    raise error.copy() from error
