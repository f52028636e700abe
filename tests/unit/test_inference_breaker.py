"""A Triton server whose model fails every request while it reads ready
(a model broken inside; a Python backend whose stub died answers "Stub
process ... is not healthy") leaves rotation by its breaker, as one that
refuses connections does; a request a dead stub refused goes to another
server; the caller's own mistakes count against no server. Triton is a
scripted fake (the servicer's balancing alone; tests/integration runs it on
Triton)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import structlog.testing
from tritonclient.grpc import service_pb2

from meshgate import balancing
from meshgate.config import InferenceSettings
from meshgate.errors import MeshgateError
from meshgate.inference.v1 import inference_service_pb2 as pb
from meshgate.reasons import Reason
from services.inference.backends import BackendPool
from services.inference.servicer import InferenceServicer
from tests.unit.test_balancing import Clock
from tests.unit.test_inference_embed import DIMENSIONS, FakeContext, GatedTriton, embedding_response
from tests.unit.test_inference_stream import ScriptedCall, answer
from tests.unit.test_streaming import until

STUB_DIED = "Failed to process the request(s) for model 'tiny_gpt_0_0', message: Stub process is not healthy."
# As tritonserver 2.51 answers, on a stream and to ModelInfer (INTERNAL) alike.
STUB_DIED_NAMED = "Stub process 'minilm_0_0' is not healthy."
MODEL_BROKE = "tiny_gpt: internal error during generation"


class FailingEmbeddings:
    def __init__(self, code: grpc.StatusCode | None, details: str = MODEL_BROKE) -> None:
        self.code = code
        self.details = details
        self.calls = 0

    async def ModelInfer(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        self.calls += 1
        if self.code is not None:
            metadata = grpc.aio.Metadata()
            raise grpc.aio.AioRpcError(self.code, metadata, metadata, self.details)
        return embedding_response(request)


class AnsweringCall(ScriptedCall):
    """A ModelStreamInfer call that answers each request it is written,
    with ``error`` (a model's error_message) or with a short answer."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error

    async def write(self, request) -> None:
        await super().write(request)
        if self.error:
            self.send(service_pb2.ModelStreamInferResponse(error_message=self.error))
        else:
            answer(self)

    async def done_writing(self) -> None:
        await super().done_writing()
        self.send(grpc.aio.EOF)


class StreamingTriton:
    def __init__(self, error: str = "") -> None:
        self.error = error
        self.calls = 0

    def ModelStreamInfer(self) -> AnsweringCall:
        self.calls += 1
        return AnsweringCall(self.error)


@pytest.fixture
async def two_servers():
    settings = InferenceSettings(triton_urls=["127.0.0.1:1", "127.0.0.1:2"])
    pool = BackendPool(settings.triton_urls, ["tiny_gpt", settings.embedding_triton_model])
    for backend in pool.backends:
        backend.ready_models = {"tiny_gpt", settings.embedding_triton_model}
    yield InferenceServicer(settings, pool), pool.backends
    await pool.close()


async def _generate(servicer: InferenceServicer, text: str) -> list[pb.GenerateResponse]:
    request = pb.GenerateRequest(model="tiny-gpt", messages=[{"role": "ROLE_USER", "content": text}])
    return [response async for response in servicer.Generate(request, FakeContext(None))]


async def test_a_server_whose_model_fails_every_generation_leaves_rotation(two_servers) -> None:
    servicer, (failing, answering) = two_servers
    failing.stream_stub, answering.stream_stub = StreamingTriton(MODEL_BROKE), StreamingTriton()
    to_open = failing.health.policy.failures_to_open
    failed = 0
    for i in range(20):
        try:
            responses = await _generate(servicer, f"question {i}")
        except MeshgateError as error:
            assert (error.code, error.reason) == (grpc.StatusCode.INTERNAL, Reason.MODEL_ERROR)
            failed += 1
        else:
            assert responses[-1].completion.finish_reason == "stop"
    # Without the breaker, about half of the 20 failed, for as long as it ran.
    assert failed == failing.stream_stub.calls == to_open
    assert failing.health.state is balancing.BreakerState.OPEN
    assert answering.health.state is balancing.BreakerState.CLOSED


async def test_a_server_whose_model_fails_every_embedding_leaves_rotation(two_servers) -> None:
    servicer, (failing, answering) = two_servers
    failing.stub, answering.stub = FailingEmbeddings(grpc.StatusCode.INTERNAL), FailingEmbeddings(None)
    failed = 0
    for i in range(12):
        try:
            response = await servicer.Embed(pb.EmbedRequest(texts=[f"question {i}"]), FakeContext(None))
        except MeshgateError as error:
            assert error.code == grpc.StatusCode.INTERNAL
            failed += 1
        else:
            assert response.dimensions == DIMENSIONS
    assert failed == failing.stub.calls == failing.health.policy.failures_to_open
    assert failing.health.state is balancing.BreakerState.OPEN


@pytest.mark.parametrize("stub_died", [STUB_DIED, "Stub process 'tiny_gpt_0_0' is not healthy."])
async def test_a_generation_a_dead_stub_refused_goes_to_another_server_and_takes_the_model_out_there(
    two_servers, stub_died
) -> None:
    # It failed INTERNAL (MODEL_ERROR) with a healthy server beside it; then
    # each request was refused there until its breaker opened (3 of them),
    # and again at each half-open probe, the model reading ready meanwhile.
    servicer, (dead, answering) = two_servers
    dead.stream_stub, answering.stream_stub = StreamingTriton(stub_died), StreamingTriton()
    for i in range(10):
        responses = await _generate(servicer, f"question {i}")
        assert responses[-1].completion.backend == answering.address
    assert dead.stream_stub.calls == 1
    assert dead.ready_models == {"minilm"} and "stub process died" in dead.not_ready_reason("tiny_gpt")
    assert dead.health.state is balancing.BreakerState.CLOSED


async def test_an_embedding_a_dead_stub_refused_goes_to_another_server(two_servers) -> None:
    servicer, (dead, answering) = two_servers
    dead.stub = FailingEmbeddings(grpc.StatusCode.INTERNAL, STUB_DIED_NAMED)
    answering.stub = FailingEmbeddings(None)
    for i in range(10):
        response = await servicer.Embed(pb.EmbedRequest(texts=[f"question {i}"]), FakeContext(None))
        assert response.dimensions == DIMENSIONS
    assert dead.stub.calls == 1
    assert dead.ready_models == {"tiny_gpt"}


async def test_requests_the_model_refuses_count_against_no_server(two_servers) -> None:
    servicer, backends = two_servers
    for backend in backends:
        backend.stream_stub = StreamingTriton("tiny_gpt: invalid request: stop is too long")
    for i in range(10):
        with pytest.raises(MeshgateError) as refused:
            await _generate(servicer, f"question {i}")
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert all(b.health.state is balancing.BreakerState.CLOSED for b in backends)


class SilentTriton:
    """A Triton server that takes a generation and answers nothing, until
    its caller goes away."""

    def __init__(self) -> None:
        self.calls: list[ScriptedCall] = []

    def ModelStreamInfer(self) -> ScriptedCall:
        self.calls.append(ScriptedCall())
        return self.calls[-1]


def half_open(backend, clock: Clock) -> None:
    """``backend``'s breaker opened by a failure and its open time past: the
    next request sent there is its probe."""
    backend.health = balancing.Health(balancing.BreakerPolicy(failures_to_open=1, open_for_s=10.0), clock)
    backend.health.record_failure()
    clock.now += 10
    assert backend.health.state is balancing.BreakerState.HALF_OPEN and backend.health.admits


async def test_a_half_open_generation_its_caller_cancels_frees_the_probe_slot_at_once(two_servers) -> None:
    """The caller went away (its deadline, a cancel): that says nothing of
    the server's health, yet the probe's slot stayed taken for open_for_s
    (10 s), the server taking no trial meanwhile. Neither a success nor a
    failure: half-open still, free to probe again."""
    servicer, (probed, other) = two_servers
    other.ready_models = set()  # the probed server is the only one
    half_open(probed, Clock())
    probed.stream_stub = silent = SilentTriton()
    generation = asyncio.create_task(_generate(servicer, "question"))
    await until(lambda: silent.calls and silent.calls[0].requests)
    assert not probed.health.admits  # the probe holds the slot while it runs
    generation.cancel()
    with pytest.raises(asyncio.CancelledError):
        await generation
    assert probed.health.state is balancing.BreakerState.HALF_OPEN and probed.health.admits


async def test_a_half_open_generation_the_model_refuses_frees_the_probe_slot_at_once(two_servers) -> None:
    """A request the model refuses (its own fault) says nothing of the
    server's health either: it held the probe's slot for open_for_s."""
    servicer, (probed, other) = two_servers
    other.ready_models = set()  # the probed server is the only one
    half_open(probed, Clock())
    probed.stream_stub = StreamingTriton("tiny_gpt: invalid request: stop is too long")
    with pytest.raises(MeshgateError) as refused:
        await _generate(servicer, "question")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert probed.health.state is balancing.BreakerState.HALF_OPEN and probed.health.admits


async def test_a_half_open_embedding_its_caller_cancels_frees_the_probe_slot_at_once(two_servers) -> None:
    servicer, (probed, other) = two_servers
    other.ready_models = set()
    half_open(probed, Clock())
    probed.stub = gated = GatedTriton()
    embedding = asyncio.create_task(servicer.Embed(pb.EmbedRequest(texts=["question"]), FakeContext(None)))
    await asyncio.wait_for(gated.started.wait(), 5)
    assert not probed.health.admits
    embedding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await embedding
    await until(lambda: gated.cancelled)  # the shared embedding stops with its last caller
    assert probed.health.state is balancing.BreakerState.HALF_OPEN and probed.health.admits


@pytest.mark.parametrize(
    ("code", "details"),
    [
        # The model's refusal of the caller's input: the caller's to fix.
        (grpc.StatusCode.INVALID_ARGUMENT, "minilm: invalid request: text is not a string"),
        # Unloaded there, not yet out of rotation: embedded on the other server.
        (grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'minilm' is not found"),
        # Its stub died: the model leaves rotation there, not the server.
        (grpc.StatusCode.INTERNAL, STUB_DIED_NAMED),
    ],
    ids=["refused", "unloaded", "stub-died"],
)
async def test_a_half_open_embedding_that_is_no_outcome_of_the_server_frees_the_probe_slot_at_once(
    two_servers, code, details
) -> None:
    """As a generation's (above): it held the probe's slot for open_for_s
    (10 s), so for that long the server took no trial, of any model."""
    servicer, (probed, other) = two_servers
    half_open(probed, Clock())
    # The probed server first: the other one is busy.
    other.in_flight = 10
    probed.stub, other.stub = FailingEmbeddings(code, details), FailingEmbeddings(None)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # The caller's to fix: refused, not embedded elsewhere.
        with pytest.raises(MeshgateError) as refused:
            await servicer.Embed(pb.EmbedRequest(texts=["question"]), FakeContext(None))
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    else:
        # The model gone there: embedded on the other server.
        answer = await servicer.Embed(pb.EmbedRequest(texts=["question"]), FakeContext(None))
        assert answer.dimensions > 0 and len(answer.vectors) == 4 * answer.dimensions
        assert other.stub.calls == 1
    assert probed.stub.calls == 1
    assert probed.health.state is balancing.BreakerState.HALF_OPEN and probed.health.admits


# A server gone before its probes notice (a refusal as not loaded, as while
# Triton drains, takes the model out at once: TritonBackend.refused_as_not_loaded).
REFUSED = "failed to connect to all addresses; last error: UNKNOWN: Connection refused"


class RefusingCall(ScriptedCall):
    """A ModelStreamInfer call that fails UNAVAILABLE at its first request."""

    async def write(self, request) -> None:
        await super().write(request)
        metadata = grpc.aio.Metadata()
        self.send(grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, metadata, metadata, REFUSED))


class RefusingTriton:
    def ModelStreamInfer(self) -> RefusingCall:
        return RefusingCall()


async def test_a_server_that_refuses_every_generation_is_logged_once_per_interval_with_a_count() -> None:
    """The only Triton refusing every call: each one logged "triton
    unavailable, trying another", three lines for each request (its
    router's channel retries UNAVAILABLE twice) while the probes still held
    it in rotation. One line per server and interval now, saying what the
    server answered and how many refusals it stood for."""
    settings = InferenceSettings(triton_urls=["127.0.0.1:1"])
    pool = BackendPool(settings.triton_urls, ["tiny_gpt", settings.embedding_triton_model])
    (draining,) = pool.backends
    draining.ready_models = {"tiny_gpt", settings.embedding_triton_model}
    draining.stream_stub = RefusingTriton()
    clock = Clock()
    servicer = InferenceServicer(settings, pool, clock=clock)

    async def refused_calls(count: int) -> None:
        for i in range(count):
            with pytest.raises(MeshgateError) as refused:
                await _generate(servicer, f"question {i}")
            assert (refused.value.code, refused.value.reason) == (
                grpc.StatusCode.UNAVAILABLE,
                Reason.NO_READY_BACKEND,
            )

    try:
        with structlog.testing.capture_logs() as logs:
            await refused_calls(3)  # one request and its router's two retries
            clock.now += 9.9
            await refused_calls(3)
            clock.now += 0.1
            await refused_calls(1)
        lines = [entry for entry in logs if entry["event"] == "triton unavailable, trying another"]
        expected = {"backend": "127.0.0.1:1", "error": REFUSED, "log_level": "warning"}
        assert lines == [
            {"event": "triton unavailable, trying another", "suppressed": 0, **expected},
            {"event": "triton unavailable, trying another", "suppressed": 5, **expected},
        ]
    finally:
        await pool.close()
