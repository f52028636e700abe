"""One caller's embedding input does not stall the inference service for
the others: through the real inference service, in front of real Triton."""

from __future__ import annotations

import asyncio
import time

import pytest

from meshgate.config import InferenceSettings, Settings
from meshgate.inference.v1 import inference_service_pb2 as pb
from meshgate.inference.v1 import inference_service_pb2_grpc
from tests.integration.conftest import running_inference
from tests.mesh import mesh_settings, router_channel

# Serial (make test runs it alone): other callers must not wait behind a large input.
pytestmark = [pytest.mark.integration, pytest.mark.serial]


async def test_a_megabyte_of_runs_just_short_of_the_cut_does_not_stall_other_callers(triton_url):
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = [triton_url]
    settings.inference.health_interval_s = 0.5
    # Words of 254 letters, each one [UNK]: the cut shortens them first, and
    # that once scanned each word again from every letter, holding the GIL
    # ~0.9 s a text, during which this service answered nobody.
    size = InferenceSettings().max_embed_text_bytes
    texts = [("a" * 254 + " ") * (size // 255 - index) for index in range(4)]
    async with running_inference(settings) as address, router_channel(address, "inference") as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        embedding = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(texts=texts), timeout=120))
        # Another caller's cheapest call, answered from memory, meanwhile.
        # Timed with the pause after it: a stall that lands in the pause
        # (the service runs in this process) holds that up instead.
        slowest = 0.0
        while not embedding.done():
            started = time.perf_counter()
            await stub.ListModels(pb.ListModelsRequest(), timeout=30)
            await asyncio.sleep(0.01)
            slowest = max(slowest, time.perf_counter() - started - 0.01)
        response = await embedding
    assert len(response.vectors) == len(texts) * response.dimensions * 4
    assert slowest < 0.4, f"a ListModels call waited {slowest:.2f} s behind another caller's Embed"
