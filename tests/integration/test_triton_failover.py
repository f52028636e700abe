"""Triton killed with SIGKILL under load, with a second Triton configured:
streams it was answering end UNAVAILABLE saying how much they delivered,
and no request that had not started is lost."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

from meshgate.common.v1 import common_pb2
from meshgate.config import Settings
from meshgate.errors import error_info
from meshgate.inference.v1 import inference_service_pb2 as pb
from meshgate.inference.v1 import inference_service_pb2_grpc
from tests.integration.conftest import launched_tritons, running_inference
from tests.mesh import mesh_settings, router_channel

pytestmark = pytest.mark.integration

MODELS = ("tiny_gpt", "minilm")
IN_FLIGHT = 8
NOT_YET_STARTED = 8


@pytest.fixture
def two_tritons(tmp_path):
    """Two servers; yields their gRPC URLs and processes."""
    with launched_tritons(tmp_path, MODELS, 2) as servers:
        yield [url for url, _, _ in servers], [process for _, _, process in servers]


def generate_request(text: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=max_tokens, temperature=0.0),
    )


async def test_killed_triton_ends_its_streams_with_counts_and_loses_no_new_request(two_tritons) -> None:
    urls, processes = two_tritons
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = urls
    settings.inference.health_interval_s = 0.5
    # Both backends in rotation before the load starts.
    async with running_inference(settings) as address, router_channel(address, "inference") as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        all_started = asyncio.Event()
        started = 0

        async def stream(n: int, max_tokens: int, on_first_delta=None):
            text, completion = "", None
            try:
                request = generate_request(f"story {n}", max_tokens)
                async for response in stub.Generate(request, timeout=60):
                    if response.HasField("delta"):
                        if not text and on_first_delta:
                            on_first_delta()
                        text += response.delta.text
                    else:
                        completion = response.completion
            except grpc.aio.AioRpcError as error:
                return text, completion, error
            return text, completion, None

        def count_start():
            nonlocal started
            started += 1
            if started == IN_FLIGHT:
                all_started.set()

        # Long answers, so every stream is still running at the kill.
        in_flight = [
            asyncio.create_task(stream(n, 400, count_start)) for n in range(IN_FLIGHT)
        ]
        await asyncio.wait_for(all_started.wait(), 60)
        killed = processes[0]
        killed.send_signal(signal.SIGKILL)
        # Sent right after the kill, before the health probes notice it:
        # those given to the dead server must go to the other one.
        fresh = await asyncio.gather(*(stream(100 + n, 4) for n in range(NOT_YET_STARTED)))
        finished = await asyncio.gather(*in_flight)
        killed.wait(10)

    lost = [error for text, _, error in fresh if error is not None]
    assert not lost, f"{len(lost)} requests that had not started failed: {lost[0]}"
    assert all(completion is not None for _, completion, _ in fresh)

    broken = [(text, error) for text, _, error in finished if error is not None]
    completed = [completion for _, completion, error in finished if error is None]
    assert broken, "the killed server was answering none of the streams"
    assert all(c is not None and c.backend == urls[1] for c in completed)
    for text, error in broken:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        info = error_info(error)
        assert info is not None, error
        assert int(info.metadata["delivered_chars"]) == len(text)
        assert int(info.metadata["delivered_deltas"]) >= 1
        assert int(info.metadata["delivered_tokens"]) >= int(info.metadata["delivered_deltas"])

