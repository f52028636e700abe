"""The inference service's Embed and a caller's deadline, against a fake
Triton stub: the refusal is the service's own, not a client's timer."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from meshgate.config import InferenceSettings
from meshgate.errors import MeshgateError
from meshgate.inference.v1 import inference_service_pb2 as pb
from meshgate.reasons import Reason
from services.inference.backends import BackendPool
from services.inference.servicer import InferenceServicer
from tests.unit.test_streaming import until

DIMENSIONS = 4


class FakeContext:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


class GatedTriton:
    """ModelInfer for the embedding model, answering once ``release`` is set."""

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def ModelInfer(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        self.calls += 1
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return embedding_response(request)


def embedding_response(request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
    """The embedding model's answer to ``request``: a vector of ones per text."""
    texts = request.inputs[0].shape[0]
    response = service_pb2.ModelInferResponse()
    response.outputs.add(name="embedding", datatype="FP32", shape=[texts, DIMENSIONS])
    response.raw_output_contents.append(np.ones((texts, DIMENSIONS), np.float32).tobytes())
    return response


@pytest.fixture
def triton():
    return GatedTriton()


@pytest.fixture
async def servicer(triton):
    # Async: the pool's gRPC channels (never connected) want a running loop.
    settings = InferenceSettings(triton_urls=["127.0.0.1:1"])
    pool = BackendPool(settings.triton_urls, [settings.embedding_triton_model])
    backend = pool.backends[0]
    backend.ready_models = {settings.embedding_triton_model}
    backend.stub = triton
    yield InferenceServicer(settings, pool)
    await pool.close()


def assert_deadline_refusal(error: MeshgateError) -> None:
    assert (error.code, error.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED)


async def test_a_caller_whose_deadline_has_passed_is_refused_before_any_triton_work(servicer, triton):
    with pytest.raises(MeshgateError) as refused:
        await servicer.Embed(pb.EmbedRequest(texts=["a question"]), FakeContext(0))
    assert_deadline_refusal(refused.value)
    assert triton.calls == 0


async def test_a_remembered_vector_is_refused_too_once_the_deadline_has_passed(servicer, triton):
    triton.release.set()
    answer = await servicer.Embed(pb.EmbedRequest(texts=["a question"]), FakeContext(None))
    assert answer.dimensions == DIMENSIONS
    with pytest.raises(MeshgateError) as refused:
        await servicer.Embed(pb.EmbedRequest(texts=["a question"]), FakeContext(0))
    assert_deadline_refusal(refused.value)
    assert triton.calls == 1


async def test_a_deadline_that_passes_during_the_triton_call_ends_the_wait_and_the_call(servicer, triton):
    call = asyncio.create_task(servicer.Embed(pb.EmbedRequest(texts=["a question"]), FakeContext(0.05)))
    await asyncio.wait_for(triton.started.wait(), 5)
    with pytest.raises(MeshgateError) as refused:
        await asyncio.wait_for(call, 5)
    assert_deadline_refusal(refused.value)
    # It was the only waiter: the Triton call is cancelled, not left running.
    await until(lambda: triton.cancelled)
    assert triton.cancelled == 1
