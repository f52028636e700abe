"""One tenant's storage against the others': every tenant's sessions,
cache entries and usage live in one Redis, which, full (maxmemory under
noeviction, as docs/configuration.md asks), refuses every tenant's writes. A Redis of
this module's own, its memory bounded by the test (CONFIG SET), the cache's
servicer and the context's store over it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid

import grpc
import numpy as np
import pytest

from meshgate import redis_access
from meshgate.cache.v1 import cache_service_pb2 as pb
from meshgate.common.v1 import common_pb2
from meshgate.config import CacheSettings
from meshgate.embedding import Embedding
from meshgate.errors import MeshgateError
from services.cache.embedding_memo import EmbeddingMemo
from services.cache.index import IndexRegistry
from services.cache.servicer import CacheServicer
from services.cache.stats import Stats
from services.cache.store import CacheStore
from services.context.store import SessionStore
from tests.conftest import own_redis_server

pytestmark = pytest.mark.integration

# Room for every tenant's writes above what Redis held at the test's start.
ROOM = 16 * 1024 * 1024
ANSWER = "x" * 1000  # ~256 tokens
USER, ASSISTANT = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    with own_redis_server(tmp_path_factory.mktemp("shared-storage")) as url:
        yield url


@contextlib.asynccontextmanager
async def bounded(url):
    """A client of a Redis that takes ROOM bytes more, then refuses writes;
    emptied after."""
    client = redis_access.connect(url)
    await client.config_set("maxmemory-policy", "noeviction")
    await client.config_set("maxmemory", str(await used_memory(client) + ROOM))
    try:
        yield client
    finally:
        await client.config_set("maxmemory", "0")
        await client.flushdb()
        await client.aclose()


async def used_memory(client) -> int:
    return int((await client.info("memory"))["used_memory"])


class Embedder:
    """minilm's size, a direction of the text's own."""

    async def embed_or_none(self, text: str, timeout_s: float | None = None, tenant_id: str = ""):
        seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
        vector = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
        return Embedding(vector / np.linalg.norm(vector), "minilm@test")


def cache_servicer(client, **settings) -> CacheServicer:
    settings = CacheSettings(**settings)
    return CacheServicer(
        settings,
        CacheStore(client, settings.max_entries_per_partition),
        EmbeddingMemo(Embedder(), settings.embedding_model, 0),
        Stats(client),
        IndexRegistry(settings.max_entries_per_partition, 1000, settings.approximate_index_from),
        verifier=None,  # Stores only: nothing is verified
    )


def store_request(tenant: str, n: int) -> pb.StoreRequest:
    """The n-th of the tenant's answers, each in a partition of its own
    (another temperature) as a tenant's client may ask."""
    parameters = common_pb2.GenerationParameters(temperature=1 + n / 100_000)
    return pb.StoreRequest(
        scope=pb.CacheScope(tenant_id=tenant, model="tiny-gpt", parameters=parameters),
        messages=[common_pb2.Message(role=USER, content=f"question number {n} about something")],
        answer=pb.CachedAnswer(text=ANSWER),
    )


def turn(question: str = "hello", answer: str = "hi") -> list[common_pb2.Message]:
    return [
        common_pb2.Message(role=USER, content=question),
        common_pb2.Message(role=ASSISTANT, content=answer),
    ]


async def a_turn_is_appended(sessions: SessionStore, tenant: str) -> None:
    session = uuid.uuid4().hex
    await sessions.create(tenant, session)
    assert (await sessions.append(tenant, session, None, turn(), {})).version == 1


async def test_one_tenants_cache_entries_leave_the_others_room(own_redis):
    """Without a bound, tenant A's answers (4,341 Stores, each 3.9 KB of
    Redis, 3 s) filled the 16 MiB, and then B's Store failed UNAVAILABLE,
    and B's session writes once A's next Stores took the last bytes.
    cache.max_bytes_per_tenant refuses A alone, before."""
    async with bounded(own_redis) as client:
        quota = 4 * 1024 * 1024
        cache = cache_servicer(client, max_bytes_per_tenant=quota)
        before = await used_memory(client)
        with pytest.raises(MeshgateError) as refused:
            for n in range(5_000):  # 20 MB of answers and more, were each stored
                await cache.Store(store_request("tenant-a", n), None)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.reason == "CACHE_QUOTA_EXCEEDED"
        assert refused.value.metadata["limit"] == "max_bytes_per_tenant"
        # What A holds is within its bound, and not far below it: what each
        # Store charges is measured from Redis's memory (0.93 of the bound
        # here, on redis-server 6.2; another allocator may differ a little).
        held = await used_memory(client) - before
        assert quota * 0.75 <= held <= quota
        # The neighbour's writes go through: a session's turn, and an answer.
        await a_turn_is_appended(SessionStore(client, ttl_s=60), "tenant-b")
        await cache.Store(store_request("tenant-b", 0), None)
        # A's own count lies apart from its entries' keys, in its own slot.
        with pytest.raises(MeshgateError):
            await cache.Store(store_request("tenant-a", 0), None)


async def test_one_tenants_sessions_leave_the_others_room(own_redis):
    """Without a bound, tenant A's session turns, a 4 KB message and a 1 KB
    answer each, in sessions of 100 turns, filled the 16 MiB in 3,246
    appends (5.2 KB of Redis each, 0.9 s), far under
    context.max_session_bytes (24 MiB a session) and with no bound on
    sessions per tenant; then B's first append failed UNAVAILABLE
    (REDIS_UNAVAILABLE). context.max_bytes_per_tenant refuses A alone,
    before; a session A deletes gives its bytes back."""
    async with bounded(own_redis) as client:
        quota = 4 * 1024 * 1024
        sessions = SessionStore(client, ttl_s=60, max_bytes_per_tenant=quota)
        before = await used_memory(client)
        first = None
        with pytest.raises(MeshgateError) as refused:
            for n in range(10_000):  # 50 MB of turns, were each stored
                if n % 100 == 0:
                    session = uuid.uuid4().hex
                    await sessions.create("tenant-a", session)
                    first = first or session
                await sessions.append("tenant-a", session, None, turn("u" * 4000, ANSWER), {})
        assert_quota_refusal(refused.value, quota)
        # Turns the size of B's are refused A too: each counts its overhead.
        with pytest.raises(MeshgateError) as refused:
            for _ in range(10_000):
                await sessions.append("tenant-a", session, None, turn(), {})
        assert_quota_refusal(refused.value, quota)
        # What A holds is within its bound, and not far below it: what each
        # session and turn counts is measured from Redis's memory, with the
        # turn index (not written here) included, and ~0.7 of the bound's
        # bytes here are the store's own (redis-server 6.2).
        held = await used_memory(client) - before
        assert quota * 0.5 <= held <= quota
        # The neighbour's writes go through.
        await a_turn_is_appended(sessions, "tenant-b")
        # A's deleted session's bytes (~100 turns of 5 KB) are A's again.
        await sessions.delete("tenant-a", first)
        await a_turn_is_appended(sessions, "tenant-a")


async def test_a_tenant_making_empty_sessions_holds_no_more_than_its_bound(own_redis):
    """Each empty session took 1,003 bytes of Redis (meta and version
    history, its fields in the tenant's record, its entries in the tenant's
    listing; 32-character ids, redis-server 6.2) and was counted 512: a
    tenant creating sessions until refused held twice its bound (735 bytes a
    session before the listing, 1.4 times)."""
    async with bounded(own_redis) as client:
        quota = 1024 * 1024
        sessions = SessionStore(client, ttl_s=60, max_bytes_per_tenant=quota)
        before = await used_memory(client)
        with pytest.raises(MeshgateError) as refused:
            for _ in range(10_000):  # 10 MB of sessions, were each made
                await sessions.create("tenant-a", uuid.uuid4().hex)
        assert_quota_refusal(refused.value, quota)
        held = await used_memory(client) - before
        assert quota * 0.5 <= held <= quota


def assert_quota_refusal(error: MeshgateError, quota: int) -> None:
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_QUOTA_EXCEEDED")
    assert error.metadata["limit"] == "max_bytes_per_tenant"
    assert error.metadata["scope"] == "tenant"
    assert error.metadata["limit_value"] == str(quota)
    assert int(error.metadata["bytes"]) <= quota


async def test_reverted_and_expired_sessions_give_the_tenant_its_bytes_back(own_redis):
    """The record holds each session's bytes as its last write left them:
    a revert lowers them, and sessions that expire stop counting."""
    async with bounded(own_redis) as client:
        quota = 64 * 1024
        sessions = SessionStore(client, ttl_s=1, max_bytes_per_tenant=quota)
        session = uuid.uuid4().hex
        await sessions.create("tenant-a", session)
        with pytest.raises(MeshgateError) as refused:
            for _ in range(100):
                await sessions.append("tenant-a", session, None, turn("u" * 4000, ANSWER), {})
        assert_quota_refusal(refused.value, quota)
        await sessions.revert("tenant-a", session, 0, None)
        await sessions.append("tenant-a", session, None, turn("u" * 4000, ANSWER), {})
        # Filled again, in sessions of its own this time; then they expire.
        with pytest.raises(MeshgateError) as refused:
            for _ in range(100):
                await a_turn_is_appended(sessions, "tenant-a")
                await sessions.append("tenant-a", session, None, turn("u" * 4000, ANSWER), {})
        assert_quota_refusal(refused.value, quota)
        await asyncio.sleep(1.1)
        await a_turn_is_appended(sessions, "tenant-a")
