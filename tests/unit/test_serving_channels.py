"""The client channels' targets and service config, and how mesh channels
follow their certificate files (meshgate/serving.py)."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2  # noqa: F401 - registers grpc.health.v1

from meshgate import mesh_auth, serving
from meshgate.cache.v1 import cache_service_pb2  # noqa: F401 - registers the services
from meshgate.context.v1 import context_service_pb2  # noqa: F401
from meshgate.inference.v1 import inference_service_pb2  # noqa: F401
from meshgate.router.v1 import admin_service_pb2, router_service_pb2  # noqa: F401
from tests.mesh import certs_dir, mesh_settings, renew


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("127.0.0.1:50052", "127.0.0.1:50052"),
        ("meshgate-context:50052", "meshgate-context:50052"),
        ("127.0.0.1:1,127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2"),
        (" 10.0.0.5:50052, 10.0.0.6:50052 ", "ipv4:10.0.0.5:50052,10.0.0.6:50052"),
        ("[::1]:1,[::1]:2", "ipv6:[::1]:1,[::1]:2"),
        ("ipv4:127.0.0.1:1,127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2"),
        (
            "dns:///meshgate-cache.ns.svc.cluster.local:50053",
            "dns:///meshgate-cache.ns.svc.cluster.local:50053",
        ),
    ],
)
def test_an_address_setting_becomes_a_grpc_target(address: str, target: str) -> None:
    assert serving.channel_target(address) == target


def test_a_list_of_names_is_refused_with_what_to_write_instead() -> None:
    # grpc's resolvers take a list of IP addresses or one name, never names.
    with pytest.raises(ValueError, match="dns:///name:port"):
        serving.channel_target("context-a:50052,context-b:50052")


def test_every_retried_method_exists_and_version_checked_writes_are_not_retried() -> None:
    # A renamed method would silently lose its retries; a write whose second
    # attempt is not the same write must never be in the list.
    pool = descriptor_pool.Default()
    for service, methods in serving.RETRYABLE_METHODS.items():
        names = {m.name for m in pool.FindServiceByName(service).methods}
        assert set(methods) <= names, (service, set(methods) - names)
    retried = {(s, m) for s, ms in serving.RETRYABLE_METHODS.items() for m in ms}
    for write in [
        ("meshgate.context.v1.ContextService", "AppendTurns"),
        ("meshgate.context.v1.ContextService", "RevertSession"),
        ("meshgate.cache.v1.CacheService", "ReportWrongHit"),
        ("meshgate.router.v1.RouterService", "ChatSession"),
        ("meshgate.router.v1.AdminService", "CreateKey"),
        ("meshgate.router.v1.AdminService", "RotateKey"),
    ]:
        assert write not in retried


def test_the_service_config_balances_round_robin_and_retries_only_unavailable() -> None:
    options = dict(serving.CHANNEL_OPTIONS)
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert options["grpc.enable_retries"] == 1
    for method_config in config["methodConfig"]:
        assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_keepalive_pings_are_no_more_frequent_than_each_peer_accepts() -> None:
    # The policies as written; tests/integration/test_keepalive.py shows
    # grpc enforcing them (a misspelt option name is ignored without a word).
    mesh, server = dict(serving.CHANNEL_OPTIONS), dict(serving.SERVER_OPTIONS)
    assert server[serving.MIN_RECV_PING_INTERVAL_ARG] < mesh["grpc.keepalive_time_ms"]
    assert server["grpc.keepalive_permit_without_calls"] == mesh["grpc.keepalive_permit_without_calls"] == 1
    # tritonserver's defaults: 5 minutes, and no ping on an idle connection.
    triton = dict(serving.TRITON_CHANNEL_OPTIONS)
    assert triton["grpc.keepalive_time_ms"] >= serving.TRITON_MIN_RECV_PING_INTERVAL_MS == 300_000
    assert triton["grpc.keepalive_permit_without_calls"] == 0
    assert "grpc.http2.max_pings_without_data" not in triton


class _Channel:
    """What MeshChannel makes: it records the calls made on it and its close."""

    def __init__(self, credentials) -> None:
        self.credentials = credentials
        self.calls: list[str] = []
        self.closed_with: list[float | None] = []
        self.calls_end = asyncio.Event()

    def unary_unary(self, method, *args, **kwargs):
        return lambda request, **options: self.calls.append(method)

    async def close(self, grace=None):
        self.closed_with.append(grace)
        if grace:
            await self.calls_end.wait()


async def _settled() -> None:
    """Until the closings that can end have ended (a few turns of the loop)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_mesh_channel_moves_to_renewed_files_and_closes_the_one_it_replaced(tmp_path, monkeypatch):
    """The channel's logic, the files' changes real: calls go to a channel of
    the files as they are now; the replaced one is closed with the calls it
    carries given REPLACED_CHANNEL_GRACE_S to end; once the mesh channel is
    closed, it closes them all and makes none again."""
    served = tmp_path / "served"
    shutil.copytree(certs_dir(), served)
    now = 1000.0
    monkeypatch.setattr(mesh_auth.time, "monotonic", lambda: now)
    files = mesh_auth.Mesh(mesh_settings(served), "router").files
    made: list[_Channel] = []

    def make(credentials):
        made.append(_Channel(credentials))
        return made[-1]

    channel = serving.MeshChannel(files, make)
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    check(b"")
    renew(served, "router")
    check(b"")
    assert len(made) == 1 and made[0].calls == ["/grpc.health.v1.Health/Check"] * 2

    now += mesh_auth.CERTIFICATE_LOOK_S
    check(b"")
    first, second = made
    assert second.calls == ["/grpc.health.v1.Health/Check"]
    await _settled()
    assert first.closed_with == [serving.REPLACED_CHANNEL_GRACE_S]

    renew(served, "router")
    now += mesh_auth.CERTIFICATE_LOOK_S
    check(b"")
    third = made[2]
    second.calls_end.set()
    await _settled()
    # The first still carries calls: closed again, now, with the grace given.
    await channel.close(None)
    assert first.closed_with == [serving.REPLACED_CHANNEL_GRACE_S, None]
    assert second.closed_with == [serving.REPLACED_CHANNEL_GRACE_S]
    assert third.closed_with == [None]

    renew(served, "router")
    now += mesh_auth.CERTIFICATE_LOOK_S
    check(b"")
    assert len(made) == 3 and third.calls == ["/grpc.health.v1.Health/Check"] * 2
