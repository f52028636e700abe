"""Prefix caching in the real tritonserver: a second prompt sharing a long
prefix reports the prompt tokens it reused, answers what the same model
with its cache off answers, and the hits appear on Triton's metrics port.

The server loads tiny_gpt twice from one temporary model repository: as
itself (config.pbtxt as shipped) and as tiny_gpt_uncached, the same version
directory with prefix_cache_bytes "0".
"""

from __future__ import annotations

import re
import time
import urllib.request
import uuid

import pytest
import tritonclient.grpc.aio as grpcaio

from meshgate.local import triton
from meshgate.local.stack import build_model_weights, free_port
from tests.integration.test_triton_models import ALL_OUTPUTS, generate, generate_inputs

pytestmark = pytest.mark.integration

TINY_GPT = triton.DEFAULT_MODEL_REPOSITORY / "tiny_gpt"
GREEDY = {"max_tokens": 16, "temperature": 0}


def uncached_config() -> str:
    config = (TINY_GPT / "config.pbtxt").read_text()
    config, renamed = re.subn(r'^name: "tiny_gpt"$', 'name: "tiny_gpt_uncached"', config, flags=re.M)
    config, disabled = re.subn(
        r'(key: "prefix_cache_bytes"\s*value: \{ string_value: )"\d+"', r'\1"0"', config
    )
    assert (renamed, disabled) == (1, 1), "config.pbtxt no longer looks as this test expects"
    return config


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    build_model_weights()
    state_dir = tmp_path_factory.mktemp("triton-prefix")
    repository = state_dir / "models"
    repository.mkdir()
    (repository / "tiny_gpt").symlink_to(TINY_GPT, target_is_directory=True)
    uncached = repository / "tiny_gpt_uncached"
    uncached.mkdir()
    (uncached / "1").symlink_to(TINY_GPT / "1", target_is_directory=True)
    (uncached / "config.pbtxt").write_text(uncached_config())
    models = ("tiny_gpt", "tiny_gpt_uncached")
    grpc_port, metrics_port = free_port(), free_port()
    process = triton.launch(
        model_repository=repository,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        state_dir=state_dir,
        log_file=state_dir / "triton.log",
        models=models,
    )
    try:
        triton.wait_ready(f"127.0.0.1:{grpc_port}", models, timeout=120, process=process)
        yield f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        triton.terminate(process)


@pytest.fixture
async def client(server):
    async with grpcaio.InferenceServerClient(server[0]) as client:
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

    metrics_url = server[1]
    hit_tokens = "meshgate_prefix_cache_hit_tokens_total"
    assert wait_for_metric(metrics_url, hit_tokens, "tiny_gpt", second.cached_tokens) == second.cached_tokens
    assert metric(metrics_url, "meshgate_prefix_cache_lookups_total", "tiny_gpt") == 2
    assert metric(metrics_url, "meshgate_prefix_cache_queried_tokens_total", "tiny_gpt") == (
        first.input_tokens + second.input_tokens
    )
    assert metric(metrics_url, "meshgate_prefix_cache_bytes", "tiny_gpt") > 0
    assert metric(metrics_url, "meshgate_prefix_cache_evicted_blocks_total", "tiny_gpt") == 0
    assert metric(metrics_url, "meshgate_prefix_cache_lookups_total", "tiny_gpt_uncached") is None
