"""The usage ledger against a real Redis: the log and the daily aggregates."""

from __future__ import annotations

import asyncio
import datetime
import uuid

import pytest

from meshgate import redis_access
from services.router import ledger as ledger_module
from services.router.ledger import (
    METRICS,
    STREAM,
    SUMMARY_USAGE,
    TAKE_MARKER_TTL_S,
    Ledger,
    UsageRecord,
    day_key,
)
from tests.tcp_proxy import TcpProxy, evalsha_calls, evalsha_marker, unstalled_and_run

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_turns_are_logged_and_aggregated_per_key_model_and_day(redis_url, split_by_slot):
    client = redis_access.connect(redis_url)
    now = [datetime.datetime(2026, 5, 1, 23, 59, tzinfo=datetime.UTC).timestamp()]
    ledger = Ledger(
        client, stream_max_len=10_000, retention_days=2, clock=lambda: now[0], split_by_slot=split_by_slot
    )
    tenant = uuid.uuid4().hex[:12]
    try:
        before = await client.xlen(STREAM)
        completed = UsageRecord(tenant, "k1", "tiny-gpt", "live", 40, 20, 0, "miss", 9_000, 120)
        hit = UsageRecord(tenant, "k1", "tiny-gpt", "live", 0, 0, 60, "exact_hit", 900, 5)
        failed = UsageRecord(tenant, "k2", "tiny-gpt", "live", 0, 3, 0, "miss", 0, 50, "DEADLINE_EXCEEDED")
        # Two summaries of a session of k1's turns: the tokens, but no request.
        summaries = UsageRecord(tenant, "k1", "tiny-gpt", "", 300, 30, 0, SUMMARY_USAGE, 360, 0, summaries=2)
        for record in (completed, hit, failed, summaries):
            await ledger.record(record)
        now[0] += 120  # the next UTC day
        await ledger.record(completed)
        assert await client.xlen(STREAM) == before + 5
        last = (await client.xrevrange(STREAM, count=1))[0][1]
        assert last[b"tenant"] == tenant.encode() and last[b"prompt_tokens"] == b"40"

        may_1, may_2 = datetime.date(2026, 5, 1), datetime.date(2026, 5, 2)
        first_day = await ledger.usage(tenant, may_1, may_1)
        assert first_day[("k1", "tiny-gpt")] == {
            "requests": 2,
            "failures": 0,
            "cache_hits": 1,
            "prompt_tokens": 340,
            "completion_tokens": 50,
            "saved_tokens": 60,
            "cost_nano_usd": 10_260,
            "latency_ms": 125,
            "summaries": 2,
            "summary_prompt_tokens": 300,
            "summary_completion_tokens": 30,
        }
        assert first_day[("k2", "tiny-gpt")]["failures"] == 1
        both = await ledger.usage(tenant, may_1, may_2)
        assert both[("k1", "tiny-gpt")]["requests"] == 3
        assert both[("k1", "tiny-gpt")]["prompt_tokens"] == 380
        # Kept for the retention period, not forever, under the key the
        # router names (in KEYS) for its cluster slot.
        assert 0 < await client.ttl(day_key(tenant, "2026-05-01")) <= 2 * 24 * 3600
        assert await ledger.usage(uuid.uuid4().hex, may_1, may_2) == {}
    finally:
        await client.aclose()


async def test_a_reloaded_retention_applies_to_the_totals_written_after_it(redis_url):
    """GetUsage answers for the reloaded retention at once; the totals
    written after the reload must be kept that long (they kept the start's)."""
    client = redis_access.connect(redis_url)
    now = datetime.datetime(2026, 5, 1, 12, tzinfo=datetime.UTC).timestamp()
    ledger = Ledger(client, stream_max_len=10_000, retention_days=2, clock=lambda: now)
    tenant = uuid.uuid4().hex[:12]
    try:
        await ledger.record(UsageRecord(tenant, "k1", "tiny-gpt", "live", 4, 2, 0, "miss", 0, 10))
        assert 0 < await client.ttl(day_key(tenant, "2026-05-01")) <= 2 * 24 * 3600
        ledger.reconfigure(10_000, 400)
        await ledger.record(UsageRecord(tenant, "k1", "tiny-gpt", "live", 4, 2, 0, "miss", 0, 10))
        assert 399 * 24 * 3600 < await client.ttl(day_key(tenant, "2026-05-01")) <= 400 * 24 * 3600
    finally:
        await client.aclose()


async def test_submitted_records_are_written_in_batches_and_drained(redis_url):
    client = redis_access.connect(redis_url)
    ledger = Ledger(client, stream_max_len=10_000, retention_days=2)
    tenant = uuid.uuid4().hex[:12]
    try:
        before = await client.xlen(STREAM)
        # More than one batch (128): the first goes at once, the rest on drain.
        for n in range(200):
            ledger.submit(UsageRecord(tenant, "k1", "tiny-gpt", "live", 1, n % 2, 0, "miss", 10, 1))
        await ledger.drain()
        assert await client.xlen(STREAM) == before + 200
        today = ledger.today()
        totals = (await ledger.usage(tenant, today, today))[("k1", "tiny-gpt")]
        assert (totals["requests"], totals["prompt_tokens"], totals["completion_tokens"]) == (200, 200, 100)
        assert totals["cost_nano_usd"] == 2000
        # A few records wait for the flush timer, not for a full batch.
        ledger.submit(UsageRecord(tenant, "k2", "tiny-gpt", "live", 5, 5, 0, "miss", 0, 1))
        deadline = asyncio.get_running_loop().time() + 5
        while ("k2", "tiny-gpt") not in await ledger.usage(tenant, today, today):
            assert asyncio.get_running_loop().time() < deadline, "a lone record was never written"
            await asyncio.sleep(0.01)
    finally:
        await client.aclose()


@pytest.mark.parametrize("split_by_slot", [False, True])
async def test_records_kept_out_of_the_log_count_in_the_totals_only(redis_url, split_by_slot):
    """Turns refused at admission (admission.TurnAdmission.refused): a tenant
    hammering past its limit must not fill the log, whose length bounds every
    tenant's records, yet GetUsage counts its refusals."""
    client = redis_access.connect(redis_url)
    ledger = Ledger(client, stream_max_len=10_000, retention_days=2, split_by_slot=split_by_slot)
    tenant = uuid.uuid4().hex[:12]
    try:
        before = await client.xlen(STREAM)
        ledger.submit(UsageRecord(tenant, "k1", "tiny-gpt", "live", 3, 4, 0, "miss", 10, 1))
        for _ in range(5):
            refused = UsageRecord(tenant, "k1", "tiny-gpt", "", 0, 0, 0, "none", 0, 0, "RATE_LIMITED")
            ledger.submit(refused, logged=False)
        await ledger.drain()
        assert await client.xlen(STREAM) == before + 1
        today = ledger.today()
        totals = (await ledger.usage(tenant, today, today))[("k1", "tiny-gpt")]
        assert (totals["requests"], totals["failures"], totals["prompt_tokens"]) == (6, 5, 3)
    finally:
        await client.aclose()


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_a_summary_take_written_again_is_billed_once(redis_url, split_by_slot):
    """A take of a session's summaries' usage is written once per take id
    (Ledger.record_take): written again (the take offered again to another
    router, its taker dead after its write and before its acknowledgement),
    it adds nothing to the totals or the log, and says so; another take's
    records are written. On a cluster, the log's call and the totals' are
    each marked in their own slot."""
    client = redis_access.connect(redis_url)
    ledger = Ledger(client, stream_max_len=10_000, retention_days=2, split_by_slot=split_by_slot)
    tenant = uuid.uuid4().hex[:12]
    summaries = [
        UsageRecord(tenant, "k1", "m1", "", 300, 30, 0, SUMMARY_USAGE, 360, 0, summaries=2),
        UsageRecord(tenant, "k1", "m2", "", 40, 4, 0, SUMMARY_USAGE, 48, 0, summaries=1),
    ]
    try:
        before = await client.xlen(STREAM)
        assert await ledger.record_take("take-1", summaries)
        assert not await ledger.record_take("take-1", summaries)
        assert await client.xlen(STREAM) == before + 2
        today = ledger.today()
        totals = await ledger.usage(tenant, today, today)
        assert (totals[("k1", "m1")]["summaries"], totals[("k1", "m1")]["summary_prompt_tokens"]) == (2, 300)
        assert (totals[("k1", "m2")]["summaries"], totals[("k1", "m2")]["cost_nano_usd"]) == (1, 48)
        assert await ledger.record_take("take-2", summaries[:1])
        assert (await ledger.usage(tenant, today, today))[("k1", "m1")]["summaries"] == 4
        assert await client.xlen(STREAM) == before + 3
        # The markers expire: kept a day, not forever.
        marker = f"mg:router:usage:{{t:{tenant}}}:take:take-1"
        assert 0 < await client.ttl(marker) <= TAKE_MARKER_TTL_S
    finally:
        await client.aclose()


async def test_totals_a_newer_replica_adds_a_metric_to_are_read_without_it(redis_url):
    """A bug hunt's finding: every field of a day's hash had to be a metric
    this replica knows, so during a rolling upgrade that adds one (as the
    summaries' did) the replicas not yet replaced failed GetUsage INTERNAL
    (a KeyError) for every tenant and day the new metric was written to."""
    client = redis_access.connect(redis_url)
    ledger = Ledger(client, stream_max_len=10_000, retention_days=2)
    tenant = uuid.uuid4().hex[:12]
    today = ledger.today()
    try:
        await ledger.record(UsageRecord(tenant, "k1", "tiny-gpt", "live", 40, 20, 0, "miss", 9_000, 120))
        # What a newer replica writes beside this one's metrics, and for a
        # model only it has recorded.
        await client.hincrby(day_key(tenant, f"{today:%Y-%m-%d}"), "k1|tiny-gpt|reasoning_tokens", 7)
        await client.hincrby(day_key(tenant, f"{today:%Y-%m-%d}"), "k1|new-model|reasoning_tokens", 7)
        totals = await ledger.usage(tenant, today, today)
        assert list(totals) == [("k1", "tiny-gpt")]
        assert totals[("k1", "tiny-gpt")]["prompt_tokens"] == 40
        assert set(totals[("k1", "tiny-gpt")]) == set(METRICS)
    finally:
        await client.aclose()


async def _turns_of(client, ledger: Ledger, tenant: str) -> tuple[int, int]:
    """A tenant's turns today, as GetUsage counts them (requests, over its
    keys and models), and its records in the log."""
    today = ledger.today()
    totals = await ledger.usage(tenant, today, today)
    logged = [
        fields
        for _, fields in await client.xrevrange(STREAM, count=10_000)
        if fields[b"tenant"] == tenant.encode()
    ]
    return sum(row["requests"] for row in totals.values()), len(logged)


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_a_record_whose_call_stalled_before_redis_ran_it_is_sent_again_and_written_once(
    redis_url, split_by_slot
):
    """A record sent on a connection that stalls (the proxy keeps the call
    from Redis) times out: it may have run, and was given up, since the
    script adds, so the turn was missing from GetUsage and the log for good
    (an undercharge). Written once per call (its mark), it is sent again and
    written; the stalled call reaching Redis late then writes nothing more."""
    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    proxied = redis_access.connect(f"redis://127.0.0.1:{await proxy.start()}/0", timeout_s=0.3)
    direct = redis_access.connect(redis_url)
    ledger = Ledger(proxied, stream_max_len=10_000, retention_days=2, split_by_slot=split_by_slot)
    tenant = uuid.uuid4().hex[:12]
    try:
        # Loads the script, so that the record's first send is its EVALSHA.
        await direct.script_load(ledger_module._RECORD)
        proxy.stall_when_sent(evalsha_marker(ledger_module._RECORD))
        await ledger.record(UsageRecord(tenant, "k1", "tiny-gpt", "live", 40, 20, 0, "miss", 9_000, 120))
        assert proxy.stalled == 1
        for _ in range(100):
            if await _turns_of(direct, ledger, tenant) == (1, 1):
                break
            await asyncio.sleep(0.1)
        assert await _turns_of(direct, ledger, tenant) == (1, 1)
        # The stalled call reaches Redis after all: nothing is written twice.
        await unstalled_and_run(proxy, direct)
        assert await _turns_of(direct, ledger, tenant) == (1, 1)
        await ledger.drain()
    finally:
        for client in (proxied, direct):
            await client.aclose()
        await proxy.close()


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_a_record_whose_reply_was_lost_after_redis_ran_it_is_counted_once(redis_url, split_by_slot):
    """A record whose call Redis ran but whose reply the proxy holds times
    out as the stalled one does, and is sent again: its mark, set by the
    run, makes the second run write nothing (the script adds: without the
    mark the turn would be counted twice)."""
    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    proxied = redis_access.connect(f"redis://127.0.0.1:{await proxy.start()}/0", timeout_s=0.3)
    direct = redis_access.connect(redis_url)
    ledger = Ledger(proxied, stream_max_len=10_000, retention_days=2, split_by_slot=split_by_slot)
    tenant = uuid.uuid4().hex[:12]
    try:
        await direct.script_load(ledger_module._RECORD)
        proxy.hold_when_sent(evalsha_marker(ledger_module._RECORD))
        calls = await evalsha_calls(direct)
        await ledger.record(UsageRecord(tenant, "k1", "tiny-gpt", "live", 40, 20, 0, "miss", 9_000, 120))
        # Sent again until Redis answers, not given up (a backlog that gave it
        # up after its first run would count the turn once too, and this test
        # would not see it): each call ran (split by slot: the log's and the
        # tenant's), and the one whose reply was held ran again.
        runs = calls + (2 if split_by_slot else 1) + 1
        for _ in range(100):
            if len(ledger._backlog) == 0 and await evalsha_calls(direct) >= runs:
                break
            await asyncio.sleep(0.1)
        assert len(ledger._backlog) == 0
        assert await evalsha_calls(direct) >= runs
        assert await _turns_of(direct, ledger, tenant) == (1, 1)
        await ledger.drain()
    finally:
        for client in (proxied, direct):
            await client.aclose()
        await proxy.close()
