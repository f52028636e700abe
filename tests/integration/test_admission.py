"""Admission control against a real Redis: exact limits shared by replicas,
reservations settled, budgets rolling over, Redis outages per policy."""

from __future__ import annotations

import asyncio
import datetime
import types
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2

from meshgate import redis_access
from meshgate.config import LimitSettings, PriceSettings, RouterSettings
from meshgate.errors import MeshgateError
from services.router.admission import Admission, Scope, TurnAdmission
from services.router.pipeline import Answer, CacheStatus, Outcome

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
async def redis_client(redis_url):
    client = redis_access.connect(redis_url)
    yield client
    await client.aclose()


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
    clock.now_s += 59.9
    with pytest.raises(MeshgateError):
        await admission.admit([scope], 1, 1, None)
    clock.now_s += 0.1
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
    day_key = (
        f"{scope.prefix}:tokens:day:{datetime.datetime.fromtimestamp(clock.now_s, datetime.UTC):%Y-%m-%d}"
    )
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
    clock.now_s += 61
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


def _turn(tenant_id: str, max_tokens: int):
    from meshgate.common.v1 import common_pb2
    from services.router.auth import Tenant

    tenant = Tenant(
        tenant_id,
        frozenset({"*"}),
        "k" + tenant_id,
        LimitSettings(tokens_per_minute=100, concurrent_streams=1),
    )
    messages = [common_pb2.Message(role=common_pb2.ROLE_USER, content="0123456789")]
    return types.SimpleNamespace(
        tenant=tenant, model_alias="tiny-gpt", messages=messages, max_tokens=max_tokens
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
    assert grant.reserved_tokens == 90
    # The stream is held and 90 of 100 tokens reserved: a second turn waits.
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
    day = f"{datetime.datetime.fromtimestamp(clock.now_s, datetime.UTC):%Y-%m-%d}"
    for scope in (tenant, model):
        assert int(await redis_client.get(f"{scope.prefix}:tpm:sum")) == 60
        assert int(await redis_client.get(f"{scope.prefix}:tokens:day:{day}")) == 60
        assert await redis_client.zcard(f"{scope.prefix}:streams") == 0


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
        # The process ends: whatever drain() left running is cancelled.
        for task in asyncio.all_tasks():
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
