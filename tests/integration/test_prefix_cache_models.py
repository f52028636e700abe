"""Prefix caching in the real tritonserver: a second prompt sharing a long
prefix reports the prompt tokens it reused, answers what the same model
with its cache off answers, and the hits appear on Triton's metrics port.

Each server loads a model twice from one temporary model repository: as
itself (config.pbtxt as shipped) and as <model>_uncached, the same version
directory with prefix_cache_bytes "0".

tiny_gpt's random weights barely look back: its greedy text ignores a
changed prompt token (0 of 10 tries, 40 tokens each) and even zeroed cached
values (logits 0.19 apart, same argmax). Its equal answers show little
about the reused keys and values, so the concurrent test is run on smollm2
too, whose answer follows its prompt: in tests/integration/test_triton_models.py,
beside smollm2's other tests, so that the one Triton holding smollm2 and
smollm2_uncached (5-15 s to load) starts once per run, not once in each
pytest-xdist worker that ran one of two modules; the exact comparison of
logits and greedy ids on small context-sensitive models is in
tests/unit/test_prefix_cache.py.
"""

from __future__ import annotations

import re
import time
import urllib.request
import uuid

import pytest
import tritonclient.grpc.aio as grpcaio

from tests.integration.conftest import cached_and_uncached
from tests.integration.test_triton_models import (
    ALL_OUTPUTS,
    answers_match_the_uncached_model,
    generate,
    generate_inputs,
)

pytestmark = pytest.mark.integration

GREEDY = {"max_tokens": 16, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with cached_and_uncached(tmp_path_factory, "tiny_gpt") as server:
        yield server


@pytest.fixture
async def client(server):
    async with grpcaio.InferenceServerClient(server.address) as client:
        yield client


def metric(metrics_url: str, name: str, model: str) -> float | None:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    found = re.search(rf'^{name}\{{model="{model}"\}} (\S+)$', text, flags=re.M)
    return None if found is None else float(found.group(1))


def wait_for_metric(metrics_url: str, name: str, model: str, expected: float, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while (value := metric(metrics_url, name, model)) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


async def test_a_shared_prefix_is_reused_and_changes_nothing_in_the_answer(client, server):
    # A fresh prefix per run: nothing else has warmed the cache for it.
    words = " ".join(f"gateway{ch}" for ch in uuid.uuid4().hex[:6])
    prefix = "[CLS] " + f"{words} the router sends every request to the replica holding its prefix " * 4

    async def ask(question: str, model: str):
        inputs = generate_inputs(prefix + question, True, GREEDY, **ALL_OUTPUTS)
        return await generate(client, inputs, model=model)

    first = await ask("what comes next in this story", "tiny_gpt")
    second = await ask("and what came before the story began", "tiny_gpt")
    second_uncached = await ask("and what came before the story began", "tiny_gpt_uncached")

    assert first.cached_tokens == 0
    assert second.input_tokens == second_uncached.input_tokens > 80
    # The shared prefix is over 80 tokens: at least 5 whole 16-token blocks.
    assert second.cached_tokens >= 80 and second.cached_tokens % 16 == 0
    assert second.cached_tokens < second.input_tokens
    assert second_uncached.cached_tokens == 0
    assert second.text == second_uncached.text and second.text.strip()
    assert second.output_tokens == second_uncached.output_tokens == 16

    metrics_url = server.metrics_url
    hit_tokens = "meshgate_prefix_cache_hit_tokens_total"
    assert wait_for_metric(metrics_url, hit_tokens, "tiny_gpt", second.cached_tokens) == second.cached_tokens
    assert metric(metrics_url, "meshgate_prefix_cache_lookups_total", "tiny_gpt") == 2
    assert metric(metrics_url, "meshgate_prefix_cache_queried_tokens_total", "tiny_gpt") == (
        first.input_tokens + second.input_tokens
    )
    assert metric(metrics_url, "meshgate_prefix_cache_bytes", "tiny_gpt") > 0
    assert metric(metrics_url, "meshgate_prefix_cache_evicted_blocks_total", "tiny_gpt") == 0
    assert metric(metrics_url, "meshgate_prefix_cache_lookups_total", "tiny_gpt_uncached") is None


async def test_concurrent_identical_and_shared_prefix_requests_answer_as_the_uncached_model(client, server):
    """16 requests at once (8 identical, 8 sharing a prefix, one filling the
    window to its last position), twice: admitted in one scheduler step, the
    later ones hit blocks the first inserted moments before, while it runs."""
    # Fixed words (greedy answers are then fixed too), used by no other test of this server.
    prefix = "[CLS] " + "every replica keeps the keys and values of the prompts it has seen " * 6
    window = 512  # tiny_gpt's max_context
    longest = prefix + "and so the story goes on"
    probe = generate_inputs(longest, True, {"max_tokens": 1}, return_num_input_tokens=True)
    prompt_tokens = (await generate(client, probe, model="tiny_gpt_uncached")).input_tokens
    requests = [(prefix, 64)] * 7 + [(longest, window - prompt_tokens)]
    requests += [(prefix + f"part {i} " + "of the tale " * i, 64) for i in range(8)]

    waves = await answers_match_the_uncached_model(client, server, "tiny_gpt", requests)

    for replies in waves:
        # Every prompt shares the prefix's 5 whole blocks: all but the first admitted hit them.
        assert sum(reply.cached_tokens >= 80 for reply in replies) >= len(requests) - 1, [
            reply.cached_tokens for reply in replies
        ]
    filled = waves[0][7]
    assert (filled.input_tokens + filled.output_tokens, filled.finish_reason) == (window, "length")
