"""The usage ledger against a real Redis: the log and the daily aggregates."""

from __future__ import annotations

import asyncio
import datetime
import uuid

import grpc
import pytest
import structlog

from meshgate import metrics, redis_access
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.router import ledger as ledger_module
from services.router.ledger import (
    METRICS,
    STREAM,
    SUMMARY_USAGE,
    TAKE_MARKER_TTL_S,
    Ledger,
    UsageRecord,
    day_key,
    marker,
    turn_marker,
)
from services.router.script_calls import WRITTEN_MARK_TTL_S, Skipped, run_scripts, skipped_in
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


def _deferred_writes(write: str, outcome: str) -> float:
    return metrics.router().deferred_writes.labels(write, outcome)._value.get()


async def _logged_for(client, tenant: str) -> int:
    return len(
        [
            fields
            for _, fields in await client.xrevrange(STREAM, count=10_000)
            if fields[b"tenant"] == tenant.encode()
        ]
    )


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_a_record_whose_key_holds_another_type_is_skipped_and_the_others_of_its_call_are_written(
    redis_url, split_by_slot
):
    """A review's finding: one tenant's day hash holding a string failed the
    call of up to 128 records WRONGTYPE at that tenant's record; Redis does
    not roll a script back, so the call's mark and the records before stayed
    written, and those after (other tenants') were lost when the call, sent
    again, found its mark and counted itself written. The broken record is
    now skipped whole (on a cluster, its totals' call: the log's is another
    slot's, and takes it), logged naming its tenant and key, counted given
    up; the others are written, and told written (the turn journal lets a
    turn go once its record is)."""
    client = redis_access.connect(redis_url)
    ledger = Ledger(client, stream_max_len=10_000, retention_days=2, split_by_slot=split_by_slot)
    broken, victim = f"broken-{uuid.uuid4().hex[:8]}", f"victim-{uuid.uuid4().hex[:8]}"
    today = ledger.today()
    try:
        await client.set(day_key(broken, f"{today:%Y-%m-%d}"), "not a hash")
        given_up = _deferred_writes("ledger", "given_up")
        written_late = _deferred_writes("ledger", "written_late")
        told: list[bool] = []
        with structlog.testing.capture_logs() as logged:
            ledger.submit(
                UsageRecord(broken, "kb", "tiny-gpt", "live", 10, 5, 0, "miss", 100, 10), True, told.append
            )
            ledger.submit(UsageRecord(victim, "kv", "tiny-gpt", "live", 40, 20, 0, "miss", 9_000, 120))
            ledger.submit(
                UsageRecord(
                    victim, "kv", "tiny-gpt", "live", 1, 2, 0, "miss", 30, 5, turn_id=uuid.uuid4().hex
                ),
                True,
                told.append,
            )
            await ledger.drain()
        totals = (await ledger.usage(victim, today, today))[("kv", "tiny-gpt")]
        assert (totals["requests"], totals["prompt_tokens"], totals["cost_nano_usd"]) == (2, 41, 9_030)
        assert await _logged_for(client, victim) == 2
        assert await client.get(day_key(broken, f"{today:%Y-%m-%d}")) == b"not a hash"
        # On one instance the record is one call, skipped whole; a cluster's
        # log call (its own slot) has no key of another type.
        assert await _logged_for(client, broken) == (1 if split_by_slot else 0)
        assert told == [True, True] and len(ledger._backlog) == 0
        assert _deferred_writes("ledger", "given_up") == given_up + 1
        assert _deferred_writes("ledger", "written_late") == written_late
        [line] = [line for line in logged if line["event"].startswith("a usage record was not written")]
        assert (line["tenant"], line["key_kind"], line["holds"]) == (broken, "usage totals", "string")
    finally:
        await client.aclose()


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_a_call_that_skipped_a_record_sent_again_writes_nothing_twice(redis_url, split_by_slot):
    """A call whose reply was lost is sent again (script_calls.Backlog,
    idempotent): one that skipped a record (a turn's mark holding a hash)
    and wrote the others writes nothing the second time, nor the skipped
    record once its key is mended (it was given up)."""
    client = redis_access.connect(redis_url)
    ledger = Ledger(client, stream_max_len=10_000, retention_days=2, split_by_slot=split_by_slot)
    broken, victim = f"broken-{uuid.uuid4().hex[:8]}", f"victim-{uuid.uuid4().hex[:8]}"
    turn = uuid.uuid4().hex
    today = ledger.today()
    records = [
        UsageRecord(broken, "kb", "tiny-gpt", "live", 10, 5, 0, "miss", 100, 10, turn_id=turn),
        UsageRecord(victim, "kv", "tiny-gpt", "live", 40, 20, 0, "miss", 9_000, 120),
    ]
    try:
        await client.hset(turn_marker(broken, turn), "not", "a string")
        call_id = uuid.uuid4().hex
        calls = ledger._calls(
            [(usage, True) for usage in records],
            lambda key: marker(key, f"written:{call_id}"),
            WRITTEN_MARK_TTL_S,
        )
        first = await run_scripts(ledger._script, calls)
        # The broken tenant's totals' call (the only one on one instance)
        # skipped its record, the call's first.
        assert [skipped for reply in first for skipped in skipped_in(reply)] == [
            Skipped(1, turn_marker(broken, turn), "hash")
        ]
        await client.delete(turn_marker(broken, turn))
        assert await run_scripts(ledger._script, calls) == [0] * len(calls)
        totals = (await ledger.usage(victim, today, today))[("kv", "tiny-gpt")]
        assert (totals["requests"], totals["prompt_tokens"]) == (1, 40)
        assert await _logged_for(client, victim) == 1
        assert await ledger.usage(broken, today, today) == {}
    finally:
        await client.aclose()


@pytest.mark.parametrize("total", ["not a number", "1.5", "007", "9" * 19])
async def test_a_record_whose_total_is_not_an_integer_is_skipped_and_the_others_of_its_call_are_written(
    redis_url, total
):
    """A tenant's day hash whose total is a string HINCRBY refuses (an
    operator's or a bug's write; 9 x 19: past int64, out of Redis's range) stopped
    the call midway, as a key of another type did: given up, with the
    other tenants' records of the call (up to 128). Now skipped as such a
    record is, the others written."""
    client = redis_access.connect(redis_url)
    ledger = Ledger(client, stream_max_len=10_000, retention_days=2)
    broken, victim = f"broken-{uuid.uuid4().hex[:8]}", f"victim-{uuid.uuid4().hex[:8]}"
    today = ledger.today()
    broken_day = day_key(broken, f"{today:%Y-%m-%d}")
    try:
        await client.hset(broken_day, "kb|tiny-gpt|latency_ms", total)
        given_up = _deferred_writes("ledger", "given_up")
        told: list[bool] = []
        with structlog.testing.capture_logs() as logged:
            ledger.submit(
                UsageRecord(broken, "kb", "tiny-gpt", "live", 10, 5, 0, "miss", 100, 10), True, told.append
            )
            victim_record = UsageRecord(victim, "kv", "tiny-gpt", "live", 40, 20, 0, "miss", 9_000, 120)
            ledger.submit(victim_record, True, told.append)
            await ledger.drain()
        assert told == [True, True]
        totals = (await ledger.usage(victim, today, today))[("kv", "tiny-gpt")]
        assert (totals["requests"], totals["prompt_tokens"], totals["cost_nano_usd"]) == (1, 40, 9_000)
        assert await client.hgetall(broken_day) == {b"kb|tiny-gpt|latency_ms": total.encode()}
        assert _deferred_writes("ledger", "given_up") == given_up + 1
        [line] = [line for line in logged if line["event"].startswith("a usage record was not written")]
        assert (line["tenant"], line["key_kind"], line["holds"]) == (
            broken,
            "usage totals",
            "hash, kb|tiny-gpt|latency_ms not an integer",
        )
    finally:
        await client.aclose()


@pytest.mark.parametrize("total", ["0", "-5", "9" * 18, "1" * 19])
async def test_integer_totals_of_every_form_redis_writes_are_added_to(redis_url, total):
    """The other side of not_counter: what HINCRBY writes (0, negatives, 18
    and 19 digits within int64) is a total, added to and read back (a final
    read: an 18-digit total the ledger grew to 19 was refused as unreadable)."""
    client = redis_access.connect(redis_url)
    ledger = Ledger(client, stream_max_len=10_000, retention_days=2)
    tenant = f"odd-{uuid.uuid4().hex[:8]}"
    today = ledger.today()
    try:
        await client.hset(day_key(tenant, f"{today:%Y-%m-%d}"), "k|tiny-gpt|latency_ms", total)
        told: list[bool] = []
        record = UsageRecord(tenant, "k", "tiny-gpt", "live", 10, 5, 0, "miss", 100, 7)
        ledger.submit(record, True, told.append)
        await ledger.drain()
        assert told == [True]
        totals = (await ledger.usage(tenant, today, today))[("k", "tiny-gpt")]
        assert (totals["requests"], totals["latency_ms"]) == (1, int(total) + 7)
    finally:
        await client.aclose()


async def test_a_call_that_stopped_midway_in_redis_is_given_up_not_counted_written(redis_url):
    """A failure midway no check foresees (here a record's own amount out of
    Redis's integer range: HINCRBY fails) leaves the call's mark begun, not
    written: the call sent again says so, and is given up and told not
    written, not counted written_late as before (when the records after the
    failure were lost and the log said they were written)."""
    client = redis_access.connect(redis_url)
    ledger = Ledger(client, stream_max_len=10_000, retention_days=2)
    broken, victim = f"broken-{uuid.uuid4().hex[:8]}", f"victim-{uuid.uuid4().hex[:8]}"
    try:
        given_up = _deferred_writes("ledger", "given_up")
        written_late = _deferred_writes("ledger", "written_late")
        told: list[bool] = []
        with structlog.testing.capture_logs() as logged:
            ledger.submit(
                UsageRecord(broken, "kb", "tiny-gpt", "live", 10, 5, 0, "miss", 2**64, 10), True, told.append
            )
            ledger.submit(UsageRecord(victim, "kv", "tiny-gpt", "live", 40, 20, 0, "miss", 9_000, 120))
            for _ in range(100):  # past the first retry (0.5 s)
                if told:
                    break
                await asyncio.sleep(0.05)
            await ledger.drain()
        assert told == [False]
        assert _deferred_writes("ledger", "given_up") == given_up + 1
        assert _deferred_writes("ledger", "written_late") == written_late
        [line] = [line for line in logged if line["event"] == "usage writes given up"]
        assert "stopped midway" in line["why"] and "not an integer" in line["why"]
        assert not [line for line in logged if line["event"] == "held usage writes written"]
    finally:
        await client.aclose()


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_a_claim_bills_the_turns_of_a_journal_around_one_whose_key_holds_another_type(
    redis_url, split_by_slot
):
    """A claim of a lost router's journal (Ledger.record_claim) writes many
    tenants' turns in one call: a turn whose mark held another type failed
    it WRONGTYPE, the claim raised, and every claim after it failed alike
    (the journal kept, its turns after the broken one never billed, until it
    expired). The broken turn is skipped, the others billed, no raise."""
    client = redis_access.connect(redis_url)
    ledger = Ledger(client, stream_max_len=10_000, retention_days=2, split_by_slot=split_by_slot)
    broken, victim = f"broken-{uuid.uuid4().hex[:8]}", f"victim-{uuid.uuid4().hex[:8]}"
    broken_turn, victim_turn = uuid.uuid4().hex, uuid.uuid4().hex
    today = ledger.today()
    try:
        await client.hset(turn_marker(broken, broken_turn), "not", "a string")
        with structlog.testing.capture_logs() as logged:
            await ledger.record_claim(
                [
                    UsageRecord(
                        broken,
                        "kb",
                        "tiny-gpt",
                        "live",
                        10,
                        5,
                        0,
                        "miss",
                        100,
                        10,
                        "router_lost",
                        turn_id=broken_turn,
                    ),
                    UsageRecord(
                        victim,
                        "kv",
                        "tiny-gpt",
                        "live",
                        4,
                        2,
                        0,
                        "miss",
                        90,
                        10,
                        "router_lost",
                        turn_id=victim_turn,
                    ),
                ]
            )
        totals = (await ledger.usage(victim, today, today))[("kv", "tiny-gpt")]
        assert (totals["requests"], totals["failures"], totals["prompt_tokens"]) == (1, 1, 4)
        assert await client.exists(turn_marker(victim, victim_turn))
        assert await ledger.usage(broken, today, today) == {}
        [line] = [line for line in logged if line["event"].startswith("a usage record was not written")]
        assert (line["tenant"], line["key_kind"], line["turn_id"]) == (broken, "turn mark", broken_turn)
    finally:
        await client.aclose()


@pytest.mark.parametrize("broken", ["another type", "12abc", "007", "9" * 19])
async def test_totals_that_cannot_be_read_are_refused_failed_precondition_naming_the_key(redis_url, broken):
    """A day's totals key of another type (or a total that is not an
    integer) failed GetUsage UNAVAILABLE REDIS_UNAVAILABLE (or INTERNAL on
    int()), which told the caller to retry what no retry mends. Now
    FAILED_PRECONDITION USAGE_TOTALS_UNREADABLE naming the key; a field the
    router never writes is left out as a newer replica's metric is."""
    client = redis_access.connect(redis_url)
    ledger = Ledger(client, stream_max_len=10_000, retention_days=2)
    tenant = f"unreadable-{uuid.uuid4().hex[:8]}"
    today = ledger.today()
    key = day_key(tenant, f"{today:%Y-%m-%d}")
    try:
        await client.hset(key, mapping={"k|tiny-gpt|requests": 3, "no bar at all": 1, "k|m|newer_metric": 5})
        assert (await ledger.usage(tenant, today, today))[("k", "tiny-gpt")]["requests"] == 3
        if broken == "another type":
            await client.delete(key)
            await client.set(key, "not a hash")
        else:
            # What the writers' not_counter skips reads so too (a final read:
            # "007" was read as a total that no longer grew).
            await client.hset(key, "k|tiny-gpt|prompt_tokens", broken)
        with pytest.raises(MeshgateError) as refused:
            await ledger.usage(tenant, today, today)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.reason == Reason.USAGE_TOTALS_UNREADABLE
        assert refused.value.metadata["key"] == key
    finally:
        await client.aclose()
