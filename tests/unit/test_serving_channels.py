"""The client channels' targets and service config, and how mesh channels
follow their certificate files (meshgate/serving.py)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import uuid

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshgate import mesh_auth, serving
from meshgate.cache.v1 import cache_service_pb2  # noqa: F401 - registers the services
from meshgate.context.v1 import context_service_pb2 as context_pb
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


@pytest.mark.parametrize(
    "address",
    [
        "dns:meshgate-cache:50053",
        "dns://10.0.0.2/meshgate-cache:50053",
        "ipv6:[::1]:1,[::2]:2",
        "unix:/tmp/c.sock",
        "vsock:3:5000",
    ],
)
def test_a_target_of_grpc_own_forms_is_passed_on_as_it_is(address: str) -> None:
    assert serving.channel_target(address) == address


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("127.0.0.1:99999", "port 99999 is not 1-65535"),
        ("127.0.0.1:0", "port 0 is not 1-65535"),
        ("meshgate-context", "'meshgate-context' names no port"),
        ("dns:///meshgate-context", "'meshgate-context' in 'dns:///meshgate-context' names no port"),
        ("ipv4:127.0.0.1:1,127.0.0.1:65536", "port 65536 is not 1-65535 in '127.0.0.1:65536'"),
        ("ipv4:meshgate-context:1", "is not host:port with an IPv4 address"),
        ("[::1]:1,[::1]", "'[::1]' in '[::1]:1,[::1]' names no port"),
        ("::1:50052", "'::1:50052' is not host:port"),
        ("127.0.0.1:\u0665\u0660", "is not a number"),
    ],
)
def test_an_address_grpc_would_dial_another_port_of_is_refused(address: str, refused: str) -> None:
    """grpc dials a port above 65535 modulo 65536 and a missing one as 443."""
    with pytest.raises(ValueError, match=re.escape(refused)):
        serving.channel_target(address)


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
        ("meshgate.router.v1.RouterService", "RevertSession"),
        ("meshgate.router.v1.AdminService", "CreateKey"),
        ("meshgate.router.v1.AdminService", "RotateKey"),
    ]:
        assert write not in retried


def test_a_method_retried_under_a_request_id_is_retried_only_with_one() -> None:
    """A ForkSession sent again without a request_id makes a second fork;
    with one, the resend is answered with the first (AIP-155). The channels'
    policy is per method, so such a method is never in it."""
    pool = descriptor_pool.Default()
    for service, methods in serving.RETRYABLE_WITH_REQUEST_ID.items():
        for method in methods:
            request = pool.FindServiceByName(service).methods_by_name[method].input_type
            assert "request_id" in request.fields_by_name, (service, method)
            assert method not in serving.RETRYABLE_METHODS.get(service, ()), (service, method)
    context = "meshgate.context.v1.ContextService"
    fork = context_pb.ForkSessionRequest(session_id="s", version=1)
    assert not serving.is_retryable(context, "ForkSession", fork)
    fork.request_id = str(uuid.uuid4())
    assert serving.is_retryable(context, "ForkSession", fork)
    assert serving.is_retryable(context, "GetSession", context_pb.GetSessionRequest(session_id="s"))
    revert = context_pb.RevertSessionRequest(session_id="s", version=0)
    assert not serving.is_retryable(context, "RevertSession", revert)


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


class _Call:
    """A call a _Channel made: open until the test ends it."""

    def __init__(self) -> None:
        self.ended = asyncio.Event()

    def done(self) -> bool:
        return self.ended.is_set()

    async def code(self) -> grpc.StatusCode:
        await self.ended.wait()
        return grpc.StatusCode.OK


class _Channel:
    """What MeshChannel makes: it records the calls made on it and its closes."""

    def __init__(self, credentials) -> None:
        self.credentials = credentials
        self.calls: list[_Call] = []
        self.closed_with: list[float | None] = []

    def unary_unary(self, method, *args, **kwargs):
        def call(request, **options) -> _Call:
            self.calls.append(_Call())
            return self.calls[-1]

        return call

    async def close(self, grace=None):
        self.closed_with.append(grace)


async def _settled() -> None:
    """Until the closings that can end have ended (a few turns of the loop)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_mesh_channel_moves_to_renewed_files_and_closes_the_one_it_replaced(tmp_path, monkeypatch):
    """The channel's logic, the files' changes real: calls go to a channel of
    the files as they are now; the replaced one is closed once the calls it
    carries have ended; once the mesh channel is closed, it closes those
    still carrying calls with its own grace, and makes none again."""
    served = tmp_path / "served"
    shutil.copytree(certs_dir(), served)
    now = 1000.0
    monkeypatch.setattr(mesh_auth, "look_clock", lambda: now)
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
    assert len(made) == 1 and len(made[0].calls) == 2

    made[0].calls[0].ended.set()
    now += mesh_auth.CERTIFICATE_LOOK_S
    check(b"")
    first, second = made
    assert len(second.calls) == 1
    await _settled()
    # One of its calls is still open.
    assert first.closed_with == []
    first.calls[1].ended.set()
    await _settled()
    assert first.closed_with == [None]

    renew(served, "router")
    now += mesh_auth.CERTIFICATE_LOOK_S
    check(b"")
    third = made[2]
    await _settled()
    assert second.closed_with == []
    await channel.close(None)
    # The second still carried a call: closed now, with the grace given.
    assert first.closed_with == [None]
    assert second.closed_with == [None]
    assert third.closed_with == [None]

    renew(served, "router")
    now += mesh_auth.CERTIFICATE_LOOK_S
    check(b"")
    assert len(made) == 3 and len(third.calls) == 2


async def test_a_call_open_on_a_replaced_channel_ends_with_the_mesh_channels_close(tmp_path):
    """Real channels and server: a stream opened before the files changed
    goes on over the replaced channel, and a close of the mesh channel
    (its service's cleanup) ends it, as a close of any channel ends its
    calls. grpc's own close(grace) of the replaced channel, begun at once,
    could not be cut short: the close found it closed already, and the
    stream went on."""
    served = tmp_path / "served"
    shutil.copytree(certs_dir(), served)
    address = f"unix:{tmp_path / 'context.sock'}"
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_secure_port(address, mesh_auth.Mesh(mesh_settings(served), "context").server_credentials())
    await server.start()
    request = health_pb2.HealthCheckRequest()
    try:
        security = mesh_auth.Mesh(mesh_settings(served), "router").to("context")
        channel = serving.client_channel(address, security)
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(request, timeout=60)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        renew(served, "router")
        await asyncio.sleep(mesh_auth.CERTIFICATE_LOOK_S)
        # On a new channel, with the renewed certificate.
        assert (await stub.Check(request, timeout=10)).status == health_pb2.HealthCheckResponse.SERVING
        await asyncio.sleep(0.2)
        assert not watch.done()

        await channel.close(None)
        assert await asyncio.wait_for(watch.code(), 5) == grpc.StatusCode.CANCELLED
    finally:
        await server.stop(None)
