"""A mesh whose services do not all share one Redis: the cache service on a
Redis of its own, the router and the context service on another (each
process reading its own ``redis.url``). The router's hot copies of cache
hits are kept coherent by the notices the cache service publishes on its
Redis, so the router must hear that Redis (``router.cache_redis_url``):
hearing its own instead, it stays subscribed and live, hears nothing, and
went on serving a copy after an Invalidate or a reported wrong hit for as
long as ``router.hot_exact_max_age_s``. It serves copies only while it
hears the cache service's heartbeat, so one hearing the wrong Redis serves
none."""

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
