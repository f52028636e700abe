"""Every service's Prometheus endpoint, the GenAI span attributes and
``meshgate top``, against the whole mesh as separate processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import grpc
import pytest

from meshgate import top
from meshgate.common.v1 import common_pb2
from meshgate.errors import error_info
from meshgate.local.stack import REPO_ROOT, SERVICES, Ports, Stack, free_port
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from tests.integration.conftest import stop_stack

pytestmark = pytest.mark.e2e

KEY = "metrics-e2e-key"
AUTH = [("authorization", f"Bearer {KEY}")]
TTFT = "meshgate_router_time_to_first_token_seconds"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    mesh = Stack(
        tmp_path_factory.mktemp("metrics-mesh"),
        Ports(*(free_port() for _ in range(6))),
        redis_url=os.environ.get("REDIS_URL"),
        dev_api_key=KEY,
        # No smollm2: these checks need a model, not a good one.
        triton_models=("tiny_gpt", "minilm"),
    )
    mesh.start()
    yield mesh
    stop_stack(mesh)


def scrape_all(stack: Stack) -> dict[str, top.Scrape]:
    scrapes = top.scrape_all({name: stack.metrics_address(name) for name in SERVICES})
    for name, scraped in scrapes.items():
        assert not scraped.error, f"{name}'s metrics endpoint: {scraped.error}"
    return scrapes


def chat(stub, text: str, model: str = "tiny-gpt", session_id: str = "") -> pb.ChatCompletion:
    request = pb.ChatRequest(
        model=model,
        session_id=session_id,
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=12, temperature=0.0),
    )
    completion = None
    for response in stub.Chat(request, metadata=AUTH, timeout=60):
        if response.HasField("completion"):
            completion = response.completion
    assert completion is not None
    return completion


def wait_for(condition, what: str, timeout_s: float = 30.0):
    """Polls ``condition`` (returns a truthy value when met) until the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def traffic(stack):
    """Scrapes before and after a few turns: misses, an exact hit, a session
    turn, and one refused for an unknown model."""
    before = scrape_all(stack)
    with grpc.insecure_channel(stack.address("router")) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        first = chat(stub, "How many legs does a spider have?")
        repeated = chat(stub, "How many legs does a spider have?")
        session = stub.CreateSession(pb.CreateSessionRequest(), metadata=AUTH, timeout=30)
        chat(stub, "Remember the number seven.", session_id=session.session_id)
        with pytest.raises(grpc.RpcError) as refused:
            chat(stub, "hello", model="no-such-model")
    after = scrape_all(stack)
    return before, after, first, repeated, refused.value


def moved(before: top.Scrape, after: top.Scrape, name: str, **match: str) -> float:
    return after.total(name, **match) - before.total(name, **match)


def test_router_counts_turns_latency_tokens_and_errors(traffic):
    before, after, first, repeated, refused = traffic
    router_before, router = before["router"], after["router"]
    assert first.cache_status == pb.CACHE_STATUS_MISS
    assert repeated.cache_status == pb.CACHE_STATUS_EXACT_HIT
    # Two generated turns (the miss and the session turn), one replayed hit.
    assert moved(router_before, router, TTFT + "_count", model="tiny-gpt", deployment="local") == 2
    assert moved(router_before, router, TTFT + "_count", model="tiny-gpt", deployment="cache") == 1
    assert moved(router_before, router, "meshgate_router_inter_token_seconds_count", model="tiny-gpt") >= 1
    generated = first.usage.completion_tokens
    assert generated > 0
    assert (
        moved(router_before, router, "meshgate_router_completion_tokens_total", deployment="local")
        >= generated
    )
    assert moved(router_before, router, "meshgate_router_prompt_tokens_total", deployment="local") > 0
    assert (
        moved(router_before, router, "meshgate_router_turns_total", cache="exact_hit", outcome="completed")
        == 1
    )
    ok_chats = moved(
        router_before, router, "meshgate_rpc_requests_total", method="RouterService/Chat", code="OK"
    )
    assert ok_chats == 3
    reason = error_info(refused).reason
    assert (
        moved(
            router_before,
            router,
            "meshgate_rpc_requests_total",
            method="RouterService/Chat",
            code=refused.code().name,
            reason=reason,
        )
        == 1
    )
    assert router.total("process_resident_memory_bytes") > 0
    assert router.total("process_cpu_seconds_total") > 0


def test_cache_context_and_inference_count_their_work(stack, traffic):
    before, after, *_ = traffic
    cache_before, cache = before["cache"], after["cache"]
    assert moved(cache_before, cache, "meshgate_cache_lookups_total", result="exact_hit") == 1
    # One miss per generated turn: the router's exact lookup before the
    # semantic one is not counted twice (LookupRequest.semantic_follows).
    assert moved(cache_before, cache, "meshgate_cache_lookups_total", result="miss") == 2
    assert moved(cache_before, cache, "meshgate_cache_stores_total") >= 2
    assert "meshgate_cache_verifier_rejections_total" in cache.samples

    context_before, context = before["context"], after["context"]
    # The session turn's; the stateless miss's short prompt surely fits
    # the window, so the router skips its assembly (prompt_bound.py).
    assert moved(context_before, context, "meshgate_context_assembly_seconds_count") >= 1
    assert (
        moved(context_before, context, "meshgate_context_assembly_tokens_total", disposition="included") > 0
    )

    inference_before, inference = before["inference"], after["inference"]
    triton = stack.address("triton")
    assert inference.total("meshgate_inference_backend_ready", backend=triton) == 1
    assert inference.total("meshgate_inference_model_ready", backend=triton, model="tiny_gpt") == 1
    assert (
        moved(inference_before, inference, "meshgate_rpc_requests_total", method="InferenceService/Generate")
        == 2
    )
    # Triton's own statistics arrive with the next health probe.
    wait_for(
        lambda: (
            top.scrape("inference", stack.metrics_address("inference")).total(
                "meshgate_triton_inferences_total", backend=triton, model="tiny_gpt"
            )
            >= 2
        ),
        "Triton's statistics count the generations",
    )


def test_spans_follow_the_genai_conventions(stack, traffic):
    _, _, first, *_ = traffic

    def spans_of_trace():
        if not stack.traces_path.exists():
            return None
        spans = [json.loads(line) for line in stack.traces_path.read_text().splitlines() if line]
        mine = [s for s in spans if s["trace_id"] == first.trace_id]
        turn = [s for s in mine if s["name"] == "chat tiny-gpt"]
        generate = [
            s for s in mine if s["name"].endswith("InferenceService/Generate") and s["kind"] == "SERVER"
        ]
        return (turn[0], generate[0]) if turn and generate else None

    turn, generate = wait_for(spans_of_trace, "the turn's and the generation's spans are exported")
    attributes = turn["attributes"]
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "tiny-gpt"
    assert attributes["gen_ai.request.max_tokens"] == 12
    assert attributes["gen_ai.request.temperature"] == 0.0
    assert attributes["gen_ai.usage.input_tokens"] == first.usage.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == first.usage.completion_tokens
    assert list(attributes["gen_ai.response.finish_reasons"]) == [first.finish_reason]
    assert generate["attributes"]["gen_ai.request.model"] == "tiny-gpt"
    assert generate["attributes"]["gen_ai.usage.output_tokens"] == first.usage.completion_tokens


STATUSES = ("exact_hit", "semantic_hit", "miss")


def test_meshgate_top_once_shows_the_live_mesh(stack, traffic):
    """Run last in this module: it relies on no turn since the traffic."""
    result = subprocess.run(
        [sys.executable, "-m", "meshgate.cli", "top", "--once", "--config", str(stack.config_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in SERVICES:
        row = next(line for line in lines if line.startswith(name + " "))
        assert f"{stack.metrics_address(name)} up" in " ".join(row.split()), row
    model_rows = [line.split() for line in lines if line.startswith("tiny-gpt ")]
    assert {row[1] for row in model_rows} == {"local", "cache"}
    local = next(row for row in model_rows if row[1] == "local")
    # Quiet for the last second: the quantiles are the whole run's (marked *), in ms.
    assert local[3].endswith("*") and float(local[3].rstrip("*")) > 0
    # Nothing asked since the traffic's last scrape: the whole-run figures are those.
    # The hit rate is of the router's turns (its hot copies' hits never reach
    # the cache's lookups), the cache's lookups beside it.
    router, cache = traffic[1]["router"], traffic[1]["cache"]
    turns = {status: router.total("meshgate_router_turns_total", cache=status) for status in STATUSES}
    counted = sum(turns.values())
    hits = turns["exact_hit"] + turns["semantic_hit"]
    lookups = cache.total("meshgate_cache_lookups_total")
    assert turns["exact_hit"] >= 1 and turns["miss"] >= 1
    assert (
        f"CACHE  hit rate {hits / counted:.1%} of {counted:.0f} turns (exact {turns['exact_hit']:.0f}, "
        f"semantic {turns['semantic_hit']:.0f}, miss {turns['miss']:.0f}); cache lookups {lookups:.0f};"
    ) in result.stdout
    refused = traffic[4]
    error_row = next(
        line for line in lines if line.startswith("router ") and error_info(refused).reason in line
    )
    assert error_row.split()[1:] == [refused.code().name, error_info(refused).reason, "1"]
