"""The supervisor says a child of the local stack is up when it is ready for
work, not when its port accepts connections: the inference service listens
at once but answers NOT_SERVING until it reaches a ready Triton, and again
once it has none. Taken for up while it refused every call UNAVAILABLE,
`meshgate status` said "all up" (exit code 0) to a script waiting on it."""

from __future__ import annotations

import signal
import socket
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate.local import certs, triton
from meshgate.local.stack import Ports, Stack, free_port
from meshgate.local.supervisor import Supervisor, read_status
from tests.inline_executor import InlineExecutor

pytestmark = pytest.mark.integration


def _health(stack: Stack, name: str) -> str:
    with stack.channel(name) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def _until(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout_s:.0f} s"
        time.sleep(0.1)


def _accepting(stack: Stack, name: str) -> bool:
    try:
        socket.create_connection(stack.address(name).rsplit(":", 1), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def stack(tmp_path):
    stack = Stack(
        tmp_path,
        Ports(*(free_port() for _ in range(6))),
        tracing=False,
        # The inference service's probes of Triton: it is SERVING soon after one is ready.
        extra_settings="health_interval_s = 0.2\n",
        triton_models=("tiny_gpt",),
    )
    certs.ensure(stack.certs_dir)
    stack._write_settings()
    yield stack
    stack.stop()


def test_a_service_is_up_while_its_health_check_answers_serving_only(stack, tmp_path) -> None:
    stack.launch("inference")
    # Its passes are the test's (a thread's would race the checks below).
    supervisor = Supervisor(stack, poll_interval_s=3600, asker=InlineExecutor())
    supervisor.start()
    try:

        def inference_state(now: float) -> str:
            supervisor.check(now)
            return read_status(tmp_path)["children"]["inference"]["state"]

        # No Triton yet: it accepts connections, and is not ready for work.
        _until(lambda: _accepting(stack, "inference"), "listening")
        assert _health(stack, "inference") == "NOT_SERVING"
        assert inference_state(1.0) == "starting"

        stack.launch("triton")
        triton.wait_ready(stack.address("triton"), stack.triton_models, 120, stack.processes["triton"])
        _until(lambda: _health(stack, "inference") == "SERVING", "SERVING")
        assert inference_state(2.0) == "up"

        # Its Triton gone, it still accepts connections, and serves nothing.
        stack.processes["triton"].send_signal(signal.SIGKILL)
        stack.processes["triton"].wait()
        _until(lambda: _health(stack, "inference") == "NOT_SERVING", "NOT_SERVING")
        assert _accepting(stack, "inference")
        assert inference_state(10.0) == "unready"
    finally:
        supervisor.stop()
