"""Single-flight: callers that ask for the same thing at once share one run of the work.

A :class:`SingleFlight` maps keys to the work under way for them (a
:class:`Flight`). The first caller for a key starts the work; a caller
asking while it runs joins it and waits for the same value. The rules, the
same for every user (the API key store's GETs, services/router/keys.py; the
inference service's Triton embedding calls, services/inference/shared_embeddings.py;
the cache service's question embeddings, services/cache/embedding_memo.py):

- The work runs as a task of its own and belongs to no caller. Each caller
  waits for it without being able to cancel it, so a caller that leaves
  (cancelled, its deadline passed) ends neither the work nor the others' wait.
- When the last caller still waiting leaves, the work is cancelled if the
  SingleFlight was made with ``cancel_when_abandoned`` (nobody wants what it
  makes, and it must not outlive them: a Triton call), and otherwise runs to
  its end (what it makes is kept by the work itself for the next caller: a
  GET whose record is cached).
- A finished flight is never joined: the next caller for its keys starts
  afresh (or finds what the work kept). A failure is not shared with callers
  arriving after it. The one exception, made with ``keep_finished``: a flight
  that ended with a value or a failure keeps answering its keys (a cancelled
  one does not), for as long as the SingleFlight lives, so it must live no
  longer than what it made stays true. The router's Stores of one generated
  answer (``Answer.stores``, services/router/pipeline.py) need this: each
  caller sharing the answer must write its entry once, however late after
  the first Store ended it comes to store.
- A failure reaches each caller as its own exception object: one exception
  raised in several callers' tasks would gather every raise's traceback and
  chain each caller's handling into the next one's. A ``MeshgateError`` is
  raised as a copy (:meth:`MeshgateError.copy`) for each; anything else is a
  bug, logged once with its traceback, and each caller gets its own
  ``internal_error()``, nothing of its insides.
- :meth:`SingleFlight.forget` drops a key's work from the map: callers from
  then on start their own, and the work can tell (:meth:`SingleFlight.is_current`)
  that what it made must not be kept (it may predate a write), while it still
  answers the callers that joined before.

Work may also be started with nobody waiting (:meth:`SingleFlight.start`
alone: the cache's embedding of a question about to be asked); it runs to
its end whatever ``cancel_when_abandoned`` says, as no waiter ever left it.

One flight may answer for several keys (a batch of texts in one Triton call):
:meth:`SingleFlight.start` takes them all, and a caller waiting for several
flights at once counts as one waiter of each (:meth:`SingleFlight.wait`).

The router's request coalescing (services/router/coalescing.py) shares a
generation by the same idea but is not built on this: its callers read a
stream (each gets the pieces so far, then the live ones, and each its own
deadline and partial-delivery count), and its work starts at a caller's
first read, not when a caller asks.
"""

from __future__ import annotations

import asyncio
import collections.abc
import typing

import structlog

from meshgate.errors import MeshgateError, internal_error

log = structlog.get_logger(__name__)

K = typing.TypeVar("K")
V = typing.TypeVar("V")


class Flight(typing.Generic[V]):
    """One run of work under way: the keys it answers, its task, and how many callers wait for it."""

    __slots__ = ("keys", "task", "waiters")

    def __init__(self, keys: tuple, task: asyncio.Task[V]) -> None:
        self.keys = keys
        self.task = task
        self.waiters = 0


class SingleFlight(typing.Generic[K, V]):
    """The work under way by key; ``name`` says whose in the log."""

    def __init__(self, name: str, *, cancel_when_abandoned: bool, keep_finished: bool = False) -> None:
        self._name = name
        self._cancel_when_abandoned = cancel_when_abandoned
        self._keep_finished = keep_finished
        self._flights: dict[K, Flight[V]] = {}
        # Every task still running, forgotten or not: the event loop holds
        # tasks only weakly, and a forgotten one nobody waits for must finish.
        self._running: set[asyncio.Task[V]] = set()

    def flight(self, key: K) -> Flight[V] | None:
        """The work answering ``key``, if any: unfinished, or with
        ``keep_finished`` finished too (never cancelled)."""
        flight = self._flights.get(key)
        if flight is None or flight.task.cancelled():
            return None
        if flight.task.done() and not self._keep_finished:
            return None
        return flight

    def start(
        self, keys: collections.abc.Iterable[K], work: collections.abc.Coroutine[typing.Any, typing.Any, V]
    ) -> Flight[V]:
        """Runs ``work`` as a task of its own, answering for each of ``keys``
        (in place of any work they had) until it ends or they are forgotten."""
        task = asyncio.ensure_future(work)
        flight = Flight(tuple(keys), task)
        for key in flight.keys:
            self._flights[key] = flight
        self._running.add(task)
        task.add_done_callback(lambda done: self._landed(flight))
        return flight

    async def join(
        self,
        key: K,
        make_work: collections.abc.Callable[[], collections.abc.Coroutine[typing.Any, typing.Any, V]],
    ) -> V:
        """The value of the work under way for ``key``, or of ``make_work()`` started now."""
        flight = self.flight(key) or self.start((key,), make_work())
        (value,) = await self.wait((flight,))
        return value

    async def wait(self, flights: collections.abc.Collection[Flight[V]]) -> list[V]:
        """Each flight's value, in order, once all have ended; this caller
        counts as one waiter of each until then (give one or more, each once).
        Raises the first failure in order, as this caller's own."""
        # Counted before the first await: a flight this caller found must not
        # be cancelled for want of waiters while the caller is on its way.
        for flight in flights:
            flight.waiters += 1
        try:
            # asyncio.wait, unlike gather, cancels none of the tasks when this
            # caller is cancelled: leaving is _leave's decision alone.
            await asyncio.wait([flight.task for flight in flights])
        finally:
            for flight in flights:
                self._leave(flight)
        return [_own_result(flight.task) for flight in flights]

    def forget(self, key: K) -> None:
        """Callers asking for ``key`` from now on start their own work; the
        work under way answers only those already waiting."""
        self._flights.pop(key, None)

    def is_current(self, key: K) -> bool:
        """Whether the task calling this is the work answering ``key``: False
        once it was forgotten (or replaced), so what it made must not be kept."""
        flight = self._flights.get(key)
        return flight is not None and flight.task is asyncio.current_task()

    async def cancel_all(self) -> None:
        """Cancels all work still running, forgotten or not, and waits for
        it to end: before what it uses (a channel) is closed."""
        running = list(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def _leave(self, flight: Flight[V]) -> None:
        flight.waiters -= 1
        if flight.waiters == 0 and self._cancel_when_abandoned and not flight.task.done():
            # Out of the map now, so a caller that comes next starts its own
            # work instead of joining a cancelled one.
            self._drop(flight)
            flight.task.cancel()

    def _landed(self, flight: Flight[V]) -> None:
        self._running.discard(flight.task)
        if flight.task.cancelled() or not self._keep_finished:
            self._drop(flight)
        if flight.task.cancelled():
            return
        # Retrieved here in any case: every caller that shared it may have left.
        error = flight.task.exception()
        if error is not None and not isinstance(error, MeshgateError):
            log.error("shared work failed", work=self._name, exc_info=error)

    def _drop(self, flight: Flight[V]) -> None:
        for key in flight.keys:
            if self._flights.get(key) is flight:  # not replaced since, after a forget
                del self._flights[key]


def _own_result(task: asyncio.Task[V]) -> V:
    """The task's value, or its failure as an exception object of this caller's own."""
    if task.cancelled():
        # The work was cancelled while this caller waited: by the loop shutting
        # down, or by the work itself (a CancelledError raised inside it).
        raise asyncio.CancelledError
    error = task.exception()
    if error is None:
        return task.result()
    if isinstance(error, MeshgateError):
        raise error.copy() from error
    raise internal_error() from error
