"""The routers' turn journals against a real Redis (services/router/turn_journal.py):
a journal its router stopped writing is claimed and its turns billed, each
turn once whichever of its settlement and a claim writes it first, on one
instance and with the ledger's calls split by slot (a Redis Cluster's)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import uuid

import pytest

from meshgate import redis_access
from services.router.ledger import Ledger, UsageRecord
from services.router.turn_journal import BEATS, ROUTER_LOST, TurnJournal, journal_key

pytestmark = pytest.mark.integration

# Short, so that a journal goes stale within a test; claims read Redis's clock.
STALE_S = 0.3


def lost(tenant: str, completion_tokens: int) -> UsageRecord:
    """A turn's record were it lost with its router now."""
    return UsageRecord(tenant, "k1", "tiny-gpt", "live", 10, completion_tokens, 0, "miss", 0, 5, ROUTER_LOST)


async def totals(ledger: Ledger, tenant: str) -> dict[str, int]:
    today = ledger.today()
    return (await ledger.usage(tenant, today - datetime.timedelta(days=1), today))[("k1", "tiny-gpt")]


@pytest.fixture
async def redis(redis_url):
    client = redis_access.connect(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(params=[False, True], ids=["one-instance", "cluster-slots"])
def ledger(redis, request) -> Ledger:
    return Ledger(redis, stream_max_len=10_000, retention_days=2, split_by_slot=request.param)


def journal(redis, ledger: Ledger) -> TurnJournal:
    return TurnJournal(redis, ledger, interval_s=0.1, stale_s=STALE_S)


async def test_a_lost_routers_turns_are_billed_once_whichever_writes_first(redis, ledger):
    tenant = uuid.uuid4().hex[:12]
    served, claimer = journal(redis, ledger), journal(redis, ledger)
    settled_early = served.track(lambda: lost(tenant, 3))
    claimed = served.track(lambda: lost(tenant, 7))
    stalled = served.track(lambda: lost(tenant, 11))
    # A turn that delivered nothing yet is not in the journal.
    served.track(lambda: None)
    await served.write()
    assert await redis.hlen(journal_key(served.journal_id)) == 3

    # One turn settles after the snapshot that holds it, as its router dies
    # before writing the next: its settlement's record names its turn id.
    turn_id = settled_early.end()
    assert turn_id
    settled = UsageRecord(tenant, "k1", "tiny-gpt", "live", 10, 40, 0, "miss", 0, 90, turn_id=turn_id)
    await ledger.record(settled)

    assert await claimer.claim() == 0  # not stale yet
    await asyncio.sleep(STALE_S + 0.1)
    assert await claimer.claim() == 3
    row = await totals(ledger, tenant)
    # The settled turn once (its settlement's 40 tokens), the two others as
    # the snapshot had them, failed.
    assert (row["requests"], row["failures"], row["completion_tokens"]) == (3, 2, 40 + 7 + 11)
    assert not await redis.exists(journal_key(served.journal_id))
    assert await redis.zscore(BEATS, served.journal_id) is None

    # The router was only stalled: it comes back and settles the turns the
    # claim billed. Nothing is billed again, nor claimed again.
    for tracked, completion_tokens in ((claimed, 30), (stalled, 50)):
        record = UsageRecord(tenant, "k1", "tiny-gpt", "live", 10, completion_tokens, 0, "miss", 0, 90)
        await ledger.record(dataclasses.replace(record, turn_id=tracked.end()))
    await asyncio.sleep(STALE_S + 0.1)
    assert await claimer.claim() == 0
    assert await totals(ledger, tenant) == row


async def test_a_router_that_writes_during_a_claim_keeps_its_journal(redis, ledger):
    """A stalled router whose journal is being claimed, come back before the
    claim ends: the claim bills the turns it read, and leaves the journal
    the router wrote again (its turns still served, settled by it)."""
    tenant = uuid.uuid4().hex[:12]
    served, claimer = journal(redis, ledger), journal(redis, ledger)
    tracked = served.track(lambda: lost(tenant, 5))
    await served.write()
    await asyncio.sleep(STALE_S + 0.1)
    record_claim = ledger.record_claim

    async def router_back_meanwhile(records):
        await served.write()
        await record_claim(records)

    ledger.record_claim = router_back_meanwhile
    assert await claimer.claim() == 1
    ledger.record_claim = record_claim
    assert await redis.hlen(journal_key(served.journal_id)) == 1
    # Its turn ends: billed by the claim already, and out of the journal.
    turn_id = tracked.end()
    settled = UsageRecord(tenant, "k1", "tiny-gpt", "live", 10, 60, 0, "miss", 0, 90, turn_id=turn_id)
    await ledger.record(settled)
    await served.write()
    assert not await redis.exists(journal_key(served.journal_id))
    assert await redis.zscore(BEATS, served.journal_id) is None
    row = await totals(ledger, tenant)
    assert (row["requests"], row["failures"], row["completion_tokens"]) == (1, 1, 5)


async def test_a_claimer_that_dies_midway_leaves_the_journal_to_the_next(redis, ledger):
    tenant = uuid.uuid4().hex[:12]
    served = journal(redis, ledger)
    served.track(lambda: lost(tenant, 5))
    served.track(lambda: lost(tenant, 6))
    await served.write()
    await asyncio.sleep(STALE_S + 0.1)
    record_claim = ledger.record_claim

    async def killed_after_writing(records):
        await record_claim(records[:1])
        raise ConnectionError("the claimer died")

    ledger.record_claim = killed_after_writing
    with pytest.raises(ConnectionError):
        await journal(redis, ledger).claim()
    ledger.record_claim = record_claim
    # Leased to the dead claimer for the stale time, then claimed again.
    assert await journal(redis, ledger).claim() == 0
    await asyncio.sleep(STALE_S + 0.1)
    assert await journal(redis, ledger).claim() == 2
    row = await totals(ledger, tenant)
    assert (row["requests"], row["failures"], row["completion_tokens"]) == (2, 2, 11)
    assert not await redis.exists(journal_key(served.journal_id))


async def test_a_stopping_router_removes_its_journal(redis, ledger):
    tenant = uuid.uuid4().hex[:12]
    served = journal(redis, ledger)
    tracked = served.track(lambda: lost(tenant, 5))
    await served.write()
    assert await redis.zscore(BEATS, served.journal_id) is not None
    tracked.end()
    await served.close()
    assert not await redis.exists(journal_key(served.journal_id))
    assert await redis.zscore(BEATS, served.journal_id) is None
