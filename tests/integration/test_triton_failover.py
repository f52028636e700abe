"""A Triton server lost with a second one configured: killed with SIGKILL
under load, or stopped with SIGSTOP (it then keeps its connections up and
answers nothing). Streams it was answering end UNAVAILABLE saying how much
they delivered, and no request that had not started is lost."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest
import structlog.testing
from tritonclient.grpc import service_pb2, service_pb2_grpc

from meshgate import balancing, mesh_auth
from meshgate.common.v1 import common_pb2
from meshgate.config import Settings
from meshgate.errors import error_info
from meshgate.inference.v1 import inference_service_pb2 as pb
from meshgate.inference.v1 import inference_service_pb2_grpc
from services.inference import servicer
from services.inference.backends import PROBE_TIMEOUT_S, PROBES_TO_MARK_DOWN
from tests.integration.conftest import launched_triton, launched_tritons, running_inference
from tests.mesh import mesh_settings, router_channel

# The tests that kill or stop a Triton under streams are marked serial (make
# test runs them alone); the unloads' tests assert outcomes only.
pytestmark = pytest.mark.integration

MODELS = ("tiny_gpt", "minilm")
IN_FLIGHT = 8
NOT_YET_STARTED = 8


@pytest.fixture
def two_tritons(tmp_path):
    """Two servers; yields their gRPC URLs and processes."""
    with launched_tritons(tmp_path, MODELS, 2) as servers:
        yield [url for url, _, _ in servers], [process for _, _, process in servers]


@pytest.fixture
def triton_beside_the_sessions(tmp_path_factory, triton_url):
    """A server of this test's own, then the session's (left as it is);
    yields their gRPC URLs."""
    with launched_triton(tmp_path_factory, MODELS) as (url, _):
        yield [url, triton_url]


# A tenant's generations, as the router sends them: one naming no tenant is
# background work, which holds at most a quarter of a model's slots.
TENANT = "acme"


def generate_request(text: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=max_tokens, temperature=0.0),
        tenant_id=TENANT,
    )


# The router's word for TENANT (mesh_auth.OptionalTenant), minted per call as
# the router does: a token lives mesh.tenant_token_ttl_s (30 s), and one made
# at import had expired by the time the whole suite reached these tests.
_TENANT_TOKENS = mesh_auth.Mesh(mesh_settings(), "router").tenant_tokens()


async def in_flight(stub) -> dict[str, int]:
    """Each Triton server's calls in flight, as the inference service counts them."""
    health = await stub.GetBackendHealth(pb.GetBackendHealthRequest(), timeout=5)
    return {b.address: b.in_flight for b in health.backends}


async def streaming(stub, count: int, max_tokens: int = 400) -> list[asyncio.Task]:
    """``count`` long generations ("story <n>", ``max_tokens`` each), once
    each has sent its first delta; each task ends as :func:`generate`."""
    all_started = asyncio.Event()
    started = 0

    def count_start():
        nonlocal started
        started += 1
        if started == count:
            all_started.set()

    streams = [
        asyncio.create_task(generate(stub, f"story {n}", max_tokens, count_start)) for n in range(count)
    ]
    await asyncio.wait_for(all_started.wait(), 60)
    return streams


async def generate(stub, text: str, max_tokens: int, on_first_delta=None):
    """One Generate to its end: (text delivered, completion or None, error or None)."""
    delivered, completion = "", None
    try:
        request = generate_request(text, max_tokens)
        token = _TENANT_TOKENS.metadata(TENANT, "inference")
        async for response in stub.Generate(request, metadata=token, timeout=60):
            if response.HasField("delta"):
                if not delivered and on_first_delta:
                    on_first_delta()
                delivered += response.delta.text
            else:
                completion = response.completion
    except grpc.aio.AioRpcError as error:
        return delivered, completion, error
    return delivered, completion, None


@pytest.mark.serial  # kills a Triton under streams: make test runs it alone
async def test_killed_triton_ends_its_streams_with_counts_and_loses_no_new_request(two_tritons) -> None:
    urls, processes = two_tritons
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = urls
    settings.inference.health_interval_s = 0.5
    # Both backends in rotation before the load starts.
    async with running_inference(settings) as address, router_channel(address, "inference") as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        # Long answers, so every stream is still running at the kill.
        streams = await streaming(stub, IN_FLIGHT)
        killed = processes[0]
        killed.send_signal(signal.SIGKILL)
        # Sent right after the kill, before the health probes notice it:
        # those given to the dead server must go to the other one.
        fresh = await asyncio.gather(*(generate(stub, f"story {100 + n}", 4) for n in range(NOT_YET_STARTED)))
        finished = await asyncio.gather(*streams)
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


@pytest.mark.serial  # timing-sensitive (bounds how soon its calls end): make test runs it alone
async def test_a_stopped_triton_ends_its_calls_once_the_probes_take_it_out(two_tritons) -> None:
    """Without the probes ending them, these calls would wait for the
    channel's keepalive (5 minutes toward Triton) or their deadline."""
    urls, processes = two_tritons
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = urls
    settings.inference.health_interval_s = 0.5
    # Fresh calls sent together then split between the two servers, so some
    # land on the stopped one before the probes take it out.
    settings.inference.models["tiny-gpt"].routing_strategy = "least_outstanding"
    # When the probes take a stopped server out (each probe of it times out),
    # and room for a loaded machine: far under the keepalive's 5 minutes.
    bound_s = PROBES_TO_MARK_DOWN * (PROBE_TIMEOUT_S + settings.inference.health_interval_s) + 10
    loop = asyncio.get_running_loop()
    async with running_inference(settings) as address, router_channel(address, "inference") as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)

        answering = asyncio.Event()
        long_stream = asyncio.create_task(generate(stub, "a long story", 400, answering.set))
        await asyncio.wait_for(answering.wait(), 60)
        (stopped_url,) = [url for url, calls in (await in_flight(stub)).items() if calls]
        (live_url,) = [url for url in urls if url != stopped_url]
        stopped = processes[urls.index(stopped_url)]
        try:
            os.kill(stopped.pid, signal.SIGSTOP)
            stopped_at = loop.time()
            fresh = [asyncio.create_task(generate(stub, f"question {n}", 8)) for n in range(3)]
            # One of them waits on the stopped server, with no response yet.
            async with asyncio.timeout(5):
                while (await in_flight(stub))[stopped_url] < 2:
                    await asyncio.sleep(0.05)

            text, completion, error = await long_stream
            ended_after_s = loop.time() - stopped_at
            answers = await asyncio.gather(*fresh)
            after = await generate(stub, "one more question", 8)
            left_open = (await in_flight(stub))[stopped_url]
        finally:
            os.kill(stopped.pid, signal.SIGCONT)

    print(f"the stopped server's stream ended after {ended_after_s:.1f} s (bound {bound_s:.1f} s)")
    assert error is not None and completion is None, "the stopped server finished its stream"
    assert ended_after_s < bound_s
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    info = error_info(error)
    assert info is not None, error
    assert int(info.metadata["delivered_chars"]) == len(text) > 0
    for answer_text, answer, failure in [*answers, after]:
        assert failure is None, failure
        assert answer.backend == live_url and answer_text
    assert left_open == 0


async def test_an_embedding_model_unloaded_on_one_server_is_embedded_on_the_other(
    triton_beside_the_sessions,
) -> None:
    """Triton answers a unary call for a model it unloaded NOT_FOUND: before
    the probes take the model out of rotation there, such a call must go to
    the server that still has it, not fail its caller as NOT_FOUND."""
    urls = triton_beside_the_sessions
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = urls
    # No probe round between the unload and the calls: the balancer still
    # believes both servers have the model.
    settings.inference.health_interval_s = 60
    async with running_inference(settings) as address, router_channel(address, "inference") as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        async with grpc.aio.insecure_channel(urls[0]) as triton_channel:
            triton = service_pb2_grpc.GRPCInferenceServiceStub(triton_channel)
            await triton.RepositoryModelUnload(service_pb2.RepositoryModelUnloadRequest(model_name="minilm"))
        # One at a time, texts never embedded before (no memo, no sharing):
        # least-outstanding balancing sends some to the unloaded server.
        for n in range(6):
            answer = await stub.Embed(pb.EmbedRequest(texts=[f"unloaded on one server {n}"]), timeout=10)
            assert answer.dimensions > 0


async def successful_embeddings(url: str) -> int:
    """The embeddings Triton at ``url`` answered, by its own statistics."""
    async with grpc.aio.insecure_channel(url) as channel:
        triton = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answer = await triton.ModelStatistics(service_pb2.ModelStatisticsRequest(name="minilm"), timeout=5)
    return answer.model_stats[0].inference_stats.success.count


async def test_a_generation_model_unloaded_on_one_server_leaves_its_embeddings_there(
    triton_beside_the_sessions,
) -> None:
    """Triton refuses a generation of a model it unloaded (a rolling model
    update, with explicit model control) as an unknown model; until the
    probes take the model out of rotation there, its generations go to the
    other server. The server itself is fine: its embedding model must keep
    its share of the embeddings, not leave rotation with a breaker that
    the refusals opened."""
    urls = triton_beside_the_sessions
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = urls
    # No probe round between the unload and the calls: the balancer still
    # believes both servers have the generation model.
    settings.inference.health_interval_s = 60
    # Ties rotate: every other generation goes to the unloaded server first.
    settings.inference.models["tiny-gpt"].routing_strategy = "least_outstanding"
    async with running_inference(settings) as address, router_channel(address, "inference") as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        async with grpc.aio.insecure_channel(urls[0]) as triton_channel:
            triton = service_pb2_grpc.GRPCInferenceServiceStub(triton_channel)
            unload = service_pb2.RepositoryModelUnloadRequest(model_name="tiny_gpt")
            await triton.RepositoryModelUnload(unload)
        # More refusals than balancing.BreakerPolicy.failures_to_open.
        for n in range(8):
            _, completion, error = await generate(stub, f"question {n}", 2)
            assert error is None, error
            assert completion.backend == urls[1]
        before = await successful_embeddings(urls[0])
        # Texts never embedded before (no memo, no sharing), one at a time.
        for n in range(6):
            await stub.Embed(pb.EmbedRequest(texts=[f"after the unload {n}"]), timeout=10)
        embedded_there = await successful_embeddings(urls[0]) - before

    assert embedded_there > 0, "the server whose generation model was unloaded got no embedding"


async def model_ready_at(stub, url: str, model: str) -> bool:
    """Whether the inference service has ``model`` in rotation at ``url``."""
    health = await stub.GetBackendHealth(pb.GetBackendHealthRequest(), timeout=5)
    (backend,) = [b for b in health.backends if b.address == url]
    return any(m.name == model and m.ready for m in backend.models)


async def seconds_until(condition, limit_s: float = 60) -> float:
    """How long until ``condition()`` (a coroutine function) holds, polled."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(limit_s):
        while not await condition():
            await asyncio.sleep(0.05)
    return loop.time() - started


@pytest.mark.serial  # timing-sensitive (bounds how soon probes see a change): make test runs it alone
async def test_a_stopped_triton_does_not_delay_the_probes_of_the_other(two_tritons) -> None:
    """Each server is probed on its own schedule: while one answers nothing
    (stopped, so every probe of it waits PROBE_TIMEOUT_S), a model unloaded
    and loaded again on the other leaves and rejoins rotation there as
    soon as that server's own probes say so, not a stalled round later."""
    urls, processes = two_tritons
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = urls
    interval_s = settings.inference.health_interval_s = 0.2
    healthy, stopped = urls[0], processes[1]
    async with running_inference(settings) as address, router_channel(address, "inference") as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        async with grpc.aio.insecure_channel(healthy) as triton_channel:
            triton = service_pb2_grpc.GRPCInferenceServiceStub(triton_channel)
            os.kill(stopped.pid, signal.SIGSTOP)
            try:
                # The stopped server's probes are under way and waiting.
                await asyncio.sleep(interval_s)
                unload = service_pb2.RepositoryModelUnloadRequest(model_name="minilm")
                await triton.RepositoryModelUnload(unload)

                async def out() -> bool:
                    return not await model_ready_at(stub, healthy, "minilm")

                left_s = await seconds_until(out)
                await triton.RepositoryModelLoad(service_pb2.RepositoryModelLoadRequest(model_name="minilm"))

                async def back() -> bool:
                    return await model_ready_at(stub, healthy, "minilm")

                back_s = await seconds_until(back)
            finally:
                os.kill(stopped.pid, signal.SIGCONT)

    print(f"out of rotation {left_s:.2f} s after the unload, back {back_s:.2f} s after the load")
    # PROBES_TO_MARK_DOWN rounds of the healthy server alone: each takes
    # milliseconds plus the interval. Rounds that waited for the stopped
    # server took PROBE_TIMEOUT_S each: 3 x 2.2 s.
    assert left_s < PROBES_TO_MARK_DOWN * interval_s + PROBE_TIMEOUT_S
    assert back_s < PROBE_TIMEOUT_S


@pytest.mark.serial  # stops a Triton under streams: make test runs it alone
async def test_a_stopped_triton_takes_requests_again_once_its_probes_answer(two_tritons) -> None:
    """The calls the probes end on a server that stopped answering are
    theirs to end (the probes hold it out of rotation), not failures of the
    server's: counted, four of them opened its breaker for 10 s from then,
    and a server that answered again 1 s later read ready but was sent no
    request for 9.2 s (its share of the model's slots went with it)."""
    urls, processes = two_tritons
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = urls
    settings.inference.health_interval_s = 0.5
    # Concurrent calls split between the servers: the stopped one holds
    # several streams when the probes take it out.
    settings.inference.models["tiny-gpt"].routing_strategy = "least_outstanding"
    stopped_url, stopped = urls[0], processes[0]
    bound_s = PROBES_TO_MARK_DOWN * (PROBE_TIMEOUT_S + settings.inference.health_interval_s) + 10
    async with running_inference(settings) as address, router_channel(address, "inference") as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        streams = await streaming(stub, IN_FLIGHT)
        assert (await in_flight(stub))[stopped_url] >= balancing.BreakerPolicy.failures_to_open
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            finished = await asyncio.wait_for(asyncio.gather(*streams), bound_s)
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        await seconds_until(lambda: model_ready_at(stub, stopped_url, "tiny_gpt"), limit_s=10)
        # Both servers idle and ready: least outstanding splits these.
        answers = await asyncio.gather(*(generate(stub, f"question {n}", 4) for n in range(4)))

    ended = [error for _, _, error in finished if error is not None]
    assert len(ended) >= balancing.BreakerPolicy.failures_to_open, "the probes ended too few calls"
    assert all(error.code() == grpc.StatusCode.UNAVAILABLE for error in ended)
    assert all(error is None for _, _, error in answers), answers
    backends = [completion.backend for _, completion, _ in answers]
    assert stopped_url in backends, f"the server that answers again got none of {backends}"


async def test_a_prefix_is_not_believed_held_by_the_server_that_refused_it(two_tritons, monkeypatch) -> None:
    """A prefix strategy learns which server holds a prompt's blocks from
    where its requests ran. A server that refused one (gone, before the
    probes take it out) computed nothing: believed to hold the prefix, it
    drew that prefix's next requests, each refused there first, while the
    server that answered holds it. (A refusal as not loaded, an unload's,
    takes the model out of that server's rotation at once instead.)"""
    urls, processes = two_tritons
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = urls
    # No probe round between the kill and the calls.
    settings.inference.health_interval_s = 60
    settings.inference.models["tiny-gpt"].routing_strategy = "prefix_affinity"
    # Every refusal logged, none folded into a later line's count: the
    # lines count the requests refused first.
    monkeypatch.setattr(servicer, "_UNAVAILABLE_WARNING_INTERVAL_S", 0.0)
    prefix = "policy: " + " ".join(f"rule {n} applies" for n in range(50))
    async with running_inference(settings) as address, router_channel(address, "inference") as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        # A long generation in flight on one server: between equal overlaps
        # the least outstanding goes first, the other one, which refuses.
        answering_now = asyncio.Event()
        long_stream = asyncio.create_task(generate(stub, "a long story", 400, answering_now.set))
        await asyncio.wait_for(answering_now.wait(), 60)
        (answering,) = [url for url, calls in (await in_flight(stub)).items() if calls]
        (refusing,) = [url for url in urls if url != answering]
        processes[urls.index(refusing)].kill()
        # Only the first request's choice rests on the long generation (the
        # others have the prefix's overlap to go by): checking it before each
        # failed the test when a loaded host finished the long one early.
        assert (await in_flight(stub))[answering] == 1, "the long generation ended too soon"
        with structlog.testing.capture_logs() as logs:
            for n in range(4):
                _, completion, error = await generate(stub, f"{prefix} question {n}?", 2)
                assert error is None, error
                assert completion.backend == answering
        await long_stream

    refused = [e for e in logs if e["event"] == "triton unavailable, trying another"]
    assert all(e["backend"] == refusing for e in refused)
    # The first, with no overlap anywhere, goes to the refusing server (the
    # least outstanding); the others go where the prefix was computed.
    assert len(refused) == 1, f"{len(refused)} of 4 requests sharing a prefix were refused first"


async def exiting(url: str) -> bool:
    """Whether the Triton at ``url`` has begun its drain (SIGTERM): it then
    answers its liveness check UNAVAILABLE "Server exiting"."""
    async with grpc.aio.insecure_channel(url) as channel:
        triton = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            await triton.ServerLive(service_pb2.ServerLiveRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            return error.details() == "Server exiting"
    return False


async def test_a_draining_triton_leaves_rotation_at_its_first_refusal(two_tritons, monkeypatch) -> None:
    """Triton draining on SIGTERM unloads its models at once and refuses each
    new request as not loaded ("has no available versions") while it
    finishes those it runs. The model stayed in that server's rotation until
    the probes read it not ready three times (~6 s at the default interval):
    ties rotating, every other request went there first and was refused
    (66 refusals in a drain of 5.6 s here, at the default interval)."""
    urls, processes = two_tritons
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = urls
    # No probe round during the drain: only the refusal can take it out.
    settings.inference.health_interval_s = 60
    # One long stream on each server: the fresh requests' ties rotate.
    settings.inference.models["tiny-gpt"].routing_strategy = "least_outstanding"
    # Every refusal logged, none folded into a later line's count.
    monkeypatch.setattr(servicer, "_UNAVAILABLE_WARNING_INTERVAL_S", 0.0)
    draining_url, draining = urls[0], processes[0]
    async with running_inference(settings) as address, router_channel(address, "inference") as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        # Long answers: the drain lasts until the draining server's ends.
        long_streams = await streaming(stub, 2)
        assert all(calls == 1 for calls in (await in_flight(stub)).values())
        draining.send_signal(signal.SIGTERM)
        await seconds_until(lambda: exiting(draining_url), limit_s=10)
        with structlog.testing.capture_logs() as logs:
            answers = [await generate(stub, f"question {n}", 2) for n in range(6)]
        health = await stub.GetBackendHealth(pb.GetBackendHealthRequest(), timeout=5)
        finished = await asyncio.gather(*long_streams)

    assert all(error is None for _, _, error in answers), answers
    assert all(completion.backend == urls[1] for _, completion, _ in answers)
    refused = [e for e in logs if e["event"] == "triton unavailable, trying another"]
    assert [e["backend"] for e in refused] == [draining_url], f"{len(refused)} of 6 requests refused first"
    (drained,) = [b for b in health.backends if b.address == draining_url]
    (tiny_gpt,) = [m for m in drained.models if m.name == "tiny_gpt"]
    assert not tiny_gpt.ready and "not loaded" in tiny_gpt.not_ready_reason
    # Its own calls are left to run: Triton finishes them as it drains.
    assert all(error is None for _, _, error in finished), finished


async def test_a_draining_triton_finishes_its_streams_and_its_callers_are_told_it_drains(tmp_path) -> None:
    """Triton draining answers its liveness probes UNAVAILABLE "Server
    exiting". Read as no answer, three such rounds ended the calls it was
    finishing (its streams failed UNAVAILABLE midway), and a caller with no
    other server was told only that no server had the model ready."""
    with launched_tritons(tmp_path, MODELS, 1) as ((url, _, draining),):
        settings = Settings(mesh=mesh_settings())
        settings.inference.triton_urls = [url]
        settings.inference.health_interval_s = 0.2
        async with running_inference(settings) as address, router_channel(address, "inference") as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            # Six of tiny_gpt's longest answers batched together: one alone
            # (400 tokens, ~1.3 s on an idle host) once ended before the
            # probes' rounds below, and the test failed with nothing wrong.
            long_streams = await streaming(stub, 6, max_tokens=500)
            draining.send_signal(signal.SIGTERM)
            await seconds_until(lambda: exiting(url), limit_s=10)
            # More rounds than PROBES_TO_MARK_DOWN while it drains.
            await asyncio.sleep((PROBES_TO_MARK_DOWN + 2) * settings.inference.health_interval_s)
            # Still running (or ended by the probes: what they ended with shows).
            assert not any(stream.done() for stream in long_streams), [
                stream.result() for stream in long_streams if stream.done()
            ]
            _, _, refused = await generate(stub, "a question while it drains", 2)
            ended = [await stream for stream in long_streams]

    for text, completion, error in ended:
        assert error is None and completion is not None and text, error
    assert refused is not None and error_info(refused).reason == "NO_READY_BACKEND"
    assert "draining" in refused.details(), refused.details()
