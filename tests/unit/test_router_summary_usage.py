"""The router's sweep of the sessions owing summaries' usage
(services/router/summary_usage.py), over a fake context service: whom it
bills, under which take id, what it sends again after a lost reply or
leaves held for a later sweep, how many takes at once, and how it stops."""

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
    """Sessions' unbilled usage and the context service's take of it, as
    the store keeps them: what a take took is held until acknowledged, and
    every take meanwhile answers it (its take id, what it took)."""

    def __init__(self) -> None:
        self.unbilled: dict[str, tuple[SummarySpend, ...]] = {}
        self.keys: dict[str, str] = {}
        self.held: dict[str, tuple[str, tuple[SummarySpend, ...]]] = {}
        self.takes: list[tuple[str, str]] = []
        self.acknowledged: list[tuple[str, str]] = []
        # Replies lost after the take ran, per session, the next ones first.
        self.replies_lost: dict[str, int] = {}
        self.claims: list[tuple[float, int]] = []

    def owe(self, session_id: str, key_id: str = "") -> None:
        self.unbilled[session_id] = SPEND
        self.keys[session_id] = key_id

    async def claim(self, owed_for_s: float, most: int) -> list[OwedSummaries]:
        self.claims.append((owed_for_s, most))
        owing = [session for session, spends in self.unbilled.items() if spends or session in self.held]
        return [OwedSummaries("t", session, self.keys[session]) for session in owing[:most]]

    async def take(
        self, tenant_id: str, session_id: str, take_id: str
    ) -> tuple[str, tuple[SummarySpend, ...]]:
        self.takes.append((session_id, take_id))
        if session_id not in self.unbilled:
            raise MeshgateError(grpc.StatusCode.NOT_FOUND, Reason.SESSION_NOT_FOUND, "no such session")
        answer = self.held.get(session_id)
        if answer is None:
            answer, self.unbilled[session_id] = (take_id, self.unbilled[session_id]), ()
            if answer[1]:
                self.held[session_id] = answer
        if self.replies_lost.get(session_id, 0) > 0:
            self.replies_lost[session_id] -= 1
            raise lost_reply()
        return answer

    async def acknowledge(self, tenant_id: str, session_id: str, take_id: str) -> None:
        self.acknowledged.append((session_id, take_id))
        if self.held.get(session_id, ("",))[0] == take_id:
            del self.held[session_id]


async def tenant_of(tenant_id: str, key_id: str) -> Tenant:
    return Tenant(tenant_id, frozenset({"*"}), key_id=key_id)


class Ledger:
    """What was billed, once per take id (as Ledger.record_take writes)."""

    def __init__(self) -> None:
        self.bills: list[tuple[str, str, tuple[SummarySpend, ...]]] = []
        self.written: set[str] = set()

    async def bill(self, tenant: Tenant, take_id: str, spends: tuple[SummarySpend, ...]) -> None:
        self.bills.append((tenant.key_id, take_id, spends))
        self.written.add(take_id)


def sweeper(context: Context, ledger: Ledger | None = None) -> tuple[SummaryUsageSweeper, Ledger]:
    ledger = ledger or Ledger()
    usage = SummaryUsageSweeper(
        context.claim, context.take, context.acknowledge, tenant_of, ledger.bill, EVERY_S
    )
    return usage, ledger


async def no_bill(tenant: Tenant, take_id: str, spends: tuple[SummarySpend, ...]) -> None:
    return None


@pytest.fixture(autouse=True)
def no_pauses(monkeypatch):
    monkeypatch.setattr(summary_usage, "TAKE_RETRY_DELAYS_S", (0.0, 0.0, 0.0))


async def test_a_sweep_bills_each_owing_session_once_to_its_latest_key_and_acknowledges_it() -> None:
    context = Context()
    context.owe("a", "a" * 16)
    context.owe("b", "b" * 16)
    usage, ledger = sweeper(context)
    assert not await usage.sweep()
    # Owing for a sweep's interval at least, and claimed for as long.
    assert context.claims == [(EVERY_S, summary_usage.CLAIM_SIZE)]
    # Each take its own id, billed under it, then acknowledged.
    assert sorted((key, spends) for key, _, spends in ledger.bills) == [("a" * 16, SPEND), ("b" * 16, SPEND)]
    assert sorted(context.acknowledged) == sorted(context.takes) and len(set(context.takes)) == 2
    assert context.held == {}
    await usage.sweep()
    assert len(ledger.bills) == 2


async def test_a_take_whose_reply_is_lost_is_sent_again_with_its_id_and_billed_once() -> None:
    context = Context()
    context.owe("s")
    context.replies_lost["s"] = 2
    usage, ledger = sweeper(context)
    await usage.sweep()
    ((_, take_id),) = set(context.takes)
    assert len(context.takes) == 3
    assert ledger.bills == [("", take_id, SPEND)]
    assert context.acknowledged == [("s", take_id)] and context.held == {}


async def test_a_take_lost_every_time_is_held_and_billed_at_a_later_sweep() -> None:
    context = Context()
    context.owe("s")
    context.replies_lost["s"] = len(summary_usage.TAKE_RETRY_DELAYS_S) + 1
    usage, ledger = sweeper(context)
    await usage.sweep()
    assert ledger.bills == []
    ((_, take_id), *_) = context.takes
    # A new summary lands meanwhile: the held take is billed first, under
    # its own id, then the next sweep's take takes the new one.
    context.unbilled["s"] = SPEND
    await usage.sweep()
    assert ledger.bills == [("", take_id, SPEND)]
    await usage.sweep()
    assert len(ledger.bills) == 2 and ledger.bills[1][1] != take_id
    await usage.sweep()
    assert len(ledger.bills) == 2


async def test_a_take_whose_taker_died_before_billing_is_billed_by_the_next_sweep_once() -> None:
    """The router that took it dies between its take and its ledger write
    (its bill never returns), or its write fails: nothing is acknowledged,
    and another router's sweep bills the same take, under its id."""
    context = Context()
    context.owe("s", "k" * 16)

    async def dies(tenant: Tenant, take_id: str, spends: tuple[SummarySpend, ...]) -> None:
        raise MeshgateError(grpc.StatusCode.UNAVAILABLE, Reason.REDIS_UNAVAILABLE, "killed")

    dying = SummaryUsageSweeper(context.claim, context.take, context.acknowledge, tenant_of, dies, EVERY_S)
    await dying.sweep()
    ((_, take_id),) = context.takes
    assert context.acknowledged == [] and context.held["s"] == (take_id, SPEND)
    other, ledger = sweeper(context)
    await other.sweep()
    assert ledger.bills == [("k" * 16, take_id, SPEND)]
    assert context.acknowledged == [("s", take_id)] and context.held == {}
    await other.sweep()
    assert len(ledger.bills) == 1


async def test_a_take_whose_acknowledgement_is_lost_is_offered_again_under_its_id() -> None:
    """Billed, then its acknowledgement lost: the next sweep bills the same
    take id again, which the ledger writes once (Ledger.record_take)."""
    context = Context()
    context.owe("s")
    acknowledge = context.acknowledge

    async def lost(tenant_id: str, session_id: str, take_id: str) -> None:
        raise lost_reply()

    ledger = Ledger()
    usage = SummaryUsageSweeper(context.claim, context.take, lost, tenant_of, ledger.bill, EVERY_S)
    await usage.sweep()
    usage = SummaryUsageSweeper(context.claim, context.take, acknowledge, tenant_of, ledger.bill, EVERY_S)
    await usage.sweep()
    ((_, first, _), (_, again, _)) = ledger.bills
    assert first == again and ledger.written == {first} and context.held == {}


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

    ledger = Ledger()
    usage = SummaryUsageSweeper(claim, context.take, context.acknowledge, redis_down, ledger.bill, EVERY_S)
    await usage.sweep()
    # Not taken where whom to bill cannot be told: a later claim names it again.
    assert ledger.bills == [] and [session for session, _ in context.takes] == ["gone"]


async def test_a_full_claim_says_so() -> None:
    context = Context()
    for index in range(summary_usage.CLAIM_SIZE):
        context.owe(f"s{index}")
    usage, ledger = sweeper(context)
    assert await usage.sweep()
    assert len(ledger.bills) == summary_usage.CLAIM_SIZE


async def test_a_sweep_takes_a_few_sessions_at_a_time() -> None:
    in_flight = most = 0
    release = asyncio.Event()
    context = Context()
    for index in range(3 * summary_usage.MAX_CONCURRENT_TAKES):
        context.owe(f"s{index}")

    async def take(tenant_id: str, session_id: str, take_id: str) -> tuple[str, tuple[SummarySpend, ...]]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await release.wait()
        in_flight -= 1
        return take_id, SPEND

    usage = SummaryUsageSweeper(context.claim, take, context.acknowledge, tenant_of, no_bill, EVERY_S)
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

    async def take(tenant_id: str, session_id: str, take_id: str) -> tuple[str, tuple[SummarySpend, ...]]:
        taking.set()
        await release.wait()
        return await context.take(tenant_id, session_id, take_id)

    ledger = Ledger()
    usage = SummaryUsageSweeper(context.claim, take, context.acknowledge, tenant_of, ledger.bill, 0.01)
    usage.start()
    await asyncio.wait_for(taking.wait(), 5)
    closing = asyncio.create_task(usage.close())
    await asyncio.sleep(0.05)
    assert not closing.done()
    release.set()
    await closing
    assert [spends for *_, spends in ledger.bills] == [SPEND] and context.held == {}
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

    context = Context()
    usage = SummaryUsageSweeper(claim, context.take, context.acknowledge, tenant_of, no_bill, 0.01)
    usage.start()
    for _ in range(500):
        if claims >= 3:
            break
        await asyncio.sleep(0.01)
    await usage.close()
    assert claims >= 3
    assert warnings == ["summary usage not swept: the context service has no ClaimOwedSummaryUsage"]
