"""Identical in-flight deterministic generations, shared.

Two turns whose output is fixed by their inputs (greedy decoding, or a fixed
seed) and whose inputs are the same (tenant, model alias, the prompt after
assembly, every generation parameter) would make the model compute the same
tokens twice. The :class:`Coalescer` runs one generation for them: the first
caller's turn starts it, a caller arriving while it runs receives the pieces
generated so far and then the live stream, and every caller ends with the
same answer (or the same failure, with the count of what it received).

The generation belongs to no single caller: a caller that goes away only
unsubscribes; the last one going away cancels it (and with it the inference
call). So it runs under no caller's deadline (only the router's
max_generation_s): each caller's own deadline ends that caller's stream,
with DEADLINE_EXCEEDED and what it received, unless the generation had
finished by then (checked before every delta, not only while waiting: a
caller whose client reads slowly may never wait), and the generation ends
when the last caller still waiting leaves, by its deadline or otherwise.
(Running it under the first caller's deadline would cut a later caller
short, or would forbid sharing between callers whose deadlines differ by a
millisecond, which is every pair.) It starts when a caller first reads, not
when one asks: without speculation a turn asks before its cache lookup
answers and, on a hit, closes the generation unread. The key carries the
tenant because answers never cross tenants, as in the cache's partitions.

Nothing here knows gRPC; the pipeline's generate stage decides the key and
how to start a generation.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import functools
import hashlib
import struct
import time

import grpc
import structlog
from opentelemetry import trace

from meshgate.common.v1 import common_pb2
from meshgate.errors import MeshgateError, internal_error, partly_delivered
from meshgate.reasons import Reason

log = structlog.get_logger(__name__)

# Starts the real generation, filling the Answer it is given, within a
# deadline on the Coalescer's clock (None: none but the router's own cap); see
# pipeline.Generator. Typed loosely to keep this module free of the pipeline.
Start = collections.abc.Callable[[object, float | None], collections.abc.AsyncIterator[str]]

_LENGTH = struct.Struct("<I")

# The attributes of a joiner's link to the span its shared generation ran under.
_JOINED = {"meshgate.link": "coalesced_generation"}


def is_deterministic(parameters: common_pb2.GenerationParameters) -> bool:
    """Greedy (temperature 0) or seeded: the same inputs are meant to give
    the same tokens (best effort under load: docs/templates.md, "Coalescing"), so one
    generation answers each of them as it could have been answered alone.

    An unset temperature is the model's default (1.0, sampled from a fresh
    seed): never shared.
    """
    greedy = parameters.HasField("temperature") and parameters.temperature == 0.0
    return greedy or parameters.HasField("seed")


def coalescing_key(
    scope: str,
    alias: str,
    prompt: collections.abc.Sequence[common_pb2.Message],
    parameters,
    route: str = "",
) -> bytes | None:
    """What identifies a generation's output, or None when it must not be
    shared (not deterministic). ``route`` names the models that answer the
    alias (config.route_of): a turn validated after a reload pointed the
    alias at another model must not join a generation of the old one (it
    would get, and store in the cache under the new route, the old model's
    answer). Every part is length-prefixed, so no two different inputs run
    together into the same bytes."""
    if not is_deterministic(parameters):
        return None
    digest = hashlib.sha256()

    def part(data: bytes) -> None:
        digest.update(_LENGTH.pack(len(data)))
        digest.update(data)

    part(scope.encode())
    part(alias.encode())
    part(route.encode())
    part(parameters.SerializeToString(deterministic=True))
    for message in prompt:
        part(message.SerializeToString(deterministic=True))
    return digest.digest()


class _Flight:
    """One generation under way and the callers reading it."""

    def __init__(self, answer, start: Start) -> None:
        self.answer = answer
        self.start = start
        self.pieces: list[str] = []
        self.readers = 0
        self.finished = False
        self.finished_at: float | None = None  # on the Coalescer's clock
        # Finished with the whole answer (not failed, not cancelled).
        self.completed = False
        self.error: MeshgateError | None = None
        self.task: asyncio.Task | None = None
        # The span current where the generation started (see _read).
        self.origin = trace.INVALID_SPAN_CONTEXT
        # The readers waiting for the next change: a future each, made only
        # when a reader has caught up (a reader still writing what arrived
        # costs nothing per piece, where a fresh Event per piece did).
        self._waiters: list[asyncio.Future] = []

    def notify(self) -> None:
        if self._waiters:
            for waiter in self._waiters:
                if not waiter.done():  # one whose deadline passed is cancelled
                    waiter.set_result(None)
            self._waiters.clear()

    async def changed(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def expired_for(self, deadline: float | None, now: float) -> bool:
        """Whether a reader with this deadline may no longer receive anything:
        the deadline passed before the generation finished."""
        if deadline is None or now < deadline:
            return False
        return self.finished_at is None or self.finished_at > deadline


class _Reader:
    """One caller's reading of a flight: an async iterator of its pieces.

    A caller counts among the flight's readers from the moment it asks (a
    flight must not be cancelled for want of readers while its joiner is
    still starting), so its closing the reading must count its leaving even
    when it never read: an async generator closed before its first step
    runs no ``finally``.
    """

    __slots__ = ("_pieces", "_leave", "entered", "left")

    def __init__(self, coalescer: Coalescer, flight_key: bytes, flight: _Flight, answer, deadline) -> None:
        self.entered = False  # the reading generator has started: its finally leaves
        self.left = False
        self._pieces = coalescer._read(flight_key, flight, answer, deadline, self)
        self._leave = functools.partial(coalescer._leave, flight_key, flight, self)

    def __aiter__(self) -> _Reader:
        return self

    def __anext__(self):
        # The generator's own step, not a coroutine of ours around it per piece.
        return self._pieces.__anext__()

    async def aclose(self) -> None:
        await self._pieces.aclose()
        if not self.entered:
            await self._leave()


class Coalescer:
    def __init__(self, clock: collections.abc.Callable[[], float] = time.monotonic) -> None:
        """``clock``: what the callers' deadlines are readings of (the
        turns' Budget.clock)."""
        self._clock = clock
        self._flights: dict[bytes, _Flight] = {}

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def generate(
        self,
        flight_key: bytes | None,
        start: Start,
        answer,
        new_answer: collections.abc.Callable[[], object],
        deadline: float | None,
    ) -> collections.abc.AsyncIterator[str]:
        """The pieces of the generation for ``flight_key``, filling ``answer``
        when it completes: the one under way with that key, or a new one
        (``start(new_answer(), None)`` once a caller reads). ``deadline``
        (on the clock, None for none) ends this caller's reading; a None key
        generates unshared, within it. Close what this returns (aclose),
        read or not: that is how a caller leaves."""
        if flight_key is None:
            return start(answer, deadline)
        flight = self._flights.get(flight_key)
        if flight is None:
            flight = _Flight(new_answer(), start)
            self._flights[flight_key] = flight
        else:
            log.debug("joined an identical generation", pieces_so_far=len(flight.pieces))
        flight.readers += 1  # see _Reader
        return _Reader(self, flight_key, flight, answer, deadline)

    async def _pump(self, flight_key: bytes, flight: _Flight) -> None:
        try:
            async with contextlib.aclosing(flight.start(flight.answer, None)) as pieces:
                async for text in pieces:
                    flight.pieces.append(text)
                    flight.notify()
            flight.completed = True
        except MeshgateError as error:
            flight.error = error
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug fails this flight's turns, with nothing of its insides
            log.exception("shared generation failed")
            flight.error = internal_error()
        finally:
            # Finished and forgotten in one step: a caller arriving later
            # starts afresh instead of joining an ended flight.
            flight.finished = True
            flight.finished_at = self._clock()
            self._forget(flight_key, flight)
            flight.notify()

    async def _read(
        self, flight_key: bytes, flight: _Flight, answer, deadline: float | None, reader: _Reader
    ) -> collections.abc.AsyncIterator[str]:
        read = delivered = chars = 0
        pieces = flight.pieces
        try:
            reader.entered = True
            if flight.task is None:
                # The generation's spans (the inference call's) are in the
                # trace of the caller whose reading started it.
                flight.origin = trace.get_current_span().get_span_context()
                flight.task = asyncio.ensure_future(self._pump(flight_key, flight))
            elif flight.origin.is_valid:
                # A joiner's trace has no inference hop of its own: a link
                # says which trace's generation answered it (a review).
                trace.get_current_span().add_link(flight.origin, _JOINED)
            while True:
                if flight.expired_for(deadline, self._clock()):
                    raise _own_copy(_deadline_passed(), delivered, chars, answer)
                if read < len(pieces):
                    # Known from the first piece on: the turn's latency
                    # metrics name the deployment (see Deployments.generate).
                    answer.deployment = flight.answer.deployment
                    # Pieces that arrived while this caller was writing go
                    # on as one delta (one message instead of several).
                    arrived = len(pieces)
                    text = pieces[read] if arrived - read == 1 else "".join(pieces[read:arrived])
                    read = arrived
                    # The generation's counts behind every piece so far (set
                    # as each arrived, before the next could): this caller's
                    # to be billed if it is cut off after this text.
                    shared = flight.answer
                    answer.prompt_tokens_read = shared.prompt_tokens_read
                    answer.completion_tokens_so_far = shared.completion_tokens_so_far
                    if flight.answer.finish_reason:
                        # The generation's last piece is in (it came with
                        # the completion): said as an unshared generation
                        # says it, so this caller's last delta is known.
                        answer.finish_reason = flight.answer.finish_reason
                    yield text
                    delivered += 1
                    chars += len(text)
                    continue
                if flight.finished:
                    break
                try:
                    async with asyncio.timeout(None if deadline is None else deadline - self._clock()):
                        await flight.changed()
                except TimeoutError:
                    raise _own_copy(_deadline_passed(), delivered, chars, answer) from None
            if flight.error is not None:
                raise _own_copy(flight.error, delivered, chars, answer)
            if not flight.completed:
                # Cancelled under a reader (only the loop shutting down does
                # that): never a silent short answer.
                raise _own_copy(internal_error(), delivered, chars, answer)
            answer.adopt(flight.answer)
        finally:
            await self._leave(flight_key, flight, reader)

    async def _leave(self, flight_key: bytes, flight: _Flight, reader: _Reader) -> None:
        if reader.left:
            return
        reader.left = True
        flight.readers -= 1
        if flight.readers == 0 and not flight.finished:
            # The last caller went away: nobody wants the answer, and its
            # inference call must not outlive the turn.
            self._forget(flight_key, flight)
            if flight.task is not None:
                flight.task.cancel()
                await asyncio.wait({flight.task})

    def _forget(self, flight_key: bytes, flight: _Flight) -> None:
        if self._flights.get(flight_key) is flight:
            del self._flights[flight_key]


def _deadline_passed() -> MeshgateError:
    return MeshgateError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        Reason.DEADLINE_EXCEEDED,
        "the deadline passed before the shared generation finished",
    )


def _own_copy(error: MeshgateError, deltas: int, chars: int, answer) -> MeshgateError:
    """Each caller's failure, with what that caller received (the tokens
    behind it: its ``answer``'s count at its last piece, where counted; the
    shared failure's count is the whole generation's); the shared one is
    never raised twice (a raise rewrites its traceback)."""
    copy = error.copy()
    if deltas:
        tokens = error.metadata.get("delivered_tokens")
        partly_delivered(
            copy, deltas, chars, answer.completion_tokens_so_far or (int(tokens) if tokens else None)
        )
    return copy
