"""Embed calls for one text share one Triton call, counted by Triton itself
(its inference statistics for minilm), through the real inference service."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from meshgate.config import Settings
from meshgate.inference.v1 import inference_service_pb2 as pb
from meshgate.inference.v1 import inference_service_pb2_grpc
from tests.integration.conftest import running_inference
from tests.mesh import bounded_channel, mesh_settings, router_channel

# Serial (make test runs it alone): a caller's deadline must pass while a shared call runs.
pytestmark = [pytest.mark.integration, pytest.mark.serial]

SHARED = "How long does a glacier take to move a kilometre?"


@contextlib.asynccontextmanager
async def inference_stub(triton_url: str, memo_entries: int):
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = [triton_url]
    settings.inference.health_interval_s = 0.5
    settings.inference.embedding_memo_entries = memo_entries
    async with running_inference(settings) as address, router_channel(address, "inference") as channel:
        yield inference_service_pb2_grpc.InferenceServiceStub(channel)


@pytest.fixture
async def triton_stub(triton_url):
    async with bounded_channel(triton_url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


async def minilm_counts(triton_stub) -> tuple[int, int]:
    """(requests, texts) Triton's minilm has run successfully so far, once
    they stop changing: a read right after an Embed answered was seen to
    lack that call's request (on a loaded machine), so a count waits until
    two reads 0.1 s apart agree (10 s at most)."""
    request = service_pb2.ModelStatisticsRequest(name="minilm")

    async def read() -> tuple[int, int]:
        stats = (await triton_stub.ModelStatistics(request, timeout=10)).model_stats[0]
        return stats.inference_stats.success.count, stats.inference_count

    loop = asyncio.get_running_loop()
    give_up = loop.time() + 10
    counts = await read()
    while loop.time() < give_up:
        await asyncio.sleep(0.1)
        if (counts_now := await read()) == counts:
            break
        counts = counts_now
    return counts


def long_texts(count: int, tag: str) -> list[str]:
    """Texts near the model's 256 tokens: a batch of them keeps Triton busy a while."""
    return [f"{tag} {index}: " + " ".join(f"word{index}x{n}" for n in range(80)) for index in range(count)]


async def test_an_embed_of_a_text_in_flight_joins_its_triton_call(triton_url, triton_stub):
    # No memo: only the call in flight can answer the second caller.
    async with inference_stub(triton_url, memo_entries=0) as stub:
        await stub.Embed(pb.EmbedRequest(texts=["warm up"]), timeout=60)
        requests_before, texts_before = await minilm_counts(triton_stub)
        # 23 long texts and the shared one: one Triton call of 24, a few
        # seconds of minilm on two cores.
        first = asyncio.ensure_future(
            stub.Embed(pb.EmbedRequest(texts=[*long_texts(23, "busy"), SHARED]), timeout=120)
        )
        # Wait until that call is inside Triton, then ask for the shared text alone.
        health = pb.GetBackendHealthRequest()
        while not any(b.in_flight for b in (await stub.GetBackendHealth(health, timeout=10)).backends):
            assert not first.done(), "the first call ended before it was seen in flight"
            await asyncio.sleep(0.001)
        second = await stub.Embed(pb.EmbedRequest(texts=[SHARED]), timeout=120)
        first = await first
        requests_after, texts_after = await minilm_counts(triton_stub)

    assert (requests_after - requests_before, texts_after - texts_before) == (1, 24)
    dimensions = first.dimensions
    assert second.dimensions == dimensions
    first_vectors = np.frombuffer(first.vectors, "<f4").reshape(24, dimensions)
    assert np.array_equal(np.frombuffer(second.vectors, "<f4"), first_vectors[-1])


async def test_the_memo_answers_a_repeat_without_triton_and_is_off_at_zero(triton_url, triton_stub):
    for memo_entries, repeat_requests in ((16, 0), (0, 1)):
        async with inference_stub(triton_url, memo_entries) as stub:
            first = await stub.Embed(pb.EmbedRequest(texts=[SHARED, "a second text"]), timeout=60)
            requests_before, _ = await minilm_counts(triton_stub)
            repeat = await stub.Embed(pb.EmbedRequest(texts=["a second text"]), timeout=60)
            requests_after, _ = await minilm_counts(triton_stub)
        assert requests_after - requests_before == repeat_requests, memo_entries
        size = 4 * first.dimensions
        assert repeat.vectors == first.vectors[size:]


async def test_a_caller_whose_deadline_passes_leaves_the_shared_call_to_the_others(triton_url, triton_stub):
    async with inference_stub(triton_url, memo_entries=16) as stub:
        await stub.Embed(pb.EmbedRequest(texts=["warm up"]), timeout=60)
        requests_before, _ = await minilm_counts(triton_stub)
        first = asyncio.ensure_future(
            stub.Embed(pb.EmbedRequest(texts=[*long_texts(23, "deadline"), SHARED + " (2)"]), timeout=120)
        )
        health = pb.GetBackendHealthRequest()
        while not any(b.in_flight for b in (await stub.GetBackendHealth(health, timeout=10)).backends):
            assert not first.done(), "the first call ended before it was seen in flight"
            await asyncio.sleep(0.001)
        with pytest.raises(grpc.aio.AioRpcError) as impatient:
            await stub.Embed(pb.EmbedRequest(texts=[SHARED + " (2)"]), timeout=0.001)
        assert impatient.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        first = await first
        # (A deadline already passed is refused even for a remembered vector:
        # tests/unit/test_inference_embed.py; over gRPC, a client's own timer
        # could not be told from the service's refusal.)
        requests_after, _ = await minilm_counts(triton_stub)
    assert len(first.vectors) == 24 * 4 * first.dimensions
    assert requests_after - requests_before == 1
