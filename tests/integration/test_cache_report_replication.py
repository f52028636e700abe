"""A ReportWrongHit against a real Redis master with a real replica, whose
replication link runs through a proxy in this test that can hold the
master's stream back (the replica's acknowledgements still reach the
master, with nothing new to acknowledge): what a replica behind a slow or
broken link sees.
The first test fails the master over once the report is acknowledged (the
master killed, the replica promoted) and looks the prompt up on the
promoted replica: before the report waited for the replica (Redis's WAIT),
the report was acknowledged while the replica had not got it, and the
promoted replica served the reported answer again."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
import subprocess
import time

import pytest
from prometheus_client import REGISTRY

from meshgate import redis_access
from meshgate.cache.v1 import cache_service_pb2 as pb
from meshgate.local import redis_server
from meshgate.local.stack import free_port
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
from tests.tcp_proxy import TcpProxy

# Serial (make test runs it alone): bounds a report's wait for its replica.
pytestmark = [pytest.mark.integration, pytest.mark.serial]


@dataclasses.dataclass
class MasterAndReplica:
    master: subprocess.Popen
    master_port: int
    replica_port: int
    link: TcpProxy


async def _linked(port: int, timeout_s: float = 15.0) -> None:
    client = redis_access.connect(f"redis://127.0.0.1:{port}/0")
    try:
        deadline = time.monotonic() + timeout_s
        while (await client.info("replication")).get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never linked to its master"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


@pytest.fixture
async def master_and_replica(tmp_path: pathlib.Path):
    master_port, replica_port = free_port(), free_port()
    master = redis_server.launch(master_port, tmp_path / "master")
    link = TcpProxy(master_port)
    replica = None
    try:
        redis_server.wait_ready(master_port)
        link_port = await link.start()
        replica = redis_server.launch(replica_port, tmp_path / "replica", replica_of=link_port)
        redis_server.wait_ready(replica_port)
        await _linked(replica_port)
        yield MasterAndReplica(master, master_port, replica_port, link)
    finally:
        await link.close()
        redis_server.stop_all([p for p in (master, replica) if p is not None])


def _report(entry_id: str, tenant: str) -> pb.ReportWrongHitRequest:
    return pb.ReportWrongHitRequest(scope=scope(tenant), messages=conversation(PARAPHRASE), entry_id=entry_id)


async def _served_entry(cache, tenant: str) -> str:
    await store(cache, scope(tenant), conversation(STORED))
    hit = await lookup(cache, scope(tenant), conversation(PARAPHRASE))
    assert hit.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    return hit.entry_id


async def test_a_report_acknowledged_before_a_failover_is_not_lost(master_and_replica, tenant) -> None:
    master_client = redis_access.connect(f"redis://127.0.0.1:{master_and_replica.master_port}/0")
    try:
        cache = make_servicer(master_client, FakeEmbedder(), report_replication_timeout_s=10.0)
        entry_id = await _served_entry(cache, tenant)
        # The stored entry is on the replica before the link is held.
        assert await master_client.wait(1, 5000) == 1

        master_and_replica.link.hold()
        reporting = asyncio.ensure_future(cache.ReportWrongHit(_report(entry_id, tenant), None))
        done, _ = await asyncio.wait([reporting], timeout=0.5)
        if not done:
            # Unanswered while the replica cannot have the report: once the
            # link is back, answered when the replica acknowledged it.
            master_and_replica.link.release()
        report = await asyncio.wait_for(reporting, timeout=10)
        assert report.entry_removed
        # The master dies right after acknowledging the report, and what it
        # had not sent its replica with it.
        master_and_replica.master.kill()
        master_and_replica.master.wait()
        await master_and_replica.link.close()
    finally:
        await master_client.aclose()

    promoted = redis_access.connect(f"redis://127.0.0.1:{master_and_replica.replica_port}/0")
    try:
        await promoted.execute_command("REPLICAOF", "NO", "ONE")
        after_failover = make_servicer(promoted, FakeEmbedder())
        again = await lookup(after_failover, scope(tenant), conversation(PARAPHRASE))
        assert again.status == pb.LOOKUP_STATUS_MISS, "the promoted replica served the reported answer"
    finally:
        await promoted.aclose()


async def test_a_report_the_replicas_do_not_acknowledge_in_time_is_answered_and_counted(
    master_and_replica, tenant
) -> None:
    """OK after the timeout: the report holds on the master, and a retry
    would count it twice in the sub-partition."""
    client = redis_access.connect(f"redis://127.0.0.1:{master_and_replica.master_port}/0")
    try:
        cache = make_servicer(client, FakeEmbedder(), report_replication_timeout_s=0.3)
        entry_id = await _served_entry(cache, tenant)
        before = REGISTRY.get_sample_value("meshgate_cache_unreplicated_reports_total") or 0.0
        master_and_replica.link.hold()
        started = time.monotonic()
        report = await cache.ReportWrongHit(_report(entry_id, tenant), None)
        waited_s = time.monotonic() - started
        assert report.entry_removed and report.reports_in_partition == 1
        assert 0.3 <= waited_s < 3.0
        assert REGISTRY.get_sample_value("meshgate_cache_unreplicated_reports_total") == before + 1
        assert (await lookup(cache, scope(tenant), conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS
    finally:
        master_and_replica.link.release()
        await client.aclose()


async def test_a_report_waits_for_no_replica_where_there_is_none(redis_url, tenant) -> None:
    """The test Redis has no replica: WAIT 1 there would block for its whole
    timeout on every report."""
    client = redis_access.connect(redis_url)
    try:
        cache = make_servicer(client, FakeEmbedder(), report_replication_timeout_s=5.0)
        entry_id = await _served_entry(cache, tenant)
        started = time.monotonic()
        report = await cache.ReportWrongHit(_report(entry_id, tenant), None)
        assert report.entry_removed
        assert time.monotonic() - started < 1.0
    finally:
        await client.aclose()


async def test_a_report_goes_through_where_role_is_not_allowed(redis_url, tenant) -> None:
    """A managed Redis may refuse ROLE to the mesh's user (an ACL, a renamed
    command): the report is still written, with nothing waited for."""
    if "@" in redis_url:
        pytest.skip("REDIS_URL names its own user")
    admin = redis_access.connect(redis_url)
    user = f"no-role-{time.monotonic_ns()}"
    await admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-role")
    url = redis_url.replace("redis://", f"redis://{user}:pw@", 1)
    client = redis_access.connect(url)
    try:
        with pytest.raises(redis_access.redis_errors.ResponseError):
            await client.execute_command("ROLE")
        cache = make_servicer(client, FakeEmbedder())
        entry_id = await _served_entry(cache, tenant)
        report = await cache.ReportWrongHit(_report(entry_id, tenant), None)
        assert report.entry_removed
        assert (await lookup(cache, scope(tenant), conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS
    finally:
        await client.aclose()
        await admin.execute_command("ACL", "DELUSER", user)
        await admin.aclose()
