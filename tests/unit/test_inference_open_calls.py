"""Calls on a Triton server that the health probes take out of rotation end
then, as UNAVAILABLE: an embedding goes to another server, a stream that
had output ends saying how much. The server here is a fake that never
answers (tests/integration/test_triton_failover.py stops a real one)."""

from __future__ import annotations

import asyncio
import contextlib
import types

import grpc
import pytest
from tritonclient.grpc import service_pb2

from meshgate.common.v1 import common_pb2
from meshgate.config import InferenceSettings
from meshgate.errors import MeshgateError
from meshgate.inference.v1 import inference_service_pb2 as pb
from meshgate.reasons import Reason
from services.inference.backends import (
    PROBES_TO_MARK_DOWN,
    BackendPool,
    OpenCalls,
    TritonBackend,
    TritonStreams,
)
from services.inference.servicer import InferenceServicer
from tests.unit.test_inference_embed import DIMENSIONS, FakeContext, embedding_response
from tests.unit.test_inference_stream import ScriptedCall, kinds, stream_on, triton_response
from tests.unit.test_streaming import until

GENERATION_MODEL, EMBEDDING_MODEL = "tiny_gpt", "minilm"
NO_DEADLINE = FakeContext(None)


class ProbedTriton:
    """The probe stub of a server whose models answer ready as ``ready`` says;
    ``stuck``: every probe times out, as on a stopped server."""

    def __init__(self, ready: set[str], stuck: bool = False) -> None:
        self.ready = ready
        self.stuck = stuck
        # Every model's config.max_batch_size, and its config reads.
        self.max_batch_size = 0
        self.config_reads = 0

    def _answer(self, response):
        if self.stuck:
            metadata = grpc.aio.Metadata()
            raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, metadata, metadata, "probe")
        return response

    async def ServerLive(self, request, timeout):
        return self._answer(service_pb2.ServerLiveResponse(live=True))

    async def ServerReady(self, request, timeout):
        return self._answer(service_pb2.ServerReadyResponse(ready=True))

    async def ModelReady(self, request, timeout):
        return self._answer(service_pb2.ModelReadyResponse(ready=request.name in self.ready))

    async def ModelConfig(self, request, timeout):
        self.config_reads += 1
        response = service_pb2.ModelConfigResponse()
        response.config.max_batch_size = self.max_batch_size
        return self._answer(response)

    async def ModelStatistics(self, request, timeout):
        return self._answer(service_pb2.ModelStatisticsResponse())


class EmbeddingTriton:
    """ModelInfer that answers at once, or (``silent``) never: each call is a
    task, which like a grpc call raises CancelledError once cancelled."""

    def __init__(self, silent: bool) -> None:
        self.silent = silent
        self.requests: list[asyncio.Future] = []

    def ModelInfer(self, request: service_pb2.ModelInferRequest) -> asyncio.Future:
        call = asyncio.ensure_future(self._answer(request))
        self.requests.append(call)
        return call

    async def _answer(self, request):
        if self.silent:
            await asyncio.Event().wait()
        return embedding_response(request)


async def probe_until_down(backend: TritonBackend, models: list[str]) -> None:
    for _ in range(PROBES_TO_MARK_DOWN):
        await backend.probe(models)


@pytest.fixture
async def backend():
    # Async: the backend's gRPC channels (never connected) want a running loop.
    backend = TritonBackend("127.0.0.1:1")
    yield backend
    await backend.close()


async def test_a_server_that_stops_answering_has_its_calls_ended_once_the_probes_take_it_out(backend):
    models = [GENERATION_MODEL, EMBEDDING_MODEL]
    backend._probe_stub = ProbedTriton(set(models))
    await backend.probe(models)
    generation, embedding = asyncio.Future(), asyncio.Future()
    backend.calls.add(generation, GENERATION_MODEL)
    backend.calls.add(embedding, EMBEDDING_MODEL)

    backend._probe_stub.stuck = True
    for _ in range(PROBES_TO_MARK_DOWN - 1):
        await backend.probe(models)
    assert backend.ready_models == set(models)
    assert not generation.cancelled(), "one bad probe too few must not end a call"
    await backend.probe(models)

    assert not backend.ready_models
    assert generation.cancelled() and embedding.cancelled()
    assert backend.calls.ended_here(generation) is not None
    assert backend.calls.ended_here(embedding) is not None


async def test_a_model_that_answers_not_ready_leaves_rotation_with_its_calls_left_to_the_server(backend):
    models = [GENERATION_MODEL, EMBEDDING_MODEL]
    backend._probe_stub = ProbedTriton(set(models))
    await backend.probe(models)
    generation = asyncio.Future()
    backend.calls.add(generation, GENERATION_MODEL)

    backend._probe_stub.ready = {EMBEDDING_MODEL}
    for _ in range(PROBES_TO_MARK_DOWN):
        await backend.probe(models)

    assert backend.ready_models == {EMBEDDING_MODEL}
    assert not generation.cancelled() and len(backend.calls) == 1


async def test_calls_of_a_model_out_of_rotation_end_once_its_server_stops_answering(backend):
    models = [GENERATION_MODEL]
    backend._probe_stub = ProbedTriton(set(models))
    await backend.probe(models)
    generation = asyncio.Future()
    backend.calls.add(generation, GENERATION_MODEL)
    backend._probe_stub.ready = set()
    await probe_until_down(backend, models)
    assert not backend.ready_models and not generation.cancelled()

    # One probe timeout (a busy server's blip) must not end its generations.
    backend._probe_stub.stuck = True
    await backend.probe(models)
    assert not generation.cancelled() and len(backend.calls) == 1
    backend._probe_stub.stuck = False
    await backend.probe(models)
    backend._probe_stub.stuck = True
    for _ in range(PROBES_TO_MARK_DOWN - 1):
        await backend.probe(models)
    assert not generation.cancelled(), "an answered round starts the count again"

    # Then the server wedges: the calls it still held would wait forever.
    await backend.probe(models)
    assert generation.cancelled() and backend.calls.ended_here(generation) is not None


async def test_a_models_config_is_read_again_after_it_was_not_ready(backend):
    models = [GENERATION_MODEL]
    backend._probe_stub = ProbedTriton(set(models))
    backend._probe_stub.max_batch_size = 8
    await backend.probe(models)
    await backend.probe(models)
    assert backend.batched[GENERATION_MODEL] and backend._probe_stub.config_reads == 1
    # A not-ready blip: the config read before still serves meanwhile.
    backend._probe_stub.ready = set()
    await backend.probe(models)
    assert backend.batched[GENERATION_MODEL]
    # Back with another config (a Triton restarted after a model update).
    backend._probe_stub.ready = set(models)
    backend._probe_stub.max_batch_size = 0
    await backend.probe(models)
    assert not backend.batched[GENERATION_MODEL]
    # A round that got no answer at all: read again too.
    backend._probe_stub.stuck = True
    await backend.probe(models)
    backend._probe_stub.stuck = False
    backend._probe_stub.max_batch_size = 4
    await backend.probe(models)
    assert backend.batched[GENERATION_MODEL] and backend._probe_stub.config_reads == 3


async def test_a_server_with_no_model_ready_is_not_reported_ready(backend):
    models = [GENERATION_MODEL]
    backend._probe_stub = ProbedTriton(set(models))
    await backend.probe(models)
    assert backend.ready
    # Every model unloaded: Triton's ServerReady still says ready.
    backend._probe_stub.ready = set()
    await probe_until_down(backend, models)
    assert backend.live and not backend.ready


async def test_a_stream_with_output_ends_unavailable_with_its_counts_when_the_probes_end_it():
    call = ScriptedCall()
    call.send(triton_response("partial", 3))
    stream, backend = stream_on(call)
    delivered = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for response in stream:
            delivered.append(response)
            assert len(backend.calls) == 1
            backend.calls.end({GENERATION_MODEL})
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [r.delta.text for r in delivered] == ["partial"]
    assert (stream.started, stream.delivered_deltas, stream.delivered_tokens) == (True, 1, 3)
    assert (backend.in_flight, len(backend.calls)) == (0, 0)


async def test_a_call_that_already_ended_is_not_marked_as_ended_by_the_probes():
    calls = OpenCalls()
    finished = asyncio.Future()
    finished.set_exception(RuntimeError("the model refused the request"))
    finished.exception()  # retrieved: no "never retrieved" warning
    calls.add(finished, GENERATION_MODEL)
    assert calls.end({GENERATION_MODEL}) == 0
    assert calls.ended_here(finished) is None


async def test_an_embedding_on_a_server_the_probes_take_out_is_retried_on_another():
    settings = InferenceSettings(triton_urls=["127.0.0.1:1", "127.0.0.1:2"])
    pool = BackendPool(settings.triton_urls, [EMBEDDING_MODEL])
    try:
        stopped, live = pool.backends
        stopped.stub, live.stub = EmbeddingTriton(silent=True), EmbeddingTriton(silent=False)
        stopped.ready_models = {EMBEDDING_MODEL}
        servicer = InferenceServicer(settings, pool)
        embed = asyncio.create_task(servicer.Embed(pb.EmbedRequest(texts=["a question"]), NO_DEADLINE))
        # Only the stopped server is ready when the call is made.
        await until(lambda: len(stopped.stub.requests) == 1)
        live.ready_models = {EMBEDDING_MODEL}

        stopped._probe_stub = ProbedTriton(set(), stuck=True)
        await probe_until_down(stopped, [EMBEDDING_MODEL])

        response = await asyncio.wait_for(embed, 5)
        assert (response.dimensions, len(response.vectors)) == (DIMENSIONS, DIMENSIONS * 4)  # float32
        assert stopped.stub.requests[0].cancelled() and len(live.stub.requests) == 1
        assert (stopped.in_flight, len(stopped.calls), live.in_flight) == (0, 0, 0)
    finally:
        await pool.close()


async def test_an_embedding_whose_only_server_the_probes_take_out_ends_unavailable():
    settings = InferenceSettings(triton_urls=["127.0.0.1:1"])
    pool = BackendPool(settings.triton_urls, [EMBEDDING_MODEL])
    try:
        (stopped,) = pool.backends
        stopped.stub = EmbeddingTriton(silent=True)
        stopped.ready_models = {EMBEDDING_MODEL}
        servicer = InferenceServicer(settings, pool)
        embed = asyncio.create_task(servicer.Embed(pb.EmbedRequest(texts=["a question"]), NO_DEADLINE))
        await until(lambda: len(stopped.stub.requests) == 1)

        stopped._probe_stub = ProbedTriton(set(), stuck=True)
        await probe_until_down(stopped, [EMBEDDING_MODEL])

        with pytest.raises(MeshgateError) as failure:
            await asyncio.wait_for(embed, 5)
        assert failure.value.code == grpc.StatusCode.UNAVAILABLE
        assert failure.value.reason == Reason.NO_READY_BACKEND
        assert len(stopped.stub.requests) == 1, "not asked again"
    finally:
        await pool.close()


STUB_DIED = "Stub process 'tiny_gpt_0_0' is not healthy."


async def test_requests_stranded_by_a_dead_stub_end_when_another_request_is_refused_for_it():
    # Triton sends the requests a killed stub was running nothing more: they
    # waited for their callers' deadlines, or forever, the server and model
    # reading ready all along. Another request's refusal says why.
    settings = InferenceSettings(triton_urls=["127.0.0.1:1", "127.0.0.1:2"])
    pool = BackendPool(settings.triton_urls, [GENERATION_MODEL])
    try:
        dead, alive = pool.backends
        dead.ready_models = {GENERATION_MODEL}
        on_dead, on_alive = scripted_streams(dead), scripted_streams(alive)
        failures = spy_on_failures(dead)
        servicer = InferenceServicer(settings, pool)
        request = pb.GenerateRequest(
            model="tiny-gpt", messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="hi")]
        )
        started = aiter(servicer.Generate(request, NO_DEADLINE))
        first = asyncio.ensure_future(anext(started))
        await until(lambda: on_dead and on_dead[0].requests)
        on_dead[0].send(triton_response("partial", 2))
        assert (await asyncio.wait_for(first, 5)).delta.text == "partial"
        unstarted = asyncio.ensure_future(anext(aiter(servicer.Generate(request, NO_DEADLINE))))
        await until(lambda: len(on_dead) == 2 and on_dead[1].requests)
        refused = asyncio.ensure_future(anext(aiter(servicer.Generate(request, NO_DEADLINE))))
        await until(lambda: len(on_dead) == 3 and on_dead[2].requests)
        # Only the dead stub's server had the model when those three came.
        alive.ready_models = {GENERATION_MODEL}
        on_dead[2].send(service_pb2.ModelStreamInferResponse(error_message=STUB_DIED))

        with pytest.raises(MeshgateError) as failure:
            await asyncio.wait_for(anext(started), 5)
        assert failure.value.code == grpc.StatusCode.UNAVAILABLE
        assert failure.value.metadata["delivered_chars"] == str(len("partial"))
        # Nothing had gone out for the other two: the live server answers them.
        await until(lambda: len(on_alive) == 2)
        for call in on_alive:
            call.send(triton_response("fine", 1))
        assert (await asyncio.wait_for(unstarted, 5)).delta.text == "fine"
        assert (await asyncio.wait_for(refused, 5)).delta.text == "fine"
        assert on_dead[0].cancelled and on_dead[1].cancelled
        assert (dead.in_flight, len(dead.calls)) == (0, 0)
        # The model's stub died, not the server: the mark took the model out,
        # and neither the refusal nor the calls it ended count against the
        # server's breaker (three did, which took its every model out).
        assert failures == []
    finally:
        await pool.close()


class StubDiedTriton(EmbeddingTriton):
    """ModelInfer whose first call never answers (the stub died under it)
    and whose later ones are refused, as Triton refuses them, once ``refuse`` is set."""

    def __init__(self) -> None:
        super().__init__(silent=True)
        self.refuse = asyncio.Event()

    async def _answer(self, request):
        if len(self.requests) > 1:
            await self.refuse.wait()
            metadata = grpc.aio.Metadata()
            raise grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, metadata, metadata, STUB_DIED)
        await asyncio.Event().wait()


async def test_an_embedding_stranded_by_a_dead_stub_goes_to_another_server_when_another_is_refused():
    settings = InferenceSettings(triton_urls=["127.0.0.1:1", "127.0.0.1:2"])
    pool = BackendPool(settings.triton_urls, [EMBEDDING_MODEL])
    try:
        dead, alive = pool.backends
        dead.stub, alive.stub = StubDiedTriton(), EmbeddingTriton(silent=False)
        dead.ready_models = {EMBEDDING_MODEL}
        failures = spy_on_failures(dead)
        servicer = InferenceServicer(settings, pool)
        stranded = asyncio.create_task(servicer.Embed(pb.EmbedRequest(texts=["one"]), NO_DEADLINE))
        await until(lambda: len(dead.stub.requests) == 1)
        refused = asyncio.create_task(servicer.Embed(pb.EmbedRequest(texts=["two"]), NO_DEADLINE))
        await until(lambda: len(dead.stub.requests) == 2)
        alive.ready_models = {EMBEDDING_MODEL}
        dead.stub.refuse.set()

        for embed in (stranded, refused):
            assert (await asyncio.wait_for(embed, 5)).dimensions == DIMENSIONS
        assert dead.stub.requests[0].cancelled() and len(alive.stub.requests) == 2
        assert (dead.in_flight, len(dead.calls)) == (0, 0)
        assert failures == [], "a stub's death is its model's, not its server's"
    finally:
        await pool.close()


def scripted_streams(backend: TritonBackend) -> list[ScriptedCall]:
    """Makes ``backend`` open ScriptedCalls for its streams; returns them, in order."""
    calls: list[ScriptedCall] = []

    def model_stream_infer():
        calls.append(ScriptedCall())
        return calls[-1]

    backend.stream_stub = types.SimpleNamespace(ModelStreamInfer=model_stream_infer)
    return calls


async def test_a_generation_that_fails_or_is_cancelled_no_longer_counts_toward_the_stream_interval():
    settings = InferenceSettings(triton_urls=["127.0.0.1:1"])
    pool = BackendPool(settings.triton_urls, [GENERATION_MODEL])
    try:
        (backend,) = pool.backends
        backend.ready_models = {GENERATION_MODEL}
        calls = scripted_streams(backend)
        servicer = InferenceServicer(settings, pool)
        request = pb.GenerateRequest(
            model="tiny-gpt", messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="hi")]
        )

        failing = aiter(servicer.Generate(request, NO_DEADLINE))
        reading = asyncio.ensure_future(anext(failing))
        await until(lambda: len(calls) == 1)
        assert servicer._generations == 1
        calls[0].send(service_pb2.ModelStreamInferResponse(error_message="model broke"))
        with pytest.raises(MeshgateError):
            await asyncio.wait_for(reading, 5)
        assert servicer._generations == 0

        cancelled = aiter(servicer.Generate(request, NO_DEADLINE))
        reading = asyncio.ensure_future(anext(cancelled))
        await until(lambda: len(calls) == 2)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        await cancelled.aclose()
        assert servicer._generations == 0 and calls[1].cancelled
    finally:
        await pool.close()


async def test_a_caller_that_leaves_as_the_probes_end_its_call_is_cancelled_not_failed():
    calls = OpenCalls()
    call = asyncio.Future()
    waiting = asyncio.create_task(calls.answer(call, EMBEDDING_MODEL))
    await until(lambda: len(calls) == 1)
    calls.end({EMBEDDING_MODEL})
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert waiting.cancelled() and len(calls) == 0


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    metadata = grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, metadata, metadata, "gone")


@pytest.mark.parametrize(
    "ending",
    # The connection reset; Triton closed the call cleanly (STREAM_ENDED_EARLY);
    # the server cancelled it (a cancel of ours is asyncio.CancelledError).
    [rpc_error(grpc.StatusCode.UNAVAILABLE), grpc.aio.EOF, rpc_error(grpc.StatusCode.CANCELLED)],
    ids=["unavailable", "clean-end", "cancelled-by-the-server"],
)
async def test_a_pooled_stream_that_died_idle_is_replaced_on_the_same_server_not_failed(ending):
    # Triton restarted under an idle stream that has not noticed yet: the
    # server is fine, and the only one, so the request must not fail.
    async with pooled_generations() as (backend, calls, generation):
        failures = spy_on_failures(backend)
        first = asyncio.ensure_future(anext(generation))
        await until(lambda: calls[1].requests)
        calls[1].send(ending)
        await until(lambda: len(calls) == 3)
        assert calls[0].cancelled, "the other idle stream went with it"
        calls[2].send(triton_response("fresh", 1))
        calls[2].send(triton_response("", 0, final=True, finish_reason="stop", prompt_tokens=3))
        responses = [await asyncio.wait_for(first, 5)] + [r async for r in generation]
        assert kinds(responses) == ["delta", "completion"]
        assert responses[0].delta.text == "fresh"
        assert failures == [], "a stream that died idle says nothing of the server"
        assert list(backend.streams._idle) == [calls[2]]


async def test_a_fresh_stream_that_ends_before_its_final_response_fails_the_generation():
    async with pooled_generations(idle_streams=0) as (backend, calls, generation):
        failures = spy_on_failures(backend)
        first = asyncio.ensure_future(anext(generation))
        await until(lambda: calls and calls[0].requests)
        calls[0].send(grpc.aio.EOF)
        with pytest.raises(MeshgateError) as failure:
            await asyncio.wait_for(first, 5)
        assert failure.value.reason == Reason.STREAM_ENDED_EARLY
        assert len(calls) == 1 and failures == [1], "only an idle stream's end is retried on its server"


async def test_a_caller_that_leaves_while_its_pooled_stream_is_silent_is_cancelled_not_retried():
    async with pooled_generations() as (backend, calls, generation):
        failures = spy_on_failures(backend)
        first = asyncio.ensure_future(anext(generation))
        await until(lambda: calls[1].requests)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert calls[1].cancelled, "the request inside Triton is cancelled with it"
        assert len(calls) == 2 and not calls[0].cancelled, "no fresh stream, the idle one kept"
        assert failures == []


def spy_on_failures(backend: TritonBackend) -> list[int]:
    """The failures Generate records against ``backend`` (its breaker)."""
    failures: list[int] = []
    backend.health.record_failure = lambda: failures.append(1)
    return failures


@contextlib.asynccontextmanager
async def pooled_generations(idle_streams: int = 4):
    """A generation's responses on the one backend, whose pool holds two idle
    streams if it may (``calls[0]``, ``calls[1]``; the generation takes
    ``calls[1]``, the most recently used) and opens ScriptedCalls after them."""
    settings = InferenceSettings(triton_urls=["127.0.0.1:1"], triton_idle_streams=idle_streams)
    pool = BackendPool(settings.triton_urls, [GENERATION_MODEL], settings.triton_idle_streams)
    try:
        (backend,) = pool.backends
        backend.ready_models = {GENERATION_MODEL}
        calls = scripted_streams(backend)
        if idle_streams:
            for call in (backend.streams.take()[0], backend.streams.take()[0]):
                backend.streams.give_back(call)
            assert len(backend.streams) == 2
        request = pb.GenerateRequest(
            model="tiny-gpt", messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="hi")]
        )
        generation = aiter(InferenceServicer(settings, pool).Generate(request, NO_DEADLINE))
        try:
            yield backend, calls, generation
        finally:
            await generation.aclose()
    finally:
        await pool.close()


async def test_idle_streams_are_dropped_when_the_probes_take_the_server_out(backend):
    models = [GENERATION_MODEL]
    backend._probe_stub = ProbedTriton(set(models))
    await backend.probe(models)
    idle = ScriptedCall()
    backend.streams = TritonStreams(lambda: idle, idle_limit=4)
    backend.streams.give_back(backend.streams.take()[0])
    backend._probe_stub.ready = set()
    await probe_until_down(backend, models)
    assert idle.cancelled and len(backend.streams) == 0


async def test_idle_streams_are_kept_while_a_model_this_server_does_not_load_stays_out(backend):
    # smollm2 is configured, but this server loads only tiny_gpt: each round
    # it stayed out cancelled every idle stream (reuse lost).
    models = [GENERATION_MODEL, "smollm2"]
    backend._probe_stub = ProbedTriton({GENERATION_MODEL})
    idle = ScriptedCall()
    backend.streams = TritonStreams(lambda: idle, idle_limit=4)
    backend.streams.give_back(backend.streams.take()[0])
    for _ in range(PROBES_TO_MARK_DOWN + 2):
        await backend.probe(models)
    assert not idle.cancelled and len(backend.streams) == 1


async def test_a_pooled_stream_whose_server_answers_with_an_error_is_not_replaced_on_that_server():
    # The model shutting down answers on the stream: the stream was alive,
    # the server is not, so no fresh stream there; the one server is tried once.
    async with pooled_generations() as (backend, calls, generation):
        failures = spy_on_failures(backend)
        first = asyncio.ensure_future(anext(generation))
        await until(lambda: calls[1].requests)
        calls[1].send(service_pb2.ModelStreamInferResponse(error_message="tiny_gpt: model is shutting down"))
        with pytest.raises(MeshgateError) as failure:
            await asyncio.wait_for(first, 5)
        assert failure.value.code == grpc.StatusCode.UNAVAILABLE
        assert len(calls) == 2 and failures == [1], "no stream opened for it; the server's failure recorded"
