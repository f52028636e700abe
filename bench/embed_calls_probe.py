"""How many Triton minilm calls a router turn costs, read from Triton itself.

Starts real Redis, a tritonserver (tiny_gpt, minilm), the inference, context
and cache services and a router in this process, then sends scripted turns
through the router's Chat RPC (tiny-gpt, 8 greedy tokens, the cache on):
session turns (adaptive assembly: the context service embeds the question,
the cache embeds its question, the appended turn is embedded) and stateless
one-message turns (only the cache embeds). Triton's own inference statistics
for minilm are read before and after each kind, so the counts are Triton's
requests (ModelInfer calls) and texts embedded, whatever the services believe.
The inference service's shared and memo counts are printed when it has them.

Then Embed's own latency, per question interleaved so that the shared
machine's drift hits all alike: a new text (Triton runs it), the same text
again (a memo hit where there is a memo), and Triton's minilm asked directly.

    flock /tmp/bench.lock .venv/bin/python bench/embed_calls_probe.py [--turns 40]
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import statistics
import sys
import tempfile
import time

import grpc
import uvloop

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402

from meshgate import metrics  # noqa: E402
from meshgate.common.v1 import common_pb2  # noqa: E402
from meshgate.inference.v1 import inference_service_pb2, inference_service_pb2_grpc  # noqa: E402
from meshgate.local import redis_server, triton  # noqa: E402
from meshgate.local.stack import build_model_weights, free_port  # noqa: E402
from meshgate.router.v1 import router_service_pb2 as pb  # noqa: E402
from meshgate.router.v1 import router_service_pb2_grpc  # noqa: E402
from services.inference import triton_protocol  # noqa: E402
from tests.integration.conftest import (  # noqa: E402
    running_inference,
    running_router,
    serve_tiny_gpt,
    service_settings,
)
from tests.mesh import router_channel  # noqa: E402

KEY = "embed-calls-probe-key"
AUTH = [("authorization", f"Bearer {KEY}")]
MODEL = "minilm"

# Questions a user might ask in a row: distinct texts, no repeats, so
# nothing here is a cache hit and every embedding is a new text.
TOPICS = ("tides", "volcanoes", "bread", "jazz", "glaciers", "bees", "chess", "comets", "tea", "bridges")


def question(kind: str, index: int) -> str:
    topic = TOPICS[index % len(TOPICS)]
    return f"{kind} question {index}: what should a beginner know about {topic} in week {index // 10}?"


async def triton_counts(stub) -> tuple[int, int]:
    """(requests, texts) minilm has run successfully so far."""
    response = await stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name=MODEL), timeout=10)
    stats = response.model_stats[0]
    return stats.inference_stats.success.count, stats.inference_count


def sharing_counts() -> str:
    """The inference service's own counts (absent before it had them)."""
    try:
        family = metrics.REGISTRY._names_to_collectors["meshgate_inference_embedding_texts"]
    except KeyError:
        return "(this inference service counts no shared embeddings)"
    values = {
        sample.labels["source"]: int(sample.value)
        for metric in family.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }
    return ", ".join(f"{source} {values[source]}" for source in sorted(values))


async def chat(router, request: pb.ChatRequest) -> pb.ChatCompletion:
    completion = None
    async for response in router.Chat(request, metadata=AUTH, timeout=120):
        if response.HasField("completion"):
            completion = response.completion
    if completion is None:
        raise RuntimeError("a turn ended without its completion")
    return completion


def turn(text: str, session_id: str = "") -> pb.ChatRequest:
    return pb.ChatRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=8, temperature=0.0),
        cache_policy=pb.CACHE_POLICY_USE,
        session_id=session_id,
    )


async def probe(turns: int, triton_url: str, redis_url: str) -> list[str]:
    settings = service_settings(redis_url, "", KEY)
    settings.inference.triton_urls = [triton_url]
    settings.inference.health_interval_s = 0.5
    out = []
    async with contextlib.AsyncExitStack() as stack:
        inference_address = await stack.enter_async_context(running_inference(settings))
        settings.cache.inference_address = inference_address
        settings.context.inference_address = inference_address
        serve_tiny_gpt(settings, inference_address)
        router_address = await stack.enter_async_context(running_router(settings))
        router = router_service_pb2_grpc.RouterServiceStub(
            await stack.enter_async_context(grpc.aio.insecure_channel(router_address))
        )
        triton_stub = service_pb2_grpc.GRPCInferenceServiceStub(
            await stack.enter_async_context(grpc.aio.insecure_channel(triton_url))
        )
        # One turn of each kind first: connections, indexes and sessions warm.
        warm = (await chat(router, turn("warm-up question about maps"))).session_id
        session_id = (await router.CreateSession(pb.CreateSessionRequest(), metadata=AUTH)).session_id
        await chat(router, turn("warm-up question about rivers", session_id))
        del warm
        out.append(f"Triton minilm per turn, {turns} turns of each kind (tiny-gpt, 8 tokens, cache on):")
        out.append("")
        out.append("| turns | Triton requests / turn | texts embedded / turn |")
        out.append("|---|---|---|")
        for kind in ("session", "stateless"):
            requests_before, texts_before = await triton_counts(triton_stub)
            for index in range(turns):
                text = question(kind, index)
                await chat(router, turn(text, session_id if kind == "session" else ""))
            # The cache's store and the context's append finish before the
            # completion goes out; nothing embeds after it.
            requests_after, texts_after = await triton_counts(triton_stub)
            out.append(
                f"| {kind} | {(requests_after - requests_before) / turns:.2f}"
                f" | {(texts_after - texts_before) / turns:.2f} |"
            )
        out.append("")
        out.append(f"Inference service embedding texts by source: {sharing_counts()}")
        out.append("")
        inference_channel = await stack.enter_async_context(router_channel(inference_address, "inference"))
        embed_stub = inference_service_pb2_grpc.InferenceServiceStub(inference_channel)
        out += await embed_latency(embed_stub, triton_stub, 10 * turns)
    return out


async def embed_latency(embed_stub, triton_stub, count: int) -> list[str]:
    new, again, direct = [], [], []
    for index in range(count):
        text = question("latency", index)
        embed = inference_service_pb2.EmbedRequest(texts=[text])
        infer = triton_protocol.embed_request(MODEL, [text])
        # One after the other: a grpc.aio call starts as it is made.
        for times, method, request in (
            (new, embed_stub.Embed, embed),
            (again, embed_stub.Embed, embed),
            (direct, triton_stub.ModelInfer, infer),
        ):
            started = time.perf_counter()
            await method(request, timeout=60)
            times.append(1000 * (time.perf_counter() - started))

    def row(path: str, values: list[float]) -> str:
        cuts = statistics.quantiles(values, n=100)
        return f"| {path} | {cuts[49]:.2f} | {cuts[98]:.2f} |"

    return [
        f"Embed of one question, {count} questions, interleaved:",
        "",
        "| path | p50 ms | p99 ms |",
        "|---|---|---|",
        row("Embed, a new text", new),
        row("Embed, the same text again", again),
        row("Triton's minilm directly (ModelInfer)", direct),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=40, help="turns of each kind")
    args = parser.parse_args()
    build_model_weights()
    with tempfile.TemporaryDirectory(prefix="meshgate-embed-probe-") as state:
        state_dir = pathlib.Path(state)
        redis_port, triton_port = free_port(), free_port()
        redis = redis_server.launch(redis_port, state_dir / "redis")
        triton_process = triton.launch(
            grpc_port=triton_port,
            state_dir=state_dir,
            log_file=state_dir / "triton.log",
            models=("tiny_gpt", MODEL),
        )
        try:
            redis_server.wait_ready(redis_port)
            triton_url = f"127.0.0.1:{triton_port}"
            triton.wait_ready(triton_url, ("tiny_gpt", MODEL), timeout=180, process=triton_process)
            lines = uvloop.run(probe(args.turns, triton_url, f"redis://127.0.0.1:{redis_port}/0"))
        finally:
            triton.terminate(triton_process)
            redis.terminate()
            redis.wait(10)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
