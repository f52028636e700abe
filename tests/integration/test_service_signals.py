"""Signals to a real service process: SIGHUP is the reload signal, never a
kill. A service with nothing to reload (here the inference service, no
Triton behind it: it reports NOT_SERVING, which is enough) keeps serving
through one, then drains on SIGTERM and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate.local.stack import free_port

pytestmark = pytest.mark.integration


def health_status(address: str) -> int | None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
        except grpc.RpcError:
            return None


def test_sighup_to_a_service_without_reload_hooks_neither_kills_it_nor_skips_its_drain(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "meshgate.toml"
    config.write_text(
        f'[mesh]\ntls = false\n[telemetry]\nmetrics = false\n[inference]\nlisten = "{address}"\n'
        f'triton_urls = ["127.0.0.1:{free_port()}"]\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_") and k != "REDIS_URL"}
    log = tmp_path / "inference.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.inference", "--config", str(config)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while health_status(address) is None:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        process.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert process.poll() is None, log.read_text()
        assert health_status(address) is not None
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()
        assert "nothing to reload" in log.read_text() and "draining" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
