"""Two router replicas in front of one real cache service (real Redis, real
Triton): a repeated exact hit is answered in the router, and a reported
wrong hit or an Invalidate stops every replica's copy within a bound far
below the copies' age limit (so it is the notice that stops them)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from meshgate.cache.v1 import cache_service_pb2 as cache_pb
from meshgate.cache.v1 import cache_service_pb2_grpc
from meshgate.common.v1 import common_pb2
from meshgate.config import hash_api_key
from meshgate.errors import error_info
from meshgate.router.v1 import admin_service_pb2, admin_service_pb2_grpc, router_service_pb2_grpc
from meshgate.router.v1 import router_service_pb2 as pb
from services.router import app as router_app
from services.router import coalescing, downstream
from tests.integration.conftest import answer_of, running, running_router, service_settings
from tests.mesh import bounded_channel, router_channel

# Serial (make test runs it alone): bounds how soon replicas hear of a change.
pytestmark = [pytest.mark.integration, pytest.mark.serial]

KEY = "hot-exact-key"
AUTH = [("authorization", f"Bearer {KEY}")]
ADMIN_KEY = "hot-exact-admin-key"
ADMIN = [("authorization", f"Bearer {ADMIN_KEY}")]
MAX_TOKENS = 6
# How soon every replica must stop serving a copy after the cache service
# answered the report: generous for a shared, loaded machine, and far below
# the copies' own age limit below.
NOTICE_BOUND_S = 3.0
COPY_MAX_AGE_S = 600.0
# How soon a replica started must have heard the cache service's first
# heartbeat (one a second): generous for a shared, loaded machine.
HEARTBEAT_BOUND_S = 5.0


@pytest.fixture(scope="module")
async def replicas(redis_url, inference_address):
    """Two routers sharing one cache and context service; yields (router
    stubs, cache stub, the first router's AdminService stub)."""
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.hot_exact_max_age_s = COPY_MAX_AGE_S
    settings.router.admin_api_key_sha256 = [hash_api_key(ADMIN_KEY)]
    async with contextlib.AsyncExitStack() as stack:
        # The first router starts the context and cache services both share.
        first = await stack.enter_async_context(running_router(settings))
        second = await stack.enter_async_context(running(router_app, "router", settings))
        routers = []
        for address in (first, second):
            channel = await stack.enter_async_context(bounded_channel(address))
            routers.append(router_service_pb2_grpc.RouterServiceStub(channel))
            if address == first:
                admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        cache_channel = await stack.enter_async_context(
            router_channel(settings.router.cache_address, "cache")
        )
        yield routers, cache_service_pb2_grpc.CacheServiceStub(cache_channel), admin


def ask(text: str) -> pb.ChatRequest:
    return pb.ChatRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=MAX_TOKENS),
        cache_policy=pb.CACHE_POLICY_USE,
    )


def scope() -> cache_pb.CacheScope:
    # The router's scope for ask(): tenant "dev" (the dev key's), the alias,
    # the parameters as sent (max_tokens given, so nothing is resolved), and
    # the alias's route (its deployments' model).
    return cache_pb.CacheScope(
        tenant_id="dev",
        model="tiny-gpt",
        parameters=common_pb2.GenerationParameters(max_tokens=MAX_TOKENS),
        route="tiny-gpt",
    )


async def chat(router, text: str) -> tuple[str, pb.ChatCompletion]:
    return await answer_of(router.Chat(ask(text), metadata=AUTH))


def exact_hits_at_the_cache_service() -> float:
    return REGISTRY.get_sample_value("meshgate_cache_lookups_total", {"result": "exact_hit"}) or 0.0


async def warmed(routers, text: str) -> str:
    """Stores an answer for ``text`` and has every replica hold a copy;
    returns the answer. A copy is proven local: serving it again on every
    replica costs the cache service no exact hit. A replica keeps copies
    once it has heard the cache service's heartbeat (within a second of
    its start: waited for, up to HEARTBEAT_BOUND_S)."""
    answer, first = await chat(routers[0], text)
    assert first.cache_status == pb.CACHE_STATUS_MISS
    started = time.monotonic()
    while True:
        for router in routers:
            served, completion = await chat(router, text)
            assert completion.cache_status == pb.CACHE_STATUS_EXACT_HIT
            assert served == answer
        before = exact_hits_at_the_cache_service()
        for router in routers:
            for _ in range(3):
                served, completion = await chat(router, text)
                assert completion.cache_status == pb.CACHE_STATUS_EXACT_HIT
                assert served == answer
        if exact_hits_at_the_cache_service() == before:
            return answer
        assert time.monotonic() - started < HEARTBEAT_BOUND_S, "a replica kept no copy"
        await asyncio.sleep(0.1)


async def every_replica_stops_serving(routers, text: str, old: str) -> None:
    """Waits until no replica answers ``text`` with ``old`` any more. What
    comes instead is a miss, or a hit of the answer that miss stored (the
    model samples at its default temperature, so not ``old`` again)."""
    started = time.monotonic()
    pending = list(routers)
    while pending:
        assert time.monotonic() - started < NOTICE_BOUND_S, "a replica kept serving its copy"
        served, completion = await chat(pending[0], text)
        if completion.cache_status == pb.CACHE_STATUS_EXACT_HIT and served == old:
            await asyncio.sleep(0.02)
        else:
            pending.pop(0)


async def test_a_reported_wrong_hit_stops_every_replicas_copy(replicas):
    routers, cache, _ = replicas
    old = await warmed(routers, "hot exact report")
    question = [common_pb2.Message(role=common_pb2.ROLE_USER, content="hot exact report")]
    lookup = await cache.Lookup(cache_pb.LookupRequest(scope=scope(), messages=question))
    assert lookup.status == cache_pb.LOOKUP_STATUS_EXACT_HIT
    report = await cache.ReportWrongHit(
        cache_pb.ReportWrongHitRequest(
            scope=scope(),
            messages=question,
            entry_id=lookup.entry_id,
        )
    )
    assert report.entry_removed
    await every_replica_stops_serving(routers, "hot exact report", old)


async def test_a_copy_is_not_served_past_its_entrys_expiry(replicas):
    """Expiry announces nothing, so the copies must know when their entry
    goes: every replica served its copy after it, a hit the cache no longer
    had (here for up to COPY_MAX_AGE_S; by default 2 s)."""
    routers, cache, _ = replicas
    question = [common_pb2.Message(role=common_pb2.ROLE_USER, content="hot exact expiry")]
    stored = cache_pb.CachedAnswer(text="an answer kept two seconds", finish_reason="stop")
    await cache.Store(cache_pb.StoreRequest(scope=scope(), messages=question, answer=stored, ttl_seconds=2))
    expires = time.monotonic() + 2
    for router in routers:
        served, completion = await chat(router, "hot exact expiry")
        assert (served, completion.cache_status) == (stored.text, pb.CACHE_STATUS_EXACT_HIT)
    before = lookups_at_the_cache_service()
    for router in routers:
        served, completion = await chat(router, "hot exact expiry")
        assert (served, completion.cache_status) == (stored.text, pb.CACHE_STATUS_EXACT_HIT)
    assert lookups_at_the_cache_service() == before, "no copy was kept while the entry lived"

    await asyncio.sleep(expires + 0.1 - time.monotonic())
    for router in routers:
        served, completion = await chat(router, "hot exact expiry")
        assert served != stored.text, "a copy was served past its entry's expiry"


async def test_an_invalidate_stops_every_replicas_copies(replicas):
    routers, cache, _ = replicas
    old = {text: await warmed(routers, text) for text in ("hot exact one", "hot exact two")}
    invalidated = await cache.Invalidate(cache_pb.InvalidateRequest(tenant_id="dev", model="tiny-gpt"))
    assert invalidated.entries_removed >= 2
    for text, answer in old.items():
        await every_replica_stops_serving(routers, text, answer)


async def refreshed(router, text: str) -> str:
    """Generates and stores a new answer for ``text`` (CACHE_POLICY_REFRESH); returns it."""
    refresh = ask(text)
    refresh.cache_policy = pb.CACHE_POLICY_REFRESH
    new = ""
    async for response in router.Chat(refresh, metadata=AUTH):
        if response.HasField("delta"):
            new += response.delta.text
    return new


async def every_replica_serves_the_refresh(routers, text: str, old: str, new: str) -> None:
    """The refreshing replica (the first) drops its own copy at once; the
    other on the notice, well before the copies' age limit."""
    assert new != old, "the model samples at its default temperature"
    served, completion = await chat(routers[0], text)
    assert (served, completion.cache_status) == (new, pb.CACHE_STATUS_EXACT_HIT)
    started = time.monotonic()
    while (served := (await chat(routers[1], text))[0]) != new:
        assert served == old
        assert time.monotonic() - started < NOTICE_BOUND_S, "the other replica kept serving the old answer"
        await asyncio.sleep(0.02)


async def test_a_refresh_replaces_every_replicas_copy(replicas):
    routers, _, _ = replicas
    old = await warmed(routers, "hot exact refresh")
    new = await refreshed(routers[0], "hot exact refresh")
    await every_replica_serves_the_refresh(routers, "hot exact refresh", old, new)


async def test_a_refresh_of_a_prompt_with_a_semantic_hit_replaces_every_replicas_copy(replicas):
    """The copy is kept under the asked prompt's key but served the matched
    entry's answer; the refresh stores a new entry for the prompt itself,
    replacing nothing, and its notice must still reach the other replica."""
    routers, _, _ = replicas
    old, first = await chat(routers[0], "Why is the ocean salty?")
    assert first.cache_status == pb.CACHE_STATUS_MISS
    variant = "why is the ocean salty"
    for router in routers:
        for _ in range(2):
            served, completion = await chat(router, variant)
            assert (served, completion.cache_status) == (old, pb.CACHE_STATUS_SEMANTIC_HIT)
    new = await refreshed(routers[0], variant)
    await every_replica_serves_the_refresh(routers, variant, old, new)


def lookups_at_the_cache_service() -> float:
    return sum(
        REGISTRY.get_sample_value("meshgate_cache_lookups_total", {"result": result}) or 0.0
        for result in ("exact_hit", "semantic_hit", "miss")
    )


async def test_a_semantic_hit_is_kept_for_its_prompt_until_a_report_in_its_scope(replicas):
    """A semantic hit's copy answers a repeat of the very prompt asked (the
    lowercased variant, as mesh_bench's semantic row asks it), and a report
    of any wrong hit of that tenant and model drops it on every replica: the
    report makes the verifier stricter, so the verdict may no longer hold."""
    routers, cache, _ = replicas
    stored, first = await chat(routers[0], "Why is the sky blue?")
    assert first.cache_status == pb.CACHE_STATUS_MISS
    variant = "why is the sky blue"
    for router in routers:
        served, completion = await chat(router, variant)
        assert (served, completion.cache_status) == (stored, pb.CACHE_STATUS_SEMANTIC_HIT)
    before = lookups_at_the_cache_service()
    for router in routers:
        for _ in range(3):
            served, completion = await chat(router, variant)
            assert (served, completion.cache_status) == (stored, pb.CACHE_STATUS_SEMANTIC_HIT)
            assert 0.0 < completion.cache_similarity < 1.0
    assert lookups_at_the_cache_service() == before, "a repeat of the prompt went to the cache service"

    # Another entry of the same scope, reported wrong.
    await chat(routers[0], "hot semantic other entry")
    other = [common_pb2.Message(role=common_pb2.ROLE_USER, content="hot semantic other entry")]
    lookup = await cache.Lookup(cache_pb.LookupRequest(scope=scope(), messages=other))
    assert lookup.status == cache_pb.LOOKUP_STATUS_EXACT_HIT
    await cache.ReportWrongHit(
        cache_pb.ReportWrongHitRequest(scope=scope(), messages=other, entry_id=lookup.entry_id)
    )
    started = time.monotonic()
    for router in routers:
        while True:
            before = lookups_at_the_cache_service()
            await chat(router, variant)
            if lookups_at_the_cache_service() > before:
                break  # asked the cache service again: the copy is gone
            assert time.monotonic() - started < NOTICE_BOUND_S, "a replica kept its semantic copy"
            await asyncio.sleep(0.02)


async def test_a_tenant_reports_a_wrong_hit_through_the_router(replicas):
    """The caller of a hit, not only the router's own code, can say it was
    wrong: the completion names the entry, the report takes it away from
    that request on every replica, and the cache keeps it from it after."""
    routers, cache, _ = replicas
    old = await warmed(routers, "hot exact report through the router")
    served, hit = await chat(routers[1], "hot exact report through the router")
    assert (served, hit.cache_status) == (old, pb.CACHE_STATUS_EXACT_HIT) and hit.cache_entry_id
    _, generated = await chat(routers[0], "a question asked once through the router")
    assert generated.cache_status == pb.CACHE_STATUS_MISS and not generated.cache_entry_id

    report = await routers[0].ReportWrongHit(
        pb.ReportWrongHitRequest(
            request=ask("hot exact report through the router"), cache_entry_id=hit.cache_entry_id
        ),
        metadata=AUTH,
        timeout=30,
    )
    assert report.entry_removed
    await every_replica_stops_serving(routers, "hot exact report through the router", old)

    # A session turn's hit was matched on its history: not reportable so.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await routers[0].ReportWrongHit(
            pb.ReportWrongHitRequest(
                request=pb.ChatRequest(model="tiny-gpt", session_id="s", messages=ask("x").messages),
                cache_entry_id=hit.cache_entry_id,
            ),
            metadata=AUTH,
            timeout=30,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(refused.value).reason == "UNSUPPORTED_PARAMETER"


async def test_the_admin_credential_invalidates_a_tenants_cache_through_the_router(replicas):
    routers, _, admin = replicas
    old = await warmed(routers, "hot exact admin invalidate")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await admin.InvalidateCache(
            admin_service_pb2.InvalidateCacheRequest(tenant_id="dev"), metadata=AUTH, timeout=30
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # a tenant's key is no admin's
    removed = await admin.InvalidateCache(
        admin_service_pb2.InvalidateCacheRequest(tenant_id="dev", model="tiny-gpt"),
        metadata=ADMIN,
        timeout=30,
    )
    assert removed.entries_removed >= 1
    await every_replica_stops_serving(routers, "hot exact admin invalidate", old)


async def test_a_turn_generating_across_an_invalidate_does_not_store_its_answer(replicas):
    """The turn's lookup missed before the Invalidate and its Store came
    after: the answer from before was kept and the next ask was an exact
    hit of it. The router passes its lookup's store_fence to the Store,
    which the cache undoes."""
    routers, _, admin = replicas
    request = ask("hot exact invalidated mid-generation")
    request.parameters.max_tokens = 64
    call = routers[0].Chat(request, metadata=AUTH)
    first = await call.read()
    assert first.HasField("delta")  # generating: the lookup missed, the Store is still to come
    await admin.InvalidateCache(
        admin_service_pb2.InvalidateCacheRequest(tenant_id="dev", model="tiny-gpt"),
        metadata=ADMIN,
        timeout=30,
    )
    _, completion = await answer_of(call)
    assert completion.cache_status == pb.CACHE_STATUS_MISS
    _, again = await answer_of(routers[1].Chat(request, metadata=AUTH))
    assert again.cache_status == pb.CACHE_STATUS_MISS


async def test_a_refresh_generating_across_an_invalidate_does_not_store_its_answer(replicas):
    """A CACHE_POLICY_REFRESH turn looks nothing up, so it had no lookup's
    store_fence: its Store, after the Invalidate, kept the answer generated
    before it, and the next ask was an exact hit of it. The router reads
    the fence alone before such a turn generates."""
    routers, _, admin = replicas
    request = ask("hot exact refreshed across an invalidate")
    request.parameters.max_tokens = 64
    request.cache_policy = pb.CACHE_POLICY_REFRESH
    call = routers[0].Chat(request, metadata=AUTH)
    first = await call.read()
    assert first.HasField("delta")  # generating: the Store is still to come
    await admin.InvalidateCache(
        admin_service_pb2.InvalidateCacheRequest(tenant_id="dev", model="tiny-gpt"),
        metadata=ADMIN,
        timeout=30,
    )
    _, completion = await answer_of(call)
    assert completion.cache_status == pb.CACHE_STATUS_MISS  # generated, to be stored
    request.cache_policy = pb.CACHE_POLICY_USE
    _, again = await answer_of(routers[1].Chat(request, metadata=AUTH))
    assert again.cache_status == pb.CACHE_STATUS_MISS


async def test_a_turn_joining_a_generation_begun_before_an_invalidate_does_not_store_its_answer(
    replicas, monkeypatch
):
    """A greedy turn joined an identical one's generation that had begun
    before an InvalidateCache; its own lookup came after it, so its Store's
    fence held while the first turn's was refused, and the answer from
    before the Invalidate was the next ask's exact hit. A shared
    generation's answer carries the fence its starting turn read before it
    began."""
    routers, _, admin = replicas
    request = ask("hot exact shared across an invalidate")
    request.parameters.temperature = 0.0  # greedy: identical turns share one generation

    # The shared generation holds after its first piece until the joiner is
    # in, so the joiner surely joins it (tiny-gpt could finish first).
    joiner_in = asyncio.Event()
    real_generate = downstream.Deployments.generate

    async def held_generate(self, *args, **kwargs):
        async with contextlib.aclosing(real_generate(self, *args, **kwargs)) as pieces:
            async for text in pieces:
                yield text
                await joiner_in.wait()

    monkeypatch.setattr(downstream.Deployments, "generate", held_generate)
    # Whether each turn found the generation under way (the routers run in
    # this process, so their coalescers are this module's class).
    joined: list[bool] = []
    real_join = coalescing.Coalescer.generate

    def recording_join(self, flight_key, *args):
        joined.append(flight_key is not None and flight_key in self._flights)  # noqa: SLF001
        return real_join(self, flight_key, *args)

    monkeypatch.setattr(coalescing.Coalescer, "generate", recording_join)

    starter = routers[0].Chat(request, metadata=AUTH)
    first = await starter.read()
    assert first.HasField("delta")  # generating: its lookup missed, the Store is still to come
    await admin.InvalidateCache(
        admin_service_pb2.InvalidateCacheRequest(tenant_id="dev", model="tiny-gpt"),
        metadata=ADMIN,
        timeout=30,
    )
    joiner = routers[0].Chat(request, metadata=AUTH)
    caught_up = await joiner.read()
    assert caught_up.HasField("delta") and caught_up.delta.text == first.delta.text
    assert joined == [False, True], "the second turn did not join the generation under way"
    joiner_in.set()
    started_text, started = await answer_of(starter)
    joined_text, joined_completion = await answer_of(joiner)
    assert started_text == joined_text
    assert started.cache_status == joined_completion.cache_status == pb.CACHE_STATUS_MISS
    _, again = await answer_of(routers[1].Chat(request, metadata=AUTH))
    assert again.cache_status == pb.CACHE_STATUS_MISS
