"""The mesh heals: under the supervisor, a service or Triton killed with
SIGKILL is started again and the mesh serves again, in bounded time."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from meshgate.common.v1 import common_pb2
from meshgate.local.stack import Ports, Stack, free_port
from meshgate.local.supervisor import Supervisor
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from tests.integration.conftest import stop_stack
from tests.mesh import bounded_channel

# Not serial: its one bound is RECOVERY_BOUND_S, 90 s against the ~3-6 s a
# restart takes here, so it runs in make test's three-worker tier (its stack has
# its own ports and state folder). Serial, it added its ~14 s to the phase
# where every second is the suite's.
pytestmark = pytest.mark.e2e

KEY = "supervision-key"
# Generous: Triton loads its models again after a restart, on a busy machine.
RECOVERY_BOUND_S = 90.0


@pytest.fixture(scope="module")
def supervised(tmp_path_factory):
    ports = Ports(*(free_port() for _ in range(6)))
    stack = Stack(
        tmp_path_factory.mktemp("supervised"),
        ports,
        redis_url=os.environ.get("REDIS_URL"),
        dev_api_key=KEY,
        tracing=False,
        # Fast probes, so the inference service notices a restarted Triton at once.
        extra_settings="health_interval_s = 0.5\n",
        # tiny_gpt is all these requests use; smollm2 would slow each Triton start.
        triton_models=("tiny_gpt", "minilm"),
    )
    stack.start()
    supervisor = Supervisor(stack)
    supervisor.start()
    yield stack, supervisor
    supervisor.stop()
    stop_stack(stack)


async def chat_once(router: str, text: str) -> pb.ChatCompletion:
    """A session turn: it needs every part of the mesh (a stateless request
    is served even while the context service is down)."""
    auth = [("authorization", f"Bearer {KEY}")]
    async with bounded_channel(router) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        session = await stub.CreateSession(pb.CreateSessionRequest(), metadata=auth, timeout=20)
        completion = None
        async for response in stub.Chat(
            pb.ChatRequest(
                model="tiny-gpt",
                session_id=session.session_id,
                messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
                parameters=common_pb2.GenerationParameters(max_tokens=4),
                cache_policy=pb.CACHE_POLICY_BYPASS,
            ),
            metadata=auth,
            timeout=20,
        ):
            if response.HasField("completion"):
                completion = response.completion
        assert completion is not None, "the stream ended OK without a completion"
        assert completion.session_version == 1
        return completion


async def serves_again_after(stack: Stack, killed_at: float) -> float:
    """Seconds from the kill to the first answered request."""
    last_error = None
    while time.monotonic() - killed_at < RECOVERY_BOUND_S:
        try:
            completion = await chat_once(stack.address("router"), "are you back?")
            assert completion.usage.completion_tokens > 0
            return time.monotonic() - killed_at
        except grpc.aio.AioRpcError as error:
            last_error = error
            await asyncio.sleep(0.2)
    pytest.fail(f"no answer within {RECOVERY_BOUND_S:.0f} s of the kill; last error: {last_error}")


def kill(stack: Stack, name: str) -> tuple[int, float]:
    process = stack.processes[name]
    process.send_signal(signal.SIGKILL)
    return process.pid, time.monotonic()


@pytest.mark.parametrize("child", ["context", "triton"])
async def test_a_killed_child_is_restarted_and_the_mesh_serves_again(supervised, child) -> None:
    stack, supervisor = supervised
    await chat_once(stack.address("router"), "hello before")
    restarts_before = supervisor.restarts.get(child, 0)

    old_pid, killed_at = kill(stack, child)
    recovered_s = await serves_again_after(stack, killed_at)

    assert supervisor.restarts.get(child, 0) == restarts_before + 1
    assert stack.processes[child].pid != old_pid
    assert stack.processes[child].poll() is None
    print(f"{child}: serving again {recovered_s:.1f} s after SIGKILL")
