"""A router with two deployments of tiny-gpt, one of whose inference
service is stopped with SIGSTOP: its host still accepts connections (the
kernel does), so no call on it fails, it just never answers. The router's
health checks take it out of rotation; the turn that was waiting on it goes
to the other deployment, the next turns go there at once, and it comes back
once it answers again. So does an embeddings request (POST /v1/embeddings)
that was waiting on it.

Before, each turn sent to the stopped deployment waited its whole deadline
(DEADLINE_EXCEEDED; 300 s without a client deadline), recorded nothing
against it, and so about half of all turns did so for as long as it stayed
stopped."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshgate import serving
from meshgate.common.v1 import common_pb2
from meshgate.config import DeploymentSettings, ModelSettings, Settings
from meshgate.inference.v1 import inference_service_pb2
from meshgate.local import children
from meshgate.local.stack import REPO_ROOT, free_port
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from meshgate.tasks import cancel_and_wait
from services.inference import app as inference_app
from services.router.deployments import PROBE_TIMEOUT_S, PROBES_TO_MARK_DOWN, DeploymentTable
from tests.integration.conftest import running_router, service_settings, wait_until_serving
from tests.mesh import bounded_channel, certs_dir, mesh_settings
from tests.tcp_proxy import TcpProxy

# Serial (make test runs it alone): bounds how soon a stopped deployment leaves rotation.
pytestmark = [pytest.mark.integration, pytest.mark.serial]

API_KEY = "hung-deployment-key"
INFERENCE_SERVICE = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
HEALTH_INTERVAL_S = 0.5
# Where the checks take a silent deployment out: PROBES_TO_MARK_DOWN rounds,
# each a check's timeout and the interval (7.5 s), and room for a loaded
# machine. The turns' own deadline is well past it: a turn that waits it out
# fails DEADLINE_EXCEEDED, as every second turn did before.
LEFT_WITHIN_S = PROBES_TO_MARK_DOWN * (PROBE_TIMEOUT_S + HEALTH_INTERVAL_S) + 5
TURN_DEADLINE_S = LEFT_WITHIN_S + 8


class StoppableInference:
    """An inference service in a process of its own, so that it can be
    stopped, over ``triton_url`` on the test mesh's certificates. It writes
    its address to a file once serving (its log is beside it)."""

    def __init__(self, triton_url: str, directory: pathlib.Path) -> None:
        self.address_file = directory / "address"
        self.log_file = directory / "inference.log"
        with self.log_file.open("ab") as log:
            self.process = children.start(
                [sys.executable, "-m", "tests.integration.test_router_hung_deployment",
                 triton_url, str(certs_dir()), str(self.address_file)],
                cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    async def address(self, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while not self.address_file.exists():
            log = self.log_file.read_text(errors="replace")
            assert self.process.poll() is None, f"the inference process exited:\n{log}"
            assert time.monotonic() < deadline, f"the inference process never served:\n{log}"
            await asyncio.sleep(0.1)
        return self.address_file.read_text()

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def end(self) -> None:
        """Resumed first (a stopped process takes no SIGTERM), then ended."""
        if self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def question(n: int) -> pb.ChatRequest:
    return pb.ChatRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=f"hello number {n}")],
        parameters=common_pb2.GenerationParameters(max_tokens=4, temperature=0.0),
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )


async def answered_by(stub, n: int) -> tuple[str, float]:
    """The deployment that answered turn ``n`` (or the failure's code), and how long it took."""
    started = time.monotonic()
    try:
        call = stub.Chat(
            question(n), metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=TURN_DEADLINE_S
        )
        async for response in call:
            if response.HasField("completion"):
                return response.completion.deployment, time.monotonic() - started
        return "no completion", time.monotonic() - started
    except grpc.aio.AioRpcError as error:
        return error.code().name, time.monotonic() - started


async def embedded_within(http: httpx.AsyncClient) -> tuple[int | str, float]:
    """The status of one embeddings request (or the client's timeout), and how long it took."""
    started = time.monotonic()
    try:
        response = await http.post("/embeddings", json={"model": "minilm", "input": "a cat"})
        return response.status_code, time.monotonic() - started
    except httpx.TimeoutException:
        return "timed out", time.monotonic() - started


async def test_a_stopped_deployment_leaves_rotation_and_its_waiting_turn_moves_on(
    redis_url, triton_url, inference_address, tmp_path
):
    stoppable = StoppableInference(triton_url, tmp_path)
    try:
        settings = service_settings(redis_url, inference_address, API_KEY)
        # The stoppable one weighs more: while both are idle every turn goes
        # to it first (least outstanding per unit of weight).
        settings.models = {
            "tiny-gpt": ModelSettings(
                routing_strategy="least_outstanding",
                deployments=[
                    # Listed first: embeddings ask it first while it is in rotation.
                    DeploymentSettings(
                        name="stoppable", address=await stoppable.address(), model="tiny-gpt", weight=2.0
                    ),
                    DeploymentSettings(name="steady", address=inference_address, model="tiny-gpt"),
                ],
            )
        }
        settings.router.deployment_health_interval_s = HEALTH_INTERVAL_S
        settings.router.http_listen = f"127.0.0.1:{free_port()}"
        async with (
            running_router(settings) as address,
            bounded_channel(address) as channel,
            httpx.AsyncClient(
                base_url=f"http://{settings.router.http_listen}/v1",
                headers={"authorization": f"Bearer {API_KEY}"},
                timeout=TURN_DEADLINE_S,
            ) as http,
        ):
            stub = router_service_pb2_grpc.RouterServiceStub(channel)
            assert (await answered_by(stub, 0))[0] == "stoppable"

            stoppable.signal(signal.SIGSTOP)
            (waiting_on_it, waited_s), (embedded, embed_waited_s) = await asyncio.gather(
                answered_by(stub, 1), embedded_within(http)
            )
            after = [await answered_by(stub, n) for n in range(2, 6)]

            stoppable.signal(signal.SIGCONT)
            # Answering again: half-open, so the next turn tries it, and it answers.
            back = None
            async with asyncio.timeout(15):
                while back != "stoppable":
                    back, _ = await answered_by(stub, 6)
                    await asyncio.sleep(HEALTH_INTERVAL_S)
    finally:
        stoppable.end()

    print(f"the turn sent to the stopped deployment was answered after {waited_s:.1f} s")
    assert waiting_on_it == "steady", "the turn waiting on the stopped deployment was not handed on"
    assert waited_s < LEFT_WITHIN_S
    # An Embed sent there waited until the keepalive dropped the connection
    # (20 s in this test), its call never ended by the checks, though the
    # steady service would have answered it.
    assert embedded == 200, f"the embeddings request waiting on the stopped service: {embedded}"
    assert embed_waited_s < LEFT_WITHIN_S
    # Out of rotation: no later turn waits on it.
    assert [who for who, _ in after] == ["steady"] * len(after)
    assert max(s for _, s in after) < PROBE_TIMEOUT_S, after


async def test_a_silent_deployment_does_not_delay_the_checks_of_the_other() -> None:
    """Each inference service is checked on a schedule of its own: while one
    answers nothing (a link holding its replies, so every check of it waits
    PROBE_TIMEOUT_S), the other's deployment leaves rotation and comes back
    as soon as its own checks say so, not a stalled round later each time.
    Real gRPC health services; the router's own table and watcher."""
    interval_s = 0.1
    healths, servers, ports = [], [], []
    for _ in range(2):
        healths.append(health.aio.HealthServicer())
        servers.append(grpc.aio.server())
        health_pb2_grpc.add_HealthServicer_to_server(healths[-1], servers[-1])
        ports.append(servers[-1].add_insecure_port("127.0.0.1:0"))
        await servers[-1].start()
    answering, _ = healths
    for each in healths:
        await each.set(INFERENCE_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    link = TcpProxy(ports[1])
    silent_port = await link.start()
    link.hold()
    table = DeploymentTable(
        {
            "tiny-gpt": ModelSettings(
                deployments=[
                    DeploymentSettings(name="answering", address=f"127.0.0.1:{ports[0]}", model="tiny-gpt"),
                    DeploymentSettings(name="silent", address=f"127.0.0.1:{silent_port}", model="tiny-gpt"),
                ],
            )
        }
    )
    (deployment,) = [d for d in table.candidates("tiny-gpt") if d.name == "answering"]
    watcher = asyncio.create_task(table.watch(interval_s))
    try:
        # The silent service's checks are under way and waiting.
        await asyncio.sleep(interval_s)
        await answering.set(INFERENCE_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        left_s = await seconds_until(lambda: not deployment.health.admits)
        await answering.set(INFERENCE_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        back_s = await seconds_until(lambda: deployment.health.admits)
    finally:
        await cancel_and_wait(watcher)
        await table.close()
        await link.close()
        for server in servers:
            await server.stop(None)

    print(f"out of rotation {left_s:.2f} s after NOT_SERVING, back {back_s:.2f} s after SERVING")
    # PROBES_TO_MARK_DOWN checks of the answering service alone: each takes
    # milliseconds and the interval. Rounds that waited for the silent one
    # took PROBE_TIMEOUT_S each: 3 x 2.1 s.
    assert left_s < PROBES_TO_MARK_DOWN * interval_s + PROBE_TIMEOUT_S
    assert back_s < PROBE_TIMEOUT_S


async def seconds_until(condition, limit_s: float = 30) -> float:
    """How long until ``condition()`` holds, polled."""
    started = time.monotonic()
    async with asyncio.timeout(limit_s):
        while not condition():
            await asyncio.sleep(0.01)
    return time.monotonic() - started


async def _serve_inference(triton_url: str, certs: str, address_file: str) -> None:
    settings = Settings(mesh=mesh_settings(pathlib.Path(certs)))
    settings.inference.triton_urls = [triton_url]
    settings.inference.health_interval_s = HEALTH_INTERVAL_S
    service = serving.Service("inference", inference_app.SERVICE_NAMES)
    cleanup = await inference_app.setup(service, settings)
    port = await serving.start(service, "127.0.0.1:0", cleanup)
    await wait_until_serving(service)
    # Written whole and renamed into place: the test never reads half of it.
    staging = pathlib.Path(address_file + ".tmp")
    staging.write_text(f"127.0.0.1:{port}")
    staging.replace(address_file)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_serve_inference(*sys.argv[1:4]))
