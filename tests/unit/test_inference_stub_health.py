"""A model whose Python-backend stub died on one Triton server (Triton keeps
reading it ready and refuses its every request) leaves rotation there when
a refusal says so: health reports it not ready, with why, and requests go
elsewhere. A canary (one tiny real request each probe round) brings it back
once it is answered, and is also sent when a call has waited too long for
its first response, whose stub may have died under it with no later
request there to be refused. Triton is a scripted fake
(tests/integration/test_triton_stub_death.py kills a real stub)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from tritonclient.grpc import service_pb2

from meshgate.config import InferenceSettings
from meshgate.errors import MeshgateError
from meshgate.inference.v1 import inference_service_pb2 as pb
from meshgate.reasons import Reason
from services.inference.backends import BackendPool, OpenCalls, TritonBackend
from services.inference.servicer import InferenceServicer
from tests.clocks import Clock
from tests.unit.test_inference_breaker import STUB_DIED_NAMED, AnsweringCall
from tests.unit.test_inference_embed import embedding_response
from tests.unit.test_inference_open_calls import EMBEDDING_MODEL, GENERATION_MODEL, ProbedTriton
from tests.unit.test_inference_stream import ScriptedCall, stream_on, triton_response

MODELS = [GENERATION_MODEL, EMBEDDING_MODEL]
GENERATION_STUB_DIED = "Stub process 'tiny_gpt_0_0' is not healthy."


class CanariedTriton(ProbedTriton):
    """Every model reads ready, as Triton reads a model whose stub died; each
    request (a canary) is refused with ``refusal`` ("": answered), a
    model's error message, or ``code``'s status when set."""

    def __init__(self, refusal: str = "", code: grpc.StatusCode | None = None) -> None:
        super().__init__(set(MODELS))
        self.refusal = refusal
        self.code = code
        self.canaries: list[service_pb2.ModelInferRequest] = []
        self.timeouts: list[float] = []

    def _fail(self) -> None:
        if self.code is not None:
            metadata = grpc.aio.Metadata()
            raise grpc.aio.AioRpcError(self.code, metadata, metadata, self.refusal)

    def ModelStreamInfer(self, timeout: float) -> AnsweringCall:
        self.timeouts.append(timeout)
        self._fail()
        call = AnsweringCall(self.refusal)
        original_write = call.write

        async def write(request) -> None:
            self.canaries.append(request)
            await original_write(request)

        call.write = write
        return call

    async def ModelInfer(self, request, timeout: float):
        self.canaries.append(request)
        self.timeouts.append(timeout)
        self._fail()
        if self.refusal:
            metadata = grpc.aio.Metadata()
            raise grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, metadata, metadata, self.refusal)
        return embedding_response(request)


class HeldCanaries(CanariedTriton):
    """A generation canary waits (in Triton's queue, behind a busy but live
    model's slots) until ``release`` is set, then is answered."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    def ModelStreamInfer(self, timeout: float) -> AnsweringCall:
        call = super().ModelStreamInfer(timeout)
        write = call.write

        async def held(request) -> None:
            await self.release.wait()
            await write(request)

        call.write = held
        return call


async def probe_round(backend: TritonBackend) -> None:
    """A probe round, and the canaries it started, to their end (they run
    off the round: backends.TritonBackend._start_canaries)."""
    await backend.probe(MODELS)
    await asyncio.gather(*backend._canaries.values())


@pytest.fixture
async def backend():
    backend = TritonBackend("127.0.0.1:1", embedding_model=EMBEDDING_MODEL, unanswered_canary_s=30.0)
    backend._probe_stub = CanariedTriton()
    await backend.probe(MODELS)
    assert backend.ready_models == set(MODELS)
    yield backend
    await backend.close()


@pytest.mark.parametrize(
    ("model", "refusal"), [(GENERATION_MODEL, GENERATION_STUB_DIED), (EMBEDDING_MODEL, STUB_DIED_NAMED)]
)
async def test_a_model_whose_stub_died_stays_out_until_a_canary_is_answered(backend, model, refusal):
    triton = backend._probe_stub
    triton.refusal = refusal
    backend.stub_died(model, refusal)
    assert backend.ready_models == set(MODELS) - {model}
    assert backend.ready, "the other model still serves"
    assert refusal in backend.not_ready_reason(model)
    assert "stub process died" in backend.not_ready_reason(model)

    # Triton reads it ready, but its canaries are refused: it stays out.
    for _ in range(3):
        await probe_round(backend)
    assert model not in backend.ready_models and len(triton.canaries) == 3
    assert all(canary.model_name == model for canary in triton.canaries)

    triton.refusal = ""  # the model loaded again
    await probe_round(backend)
    assert model not in backend.stub_dead
    # Back at the next round that reads it ready.
    await probe_round(backend)
    assert backend.ready_models == set(MODELS) and backend.not_ready_reason(model) == ""
    assert len(triton.canaries) == 4, "no canary once it is back"


async def test_a_generation_canary_is_one_token_of_a_one_word_prompt_on_a_deadline(backend):
    triton = backend._probe_stub
    backend.stub_died(GENERATION_MODEL, GENERATION_STUB_DIED)
    await probe_round(backend)
    (canary,) = triton.canaries
    sampling = canary.raw_input_contents[[i.name for i in canary.inputs].index("sampling_parameters")]
    assert json.loads(sampling[4:]) == {"max_tokens": 1}
    assert len(canary.raw_input_contents[0]) < 16, "a tiny prompt"
    assert triton.timeouts == [pytest.approx(5.0)]


@pytest.mark.parametrize(
    ("code", "refusal"),
    [
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
        (None, "tiny_gpt: internal error during generation"),
    ],
)
async def test_only_an_answered_canary_brings_the_model_back(backend, code, refusal):
    triton = backend._probe_stub
    backend.stub_died(GENERATION_MODEL, GENERATION_STUB_DIED)
    triton.code, triton.refusal = code, refusal
    await probe_round(backend)
    assert GENERATION_MODEL not in backend.ready_models
    assert GENERATION_STUB_DIED in backend.not_ready_reason(GENERATION_MODEL)


async def test_no_canary_while_no_stub_is_dead_and_no_call_waits_long(backend):
    backend.calls = OpenCalls(clock := Clock())
    backend.calls.add(asyncio.Future(), GENERATION_MODEL)
    clock.now += 29
    for _ in range(3):
        await probe_round(backend)
    assert backend._probe_stub.canaries == []


async def test_a_call_long_unanswered_has_its_model_canaried_and_ends_if_the_stub_died(backend):
    # Its stub died under it before it answered: no later request came here
    # to be refused, so it waited for its caller's deadline.
    triton = backend._probe_stub
    backend.calls = OpenCalls(clock := Clock())
    stranded, answering, other_model = asyncio.Future(), asyncio.Future(), asyncio.Future()
    backend.calls.add(stranded, GENERATION_MODEL)
    backend.calls.add(answering, GENERATION_MODEL)
    backend.calls.add(other_model, EMBEDDING_MODEL)
    # Answered: what it waits for now, the stall bound covers.
    backend.calls.answered(other_model)
    clock.now += 31
    backend.calls.add(asyncio.Future(), EMBEDDING_MODEL)  # just sent

    # A slow model that answers the canary keeps its calls.
    await probe_round(backend)
    assert [c.model_name for c in triton.canaries] == [GENERATION_MODEL]
    assert not stranded.cancelled() and backend.ready_models == set(MODELS)

    triton.refusal = GENERATION_STUB_DIED
    await probe_round(backend)
    assert stranded.cancelled() and answering.cancelled() and not other_model.cancelled()
    assert backend.calls.ended_here(stranded).code() == grpc.StatusCode.UNAVAILABLE
    assert backend.ready_models == {EMBEDDING_MODEL}


async def test_a_stream_is_unanswered_until_tritons_first_response():
    call = ScriptedCall()
    stream, backend = stream_on(call)
    responses = aiter(stream)
    first = asyncio.create_task(anext(responses))
    await asyncio.sleep(0.01)
    assert backend.calls.unanswered_for(-1) == {GENERATION_MODEL}
    call.send(triton_response("Hi", 1))
    assert (await asyncio.wait_for(first, 5)).delta.text == "Hi"
    assert backend.calls.unanswered_for(-1) == set()
    await responses.aclose()


async def test_health_says_which_model_is_out_where_and_why_and_requests_go_elsewhere():
    settings = InferenceSettings(triton_urls=["127.0.0.1:1", "127.0.0.1:2"])
    pool = BackendPool(settings.triton_urls, MODELS, embedding_model=EMBEDDING_MODEL)
    try:
        for each in pool.backends:
            each._probe_stub = CanariedTriton(GENERATION_STUB_DIED)
        await asyncio.gather(*(each.probe(MODELS) for each in pool.backends))
        dead, alive = pool.backends
        dead.stub_died(GENERATION_MODEL, GENERATION_STUB_DIED)
        await asyncio.gather(*(each.probe(MODELS) for each in pool.backends))
        servicer = InferenceServicer(settings, pool)

        health = await servicer.GetBackendHealth(pb.GetBackendHealthRequest(), None)
        models = {(b.address, m.name): m for b in health.backends for m in b.models}
        assert len(models) == 4
        out = models[(dead.address, GENERATION_MODEL)]
        assert not out.ready and GENERATION_STUB_DIED in out.not_ready_reason
        others = [m for key, m in models.items() if key != (dead.address, GENERATION_MODEL)]
        assert all(m.ready and not m.not_ready_reason for m in others)
        assert all(b.ready for b in health.backends), "each still serves a model"
        assert all(pool.choose(GENERATION_MODEL) is alive for _ in range(10))

        alive.stub_died(GENERATION_MODEL, GENERATION_STUB_DIED)
        with pytest.raises(MeshgateError) as refused:
            pool.choose(GENERATION_MODEL)
        assert refused.value.reason == Reason.NO_READY_BACKEND
    finally:
        await pool.close()


async def test_a_canary_in_flight_holds_up_no_probe_round_and_goes_once_at_a_time(backend):
    """Awaited in the round, a busy model's canary (up to CANARY_TIMEOUT_S)
    delayed every server's probes: a dead one left rotation ~21 s late."""
    backend._probe_stub = triton = HeldCanaries()
    backend.stub_died(GENERATION_MODEL, GENERATION_STUB_DIED)
    for _ in range(3):
        await asyncio.wait_for(backend.probe(MODELS), 1)
    # The canary runs off the rounds, in a task of its own: let it reach Triton.
    async with asyncio.timeout(1):
        while not triton.timeouts:
            await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert len(triton.timeouts) == 1, "one canary in flight a model"
    canary = backend._canaries[GENERATION_MODEL]
    await backend.close()
    assert canary.cancelled(), "closed with its backend"


async def test_an_answered_canary_clears_only_a_stub_death_marked_before_it_was_sent(backend):
    backend._probe_stub = triton = HeldCanaries()
    backend.stub_died(GENERATION_MODEL, GENERATION_STUB_DIED)
    await backend.probe(MODELS)
    # Refused again while the canary waits: newer than what the canary can tell.
    backend.stub_died(GENERATION_MODEL, GENERATION_STUB_DIED)
    triton.release.set()
    await asyncio.gather(*backend._canaries.values())
    assert GENERATION_MODEL in backend.stub_dead
    await probe_round(backend)
    assert GENERATION_MODEL not in backend.stub_dead


NOT_LOADED = "Request for unknown model: 'tiny_gpt' has no available versions"


class HeldModelReady(ProbedTriton):
    """Answers each ModelReady once ``release`` is set, ``asked`` set meanwhile."""

    def __init__(self, ready: set[str]) -> None:
        super().__init__(ready)
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def ModelReady(self, request, timeout):
        self.asked.set()
        await self.release.wait()
        return await super().ModelReady(request, timeout)


async def test_a_model_refused_as_not_loaded_is_out_at_once_and_back_at_a_later_round_that_reads_it_ready():
    """Triton draining on SIGTERM (or unloading the model) refuses its new
    requests as not loaded: before, it stayed in rotation until the probes
    read it not ready PROBES_TO_MARK_DOWN times, drawing requests to be refused."""
    pool = BackendPool(["127.0.0.1:1"], MODELS, embedding_model=EMBEDDING_MODEL)
    (backend,) = pool.backends
    try:
        backend._probe_stub = triton = ProbedTriton(set(MODELS))
        await backend.probe(MODELS)
        backend.refused_as_not_loaded(GENERATION_MODEL, NOT_LOADED)
        assert backend.ready_models == {EMBEDDING_MODEL} and backend.ready
        assert "not loaded" in backend.not_ready_reason(GENERATION_MODEL)
        with pytest.raises(MeshgateError) as refused:
            pool.choose(GENERATION_MODEL)
        assert refused.value.reason == Reason.NO_READY_BACKEND
        assert "not loaded" in refused.value.message and "draining" in refused.value.message

        # A round under way at the refusal may have read it ready before it.
        backend._probe_stub = held = HeldModelReady(set(MODELS))
        under_way = asyncio.create_task(backend.probe(MODELS))
        await held.asked.wait()
        backend.refused_as_not_loaded(GENERATION_MODEL, NOT_LOADED)
        held.release.set()
        await under_way
        assert GENERATION_MODEL not in backend.ready_models
        backend._probe_stub = triton
        # A round begun after it that reads it ready puts it back.
        await backend.probe(MODELS)
        assert backend.ready_models == set(MODELS) and backend.not_ready_reason(GENERATION_MODEL) == ""

        # One that reads it not ready leaves it out, as the probes do.
        backend.refused_as_not_loaded(GENERATION_MODEL, NOT_LOADED)
        triton.ready = {EMBEDDING_MODEL}
        await backend.probe(MODELS)
        assert GENERATION_MODEL not in backend.ready_models
        triton.ready = set(MODELS)
        await backend.probe(MODELS)
        assert backend.ready_models == set(MODELS)
    finally:
        await pool.close()


class DrainingTriton(ProbedTriton):
    """Triton after SIGTERM: its liveness and readiness answered UNAVAILABLE "Server exiting"."""

    def _answer(self, response):
        metadata = grpc.aio.Metadata()
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, metadata, metadata, "Server exiting")


class OpenCall:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def test_a_draining_server_is_out_at_its_first_probe_and_its_calls_are_left_to_finish():
    pool = BackendPool(["127.0.0.1:1"], MODELS, embedding_model=EMBEDDING_MODEL)
    (backend,) = pool.backends
    try:
        backend._probe_stub = ProbedTriton(set(MODELS))
        await backend.probe(MODELS)
        call = OpenCall()
        backend.calls.add(call, GENERATION_MODEL)
        backend._probe_stub = DrainingTriton(set(MODELS))
        await backend.probe(MODELS)
        assert not backend.ready_models and not backend.ready
        assert "draining" in backend.not_ready_reason(GENERATION_MODEL)
        with pytest.raises(MeshgateError) as refused:
            pool.choose(GENERATION_MODEL)
        assert "draining" in refused.value.message
        for _ in range(5):
            await backend.probe(MODELS)
        assert not call.cancelled, "a draining server's rounds ended the call it was finishing"

        # Started again: back at the first round that reads it ready.
        backend._probe_stub = ProbedTriton(set(MODELS))
        await backend.probe(MODELS)
        assert backend.ready_models == set(MODELS)
    finally:
        await pool.close()


async def test_an_idle_model_is_canaried_once_a_quiet_spell_and_leaves_if_its_stub_died():
    """A stub that died while its model was idle (no call open) left the model
    reading ready, and was found only by the next caller's request, which
    failed. A model with no call open and nothing heard of it for
    idle_canary_s gets a canary at the next probe round; one a spell."""
    clock = Clock()
    backend = TritonBackend(
        "127.0.0.1:1", embedding_model=EMBEDDING_MODEL, unanswered_canary_s=30.0, idle_canary_s=60.0
    )
    backend.calls = OpenCalls(clock)
    triton = backend._probe_stub = CanariedTriton()
    try:
        await probe_round(backend)
        assert triton.canaries == [], "none before a quiet spell"
        # The embedding model answered a call 30 s in; the generation model
        # has a call open (a long generation answering all along).
        clock.now += 30
        await backend.calls.answer(asyncio.sleep(0, "an embedding"), EMBEDDING_MODEL)
        generating = asyncio.Future()
        backend.calls.add(generating, GENERATION_MODEL)
        backend.calls.answered(generating)
        clock.now += 40
        await probe_round(backend)
        assert triton.canaries == [], "heard 40 s ago, or a call open"

        # The generation ends: heard of to its end, it is not quiet yet.
        backend.calls.discard(generating)
        clock.now += 25  # the embedding model's last answer: 65 s ago
        await probe_round(backend)
        assert [c.model_name for c in triton.canaries] == [EMBEDDING_MODEL]
        clock.now += 36  # the generation's end: 61 s ago
        await probe_round(backend)
        assert [c.model_name for c in triton.canaries] == [EMBEDDING_MODEL, GENERATION_MODEL]
        await probe_round(backend)
        assert len(triton.canaries) == 2, "one a quiet spell"

        # The generation model's stub died while idle: its next canary finds it.
        triton.refusal = GENERATION_STUB_DIED
        clock.now += 61
        await probe_round(backend)
        assert GENERATION_MODEL not in backend.ready_models
        assert "stub process died" in backend.not_ready_reason(GENERATION_MODEL)
    finally:
        await backend.close()


async def test_no_idle_canary_when_it_is_off(backend):
    backend.calls = OpenCalls(clock := Clock())
    clock.now += 3600
    await probe_round(backend)
    assert backend._probe_stub.canaries == []
