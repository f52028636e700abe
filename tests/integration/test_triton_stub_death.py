"""A model whose Python-backend stub process is killed (SIGKILL, as the OOM
killer sends) with a second Triton configured. Triton then sends the
requests the stub was running nothing more, and refuses every later one
("Stub process ... is not healthy"), while the server and the model still
read ready, so the health probes see nothing wrong, and never starts the stub
again by itself (unloading and loading the model does). Streams it was
answering end UNAVAILABLE saying how much they delivered (they hung to
their deadline), requests it refuses go to the other server (they failed
INTERNAL), and the first refusal takes the model out of rotation on that
server: health reports it not ready there, with why (it read ready, and
every request went on paying a refusal first), until a canary is answered
once the model is loaded again. A request the model took but had not
answered, with no later one to be refused, ends when the canary its long
wait earns is refused (it waited for its deadline)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from meshgate.config import Settings
from meshgate.errors import error_info
from meshgate.inference.v1 import inference_service_pb2 as pb
from meshgate.inference.v1 import inference_service_pb2_grpc
from meshgate.reasons import Reason
from tests.integration.conftest import launched_tritons, running_inference
from tests.integration.test_triton_failover import (  # noqa: F401 (two_tritons: a fixture)
    MODELS,
    generate,
    in_flight,
    streaming,
    two_tritons,
)
from tests.mesh import mesh_settings, router_channel

# Not in `make test`: under a full suite's load on 2 cores one of the two
# Tritons once dropped its connections as the streams started (its process
# alive, its log silent), before any stub was killed; alone it passes
# (make test-stub-faults). The units behind it are tested in tests/unit.
pytestmark = [pytest.mark.integration, pytest.mark.stub_faults]

STREAMS = 4
# tiny_gpt's max_active_sequences: a request beyond them waits in the model.
MODEL_SLOTS = 16
# Far above a refusal's ~1-2 s, so that what ends the stranded streams first
# is the refusal, and short enough for the last part to wait out.
STALL_S = 10.0


def kill_stub(triton: subprocess.Popen, model: str) -> None:
    """SIGKILLs the stub process of ``model``'s one instance, the child of
    Triton whose command line names the model."""
    children = subprocess.run(
        ["ps", "-ww", "--ppid", str(triton.pid), "-o", "pid=,args="],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (pid,) = [int(line.split()[0]) for line in children.splitlines() if model in line]
    os.kill(pid, signal.SIGKILL)


async def model_health(stub) -> dict[tuple[str, str], pb.BackendModel]:
    """Each (server, Triton model)'s health, as GetBackendHealth reports it."""
    health = await stub.GetBackendHealth(pb.GetBackendHealthRequest(), timeout=5)
    return {(b.address, m.name): m for b in health.backends for m in b.models}


async def load_again(url: str, model: str) -> None:
    """What an operator does for a model whose stub died: unloaded and
    loaded again, it gets a new stub. A load alone is a no-op while the
    model's files are unchanged (Triton reloads only a modified model)."""
    async with grpc.aio.insecure_channel(url) as channel:
        triton = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        await triton.RepositoryModelUnload(
            service_pb2.RepositoryModelUnloadRequest(model_name=model), timeout=60
        )
        await triton.RepositoryModelLoad(service_pb2.RepositoryModelLoadRequest(model_name=model), timeout=60)


def assert_partly_delivered(text: str, completion, error, reason: str) -> None:
    assert completion is None and error is not None, "the stream finished on a dead stub"
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    info = error_info(error)
    assert info is not None and info.reason == reason, error
    assert int(info.metadata["delivered_chars"]) == len(text) > 0


async def test_a_killed_stubs_streams_end_with_counts_and_what_it_refuses_goes_to_the_other_server(
    two_tritons,  # noqa: F811
) -> None:
    urls, processes = two_tritons
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = urls
    settings.inference.health_interval_s = 0.5
    settings.inference.stream_stall_s = STALL_S
    # A random draw: fresh requests reach the dead stub's server too, however
    # many streams it holds.
    settings.inference.models["tiny-gpt"].routing_strategy = "weighted"
    loop = asyncio.get_running_loop()
    async with running_inference(settings) as address, router_channel(address, "inference") as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)

        streams = await streaming(stub, STREAMS)
        load = await in_flight(stub)
        dead_url = max(urls, key=load.get)
        (live_url,) = [url for url in urls if url != dead_url]
        kill_stub(processes[urls.index(dead_url)], "tiny_gpt")
        killed_at = loop.time()
        fresh = [await generate(stub, f"question {n}", 4) for n in range(12)]
        finished = await asyncio.gather(*streams)
        stranded_for_s = loop.time() - killed_at
        after_kill = await model_health(stub)

        # The other server's stub killed under as many streams as the model
        # runs at once, and one more request that the model took but has not
        # started (it waits for a slot), with no request after them: the
        # stall bound ends the streams, and the waiting one (it waited for
        # its deadline) ends when the canary its long wait earns is refused.
        full = await streaming(stub, MODEL_SLOTS)
        answered_at = []
        waiting = asyncio.create_task(generate(stub, "a question", 4, lambda: answered_at.append(1)))
        await asyncio.sleep(0.5)
        assert not answered_at, "the model had a free slot"
        kill_stub(processes[urls.index(live_url)], "tiny_gpt")
        killed_at = loop.time()
        waited_text, waited_completion, waited_error = await waiting
        waited_for_s = loop.time() - killed_at
        stalled = await asyncio.gather(*full)
        stalled_for_s = loop.time() - killed_at

        # Embeddings: the first dead stub's server still embeds, and comes first (the
        # stalls opened the other one's breaker); its minilm dies.
        kill_stub(processes[urls.index(dead_url)], "minilm")
        embeddings = [
            await stub.Embed(pb.EmbedRequest(texts=[f"a text to embed, number {n}"]), timeout=30)
            for n in range(6)
        ]
        left_open = await in_flight(stub)
        minilm_killed = (await model_health(stub))[(dead_url, "minilm")]

        # Loaded again, the model is back in rotation there once the next
        # probe round's canary is answered, and serves.
        await load_again(dead_url, "tiny_gpt")
        reloaded_at = loop.time()
        while not (await model_health(stub))[(dead_url, "tiny_gpt")].ready:
            assert loop.time() - reloaded_at < 10, "not back in rotation 10 s after the reload"
            await asyncio.sleep(0.1)
        after_reload = await generate(stub, "after the reload", 4)

    print(
        f"stranded streams ended {stranded_for_s:.1f} s after the kill; the stalled ones "
        f"{stalled_for_s:.1f} s, the waiting request {waited_for_s:.1f} s"
    )
    for text, completion, error in fresh:
        assert error is None, error
        assert completion.backend == live_url and text
    stranded = [result for result in finished if result[1] is None or result[1].backend == dead_url]
    assert stranded, "the dead stub answered none of the streams"
    for text, completion, error in stranded:
        # Ended by the first refusal (a stall would be STREAM_ENDED_EARLY).
        assert_partly_delivered(text, completion, error, Reason.DOWNSTREAM_FAILED)
    assert stranded_for_s < STALL_S
    assert all(e.dimensions > 0 for e in embeddings)
    assert left_open == {dead_url: 0, live_url: 0}
    # Retried, but the only other server's tiny_gpt is out (its stub died).
    assert waited_for_s < STALL_S + 10, "it waited for its deadline"
    assert waited_text == "" and waited_completion is None and waited_error is not None
    assert waited_error.code() == grpc.StatusCode.UNAVAILABLE, waited_error
    assert error_info(waited_error).reason == Reason.NO_READY_BACKEND
    for text, completion, error in stalled:
        assert_partly_delivered(text, completion, error, Reason.STREAM_ENDED_EARLY)
    assert STALL_S <= stalled_for_s < STALL_S + 10

    # The refusal took tiny_gpt out on the dead stub's server, and only there.
    dead_model = after_kill[(dead_url, "tiny_gpt")]
    assert not dead_model.ready
    assert "stub process died" in dead_model.not_ready_reason
    assert "is not healthy" in dead_model.not_ready_reason
    # Said apart too, for what loads it again (meshgate up's supervisor).
    assert dead_model.stub_dead and not after_kill[(dead_url, "minilm")].stub_dead
    assert after_kill[(live_url, "tiny_gpt")].ready and after_kill[(dead_url, "minilm")].ready
    assert not minilm_killed.ready and "stub process died" in minilm_killed.not_ready_reason

    # The other server's tiny_gpt stub is dead too (killed under the full model), so
    # the reloaded server answers, perhaps after one refusal there.
    text, completion, error = after_reload
    assert error is None, error
    assert completion.backend == dead_url and text


async def test_a_stub_killed_while_its_model_is_idle_is_found_by_a_canary_before_any_request(
    tmp_path,
) -> None:
    """A stub killed while its model ran nothing left the model and the
    server reading ready: health said nothing, and the next caller's
    request was the one to fail. With inference.idle_canary_s, the model's
    canary finds it first, no request sent: out of rotation there, with why."""
    with launched_tritons(tmp_path, MODELS, 1) as [(url, _, process)]:
        settings = Settings(mesh=mesh_settings())
        settings.inference.triton_urls = [url]
        settings.inference.health_interval_s = 0.5
        settings.inference.idle_canary_s = 2.0
        async with running_inference(settings) as address, router_channel(address, "inference") as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            kill_stub(process, "minilm")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while (model := (await model_health(stub))[url, "minilm"]).ready:
                assert loop.time() < deadline, "the idle model's dead stub was never found"
                await asyncio.sleep(0.2)
            assert model.stub_dead and "stub process died" in model.not_ready_reason
            assert (await model_health(stub))[url, "tiny_gpt"].ready, "the other model still serves"
