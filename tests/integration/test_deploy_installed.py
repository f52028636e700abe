"""An installed wheel runs each service: the four services started by their
console scripts from a wheel installed in a fresh venv, away from the
checkout, wired as a cluster wires them (one settings file, the mesh's
certificates, SmolLM2's files named by MESHGATE_SMOLLM2_FILES, a plain-text
health port each), in front of the real Triton and Redis. Each passes its
probes, and a question streams its answer through the router."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate import mesh_auth
from meshgate.common.v1 import common_pb2
from meshgate.config import DEFAULT_DEV_API_KEY, SMOLLM2_CHAT_TEMPLATE, SMOLLM2_TOKENIZER
from meshgate.local.stack import free_port
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from tests.mesh import bounded_channel, mesh_settings
from tests.unit.test_deploy_wheel import installed, wheel  # noqa: F401 - the wheel and its venv

pytestmark = pytest.mark.integration

SERVICES = mesh_auth.MESH_SERVICES
START_TIMEOUT_S = 180


def _settings(ports: dict[str, int], redis_url: str, triton_url: str) -> str:
    mesh = mesh_settings()
    inference = f"127.0.0.1:{ports['inference']}"
    # JSON strings are TOML strings.
    return f"""
[redis]
url = {json.dumps(redis_url)}

[mesh]
ca_file = {json.dumps(mesh.ca_file)}
cert_file = {json.dumps(mesh.cert_file)}
key_file = {json.dumps(mesh.key_file)}

[models.smollm2]
context_window_tokens = 8192
deployments = [{{ name = "installed", address = {json.dumps(inference)}, model = "smollm2" }}]

[models."tiny-gpt"]
deployments = [{{ name = "installed", address = {json.dumps(inference)}, model = "tiny-gpt" }}]

[router]
listen = "127.0.0.1:{ports["router"]}"
context_address = "127.0.0.1:{ports["context"]}"
cache_address = "127.0.0.1:{ports["cache"]}"
metrics_listen = ""
http_listen = ""

[context]
listen = "127.0.0.1:{ports["context"]}"
inference_address = {json.dumps(inference)}
metrics_listen = ""

[cache]
listen = "127.0.0.1:{ports["cache"]}"
inference_address = {json.dumps(inference)}
metrics_listen = ""

[inference]
listen = {json.dumps(inference)}
triton_urls = [{json.dumps(triton_url)}]
metrics_listen = ""
"""


async def _wait_serving(name: str, health_port: int, process: subprocess.Popen, log: pathlib.Path) -> None:
    """As the kubelet's gRPC probe asks: plain text, on the health port."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_S
    async with bounded_channel(f"127.0.0.1:{health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            assert process.poll() is None, f"{name} exited {process.returncode}:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(grpc.aio.AioRpcError):
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            assert loop.time() < deadline, (
                f"{name} not SERVING in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
            )
            await asyncio.sleep(0.2)


async def test_the_installed_services_serve_a_streamed_answer(installed, triton_url, redis_url, tmp_path):  # noqa: F811
    # What an image ships beside the venv: SmolLM2's tokenizer and template, in a folder of their own.
    model_files = tmp_path / "models" / "smollm2"
    model_files.mkdir(parents=True)
    shutil.copy(SMOLLM2_TOKENIZER, model_files / "tokenizer.json")
    shutil.copy(SMOLLM2_CHAT_TEMPLATE, model_files / "chat_template.jinja")
    ports = {name: free_port() for name in SERVICES}
    health_ports = {name: free_port() for name in SERVICES}
    config = tmp_path / "meshgate.toml"
    config.write_text(_settings(ports, redis_url, triton_url))
    base = {k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_") and k != "PYTHONPATH"}
    base.update(MESHGATE_CONFIG=str(config), MESHGATE_SMOLLM2_FILES=str(model_files), PYTHONUNBUFFERED="1")
    base.pop("REDIS_URL", None)

    processes: dict[str, subprocess.Popen] = {}
    logs = {name: tmp_path / f"{name}.log" for name in SERVICES}
    try:
        for name in ("inference", "context", "cache", "router"):
            # One host here, so each its own health port (in a cluster, one port for all).
            env = dict(base, MESHGATE_MESH__HEALTH_LISTEN=f"127.0.0.1:{health_ports[name]}")
            with logs[name].open("wb") as log:
                processes[name] = subprocess.Popen(
                    [installed / "bin" / f"meshgate-{name}"],
                    cwd=tmp_path,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        for name in ("inference", "context", "cache", "router"):
            await _wait_serving(name, health_ports[name], processes[name], logs[name])

        # The image's health check too, over each main port (the mesh's TLS for the internal ones).
        for name in SERVICES:
            probe = await asyncio.create_subprocess_exec(
                installed / "bin" / "meshgate-probe",
                name,
                "--address",
                f"127.0.0.1:{ports[name]}",
                "--timeout",
                "10",
                cwd=tmp_path,
                env=base,
                stderr=asyncio.subprocess.PIPE,
            )
            _, stderr = await asyncio.wait_for(probe.communicate(), timeout=60)
            assert probe.returncode == 0, (name, stderr.decode())

        request = pb.ChatRequest(
            model="tiny-gpt",
            messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="What runs here?")],
            parameters=common_pb2.GenerationParameters(max_tokens=8, temperature=0.0),
            cache_policy=pb.CACHE_POLICY_BYPASS,
        )
        deltas, completion = [], None
        async with bounded_channel(f"127.0.0.1:{ports['router']}") as channel:
            stub = router_service_pb2_grpc.RouterServiceStub(channel)
            metadata = (("authorization", f"Bearer {DEFAULT_DEV_API_KEY}"),)
            async for response in stub.Chat(request, metadata=metadata, timeout=120):
                if response.HasField("delta"):
                    deltas.append(response.delta.text)
                elif response.HasField("completion"):
                    completion = response.completion
        assert deltas and "".join(deltas).strip()
        assert completion is not None and completion.usage.completion_tokens > 0
    finally:
        for name in ("router", "cache", "context", "inference"):
            process = processes.get(name)
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
