"""The inference service against a real Triton: streaming, embeddings,
balancing over several backends, and cancellation reaching Triton."""

from __future__ import annotations

import asyncio
import collections
import logging

import numpy as np
import pytest

from meshgate import minilm, serving
from meshgate.common.v1 import common_pb2
from meshgate.config import Settings
from meshgate.inference.v1 import inference_service_pb2 as pb
from meshgate.inference.v1 import inference_service_pb2_grpc
from services.inference import app
from tests.integration.conftest import (
    running_inference,
    triton_cancellations,
    until_triton_cancels,
    wait_until_serving,
)
from tests.mesh import mesh_settings, router_channel

# Serial (make test runs it alone): a held stream must end within its hold.
pytestmark = [pytest.mark.integration, pytest.mark.serial]


def generate(text: str, **parameters) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(**parameters),
    )


@pytest.fixture
async def stub(inference_address):
    async with router_channel(inference_address, "inference") as channel:
        yield inference_service_pb2_grpc.InferenceServiceStub(channel)


async def run(call) -> tuple[list[str], pb.GenerateCompletion]:
    deltas, completion = [], None
    async for response in call:
        assert completion is None, "nothing may follow the completion"
        if response.HasField("delta"):
            deltas.append(response.delta.text)
        else:
            completion = response.completion
    assert completion is not None
    return deltas, completion


async def test_generate_streams_deltas_then_counts(stub):
    deltas, completion = await run(stub.Generate(generate("Hello there", max_tokens=12, temperature=0.0)))
    assert len(deltas) > 1
    assert completion.usage.completion_tokens <= 12
    assert completion.usage.prompt_tokens > 0
    assert completion.finish_reason in ("stop", "length")
    if completion.finish_reason == "length":
        assert completion.usage.completion_tokens == 12
    again, _ = await run(stub.Generate(generate("Hello there", max_tokens=12, temperature=0.0)))
    assert "".join(again) == "".join(deltas), "greedy decoding must be deterministic"


async def test_the_last_text_rides_on_the_completion_only_for_a_caller_that_reads_it(stub):
    plain_deltas, plain = await run(stub.Generate(generate("Hello there", max_tokens=12, temperature=0.0)))
    assert plain.text == "", "a caller that predates the field gets every text in deltas"
    request = generate("Hello there", max_tokens=12, temperature=0.0)
    request.completion_may_carry_text = True
    deltas, completion = await run(stub.Generate(request))
    # tiny-gpt's final response carries the last token's text.
    assert completion.text
    assert "".join(deltas) + completion.text == "".join(plain_deltas)
    assert completion.usage == plain.usage


async def test_embed_splits_large_batches_and_normalizes(stub):
    texts = [f"sentence number {i}" for i in range(70)]  # more than one Triton batch
    response = await stub.Embed(pb.EmbedRequest(texts=texts))
    vectors = np.frombuffer(response.vectors, dtype="<f4").reshape(len(texts), response.dimensions)
    assert response.dimensions == 384
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    single = await stub.Embed(pb.EmbedRequest(texts=[texts[42]]))
    np.testing.assert_allclose(np.frombuffer(single.vectors, dtype="<f4"), vectors[42], atol=1e-4)
    # Named for the code Triton ran (minilm's "revision" output), over both of its batches.
    for answer in (response, single):
        assert (answer.model, answer.model_revision) == ("minilm", minilm.REVISION)


async def test_models_and_backend_health(stub):
    models = await stub.ListModels(pb.ListModelsRequest())
    assert [(m.name, m.triton_model, m.context_window_tokens, m.ready) for m in models.models] == [
        # This session's Triton does not load smollm2 (its own tests start one that does).
        ("smollm2", "smollm2", 8192, False),
        ("tiny-gpt", "tiny_gpt", 512, True),
    ]
    health = await stub.GetBackendHealth(pb.GetBackendHealthRequest())
    assert [(b.live, b.ready) for b in health.backends] == [(True, True)]


@pytest.fixture
async def two_backends(triton_url):
    """One service over a dead address and two names of the live Triton."""
    port = triton_url.rsplit(":", 1)[1]
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = ["127.0.0.1:1", triton_url, f"localhost:{port}"]
    settings.inference.health_interval_s = 0.5
    service = serving.Service("inference", app.SERVICE_NAMES)
    cleanup = await app.setup(service, settings)
    bound = await serving.start(service, "127.0.0.1:0", cleanup)
    await wait_until_serving(service)
    async with router_channel(f"127.0.0.1:{bound}", "inference") as channel:
        yield inference_service_pb2_grpc.InferenceServiceStub(channel)
    await serving.stop(service, grace_s=1)


async def test_balances_over_ready_backends_and_skips_dead_ones(two_backends, triton_url):
    # Readiness of the second name of the same server may lag a probe behind.
    for _ in range(50):
        health = await two_backends.GetBackendHealth(pb.GetBackendHealthRequest())
        if sum(b.ready for b in health.backends) == 2:
            break
        await asyncio.sleep(0.1)
    results = await asyncio.gather(
        *(run(two_backends.Generate(generate(f"question {i}", max_tokens=8))) for i in range(8))
    )
    used = collections.Counter(completion.backend for _, completion in results)
    assert "127.0.0.1:1" not in used
    assert set(used) == {triton_url, f"localhost:{triton_url.rsplit(':', 1)[1]}"}, used


async def test_cancelling_generate_cancels_the_triton_request(stub, triton_server, caplog):
    # grpc formats a traceback for this debug record whenever the request
    # iterator of the Triton call raises, at any log level (~0.3 ms): a
    # cancelled call must end it quietly (each speculative generation that
    # a cache hit cancels comes this way).
    caplog.set_level(logging.DEBUG, logger="grpc.aio._call")
    _, log_path = triton_server
    before = triton_cancellations(log_path)
    call = stub.Generate(generate("Write a long essay", max_tokens=256))
    async for response in call:
        assert response.HasField("delta")
        break
    call.cancel()
    await until_triton_cancels(log_path, before, timeout_s=10)
    for _ in range(50):
        health = await stub.GetBackendHealth(pb.GetBackendHealthRequest())
        if health.backends[0].in_flight == 0:
            break
        await asyncio.sleep(0.1)
    assert health.backends[0].in_flight == 0
    assert not [r for r in caplog.records if "request_iterator raised" in r.getMessage()]


# Longer than any generation here: a stream that ends sooner than this
# was not held to the end of it.
LONG_HOLD_MS = 5_000.0


@pytest.fixture
async def held_stub(triton_url):
    """The inference service with a stream interval that holds even one stream."""
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = [triton_url]
    settings.inference.health_interval_s = 0.5
    settings.inference.stream_interval_ms = LONG_HOLD_MS
    settings.inference.stream_interval_min_streams = 1
    async with running_inference(settings) as address, router_channel(address, "inference") as channel:
        yield inference_service_pb2_grpc.InferenceServiceStub(channel)


async def test_the_stream_interval_joins_deltas_but_never_holds_the_first_or_the_end(stub, held_stub):
    request = generate("Tell me a story", max_tokens=24, temperature=0.0)
    plain, plain_completion = await run(stub.Generate(request))
    started = asyncio.get_running_loop().time()
    held, held_completion = await run(held_stub.Generate(request))
    elapsed_s = asyncio.get_running_loop().time() - started
    assert "".join(held) == "".join(plain)
    assert held_completion.usage == plain_completion.usage
    # The first delta alone, then the rest held together until the final
    # response, which went at once instead of after the hold: one delta
    # would mean the first was held with the rest.
    assert len(held) == 2 < len(plain), held
    assert elapsed_s < LONG_HOLD_MS / 1000
