"""A Redis restart under running context and cache services: the requests
right after it succeed, on every pooled connection, and nothing written
before it is lost (same port, same append-only file); a turn whose
cache lookup failed while Redis was down does not store its answer once
it is back; and the services' pub/sub listeners log the outage once as it
begins and once as it ends."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import signal
import subprocess
import uuid

import pytest
import structlog

from meshgate import cache_notices
from meshgate.cache.v1 import cache_service_pb2 as cache_pb
from meshgate.cache.v1 import cache_service_pb2_grpc
from meshgate.common.v1 import common_pb2
from meshgate.config import Settings
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.local import redis_server
from meshgate.local.stack import free_port
from meshgate.router.v1 import router_service_pb2 as router_pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.cache import app as cache_app
from services.context import app as context_app
from services.context.store import CHANGES_CHANNEL
from tests.integration.conftest import answer_of, running, running_router, service_settings
from tests.mesh import bounded_channel, mesh_settings, router_channel

pytestmark = pytest.mark.integration

# Enough concurrent calls that each service's pool holds many connections,
# every one of which the restart leaves stale.
CONCURRENCY = 24


def question(i: int) -> list[common_pb2.Message]:
    return [common_pb2.Message(role=common_pb2.ROLE_USER, content=f"question {i}")]


def scope(tenant: str) -> cache_pb.CacheScope:
    return cache_pb.CacheScope(
        tenant_id=tenant, model="tiny-gpt", parameters=common_pb2.GenerationParameters(max_tokens=8)
    )


class Redis:
    """A redis-server on a fixed port and data directory, killed and restarted."""

    def __init__(self, data_dir: pathlib.Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = redis_server.launch(self.port, self.data_dir)
        redis_server.wait_ready(self.port)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


async def test_requests_right_after_a_redis_restart_succeed(tmp_path: pathlib.Path) -> None:
    store = Redis(tmp_path)
    store.start()
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = f"redis://127.0.0.1:{store.port}/0"
    # Exact lookups only: this test is about Redis, not embeddings (no
    # inference service, and the cache's own model not loaded).
    settings.cache.embedder = "inference"
    settings.cache.inference_address = f"127.0.0.1:{free_port()}"
    try:
        async with (
            running(context_app, "context", settings) as context_address,
            running(cache_app, "cache", settings) as cache_address,
            router_channel(context_address, "context") as context_channel,
            router_channel(cache_address, "cache") as cache_channel,
        ):
            sessions = context_service_pb2_grpc.ContextServiceStub(context_channel)
            cache = cache_service_pb2_grpc.CacheServiceStub(cache_channel)

            async def append(session_id: str, text: str, expected_version: int) -> int:
                response = await sessions.AppendTurns(
                    context_pb.AppendTurnsRequest(
                        tenant_id=tenant,
                        session_id=session_id,
                        expected_version=expected_version,
                        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
                    ),
                    timeout=10,
                )
                return response.version

            async def get(session_id: str) -> list[str]:
                response = await sessions.GetSession(
                    context_pb.GetSessionRequest(tenant_id=tenant, session_id=session_id), timeout=10
                )
                return [m.content for m in response.session.messages]

            async def lookup(i: int) -> int:
                response = await cache.Lookup(
                    cache_pb.LookupRequest(scope=scope(tenant), messages=question(i)), timeout=10
                )
                return response.status

            async def store_answer(i: int) -> None:
                await cache.Store(
                    cache_pb.StoreRequest(
                        scope=scope(tenant),
                        messages=question(i),
                        answer=cache_pb.CachedAnswer(text=f"answer {i}"),
                    ),
                    timeout=10,
                )

            created = await asyncio.gather(
                *(
                    sessions.CreateSession(context_pb.CreateSessionRequest(tenant_id=tenant), timeout=10)
                    for _ in range(CONCURRENCY)
                )
            )
            session_ids = [c.session.session_id for c in created]
            await asyncio.gather(*(append(s, "before", 0) for s in session_ids))
            await asyncio.gather(*(store_answer(i) for i in range(CONCURRENCY)))

            await asyncio.to_thread(store.kill)
            await asyncio.to_thread(store.start)

            # No pause, no retry loop: the very first calls must succeed.
            after = await asyncio.gather(*(get(s) for s in session_ids), return_exceptions=True)
            failed = [r for r in after if isinstance(r, BaseException)]
            assert not failed, f"{len(failed)} of {len(after)} reads failed after the restart: {failed[0]}"
            assert after == [["before"]] * CONCURRENCY, "turns acknowledged before the kill were lost"

            hits = await asyncio.gather(*(lookup(i) for i in range(CONCURRENCY)), return_exceptions=True)
            assert hits == [cache_pb.LOOKUP_STATUS_EXACT_HIT] * CONCURRENCY, hits

            versions = await asyncio.gather(*(append(s, "after", 1) for s in session_ids))
            assert versions == [2] * CONCURRENCY
            assert await get(session_ids[0]) == ["before", "after"]
    finally:
        store.stop()


async def test_a_turn_whose_lookup_failed_does_not_store_an_answer_generated_across_an_invalidate(
    tmp_path: pathlib.Path, inference_address: str
) -> None:
    """The lookup failed (the cache's Redis down), so the turn had no
    store_fence; Redis came back and the tenant was invalidated while it
    generated, and its unfenced Store kept the answer from before the
    Invalidate: the next ask was an exact hit of it."""
    store = Redis(tmp_path)
    store.start()
    key = "redis-restart-key"
    settings = service_settings(f"redis://127.0.0.1:{store.port}/0", inference_address, key)
    auth = [("authorization", f"Bearer {key}")]
    request = router_pb.ChatRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="asked while the cache was down")],
        # Long enough that Redis restarts and the Invalidate lands while it generates.
        parameters=common_pb2.GenerationParameters(max_tokens=256),
        cache_policy=router_pb.CACHE_POLICY_USE,
    )
    try:
        async with (
            running_router(settings) as router_address,
            bounded_channel(router_address) as channel,
            router_channel(settings.router.cache_address, "cache") as cache_channel,
        ):
            router = router_service_pb2_grpc.RouterServiceStub(channel)
            cache = cache_service_pb2_grpc.CacheServiceStub(cache_channel)
            await asyncio.to_thread(store.kill)
            call = router.Chat(request, metadata=auth)
            first = await call.read()
            assert first.HasField("delta")  # the lookups failed: generated, the Store still to come
            await asyncio.to_thread(store.start)
            await cache.Invalidate(cache_pb.InvalidateRequest(tenant_id="dev", model="tiny-gpt"), timeout=10)
            _, completion = await answer_of(call)
            assert completion.cache_status == router_pb.CACHE_STATUS_MISS
            _, again = await answer_of(router.Chat(request, metadata=auth))
            assert again.cache_status == router_pb.CACHE_STATUS_MISS
    finally:
        store.stop()


async def test_a_redis_outage_is_logged_once_as_it_begins_and_once_as_it_ends_by_each_listener(
    tmp_path: pathlib.Path,
) -> None:
    """The router's (cache notices) and the context service's (session
    changes) pub/sub listeners retry every 0.5 s while Redis is down, and
    each retry logged a warning: two lines a second per listener, per
    replica, for as long as the outage lasted."""
    store = Redis(tmp_path)
    store.start()
    settings = service_settings(f"redis://127.0.0.1:{store.port}/0", f"127.0.0.1:{free_port()}", "outage-key")
    # No model of the cache's own to load: nothing here embeds.
    settings.cache.embedder = "inference"
    lost, back = "notices lost; local copy bypassed until back", "notices heard again; local copy in use"
    channels = (cache_notices.CHANNEL, CHANGES_CHANNEL)
    try:
        async with running_router(settings):
            with structlog.testing.capture_logs() as logs:
                await asyncio.to_thread(store.kill)
                # Several retries' worth of outage.
                await asyncio.sleep(2.5)
                await asyncio.to_thread(store.start)
                # Until both listeners say so (within a retry and a
                # reconnect); checked below either way.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        while sum(log["event"] == back for log in logs) < len(channels):
                            await asyncio.sleep(0.1)
    finally:
        store.stop()
    for channel in channels:
        told = [(log["log_level"], log["event"]) for log in logs if log.get("channel") == channel]
        assert [entry for entry in told if entry[0] != "debug"] == [("warning", lost), ("info", back)], told
        # The retries in between were made (each at debug level), not skipped.
        assert len(told) > 3, told
