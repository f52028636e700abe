"""The router's client of the cache (downstream.CacheService), without a
mesh. A prompt of more messages than the cache takes (MAX_CACHED_PROMPT_MESSAGES,
which it refuses TOO_MANY_MESSAGES) is kept from it by the router: uncached,
without a call a turn nor the warning of a failed one. A session turn's
assembled prompt for a model of a large window can be that long. A tenant at
its cache quota is logged, not warned of; an Invalidate drops the router's
own copies at once."""

from __future__ import annotations

import grpc
import structlog

from meshgate import cache_notices, metrics
from meshgate.cache.v1 import cache_service_pb2 as cache_pb
from meshgate.common.v1 import common_pb2
from meshgate.config import MAX_CACHED_PROMPT_CHARS, MAX_CACHED_PROMPT_MESSAGES, RouterSettings
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.router.downstream import CacheService
from services.router.hot_exact import HotExactHits
from services.router.pipeline import Answer, Budget, CachePlan, CacheStatus, Hit


class RecordingStub:
    """The cache's stub, answering every lookup MISS, and the calls it got."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def Lookup(self, request, **_) -> cache_pb.LookupResponse:
        self.calls.append("Lookup")
        return cache_pb.LookupResponse(status=cache_pb.LOOKUP_STATUS_MISS, store_fence="f")

    async def Store(self, request, **_) -> cache_pb.StoreResponse:
        self.calls.append("Store")
        return cache_pb.StoreResponse()


class NoTokens:
    def metadata(self, tenant_id: str, service: str) -> list:
        return []


def plan() -> CachePlan:
    return CachePlan(True, True, "tenant", "m", common_pb2.GenerationParameters())


def prompt(count: int) -> list[common_pb2.Message]:
    return [common_pb2.Message(role=common_pb2.ROLE_USER, content="hi")] * count


async def test_a_prompt_longer_than_the_cache_takes_is_kept_from_it_quietly():
    stub = RecordingStub()
    cache = CacheService(stub, NoTokens(), RouterSettings())
    too_long = prompt(MAX_CACHED_PROMPT_MESSAGES + 1)
    with structlog.testing.capture_logs() as logs:
        assert await cache.lookup(plan(), too_long, Budget(), semantic=False) is None
        assert await cache.lookup(plan(), too_long, Budget(), semantic=True) is None
        await cache.read_fence(plan(), too_long, Budget())
        await cache.store(plan(), too_long, Answer(text="a", store_fence="f"), Budget())
    assert stub.calls == [] and logs == []

    # At the bound, the cache is asked.
    longest = prompt(MAX_CACHED_PROMPT_MESSAGES)
    assert await cache.lookup(plan(), longest, Budget(), semantic=False) is None
    await cache.store(plan(), longest, Answer(text="a", store_fence="f"), Budget())
    assert stub.calls == ["Lookup", "Store"]


async def test_a_prompt_of_more_text_than_the_cache_takes_is_kept_from_it_quietly():
    """A review's finding: 120 messages of 256 KiB held the cache service's
    event loop 5-6.6 s a Lookup (each message normalized there), and the
    router sent two. Past MAX_CACHED_PROMPT_CHARS, no call; at it, one."""
    stub = RecordingStub()
    cache = CacheService(stub, NoTokens(), RouterSettings())
    half = common_pb2.Message(role=common_pb2.ROLE_USER, content="x" * (MAX_CACHED_PROMPT_CHARS // 2))
    with structlog.testing.capture_logs() as logs:
        assert await cache.lookup(plan(), [half, half, half], Budget(), semantic=False) is None
        await cache.store(plan(), [half, half, half], Answer(text="a", store_fence="f"), Budget())
    assert stub.calls == [] and logs == []
    assert await cache.lookup(plan(), [half, half], Budget(), semantic=False) is None
    assert stub.calls == ["Lookup"]


class QuotaFullStub(RecordingStub):
    """The cache refusing every Store: the tenant is at cache.max_bytes_per_tenant."""

    async def Store(self, request, **_) -> cache_pb.StoreResponse:
        status = MeshgateError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.CACHE_QUOTA_EXCEEDED, "full", {"scope": "tenant"}
        ).to_status()
        trailers = grpc.aio.Metadata(*status.trailing_metadata)
        raise grpc.aio.AioRpcError(status.code, grpc.aio.Metadata(), trailers, details=status.details)


class RefusingStub(RecordingStub):
    """The cache failing a Store for another reason than the tenant's quota."""

    async def Store(self, request, **_) -> cache_pb.StoreResponse:
        status = MeshgateError(grpc.StatusCode.UNAVAILABLE, Reason.REDIS_UNAVAILABLE, "away").to_status()
        trailers = grpc.aio.Metadata(*status.trailing_metadata)
        raise grpc.aio.AioRpcError(status.code, grpc.aio.Metadata(), trailers, details=status.details)


async def test_a_tenant_at_its_cache_quota_is_named_at_info_not_warned_of_every_turn():
    cache = CacheService(QuotaFullStub(), NoTokens(), RouterSettings())
    with structlog.testing.capture_logs() as logs:
        await cache.store(plan(), prompt(1), Answer(text="a", store_fence="f"), Budget())
    assert [(log["log_level"], log.get("tenant_id")) for log in logs] == [("info", "tenant")]


async def test_a_store_refused_at_the_tenants_cache_quota_is_counted_by_model():
    """Logged at info only, an operator had no series to alert on or graph
    for answers going out uncached at a tenant's bound."""
    refusals = metrics.router().cache_quota_refusals.labels(plan().model)
    before = refusals._value.get()
    cache = CacheService(QuotaFullStub(), NoTokens(), RouterSettings())
    await cache.store(plan(), prompt(1), Answer(text="a", store_fence="f"), Budget())
    assert refusals._value.get() == before + 1
    # Any other failure of a Store is not one of these.
    await CacheService(RefusingStub(), NoTokens(), RouterSettings()).store(
        plan(), prompt(1), Answer(text="a", store_fence="f"), Budget()
    )
    assert refusals._value.get() == before + 1


class InvalidatingStub(RecordingStub):
    async def Invalidate(self, request, **_) -> cache_pb.InvalidateResponse:
        self.calls.append("Invalidate")
        return cache_pb.InvalidateResponse(entries_removed=1)


async def test_an_invalidate_through_this_router_drops_its_own_copies_without_waiting_for_the_notice():
    """The review of the split-Redis hunt: a router's own InvalidateCache left
    its copies to the cache's notice (and to hot_exact_max_age_s where the
    notice never came)."""
    hot = HotExactHits(16, 600.0)
    hot.subscribed(True)
    hot.announce(cache_notices.heartbeat("replica"))
    cache = CacheService(InvalidatingStub(), NoTokens(), RouterSettings(), hot)
    key = hot.key(plan(), prompt(1))
    hit = Hit(Answer(text="a", completion_tokens=1), CacheStatus.EXACT_HIT, 1.0)
    hot.put(key, hot.ticket(), hit, "e1", "tenant", "m", "replica")
    assert hot.get(key) is not None
    assert await cache.invalidate("tenant", "m", Budget()) == 1
    assert hot.get(key) is None
