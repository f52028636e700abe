"""Prefix-aware routing over two real Triton servers: requests that share a
long prompt prefix go where it was computed (and cached), unlike a strategy
blind to prefixes; the model confirms the reuse with its cached-token count."""

from __future__ import annotations

import re
import urllib.request

import pytest

from meshgate.common.v1 import common_pb2
from meshgate.config import ServedModelSettings, Settings
from meshgate.inference.v1 import inference_service_pb2 as pb
from meshgate.inference.v1 import inference_service_pb2_grpc
from tests.integration.conftest import launched_tritons, running_inference
from tests.mesh import mesh_settings, router_channel

pytestmark = pytest.mark.integration

MODELS = ("tiny_gpt",)


@pytest.fixture(scope="module")
def two_tritons(tmp_path_factory):
    """Two tiny_gpt servers; yields their gRPC and metrics URLs."""
    with launched_tritons(tmp_path_factory.mktemp("prefix-routing"), MODELS, 2) as servers:
        yield [url for url, _, _ in servers], [metrics for _, metrics, _ in servers]


def hit_tokens(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(
        float(v) for v in re.findall(r"^meshgate_prefix_cache_hit_tokens_total\{[^}]*\} (\S+)$", text, re.M)
    )


async def backends_of(urls: list[str], strategy: str, prompts: list[str]) -> list[str]:
    """The backend that answered each prompt, sent one after another."""
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = urls
    settings.inference.health_interval_s = 0.5
    settings.inference.models = {"tiny-gpt": ServedModelSettings(routing_strategy=strategy)}
    async with running_inference(settings) as address, router_channel(address, "inference") as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        answered = []
        for prompt in prompts:
            request = pb.GenerateRequest(
                model="tiny-gpt",
                messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=prompt)],
                parameters=common_pb2.GenerationParameters(max_tokens=2, temperature=0.0),
            )
            responses = [r async for r in stub.Generate(request, timeout=60)]
            answered.append(responses[-1].completion.backend)
        return answered


def shared_prefix_prompts(tag: str) -> list[str]:
    # Two long prefixes (~150 tokens each), three questions on each, interleaved.
    prefixes = [f"{tag} policy {k}: " + " ".join(f"rule {k}{i} applies" for i in range(50)) for k in "xy"]
    return [f"{prefixes[n % 2]} question {n}?" for n in range(6)]


async def test_kv_cost_keeps_a_prefix_on_the_server_that_computed_it(two_tritons):
    urls, metrics = two_tritons
    before = sum(hit_tokens(m) for m in metrics)
    answered = await backends_of(urls, "kv_cost", shared_prefix_prompts("kv"))
    # Each prefix stays on one server, and the two prefixes use both servers.
    assert len(set(answered[0::2])) == 1 and len(set(answered[1::2])) == 1
    assert answered[0] != answered[1]
    # The models reused the prefix: 2 repeats of each of two ~150-token prefixes.
    assert sum(hit_tokens(m) for m in metrics) - before >= 4 * 128


async def test_a_prefix_blind_strategy_spreads_a_prefix_over_both_servers(two_tritons):
    urls, _ = two_tritons
    prompts = shared_prefix_prompts("lo")[0::2]  # one prefix, three questions
    answered = await backends_of(urls, "least_outstanding", prompts)
    # One request at a time: ties rotate, so the prefix is computed on both servers.
    assert len(set(answered)) == 2


async def test_kv_cost_remembers_every_conversation_not_only_the_last(two_tritons):
    """A review's finding (2026-12-06): each completion's report of a prompt
    first seen (nothing reused) was read as an eviction of everything routed
    to that server before it, so each server's index held only its last
    conversation, and second turns were sent wherever ties rotated (4 of 6
    on the server holding their first turn). Six first turns, then their
    second turns out of order: each goes where its first turn is cached."""
    urls, _ = two_tritons
    firsts = [f"talk {n}: " + " ".join(f"topic {n}{i} was discussed" for i in range(40)) for n in range(6)]
    order = [0, 2, 4, 1, 3, 5]
    answered = await backends_of(urls, "kv_cost", firsts + [f"{firsts[n]} and then?" for n in order])
    first_turns, second_turns = answered[:6], answered[6:]
    assert set(first_turns) == set(urls), "the first turns use both servers"
    assert [first_turns[n] for n in order] == second_turns
