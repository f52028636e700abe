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
it took (TurnAdmission.bill_summary_take) to the session's tenant and the
key of the session's latest turn (the session keeps its key id; a key no
longer known, or none, bills the tenant with no key:
Authenticator.billed_tenant), then acknowledging the take
(AcknowledgeSummaryUsage).

Exactly once: the context service holds what a take took until it is
acknowledged, and answers every take of the session meanwhile with that
take, under its take id, taking nothing more; the session stays owing, so
a claim names it again once the claim period is over. The ledger writes a
take's usage once per take id (Ledger.record_take: a marker set in the same
script as the totals), and the tenant's budgets are charged once per take
id apart (Admission.charge_take: a marker set in the same script as each
slot's charge), before the take is acknowledged. So a router killed
between a take and its ledger write, between the write and the budgets'
charge, or between the charge and the acknowledgement, leaves the take to
whichever router claims the session next, which writes and charges what
was not (or finds it all billed) and acknowledges it; a write Redis
failed, or whose reply was lost, is not acknowledged either, and is
offered again alike. A take whose reply is lost
(UNAVAILABLE, DEADLINE_EXCEEDED) is sent again with its take id after each
of TAKE_RETRY_DELAYS_S: held, or acknowledged by another router meanwhile,
it answers what it took and takes nothing more; after the last, a take
that ran is held for a later claim's.

A router keeps nothing of it in memory but the takes under way, so a
summary's usage waits for no turn that may never come and for no router
that served the session: it is billed however long after the session's
latest turn it lands, by whichever router sweeps first, however the others
stopped.

A session deleted or expired before a sweep keeps its usage for one: the
context service holds it apart from the session's keys, for a week past
the session's TTL (services/context/store.py's usage record).

The bound: usage no sweep took within that week (no router sweeping). A
take's markers (the ledger's and the budgets') are kept as long as that
record (ledger.TAKE_MARKER_TTL_S, from context.session_ttl_s): a take
written and offered again later still is billed twice, which only a
record its summaries kept renewing all that time, no router sweeping, can
hold (a router configured with another context.session_ttl_s than the
context service's keeps them for its own). During a rolling
upgrade, a context service older than the hold takes for good (a router
killed before its write, or whose every send of a take lost its reply,
loses what it took), and a router older than the hold neither sees a held
take nor holds its own. And a retry of a take whose session, within
TAKE_RETRY_DELAYS_S, another router's take and another after it were
acknowledged (a claim period shorter than those pauses) takes new usage
under an id billed already: billed to no one. What the owed set itself
may miss is in its module's docstring.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections.abc import Awaitable, Callable

import grpc
import structlog

from meshgate.errors import MeshgateError
from meshgate.tasks import cancel_and_wait
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
# (tenant id, session id, take id) -> the take it answers (the one sent, or
# one the session holds, not acknowledged): its take id and what it took.
Take = Callable[[str, str, str], Awaitable[tuple[str, tuple[SummarySpend, ...]]]]
# (tenant id, session id, take id): the take's hold ended.
Acknowledge = Callable[[str, str, str], Awaitable[None]]
TenantOf = Callable[[str, str], Awaitable[Tenant]]
# (tenant, take id, what it took): billed once per take id; raises if not.
Bill = Callable[[Tenant, str, tuple[SummarySpend, ...]], Awaitable[None]]


class SummaryUsageSweeper:
    def __init__(
        self,
        claim: Claim,
        take: Take,
        acknowledge: Acknowledge,
        tenant_of: TenantOf,
        bill: Bill,
        every_s: float,
    ) -> None:
        self._claim = claim
        self._take = take
        self._acknowledge = acknowledge
        self._tenant_of = tenant_of
        self._bill = bill
        self._every_s = every_s
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_TAKES)
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
        """Takes, bills and acknowledges what the sessions claimed now owe;
        returns whether the claim was full."""
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
        try:
            async with self._slots:
                await self._settle(owed, tenant)
        except MeshgateError as error:
            # Not acknowledged: a take that ran stays held, and a claim after
            # this one's names the session again.
            if error.code != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: gone, nothing to take
                log.warning("summary usage not billed", session_id=owed.session_id, reason=error.reason)
        except Exception:
            # A bug: logged here, as nothing awaits the task.
            log.exception("summary usage not billed", session_id=owed.session_id)

    async def _settle(self, owed: OwedSummaries, tenant: Tenant) -> None:
        """Takes the session's usage, bills it, and acknowledges the take."""
        take_id, spends = await self._send(owed)
        if not spends:
            return  # nothing taken, nothing held
        await self._bill(tenant, take_id, spends)
        await self._acknowledge(owed.tenant_id, owed.session_id, take_id)

    async def _send(self, owed: OwedSummaries) -> tuple[str, tuple[SummarySpend, ...]]:
        """The take, sent again with its take id after each pause while its
        reply is lost. Returns the id of the take answered (this one, or one
        the session held) and what it took."""
        take_id = uuid.uuid4().hex
        for pause_s in TAKE_RETRY_DELAYS_S:
            try:
                return await self._take(owed.tenant_id, owed.session_id, take_id)
            except MeshgateError as error:
                if error.code not in _REPLY_LOST:
                    raise
            await asyncio.sleep(pause_s)
        return await self._take(owed.tenant_id, owed.session_id, take_id)

    async def close(self) -> None:
        """Stops sweeping; a sweep under way finishes, within
        CLOSE_TIMEOUT_S, before the context channel closes."""
        if self._running is None:
            return
        await cancel_and_wait(self._running)
        if self._sweeping is not None and not self._sweeping.done():
            await asyncio.wait({self._sweeping}, timeout=CLOSE_TIMEOUT_S)
            await cancel_and_wait(self._sweeping)
