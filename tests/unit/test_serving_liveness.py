"""The health service name ``liveness`` (meshgate/serving.py LIVENESS_SERVICE)
says SERVING while the process serves, whatever its readiness says: the
Kubernetes liveness and startup probes ask for it (deploy/k8s), and read
the inference service's NOT_SERVING (no Triton ready) as a reason to
restart it when they asked for its readiness. Real servers."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate import serving

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def statuses(address: str) -> tuple[int, int]:
    """The readiness (no name) and the liveness that ``address`` reports."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        ready, live = [
            (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status
            for name in ("", serving.LIVENESS_SERVICE)
        ]
    return ready, live


async def test_a_service_not_ready_is_alive_on_both_ports_and_until_its_drain_ends(tmp_path):
    main, health = f"unix:{tmp_path / 'inference.sock'}", f"unix:{tmp_path / 'health.sock'}"
    service = serving.Service("inference", ["meshgate.inference.v1.InferenceService"])
    # As the inference service starts: not ready until a Triton server is.
    service.serving_when_started = False
    service.serve_plain_health(health)
    await serving.start(service, main, serving._nothing)
    stopping = None
    try:
        for address in (main, health):
            assert await statuses(address) == (NOT_SERVING, SERVING)
        await service.set_serving(True)
        assert await statuses(health) == (SERVING, SERVING)
        # A stream open on the service holds its drain open meanwhile.
        hold = grpc.aio.insecure_channel(main)
        watch = health_pb2_grpc.HealthStub(hold).Watch(health_pb2.HealthCheckRequest())
        await watch.read()
        stopping = asyncio.create_task(serving.stop(service, grace_s=5))
        await asyncio.sleep(0.3)
        assert await statuses(health) == (NOT_SERVING, SERVING)
        await hold.close()
    finally:
        if stopping is None:
            await service.server.stop(None)
            await service.health_server.stop(None)
        else:
            await stopping
