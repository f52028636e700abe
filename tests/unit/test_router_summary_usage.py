"""The router's asks for a session's summaries' usage after its latest turn
(services/router/summary_usage.py), over a fake take: when it asks, whom it
bills, and when it stops."""

from __future__ import annotations

import asyncio

import grpc

from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.router import summary_usage
from services.router.auth import Tenant
from services.router.pipeline import SummarySpend
from services.router.summary_usage import SummaryUsageCollector

FIRST_S = 0.01
SPEND = (SummarySpend("m", 90, 9, 1),)
ALICE = Tenant("t", frozenset({"*"}), key_id="alice")
BOB = Tenant("t", frozenset({"*"}), key_id="bob")


class Session:
    """What a session's summaries spent, taken whole by each ask."""

    def __init__(self) -> None:
        self.unbilled: tuple[SummarySpend, ...] = ()
        self.asks = 0
        self.gone = False

    async def take(self, tenant: Tenant, session_id: str) -> tuple[SummarySpend, ...]:
        self.asks += 1
        if self.gone:
            raise MeshgateError(grpc.StatusCode.NOT_FOUND, Reason.SESSION_NOT_FOUND, "no such session")
        taken, self.unbilled = self.unbilled, ()
        return taken


def collector(session: Session) -> tuple[SummaryUsageCollector, list]:
    billed: list = []
    return SummaryUsageCollector(session.take, lambda t, s: billed.append((t.key_id, s)), FIRST_S), billed


async def all_asks_done(session: Session, count: int) -> None:
    for _ in range(500):
        if session.asks >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{session.asks} asks, not {count}")


async def test_usage_landing_after_the_latest_turn_is_billed_once_to_its_key() -> None:
    session = Session()
    usage, billed = collector(session)
    usage.schedule(ALICE, "s")
    usage.schedule(BOB, "s")
    await all_asks_done(session, 1)
    # Landed after the first ask (a summary still being written): a later one takes it.
    session.unbilled = SPEND
    await all_asks_done(session, len(summary_usage.ASKS))
    await asyncio.sleep(FIRST_S * 70)
    assert session.asks == len(summary_usage.ASKS)
    assert billed == [("bob", SPEND)]


async def test_a_session_gone_is_not_asked_again() -> None:
    session = Session()
    session.gone = True
    usage, billed = collector(session)
    usage.schedule(ALICE, "s")
    await all_asks_done(session, 1)
    await asyncio.sleep(FIRST_S * 70)
    assert session.asks == 1 and billed == []


async def test_a_stopping_router_asks_once_for_every_session_it_waits_on() -> None:
    session = Session()
    session.unbilled = SPEND
    billed: list = []
    usage = SummaryUsageCollector(session.take, lambda t, s: billed.append(s), first_after_s=3600)
    usage.schedule(ALICE, "s")
    await usage.close()
    assert session.asks == 1 and billed == [SPEND]
    # Closed: a turn ending now arms nothing.
    usage.schedule(ALICE, "s")
    await asyncio.sleep(0)
    assert session.asks == 1


async def test_a_stopping_router_asks_a_few_sessions_at_a_time() -> None:
    in_flight = most = 0
    release = asyncio.Event()

    async def take(tenant: Tenant, session_id: str) -> tuple[SummarySpend, ...]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await release.wait()
        in_flight -= 1
        return ()

    usage = SummaryUsageCollector(take, lambda t, s: None, first_after_s=3600)
    for index in range(3 * summary_usage.MAX_CONCURRENT_ASKS):
        usage.schedule(ALICE, f"s{index}")
    closing = asyncio.create_task(usage.close())
    await asyncio.sleep(0.05)
    assert most == summary_usage.MAX_CONCURRENT_ASKS
    release.set()
    await closing
    assert in_flight == 0


async def test_a_context_service_without_the_take_is_said_once(monkeypatch) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(summary_usage.log, "warning", lambda event, **fields: warnings.append(event))

    async def take(tenant: Tenant, session_id: str) -> tuple[SummarySpend, ...]:
        raise MeshgateError(grpc.StatusCode.UNIMPLEMENTED, Reason.DOWNSTREAM_FAILED, "no such method")

    usage = SummaryUsageCollector(take, lambda t, s: None, first_after_s=3600)
    for index in range(3):
        usage.schedule(ALICE, f"s{index}")
    await usage.close()
    assert warnings == ["summary usage not taken: the context service has no TakeSummaryUsage"]
