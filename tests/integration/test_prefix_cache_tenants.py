"""The models' prefix cache never serves one tenant's prompt blocks to
another's turn (model_repository/generation/prefix_cache.py, cache salt).

Real router, context, cache and inference services, real Redis and a real
Triton with its metrics port: tenant A asks about a long document, tenant B
then asks about the same document. Shared, B's prefill reused A's blocks
(Triton's meshgate_prefix_cache_hit_tokens_total rose by the document's
whole blocks), and the time to B's first token told B that someone had sent
that document moments before: the side channel of prompt-leakage attacks on
shared KV caches, which can recover another tenant's prompt block by block.
A's own second question still reuses A's blocks.
"""

from __future__ import annotations

import contextlib
import re
import urllib.request
import uuid

import pytest

from meshgate.common.v1 import common_pb2
from meshgate.config import Settings, TenantSettings, hash_api_key
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from tests.integration.conftest import (
    answer_of,
    launched_tritons,
    running_inference,
    running_router,
    service_settings,
)
from tests.mesh import bounded_channel, mesh_settings

pytestmark = pytest.mark.integration

KEY_A = "prefix-tenants-a-key"
KEY_B = "prefix-tenants-b-key"
HIT_TOKENS = "meshgate_prefix_cache_hit_tokens_total"


@pytest.fixture(scope="module")
def triton_with_metrics(tmp_path_factory: pytest.TempPathFactory):
    with launched_tritons(tmp_path_factory.mktemp("prefix-tenants"), ("tiny_gpt", "minilm"), 1) as servers:
        ((url, metrics_url, _),) = servers
        yield url, metrics_url


@pytest.fixture(scope="module")
async def router(redis_url, triton_with_metrics):
    url, _ = triton_with_metrics
    inference_settings = Settings(mesh=mesh_settings())
    inference_settings.inference.triton_urls = [url]
    inference_settings.inference.health_interval_s = 0.5
    async with contextlib.AsyncExitStack() as stack:
        inference_address = await stack.enter_async_context(running_inference(inference_settings))
        settings = service_settings(redis_url, inference_address, KEY_A)
        settings.router.tenants = [TenantSettings(id="globex", api_key_sha256=[hash_api_key(KEY_B)])]
        address = await stack.enter_async_context(running_router(settings))
        channel = await stack.enter_async_context(bounded_channel(address))
        yield router_service_pb2_grpc.RouterServiceStub(channel)


def hit_tokens(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    found = re.search(rf'^{HIT_TOKENS}\{{model="tiny_gpt"\}} (\S+)$', text, flags=re.M)
    return 0.0 if found is None else float(found.group(1))


async def ask(router, key: str, document: str, question: str) -> None:
    request = pb.ChatRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=f"{document}\n{question}")],
        parameters=common_pb2.GenerationParameters(max_tokens=1, temperature=0.0),
        # Each tenant's own cache is not what this is about.
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )
    await answer_of(router.Chat(request, metadata=[("authorization", f"Bearer {key}")], timeout=60))


async def test_a_tenants_prompt_blocks_are_never_reused_for_another_tenant(router, triton_with_metrics):
    _, metrics_url = triton_with_metrics
    # A fresh document per run (nothing else has warmed the cache with it),
    # over five 16-token blocks.
    words = " ".join(f"clause{ch}" for ch in uuid.uuid4().hex[:8])
    document = f"confidential merger terms {words} the buyer pays on closing " * 6

    await ask(router, KEY_A, document, "Summarize it.")
    before = hit_tokens(metrics_url)
    await ask(router, KEY_B, document, "Who is the buyer?")
    assert hit_tokens(metrics_url) == before, "tenant B's prefill reused tenant A's prompt blocks"

    # The cache still serves a tenant its own blocks.
    await ask(router, KEY_A, document, "Who pays?")
    assert hit_tokens(metrics_url) - before >= 80
