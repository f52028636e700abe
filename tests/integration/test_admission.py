"""Admission control against a real Redis: exact limits shared by replicas,
reservations settled, budgets rolling over, Redis outages per policy."""

from __future__ import annotations

import asyncio
import datetime
import types
import uuid

import grpc
import pytest
import redis
import structlog
from google.rpc import error_details_pb2

from meshgate import metrics, redis_access, tokenization
from meshgate.common.v1 import common_pb2
from meshgate.config import LimitSettings, ModelSettings, PriceSettings, RouterSettings, Settings
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as router_pb
from services.router import admission as admission_module
from services.router.admission import Admission, Scope, TurnAdmission
from services.router.auth import Tenant
from services.router.ledger import SUMMARY_USAGE, Ledger, UsageRecord
from services.router.pipeline import (
    Answer,
    Appended,
    Assembly,
    Budget,
    CacheStatus,
    Completion,
    Failure,
    Outcome,
    Pipeline,
    SummarySpend,
)
from services.router.prompt_bound import prompt_bounds
from services.router.script_calls import Skipped, skipped_in
from tests.clocks import Clock
from tests.tcp_proxy import TcpProxy, evalsha_calls, evalsha_marker, unstalled_and_run

pytestmark = pytest.mark.integration


def _scope(**limits) -> Scope:
    # A fresh id per test: tests share one Redis.
    return Scope("tenant", uuid.uuid4().hex[:12], LimitSettings(**limits))


def _details(error: MeshgateError):
    status = error.to_status_proto()
    found = {}
    for detail in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.QuotaFailure,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.__name__] = message
    return found


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_four_replicas_admit_exactly_the_limit(redis_url, split_by_slot):
    """Four admission controllers on their own connections, as four router
    replicas are, hammer one requests-per-minute and one tokens-per-minute
    limit concurrently: the admitted amount is the limit, never more. With
    a Redis Cluster's split too (a turn's tenant and model in two calls,
    refunded where the other refused)."""
    rpm_scope = _scope(requests_per_minute=200)
    tpm_scope = Scope("model", uuid.uuid4().hex[:12], LimitSettings(tokens_per_minute=5_000))
    clients = [redis_access.connect(redis_url) for _ in range(4)]
    replicas = [Admission(client, max_generation_s=60, split_by_slot=split_by_slot) for client in clients]
    admitted_requests = 0
    admitted_tokens = 0

    async def hammer(admission: Admission, scope: Scope, tokens: int) -> None:
        nonlocal admitted_requests, admitted_tokens
        for _ in range(150):
            try:
                await admission.admit([scope], prompt_tokens=tokens - 1, max_tokens=1, price=None)
            except MeshgateError as error:
                assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                continue
            if scope is rpm_scope:
                admitted_requests += 1
            else:
                admitted_tokens += tokens

    try:
        await asyncio.gather(
            *(hammer(replica, rpm_scope, 1) for replica in replicas),
            *(hammer(replica, tpm_scope, 13) for replica in replicas),
        )
    finally:
        for client in clients:
            await client.aclose()
    # 600 requests against 200, 600 turns of 13 tokens against 5000: well
    # within one minute, so the windows admit exactly their limits.
    assert admitted_requests == 200
    assert admitted_tokens == 5_000 // 13 * 13


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_an_admitted_turn_says_what_each_window_holds_and_when_it_frees(redis_client, split_by_slot):
    """What the HTTP edge's x-ratelimit-* headers say: each per-minute
    window of the turn's scopes, its use with the turn's charge (tokens as
    reserved) and when its oldest entry leaves; the time is Redis's own
    arithmetic on the router's clock."""
    clock = Clock(1_800_000_000.0)
    admission = Admission(redis_client, max_generation_s=60, clock=clock, split_by_slot=split_by_slot)
    tenant = _scope(requests_per_minute=10, tokens_per_minute=1_000, concurrent_streams=5)
    model = Scope("model", uuid.uuid4().hex[:12], LimitSettings(requests_per_minute=3))
    first = await admission.admit([tenant, model], 30, 20, None)
    assert sorted((w.scope, w.limit, w.value, w.used, w.frees_in_ms) for w in first.windows) == [
        ("model", "requests_per_minute", 3, 1, 60_000),
        ("tenant", "requests_per_minute", 10, 1, 60_000),
        ("tenant", "tokens_per_minute", 1_000, 50, 60_000),
    ]
    clock.now += 12.5
    second = await admission.admit([tenant, model], 10, 20, None)
    by_name = {(w.scope, w.limit): w for w in second.windows}
    assert by_name[("model", "requests_per_minute")].remaining == 1
    assert by_name[("tenant", "tokens_per_minute")].used == 80
    # The oldest entry, the first turn's, leaves 47.5 s from now.
    assert {w.frees_in_ms for w in second.windows} == {47_500}
    # A budget or a stream cap is no window: none of those is said.
    budgets = _scope(tokens_per_day=1_000, concurrent_streams=2)
    assert (await admission.admit([budgets], 1, 1, None)).windows == ()


async def test_a_top_up_a_refusal_and_a_turn_of_no_use_keep_the_windows_told_true(redis_client):
    """A review's three (`/tmp/rev_rl48/`): the windows a session turn's
    top-up grew are told as grown (they were told as admitted: the caller
    read 890 left where 400 were, and its next turn was refused); a window's
    refusal says what it still holds for a smaller turn (it said 0); and a
    turn settled to nothing leaves the window, so the reset told is when a
    paying entry leaves (it was a 0-cost entry's, freeing nothing)."""
    clock = Clock(1_800_000_000.0)
    admission = Admission(redis_client, max_generation_s=60, clock=clock)
    scope = _scope(tokens_per_minute=1_000)
    grant = await admission.admit([scope], 100, 10, None)
    await admission.top_up(grant, tokens=600, nano_usd=0)
    (window,) = grant.windows
    assert (window.used, window.remaining) == (600, 400)
    with pytest.raises(MeshgateError) as refused:
        await admission.admit([scope], 440, 10, None)
    assert refused.value.metadata["limit_remaining"] == "400"
    # The first turn ends having used nothing (it failed before any output).
    await admission.settle(grant, 0, 0)
    clock.now += 10
    second = await admission.admit([scope], 190, 10, None)
    (window,) = second.windows
    # Its own entry is the oldest left: a minute from now, not 50 s.
    assert (window.used, window.frees_in_ms) == (200, 60_000)


async def test_a_refusal_names_the_limit_with_quota_failure_and_retry_info(redis_client):
    clock = Clock(1_800_000_000.0)
    admission = Admission(redis_client, max_generation_s=60, clock=clock)
    scope = _scope(requests_per_minute=2)
    for _ in range(2):
        await admission.admit([scope], 1, 1, None)
    with pytest.raises(MeshgateError) as refused:
        await admission.admit([scope], 1, 1, None)
    error = refused.value
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = _details(error)
    assert details["ErrorInfo"].reason == "RATE_LIMITED"
    assert details["ErrorInfo"].metadata["limit"] == "requests_per_minute"
    assert details["QuotaFailure"].violations[0].subject == f"tenant:{scope.id}"
    # Both went in at once: the window has room again a minute later.
    assert details["RetryInfo"].retry_delay.ToMilliseconds() == 60_000
    clock.now += 59.9
    with pytest.raises(MeshgateError):
        await admission.admit([scope], 1, 1, None)
    clock.now += 0.1
    await admission.admit([scope], 1, 1, None)


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_a_refused_turn_charges_no_scope(redis_client, split_by_slot):
    """Nothing half-applied: the tenant's limit admits, the model's refuses,
    and the tenant's window is left as it was (on a cluster: refunded)."""
    clock = Clock(1_800_000_000.0)
    admission = Admission(redis_client, max_generation_s=60, clock=clock, split_by_slot=split_by_slot)
    tenant = _scope(requests_per_minute=1)
    full_model = Scope("model", uuid.uuid4().hex[:12], LimitSettings(concurrent_streams=1))
    held = await admission.admit([full_model], 1, 1, None)
    with pytest.raises(MeshgateError) as refused:
        await admission.admit([tenant, full_model], 1, 1, None)
    assert refused.value.metadata["limit"] == "concurrent_streams"
    await admission.settle(held, 2, 0)
    # The tenant's single request per minute is still unspent.
    await admission.admit([tenant, full_model], 1, 1, None)


async def test_token_reservations_settle_to_real_usage(redis_client):
    clock = Clock(1_800_000_000.0)
    admission = Admission(redis_client, max_generation_s=60, clock=clock)
    scope = _scope(tokens_per_minute=100, tokens_per_day=1_000, concurrent_streams=1)
    reservation = await admission.admit([scope], prompt_tokens=10, max_tokens=80)
    # 90 reserved: another 20 do not fit in the minute, nor a second stream.
    with pytest.raises(MeshgateError):
        await admission.admit([scope], prompt_tokens=10, max_tokens=10)
    await admission.settle(reservation, tokens=15, nano_usd=0)
    # Settled to 15: 85 free again, and the stream is released.
    second = await admission.admit([scope], prompt_tokens=5, max_tokens=80)
    await admission.settle(second, tokens=85, nano_usd=0)
    day_key = f"{scope.prefix}:tokens:day:{datetime.datetime.fromtimestamp(clock.now, datetime.UTC):%Y-%m-%d}"
    assert int(await redis_client.get(day_key)) == 100
    # Settling twice changes nothing.
    await admission.settle(second, tokens=0, nano_usd=0)
    assert int(await redis_client.get(day_key)) == 100


async def test_budgets_refuse_when_spent_and_roll_over_at_the_period_end(redis_client):
    clock = Clock(datetime.datetime(2026, 3, 31, 23, 59, 0, tzinfo=datetime.UTC).timestamp())
    admission = Admission(redis_client, max_generation_s=60, clock=clock)
    price = PriceSettings(prompt_usd_per_million=1_000.0, completion_usd_per_million=1_000.0)
    scope = _scope(tokens_per_day=100, cost_usd_per_month=0.15)
    spent = await admission.admit([scope], prompt_tokens=50, max_tokens=50, price=price)
    await admission.settle(spent, tokens=100, nano_usd=100_000_000)
    with pytest.raises(MeshgateError) as refused:
        await admission.admit([scope], 1, 1, price)
    details = _details(refused.value)
    assert details["ErrorInfo"].reason == "BUDGET_EXHAUSTED"
    assert details["ErrorInfo"].metadata["limit"] == "tokens_per_day"
    assert details["RetryInfo"].retry_delay.seconds == 60
    # Past midnight UTC: a new day and a new month, both budgets fresh.
    clock.now += 61
    fresh = await admission.admit([scope], prompt_tokens=50, max_tokens=50, price=price)
    await admission.settle(fresh, tokens=10, nano_usd=100_000_000)
    # 60 more tokens fit the day (10 used), but not their 0.06 USD the
    # month's 0.15 (0.1 spent).
    with pytest.raises(MeshgateError) as refused:
        await admission.admit([scope], prompt_tokens=30, max_tokens=30, price=price)
    assert refused.value.metadata["limit"] == "cost_usd_per_month"


async def test_a_request_larger_than_a_limit_is_refused_without_retry(redis_client):
    admission = Admission(redis_client, max_generation_s=60)
    scope = _scope(tokens_per_minute=50)
    with pytest.raises(MeshgateError) as refused:
        await admission.admit([scope], prompt_tokens=10, max_tokens=64)
    details = _details(refused.value)
    assert details["ErrorInfo"].reason == "REQUEST_EXCEEDS_LIMIT"
    assert "RetryInfo" not in details


async def test_redis_outage_fails_open_unless_the_limit_fails_closed():
    dead = redis_access.connect("redis://127.0.0.1:1/0")
    try:
        admission = Admission(dead, max_generation_s=60)
        opened = await admission.admit([_scope(requests_per_minute=1)], 1, 1)
        assert opened.checks == ()
        await admission.settle(opened, 2, 0)
        closed = _scope(requests_per_minute=1, cost_usd_per_day=1.0, fail_closed=["cost_usd_per_day"])
        with pytest.raises(MeshgateError) as refused:
            await admission.admit([closed], 1, 1)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert refused.value.reason == "LIMITS_UNAVAILABLE"
        assert refused.value.metadata["limit"] == "cost_usd_per_day"
    finally:
        await dead.aclose()


async def test_a_turn_admitted_while_redis_was_unreachable_is_charged_its_use_when_it_settles(
    redis_client, monkeypatch
):
    """Fail open admitted it with no checks and its settlement charged
    nothing: its use reached the ledger but no budget, and a tenant held to
    1,000 tokens a day used 1,200 (a bug hunt's repro)."""
    clock = Clock(datetime.datetime(2026, 5, 31, 12, 0, 0, tzinfo=datetime.UTC).timestamp())
    admission = Admission(redis_client, max_generation_s=60, clock=clock)
    scope = _scope(tokens_per_day=1000)
    key = f"{scope.prefix}:tokens:day:2026-05-31"
    admit_in_redis = admission._admit_or_refuse

    async def unreachable(*args, **kwargs):
        # As redis-py fails a connect Redis refuses: the script never ran.
        try:
            raise ConnectionRefusedError(111, "Connect call failed")
        except ConnectionRefusedError:
            raise redis.exceptions.ConnectionError("Error 111 connecting: Connection refused") from None

    monkeypatch.setattr(admission, "_admit_or_refuse", unreachable)
    opened = await admission.admit([scope], prompt_tokens=100, max_tokens=300)
    monkeypatch.setattr(admission, "_admit_or_refuse", admit_in_redis)
    assert opened.unchecked and opened.reserved_tokens == 0
    # Redis is back when the turn ends: its whole use is charged, kept to the
    # day's end (and its grace), the key made anew as no turn made it today.
    await admission.settle(opened, 400, 0)
    assert int(await redis_client.get(key)) == 400
    # 12 hours of the day left, and the budgets' grace.
    assert 12 * 3600 <= await redis_client.ttl(key) <= 12 * 3600 + admission_module._BUDGET_GRACE_S
    second = await admission.admit([scope], prompt_tokens=100, max_tokens=300)
    await admission.settle(second, 400, 0)
    with pytest.raises(MeshgateError) as refused:
        await admission.admit([scope], prompt_tokens=100, max_tokens=300)
    assert refused.value.reason == "BUDGET_EXHAUSTED"


async def test_a_turn_whose_admission_reply_was_lost_is_not_charged_twice_and_frees_its_stream(redis_url):
    """The admit's reply comes after the client's socket timeout (a proxy
    holds it back: Redis ran the script), and the turn is admitted failing
    open. Its budget's charge stands, the use not charged on top of it
    (1,300 for a turn that reserved 1,000 and used 300); its settlement
    frees the stream the script leased and moves its window's entry to the
    use: it had no checks, and the key's one stream stayed held for
    max_generation_s plus a minute (a bug hunt's repro, a SIGSTOPped Redis)."""
    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    proxied = redis_access.connect(f"redis://127.0.0.1:{await proxy.start()}/0", timeout_s=0.3)
    direct = redis_access.connect(redis_url)
    try:
        admission = Admission(proxied, max_generation_s=60)
        scope = _scope(tokens_per_day=5000, tokens_per_minute=5000, concurrent_streams=1)
        # Loads the script: a turn admitted and settled to nothing.
        await admission.settle(await admission.admit([scope], prompt_tokens=1, max_tokens=1), 0, 0)
        proxy.hold()
        opened = await admission.admit([scope], prompt_tokens=100, max_tokens=900)
        assert not opened.unchecked
        proxy.release()
        await admission.settle(opened, 300, 0)
        assert int(await direct.get(_day_key(scope))) == 1000
        assert await direct.zcard(f"{scope.prefix}:streams") == 0
        assert int(await direct.get(f"{scope.prefix}:tpm:sum")) == 300
    finally:
        for client in (proxied, direct):
            await client.aclose()
        await proxy.close()


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_a_fail_closed_turn_whose_admit_timed_out_after_redis_ran_it_keeps_no_charge(
    redis_url, split_by_slot
):
    """The admit's reply comes after the client's socket timeout (a proxy
    holds it back: Redis ran the script), so a limit failing closed refuses
    the turn UNAVAILABLE; what the script charged stood: its request and
    tokens in the windows for a minute, its reservation in the day's budget
    for good, and its stream lease for max_generation_s plus a minute, the
    key's next turn refused by concurrent_streams = 1 all that while. Also
    where the model's limits are in a call of their own (a Redis Cluster)."""
    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    proxied = redis_access.connect(f"redis://127.0.0.1:{await proxy.start()}/0", timeout_s=0.3)
    direct = redis_access.connect(redis_url)
    try:
        admission = Admission(proxied, max_generation_s=60, split_by_slot=split_by_slot)
        limits = {"requests_per_minute": 5, "concurrent_streams": 1, "tokens_per_day": 1_000}
        scope = _scope(**limits, fail_closed=["tokens_per_day"])
        model = Scope("model", uuid.uuid4().hex[:12], LimitSettings(tokens_per_day=1_000))
        # Loads the script: a turn admitted and settled to nothing.
        first = await admission.admit([scope, model], prompt_tokens=10, max_tokens=10)
        await admission.settle(first, 0, 0)
        proxy.hold()
        with pytest.raises(MeshgateError) as refused:
            await admission.admit([scope, model], prompt_tokens=10, max_tokens=10)
        assert refused.value.reason == "LIMITS_UNAVAILABLE"
        # Redis ran it: its stream is held.
        assert await direct.zcard(f"{scope.prefix}:streams") == 1
        proxy.release()
        await admission.drain()
        assert await direct.zcard(f"{scope.prefix}:streams") == 0
        assert int(await direct.get(_day_key(scope)) or 0) == 0
        assert int(await direct.get(_day_key(model)) or 0) == 0
        assert int(await direct.get(f"{scope.prefix}:rpm:sum")) == 1
        # The key's next turn gets the stream.
        await admission.settle(await admission.admit([scope, model], prompt_tokens=10, max_tokens=10), 0, 0)
    finally:
        for client in (proxied, direct):
            await client.aclose()
        await proxy.close()


async def test_a_fail_closed_admit_reaching_redis_after_its_release_charges_nothing(redis_url):
    """The release of a turn whose admit timed out may reach Redis first (the
    admit held up on its way): it finds nothing charged, and the admit,
    run after it, must then charge nothing either."""
    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    proxied = redis_access.connect(f"redis://127.0.0.1:{await proxy.start()}/0", timeout_s=0.3)
    direct = redis_access.connect(redis_url)
    try:
        admission = Admission(proxied, max_generation_s=60)
        scope = _scope(concurrent_streams=1, tokens_per_day=1_000, fail_closed=["concurrent_streams"])
        await admission.settle(await admission.admit([scope], prompt_tokens=10, max_tokens=10), 0, 0)
        proxy.stall_when_sent(admission._admit_script.sha.encode())
        with pytest.raises(MeshgateError) as refused:
            await admission.admit([scope], prompt_tokens=10, max_tokens=10)
        assert refused.value.reason == "LIMITS_UNAVAILABLE"
        await admission.drain()  # the release has run: nothing to give back yet
        admits_run = await evalsha_calls(direct)
        proxy.unstall()
        deadline = asyncio.get_running_loop().time() + 5
        while await evalsha_calls(direct) == admits_run:
            assert asyncio.get_running_loop().time() < deadline, "the held admit never reached Redis"
            await asyncio.sleep(0.01)
        assert await direct.zcard(f"{scope.prefix}:streams") == 0
        assert int(await direct.get(_day_key(scope)) or 0) == 0
    finally:
        for client in (proxied, direct):
            await client.aclose()
        await proxy.close()


async def test_a_turn_one_slot_refuses_while_anothers_admit_timed_out_keeps_no_charge(redis_url):
    """On a Redis Cluster the tenant's admit and the model's go to two
    slots: the model's budget refuses the turn while the tenant's call,
    which Redis ran, times out (its reply held back). Nobody is served, yet
    the tenant's charge stood: its stream for max_generation_s plus a
    minute (the key's next turn refused by concurrent_streams = 1), its
    reservation in the day's budget for good. No limit fails closed here."""
    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    proxied = redis_access.connect(f"redis://127.0.0.1:{await proxy.start()}/0", timeout_s=0.3)
    direct = redis_access.connect(redis_url)
    try:
        admission = Admission(proxied, max_generation_s=60, split_by_slot=True)
        scope = _scope(requests_per_minute=5, concurrent_streams=1, tokens_per_day=1_000)
        model = Scope("model", uuid.uuid4().hex[:12], LimitSettings(tokens_per_day=1_000))
        # Loads the script: a turn admitted and settled to nothing.
        await admission.settle(await admission.admit([scope, model], prompt_tokens=10, max_tokens=10), 0, 0)
        await admission.admit([model], prompt_tokens=900, max_tokens=90)  # another tenant's turn
        proxy.hold_when_sent(scope.id.encode())
        # The refusal sends the release of the tenant's call at once, on
        # another connection: held until the stream has been seen, or a
        # release that came first (seen on a loaded machine) left none to see.
        proxy.stall_when_sent(admission._releases._script.sha.encode())
        with pytest.raises(MeshgateError) as refused:
            await admission.admit([scope, model], prompt_tokens=10, max_tokens=10)
        assert (refused.value.reason, refused.value.metadata["scope"]) == (Reason.BUDGET_EXHAUSTED, "model")
        # Redis ran the tenant's call: its stream is held.
        assert await direct.zcard(f"{scope.prefix}:streams") == 1
        proxy.unstall()
        proxy.release()
        await admission.drain()
        assert await direct.zcard(f"{scope.prefix}:streams") == 0
        assert int(await direct.get(_day_key(scope)) or 0) == 0
        assert int(await direct.get(f"{scope.prefix}:rpm:sum")) == 1  # the first turn's
        assert int(await direct.get(_day_key(model))) == 990
        # The key's next turn gets the stream.
        await admission.settle(await admission.admit([scope], prompt_tokens=10, max_tokens=10), 0, 0)
    finally:
        for client in (proxied, direct):
            await client.aclose()
        await proxy.close()


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_a_fail_closed_turn_whose_top_up_timed_out_after_redis_ran_it_keeps_no_growth(
    redis_url, split_by_slot
):
    """A session turn's reservation grows to its history (top_up); the
    reply comes after the socket timeout (Redis ran it), so the limit
    failing closed refuses the turn UNAVAILABLE and it settles to nothing
    from what admission reserved. The growth stood: in the day's budget for
    good, and the window's entry (renamed to the grown cost, which the
    settlement no longer finds) for a minute."""
    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    proxied = redis_access.connect(f"redis://127.0.0.1:{await proxy.start()}/0", timeout_s=0.3)
    direct = redis_access.connect(redis_url)
    try:
        admission = Admission(proxied, max_generation_s=60, split_by_slot=split_by_slot)
        scope = _scope(tokens_per_minute=10_000, tokens_per_day=10_000, fail_closed=["tokens_per_day"])
        model = Scope("model", uuid.uuid4().hex[:12], LimitSettings(tokens_per_day=10_000))
        # Loads the scripts: a turn admitted, grown and settled to nothing.
        first = await admission.admit([scope, model], prompt_tokens=10, max_tokens=10)
        await admission.top_up(first, tokens=30, nano_usd=0)
        await admission.settle(first, 0, 0)
        grant = await admission.admit([scope, model], prompt_tokens=10, max_tokens=10)
        proxy.hold()
        with pytest.raises(MeshgateError) as refused:
            await admission.top_up(grant, tokens=500, nano_usd=0)
        assert refused.value.reason == "LIMITS_UNAVAILABLE"
        assert int(await direct.get(_day_key(scope))) == 500  # Redis ran it
        admission.settle_soon(grant, 0, 0)  # the pipeline's, for a turn refused so
        proxy.release()
        await admission.drain()
        for each in (scope, model):
            assert int(await direct.get(_day_key(each))) == 0
        assert int(await direct.get(f"{scope.prefix}:tpm:sum")) == 0
    finally:
        for client in (proxied, direct):
            await client.aclose()
        await proxy.close()


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_a_turn_failing_open_whose_top_up_timed_out_after_redis_ran_it_keeps_no_growth(
    redis_url, split_by_slot
):
    """A session turn's top-up times out after Redis ran it (its reply held
    back past the socket timeout) and no limit fails closed: the turn goes
    on with what admission reserved and settles from that. The growth
    stood: the day's budgets ended at the real use plus the growth (505 for
    25 used), and the window's entry, renamed to the grown cost, was missed
    by the settlement."""
    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    proxied = redis_access.connect(f"redis://127.0.0.1:{await proxy.start()}/0", timeout_s=0.3)
    direct = redis_access.connect(redis_url)
    try:
        admission = Admission(proxied, max_generation_s=60, split_by_slot=split_by_slot)
        scope = _scope(tokens_per_minute=10_000, tokens_per_day=10_000)
        model = Scope("model", uuid.uuid4().hex[:12], LimitSettings(tokens_per_day=10_000))
        # Loads the scripts: a turn admitted, grown and settled to nothing.
        first = await admission.admit([scope, model], prompt_tokens=10, max_tokens=10)
        await admission.top_up(first, tokens=30, nano_usd=0)
        await admission.settle(first, 0, 0)
        grant = await admission.admit([scope, model], prompt_tokens=10, max_tokens=10)
        proxy.hold()
        await admission.top_up(grant, tokens=500, nano_usd=0)  # fails open
        assert grant.reserved_tokens == 20
        assert int(await direct.get(_day_key(scope))) == 500  # Redis ran it
        proxy.release()
        admission.settle_soon(grant, 25, 0)
        await admission.drain()
        for each in (scope, model):
            assert int(await direct.get(_day_key(each))) == 25
        assert int(await direct.get(f"{scope.prefix}:tpm:sum")) == 25
    finally:
        for client in (proxied, direct):
            await client.aclose()
        await proxy.close()


@pytest.mark.parametrize(
    ("fail_closed", "used"),
    [([], 25), ([], 500), (["tokens_per_day"], 0)],
    ids=["fail-open-used-less", "fail-open-used-as-grown", "fail-closed-refused"],
)
async def test_a_top_ups_release_reaching_redis_after_the_turns_settlement_leaves_the_real_use(
    redis_url, fail_closed, used
):
    """A turn's top-up times out after Redis ran it, and its release is held
    up on its way (a stalled connection, run again later) until after the
    turn's settlement (failing open, from what admission reserved to its
    use; failing closed, refused, to nothing). The settlement missed the
    window's entry (renamed to the grown cost), and the release then moved
    it back to what admission reserved: the window held 20 tokens for a
    minute where the turn used 25 (or 500, or none). Budgets and window must
    end at the real use in this order too, also where it is the grown cost."""
    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    proxied = redis_access.connect(f"redis://127.0.0.1:{await proxy.start()}/0", timeout_s=0.3)
    direct = redis_access.connect(redis_url)
    try:
        admission = Admission(proxied, max_generation_s=60)
        scope = _scope(tokens_per_minute=10_000, tokens_per_day=10_000, fail_closed=fail_closed)
        # Loads the scripts: a turn admitted, grown and settled to nothing.
        first = await admission.admit([scope], prompt_tokens=10, max_tokens=10)
        await admission.top_up(first, tokens=30, nano_usd=0)
        await admission.settle(first, 0, 0)
        grant = await admission.admit([scope], prompt_tokens=10, max_tokens=10)
        proxy.stall_when_sent(evalsha_marker(admission_module._RELEASE))
        proxy.hold()
        try:
            await admission.top_up(grant, tokens=500, nano_usd=0)
        except MeshgateError as refused:
            assert fail_closed and refused.reason == "LIMITS_UNAVAILABLE"
        else:
            assert not fail_closed
        proxy.release()
        await admission.settle(grant, used, 0)
        # The release has not reached Redis: the growth is still charged.
        assert int(await direct.get(_day_key(scope))) == 500 + used - 20
        proxy.unstall()
        await admission.drain()
        assert int(await direct.get(_day_key(scope))) == used
        assert int(await direct.get(f"{scope.prefix}:tpm:sum")) == used
    finally:
        for client in (proxied, direct):
            await client.aclose()
        await proxy.close()


async def test_a_fail_closed_top_up_reaching_redis_after_its_release_grows_nothing(redis_url):
    """The top-up held up on its way times out, the turn is refused and its
    growth released before Redis has it: run after the release, it must
    not charge the growth (nothing would give it back)."""
    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    proxied = redis_access.connect(f"redis://127.0.0.1:{await proxy.start()}/0", timeout_s=0.3)
    direct = redis_access.connect(redis_url)
    try:
        admission = Admission(proxied, max_generation_s=60)
        scope = _scope(tokens_per_day=10_000, fail_closed=["tokens_per_day"])
        first = await admission.admit([scope], prompt_tokens=10, max_tokens=10)
        await admission.top_up(first, tokens=30, nano_usd=0)  # loads the script
        await admission.settle(first, 0, 0)
        grant = await admission.admit([scope], prompt_tokens=10, max_tokens=10)
        proxy.stall_when_sent(admission._top_up_script.sha.encode())
        with pytest.raises(MeshgateError) as refused:
            await admission.top_up(grant, tokens=500, nano_usd=0)
        assert refused.value.reason == "LIMITS_UNAVAILABLE"
        await admission.drain()  # the release has run: nothing grown yet
        calls_run = await evalsha_calls(direct)
        proxy.unstall()
        deadline = asyncio.get_running_loop().time() + 5
        while await evalsha_calls(direct) == calls_run:
            assert asyncio.get_running_loop().time() < deadline, "the held top-up never reached Redis"
            await asyncio.sleep(0.01)
        assert int(await direct.get(_day_key(scope))) == 20
        await admission.settle(grant, 0, 0)
        assert int(await direct.get(_day_key(scope))) == 0
    finally:
        for client in (proxied, direct):
            await client.aclose()
        await proxy.close()


async def test_a_top_up_one_slot_refuses_while_anothers_timed_out_is_refused_and_keeps_no_growth(redis_url):
    """On a Redis Cluster the tenant's top-up and the model's go to two
    slots: the model's budget refuses the growth while the tenant's call,
    which Redis ran, times out. The refusal stands (as at admission: a
    limit that refused wins over one that could not be checked), and the
    tenant's growth is given back; the turn had gone on failing open, past
    the model's spent budget, its growth charged to the tenant for good."""
    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    proxied = redis_access.connect(f"redis://127.0.0.1:{await proxy.start()}/0", timeout_s=0.3)
    direct = redis_access.connect(redis_url)
    try:
        admission = Admission(proxied, max_generation_s=60, split_by_slot=True)
        scope = _scope(tokens_per_day=10_000)
        model = Scope("model", uuid.uuid4().hex[:12], LimitSettings(tokens_per_day=500))
        first = await admission.admit([scope, model], prompt_tokens=10, max_tokens=10)
        await admission.top_up(first, tokens=30, nano_usd=0)  # loads the script
        await admission.settle(first, 0, 0)
        grant = await admission.admit([scope, model], prompt_tokens=10, max_tokens=10)
        await admission.admit([model], prompt_tokens=400, max_tokens=60)  # another tenant's turn
        proxy.hold_when_sent(scope.id.encode())
        # The release, sent as the refusal is raised, kept from Redis until
        # the growth is seen charged.
        proxy.stall_when_sent(evalsha_marker(admission_module._RELEASE))
        with pytest.raises(MeshgateError) as refused:
            await admission.top_up(grant, tokens=100, nano_usd=0)
        assert (refused.value.reason, refused.value.metadata["scope"]) == (Reason.BUDGET_EXHAUSTED, "model")
        assert int(await direct.get(_day_key(scope))) == 100  # Redis ran the tenant's
        proxy.unstall()
        proxy.release()
        await admission.drain()
        assert int(await direct.get(_day_key(scope))) == 20
        assert int(await direct.get(_day_key(model))) == 480
    finally:
        for client in (proxied, direct):
            await client.aclose()
        await proxy.close()


async def test_a_second_admit_after_a_streams_refusal_is_released_apart_from_the_first(
    redis_client, monkeypatch
):
    """On a Redis Cluster the first admit's model slot charged the turn while
    the tenant's refused it on its one stream: that charge was refunded, and
    its mark stood. The second admit's model call then timed out without
    running: its release took that old mark for its own and refunded the
    model's budget a second time (a review's repro: the holder's 20 tokens
    counted as 0)."""
    admission = Admission(redis_client, max_generation_s=60, split_by_slot=True)
    tenant = _scope(concurrent_streams=1)
    model = Scope("model", uuid.uuid4().hex[:12], LimitSettings(tokens_per_day=10_000))
    holder = await admission.admit([tenant, model], prompt_tokens=10, max_tokens=10)
    assert int(await redis_client.get(_day_key(model))) == 20
    run_scripts = admission_module.run_scripts
    tries = 0

    async def second_model_call_lost(script, calls, raise_on_error=True):
        nonlocal tries
        tries += 1
        if tries != 2:
            return await run_scripts(script, calls, raise_on_error)
        # The tenant's call runs; the model's is never sent, and times out.
        return [
            redis.exceptions.TimeoutError("Timeout reading from socket")
            if any(key.startswith(model.prefix) for key in keys)
            else (await run_scripts(script, [(keys, args)], raise_on_error=False))[0]
            for keys, args in calls
        ]

    monkeypatch.setattr(admission_module, "run_scripts", second_model_call_lost)
    with pytest.raises(MeshgateError):
        await admission.admit([tenant, model], prompt_tokens=10, max_tokens=10)
    monkeypatch.setattr(admission_module, "run_scripts", run_scripts)
    await admission.drain()
    assert tries == 2
    assert int(await redis_client.get(_day_key(model))) == 20
    # The holder's settlement then leaves its use, not less.
    await admission.settle(holder, 15, 0)
    await admission.flush()
    assert int(await redis_client.get(_day_key(model))) == 15


async def test_a_settlement_whose_call_stalled_before_redis_ran_it_is_sent_again_and_written_once(redis_url):
    """A turn's settlement sent on a connection that stalls (the proxy keeps
    the call from Redis) times out: it may have run, and was given up, so
    the turn's reservation stood in the day's budget for good (110 tokens
    for the 15 it used) and its stream lease for max_generation_s plus a
    minute, the key's next turn refused by concurrent_streams = 1 all that
    while. Settled once per turn, it is sent again and written; the stalled
    call reaching Redis late then writes nothing more."""
    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    proxied = redis_access.connect(f"redis://127.0.0.1:{await proxy.start()}/0", timeout_s=0.3)
    direct = redis_access.connect(redis_url)
    try:
        admission = Admission(proxied, max_generation_s=60)
        scope = _scope(concurrent_streams=1, tokens_per_day=1_000)
        # Loads the scripts: a turn admitted and settled to nothing.
        await admission.settle(await admission.admit([scope], prompt_tokens=10, max_tokens=10), 0, 0)
        turn = await admission.admit([scope], prompt_tokens=10, max_tokens=100)
        proxy.stall_when_sent(evalsha_marker(admission_module._SETTLE_ONCE))
        await admission.settle(turn, 15, 0)
        assert proxy.stalled == 1

        async def settled() -> bool:
            streams = await direct.zcard(f"{scope.prefix}:streams")
            return streams == 0 and int(await direct.get(_day_key(scope)) or 0) == 15

        for _ in range(100):
            if await settled():
                break
            await asyncio.sleep(0.1)
        assert await settled()
        # The stalled call reaches Redis after all: nothing is settled twice.
        await unstalled_and_run(proxy, direct)
        assert int(await direct.get(_day_key(scope))) == 15
        # The key's next turn gets the stream.
        await admission.settle(await admission.admit([scope], prompt_tokens=10, max_tokens=10), 0, 0)
    finally:
        for client in (proxied, direct):
            await client.aclose()
        await proxy.close()


async def test_a_turn_crossing_midnight_is_in_its_admission_days_budget_and_ledger(redis_client):
    """The budget took the admission's day and the ledger the day it was
    written: May's budget held a turn May's ledger did not show."""
    admitted_at = datetime.datetime(2026, 5, 31, 23, 59, 59, tzinfo=datetime.UTC).timestamp()
    ended_at = Clock(admitted_at + 6)
    settings = RouterSettings(prices={"tiny-gpt": PriceSettings(1.0, 1.0)})
    ledger = Ledger(redis_client, 1000, 30, clock=ended_at)
    stages = TurnAdmission(
        Admission(redis_client, max_generation_s=60, clock=Clock(admitted_at)), settings, ledger
    )
    turn = _turn(uuid.uuid4().hex[:12], max_tokens=80)
    turn.tenant = Tenant(turn.tenant.id, frozenset({"*"}), "k1", LimitSettings(tokens_per_month=10_000))
    grant = await stages.admit(turn)
    await stages.settle(grant, turn, _outcome(40, 60, "miss", delivered_bytes=4))
    await stages.drain()
    prefix = Scope("tenant", turn.tenant.id, turn.tenant.limits).prefix
    assert int(await redis_client.get(f"{prefix}:tokens:month:2026-05")) == 100
    may = await ledger.usage(turn.tenant.id, datetime.date(2026, 5, 31), datetime.date(2026, 5, 31))
    june = await ledger.usage(turn.tenant.id, datetime.date(2026, 6, 1), datetime.date(2026, 6, 1))
    assert may[("k1", "tiny-gpt")]["completion_tokens"] == 60 and not june


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_a_summary_take_the_ledger_holds_already_is_still_charged_to_the_budgets_once(
    redis_client, split_by_slot
):
    """A sweep's take (summary_usage.py) whose ledger write ran, its router
    then killed before the budgets' charge (batched) or its write's reply
    lost: offered again, the take found the ledger's marker set and charged
    the budgets nothing (the tenant's, the key's and the model's 0 tokens
    of 50), so the tenant could spend past them. Charged once, however
    often the take is offered."""
    model = f"summarizer-{uuid.uuid4().hex[:8]}"
    settings = RouterSettings(
        prices={model: PriceSettings(1.0, 2.0)}, model_limits={model: LimitSettings(tokens_per_day=10_000)}
    )
    budget = LimitSettings(tokens_per_day=10_000)
    tenant = Tenant(uuid.uuid4().hex[:12], frozenset({"*"}), "k1", budget, budget)
    ledger = Ledger(redis_client, 1000, 30, split_by_slot=split_by_slot)
    admission = Admission(redis_client, max_generation_s=60, split_by_slot=split_by_slot)
    stages = TurnAdmission(admission, settings, ledger)
    take_id = uuid.uuid4().hex
    # The dead router's write: the ledger holds the take; no budget was charged.
    written = UsageRecord(tenant.id, "k1", model, "", 40, 10, 0, SUMMARY_USAGE, 60, 0, summaries=1)
    assert await ledger.record_take(take_id, [written])
    for _ in range(2):  # offered to the next router, and again
        await stages.bill_summary_take(tenant, take_id, (SummarySpend(model, 40, 10, 1),))
    await stages.drain()
    day = f"{ledger.today():%Y-%m-%d}"
    for scope in (
        Scope("tenant", tenant.id, budget),
        Scope("key", "k1", budget, tenant.id),
        Scope("model", model, settings.model_limits[model]),
    ):
        assert int(await redis_client.get(f"{scope.prefix}:tokens:day:{day}") or 0) == 50, scope.kind
    totals = await ledger.usage(tenant.id, ledger.today(), ledger.today())
    assert totals[("k1", model)]["summaries"] == 1


async def test_a_turn_under_way_when_a_reload_changes_prices_is_billed_at_its_admissions(redis_client):
    """Prices apply from the next turn (docs/limits-and-usage.md, "Reload"): a turn admitted at
    $1 a million tokens and ending after a reload set $100 was billed 100
    times its reservation, to its budget and in the ledger."""
    clock = Clock(datetime.datetime(2026, 5, 12, 12, tzinfo=datetime.UTC).timestamp())
    ledger = Ledger(redis_client, 1000, 30, clock=clock)
    settings = RouterSettings(prices={"tiny-gpt": PriceSettings(1.0, 1.0)})
    stages = TurnAdmission(Admission(redis_client, max_generation_s=60, clock=clock), settings, ledger)
    turn = _turn(uuid.uuid4().hex[:12], max_tokens=80)
    turn.tenant = Tenant(turn.tenant.id, frozenset({"*"}), "k1", LimitSettings(cost_usd_per_day=1.0))
    grant = await stages.admit(turn)
    stages.reconfigure(RouterSettings(prices={"tiny-gpt": PriceSettings(100.0, 100.0)}))
    await stages.settle(grant, turn, _outcome(40, 60, "miss", delivered_bytes=4))
    await stages.drain()
    # 100 tokens at $1 a million: 100,000 billionths of a dollar.
    prefix = Scope("tenant", turn.tenant.id, turn.tenant.limits).prefix
    assert int(await redis_client.get(f"{prefix}:cost:day:2026-05-12")) == 100_000
    day = datetime.date(2026, 5, 12)
    assert (await ledger.usage(turn.tenant.id, day, day))[("k1", "tiny-gpt")]["cost_nano_usd"] == 100_000
    # The next turn is admitted, and billed, at the reloaded prices.
    grant = await stages.admit(turn)
    await stages.settle(grant, turn, _outcome(40, 60, "miss", delivered_bytes=4))
    await stages.drain()
    assert int(await redis_client.get(f"{prefix}:cost:day:2026-05-12")) == 100_000 + 10_000_000


# What tiny-gpt's chat template adds to a one-message prompt, at most (its
# bytes: prompt_bound.py), which admission reserves with the content.
_TINY_GPT_TEMPLATE_BYTES = prompt_bounds({"tiny-gpt": ModelSettings()})["tiny-gpt"].template_bytes(1)


def _turn(tenant_id: str, max_tokens: int):
    tenant = Tenant(
        tenant_id,
        frozenset({"*"}),
        "k" + tenant_id,
        LimitSettings(tokens_per_minute=150, concurrent_streams=1),
    )
    messages = [common_pb2.Message(role=common_pb2.ROLE_USER, content="0123456789")]
    return types.SimpleNamespace(
        tenant=tenant, model_alias="tiny-gpt", model=ModelSettings(), messages=messages, max_tokens=max_tokens
    )


def _outcome(
    prompt: int,
    completion: int,
    status: str | None,
    failure: str | None = None,
    cancelled: bool = False,
    delivered_bytes: int = 0,
    delivered_tokens: int | None = None,
) -> Outcome:
    answer = Answer(prompt_tokens=prompt, completion_tokens=completion)
    cache_status = CacheStatus(status) if status else None
    return Outcome(answer, cache_status, 0.1, failure, cancelled, delivered_bytes, delivered_tokens)


@pytest.mark.parametrize(
    ("outcome", "charged"),
    [
        (_outcome(12, 30, "miss", delivered_bytes=4), 42),  # completed
        # The count came with the completion, then the save failed.
        (_outcome(12, 30, "miss", failure="DOWNSTREAM_FAILED", delivered_bytes=4), 42),
        # Failed midway: the 10 prompt bytes reserved, and the tokens the
        # failure says were delivered.
        (_outcome(0, 0, None, failure="TRITON_FAILED", delivered_bytes=3, delivered_tokens=5), 15),
        # Failed before any piece: nothing came, nothing is charged.
        (_outcome(0, 0, None, failure="NO_DEPLOYMENT_AVAILABLE"), 0),
        # The caller hung up after 12 bytes of pieces: the deltas carry no
        # counts, so the prompt and a token a byte (10 + 12) ...
        (_outcome(0, 0, None, cancelled=True, delivered_bytes=12), 22),
        # ... at most max_tokens (10 + 80).
        (_outcome(0, 0, None, cancelled=True, delivered_bytes=500), 90),
        # ... before any piece: the prompt (the model may have read it).
        (_outcome(0, 0, None, cancelled=True), 10),
        (_outcome(12, 30, "exact_hit", delivered_bytes=2), 0),  # no model tokens spent
    ],
)
async def test_the_pipeline_stages_settle_every_end_of_a_turn(redis_client, outcome, charged):
    settings = RouterSettings()
    stages = TurnAdmission(Admission(redis_client, max_generation_s=60), settings)
    turn = _turn(uuid.uuid4().hex[:12], max_tokens=80)
    grant = await stages.admit(turn)
    # The prompt's 10 bytes and its template's, and max_tokens.
    assert grant.reserved_tokens == 10 + _TINY_GPT_TEMPLATE_BYTES + 80
    # The stream is held and most of the 150 tokens reserved: a second turn waits.
    with pytest.raises(MeshgateError):
        await stages.admit(turn)
    await stages.settle(grant, turn, outcome)
    await stages.drain()  # the settlement's batch written
    prefix = Scope("tenant", turn.tenant.id, turn.tenant.limits).prefix
    assert int(await redis_client.get(f"{prefix}:tpm:sum")) == charged
    # The stream was released on every path (in the same batch).
    assert await redis_client.zcard(f"{prefix}:streams") == 0


@pytest.mark.parametrize("same_replica", [True, False], ids=["same-replica", "other-replica"])
async def test_a_stream_settled_in_a_batch_is_free_for_the_next_turn_at_once(redis_url, same_replica):
    """Settlements are written in batches just after a turn ends; a turn
    asking right then for the stream just freed, on this replica or another,
    is admitted, not refused for a lease about to be released."""
    clients = [redis_access.connect(redis_url) for _ in range(2)]
    try:
        first = Admission(clients[0], max_generation_s=60)
        second = first if same_replica else Admission(clients[1], max_generation_s=60)
        scope = _scope(concurrent_streams=1)
        held = await first.admit([scope], 1, 1)
        first.settle_soon(held, 2, 0)
        # Still held in Redis: the release waits for its batch.
        assert await clients[0].zcard(f"{scope.prefix}:streams") == 1
        await second.admit([scope], 1, 1)
        # A stream really held still refuses.
        with pytest.raises(MeshgateError) as refused:
            await first.admit([scope], 1, 1)
        assert refused.value.metadata["limit"] == "concurrent_streams"
    finally:
        for client in clients:
            await client.aclose()


async def test_a_stream_ending_while_a_refused_turn_waits_is_free_for_it(redis_client, monkeypatch):
    """A turn refused for concurrent streams waits out the replicas' flushes
    and asks again. A stream of its own replica that ended during that wait
    was still held when it asked, its release in a batch not yet written,
    and the turn was refused with the stream free (a bug hunt: 5 callers'
    turns under concurrent_streams = 5 on one router, each asking once its
    last stream had ended, were refused 1 to 3 in 60)."""
    admission = Admission(redis_client, max_generation_s=60)
    scope = _scope(concurrent_streams=1)
    held = await admission.admit([scope], 1, 1)

    class HeldEndsDuringTheWait:
        def __getattr__(self, name):
            return getattr(asyncio, name)

        async def sleep(self, delay):
            await asyncio.sleep(delay)
            admission.settle_soon(held, 2, 0)

    monkeypatch.setattr(admission_module, "asyncio", HeldEndsDuringTheWait())
    await admission.admit([scope], 1, 1)


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_a_batch_of_settlements_settles_each_turn_to_its_use(redis_client, split_by_slot):
    """Many turns of the same scopes settle in one call per slot, each key
    named once: every turn still lands on its own real use."""
    clock = Clock(1_800_000_000.0)
    admission = Admission(redis_client, max_generation_s=60, clock=clock, split_by_slot=split_by_slot)
    limits = dict(tokens_per_minute=10_000, tokens_per_day=10_000, concurrent_streams=5)
    tenant = _scope(**limits)
    model = Scope("model", uuid.uuid4().hex[:12], LimitSettings(**limits))
    grants = [await admission.admit([tenant, model], 10, 90) for _ in range(3)]
    for grant, used in zip(grants, (7, 20, 33), strict=True):
        admission.settle_soon(grant, used, 0)
    await admission.flush()
    day = f"{datetime.datetime.fromtimestamp(clock.now, datetime.UTC):%Y-%m-%d}"
    for scope in (tenant, model):
        assert int(await redis_client.get(f"{scope.prefix}:tpm:sum")) == 60
        assert int(await redis_client.get(f"{scope.prefix}:tokens:day:{day}")) == 60
        assert await redis_client.zcard(f"{scope.prefix}:streams") == 0


def _settlements_given_up() -> float:
    return metrics.router().deferred_writes.labels("settlement", "given_up")._value.get()


async def _settled_beside_a_broken_key(redis_client, admission: Admission, break_it):
    """Two tenants' turns admitted, the first's key broken by ``break_it``
    (its scope, its turn), both settled in one batch; the victim's settled
    whole. Returns (broken scope, victim scope, broken turn, the logs, the
    given_up count before)."""
    limits = dict(concurrent_streams=1, tokens_per_day=1_000)
    broken, victim = _scope(**limits), _scope(**limits)
    broken_turn = await admission.admit([broken], 10, 90)
    victim_turn = await admission.admit([victim], 10, 90)
    await break_it(broken, broken_turn)
    given_up = _settlements_given_up()
    with structlog.testing.capture_logs() as logged:
        admission.settle_soon(broken_turn, 20, 0)
        admission.settle_soon(victim_turn, 20, 0)
        await admission.flush()
    assert await redis_client.zcard(f"{victim.prefix}:streams") == 0
    assert int(await redis_client.get(f"{victim.prefix}:tokens:day:{victim_turn.day}")) == 20
    return broken, victim, broken_turn, logged, given_up


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_a_turn_whose_key_holds_another_type_is_skipped_and_the_others_of_its_batch_settle(
    redis_client, split_by_slot
):
    """A review's finding: one tenant's streams set holding a string failed
    the batch of up to 128 turns' settlements WRONGTYPE at that tenant's
    turn; Redis does not roll a script back, so the call's mark and the
    turns before stayed settled, and those after (other tenants') were not,
    while the call, sent again, found its mark and counted itself written:
    their reservations stood and their streams stayed held (the next turn
    refused concurrent_streams for max_generation_s plus a minute). The
    broken turn is now skipped whole (its reservation stands), logged naming
    its tenant and key, counted given up; the others settle."""
    admission = Admission(redis_client, max_generation_s=60, split_by_slot=split_by_slot)

    async def break_streams(broken: Scope, _) -> None:
        await redis_client.delete(f"{broken.prefix}:streams")
        await redis_client.set(f"{broken.prefix}:streams", "not a sorted set")

    broken, victim, broken_turn, logged, given_up = await _settled_beside_a_broken_key(
        redis_client, admission, break_streams
    )
    await admission.admit([victim], 10, 90)  # its stream was freed
    # Nothing of the broken turn was settled: its reservation stands.
    assert int(await redis_client.get(f"{broken.prefix}:tokens:day:{broken_turn.day}")) == 100
    assert await redis_client.get(f"{broken.prefix}:streams") == b"not a sorted set"
    assert _settlements_given_up() == given_up + 1 and len(admission._settlements) == 0
    [line] = [line for line in logged if line["event"].startswith("a turn's settlement was not written")]
    assert (line["tenant"], line["key_kind"], line["holds"]) == (broken.id, "streams", "string")


@pytest.mark.parametrize("counter", ["not a number", "1.5", "9" * 19])
async def test_a_turn_whose_counter_is_not_an_integer_is_skipped_and_the_others_of_its_batch_settle(
    redis_client, counter
):
    """A budget counter holding a string INCRBY refuses (an operator's or a
    bug's write; 9 x 19: past int64) stopped the batch midway,
    as a key of another type did: given up, every other tenant's turn in it
    unsettled, their streams held. Now that turn's part in the counter's
    slot is skipped, the others settle."""
    admission = Admission(redis_client, max_generation_s=60)

    async def break_budget(broken: Scope, broken_turn) -> None:
        await redis_client.set(f"{broken.prefix}:tokens:day:{broken_turn.day}", counter)

    broken, _, broken_turn, logged, given_up = await _settled_beside_a_broken_key(
        redis_client, admission, break_budget
    )
    budget = f"{broken.prefix}:tokens:day:{broken_turn.day}"
    assert await redis_client.get(budget) == counter.encode()
    assert await redis_client.zcard(f"{broken.prefix}:streams") == 1
    assert _settlements_given_up() == given_up + 1 and len(admission._settlements) == 0
    [line] = [line for line in logged if line["event"].startswith("a turn's settlement was not written")]
    assert (line["tenant"], line["key"], line["holds"]) == (broken.id, budget, "string, not an integer")


async def test_a_settlement_call_that_skipped_a_turn_sent_again_settles_nothing_twice(redis_client):
    """A settlements' call whose reply was lost is sent again (idempotent):
    one that skipped a turn and settled the others settles nothing the
    second time, nor the skipped turn once its key is mended (given up)."""
    admission = Admission(redis_client, max_generation_s=60)
    limits = dict(concurrent_streams=1, tokens_per_day=1_000)
    broken, victim = _scope(**limits), _scope(**limits)
    broken_turn = await admission.admit([broken], 10, 90)
    victim_turn = await admission.admit([victim], 10, 90)
    budget = f"{broken.prefix}:tokens:day:{broken_turn.day}"
    await redis_client.delete(budget)
    await redis_client.hset(budget, "not", "a counter")
    calls = admission._settlement_calls(
        [(broken_turn, 20, 0), (victim_turn, 20, 0)],
        extra_args=[admission_module._SETTLED_MARK_MS],
        once=True,
    )
    script = admission._settlements._script
    [first] = await admission_module.run_scripts(script, list(calls.values()))
    assert skipped_in(first) == [Skipped(1, budget, "hash")]
    await redis_client.delete(budget)
    assert await admission_module.run_scripts(script, list(calls.values())) == [0]
    assert int(await redis_client.get(f"{victim.prefix}:tokens:day:{victim_turn.day}")) == 20
    assert await redis_client.zcard(f"{victim.prefix}:streams") == 0
    assert not await redis_client.exists(budget)
    assert await redis_client.zcard(f"{broken.prefix}:streams") == 1


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_a_models_key_of_another_type_skips_each_turns_part_in_the_models_slot_only(
    redis_client, split_by_slot
):
    """A model alias's counters are every tenant's: one of them holding
    another type skips the model's part of each turn (as a Redis Cluster's
    call per slot would), not the tenants' own: their streams are freed and
    their budgets settled."""
    admission = Admission(redis_client, max_generation_s=60, split_by_slot=split_by_slot)
    model = Scope("model", uuid.uuid4().hex[:12], LimitSettings(concurrent_streams=5, tokens_per_day=1_000))
    tenants = [_scope(concurrent_streams=1, tokens_per_day=1_000) for _ in range(2)]
    turns = [await admission.admit([tenant, model], 10, 90) for tenant in tenants]
    budget = f"{model.prefix}:tokens:day:{turns[0].day}"
    await redis_client.delete(budget)
    await redis_client.hset(budget, "not", "a counter")
    given_up = _settlements_given_up()
    for turn in turns:
        admission.settle_soon(turn, 20, 0)
    await admission.flush()
    for tenant, turn in zip(tenants, turns, strict=True):
        assert await redis_client.zcard(f"{tenant.prefix}:streams") == 0
        assert int(await redis_client.get(f"{tenant.prefix}:tokens:day:{turn.day}")) == 20
    # The model's part of each turn stands as admitted.
    assert await redis_client.zcard(f"{model.prefix}:streams") == 2
    assert _settlements_given_up() == given_up + 2


async def test_pipelined_scripts_run_once_after_redis_forgets_them(redis_client):
    """A restarted Redis has no scripts: each pipelined call that met NOSCRIPT
    did not run, and runs once (loaded) rather than never or twice."""
    admission = Admission(redis_client, max_generation_s=60, split_by_slot=True)
    tenant = _scope(requests_per_minute=5)
    model = Scope("model", uuid.uuid4().hex[:12], LimitSettings(requests_per_minute=5))
    await admission.admit([tenant, model], 1, 1)
    await redis_client.script_flush()
    await admission.admit([tenant, model], 1, 1)
    for scope in (tenant, model):
        assert int(await redis_client.get(f"{scope.prefix}:rpm:sum")) == 2


# Keeps Redis busy for 300 ms (another client's slow script): replies to
# every other client wait meanwhile, as under load.
_BUSY_300_MS = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
while true do
  local now = redis.call('TIME')
  if now[1] * 1000000 + now[2] - start > 300000 then break end
end
return 1
"""


async def test_a_caller_cancelled_while_redis_admits_it_holds_no_stream_and_no_tokens(redis_url):
    """The admit script is sent, Redis is busy, the caller is cancelled (its
    deadline passed) before the reply is read; Redis then admits the turn.
    Its stream lease must not stay held until max_generation_s plus a margin
    has passed (the key's next turn refused meanwhile), nor its tokens stay
    charged: the turn is refunded once the reply comes."""
    clients = [redis_access.connect(redis_url) for _ in range(2)]
    client, other = clients
    try:
        admission = Admission(client, max_generation_s=60)
        scope = _scope(concurrent_streams=1, tokens_per_day=1_000)
        # Loads the scripts and proves the limits work: a settled turn.
        first = await admission.admit([scope], prompt_tokens=10, max_tokens=10)
        await admission.settle(first, 0, 0)
        busy = asyncio.ensure_future(other.eval(_BUSY_300_MS, 0))
        await asyncio.sleep(0.05)
        asking = asyncio.ensure_future(admission.admit([scope], prompt_tokens=10, max_tokens=10))
        await asyncio.sleep(0.1)  # sent; its reply waits behind the busy script
        asking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asking
        await busy
        streams = f"{scope.prefix}:streams"
        day = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
        budget = f"{scope.prefix}:tokens:day:{day}"
        deadline = asyncio.get_running_loop().time() + 2
        while await client.zcard(streams) or int(await client.get(budget) or 0):
            assert asyncio.get_running_loop().time() < deadline, "the cancelled turn's charges stand"
            await asyncio.sleep(0.02)
        # The key's next turn gets the stream.
        await admission.settle(await admission.admit([scope], prompt_tokens=10, max_tokens=10), 0, 0)
    finally:
        for each in clients:
            await each.aclose()


async def test_a_drain_waits_for_an_abandoned_admit_and_writes_its_refund(redis_url):
    """A router stopping right after a caller went away mid-admit: drain()
    must wait for the admit's reply and write its refund before it returns,
    or the stream lease and tokens stay charged after the process is gone."""
    # Tasks of the session's loop before this test (other tests' services):
    # not this "process"'s to end below.
    earlier = asyncio.all_tasks()
    clients = [redis_access.connect(redis_url) for _ in range(2)]
    client, other = clients
    try:
        admission = Admission(client, max_generation_s=60)
        scope = _scope(concurrent_streams=1, tokens_per_day=1_000)
        await admission.settle(await admission.admit([scope], prompt_tokens=10, max_tokens=10), 0, 0)
        _busy = asyncio.ensure_future(other.eval(_BUSY_300_MS, 0))
        await asyncio.sleep(0.05)
        asking = asyncio.ensure_future(admission.admit([scope], prompt_tokens=10, max_tokens=10))
        await asyncio.sleep(0.1)  # sent; its reply waits behind the busy script
        asking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asking
        await admission.drain()
        # The process ends: whatever drain() left running is cancelled. Only
        # this test's: cancelling every task of the session's loop also ended
        # a session fixture's inference service, whose teardown then failed
        # (CancelledError) and left its Triton and Redis running.
        for task in asyncio.all_tasks() - earlier:
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.sleep(0.5)  # the busy script and the admit behind it have run
        async with redis_access.connect(redis_url) as fresh:
            day = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
            assert await fresh.zcard(f"{scope.prefix}:streams") == 0
            assert int(await fresh.get(f"{scope.prefix}:tokens:day:{day}") or 0) == 0
    finally:
        for each in clients:
            await each.aclose()


# --- a reservation bounds what its turn is billed -----------------------------
#
# Inference bills a turn's prompt as it counts it: the chat template rendered
# over every message the model read (a session's history too), not only the
# new messages' content. Admission reserves a bound of that (prompt_bound.py),
# so turns admitted together never settle past a limit.

_MODELS = Settings().models


def _rendered_tokens(model: ModelSettings, messages) -> int:
    """What inference bills as the prompt: the tokens of the model's chat
    template rendered over ``messages``, as its tokenizer counts them."""
    template = tokenization.load_chat_template(model.chat_template)
    prompt = template.render_messages(messages, as_text=tokenization.as_text(model.tokenizer))
    return tokenization.count(tokenization.load(model.tokenizer), [prompt])[0]


def _limited_tenant(limits: LimitSettings) -> Tenant:
    tenant_id = uuid.uuid4().hex[:12]
    return Tenant(tenant_id, frozenset({"*"}), "k" + tenant_id, limits)


def _day_key(scope: Scope, name: str = "tokens") -> str:
    return f"{scope.prefix}:{name}:day:{datetime.datetime.now(datetime.UTC):%Y-%m-%d}"


@pytest.mark.parametrize(("alias", "limit"), [("tiny-gpt", 100), ("smollm2", 400)])
async def test_concurrent_stateless_turns_never_settle_a_window_or_budget_past_its_limit(
    redis_client, alias, limit
):
    """Twenty turns of "hi" at once against a small per-minute and per-day
    limit, each billed what inference counts (its rendered prompt, several
    times its 2 bytes of content, and max_tokens): what they settle to
    stays within the limits, as the reservations they were admitted on
    bound it."""
    model = _MODELS[alias]
    limits = LimitSettings(tokens_per_minute=limit, tokens_per_day=limit)
    stages = TurnAdmission(Admission(redis_client, max_generation_s=60), RouterSettings())
    messages = [common_pb2.Message(role=common_pb2.ROLE_USER, content="hi")]
    turn = types.SimpleNamespace(
        tenant=_limited_tenant(limits), model_alias=alias, model=model, messages=messages, max_tokens=8
    )
    billed_prompt = _rendered_tokens(model, messages)
    assert billed_prompt > len("hi")  # the template's own tokens: what was not reserved
    results = await asyncio.gather(*(stages.admit(turn) for _ in range(20)), return_exceptions=True)
    grants = [result for result in results if not isinstance(result, BaseException)]
    assert grants, results
    for grant in grants:
        outcome = Outcome(Answer(prompt_tokens=billed_prompt, completion_tokens=8), CacheStatus.MISS, 0.1)
        await stages.settle(grant, turn, outcome)
    await stages.drain()
    scope = Scope("tenant", turn.tenant.id, limits)
    assert (
        int(await redis_client.get(f"{scope.prefix}:tpm:sum")) == len(grants) * (billed_prompt + 8) <= limit
    )
    assert int(await redis_client.get(_day_key(scope))) <= limit


class _SessionContexts:
    """Sessions whose history is ``history`` (one message): assembly puts it
    before the turn's new messages, as the context service would."""

    def __init__(self, history: str) -> None:
        self.history = common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=history)
        self.appended: list[str] = []

    async def create_session(self, tenant, budget) -> str:
        return uuid.uuid4().hex

    async def delete_session(self, tenant, session_id) -> None:
        return None

    async def assemble(self, turn):
        return Assembly([self.history, *turn.messages], 1)

    async def append(self, turn, session_id, after_version, answer) -> Appended:
        self.appended.append(session_id)
        return Appended(after_version + 1)

    async def prefetch(self, tenant, session_id) -> None:
        return None

    async def release_hold(self, turn, session_id) -> None:
        return None


class _BillingGenerator:
    """Stands in for the inference service: one piece, then the completion,
    billed as inference bills it (the rendered prompt's tokens, and
    max_tokens generated), once ``release`` is set."""

    def __init__(self, model: ModelSettings) -> None:
        self.model = model
        self.prompts: list = []
        self.release = asyncio.Event()

    async def generate(
        self, alias, prompt, parameters, budget, answer, session_id="", read_ahead=True, tenant_id=""
    ):
        self.prompts.append(list(prompt))
        await self.release.wait()
        answer.text, answer.finish_reason, answer.deployment = "x", "length", "d"
        answer.prompt_tokens = _rendered_tokens(self.model, prompt)
        answer.completion_tokens = parameters.max_tokens
        yield "x"


def _session_pipeline(redis_client, history: str):
    """A pipeline over real admission (this Redis) and fakes of the other
    stages, for tiny-gpt at 1,000 USD a million tokens (1 USD a thousand);
    its contexts and generator."""
    model = ModelSettings(context_window_tokens=4096, max_output_tokens=64, default_max_tokens=8)
    price = PriceSettings(prompt_usd_per_million=1_000.0, completion_usd_per_million=1_000.0)
    settings = RouterSettings(prices={"m": price})
    contexts, generator = _SessionContexts(history), _BillingGenerator(model)
    stages = TurnAdmission(Admission(redis_client, max_generation_s=60), settings)
    turns = Pipeline(settings, {"m": model}, contexts, _NoCache(), generator, stages)
    return turns, stages, contexts, generator


class _NoCache:
    async def lookup(self, plan, messages, budget, semantic):
        return None

    async def store(self, plan, messages, answer, budget) -> None:
        return None


def _session_turn() -> router_pb.ChatRequest:
    return router_pb.ChatRequest(
        model="m", messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="hi")]
    )


async def _events(turns: Pipeline, tenant: Tenant, session_id: str) -> list:
    return [event async for event in turns.run(_session_turn(), tenant, session_id, Budget())]


# 600 punctuation marks: 600 tokens for tiny-gpt's tokenizer (one a mark),
# as many as their bytes, so the reservation's bound is close to the bill.
_HISTORY = "!" * 600


async def test_concurrent_session_turns_settle_within_their_budgets(redis_client):
    """Ten session turns at once, each with 600 tokens of history the model
    reads and inference bills, against a day's 1,000 tokens and 1 USD: the
    history is reserved once assembled, before anything is generated, so
    the turns that cannot have it are refused then, and what the others
    settle to stays within both budgets."""
    turns, stages, contexts, generator = _session_pipeline(redis_client, _HISTORY)
    limits = LimitSettings(tokens_per_day=1_000, cost_usd_per_day=1.0)
    tenant = _limited_tenant(limits)
    running = [asyncio.ensure_future(_events(turns, tenant, uuid.uuid4().hex)) for _ in range(10)]
    # Every turn either generating or refused before generation is let go:
    # all of them were admitted (or not) together.
    async with asyncio.timeout(10):
        while len(generator.prompts) + sum(task.done() for task in running) < len(running):
            await asyncio.sleep(0.01)
    generator.release.set()
    outcomes = [events[-1] for events in await asyncio.gather(*running)]
    await stages.drain()
    completed = [event for event in outcomes if isinstance(event, Completion)]
    refused = [event for event in outcomes if isinstance(event, Failure)]
    assert completed, outcomes
    # Refused before generation: nothing was generated for them, nor stored.
    assert len(generator.prompts) == len(completed) == len(contexts.appended)
    for failure in refused:
        assert failure.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert failure.error.reason == Reason.BUDGET_EXHAUSTED
    scope = Scope("tenant", tenant.id, limits)
    billed = sum(event.answer.prompt_tokens + event.answer.completion_tokens for event in completed)
    assert billed > 600 * len(completed)  # the history was billed
    assert int(await redis_client.get(_day_key(scope))) == billed <= 1_000
    assert int(await redis_client.get(_day_key(scope, "cost"))) == billed * 1_000_000 <= 1_000_000_000


async def test_a_session_turn_whose_history_exceeds_the_remaining_budget_is_refused_before_generation(
    redis_client,
):
    """A day's 1,000 tokens, a first session turn spends about half: the
    next one's new message alone fits what is left, but with its assembled
    history it does not. It is refused with the budget's own refusal once
    the history is known, before anything is generated, and what was
    reserved for it is given back."""
    turns, stages, contexts, generator = _session_pipeline(redis_client, "!" * 450)
    generator.release.set()
    limits = LimitSettings(tokens_per_day=1_000)
    tenant = _limited_tenant(limits)
    first = (await _events(turns, tenant, "s1"))[-1]
    assert isinstance(first, Completion)
    await stages.drain()
    scope = Scope("tenant", tenant.id, limits)
    spent = first.answer.prompt_tokens + first.answer.completion_tokens
    assert int(await redis_client.get(_day_key(scope))) == spent
    assert 1_000 - spent < 600 + 8  # the next turn's history and max_tokens do not fit

    contexts.history.content = _HISTORY
    refused = (await _events(turns, tenant, "s2"))[-1]
    assert isinstance(refused, Failure), refused
    assert refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.error.reason == Reason.BUDGET_EXHAUSTED
    assert refused.error.metadata["limit"] == "tokens_per_day"
    assert len(generator.prompts) == 1 and contexts.appended == ["s1"]
    await stages.drain()
    assert int(await redis_client.get(_day_key(scope))) == spent


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
async def test_a_top_up_one_limit_refuses_charges_no_other(redis_client, split_by_slot):
    """A reservation grows (a session's history) where the tenant's budget
    has room and the model's has not: refused by the model's, and the
    tenant's is left as admitted (on a cluster, its growth given back)."""
    admission = Admission(redis_client, max_generation_s=60, split_by_slot=split_by_slot)
    tenant = _scope(tokens_per_day=10_000, tokens_per_minute=10_000)
    model = Scope("model", uuid.uuid4().hex[:12], LimitSettings(tokens_per_day=500))
    grant = await admission.admit([tenant, model], prompt_tokens=10, max_tokens=10)
    with pytest.raises(MeshgateError) as refused:
        await admission.top_up(grant, tokens=600, nano_usd=0)
    assert refused.value.reason == Reason.REQUEST_EXCEEDS_LIMIT  # 600 > 500: never fits
    # Another turn: with this one's 20, 480 of the model's 500 are reserved.
    await admission.admit([model], prompt_tokens=400, max_tokens=60)
    with pytest.raises(MeshgateError) as refused:
        await admission.top_up(grant, tokens=100, nano_usd=0)
    assert (refused.value.reason, refused.value.metadata["scope"]) == (Reason.BUDGET_EXHAUSTED, "model")
    assert grant.reserved_tokens == 20
    assert int(await redis_client.get(_day_key(tenant))) == 20
    assert int(await redis_client.get(f"{tenant.prefix}:tpm:sum")) == 20
    # Grown where it fits: the window's entry and the budgets hold the growth,
    # and the settlement moves them from it to the real use.
    await admission.top_up(grant, tokens=40, nano_usd=0)
    assert grant.reserved_tokens == 40
    assert int(await redis_client.get(_day_key(tenant))) == 40
    assert int(await redis_client.get(f"{tenant.prefix}:tpm:sum")) == 40
    await admission.settle(grant, tokens=33, nano_usd=0)
    assert int(await redis_client.get(_day_key(tenant))) == 33
    assert int(await redis_client.get(f"{tenant.prefix}:tpm:sum")) == 33
    assert int(await redis_client.get(_day_key(model))) == 460 + 33


async def test_a_caller_cancelled_while_its_reservation_grows_keeps_no_growth(redis_url):
    """The top-up script is sent, Redis is busy, the caller goes away and
    its turn settles from what admission reserved; Redis then grows the
    reservation. The growth is given back once its reply comes, so the
    budget ends at the turn's real use; and the window too, though the
    settlement reaches Redis first (the growth given back then moved the
    entry it had missed to what was reserved: 30 for a minute, not 25)."""
    clients = [redis_access.connect(redis_url) for _ in range(2)]
    client, other = clients
    try:
        admission = Admission(client, max_generation_s=60)
        scope = _scope(tokens_per_day=1_000, tokens_per_minute=1_000)
        grant = await admission.admit([scope], prompt_tokens=10, max_tokens=10)
        await admission.top_up(grant, tokens=30, nano_usd=0)  # loads the script
        # The settlement's script loaded, and connections in the pool: the
        # settlement goes out at once, not behind a connect (or a load)
        # that waits for the busy Redis.
        await admission.settle(await admission.admit([scope], prompt_tokens=1, max_tokens=0), 0, 0)
        await asyncio.gather(*(client.ping() for _ in range(3)))
        busy = asyncio.ensure_future(other.eval(_BUSY_300_MS, 0))
        await asyncio.sleep(0.05)
        growing = asyncio.ensure_future(admission.top_up(grant, tokens=500, nano_usd=0))
        await asyncio.sleep(0.1)  # sent; its reply waits behind the busy script
        growing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await growing
        assert grant.reserved_tokens == 30
        admission.settle_soon(grant, 25, 0)
        await busy
        await admission.drain()
        deadline = asyncio.get_running_loop().time() + 2
        while int(await client.get(_day_key(scope))) != 25:
            assert asyncio.get_running_loop().time() < deadline, "the abandoned growth stays charged"
            await asyncio.sleep(0.02)
        assert int(await client.get(f"{scope.prefix}:tpm:sum")) == 25
    finally:
        for each in clients:
            await each.aclose()
