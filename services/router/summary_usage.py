"""Billing what the context service's summaries of a session spend.

The context service summarizes a session's older turns in the background
and counts what the model spent on the session (its ``unbilled``), having
marked the session owing in Redis first (the owed set,
services/context/store.py). Every router sweeps that set: every
``router.summary_usage_collect_s`` (by JITTER more or less, so routers
started together do not sweep together) it claims the sessions owing for
at least that long (ClaimOwedSummaryUsage: a claim keeps the other
routers off them for as long, so each router takes different ones), up to
CLAIM_SIZE (a full claim is followed by another at once), and takes each
one's usage (TakeSummaryUsage), MAX_CONCURRENT_TAKES at a time, billing what
it took (Admission.summaries_spent) to the session's tenant and the key of
the session's latest turn (the session keeps its key id; a key no longer
known, or none, bills the tenant with no key: Authenticator.billed_tenant).

A router keeps nothing of it in memory but the takes under way, so a
summary's usage waits for no turn that may never come and for no router
that served the session: it is billed however long after the session's
latest turn it lands, by whichever router sweeps first, however the others
stopped. A take whose reply is lost (UNAVAILABLE, DEADLINE_EXCEEDED) is sent
again with its take id, which answers what that take took and takes
nothing more: after each of TAKE_RETRY_DELAYS_S, then at each later sweep
(up to MAX_UNANSWERED_TAKES held), until it is answered or its session
and usage record are gone.

A session deleted or expired before a sweep keeps its usage for one: the
context service holds it apart from the session's keys, for a week past
the session's TTL (services/context/store.py's usage record).

The bound: usage no sweep took within that week (no router sweeping); a
router killed between a take and its ledger write (as a turn's own usage
record: services/router/ledger.py), or while it held a take for a later
sweep; a take of the same session between a take and its
retry (the session keeps its latest take's answer alone: another router's
claim after a new summary, or the ask of a router older than the sweep).
What the owed set itself may miss is in its module's docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import uuid
from collections.abc import Awaitable, Callable

import grpc
import structlog

from meshgate.errors import MeshgateError
from services.router.auth import Tenant
from services.router.pipeline import SummarySpend

log = structlog.get_logger(__name__)

# Sessions one claim names at most.
CLAIM_SIZE = 100
# Takes in flight at once, so a claim's sessions reach the context service a
# few at a time, not in one burst.
MAX_CONCURRENT_TAKES = 16
# The pauses before a take whose reply was lost is sent again, in its sweep.
TAKE_RETRY_DELAYS_S = (0.5, 1.0, 2.0)
# Takes held for the next sweep, their every send's reply lost; past this
# many one is dropped (and its usage, if it took any, billed to no one).
MAX_UNANSWERED_TAKES = 10_000
# A sweep comes every summary_usage_collect_s times 1 ± this.
JITTER = 0.5
# How long a stopping router waits for a sweep under way.
CLOSE_TIMEOUT_S = 5.0

# A take that failed so may have run, its reply lost: sent again.
_REPLY_LOST = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclasses.dataclass(frozen=True)
class OwedSummaries:
    """A session whose summaries' usage waits for a take
    (context.v1.OwedSummaryUsage)."""

    tenant_id: str
    session_id: str
    # The id of the key of the session's latest turn ("" for none).
    key_id: str


Claim = Callable[[float, int], Awaitable[list[OwedSummaries]]]
Take = Callable[[str, str, str], Awaitable[tuple[SummarySpend, ...]]]
TenantOf = Callable[[str, str], Awaitable[Tenant]]
Bill = Callable[[Tenant, tuple[SummarySpend, ...]], None]


@dataclasses.dataclass(frozen=True)
class _Take:
    owed: OwedSummaries
    take_id: str
    # Whom what it takes is billed to.
    tenant: Tenant


class SummaryUsageSweeper:
    def __init__(self, claim: Claim, take: Take, tenant_of: TenantOf, bill: Bill, every_s: float) -> None:
        self._claim = claim
        self._take = take
        self._tenant_of = tenant_of
        self._bill = bill
        self._every_s = every_s
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_TAKES)
        # (tenant id, session id) -> a take whose replies were all lost.
        self._unanswered: dict[tuple[str, str], _Take] = {}
        self._running: asyncio.Task | None = None
        self._sweeping: asyncio.Task | None = None
        self._said_unimplemented = False

    def start(self) -> None:
        self._running = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        full = False
        while True:
            if not full:
                await asyncio.sleep(self._every_s * random.uniform(1 - JITTER, 1 + JITTER))
            self._sweeping = asyncio.get_running_loop().create_task(self._sweep_logged())
            # Shielded: a stopping router lets a sweep under way finish (close).
            full = await asyncio.shield(self._sweeping)

    async def _sweep_logged(self) -> bool:
        try:
            return await self.sweep()
        except MeshgateError as error:
            if error.code != grpc.StatusCode.UNIMPLEMENTED:
                log.warning("summary usage not swept", reason=error.reason, message=error.message)
            elif not self._said_unimplemented:
                # A context service older than the claim (an upgrade under
                # way) answers every sweep so: said once.
                self._said_unimplemented = True
                log.warning("summary usage not swept: the context service has no ClaimOwedSummaryUsage")
        except Exception:
            # A bug: logged here, as nothing awaits the task.
            log.exception("summary usage not swept")
        return False

    async def sweep(self) -> bool:
        """Sends again the takes held from sweeps before (first: no other
        take of their session may come between), then takes and bills what
        the sessions claimed now owe; returns whether the claim was full."""
        held, self._unanswered = self._unanswered, {}
        await asyncio.gather(*(self._settle(take) for take in held.values()))
        owed = await self._claim(self._every_s, CLAIM_SIZE)
        await asyncio.gather(*(self._take_owed(session) for session in owed))
        return len(owed) == CLAIM_SIZE

    async def _take_owed(self, owed: OwedSummaries) -> None:
        try:
            tenant = await self._tenant_of(owed.tenant_id, owed.key_id)
        except MeshgateError as error:
            # Nothing taken: a claim after this one's names the session again.
            log.warning("summary usage not taken", session_id=owed.session_id, reason=error.reason)
            return
        await self._settle(_Take(owed, uuid.uuid4().hex, tenant))

    async def _settle(self, take: _Take) -> None:
        session_id = take.owed.session_id
        try:
            async with self._slots:
                spends = await self._send(take)
        except MeshgateError as error:
            if error.code in _REPLY_LOST:
                self._hold(take)
            elif error.code != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: gone, nothing to take
                log.warning("summary usage not taken", session_id=session_id, reason=error.reason)
            return
        except Exception:
            # A bug: logged here, as nothing awaits the task.
            log.exception("summary usage not taken", session_id=session_id)
            return
        if spends:
            self._bill(take.tenant, spends)

    async def _send(self, take: _Take) -> tuple[SummarySpend, ...]:
        """The take, sent again with its take id after each pause while its
        reply is lost."""
        owed = take.owed
        for pause_s in TAKE_RETRY_DELAYS_S:
            try:
                return await self._take(owed.tenant_id, owed.session_id, take.take_id)
            except MeshgateError as error:
                if error.code not in _REPLY_LOST:
                    raise
            await asyncio.sleep(pause_s)
        return await self._take(owed.tenant_id, owed.session_id, take.take_id)

    def _hold(self, take: _Take) -> None:
        if len(self._unanswered) >= MAX_UNANSWERED_TAKES:
            log.warning("summary usage take dropped, its reply lost", session_id=take.owed.session_id)
            return
        log.warning(
            "summary usage take held for the next sweep, its reply lost", session_id=take.owed.session_id
        )
        self._unanswered[(take.owed.tenant_id, take.owed.session_id)] = take

    async def close(self) -> None:
        """Stops sweeping; a sweep under way finishes, within
        CLOSE_TIMEOUT_S, before the context channel closes."""
        if self._running is None:
            return
        self._running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._running
        if self._sweeping is not None and not self._sweeping.done():
            await asyncio.wait({self._sweeping}, timeout=CLOSE_TIMEOUT_S)
            self._sweeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeping
