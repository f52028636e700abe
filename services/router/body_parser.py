"""The HTTP edge's request bodies, parsed where they cannot stall the router.

The router's event loop carries every tenant's streams, and ``json.loads``
holds it from a body's first byte to its last. Its cost is in the values
more than the bytes: an 8 MiB chat body of 2.8 million empty arrays held the
loop 1.0-1.1 s, one of empty objects 0.5 s, one of zeros 0.18-0.21 s, while
7.5 MiB of prose in one message took 0.02-0.03 s (``bench/http_body_stall.py``:
the loop's longest gap while the body was posted and answered). A tenant
sending such bodies one after another froze every other tenant's streams.

So a body is parsed on the loop only when it is small and has few
containers (:func:`parses_inline`: the whole test is its length and two
byte counts, 0.09 ms at the bound); any other is parsed, checked and turned into the
edge's request object by a child process (``python -m
services.router.body_parser``), one body at a time, while the loop serves
everyone else. What comes back is already bounded: the decoders refuse
more messages, stop strings or texts than a request may carry before they
convert any, so the answer the loop unpickles is no larger than a request
the pipeline would take.

The child starts at the first such body (the edge's imports, about 0.8 s
once) and lives as long as the router: it reads its bodies from a pipe, so
it ends when the router closes the pipe or dies. A body whose caller leaves
while it waits for the child is dropped; one already in the child is parsed
to its end (the child cannot be interrupted mid-parse and keep its place in
the exchange). Waiting bodies are bounded, per tenant and in all, and in
time (MAX_QUEUED_PER_TENANT, MAX_QUEUED, the wait's bound): past them a body
is refused at once, with Retry-After, rather than held in memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

import grpc
import structlog

from meshgate.errors import BUSY_RETRY_AFTER_S, MeshgateError, internal_error, retry_info
from meshgate.reasons import Reason

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Parsed on the loop when no larger than this and with no more containers
# than INLINE_MAX_CONTAINERS. The decoder's time at the bounds
# (`bench/http_body_stall.py`, 2026-12-07, 2 shared cores): 128 KiB of
# zeros 2.5-4.8 ms, 2,048 empty arrays among zeros 2.5-4.5 ms, against
# 1.0-1.1 s for 8 MiB of empty arrays. A chat turn of 256 messages
# (router.max_messages) has about 260 containers; a body of more is one
# whose strings hold braces (code, JSON pasted into a message) or an
# attack, and pays the pipe instead (the loop's longest gap for such 8 MiB
# bodies 5-16 ms: receiving the body, and copying it into the pipe).
INLINE_MAX_BYTES = 128 * 1024
INLINE_MAX_CONTAINERS = 2048

# An exchange with the child that takes longer than this is taken for a
# hung child: it is killed (and started again by the next body) and the
# request fails. The slowest body measured parses in 1.2 s.
EXCHANGE_TIMEOUT_S = 30.0
# Bodies waiting for the child or in it, in all and per tenant: past them a
# body is refused at once (503 and 429, each with Retry-After), so that no
# one holds bodies in the router's memory in a queue it cannot drain (a
# review: 80 costly bodies posted and hung up on in 6 s queued 1.3 GiB, and
# held every other tenant's large body 20 s). At 1.2 s a body at worst, the
# last of them waits about 20 s.
MAX_QUEUED = 16
MAX_QUEUED_PER_TENANT = 4
# While no child has answered, one that dies (it may not start at all: a
# broken install) is not started again for this long; bodies meanwhile are
# refused at once, 503 with Retry-After. Once one has answered, a child that
# dies died of its body, and the next body starts a new one.
RESTART_BACKOFF_S = 30.0

_LENGTH_BYTES = 8


def parses_inline(body: bytes) -> bool:
    """Whether ``body`` is cheap enough to parse on the event loop: its
    containers bound the costly values (each list or dict a parse makes
    costs 0.2-0.4 µs, a number or string 20-40 ns), its bytes the rest."""
    if len(body) > INLINE_MAX_BYTES:
        return False
    return body.count(b"[") + body.count(b"{") <= INLINE_MAX_CONTAINERS


class BodyParser:
    """Runs a decoder (a module-level function of a body and one integer
    bound, returning a picklable request or raising MeshgateError) on the
    loop for small bodies and in the child process for the rest."""

    def __init__(
        self,
        timeout_s: float = EXCHANGE_TIMEOUT_S,
        wait_s: float = EXCHANGE_TIMEOUT_S,
        module: str = __name__,
    ) -> None:
        """``timeout_s``: the most an exchange with the child may take;
        ``wait_s``: the most a body may wait for the child; ``module``: what
        the child runs (this module; tests name another)."""
        self._timeout_s = timeout_s
        self._wait_s = wait_s
        self._module = module
        self._child: asyncio.subprocess.Process | None = None
        # Whether any child of this parser has answered a body: once one
        # has, the install works, and a child that dies died of its body.
        self._answered_ever = False
        self._no_start_until = 0.0
        # One body at a time in the child: its answers come in order.
        self._lock = asyncio.Lock()
        self._queued: collections.Counter[str] = collections.Counter()
        self._closed = False

    async def decode(
        self, decoder: Callable[[bytes, int], T], body: bytes, bound: int, tenant: str = ""
    ) -> T:
        """``decoder(body, bound)``, on the loop or in the child; ``tenant``
        is whose body it is, for the bounds on waiting bodies."""
        if parses_inline(body):
            return decoder(body, bound)
        self._admit(tenant)
        self._queued[tenant] += 1
        try:
            # A caller that leaves while its body waits takes it out of the
            # queue; one still waiting after the timeout is refused as busy.
            async with asyncio.timeout(self._wait_s):
                await self._lock.acquire()
        except TimeoutError:
            self._leave(tenant)
            raise self._busy("waited", self._wait_s) from None
        except BaseException:
            self._leave(tenant)
            raise
        # From here the exchange runs to its end whatever the caller does: a
        # caller that leaves does not cut it in half (the next body would
        # read this one's answer); it frees the lock and the place itself.
        exchange = asyncio.ensure_future(self._exchange(decoder, body, bound, tenant))
        # Its refusal is nobody's once its caller left: taken here, not
        # logged as "never retrieved".
        exchange.add_done_callback(_retrieved)
        return await asyncio.shield(exchange)

    def _admit(self, tenant: str) -> None:
        if self._queued[tenant] >= MAX_QUEUED_PER_TENANT:
            raise MeshgateError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                Reason.TOO_MANY_CALLS_IN_FLIGHT,
                f"this tenant has its most large bodies ({MAX_QUEUED_PER_TENANT}) waiting to be parsed"
                " on this router replica; retry later",
                {
                    "limit": "queued_large_bodies",
                    "scope": "tenant",
                    "limit_value": str(MAX_QUEUED_PER_TENANT),
                },
                details=[retry_info(BUSY_RETRY_AFTER_S)],
            )
        if self._queued.total() >= MAX_QUEUED:
            raise self._busy("queued", MAX_QUEUED)

    def _busy(self, why: str, limit: float) -> MeshgateError:
        said = f"has its most large bodies ({limit:g}) waiting" if why == "queued" else f"waited {limit:g} s"
        return MeshgateError(
            grpc.StatusCode.UNAVAILABLE,
            Reason.SERVICE_BUSY,
            f"this router replica's body parser {said}; retry later",
            {
                "limit": "queued_large_bodies",
                "scope": "replica",
                "limit_value": f"{limit:g}",
                "service": "router",
            },
            details=[retry_info(BUSY_RETRY_AFTER_S)],
        )

    def _leave(self, tenant: str) -> None:
        self._queued[tenant] -= 1
        if not self._queued[tenant]:
            del self._queued[tenant]

    async def _exchange(self, decoder: Callable[[bytes, int], T], body: bytes, bound: int, tenant: str) -> T:
        try:
            outcome, value = await self._ask(decoder, body, bound)
        finally:
            self._lock.release()
            self._leave(tenant)
        if outcome == "refused":
            raise value
        if outcome == "failed":
            log.error("the http body parser raised", traceback=value)
            raise internal_error()
        return value

    async def _ask(self, decoder: Callable, body: bytes, bound: int) -> tuple[str, object]:
        if self._closed:
            raise internal_error()
        backing_off = self._no_start_until - asyncio.get_running_loop().time()
        if backing_off > 0:
            raise MeshgateError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.SERVICE_BUSY,
                "this router replica's body parser could not start; retry later",
                {"limit": "body_parser_start", "scope": "replica", "service": "router"},
                details=[retry_info(backing_off)],
            )
        # Pickled only now: a body waiting for the child holds no second copy.
        frame = pickle.dumps((decoder.__module__, decoder.__qualname__, body, bound), protocol=5)
        try:
            child = await self._started()
            async with asyncio.timeout(self._timeout_s):
                child.stdin.write(len(frame).to_bytes(_LENGTH_BYTES, "big") + frame)
                del frame
                await child.stdin.drain()
                length = int.from_bytes(await child.stdout.readexactly(_LENGTH_BYTES), "big")
                answer = pickle.loads(await child.stdout.readexactly(length))
        except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError) as error:
            if not self._answered_ever:
                # No child has answered yet: it may not start at all. Not
                # started again for a while, lest each body pay for a
                # failing start.
                self._no_start_until = asyncio.get_running_loop().time() + RESTART_BACKOFF_S
            log.error(
                "the http body parser failed",
                error=repr(error),
                answered_before=self._answered_ever,
                next_start_in_s=max(0.0, self._no_start_until - asyncio.get_running_loop().time()),
            )
            await self._stop_child()
            raise internal_error() from None
        self._answered_ever = True
        return answer

    async def _started(self) -> asyncio.subprocess.Process:
        if self._child is None or self._child.returncode is not None:
            self._child = await asyncio.create_subprocess_exec(
                sys.executable,
                # -P: not the working directory first on its import path (a
                # review: a token.py there replaced the standard library's in
                # the child alone, and every large body failed). It imports
                # from the router's own path, which PYTHONPATH gives it.
                "-P",
                "-m",
                self._module,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(path or os.getcwd() for path in sys.path)},
                # Its own session: a Ctrl-C at the terminal is the router's to
                # handle; the child ends when the router closes its pipe.
                start_new_session=True,
            )
        return self._child

    async def _stop_child(self) -> None:
        child, self._child = self._child, None
        if child is None or child.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()

    async def close(self) -> None:
        """Ends the child (it reads the end of its pipe and exits; killed if
        it is still parsing after a second). Bodies after this fail."""
        self._closed = True
        child = self._child
        if child is None or child.returncode is not None:
            return
        with contextlib.suppress(OSError):
            child.stdin.close()
        try:
            await asyncio.wait_for(child.wait(), 1.0)
        except TimeoutError:
            await self._stop_child()

    @property
    def queued(self) -> int:
        """Bodies waiting for the child or in it (for tests and probes)."""
        return self._queued.total()

    @property
    def busy(self) -> bool:
        """Whether a body is in the child now (for tests and probes)."""
        return self._lock.locked()

    @property
    def child_pid(self) -> int | None:
        """The child's process id, while one runs (for tests and probes)."""
        child = self._child
        return child.pid if child is not None and child.returncode is None else None


def _retrieved(exchange: asyncio.Future) -> None:
    if not exchange.cancelled():
        exchange.exception()


def _serve() -> None:
    """The child: bodies in on stdin, outcomes out on stdout, until stdin ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    source = sys.stdin.buffer
    # Its answers go to a copy of stdout; anything printed goes to stderr.
    sink = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    while True:
        header = source.read(_LENGTH_BYTES)
        if len(header) < _LENGTH_BYTES:
            return
        module, name, body, bound = pickle.loads(source.read(int.from_bytes(header, "big")))
        try:
            answer = ("decoded", getattr(importlib.import_module(module), name)(body, bound))
        except MeshgateError as error:
            # Without its traceback: its frames hold the parsed body, and the
            # cycle through this frame kept it until a garbage collection (the
            # child held 310 MiB after 2.8 million empty arrays, 88 MiB before;
            # 100-125 MiB now).
            answer = ("refused", error.with_traceback(None))
        except Exception:  # noqa: BLE001 - a bug is the parent's to log, and the child goes on
            answer = ("failed", traceback.format_exc())
        frame = pickle.dumps(answer, protocol=5)
        sink.write(len(frame).to_bytes(_LENGTH_BYTES, "big") + frame)
        sink.flush()


if __name__ == "__main__":
    _serve()
