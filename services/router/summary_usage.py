"""Billing a session's summaries when no further append comes to take them.

The context service summarizes a session's older turns in the background,
after an append, and counts what the model spent on the session (its
``unbilled``, services/context/store.py); the session's next append takes
it and the router bills it (Pipeline, TurnAdmission.summaries_spent). A
session whose tenant never appends again would keep it, billed to no one:
so after each session turn, this router asks the context service for it
(TakeSummaryUsage) once the session has been quiet for
``router.summary_usage_collect_s``, then again 4, 16 and 64 times that
after each ask before (about 42 minutes in all at the default), as its
summaries may land well after the append (a queue of sessions to summarize,
one model call per span of up to ``context.summary_timeout_s``). A later
turn of the session starts the count again. The take is one Redis script,
as an append's is: whichever comes first takes the usage, so it is billed
once, to the tenant and key of the session's latest turn here.

The bound: what lands after the last ask, and what a router stopped or
killed outright had yet to ask for (a stopping router asks once for every
session it was waiting on, MAX_CONCURRENT_ASKS at a time, within
CLOSE_TIMEOUT_S), waits for the session's next append; a take
whose reply is lost is billed to no one, as an append's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable

import grpc
import structlog

from meshgate.errors import MeshgateError
from services.router.auth import Tenant
from services.router.pipeline import SummarySpend

log = structlog.get_logger(__name__)

# The delays of the asks after a session's latest turn, each from the one
# before, as multiples of the first.
ASKS = (1, 4, 16, 64)
# Sessions waited on at once; past it the longest waiting is asked now,
# once (its usage so far is billed; what lands later waits for an append).
MAX_WAITING_SESSIONS = 100_000
# Asks in flight at once: sessions gone quiet together (or all of them, when
# the router stops) ask a few at a time, not in one burst at the context
# service.
MAX_CONCURRENT_ASKS = 16
# How long a stopping router waits for its last asks.
CLOSE_TIMEOUT_S = 5.0

Take = Callable[[Tenant, str], Awaitable[tuple[SummarySpend, ...]]]
Bill = Callable[[Tenant, tuple[SummarySpend, ...]], None]


class _Waiting:
    """A session waited on: the tenant (and key) its latest turn here came
    with, and which ask comes next."""

    __slots__ = ("ask", "tenant", "timer")

    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant
        self.ask = 0
        self.timer: asyncio.TimerHandle | None = None


class SummaryUsageCollector:
    def __init__(self, take: Take, bill: Bill, first_after_s: float) -> None:
        self._take = take
        self._bill = bill
        self._first_after_s = first_after_s
        # (tenant id, session id) -> its wait, the longest waiting first.
        self._waiting: collections.OrderedDict[tuple[str, str], _Waiting] = collections.OrderedDict()
        self._asking: set[asyncio.Task] = set()
        self._ask_slots = asyncio.Semaphore(MAX_CONCURRENT_ASKS)
        self._closed = False
        self._said_unimplemented = False

    def schedule(self, tenant: Tenant, session_id: str) -> None:
        """After a turn's append to ``session_id``: its asks start again."""
        if self._closed:
            return
        key = (tenant.id, session_id)
        before = self._waiting.pop(key, None)
        if before is not None and before.timer is not None:
            before.timer.cancel()
        waiting = self._waiting[key] = _Waiting(tenant)
        self._arm(key, waiting)
        if len(self._waiting) > MAX_WAITING_SESSIONS:
            oldest, dropped = self._waiting.popitem(last=False)
            if dropped.timer is not None:
                dropped.timer.cancel()
            self._start(oldest, dropped, last=True)

    def _arm(self, key: tuple[str, str], waiting: _Waiting) -> None:
        delay_s = self._first_after_s * ASKS[waiting.ask]
        waiting.timer = asyncio.get_running_loop().call_later(delay_s, self._due, key, waiting)

    def _due(self, key: tuple[str, str], waiting: _Waiting) -> None:
        waiting.timer = None
        last = waiting.ask + 1 == len(ASKS)
        if last:
            self._waiting.pop(key, None)
        self._start(key, waiting, last)

    def _start(self, key: tuple[str, str], waiting: _Waiting, last: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._ask(key, waiting, last))
        self._asking.add(task)
        task.add_done_callback(self._asking.discard)

    async def _ask(self, key: tuple[str, str], waiting: _Waiting, last: bool) -> None:
        tenant, session_id = waiting.tenant, key[1]
        try:
            async with self._ask_slots:
                spends = await self._take(tenant, session_id)
        except MeshgateError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                # Deleted or expired: nothing is left to take, now or later.
                self._forget(key, waiting)
                return
            # Nothing taken (or a lost reply: the bound); the next ask tries again.
            if error.code != grpc.StatusCode.UNIMPLEMENTED:
                log.warning("summary usage not taken", session_id=session_id, reason=error.reason)
            elif not self._said_unimplemented:
                # A context service older than TakeSummaryUsage (an upgrade
                # under way) answers every ask so: said once, not four
                # times per session turn.
                self._said_unimplemented = True
                log.warning("summary usage not taken: the context service has no TakeSummaryUsage")
        except Exception:
            # A bug: logged here, as nothing awaits the task.
            log.exception("summary usage not taken", session_id=session_id)
        else:
            if spends:
                self._bill(tenant, spends)
        # A later turn of the session replaced this wait (and armed its own).
        if not last and self._waiting.get(key) is waiting and not self._closed:
            waiting.ask += 1
            self._arm(key, waiting)

    def _forget(self, key: tuple[str, str], waiting: _Waiting) -> None:
        if self._waiting.get(key) is waiting:
            del self._waiting[key]
            if waiting.timer is not None:
                waiting.timer.cancel()

    async def close(self) -> None:
        """Asks once more for every session waited on (its usage so far is
        billed), within CLOSE_TIMEOUT_S, before the context channel closes."""
        self._closed = True
        waiting, self._waiting = self._waiting, collections.OrderedDict()
        for key, wait in waiting.items():
            if wait.timer is not None:
                wait.timer.cancel()
            self._start(key, wait, last=True)
        if self._asking:
            _, pending = await asyncio.wait(set(self._asking), timeout=CLOSE_TIMEOUT_S)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
