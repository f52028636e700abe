"""The supervisor says a child of the local stack is up when it is ready for
work, not when its port accepts connections: the inference service listens
at once but answers NOT_SERVING until it reaches a ready Triton, and again
once it has none. Taken for up while it refused every call UNAVAILABLE,
`meshgate status` said "all up" (exit code 0) to a script waiting on it.

And a child that stays unready is stopped and started again, as one that
exits is: a SIGSTOPped Redis was left unready, its pid unchanged, until an
operator stepped in (measured on a real stack, Redis and the context
service stopped: after minutes, both still unready, no restart)."""

from __future__ import annotations

import signal
import socket
import time

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate.local import certs, triton
from meshgate.local.stack import Ports, Stack, free_port
from meshgate.local.supervisor import Backoff, Supervisor, read_status
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


def _child(stack: Stack, name: str) -> dict:
    return read_status(stack.state_dir)["children"][name]


def test_a_stalled_child_is_stopped_and_started_again_after_the_grace(stack) -> None:
    stack.launch("redis")
    _until(lambda: stack.ready("redis"), "Redis ready")
    store = redis.Redis(port=stack.ports.redis)
    store.set("kept", "yes")
    stalled = stack.processes["redis"]
    with Supervisor(stack, Backoff(initial_s=0.1), poll_interval_s=0.05, unready_grace_s=1.0):
        _until(lambda: _child(stack, "redis")["state"] == "up", "up")
        stalled.send_signal(signal.SIGSTOP)
        _until(lambda: _child(stack, "redis")["restarts"] == 1, "restarted", 30)
        _until(lambda: _child(stack, "redis")["state"] == "up", "up again")
        redis_status = _child(stack, "redis")
    # Continued with its SIGTERM, it stopped in order: its data kept.
    assert redis_status["last_exit"] == {"exit_code": 0}
    assert redis_status["stopped_for"].startswith("unready for ")
    assert redis_status["pid"] == stack.processes["redis"].pid != stalled.pid
    assert store.get("kept") == b"yes"


def test_a_child_that_never_gets_ready_is_restarted_after_its_start_timeout(stack) -> None:
    stack.launch("redis")
    stalled = stack.processes["redis"]
    stalled.send_signal(signal.SIGSTOP)
    # Its grace is no limit of a starting child's: only its start timeout is.
    with Supervisor(
        stack, Backoff(initial_s=0.1), poll_interval_s=0.05, unready_grace_s=0.1, start_timeout_s=2.0
    ):
        _until(lambda: _child(stack, "redis")["restarts"] == 1, "restarted", 30)
        _until(lambda: _child(stack, "redis")["state"] == "up", "up")
        redis_status = _child(stack, "redis")
    assert redis_status["stopped_for"].startswith("not ready ")
    assert stalled.poll() is not None


def test_a_service_unready_because_triton_is_is_left_while_triton_is_restarted(stack) -> None:
    """The inference service answers NOT_SERVING while its Triton does not
    answer: Triton is the child to restart, and the inference service serves
    again once Triton does, without a restart of its own."""
    stack.launch("triton")
    stack.launch("inference")
    triton.wait_ready(stack.address("triton"), stack.triton_models, 120, stack.processes["triton"])
    _until(lambda: _health(stack, "inference") == "SERVING", "SERVING")
    stalled, inference = stack.processes["triton"], stack.processes["inference"]
    # Longer than Triton takes to be seen unready (up to two asks of a
    # second each after the inference service's), so that only a rule, not
    # the timing, keeps the inference service from being restarted.
    with Supervisor(stack, Backoff(initial_s=0.1), poll_interval_s=0.05, unready_grace_s=4.0) as supervisor:
        _until(lambda: _child(stack, "inference")["state"] == "up", "up")
        stalled.send_signal(signal.SIGSTOP)
        _until(lambda: _child(stack, "inference")["state"] == "unready", "unready")
        _until(lambda: _child(stack, "triton")["restarts"] == 1, "Triton restarted", 60)
        _until(lambda: _child(stack, "inference")["state"] == "up", "up again", 120)
        assert _child(stack, "triton")["stopped_for"].startswith("unready for ")
        assert supervisor.restarts == {"triton": 1}
    assert stack.processes["inference"] is inference and inference.poll() is None
