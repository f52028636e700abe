"""Writes Redis refuses, answered UNAVAILABLE (retry later) rather than
INTERNAL: out of memory under ``noeviction``, and a master demoted to a
replica (READONLY, what a failover does to the old master). Each service's
writes are Lua scripts, whose refusals this Redis reports wrapped in a plain
"Error running script" reply (meshgate/redis_access.py _Parser). A Redis of
this module's own, as the test changes its configuration."""

from __future__ import annotations

import contextlib
import uuid

import grpc
import pytest
import redis.asyncio as redis
import structlog.testing

from meshgate import redis_access
from meshgate.cache.v1 import cache_service_pb2 as pb
from meshgate.common.v1 import common_pb2
from meshgate.errors import MeshgateError
from meshgate.local.stack import free_port
from services.cache import keys as cache_keys
from services.context.store import SessionStore, session_keys
from tests.conftest import own_redis_server
from tests.integration.test_cache_servicer import (
    PARAPHRASE,
    STORED,
    FakeEmbedder,
    conversation,
    lookup,
    make_servicer,
    scope,
    store,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    with own_redis_server(tmp_path_factory.mktemp("refusals")) as url:
        yield url


@contextlib.asynccontextmanager
async def out_of_memory(client):
    await client.config_set("maxmemory-policy", "noeviction")
    await client.config_set("maxmemory", "1")
    try:
        yield
    finally:
        await client.config_set("maxmemory", "0")


@contextlib.asynccontextmanager
async def demoted(client):
    # A replica of a master nobody serves: it refuses writes, as the old
    # master does once a failover has made it a replica.
    await client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
    try:
        yield
    finally:
        await client.execute_command("REPLICAOF", "NO", "ONE")


@pytest.mark.parametrize("refusal", [out_of_memory, demoted], ids=["out of memory", "read only"])
async def test_a_refused_append_is_unavailable_and_stores_nothing(own_redis, refusal):
    client = redis_access.connect(own_redis)
    store = SessionStore(client, ttl_s=60)
    session = uuid.uuid4().hex
    turn = [common_pb2.Message(role=common_pb2.ROLE_USER, content="hello")]
    try:
        await store.create("acme", session)
        async with refusal(client):
            with pytest.raises(MeshgateError) as refused:
                await store.append("acme", session, None, turn, {})
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert refused.value.reason == "REDIS_UNAVAILABLE"
        assert (await store.read("acme", session)).version == 0
        # Once Redis takes writes again, the same append goes through.
        assert (await store.append("acme", session, None, turn, {})).version == 1
    finally:
        await client.aclose()


async def test_a_redis_that_may_evict_the_meshs_keys_is_named_at_start(own_redis):
    """Every key the mesh writes has a TTL, so a volatile-* policy reaches
    them all, and not together: a cache entry outlived its wrong-hit report
    and was served again. Said at start, loudly; noeviction (or no memory
    limit) says nothing."""
    client = await redis_access.connect_checked(own_redis)
    try:
        assert await redis_access.eviction_policy(client) is None
        await client.config_set("maxmemory-policy", "volatile-lru")
        assert await redis_access.eviction_policy(client) is None  # no memory limit: nothing is evicted
        await client.config_set("maxmemory", "1gb")
        assert await redis_access.eviction_policy(client) == "volatile-lru"
        with structlog.testing.capture_logs() as logs:
            await (await redis_access.connect_checked(own_redis)).aclose()
        said = [entry["maxmemory_policy"] for entry in logs if entry["log_level"] == "error"]
        assert said == ["volatile-lru"]
    finally:
        await client.config_set("maxmemory", "0")
        await client.config_set("maxmemory-policy", "noeviction")
        await client.aclose()


async def test_a_full_redis_refuses_new_sessions_and_forks(own_redis):
    """Redis checks a script for memory at its first write only, and a
    command that frees memory (DEL) passes that check: creating a session
    and forking one cleared the id's leftovers first, so neither was ever
    refused, and a tenant creating sessions took a full Redis past its
    maxmemory without end (20,000 empty sessions took one of 1 MB to
    7.6 MB), where every other write of every tenant was refused."""
    client = redis_access.connect(own_redis)
    store = SessionStore(client, ttl_s=60)
    source, created, forked = (uuid.uuid4().hex for _ in range(3))
    turn = [common_pb2.Message(role=common_pb2.ROLE_USER, content="hello")]
    try:
        await store.create("acme", source)
        await store.append("acme", source, None, turn, {})
        async with out_of_memory(client):
            writes = (lambda: store.create("acme", created), lambda: store.fork("acme", source, 1, forked))
            for write in writes:
                with pytest.raises(MeshgateError) as refused:
                    await write()
                assert refused.value.code == grpc.StatusCode.UNAVAILABLE
                assert refused.value.reason == "REDIS_UNAVAILABLE"
        # Nothing of either was stored: both ids are free, and both writes go through now.
        for session in (created, forked):
            assert await client.exists(*session_keys("acme", session)) == 0
        await store.create("acme", created)
        assert await store.fork("acme", source, 1, forked)
    finally:
        await client.aclose()


async def test_a_full_redis_takes_a_wrong_hit_report_and_the_answer_is_not_served_again(own_redis):
    """A report deletes the entry it names, which frees memory: its script
    kept the pair first, so a full Redis refused it (and the tenant's charge
    before it) and the answer named wrong went on being served (a review)."""
    client = redis_access.connect(own_redis)
    servicer = make_servicer(client, FakeEmbedder())
    s = scope(f"t-{uuid.uuid4().hex[:8]}")
    try:
        entry_id = await store(servicer, s, conversation(STORED), text="Practice daily.")
        assert (await lookup(servicer, s, conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_SEMANTIC_HIT
        request = pb.ReportWrongHitRequest(scope=s, messages=conversation(PARAPHRASE), entry_id=entry_id)
        async with out_of_memory(client):
            assert (await servicer.ReportWrongHit(request, None)).entry_removed
            assert (await lookup(servicer, s, conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS
        # The pair was kept: the entry stored again is still not served to the reported prompt.
        assert await store(servicer, s, conversation(STORED), text="Practice daily.") == entry_id
        assert (await lookup(servicer, s, conversation(PARAPHRASE))).status != pb.LOOKUP_STATUS_SEMANTIC_HIT
    finally:
        await client.aclose()


async def test_a_full_redis_takes_an_invalidate_and_its_entries_are_not_served_again(own_redis):
    """The mark, an Invalidate's fence for Stores in flight, was its first
    write: a full Redis refused it, nothing was deleted, and the tenant's
    entries went on being served (a review). Deletes pass a full Redis, so
    the entries go; with the memory they freed the mark is written and a
    second pass made after it (OK), and while Redis is still too full for
    the mark the call is UNAVAILABLE, its entries gone all the same, and
    the retry fences."""
    client = redis_access.connect(own_redis)
    servicer = make_servicer(client, FakeEmbedder())
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    scopes = [scope(tenant, max_tokens=n) for n in range(1, 41)]
    try:
        for s in scopes:
            await store(servicer, s, conversation(STORED), text="x" * 20_000)
        await client.config_set("maxmemory-policy", "noeviction")
        # Full: below what Redis uses, and above what it will once the entries are gone.
        await client.config_set("maxmemory", str((await client.info("memory"))["used_memory"] - 100_000))
        try:
            with pytest.raises(redis.OutOfMemoryError):
                await client.set(f"probe-{tenant}", "x")
            removed = await servicer.Invalidate(pb.InvalidateRequest(tenant_id=tenant), None)
        finally:
            await client.config_set("maxmemory", "0")
        assert removed.entries_removed == len(scopes)
        for s in scopes:
            assert (await lookup(servicer, s, conversation(STORED))).status == pb.LOOKUP_STATUS_MISS
        # The fence was written, for the Stores in flight across it.
        assert await client.hget(cache_keys.invalidated_key(tenant), "")

        await store(servicer, scopes[0], conversation(STORED))
        async with out_of_memory(client):
            with pytest.raises(MeshgateError) as refused:
                await servicer.Invalidate(pb.InvalidateRequest(tenant_id=tenant), None)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            assert (await lookup(servicer, scopes[0], conversation(STORED))).status == pb.LOOKUP_STATUS_MISS
        await servicer.Invalidate(pb.InvalidateRequest(tenant_id=tenant), None)
    finally:
        await client.aclose()
