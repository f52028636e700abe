"""Four real router processes (``python -m services.router`` with a
settings file, as ``meshgate up`` starts them) on one real Redis, in front
of real context, cache and inference services and Triton: a limit holds
exactly across the replicas, and the settings file reloads under a live
stream (SIGHUP, or the file changing), refusing a bad one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate.common.v1 import common_pb2
from meshgate.config import Settings, hash_api_key
from meshgate.errors import error_info
from meshgate.local import children
from meshgate.local.stack import REPO_ROOT, free_port
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.cache import app as cache_app
from services.context import app as context_app
from tests.integration.conftest import running
from tests.mesh import bounded_channel, mesh_settings

pytestmark = pytest.mark.integration

REPLICAS = 4
LIMIT_RPM = 40


def toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Replicas:
    """The router processes and the settings file they share."""

    def __init__(self, directory: pathlib.Path, base_settings: str) -> None:
        self.directory = directory
        self.config_path = directory / "router.toml"
        self.base_settings = base_settings
        self.processes: list[subprocess.Popen] = []
        self.addresses: list[str] = []

    def write(self, tenants: str) -> None:
        # Written whole and renamed into place: a reader never sees half a file.
        staging = self.config_path.with_suffix(".tmp")
        staging.write_text(self.base_settings + tenants)
        staging.replace(self.config_path)

    def start(self, count: int = REPLICAS) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("REDIS_URL", None)  # the settings file is the one source of truth
        env.pop("MESHGATE_CONFIG", None)
        for index in range(count):
            address = f"127.0.0.1:{free_port()}"
            log = open(self.directory / f"router-{index}.log", "ab")  # noqa: SIM115 - owned by the child
            self.processes.append(
                children.start(
                    [sys.executable, "-m", "services.router", "--config", str(self.config_path),
                     "--listen", address],
                    cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
            log.close()
            self.addresses.append(address)

    def log(self, index: int) -> str:
        return (self.directory / f"router-{index}.log").read_text(errors="replace")

    async def wait_serving(self, timeout_s: float = 90.0, first: int = 0) -> None:
        """Waits until each process from the ``first`` serves."""
        deadline = time.monotonic() + timeout_s
        for index, address in enumerate(self.addresses[first:], first):
            async with bounded_channel(address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                while True:
                    assert self.processes[index].poll() is None, f"router {index} exited:\n{self.log(index)}"
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                        if answer.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    assert time.monotonic() < deadline, f"router {index} never served:\n{self.log(index)}"
                    await asyncio.sleep(0.1)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def tenant_block(tenant: str, key: str, rpm: int = LIMIT_RPM) -> str:
    return f"""
[[router.tenants]]
id = {toml_string(tenant)}
api_key_sha256 = [{toml_string(hash_api_key(key))}]
limits = {{ requests_per_minute = {rpm} }}
"""


def base_settings(mesh, redis_url: str, inference_address: str, context_address: str, cache_address: str):
    """The settings file of router processes beside each other on one host,
    with tiny-gpt at ``inference_address``, before their tenants."""
    return f"""
[telemetry]
exporter = "none"

[redis]
url = {toml_string(redis_url)}

[mesh]
ca_file = {toml_string(mesh.ca_file)}
cert_file = {toml_string(mesh.cert_file)}
key_file = {toml_string(mesh.key_file)}

[models.tiny-gpt]
deployments = [{{ name = "live", address = {toml_string(inference_address)}, model = "tiny-gpt" }}]

[router]
# Processes on one host: no fixed metrics port beside each one's --listen.
metrics_listen = ""
context_address = {toml_string(context_address)}
cache_address = {toml_string(cache_address)}
dev_tenant = false
# Replicas on one machine: no HTTP edge (its default port is one for all).
http_listen = ""
# A hit replays in paced pieces: a stream that stays live for a while.
replay_pause_s = 0.1
"""


@pytest.fixture(scope="module")
async def replicas(redis_url, inference_address, tmp_path_factory):
    mesh = mesh_settings()
    settings = Settings(mesh=mesh)
    settings.redis.url = redis_url
    settings.cache.inference_address = inference_address
    async with contextlib.AsyncExitStack() as stack:
        context_address = await stack.enter_async_context(running(context_app, "context", settings))
        cache_address = await stack.enter_async_context(running(cache_app, "cache", settings))
        base = base_settings(mesh, redis_url, inference_address, context_address, cache_address)
        group = Replicas(tmp_path_factory.mktemp("routers"), base)
        tenant = f"quota-{uuid.uuid4().hex[:8]}"
        group.write(tenant_block(tenant, "key-one"))
        group.start()
        stack.callback(group.stop)
        await group.wait_serving()
        yield group, tenant


def ask(text: str, max_tokens: int = 1, policy=pb.CACHE_POLICY_BYPASS) -> pb.ChatRequest:
    return pb.ChatRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=max_tokens, temperature=0.0),
        cache_policy=policy,
    )


def bearer(key: str):
    return (("authorization", f"Bearer {key}"),)


async def outcome_of(stub, request, key: str) -> str:
    """ "ok" for a completed answer, else the ErrorInfo reason."""
    try:
        async for response in stub.Chat(request, metadata=bearer(key), timeout=120):
            if response.HasField("completion"):
                return "ok"
        return "no completion"
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        return info.reason if info else error.code().name


async def test_four_replicas_admit_exactly_the_limit(replicas):
    group, _ = replicas
    per_replica = 2 * LIMIT_RPM // REPLICAS  # twice the limit, spread evenly
    async with contextlib.AsyncExitStack() as stack:
        stubs = [
            router_service_pb2_grpc.RouterServiceStub(
                await stack.enter_async_context(bounded_channel(address))
            )
            for address in group.addresses
        ]
        outcomes = await asyncio.gather(
            *(
                outcome_of(stub, ask(f"q{index}-{n}"), "key-one")
                for index, stub in enumerate(stubs)
                for n in range(per_replica)
            )
        )
    admitted = outcomes.count("ok")
    # Overshoot at most 1% of the limit: with 40, none at all.
    assert admitted <= LIMIT_RPM * 1.01
    # And the limit is used, not undershot: every other turn was refused for it.
    assert admitted == LIMIT_RPM, outcomes
    assert outcomes.count(Reason.RATE_LIMITED) == len(outcomes) - LIMIT_RPM, outcomes


async def test_reload_under_a_live_stream_and_a_bad_file_is_refused(replicas):
    group, tenant = replicas
    async with contextlib.AsyncExitStack() as stack:
        stubs = [
            router_service_pb2_grpc.RouterServiceStub(
                await stack.enter_async_context(bounded_channel(address))
            )
            for address in group.addresses
        ]
        # The first test spent key-one's minute: a new key with a higher
        # limit, once this file has been reloaded (the watchers).
        group.write(tenant_block(tenant, "key-a", rpm=1000))
        await _until(lambda: _works(stubs[0], "key-a"))
        # A long stored answer, replayed in paced pieces: a stream that lasts.
        question = ask(f"the sea {uuid.uuid4().hex}", max_tokens=200, policy=pb.CACHE_POLICY_USE)
        assert await outcome_of(stubs[0], question, "key-a") == "ok"
        live = stubs[0].Chat(question, metadata=bearer("key-a"), timeout=120)
        first = await live.read()
        assert first.HasField("delta")

        # key-a is replaced by key-b: SIGHUP to replica 0; the others notice
        # the file changing.
        group.write(tenant_block(tenant, "key-b", rpm=1000))
        group.processes[0].send_signal(signal.SIGHUP)
        for stub in stubs:
            await _until(lambda stub=stub: _works(stub, "key-b"))
            assert await outcome_of(stub, ask("old key?"), "key-a") == Reason.API_KEY_INVALID
        assert not live.done(), "the stream ended before the reload: it proves nothing"

        # A bad file (a limit of zero) is refused; the settings in use stay.
        group.write(tenant_block(tenant, "key-c", rpm=0))
        group.processes[0].send_signal(signal.SIGHUP)
        # Replica 0 by its SIGHUP, the others by their file watch (1-2 s).
        for index in range(REPLICAS):
            await _until(lambda index=index: _logged(group, index, "configuration refused"))
        assert await outcome_of(stubs[1], ask("still key-b?"), "key-b") == "ok"
        assert await outcome_of(stubs[0], ask("key-c?"), "key-c") == Reason.API_KEY_INVALID

        # The stream that started before both reloads ends with its completion.
        completion = None
        while (response := await live.read()) != grpc.aio.EOF:
            if response.HasField("completion"):
                completion = response.completion
        assert completion is not None and completion.cache_status == pb.CACHE_STATUS_EXACT_HIT
    for index in range(REPLICAS):
        assert "configuration reloaded" in group.log(index)


async def _logged(group: Replicas, index: int, text: str) -> bool:
    return text in group.log(index)


async def _works(stub, key: str) -> bool:
    try:
        await stub.ListModels(pb.ListModelsRequest(), metadata=bearer(key), timeout=5)
    except grpc.aio.AioRpcError:
        return False
    return True


async def _until(check, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.05)
