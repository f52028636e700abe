"""The client channels' targets and service config (meshgate/serving.py)."""

from __future__ import annotations

import json

import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2  # noqa: F401 - registers grpc.health.v1

from meshgate import serving
from meshgate.cache.v1 import cache_service_pb2  # noqa: F401 - registers the services
from meshgate.context.v1 import context_service_pb2  # noqa: F401
from meshgate.inference.v1 import inference_service_pb2  # noqa: F401
from meshgate.router.v1 import admin_service_pb2, router_service_pb2  # noqa: F401


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
