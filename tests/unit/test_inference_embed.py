"""The inference service's Embed and a caller's deadline, against a fake
Triton stub: the refusal is the service's own, not a client's timer."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import grpc
import numpy as np
import pytest
import structlog.testing
from tritonclient.grpc import service_pb2

from meshgate import balancing
from meshgate.config import InferenceSettings
from meshgate.embedding import REVISION_SILENCE_S
from meshgate.errors import MeshgateError
from meshgate.inference.v1 import inference_service_pb2 as pb
from meshgate.reasons import Reason
from services.inference.backends import BackendPool
from services.inference.servicer import InferenceServicer
from services.inference.shared_embeddings import EMBED_AGAIN_ROUNDS, EMBED_BATCH
from tests.clocks import Clock
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


class ScriptedTriton:
    """ModelInfer that fails UNAVAILABLE (a server gone) while ``failing``,
    and otherwise answers; counts the calls it got."""

    def __init__(self, failing: bool) -> None:
        self.failing = failing
        self.calls = 0

    async def ModelInfer(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        self.calls += 1
        if self.failing:
            metadata = grpc.aio.Metadata()
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, metadata, metadata, "connection refused")
        return embedding_response(request)


@pytest.fixture
async def pool_of_two():
    settings = InferenceSettings(triton_urls=["127.0.0.1:1", "127.0.0.1:2"])
    pool = BackendPool(settings.triton_urls, [settings.embedding_triton_model])
    for backend in pool.backends:
        backend.ready_models = {settings.embedding_triton_model}
    yield settings, pool
    await pool.close()


async def test_a_server_that_fails_embeddings_is_taken_out_of_rotation_by_its_breaker(pool_of_two):
    settings, pool = pool_of_two
    failing, answering = pool.backends
    failing.stub, answering.stub = ScriptedTriton(failing=True), ScriptedTriton(failing=False)
    servicer = InferenceServicer(settings, pool)
    # Distinct texts: none is answered from the memo. Without the breaker
    # the failing server keeps being tried first: it got every one of the 12.
    for i in range(4 * failing.health.policy.failures_to_open):
        response = await servicer.Embed(pb.EmbedRequest(texts=[f"question {i}"]), FakeContext(None))
        assert response.dimensions == DIMENSIONS
    assert failing.stub.calls == failing.health.policy.failures_to_open
    assert failing.health.state is balancing.BreakerState.OPEN
    assert answering.health.state is balancing.BreakerState.CLOSED


async def test_an_embedding_success_resets_the_breaker_and_a_half_open_probe_is_one_at_a_time(pool_of_two):
    settings, pool = pool_of_two
    server = pool.backends[0]
    pool.backends.remove(pool.backends[1])  # one server: a failure is the caller's
    clock = Clock()
    server.health = balancing.Health(clock=clock)
    server.stub = ScriptedTriton(failing=True)
    servicer = InferenceServicer(settings, pool)
    texts = (f"question {i}" for i in itertools.count())

    async def embed(outcome: str) -> None:
        server.stub.failing = outcome == "fails"
        if server.stub.failing:
            with pytest.raises(MeshgateError) as failure:
                await servicer.Embed(pb.EmbedRequest(texts=[next(texts)]), FakeContext(None))
            assert failure.value.code == grpc.StatusCode.UNAVAILABLE
        else:
            await servicer.Embed(pb.EmbedRequest(texts=[next(texts)]), FakeContext(None))

    to_open = server.health.policy.failures_to_open
    for _ in range(to_open - 1):
        await embed("fails")
    await embed("answers")  # the failures in a row start again
    for _ in range(to_open - 1):
        await embed("fails")
    assert server.health.state is balancing.BreakerState.CLOSED
    await embed("fails")
    assert server.health.state is balancing.BreakerState.OPEN

    clock.now += server.health.policy.open_for_s
    assert server.health.state is balancing.BreakerState.HALF_OPEN and server.health.admits
    gated = GatedTriton()
    server.stub = gated
    probe = asyncio.create_task(servicer.Embed(pb.EmbedRequest(texts=["the probe"]), FakeContext(None)))
    await asyncio.wait_for(gated.started.wait(), 5)
    assert not server.health.admits, "the embedding in flight is the half-open probe"
    gated.release.set()
    await asyncio.wait_for(probe, 5)
    assert server.health.state is balancing.BreakerState.CLOSED


class RevisedTriton:
    """ModelInfer for the embedding model, naming ``revision`` in its
    "revision" output as minilm's model.py does; ``vector`` per text."""

    def __init__(self, revision: str, value: float = 1.0) -> None:
        self.revision = revision
        self.value = value
        self.calls = 0
        self.release = asyncio.Event()
        self.release.set()
        self.started = asyncio.Event()

    async def ModelInfer(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        texts = request.inputs[0].shape[0]
        response = service_pb2.ModelInferResponse()
        response.outputs.add(name="embedding", datatype="FP32", shape=[texts, DIMENSIONS])
        response.raw_output_contents.append(np.full((texts, DIMENSIONS), self.value, np.float32).tobytes())
        response.outputs.add(name="revision", datatype="BYTES", shape=[texts, 1])
        element = self.revision.encode()
        response.raw_output_contents.append((len(element).to_bytes(4, "little") + element) * texts)
        return response


@contextlib.asynccontextmanager
async def servicer_over_one_server(**options):
    """A servicer (made with ``options``) over one Triton server whose stub a test sets."""
    settings = InferenceSettings(triton_urls=["127.0.0.1:1"])
    pool = BackendPool(settings.triton_urls, [settings.embedding_triton_model])
    backend = pool.backends[0]
    backend.ready_models = {settings.embedding_triton_model}
    try:
        yield InferenceServicer(settings, pool, **options), backend
    finally:
        await pool.close()


@pytest.fixture
async def one_server():
    async with servicer_over_one_server() as made:
        yield made


async def test_embed_names_the_revision_that_made_the_vectors_and_never_mixes_another_s(one_server):
    servicer, server = one_server
    server.stub = RevisedTriton("2")
    answer = await servicer.Embed(pb.EmbedRequest(texts=["tides"]), FakeContext(None))
    assert (answer.model, answer.model_revision) == ("minilm", "2")
    # Triton's model upgraded under the service: the vector remembered from
    # revision 2 is not answered as revision 3's (nor beside one of it).
    server.stub = RevisedTriton("3", value=0.5)
    answer = await servicer.Embed(pb.EmbedRequest(texts=["waves"]), FakeContext(None))
    assert answer.model_revision == "3"
    answer = await servicer.Embed(pb.EmbedRequest(texts=["tides", "waves"]), FakeContext(None))
    assert answer.model_revision == "3"
    np.testing.assert_array_equal(np.frombuffer(answer.vectors, "<f4"), np.full(2 * DIMENSIONS, 0.5))
    assert server.stub.calls == 2


def assert_one_revisions_vectors(answer: pb.EmbedResponse, texts: int) -> None:
    """Every vector of ``answer`` is the one its named revision's server
    makes (RevisedTriton's value: 1.0 for "2", 0.5 for "3")."""
    value = {"2": 1.0, "3": 0.5}[answer.model_revision]
    np.testing.assert_array_equal(np.frombuffer(answer.vectors, "<f4"), np.full(texts * DIMENSIONS, value))


async def test_an_embed_sharing_a_flight_another_revision_answers_is_answered_by_one_revision(one_server):
    # A text in flight to a server of revision 2 when one of revision 3
    # answers the rest of a request that shares it (two servers of two
    # revisions side by side during an upgrade). It was refused
    # EMBEDDER_CHANGED; the text of the revision that made fewer (here one
    # each) is embedded again.
    servicer, server = one_server
    gated = server.stub = RevisedTriton("2")
    gated.release.clear()
    first = asyncio.create_task(servicer.Embed(pb.EmbedRequest(texts=["tides"]), FakeContext(None)))
    await asyncio.wait_for(gated.started.wait(), 5)
    server.stub = RevisedTriton("3", value=0.5)
    second = asyncio.create_task(servicer.Embed(pb.EmbedRequest(texts=["tides", "waves"]), FakeContext(None)))
    gated.release.set()
    await asyncio.wait_for(first, 5)
    assert_one_revisions_vectors(await asyncio.wait_for(second, 5), 2)


class EverNewerTriton(RevisedTriton):
    """A server whose revision is another at every ModelInfer: 2, 3, 4, ..."""

    def __init__(self) -> None:
        super().__init__("2")

    async def ModelInfer(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        self.revision = str(2 + self.calls)
        return await super().ModelInfer(request)


async def test_an_embed_whose_texts_no_two_calls_embed_alike_is_refused_after_bounded_rounds(one_server):
    """Embedding again is bounded: revisions that never agree cost the
    caller a retryable refusal, not an endless loop of Triton calls."""
    servicer, server = one_server
    server.stub = EverNewerTriton()
    await servicer.Embed(pb.EmbedRequest(texts=["tides"]), FakeContext(None))
    with pytest.raises(MeshgateError) as refused:
        await asyncio.wait_for(
            servicer.Embed(pb.EmbedRequest(texts=["tides", "waves"]), FakeContext(None)), 5
        )
    refusal = refused.value
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.EMBEDDER_CHANGED)
    # "tides" by 2, "waves" by 3; "tides" again by 4, then 5, "waves"' 3 chosen each round.
    assert refusal.metadata["revisions"] == "3,5"
    assert server.stub.calls == 2 + EMBED_AGAIN_ROUNDS


async def test_servers_of_two_revisions_side_by_side_keep_each_revisions_vectors():
    """During an upgrade, servers of two revisions answer in turn. The
    service forgot every vector each time the answer's revision differed
    from the last one's, and logged each change: with the two alternating,
    the memo stayed near empty and the log had a warning per switch. Each
    revision's vectors now stay, answered under its name while that
    revision serves, whichever server is asked."""
    settings = InferenceSettings(triton_urls=["127.0.0.1:1", "127.0.0.1:2"])
    pool = BackendPool(settings.triton_urls, [settings.embedding_triton_model])
    old, new = pool.backends
    old.stub, new.stub = RevisedTriton("2"), RevisedTriton("3", value=0.5)
    servicer = InferenceServicer(settings, pool)

    async def embedded_by(server, texts: list[str]) -> pb.EmbedResponse:
        # The balancer's choice, made for the test: only ``server`` has the model ready.
        for each in pool.backends:
            each.ready_models = {settings.embedding_triton_model} if each is server else set()
        return await servicer.Embed(pb.EmbedRequest(texts=texts), FakeContext(None))

    try:
        with structlog.testing.capture_logs() as logs:
            await embedded_by(old, ["tides"])
            for switch in range(4):
                await embedded_by(old, [f"old {switch}"])
                for server in (old, new):
                    answer = await embedded_by(server, ["tides"])
                    assert answer.model_revision == "2"
                    np.testing.assert_array_equal(
                        np.frombuffer(answer.vectors, "<f4"), np.full(DIMENSIONS, 1.0)
                    )
                await embedded_by(new, [f"new {switch}"])
                answer = await embedded_by(new, ["tides"])
                assert answer.model_revision == "2"
    finally:
        await pool.close()
    # "tides" once, by revision 2, which went on serving; the rest are the other texts.
    assert (old.stub.calls, new.stub.calls) == (1 + 4, 0 + 4)
    changes = [entry for entry in logs if entry["event"] == "embedding model revision changed"]
    # Once each way: 2 to 3, 3 to 2; the other switches within the interval are not logged.
    assert [(entry["previous"], entry["revision"]) for entry in changes] == [("2", "3"), ("3", "2")]


class AlternatingTriton(RevisedTriton):
    """Servers of revisions 2 and 3 side by side, as the balancer's turns
    reach them: each ModelInfer is answered by the other revision."""

    def __init__(self) -> None:
        super().__init__("2")

    async def ModelInfer(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        self.revision, self.value = ("3", 0.5) if self.calls % 2 else ("2", 1.0)
        return await super().ModelInfer(request)


@pytest.fixture
async def server_on_a_clock():
    """As one_server, on a clock the test moves."""
    clock = Clock()
    async with servicer_over_one_server(clock=clock) as (servicer, backend):
        yield servicer, backend, clock


async def test_repeats_under_two_revisions_side_by_side_are_not_sent_to_triton_again(server_on_a_clock):
    """Remembered vectors were answered only for the revision Triton answered
    last, so with two alternating about half the repeats went to Triton
    again (a simulation of 4,000 Embeds, half of them repeats: 973 of
    2,003). Both answer well within the window here: no repeat is sent."""
    servicer, server, clock = server_on_a_clock
    triton = server.stub = AlternatingTriton()
    repeats_sent = 0
    for i in range(100):
        clock.now += 1
        await servicer.Embed(pb.EmbedRequest(texts=[f"question {i}"]), FakeContext(None))
        calls = triton.calls
        answer = await servicer.Embed(pb.EmbedRequest(texts=[f"question {i // 2}"]), FakeContext(None))
        repeats_sent += triton.calls - calls
        value = {"2": 1.0, "3": 0.5}[answer.model_revision]
        np.testing.assert_array_equal(np.frombuffer(answer.vectors, "<f4"), np.full(DIMENSIONS, value))
    assert repeats_sent == 0
    assert triton.calls == 100


async def test_an_old_revision_silent_for_the_window_is_answered_no_more(server_on_a_clock):
    # An upgrade: revision 3 answers from now on. Revision 2's vector is
    # answered while 2 may still be serving beside it, not once it has
    # answered nothing for the window (callers store by a vector's revision).
    servicer, server, clock = server_on_a_clock
    server.stub = RevisedTriton("2")
    await servicer.Embed(pb.EmbedRequest(texts=["tides"]), FakeContext(None))
    server.stub = RevisedTriton("3", value=0.5)
    clock.now += 1
    await servicer.Embed(pb.EmbedRequest(texts=["waves"]), FakeContext(None))
    clock.now += REVISION_SILENCE_S - 1
    answer = await servicer.Embed(pb.EmbedRequest(texts=["tides"]), FakeContext(None))
    assert answer.model_revision == "2"
    clock.now += 0.001
    answer = await servicer.Embed(pb.EmbedRequest(texts=["tides"]), FakeContext(None))
    assert answer.model_revision == "3"
    np.testing.assert_array_equal(np.frombuffer(answer.vectors, "<f4"), np.full(DIMENSIONS, 0.5))
    assert server.stub.calls == 2


async def test_multi_text_embeds_under_two_revisions_side_by_side_are_answered_by_one_revision(
    server_on_a_clock,
):
    """An Embed whose texts two revisions made (a remembered text and a
    fetched one, or its two ModelInfers of 64 texts and more) was refused
    EMBEDDER_CHANGED for the caller to try again, whole: over servers of
    revisions 2 and 3 side by side, 860-889 of 2,000 Embeds of 2 to 70
    texts (a simulation, three seeds). The texts of the revision that made
    fewer are embedded again: none is refused, and each answer is one
    revision's vectors."""
    servicer, server, clock = server_on_a_clock
    server.stub = AlternatingTriton()
    for i in range(40):
        clock.now += 1
        # A text asked before (remembered by either revision) and a new one.
        answer = await servicer.Embed(
            pb.EmbedRequest(texts=[f"question {i // 2}", f"new {i}"]), FakeContext(None)
        )
        assert_one_revisions_vectors(answer, 2)
    texts = [f"long {i}" for i in range(EMBED_BATCH + 6)]  # two ModelInfers, of the two revisions
    calls = server.stub.calls
    assert_one_revisions_vectors(
        await servicer.Embed(pb.EmbedRequest(texts=texts), FakeContext(None)), len(texts)
    )
    # The 6 of the second call embedded again, with the 64 of the first.
    assert server.stub.calls == calls + 3


async def test_texts_of_the_fewer_revision_are_embedded_again_on_a_server_of_the_other(pool_of_two):
    """Texts embedded again go to a server that last answered the revision
    chosen: where the balancer chose, here the idle server of revision 2
    (the other is busy), they were answered by revision 2 again, each round."""
    settings, pool = pool_of_two
    old, new = pool.backends
    old.stub, new.stub = RevisedTriton("2"), RevisedTriton("3", value=0.5)
    servicer = InferenceServicer(settings, pool)
    remembered = [f"remembered {i}" for i in range(60)]
    old.ready_models = set()
    assert (await servicer.Embed(pb.EmbedRequest(texts=remembered), FakeContext(None))).model_revision == "3"
    old.ready_models = {settings.embedding_triton_model}
    new.in_flight = 5  # busier: the balancer's choice is the server of revision 2
    texts = remembered + [f"new {i}" for i in range(10)]
    answer = await servicer.Embed(pb.EmbedRequest(texts=texts), FakeContext(None))
    assert answer.model_revision == "3"
    assert_one_revisions_vectors(answer, len(texts))
    assert (old.stub.calls, new.stub.calls) == (1, 2)
