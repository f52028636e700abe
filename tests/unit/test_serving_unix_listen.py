"""A service told to listen on a unix socket another process serves
refuses to start (meshgate/serving.py _refuse_live_unix_socket): grpc-core
would unlink the live socket's file and take its address over silently.
A dead process's socket file is taken over. Real servers, real sockets."""

from __future__ import annotations

import pathlib
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate import serving


async def health_of(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return answer.status


@pytest.mark.parametrize("form", ["unix:{}", "unix://{}"], ids=["unix:path", "unix:///path"])
async def test_a_second_service_on_a_live_unix_socket_is_refused_and_the_first_keeps_it(tmp_path, form):
    address = form.format(tmp_path / "context.sock")
    first = serving.Service("context", [])
    await serving.start(first, address, serving._nothing)
    try:
        second = serving.Service("context", [])
        with pytest.raises(OSError, match="another process is serving on it"):
            second.bind(address)
        with pytest.raises(OSError, match="another process is serving on it"):
            second.serve_plain_health(address)
        assert await health_of(address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await first.server.stop(None)


async def test_a_dead_processs_socket_file_is_taken_over(tmp_path):
    path = pathlib.Path(tmp_path / "context.sock")
    # Bound and closed without unlinking: what a killed process leaves.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    assert path.is_socket()
    service = serving.Service("context", [])
    await serving.start(service, f"unix:{path}", serving._nothing)
    try:
        assert await health_of(f"unix:{path}") == health_pb2.HealthCheckResponse.SERVING
    finally:
        await service.server.stop(None)
