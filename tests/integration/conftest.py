"""Real Triton and a real inference service, shared by the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import pathlib
import re
import subprocess
import uuid
from typing import NamedTuple

import pytest

from meshgate import redis_access, serving
from meshgate.config import (
    DeploymentSettings,
    InferenceSettings,
    ModelSettings,
    RouterSettings,
    Settings,
    TenantSettings,
    hash_api_key,
)
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.inference.v1 import inference_service_pb2 as inference_pb
from meshgate.inference.v1 import inference_service_pb2_grpc
from meshgate.local import triton
from meshgate.local.stack import Stack, build_model_weights, free_port
from meshgate.router.v1 import router_service_pb2_grpc
from services.cache import app as cache_app
from services.context import app as context_app
from services.context.tenant_sweep import TenantSweep
from services.inference import app as inference_app
from services.router import app as router_app
from tests.mesh import bounded_channel, mesh_settings, router_channel


def end_triton(process: subprocess.Popen) -> None:
    """Ends a test's tritonserver once nothing more is asked of it: killed,
    not drained. A graceful stop (triton.terminate) takes 2 s even idle, as
    Triton unloads its models and checks on them once a second, and the
    suite ends some twenty of them (the meshes' too: stop_stack); the tests
    of a stop and tests/e2e/test_mesh.py's Stack.stop keep the graceful
    one. terminate() then ends the Python-backend
    stubs in its process group and removes their shared memory."""
    if process.poll() is None:
        process.kill()
        process.wait()
    triton.terminate(process)


def stop_stack(stack: Stack) -> None:
    """Stack.stop, its Triton killed first (end_triton), not drained: for a
    mesh whose stop is not what its tests check (two of Stack.stop's four
    seconds are Triton's graceful stop; tests/e2e/test_mesh.py keeps it).
    A Supervisor of the stack must have stopped, or it starts Triton again."""
    if (process := stack.processes.pop("triton", None)) is not None:
        end_triton(process)
    stack.stop()


# Tries at a Triton whose port another process took first.
_PORT_TRIES = 3


def ready_triton(log_file: pathlib.Path, models: tuple[str, ...], ports: int = 1, **launch) -> tuple:
    """A tritonserver launched with ``launch`` (triton.launch's arguments but
    its ports and log) and ready, on ``ports`` free ports (gRPC, then
    metrics): (process, grpc_port[, metrics_port]). free_port() hands out a
    port nothing listens on, but another process of the run (another
    worker's stack) may bind it before Triton does: seen once in make test,
    "Socket '127.0.0.1:26052' already in use" in the log and a fuzz module's
    every test in error. Such a start is tried again on other ports."""
    for attempt in itertools.count(1):
        chosen = [free_port() for _ in range(ports)]
        metrics = {"metrics_port": chosen[1]} if ports > 1 else {}
        logged_before = log_file.stat().st_size if log_file.exists() else 0
        process = triton.launch(grpc_port=chosen[0], log_file=log_file, models=models, **metrics, **launch)
        try:
            triton.wait_ready(f"127.0.0.1:{chosen[0]}", models, timeout=120, process=process)
            return (process, *chosen)
        except BaseException as error:
            end_triton(process)
            # This start's lines only: the log is appended to at each.
            with log_file.open("rb") as log:
                log.seek(logged_before)
                port_taken = "already in use" in log.read().decode(errors="replace")
            if attempt == _PORT_TRIES or not (isinstance(error, RuntimeError) and port_taken):
                raise


@contextlib.contextmanager
def launched_triton(
    tmp_path_factory: pytest.TempPathFactory,
    models: tuple[str, ...],
    repository: pathlib.Path = triton.DEFAULT_MODEL_REPOSITORY,
):
    """A tritonserver serving `models` from `repository` (the project's model
    repository unless given: a copy with other config values); yields (url, log_path)."""
    build_model_weights()
    state_dir = tmp_path_factory.mktemp("triton")
    log_path = state_dir / "triton.log"
    process, port = ready_triton(log_path, models, model_repository=repository, state_dir=state_dir)
    try:
        yield f"127.0.0.1:{port}", log_path
    finally:
        end_triton(process)


@contextlib.contextmanager
def launched_tritons(state_dir: pathlib.Path, models: tuple[str, ...], count: int):
    """``count`` tritonservers serving ``models``, each with a metrics port;
    yields [(gRPC url, metrics url, process)] once all are ready."""
    build_model_weights()
    servers: list[tuple[str, str, subprocess.Popen]] = []
    try:
        for index in range(count):
            port, metrics_port = free_port(), free_port()
            process = triton.launch(
                grpc_port=port,
                metrics_port=metrics_port,
                state_dir=state_dir / f"triton{index}",
                log_file=state_dir / f"triton{index}.log",
                models=models,
            )
            servers.append((f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", process))
        for url, _, process in servers:
            triton.wait_ready(url, models, timeout=120, process=process)
        yield servers
    finally:
        for _, _, process in servers:
            end_triton(process)


def uncached_config(model: str) -> str:
    config = (triton.DEFAULT_MODEL_REPOSITORY / model / "config.pbtxt").read_text()
    config, renamed = re.subn(rf'^name: "{model}"$', f'name: "{model}_uncached"', config, flags=re.M)
    config, disabled = re.subn(
        r'(key: "prefix_cache_bytes"\s*value: \{ string_value: )"\d+"', r'\1"0"', config
    )
    assert (renamed, disabled) == (1, 1), "config.pbtxt no longer looks as this test expects"
    return config


class PrefixServer(NamedTuple):
    address: str
    metrics_url: str
    log_file: pathlib.Path


@contextlib.contextmanager
def cached_and_uncached(tmp_path_factory: pytest.TempPathFactory, model: str):
    build_model_weights()
    shipped = triton.DEFAULT_MODEL_REPOSITORY / model
    state_dir = tmp_path_factory.mktemp(f"triton-prefix-{model}")
    repository = state_dir / "models"
    repository.mkdir()
    (repository / model).symlink_to(shipped, target_is_directory=True)
    uncached = repository / f"{model}_uncached"
    uncached.mkdir()
    (uncached / "1").symlink_to(shipped / "1", target_is_directory=True)
    (uncached / "config.pbtxt").write_text(uncached_config(model))
    models = (model, f"{model}_uncached")
    process, grpc_port, metrics_port = ready_triton(
        state_dir / "triton.log", models, ports=2, model_repository=repository, state_dir=state_dir
    )
    try:
        yield PrefixServer(
            f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics", state_dir / "triton.log"
        )
    finally:
        end_triton(process)


@pytest.fixture(scope="session")
def smollm2_prefix_server(tmp_path_factory: pytest.TempPathFactory):
    """smollm2 and smollm2_uncached (cached_and_uncached), one server for
    every smollm2 test of tests/integration/test_triton_models.py, its
    prefix-cache comparison included: smollm2 takes a Triton 5-15 s to load.
    Those tests are kept in that one module so that, with --dist loadfile,
    one pytest-xdist worker starts it."""
    with cached_and_uncached(tmp_path_factory, "smollm2") as server:
        yield server


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory):
    """tiny_gpt and minilm: what the service tests use (smollm2's tests start their own)."""
    with launched_triton(tmp_path_factory, ("tiny_gpt", "minilm")) as server:
        yield server


@pytest.fixture(scope="session")
def triton_url(triton_server) -> str:
    return triton_server[0]


@pytest.fixture(scope="session")
async def inference_address(triton_url: str):
    """The inference service in-process, in front of the real Triton."""
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = [triton_url]
    settings.inference.health_interval_s = 0.5
    async with running_inference(settings) as address:
        yield address


@pytest.fixture
def background_sweeps_idle(monkeypatch) -> None:
    """The tenant sweeps that context services run in the background (a tick
    every 5 s: services/context/tenant_sweep.py) do nothing during the test:
    one that shows a session unlisted before a pass of its own
    (test_context_tenant_sweep.a_pass ticks all the same)."""

    async def idle(self) -> bool:
        return False

    monkeypatch.setattr(TenantSweep, "tick", idle)


@pytest.fixture
def tenant() -> str:
    """A fresh tenant id per test, so tests sharing a Redis never see each other's keys."""
    return f"tenant-{uuid.uuid4().hex[:8]}"


async def wait_until_serving(service: serving.Service, timeout_s: float = 30.0) -> None:
    from grpc_health.v1 import health_pb2

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    request = health_pb2.HealthCheckRequest()
    while loop.time() < deadline:
        response = await service.health.Check(request, None)
        if response.status == health_pb2.HealthCheckResponse.SERVING:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("inference service never became SERVING (no ready Triton backend)")


@contextlib.asynccontextmanager
async def running(app_module, name: str, settings: Settings, listen: str = "127.0.0.1:0"):
    """A service in-process on ``listen`` (a free port by default); yields its address."""
    if name == "router" and settings.router.http_listen == RouterSettings.http_listen:
        # A router's HTTP edge on a free port too, not the shared default
        # (tests/integration/test_http_edge.py picks its own).
        settings = dataclasses.replace(
            settings, router=dataclasses.replace(settings.router, http_listen="127.0.0.1:0")
        )
    service = serving.Service(name, app_module.SERVICE_NAMES)
    cleanup = await app_module.setup(service, settings)
    port = await serving.start(service, listen, cleanup)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await serving.stop(service, grace_s=1)


@pytest.fixture
async def redis_client(redis_url):
    """A client of the suite's Redis, as the services connect."""
    client = redis_access.connect(redis_url)
    yield client
    await client.aclose()


def service_settings(redis_url: str, inference_address: str, dev_api_key: str | None = None) -> Settings:
    """Settings for services in-process: the test mesh's TLS and tokens, this
    Redis, the cache's embeddings and the router's tiny-gpt (serve_tiny_gpt)
    from this inference service, and ``dev_api_key`` (when given) as the
    router's development tenant's key."""
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.cache.inference_address = inference_address
    if dev_api_key is not None:
        settings.router.dev_api_key = dev_api_key
    serve_tiny_gpt(settings, inference_address)
    return settings


def keyed_tenants(settings: Settings, *tenants: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """Makes ``tenants`` the router's configured tenants, each with the API
    key ``key-<tenant>``; returns each one's auth metadata for a call."""
    settings.router.tenants = [
        TenantSettings(id=tenant, api_key_sha256=[hash_api_key(f"key-{tenant}")]) for tenant in tenants
    ]
    return {tenant: (("authorization", f"Bearer key-{tenant}"),) for tenant in tenants}


def serve_tiny_gpt(settings: Settings, inference_address: str, name: str = "live") -> DeploymentSettings:
    """Makes tiny-gpt the router's only model alias, with one deployment:
    the inference service at ``inference_address``, named ``name`` (what a
    completion reports). Returns it, for a test that adds aliases over it."""
    live = DeploymentSettings(name=name, address=inference_address, model="tiny-gpt")
    settings.models = {"tiny-gpt": ModelSettings(deployments=[live])}
    return live


@contextlib.asynccontextmanager
async def running_router(settings: Settings):
    """Context, cache and a router in front of them, in-process; yields the
    router's address (``settings.router`` gets the other two's)."""
    async with contextlib.AsyncExitStack() as stack:
        settings.router.context_address = await stack.enter_async_context(
            running(context_app, "context", settings)
        )
        settings.router.cache_address = await stack.enter_async_context(running(cache_app, "cache", settings))
        yield await stack.enter_async_context(running(router_app, "router", settings))


@contextlib.asynccontextmanager
async def router_and_context(settings: Settings):
    """running_router(settings); yields a stub of the router's public port
    (as callers reach it) and one of its context service (with the router's
    tokens), for tests that check what a turn stored."""
    async with contextlib.AsyncExitStack() as stack:
        address = await stack.enter_async_context(running_router(settings))
        channel = await stack.enter_async_context(bounded_channel(address))
        context_channel = await stack.enter_async_context(
            router_channel(settings.router.context_address, "context")
        )
        yield (
            router_service_pb2_grpc.RouterServiceStub(channel),
            context_service_pb2_grpc.ContextServiceStub(context_channel),
        )


def triton_cancellations(log_path: pathlib.Path) -> int:
    """Requests the bundled models logged as cancelled in Triton's log."""
    return log_path.read_text(errors="replace").count("cancelled after")


async def until_triton_cancels(log_path: pathlib.Path, before: int, timeout_s: float = 15.0) -> None:
    """Waits until Triton's log shows more cancelled requests than ``before``."""
    for _ in range(int(timeout_s / 0.1)):
        if triton_cancellations(log_path) > before:
            return
        await asyncio.sleep(0.1)
    assert triton_cancellations(log_path) > before, "Triton logged no cancelled request"


@contextlib.asynccontextmanager
async def running_inference(settings: Settings):
    """The inference service in-process over ``settings.inference.triton_urls``;
    yields its address once every one of them is in rotation. Without idle
    canaries unless the test sets them (inference.idle_canary_s): a
    session's or module's inference service lives for minutes, and its
    canary of an idle model would land in the Triton statistics that tests
    count (test_inference_shared_embeddings.py)."""
    if settings.inference.idle_canary_s == InferenceSettings.idle_canary_s:
        settings = dataclasses.replace(
            settings, inference=dataclasses.replace(settings.inference, idle_canary_s=0.0)
        )
    async with running(inference_app, "inference", settings) as address:
        async with router_channel(address, "inference") as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            request = inference_pb.GetBackendHealthRequest()
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                backends = (await stub.GetBackendHealth(request, timeout=10)).backends
                if backends and all(b.ready for b in backends):
                    break
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"backends not all ready after 60 s: {backends}")
                await asyncio.sleep(0.1)
        yield address


async def answer_of(call) -> tuple[str, object]:
    """A Chat stream's text and its completion: deltas, then one
    completion, nothing else (a stream without one fails the test). The
    text ends with the completion's own, for a request that set
    completion_may_carry_text (empty otherwise)."""
    text, completion = [], None
    async for response in call:
        assert completion is None, f"{response} after the completion"
        if response.HasField("completion"):
            completion = response.completion
        else:
            assert response.HasField("delta"), response
            text.append(response.delta.text)
    assert completion is not None
    return "".join(text) + completion.text, completion
