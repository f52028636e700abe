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


@pytest.mark.parametrize(
    ("form", "name"),
    [("unix:{}", "context.sock"), ("unix://{}", "context.sock"), ("unix:{}", "a%20b.sock")],
    ids=["unix:path", "unix:///path", "percent-encoded"],
)
async def test_a_second_service_on_a_live_unix_socket_is_refused_and_the_first_keeps_it(tmp_path, form, name):
    address = form.format(tmp_path / name)
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


async def test_a_live_socket_whose_accept_queue_is_full_is_refused(tmp_path):
    """Connecting to it fails at once (EAGAIN), not as to a dead one's."""
    path = str(tmp_path / "busy.sock")
    waiting: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(path)
        live.listen(0)
        try:
            for _ in range(8):  # past any backlog of 0: nothing accepts them
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                waiting.append(client)
                try:
                    client.connect(path)
                except BlockingIOError:
                    break
            else:
                pytest.fail("the accept queue never filled")
            with pytest.raises(OSError, match="another process is serving on it"):
                serving.Service("context", []).bind(f"unix:{path}")
        finally:
            for client in waiting:
                client.close()
