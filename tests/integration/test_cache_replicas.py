"""Two real cache service processes (``python -m services.cache``, as
``meshgate up`` starts one) on one real Redis, each with its own embedder
(the default local minilm) and its own metrics endpoint: what one replica
removes from Redis leaves the other's resident index too."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate.cache.v1 import cache_service_pb2 as pb
from meshgate.cache.v1 import cache_service_pb2_grpc
from meshgate.common.v1 import common_pb2
from meshgate.local import children
from meshgate.local.stack import REPO_ROOT, free_port
from tests.mesh import mesh_settings, router_channel

pytestmark = pytest.mark.integration

USER = common_pb2.ROLE_USER
STORED = "What is the quickest way to learn Python?"
PARAPHRASE = "How can I learn Python fast?"


def _toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Replica:
    """One cache service process: its gRPC address and metrics URL."""

    def __init__(self, directory: pathlib.Path, name: str, redis_url: str, mesh) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.log_path = directory / f"{name}.log"
        config = directory / f"{name}.toml"
        config.write_text(f"""
[telemetry]
exporter = "none"

[redis]
url = {_toml(redis_url)}

[mesh]
ca_file = {_toml(mesh.ca_file)}
cert_file = {_toml(mesh.cert_file)}
key_file = {_toml(mesh.key_file)}

[cache]
metrics_listen = "127.0.0.1:{metrics_port}"
# As tests/integration/test_cache_service.py: the paraphrase is a hit.
semantic_threshold = 0.9
max_false_hit_rate = 0.1
""")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("REDIS_URL", None)
        env.pop("MESHGATE_CONFIG", None)
        with open(self.log_path, "ab") as log:
            self.process = children.start(
                [sys.executable, "-m", "services.cache", "--config", str(config), "--listen", self.address],
                cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_serving(self, channel: grpc.aio.Channel, timeout_s: float = 90.0) -> None:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, f"cache replica exited:\n{self.log()}"
            with contextlib.suppress(grpc.aio.AioRpcError):
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            assert time.monotonic() < deadline, f"cache replica never served:\n{self.log()}"
            await asyncio.sleep(0.1)

    async def resident_entries(self) -> float:
        def read() -> str:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
                return response.read().decode()

        for line in (await asyncio.to_thread(read)).splitlines():
            if line.startswith("meshgate_cache_resident_entries "):
                return float(line.split()[1])
        raise AssertionError("no meshgate_cache_resident_entries")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture(scope="module")
async def replicas(redis_url, tmp_path_factory):
    """Two cache replicas on one Redis, and a stub of each (as the router)."""
    directory = tmp_path_factory.mktemp("cache-replicas")
    mesh = mesh_settings()
    started = [Replica(directory, name, redis_url, mesh) for name in ("a", "b")]
    async with contextlib.AsyncExitStack() as stack:
        for replica in started:
            stack.callback(replica.stop)
        stubs = []
        for replica in started:
            channel = await stack.enter_async_context(router_channel(replica.address, "cache"))
            await replica.wait_serving(channel)
            stubs.append(cache_service_pb2_grpc.CacheServiceStub(channel))
        yield list(zip(started, stubs, strict=True))


def scope(tenant: str) -> pb.CacheScope:
    return pb.CacheScope(
        tenant_id=tenant, model="tiny-gpt", parameters=common_pb2.GenerationParameters(max_tokens=64)
    )


def question(text: str) -> list[common_pb2.Message]:
    return [common_pb2.Message(role=USER, content=text)]


async def resident_becomes(replica: Replica, expected: float, timeout_s: float = 30.0) -> None:
    """Waits for the replica's resident entries to read ``expected`` (the
    check against Redis runs beside the lookup that starts it)."""
    deadline = time.monotonic() + timeout_s
    while (found := await replica.resident_entries()) != expected:
        assert time.monotonic() < deadline, f"resident entries {found}, not {expected}"
        await asyncio.sleep(0.05)


async def test_a_replica_drops_rows_of_entries_another_replica_removed(replicas, tenant):
    """A bug hunt: a replica's index learns what other replicas store (its
    top-ups read what is new) and evict (it evicts its oldest as the store
    does), but not what they remove otherwise: after replica A's wrong-hit
    report and then its Invalidate, replica B's index kept all 3 rows
    (meshgate_cache_resident_entries 3, where Redis held 2, then none) until
    they expired, a day. Never served (a hit's answer is read from Redis),
    but counted, and held against cache.max_resident_rows."""
    (_, to_a), (b, to_b) = replicas
    s = scope(tenant)
    for text in (STORED, "Who wrote the play Hamlet?", "How far away is the Moon from the Earth?"):
        await to_a.Store(
            pb.StoreRequest(scope=s, messages=question(text), answer=pb.CachedAnswer(text="An answer."))
        )
    hit = await to_b.Lookup(pb.LookupRequest(scope=s, messages=question(PARAPHRASE), semantic=True))
    assert hit.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    assert await b.resident_entries() == 3

    report = await to_a.ReportWrongHit(
        pb.ReportWrongHitRequest(scope=s, messages=question(PARAPHRASE), entry_id=hit.entry_id)
    )
    assert report.entry_removed
    # Any semantic lookup of the sub-partition on B reads what is new there.
    miss = await to_b.Lookup(
        pb.LookupRequest(scope=s, messages=question("Who painted the Mona Lisa?"), semantic=True)
    )
    assert miss.status == pb.LOOKUP_STATUS_MISS
    await resident_becomes(b, 2)

    await to_a.Invalidate(pb.InvalidateRequest(tenant_id=tenant))
    await to_b.Lookup(
        pb.LookupRequest(scope=s, messages=question("Who painted the Mona Lisa?"), semantic=True)
    )
    await resident_becomes(b, 0)
