"""A mesh whose services do not all share one Redis: the cache service on a
Redis of its own, the router and the context service on another (each
process reading its own ``redis.url``). The router's hot copies of cache
hits are kept coherent by the notices the cache service publishes on its
Redis, so the router must hear that Redis (``router.cache_redis_url``):
hearing its own instead, it stays subscribed and live, hears nothing, and
went on serving a copy after an Invalidate or a reported wrong hit for as
long as ``router.hot_exact_max_age_s``. It serves copies only while it
hears the heartbeat of the cache replica that answered the hit (each
replica's carries an id its hits name), so one hearing the wrong Redis
serves none, nor one hearing another mesh's cache services, nor a copy of
a hit of one replica alone on another Redis."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import pytest
from prometheus_client import REGISTRY

from meshgate.cache.v1 import cache_service_pb2 as cache_pb
from meshgate.cache.v1 import cache_service_pb2_grpc
from meshgate.common.v1 import common_pb2
from meshgate.config import RedisSettings
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.cache import app as cache_app
from services.context import app as context_app
from services.router import app as router_app
from tests.conftest import own_redis_server
from tests.integration.conftest import answer_of, running, service_settings
from tests.mesh import bounded_channel, router_channel

# Serial (make test runs it alone): bounds how soon a router hears of a change.
pytestmark = [pytest.mark.integration, pytest.mark.serial]

KEY = "split-redis-key"
AUTH = [("authorization", f"Bearer {KEY}")]
MAX_TOKENS = 6
# Far above how soon a notice stops a copy (test_router_hot_exact.py's
# NOTICE_BOUND_S), far below the copies' own age limit.
NOTICE_BOUND_S = 3.0
COPY_MAX_AGE_S = 600.0
# How soon a router started must have heard the cache service's first
# heartbeat (one a second): generous for a shared, loaded machine.
HEARTBEAT_BOUND_S = 5.0


@pytest.fixture
def cache_redis_url(tmp_path):
    """A second real Redis, the cache service's alone."""
    with own_redis_server(tmp_path / "cache-redis") as url:
        yield url


@contextlib.asynccontextmanager
async def split_mesh(redis_url: str, cache_redis_url: str, inference_address: str, told: bool = True):
    """Context and router on ``redis_url``, the cache on ``cache_redis_url``
    (which the router is told of, unless not ``told``: then it hears its
    own); yields (the router's stub, the cache service's stub)."""
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.hot_exact_max_age_s = COPY_MAX_AGE_S
    settings.router.cache_redis_url = cache_redis_url if told else ""
    cache_settings = dataclasses.replace(settings, redis=RedisSettings(url=cache_redis_url))
    async with contextlib.AsyncExitStack() as stack:
        settings.router.context_address = await stack.enter_async_context(
            running(context_app, "context", settings)
        )
        settings.router.cache_address = await stack.enter_async_context(
            running(cache_app, "cache", cache_settings)
        )
        router_address = await stack.enter_async_context(running(router_app, "router", settings))
        router = router_service_pb2_grpc.RouterServiceStub(
            await stack.enter_async_context(bounded_channel(router_address))
        )
        cache = cache_service_pb2_grpc.CacheServiceStub(
            await stack.enter_async_context(router_channel(settings.router.cache_address, "cache"))
        )
        yield router, cache


def ask(text: str) -> pb.ChatRequest:
    return pb.ChatRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=MAX_TOKENS),
        cache_policy=pb.CACHE_POLICY_USE,
    )


async def chat(router, text: str) -> tuple[str, pb.ChatCompletion]:
    return await answer_of(router.Chat(ask(text), metadata=AUTH))


async def stops_serving(router, text: str, old: str) -> None:
    """Waits until the router no longer answers ``text`` with ``old``."""
    started = time.monotonic()
    while True:
        served, completion = await chat(router, text)
        if completion.cache_status != pb.CACHE_STATUS_EXACT_HIT or served != old:
            return
        assert time.monotonic() - started < NOTICE_BOUND_S, "the router kept serving its copy"
        await asyncio.sleep(0.02)


async def test_a_router_hears_the_cache_services_notices_on_the_cache_redis(
    redis_url, cache_redis_url, inference_address
):
    async with split_mesh(redis_url, cache_redis_url, inference_address) as (router, cache):
        old, first = await chat(router, "split redis invalidate")
        assert first.cache_status == pb.CACHE_STATUS_MISS
        # The router keeps copies once it has heard the cache service's
        # heartbeat (within a second of its start): then a repeat after
        # the one that fetched the copy costs the cache service no exact hit.
        started = time.monotonic()
        while True:
            for _ in range(2):
                before = await exact_hits_answered_by_the_cache(cache)
                served, completion = await chat(router, "split redis invalidate")
                assert (served, completion.cache_status) == (old, pb.CACHE_STATUS_EXACT_HIT)
            if await exact_hits_answered_by_the_cache(cache) == before:
                break
            assert time.monotonic() - started < HEARTBEAT_BOUND_S, "the router kept no copy"
            await asyncio.sleep(0.1)
        assert REGISTRY.get_sample_value("meshgate_router_hot_copies_live") == 1
        invalidated = await cache.Invalidate(cache_pb.InvalidateRequest(tenant_id="dev", model="tiny-gpt"))
        assert invalidated.entries_removed >= 1
        await stops_serving(router, "split redis invalidate", old)


async def exact_hits_answered_by_the_cache(cache) -> int:
    return (await cache.GetStats(cache_pb.GetStatsRequest())).exact_hits


async def test_a_router_not_told_the_cache_redis_keeps_no_copies(
    redis_url, cache_redis_url, inference_address
):
    """``router.cache_redis_url`` left unset on a split mesh: the router's
    subscription to its own Redis is live and hears nothing. It served its
    copy after an Invalidate for as long as the copies' age limit; hearing
    no heartbeat of the cache service, it keeps none, and every repeat is
    the cache service's answer (a hop, never a stale one)."""
    async with split_mesh(redis_url, cache_redis_url, inference_address, told=False) as (router, cache):
        old, first = await chat(router, "misheard redis invalidate")
        assert first.cache_status == pb.CACHE_STATUS_MISS
        before = await exact_hits_answered_by_the_cache(cache)
        for _ in range(3):
            served, completion = await chat(router, "misheard redis invalidate")
            assert (served, completion.cache_status) == (old, pb.CACHE_STATUS_EXACT_HIT)
        repeats_the_cache_answered = await exact_hits_answered_by_the_cache(cache) - before
        invalidated = await cache.Invalidate(cache_pb.InvalidateRequest(tenant_id="dev", model="tiny-gpt"))
        assert invalidated.entries_removed >= 1
        served, completion = await chat(router, "misheard redis invalidate")
        assert completion.cache_status == pb.CACHE_STATUS_MISS, "the router served its invalidated copy"
        assert repeats_the_cache_answered == 3
        assert REGISTRY.get_sample_value("meshgate_router_hot_copies_live") == 0


async def until_copies_are_live() -> None:
    """Waits until the router has heard a cache service's heartbeat."""
    started = time.monotonic()
    while REGISTRY.get_sample_value("meshgate_router_hot_copies_live") != 1:
        assert time.monotonic() - started < HEARTBEAT_BOUND_S, "no heartbeat was heard"
        await asyncio.sleep(0.05)


async def test_a_router_hearing_another_meshs_cache_keeps_no_copies_of_its_own_caches_hits(
    redis_url, cache_redis_url, inference_address
):
    """The router hears its own Redis, where another mesh's cache service
    (say, staging's) publishes its heartbeat, and its own cache service is
    on another Redis: it heard a heartbeat, so it kept copies of its own
    cache's hits, and served one after that cache's Invalidate, whose
    notice it never heard. The heartbeat a copied reply names is its own
    cache replica's, which this router does not hear."""
    async with contextlib.AsyncExitStack() as stack:
        staging = service_settings(redis_url, inference_address, KEY)
        await stack.enter_async_context(running(cache_app, "cache", staging))
        router, cache = await stack.enter_async_context(
            split_mesh(redis_url, cache_redis_url, inference_address, told=False)
        )
        await until_copies_are_live()
        old, first = await chat(router, "another mesh's heartbeat")
        assert first.cache_status == pb.CACHE_STATUS_MISS
        before = await exact_hits_answered_by_the_cache(cache)
        for _ in range(3):
            served, completion = await chat(router, "another mesh's heartbeat")
            assert (served, completion.cache_status) == (old, pb.CACHE_STATUS_EXACT_HIT)
        repeats_the_cache_answered = await exact_hits_answered_by_the_cache(cache) - before
        invalidated = await cache.Invalidate(cache_pb.InvalidateRequest(tenant_id="dev", model="tiny-gpt"))
        assert invalidated.entries_removed >= 1
        served, completion = await chat(router, "another mesh's heartbeat")
        assert completion.cache_status == pb.CACHE_STATUS_MISS, "the router served its invalidated copy"
        assert repeats_the_cache_answered == 3
        assert REGISTRY.get_sample_value("meshgate_router_hot_copies_live") == 0


async def test_a_router_keeps_no_copy_of_a_hit_from_a_cache_replica_on_a_redis_it_does_not_hear(
    redis_url, cache_redis_url, inference_address
):
    """Two cache replicas behind one router (router.cache_address lists
    both, calls balanced round robin): replica A on the Redis the router
    hears, replica B alone on another. The router heard A's heartbeat, so
    it kept copies of B's hits too, whose Invalidates and Stores it never
    hears. It keeps copies of A's hits only."""
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.hot_exact_max_age_s = COPY_MAX_AGE_S
    on_another_redis = dataclasses.replace(settings, redis=RedisSettings(url=cache_redis_url))
    async with contextlib.AsyncExitStack() as stack:
        settings.router.context_address = await stack.enter_async_context(
            running(context_app, "context", settings)
        )
        replicas = {
            name: await stack.enter_async_context(running(cache_app, "cache", replica_settings))
            for name, replica_settings in (("A", settings), ("B", on_another_redis))
        }
        settings.router.cache_address = ",".join(replicas.values())
        router = router_service_pb2_grpc.RouterServiceStub(
            await stack.enter_async_context(
                bounded_channel(await stack.enter_async_context(running(router_app, "router", settings)))
            )
        )
        caches = {
            name: cache_service_pb2_grpc.CacheServiceStub(
                await stack.enter_async_context(router_channel(address, "cache"))
            )
            for name, address in replicas.items()
        }

        async def hits_answered() -> dict[str, int]:
            answered = {}
            for name, cache in caches.items():
                stats = await cache.GetStats(cache_pb.GetStatsRequest())
                answered[name] = stats.exact_hits + stats.semantic_hits
            return answered

        await until_copies_are_live()
        copies_served = {"A": 0, "B": 0}
        # Whether the repeat after a hit B answered was seen (a copy of it, or not).
        after_b_seen = False
        # A prompt of its own each round: the calls a turn makes (one for
        # a hit, three for a miss) decide which replica the next one asks,
        # and a round can settle into B answering every hit.
        for round_number in range(10):
            prompt = f"two replicas, two redis, round {round_number}"
            last_answered_by = None
            for _ in range(8):
                before = await hits_answered()
                _, completion = await chat(router, prompt)
                after = await hits_answered()
                after_b_seen = after_b_seen or last_answered_by == "B"
                answered_by = [name for name in caches if after[name] > before[name]]
                if answered_by:
                    (last_answered_by,) = answered_by
                elif completion.cache_status == pb.CACHE_STATUS_MISS:
                    last_answered_by = None
                else:
                    copies_served[last_answered_by] += 1
            if copies_served["B"] or (copies_served["A"] and after_b_seen):
                break
        assert copies_served["B"] == 0, "the router served a copy of replica B's hit"
        assert copies_served["A"] > 0 and after_b_seen, f"too few hits: {copies_served}, {after_b_seen}"
