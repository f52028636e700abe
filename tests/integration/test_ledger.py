"""The usage ledger against a real Redis: the log and the daily aggregates."""

from __future__ import annotations

import datetime
import uuid

import pytest

from meshgate import redis_access
from services.router.ledger import STREAM, Ledger, UsageRecord

pytestmark = pytest.mark.integration


async def test_turns_are_logged_and_aggregated_per_key_model_and_day(redis_url):
    client = redis_access.connect(redis_url)
    now = [datetime.datetime(2026, 5, 1, 23, 59, tzinfo=datetime.UTC).timestamp()]
    ledger = Ledger(client, stream_max_len=10_000, retention_days=2, clock=lambda: now[0])
    tenant = uuid.uuid4().hex[:12]
    try:
        before = await client.xlen(STREAM)
        completed = UsageRecord(tenant, "k1", "tiny-gpt", "live", 40, 20, 0, "miss", 9_000, 120)
        hit = UsageRecord(tenant, "k1", "tiny-gpt", "live", 0, 0, 60, "exact_hit", 900, 5)
        failed = UsageRecord(tenant, "k2", "tiny-gpt", "live", 0, 3, 0, "miss", 0, 50, "DEADLINE_EXCEEDED")
        for record in (completed, hit, failed):
            await ledger.record(record)
        now[0] += 120  # the next UTC day
        await ledger.record(completed)
        assert await client.xlen(STREAM) == before + 4
        last = (await client.xrevrange(STREAM, count=1))[0][1]
        assert last[b"tenant"] == tenant.encode() and last[b"prompt_tokens"] == b"40"

        may_1, may_2 = datetime.date(2026, 5, 1), datetime.date(2026, 5, 2)
        first_day = await ledger.usage(tenant, may_1, may_1)
        assert first_day[("k1", "tiny-gpt")] == {
            "requests": 2,
            "failures": 0,
            "cache_hits": 1,
            "prompt_tokens": 40,
            "completion_tokens": 20,
            "saved_tokens": 60,
            "cost_nano_usd": 9_900,
            "latency_ms": 125,
        }
        assert first_day[("k2", "tiny-gpt")]["failures"] == 1
        both = await ledger.usage(tenant, may_1, may_2)
        assert both[("k1", "tiny-gpt")]["requests"] == 3
        assert both[("k1", "tiny-gpt")]["prompt_tokens"] == 80
        # Kept for the retention period, not forever.
        assert 0 < await client.ttl(f"mg:router:usage:{tenant}:2026-05-01") <= 2 * 24 * 3600
        assert await ledger.usage(uuid.uuid4().hex, may_1, may_2) == {}
    finally:
        await client.aclose()
