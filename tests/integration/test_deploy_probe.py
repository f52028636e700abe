"""meshgate-probe, the images' health check and the internal services' exec
probe, against a real inference service over the mesh's mutual TLS: run as
a process, as Docker and the kubelet run it."""

from __future__ import annotations

import asyncio
import pathlib
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate import mesh_auth, serving
from meshgate.config import Settings
from meshgate.inference.v1 import inference_service_pb2 as inference_pb2
from meshgate.inference.v1 import inference_service_pb2_grpc as inference_pb2_grpc
from meshgate.local import certs
from meshgate.local.stack import free_port
from services.inference import app as inference_app
from tests.integration.conftest import wait_until_serving
from tests.mesh import bounded_channel, mesh_settings

pytestmark = pytest.mark.integration


def _settings_file(directory: pathlib.Path, mesh, extra: str = "") -> pathlib.Path:
    path = directory / "meshgate.toml"
    path.write_text(
        f'[mesh]\nca_file = "{mesh.ca_file}"\ncert_file = "{mesh.cert_file}"\nkey_file = "{mesh.key_file}"\n'
        + extra
    )
    return path


async def _probe(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshgate.probe",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode, stderr.decode()


async def test_the_probe_passes_for_a_serving_service_with_the_mesh_certificate(inference_address, tmp_path):
    config = _settings_file(tmp_path, mesh_settings())
    code, stderr = await _probe("inference", "--config", str(config), "--address", inference_address)
    assert (code, stderr) == (0, "")


async def test_the_probe_fails_with_a_certificate_from_another_ca(inference_address, tmp_path):
    """The probe also proves the mounted certificate is one the mesh accepts."""
    certs.ensure(tmp_path / "other-ca")
    config = _settings_file(tmp_path, mesh_settings(tmp_path / "other-ca"))
    code, stderr = await _probe("inference", "--config", str(config), "--address", inference_address)
    assert code == 1
    # Its own line last (grpc's core may log the failed handshake before it).
    assert stderr.splitlines()[-1].startswith("inference: UNAVAILABLE")


async def test_the_probe_fails_when_nothing_listens(tmp_path):
    config = _settings_file(tmp_path, mesh_settings())
    address = f"127.0.0.1:{free_port()}"
    code, stderr = await _probe("inference", "--config", str(config), "--address", address, "--timeout", "1")
    assert code == 1
    assert stderr.splitlines()[-1].startswith("inference: ")


@pytest.mark.parametrize("form", ["unix:{}", "unix://{}"], ids=["unix:path", "unix:///path"])
async def test_the_probe_dials_a_unix_socket_listen_address_as_it_is(tmp_path, form):
    """With no --address, the probe dials the service's own listen setting:
    a unix socket's too, over the mesh's TLS (checked by name, not by the
    socket's path)."""
    listen = form.format(tmp_path / "inference.sock")
    mesh = mesh_settings()
    service = serving.Service("inference", [])
    service.restrict_to_mesh(mesh_auth.Mesh(mesh, "inference"), ["router"])
    await serving.start(service, listen, serving._nothing)
    try:
        config = _settings_file(tmp_path, mesh, f'[inference]\nlisten = "{listen}"\n')
        assert await _probe("inference", "--config", str(config)) == (0, "")
    finally:
        await serving.stop(service, grace_s=1)
    code, stderr = await _probe("inference", "--config", str(config), "--timeout", "1")
    assert code == 1 and stderr.splitlines()[-1].startswith("inference: UNAVAILABLE")


async def test_the_plain_text_health_port_tells_the_status_and_serves_nothing_else(triton_url):
    """What Kubernetes' own gRPC probe reaches on an internal service, whose
    main port speaks only mutual TLS (mesh.health_listen)."""
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = [triton_url]
    settings.inference.health_interval_s = 0.5
    service = serving.Service("inference", inference_app.SERVICE_NAMES)
    cleanup = await inference_app.setup(service, settings)
    health_port = service.serve_plain_health("127.0.0.1:0")
    port = await serving.start(service, "127.0.0.1:0", cleanup)
    try:
        await wait_until_serving(service)
        async with bounded_channel(f"127.0.0.1:{health_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            # Nothing but health there: the service's own RPCs are not served.
            inference = inference_pb2_grpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await inference.ListModels(inference_pb2.ListModelsRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # The main port's statuses, as they change.
            await service.set_serving(False)
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
        # The main port still admits no plain-text caller.
        async with bounded_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await serving.stop(service, grace_s=1)
    async with bounded_channel(f"127.0.0.1:{health_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as closed:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert closed.value.code() == grpc.StatusCode.UNAVAILABLE
