"""The router's sweep of the sessions owing summaries' usage
(services/router/summary_usage.py), over a fake context service: whom it
bills, what it sends again after a lost reply, how many takes at once, and
how it stops."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.router import summary_usage
from services.router.auth import Tenant
from services.router.pipeline import SummarySpend
from services.router.summary_usage import OwedSummaries, SummaryUsageSweeper

SPEND = (SummarySpend("m", 90, 9, 1),)
EVERY_S = 30.0


def lost_reply() -> MeshgateError:
    return MeshgateError(grpc.StatusCode.UNAVAILABLE, Reason.REDIS_UNAVAILABLE, "reply lost")


class Context:
    """Sessions' unbilled usage and the context service's take of it: the
    latest take's id and answer kept, as the store keeps them."""

    def __init__(self) -> None:
        self.unbilled: dict[str, tuple[SummarySpend, ...]] = {}
        self.keys: dict[str, str] = {}
        self.latest_take: dict[str, tuple[str, tuple[SummarySpend, ...]]] = {}
        self.takes: list[tuple[str, str]] = []
        # Replies lost after the take ran, per session, the next ones first.
        self.replies_lost: dict[str, int] = {}
        self.claims: list[tuple[float, int]] = []

    def owe(self, session_id: str, key_id: str = "") -> None:
        self.unbilled[session_id] = SPEND
        self.keys[session_id] = key_id

    async def claim(self, owed_for_s: float, most: int) -> list[OwedSummaries]:
        self.claims.append((owed_for_s, most))
        owing = [session for session, spends in self.unbilled.items() if spends]
        return [OwedSummaries("t", session, self.keys[session]) for session in owing[:most]]

    async def take(self, tenant_id: str, session_id: str, take_id: str) -> tuple[SummarySpend, ...]:
        self.takes.append((session_id, take_id))
        if session_id not in self.unbilled:
            raise MeshgateError(grpc.StatusCode.NOT_FOUND, Reason.SESSION_NOT_FOUND, "no such session")
        latest = self.latest_take.get(session_id)
        if latest is not None and latest[0] == take_id:
            taken = latest[1]
        else:
            taken, self.unbilled[session_id] = self.unbilled[session_id], ()
            self.latest_take[session_id] = (take_id, taken)
        if self.replies_lost.get(session_id, 0) > 0:
            self.replies_lost[session_id] -= 1
            raise lost_reply()
        return taken


async def tenant_of(tenant_id: str, key_id: str) -> Tenant:
    return Tenant(tenant_id, frozenset({"*"}), key_id=key_id)


def sweeper(context: Context) -> tuple[SummaryUsageSweeper, list]:
    billed: list = []
    usage = SummaryUsageSweeper(
        context.claim, context.take, tenant_of, lambda t, s: billed.append((t.key_id, s)), EVERY_S
    )
    return usage, billed


@pytest.fixture(autouse=True)
def no_pauses(monkeypatch):
    monkeypatch.setattr(summary_usage, "TAKE_RETRY_DELAYS_S", (0.0, 0.0, 0.0))


async def test_a_sweep_bills_each_owing_session_once_to_its_latest_key() -> None:
    context = Context()
    context.owe("a", "a" * 16)
    context.owe("b", "b" * 16)
    usage, billed = sweeper(context)
    assert not await usage.sweep()
    # Owing for a sweep's interval at least, and claimed for as long.
    assert context.claims == [(EVERY_S, summary_usage.CLAIM_SIZE)]
    assert sorted(billed) == [("a" * 16, SPEND), ("b" * 16, SPEND)]
    # Each take its own id.
    assert len({take_id for _, take_id in context.takes}) == 2
    await usage.sweep()
    assert len(billed) == 2


async def test_a_take_whose_reply_is_lost_is_sent_again_with_its_id_and_billed_once() -> None:
    context = Context()
    context.owe("s")
    context.replies_lost["s"] = 2
    usage, billed = sweeper(context)
    await usage.sweep()
    assert billed == [("", SPEND)]
    ((_, take_id),) = set(context.takes)
    assert len(context.takes) == 3 and context.takes == [("s", take_id)] * 3


async def test_a_take_lost_every_time_is_sent_first_at_the_next_sweep() -> None:
    context = Context()
    context.owe("s")
    context.replies_lost["s"] = len(summary_usage.TAKE_RETRY_DELAYS_S) + 1
    usage, billed = sweeper(context)
    await usage.sweep()
    assert billed == []
    ((_, take_id),) = set(context.takes)
    # A new summary lands meanwhile: the held take is answered first, then
    # a take of its own takes the new one.
    context.unbilled["s"] = SPEND
    context.takes.clear()
    await usage.sweep()
    assert billed == [("", SPEND), ("", SPEND)]
    assert context.takes[0] == ("s", take_id) and context.takes[1][1] != take_id
    # Answered: not held again.
    context.takes.clear()
    await usage.sweep()
    assert context.takes == []


async def test_a_session_gone_or_a_key_that_cannot_be_told_is_not_billed() -> None:
    context = Context()
    context.owe("gone")
    del context.unbilled["gone"]  # deleted after the claim named it

    async def claim(owed_for_s: float, most: int) -> list[OwedSummaries]:
        return [OwedSummaries("t", "gone", ""), OwedSummaries("t", "unknown-key", "f" * 16)]

    async def redis_down(tenant_id: str, key_id: str) -> Tenant:
        if key_id:
            raise MeshgateError(
                grpc.StatusCode.UNAVAILABLE, Reason.REDIS_UNAVAILABLE, "keys cannot be checked"
            )
        return await tenant_of(tenant_id, key_id)

    billed: list = []
    usage = SummaryUsageSweeper(claim, context.take, redis_down, lambda t, s: billed.append(s), EVERY_S)
    await usage.sweep()
    # Not taken where whom to bill cannot be told: a later claim names it again.
    assert billed == [] and [session for session, _ in context.takes] == ["gone"]


async def test_a_full_claim_says_so() -> None:
    context = Context()
    for index in range(summary_usage.CLAIM_SIZE):
        context.owe(f"s{index}")
    usage, billed = sweeper(context)
    assert await usage.sweep()
    assert len(billed) == summary_usage.CLAIM_SIZE


async def test_a_sweep_takes_a_few_sessions_at_a_time() -> None:
    in_flight = most = 0
    release = asyncio.Event()
    context = Context()
    for index in range(3 * summary_usage.MAX_CONCURRENT_TAKES):
        context.owe(f"s{index}")

    async def take(tenant_id: str, session_id: str, take_id: str) -> tuple[SummarySpend, ...]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await release.wait()
        in_flight -= 1
        return SPEND

    usage = SummaryUsageSweeper(context.claim, take, tenant_of, lambda t, s: None, EVERY_S)
    sweeping = asyncio.create_task(usage.sweep())
    await asyncio.sleep(0.05)
    assert most == summary_usage.MAX_CONCURRENT_TAKES
    release.set()
    await sweeping
    assert in_flight == 0


async def test_a_stopping_router_lets_a_sweep_under_way_bill_what_it_took(monkeypatch) -> None:
    monkeypatch.setattr(summary_usage, "JITTER", 0.0)
    release = asyncio.Event()
    context = Context()
    context.owe("s")
    taking = asyncio.Event()

    async def take(tenant_id: str, session_id: str, take_id: str) -> tuple[SummarySpend, ...]:
        taking.set()
        await release.wait()
        return await context.take(tenant_id, session_id, take_id)

    billed: list = []
    usage = SummaryUsageSweeper(context.claim, take, tenant_of, lambda t, s: billed.append(s), 0.01)
    usage.start()
    await asyncio.wait_for(taking.wait(), 5)
    closing = asyncio.create_task(usage.close())
    await asyncio.sleep(0.05)
    assert not closing.done()
    release.set()
    await closing
    assert billed == [SPEND]
    # Stopped: no sweep after it.
    context.owe("t")
    await asyncio.sleep(0.05)
    assert len(context.claims) == 1


async def test_a_context_service_without_the_claim_is_said_once(monkeypatch) -> None:
    monkeypatch.setattr(summary_usage, "JITTER", 0.0)
    warnings: list[str] = []
    monkeypatch.setattr(summary_usage.log, "warning", lambda event, **fields: warnings.append(event))
    claims = 0

    async def claim(owed_for_s: float, most: int) -> list[OwedSummaries]:
        nonlocal claims
        claims += 1
        raise MeshgateError(grpc.StatusCode.UNIMPLEMENTED, Reason.DOWNSTREAM_FAILED, "no such method")

    usage = SummaryUsageSweeper(claim, Context().take, tenant_of, lambda t, s: None, 0.01)
    usage.start()
    for _ in range(500):
        if claims >= 3:
            break
        await asyncio.sleep(0.01)
    await usage.close()
    assert claims >= 3
    assert warnings == ["summary usage not swept: the context service has no ClaimOwedSummaryUsage"]
