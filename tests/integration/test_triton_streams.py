"""The inference service's pooled Triton streams (services/inference/backends.py,
TritonStreams) on a real tritonserver: generations one after another ride one
ModelStreamInfer call and answer as a call each did; a cancelled or refused
generation takes its stream with it, and the next one works; a stream left
idle under a Triton that restarted does not fail the next generation.

The restart covers the path where the idle call has already ended (done())
when the next generation looks: take() skips it. A call that dies between
take() and its request (the write fails, UNAVAILABLE, a clean end or a
server's CANCELLED before any response) is retried on a fresh stream: the
ScriptedCall unit tests cover that (tests/unit/test_inference_stream.py,
test_inference_open_calls.py), a restart cannot time it. An idle call
outliving the keepalive under Triton's default ping policy is
tests/integration/test_keepalive.py's (scaled down)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2

from meshgate import metrics
from meshgate.common.v1 import common_pb2
from meshgate.config import ServedModelSettings, Settings
from meshgate.errors import error_info
from meshgate.inference.v1 import inference_service_pb2 as pb
from meshgate.inference.v1 import inference_service_pb2_grpc
from meshgate.local import triton
from meshgate.local.stack import build_model_weights, free_port
from services.inference import app
from services.inference.backends import BackendPool
from tests.integration.conftest import (
    end_triton,
    running_inference,
    triton_cancellations,
    until_triton_cancels,
)
from tests.mesh import mesh_settings, router_channel
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

MODELS = ("tiny_gpt",)


@pytest.fixture
def pools(monkeypatch) -> list[BackendPool]:
    """Every BackendPool the inference services of a test make, in order:
    how many streams each opened."""
    made: list[BackendPool] = []

    def recording(*args, **kwargs) -> BackendPool:
        made.append(BackendPool(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(app, "BackendPool", recording)
    return made


def settings_for(triton_url: str, idle_streams: int = 32, health_interval_s: float = 0.5) -> Settings:
    """One Triton; tiny_gpt also served under a window larger than its own
    (512), for requests that pass this service's checks and the model refuses."""
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = [triton_url]
    settings.inference.health_interval_s = health_interval_s
    settings.inference.triton_idle_streams = idle_streams
    settings.inference.models = {
        "tiny-gpt": ServedModelSettings(),
        "tiny-gpt-misconfigured": ServedModelSettings(triton_model="tiny_gpt", context_window_tokens=4096),
    }
    return settings


@contextlib.asynccontextmanager
async def serving(settings: Settings):
    async with running_inference(settings) as address, router_channel(address, "inference") as channel:
        yield inference_service_pb2_grpc.InferenceServiceStub(channel)


def generate(text: str, model: str = "tiny-gpt", max_tokens: int = 16) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=model,
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=max_tokens, temperature=0.0),
    )


async def text_of(stub, text: str) -> str:
    deltas, completion = [], None
    async for response in stub.Generate(generate(text), timeout=60):
        if response.HasField("delta"):
            deltas.append(response.delta.text)
        else:
            completion = response.completion
    assert completion is not None and completion.usage.completion_tokens > 0
    return "".join(deltas)


def streams_opened_exported(pool: BackendPool) -> float | None:
    """meshgate_inference_triton_streams_opened_total of the pool's backend,
    as the inference service's metrics endpoint serves it."""
    registry = CollectorRegistry()
    registry.register(metrics.BackendCollector(pool))
    (backend,) = pool.backends
    return registry.get_sample_value(
        "meshgate_inference_triton_streams_opened_total", {"backend": backend.address}
    )


def streams_of(pool: BackendPool):
    (backend,) = pool.backends
    return backend.streams


async def test_generations_one_after_another_share_one_stream_and_answer_as_a_call_each(triton_url, pools):
    prompts = ["Hello there", "Tell me a story", "Hello there"]
    async with serving(settings_for(triton_url, idle_streams=0)) as per_call:
        expected = [await text_of(per_call, prompt) for prompt in prompts]
        assert streams_of(pools[0]).opened == len(prompts)
    async with serving(settings_for(triton_url)) as pooled:
        got = [await text_of(pooled, prompt) for prompt in prompts]
        streams = streams_of(pools[1])
        assert streams.opened == 1
        assert len(streams) == 1
        assert streams_opened_exported(pools[1]) == 1.0
        health = await pooled.GetBackendHealth(pb.GetBackendHealthRequest())
        assert health.backends[0].in_flight == 0, "an idle stream is no work in flight"
    assert got == expected
    assert len(streams) == 0, "closed with the service"


async def test_a_cancelled_generation_cancels_its_triton_request_and_the_next_one_works(triton_server, pools):
    triton_url, log_path = triton_server
    async with serving(settings_for(triton_url)) as stub:
        await text_of(stub, "Hello there")
        before = triton_cancellations(log_path)
        call = stub.Generate(generate("Write a long essay", max_tokens=400))
        async for response in call:
            assert response.HasField("delta")
            break
        call.cancel()
        await until_triton_cancels(log_path, before, timeout_s=10)
        assert await text_of(stub, "Hello there")
        # The first stream carried the cancelled request and went with it.
        assert streams_of(pools[0]).opened == 2


async def test_a_model_error_ends_only_its_request_and_the_next_one_works(triton_url, pools):
    async with serving(settings_for(triton_url)) as stub:
        first = await text_of(stub, "Hello there")
        # 600 passes this service's check (window 4096) but not tiny_gpt's [1, 511].
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Generate(generate("Hello", "tiny-gpt-misconfigured", 600), timeout=60):
                pass
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(refused.value).reason == "INVALID_GENERATION_REQUEST"
        assert "max_tokens must be in [1, 511], got 600" in refused.value.details()
        assert await text_of(stub, "Hello there") == first
        assert streams_of(pools[0]).opened == 2, "a stream whose request was refused is not reused"


async def test_refused_requests_beside_concurrent_generations_leave_triton_running(triton_url, pools):
    """In its triton_grpc_error mode tritonserver crashed (SIGSEGV) within a
    few hundred refused requests beside concurrent streams, most often when
    the refusal followed an answer on the same call (pooled streams):
    bench/triton_refusal_probe.py. Refusals now come as error_message
    responses, read by their wording (triton_protocol.stream_error_code)."""
    async with serving(settings_for(triton_url)) as stub:
        first = await text_of(stub, "Hello there")
        stop = asyncio.Event()
        answered = 0

        async def answering() -> None:
            nonlocal answered
            while not stop.is_set():
                assert await text_of(stub, "Hello there") == first
                answered += 1

        workers = [asyncio.ensure_future(answering()) for _ in range(4)]
        try:
            for _ in range(300):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async for _ in stub.Generate(
                        generate("Hello", "tiny-gpt-misconfigured", 600), timeout=60
                    ):
                        pass
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
                assert error_info(refused.value).reason == "INVALID_GENERATION_REQUEST"
        finally:
            stop.set()
            await asyncio.gather(*workers)
        assert answered >= 4
        assert await text_of(stub, "Hello there") == first


async def test_a_stream_closed_after_its_answer_neither_holds_up_nor_fails_the_generation(triton_url, pools):
    # With no room in the pool, a stream is half-closed after its request's
    # final response and read to its end. Awaited before the generation
    # ended, Triton's connection stalling there held the whole answer's
    # status to its deadline (DEADLINE_EXCEEDED), and dropping there ended
    # it UNAVAILABLE.
    proxy = TcpProxy(int(triton_url.rsplit(":", 1)[1]))
    proxy_url = f"127.0.0.1:{await proxy.start()}"
    try:
        async with serving(settings_for(proxy_url, idle_streams=0)) as stub:
            proxy.stall_at_half_close()

            async def drop_once_stalled() -> None:
                async with asyncio.timeout(30):
                    while not proxy.stalled:
                        await asyncio.sleep(0.01)
                await proxy.close()

            dropping = asyncio.create_task(drop_once_stalled())
            call = stub.Generate(generate("Hello there"), timeout=30)
            responses = [response async for response in call]
            assert await call.code() == grpc.StatusCode.OK
            assert responses[-1].HasField("completion")
            await dropping
    finally:
        await proxy.close()


async def test_a_triton_restarted_under_an_idle_stream_does_not_fail_the_next_generation(tmp_path, pools):
    build_model_weights()
    port = free_port()
    url = f"127.0.0.1:{port}"

    def launch(name: str):
        process = triton.launch(
            grpc_port=port, state_dir=tmp_path / name, log_file=tmp_path / f"{name}.log", models=MODELS
        )
        triton.wait_ready(url, MODELS, timeout=120, process=process)
        return process

    process = launch("first")
    try:
        # Probes far apart: the restart goes unnoticed by them, so the
        # next generation finds the stream the first one left idle.
        async with serving(settings_for(url, health_interval_s=600)) as stub:
            first = await text_of(stub, "Hello there")
            assert len(streams_of(pools[0])) == 1
            # Off the event loop: the service must see its stream end meanwhile.
            # Triton waits out its exit timeout (10 s) for the open stream;
            # how it goes is not what this tests, so it is killed after 1 s.
            await asyncio.to_thread(triton.terminate, process, 1.0)
            process = await asyncio.to_thread(launch, "second")
            # The service's channel reconnects on its own backoff (up to 1 s:
            # serving.RECONNECT_OPTIONS); a call before that fails UNAVAILABLE
            # whatever the pool did (a call each did too). Wait for it on the
            # streams' channel, without touching the idle stream.
            (backend,) = pools[0].backends
            await backend.stream_stub.ServerLive(
                service_pb2.ServerLiveRequest(), wait_for_ready=True, timeout=30
            )
            assert len(streams_of(pools[0])) == 1, "the dead stream is still idle in the pool"
            assert await text_of(stub, "Hello there") == first
            assert streams_of(pools[0]).opened == 2, "the dead stream was left for a new one"
    finally:
        end_triton(process)


async def test_a_triton_back_after_its_connections_dropped_is_tried_again_before_its_open_time(
    triton_url, pools
):
    """The calls cut as a server's connections dropped open its circuit for
    10 s; back and read ready half a second later, it was sent nothing for
    the rest of those 10 s, and its generation slots were left out of the
    count (a review). Two backends, the same Triton through two proxies; one
    proxy's connections drop and it listens again on its port."""
    port = int(triton_url.rsplit(":", 1)[1])
    dropping, steady = TcpProxy(port), TcpProxy(port)
    dropping_url = f"127.0.0.1:{await dropping.start()}"
    steady_url = f"127.0.0.1:{await steady.start()}"
    settings = settings_for(dropping_url)
    settings.inference.triton_urls = [dropping_url, steady_url]
    settings.inference.models = {"tiny-gpt": ServedModelSettings(routing_strategy="least_outstanding")}
    back = TcpProxy(port)
    try:
        async with serving(settings) as stub:
            calls = [stub.Generate(generate(f"story {n}", max_tokens=400), timeout=60) for n in range(8)]
            for call in calls:
                await call.read()  # the first delta: each generation is under way
            await dropping.close()
            await back.start(int(dropping_url.rsplit(":", 1)[1]))
            cut = 0
            for call in calls:
                try:
                    async for _ in call:
                        pass
                except grpc.aio.AioRpcError:
                    cut += 1
            # Enough to open its circuit (three failures in a row).
            assert cut >= 3
            served_by = set()
            async with asyncio.timeout(6):  # well inside the circuit's 10 s open time
                while dropping_url not in served_by:
                    completions = [
                        r async for r in stub.Generate(generate("again", max_tokens=4), timeout=20)
                    ]
                    served_by.add(completions[-1].completion.backend)
                    await asyncio.sleep(0.1)
    finally:
        for proxy in (dropping, steady, back):
            await proxy.close()
