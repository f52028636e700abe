"""meshgate-probe, the images' health check and the internal services' exec
probe, against a real inference service over the mesh's mutual TLS: run as
a process, as Docker and the kubelet run it."""

from __future__ import annotations

import asyncio
import pathlib
import sys

import pytest

from meshgate.local import certs
from meshgate.local.stack import free_port
from tests.mesh import mesh_settings

pytestmark = pytest.mark.integration


def _settings_file(directory: pathlib.Path, mesh) -> pathlib.Path:
    path = directory / "meshgate.toml"
    path.write_text(
        f'[mesh]\nca_file = "{mesh.ca_file}"\ncert_file = "{mesh.cert_file}"\nkey_file = "{mesh.key_file}"\n'
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
