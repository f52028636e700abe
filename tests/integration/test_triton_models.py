"""tiny_gpt, smollm2 and minilm in the real tritonserver, over gRPC, no mocks."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from meshgate.local import triton
from meshgate.local.stack import build_model_weights, free_port
from tests.integration.conftest import launched_triton

pytestmark = pytest.mark.integration

STREAM_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Server:
    url: str
    log_file: Path


@pytest.fixture(scope="module")
def models_server(triton_server) -> Server:
    url, log_file = triton_server
    return Server(url, log_file)


def _input(name: str, datatype: str, value) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], datatype)
    tensor.set_data_from_numpy(np.array([value], dtype=np.object_ if datatype == "BYTES" else np.bool_))
    return tensor


def generate_inputs(prompt: str, stream: bool, sampling: dict | str, **flags: bool) -> list:
    sampling_json = sampling if isinstance(sampling, str) else json.dumps(sampling)
    inputs = [
        _input("text_input", "BYTES", prompt.encode()),
        _input("stream", "BOOL", stream),
        _input("sampling_parameters", "BYTES", sampling_json.encode()),
    ]
    inputs += [_input(name, "BOOL", value) for name, value in flags.items()]
    return inputs


def is_final(result) -> bool:
    # The final flag travels as a response parameter, not as a tensor.
    return result.get_response().parameters["triton_final_response"].bool_param


@dataclass
class Reply:
    texts: list[str]
    finish_reason: str | None
    output_tokens: int
    input_tokens: int | None
    arrivals: list[float]
    final: bool = False
    cached_tokens: int | None = None  # prompt tokens the model reused from its prefix cache
    output_names: list[frozenset[str]] = field(default_factory=list)  # each response's tensors

    @property
    def text(self) -> str:
        return "".join(self.texts)


async def generate(
    client: grpcaio.InferenceServerClient,
    inputs: list,
    request_id: str = "",
    stop_after: int | None = None,
    model: str = "tiny_gpt",
    parameters: dict | None = None,
) -> Reply:
    """Run one generation request on a gRPC stream and collect every response.

    The stream ends by itself once Triton has sent the final response, since
    the request side closes after one request. With `stop_after`, the stream
    is cancelled after that many responses instead. `parameters` go as the
    request's parameters, as Triton's HTTP generate endpoint sends them.
    """

    async def requests():
        yield {"model_name": model, "inputs": inputs, "request_id": request_id, "parameters": parameters}

    reply = Reply([], None, 0, None, [])
    failure = None
    responses = client.stream_infer(requests(), stream_timeout=STREAM_TIMEOUT_S)
    async for result, error in responses:
        if error is not None:
            failure = error  # the model's error response is final; the stream ends next
            continue
        assert not reply.final, "a response after the final one"
        reply.arrivals.append(time.monotonic())
        reply.texts.append(result.as_numpy("text_output")[0].decode())
        reply.final = is_final(result)
        reply.output_names.append(frozenset(o.name for o in result.get_response().outputs))
        if (reasons := result.as_numpy("finish_reason")) is not None:
            reply.finish_reason = reasons[0].decode()
        if (counts := result.as_numpy("num_output_tokens")) is not None:
            reply.output_tokens += int(counts[0])  # per-response deltas, as vLLM reports them
        if (counts := result.as_numpy("num_input_tokens")) is not None:
            reply.input_tokens = int(counts[0])
        if (counts := result.as_numpy("num_cached_tokens")) is not None:
            reply.cached_tokens = int(counts[0])
        if len(reply.texts) == stop_after:
            responses.cancel()
            return reply
    if failure is not None:
        raise failure
    assert reply.final, "stream ended without a final response"
    return reply


@pytest.fixture
async def client(models_server: Server):
    async with grpcaio.InferenceServerClient(models_server.url) as client:
        yield client


GREEDY_PROMPT = "user: Tell me about the history of the printing press.\nassistant:"
ALL_OUTPUTS = dict(
    return_finish_reason=True,
    return_num_input_tokens=True,
    return_num_output_tokens=True,
    return_num_cached_tokens=True,
)


@pytest.mark.serial  # timing-sensitive (the responses' arrival spread): make test runs it alone
async def test_streamed_deltas_concatenate_to_the_non_streaming_text(client):
    greedy = {"max_tokens": 48, "temperature": 0}
    streamed = await generate(client, generate_inputs(GREEDY_PROMPT, True, greedy, **ALL_OUTPUTS))
    whole = await generate(
        client, generate_inputs(GREEDY_PROMPT, False, greedy, exclude_input_in_output=True, **ALL_OUTPUTS)
    )

    assert len(streamed.texts) == 48  # one response per token, the last one final
    assert all(streamed.texts[:-1]), "every token adds text"
    # Streaming: the responses arrive over the generation, not together at
    # its end (48 responses read back to back arrive within a millisecond or
    # two; generated one by one they take the model's step each, ~1 ms here).
    # Not against the time to the first one: under load that is mostly a wait
    # for a core (75 ms once, with all 48 tokens then in 48 ms).
    assert streamed.arrivals[-1] - streamed.arrivals[0] > 0.010
    assert len(whole.texts) == 1
    assert streamed.text == whole.text
    assert streamed.text.strip()
    assert (streamed.finish_reason, streamed.output_tokens) == ("length", 48)
    assert (whole.finish_reason, whole.output_tokens) == ("length", 48)
    assert streamed.input_tokens == whole.input_tokens > 10
    # What only the end can say rides on the final response alone: per
    # streamed token, the text and its count, nothing else; but the prompt's
    # count on the first as well (a caller cutting the stream short bills it).
    assert streamed.output_names[0] == {"text_output", "num_output_tokens", "num_input_tokens"}
    assert set(streamed.output_names[1:-1]) == {frozenset({"text_output", "num_output_tokens"})}
    assert streamed.output_names[-1] == {
        "text_output",
        "num_output_tokens",
        "finish_reason",
        "num_input_tokens",
        "num_cached_tokens",
    }


async def test_non_streaming_prepends_the_prompt_by_default(client):
    greedy = {"max_tokens": 5, "temperature": 0}
    generated = await generate(client, generate_inputs("hello there", True, greedy))
    whole = await generate(client, generate_inputs("hello there", False, greedy))
    assert whole.text == "hello there" + generated.text


@pytest.mark.parametrize("max_tokens", [1, 7])
async def test_max_tokens_is_respected(client, max_tokens):
    sampled = {"max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.9, "seed": 11}
    reply = await generate(client, generate_inputs("count with me:", True, sampled, **ALL_OUTPUTS))
    assert reply.output_tokens == len(reply.texts) == max_tokens
    assert reply.finish_reason == "length"


async def test_a_stop_string_ends_generation_before_it(client):
    sampled = {"max_tokens": 40, "temperature": 1.0, "seed": 7}
    free = await generate(client, generate_inputs("once upon a time", True, sampled, **ALL_OUTPUTS))
    words = free.text.split()
    stop = words[len(words) // 2]
    expected = free.text[: free.text.index(stop)]

    stopped = await generate(
        client, generate_inputs("once upon a time", True, {**sampled, "stop": [stop]}, **ALL_OUTPUTS)
    )

    assert stopped.finish_reason == "stop"
    assert stopped.text == expected
    assert stop not in stopped.text
    assert stopped.output_tokens < free.output_tokens


@pytest.mark.parametrize(
    "sampling, message",
    [
        ('{"max_tokens": 8,', "invalid request"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 4, "beam_width": 2}, "unsupported sampling parameters"),
    ],
)
async def test_bad_sampling_parameters_get_an_error_response(client, sampling, message):
    with pytest.raises(InferenceServerException, match=message):
        await asyncio.wait_for(generate(client, generate_inputs("hi", True, sampling)), timeout=10)


async def test_sampling_in_request_parameters_applies_without_the_tensor(client):
    """Triton's HTTP generate endpoint cannot fill the sampling_parameters
    tensor: its clients (LiteLLM's triton provider) send max_tokens and the
    rest as request parameters, which the vLLM backend reads when the
    tensor is absent, and so do these models."""
    greedy = {"max_tokens": 7, "temperature": 0}
    counted = dict(return_num_output_tokens=True)
    bare = [_input("text_input", "BYTES", GREEDY_PROMPT.encode()), _input("stream", "BOOL", True)]
    bare += [_input(name, "BOOL", value) for name, value in counted.items()]
    from_parameters = await generate(client, bare, parameters=greedy)
    from_tensor = await generate(client, generate_inputs(GREEDY_PROMPT, True, greedy, **counted))
    assert from_parameters.output_tokens == 7
    assert from_parameters.text == from_tensor.text
    # Both given: the tensor wins, as in the vLLM backend.
    shorter = generate_inputs(GREEDY_PROMPT, True, {"max_tokens": 3, "temperature": 0}, **counted)
    both = await generate(client, shorter, parameters=greedy)
    assert both.output_tokens == 3
    assert from_tensor.text.startswith(both.text)
    # Request parameters are checked as strictly as the tensor.
    with pytest.raises(InferenceServerException, match="unsupported sampling parameters"):
        await generate(client, bare, parameters={"max_tokens": 4, "beam_width": 2})


async def test_cancelling_a_stream_cancels_the_request_in_triton(client, models_server: Server):
    request_id = f"cancel-me-{time.monotonic_ns()}"
    long_run = {"max_tokens": 500, "temperature": 0}
    partial = await generate(
        client, generate_inputs("go on and on", True, long_run), request_id, stop_after=3
    )
    assert len(partial.texts) == 3

    line = f"tiny_gpt: request {request_id} cancelled after"
    deadline = time.monotonic() + 10
    while line not in models_server.log_file.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no '{line}' in the Triton log"
        await asyncio.sleep(0.1)


async def test_eight_concurrent_streams_all_complete(client):
    async def one(i: int) -> Reply:
        greedy = {"max_tokens": 32, "temperature": 0}
        return await generate(client, generate_inputs(f"story number {i}:", True, greedy, **ALL_OUTPUTS))

    replies = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), timeout=60)
    for reply in replies:
        assert reply.finish_reason == "length"
        assert reply.output_tokens == 32


def tiny_gpt_repository(directory: Path, **parameters: str) -> Path:
    """A model repository holding a copy of tiny_gpt (and the generation code
    it imports) whose config.pbtxt gives these parameters these values."""
    build_model_weights()  # copied with the model
    repository = directory / "model_repository"
    source, skip_caches = triton.DEFAULT_MODEL_REPOSITORY, shutil.ignore_patterns("__pycache__")
    for name in ("generation", "tiny_gpt"):
        shutil.copytree(source / name, repository / name, ignore=skip_caches)
    config = repository / "tiny_gpt" / "config.pbtxt"
    text = config.read_text()
    for key, value in parameters.items():
        setting = re.compile(rf'(key: "{key}"\n  value: {{ string_value: )"[^"]*"')
        text, count = setting.subn(rf'\g<1>"{value}"', text)
        assert count == 1, f"tiny_gpt's config.pbtxt sets {key} {count} times, not once"
    config.write_text(text)
    return repository


async def test_a_stream_interval_sends_several_tokens_a_response_and_the_same_text(
    tmp_path_factory: pytest.TempPathFactory,
):
    # An interval longer than any of these generations takes, from one active
    # sequence on: every token after a stream's first text is held until its
    # final response, whatever the machine's speed and however the streams
    # overlap (tiny_gpt's own 80 ms from 4 sequences on needs both).
    repository = tiny_gpt_repository(
        tmp_path_factory.mktemp("long_interval"), stream_interval_ms="60000", stream_interval_min_active="1"
    )
    greedy = {"max_tokens": 48, "temperature": 0}
    prompts = [f"user: Tell me story number {i}.\nassistant:" for i in range(3)]
    with launched_triton(tmp_path_factory, ("tiny_gpt",), repository) as (url, _):
        async with grpcaio.InferenceServerClient(url) as client:
            streamed = await asyncio.wait_for(
                asyncio.gather(
                    *(generate(client, generate_inputs(p, True, greedy, **ALL_OUTPUTS)) for p in prompts)
                ),
                timeout=60,
            )
            for prompt, reply in zip(prompts, streamed):
                whole = await generate(
                    client,
                    generate_inputs(prompt, False, greedy, exclude_input_in_output=True, **ALL_OUTPUTS),
                )
                assert reply.text == whole.text
                assert (reply.finish_reason, reply.output_tokens) == ("length", 48)
                # Fewer responses than tokens: the held ones went out together (num_output_tokens).
                assert len(reply.texts) < reply.output_tokens


@pytest.mark.parametrize(
    "key, value, error",
    [
        ("stream_interval_ms", "-5", "stream_interval_ms must be >= 0 (0: off), got '-5'"),
        ("max_active_sequences", "many", "max_active_sequences must be an integer, got 'many'"),
    ],
)
def test_a_bad_model_parameter_fails_the_models_load(tmp_path: Path, key: str, value: str, error: str):
    repository = tiny_gpt_repository(tmp_path, **{key: value})
    port, log_file = free_port(), tmp_path / "triton.log"
    process = triton.launch(
        repository, grpc_port=port, state_dir=tmp_path / "state", log_file=log_file, models=("tiny_gpt",)
    )
    try:
        with pytest.raises(RuntimeError, match="exited"):
            triton.wait_ready(f"127.0.0.1:{port}", ("tiny_gpt",), timeout=120, process=process)
    finally:
        triton.terminate(process)
    assert f"tiny_gpt: invalid model parameter: {error}" in log_file.read_text(errors="replace")


async def test_embeddings_are_unit_vectors_that_rank_paraphrases_closer(client):
    texts = [
        "How do I learn Python quickly?",
        "What is the fastest way to learn Python?",
        "What is the capital of France?",
    ]
    tensor = grpcaio.InferInput("text", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
    result = await client.infer("minilm", [tensor], client_timeout=30)
    vectors = result.as_numpy("embedding")

    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    paraphrase, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert paraphrase > unrelated + 0.3


async def test_the_cache_services_own_embedder_gives_tritons_minilm_vectors(client):
    """cache.embedder = "local" and "inference" must embed alike: entries
    stored through one path are looked up through the other."""
    from meshgate.embedding import LocalEmbedder
    from meshgate.minilm import REVISION

    texts = [
        "",
        "How do I learn Python quickly?",
        "Cancel my subscription, don't renew it on 2026-12-01!",
        "Où est la gare ? 東京 🚆",
        "Cancel [SEP] renew [CLS] [PAD] [MASK] [UNK]",  # read as text by both
        "word " * 400,  # past MAX_TOKENS: both truncate alike
    ]
    tensor = grpcaio.InferInput("text", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
    result = await client.infer("minilm", [tensor], client_timeout=30)
    triton_vectors = result.as_numpy("embedding")
    local = LocalEmbedder.load("minilm")
    try:
        local_vectors = await asyncio.gather(*(local.embed_or_none(t) for t in texts))
    finally:
        local.close()
    for text, triton_vector, local_vector in zip(texts, triton_vectors, local_vectors):
        assert float(triton_vector @ local_vector.vector) > 1 - 1e-5, text[:40]
    # And both name them alike: Triton each row with the revision of the
    # code that ran (its "revision" output, what Embed answers).
    revisions = {f"minilm@{row[0].decode()}" for row in result.as_numpy("revision")}
    assert revisions == {v.embedder for v in local_vectors} == {f"minilm@{REVISION}"}


# --- smollm2: SmolLM2-135M-Instruct, in a Triton of its own so the service
# tests' Triton does not pay its load (~5 s, ~0.8 GB).


def chatml(question: str) -> str:
    """The prompt as the inference service renders it with SmolLM2's template."""
    return (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


FRANCE = chatml("What is the capital of France?")


# What the engine logs when a request fails or its blocks cannot be cached
# (engine.Scheduler._fail, _prefill, run): none of it may appear.
ENGINE_FAILURES = ("failed", "could not cache", "Traceback")


async def answers_match_the_uncached_model(client, server, model: str, requests: list[tuple[str, int]]):
    """Send `requests` [(prompt, max_tokens)] all at once to the uncached model, then
    twice to the cached one (cold, then warm): greedy answers must be the same.
    Returns both waves' replies."""

    async def batch(name: str):
        async def ask(prompt: str, max_tokens: int):
            sampling = {"max_tokens": max_tokens, "temperature": 0}
            inputs = generate_inputs(prompt, True, sampling, **ALL_OUTPUTS)
            return await generate(client, inputs, model=name)

        return await asyncio.wait_for(asyncio.gather(*(ask(p, n) for p, n in requests)), timeout=300)

    log_before = server.log_file.read_text(errors="replace")
    expected = await batch(f"{model}_uncached")
    waves = []
    for wave in ("cold", "warm"):
        replies = await batch(model)
        for (_, max_tokens), reply, reference in zip(requests, replies, expected):
            assert (reply.text, reply.finish_reason, reply.output_tokens) == (
                reference.text,
                reference.finish_reason,
                reference.output_tokens,
            ), f"{wave}: {max_tokens} tokens after {reply.input_tokens}"
            assert reply.cached_tokens % 16 == 0 and reply.cached_tokens < reply.input_tokens
        waves.append(replies)
    assert all(reply.cached_tokens == 0 for reply in expected)
    engine_log = server.log_file.read_text(errors="replace")[len(log_before) :]
    assert not [line for line in engine_log.splitlines() if any(s in line for s in ENGINE_FAILURES)]
    return waves


@pytest.fixture(scope="module")
def smollm2_server(smollm2_prefix_server) -> Server:
    """The session's smollm2 (it serves smollm2_uncached too, for the prefix-cache comparison below)."""
    return Server(smollm2_prefix_server.address, smollm2_prefix_server.log_file)


@pytest.fixture
async def smollm2_client(smollm2_server: Server):
    async with grpcaio.InferenceServerClient(smollm2_server.url) as client:
        yield client


async def test_smollm2_answers_the_capital_of_france_and_ends_its_turn(smollm2_client):
    greedy = {"max_tokens": 40, "temperature": 0}
    reply = await generate(
        smollm2_client, generate_inputs(FRANCE, True, greedy, **ALL_OUTPUTS), model="smollm2"
    )

    assert "Paris" in reply.text
    assert reply.finish_reason == "stop", "stops at <|im_end|>, well before max_tokens"
    assert reply.output_tokens < 40
    assert "<|" not in reply.text, "no control token is sent as text"
    assert reply.input_tokens == 37  # the rendered prompt as is: nothing added


async def test_smollm2_reuses_the_shared_system_prompt_from_its_prefix_cache(smollm2_client):
    greedy = {"max_tokens": 12, "temperature": 0}
    first, second = [
        await generate(
            smollm2_client, generate_inputs(chatml(q), True, greedy, **ALL_OUTPUTS), model="smollm2"
        )
        for q in ("Name a colour.", "Name a fruit.")
    ]
    # The system prompt and "<|im_start|>user\n" are 24 tokens: one whole
    # 16-token block (the first request may itself have found it cached,
    # when an earlier test sent the same system prompt).
    assert second.cached_tokens == 16
    assert first.cached_tokens in (0, 16)
    assert second.text.strip() and second.text != first.text


async def test_smollm2_sampling_is_seeded_and_honours_stop_strings(smollm2_client):
    sampled = {"max_tokens": 24, "temperature": 0.8, "top_p": 0.9, "seed": 5}
    question = chatml("Write one sentence about the sea.")
    first, second = [
        await generate(
            smollm2_client, generate_inputs(question, True, sampled, **ALL_OUTPUTS), model="smollm2"
        )
        for _ in range(2)
    ]
    assert first.text == second.text and first.text.strip()

    words = first.text.split()
    stop = words[len(words) // 2]
    stopped = await generate(
        smollm2_client,
        generate_inputs(question, True, {**sampled, "stop": stop}, **ALL_OUTPUTS),
        model="smollm2",
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == first.text[: first.text.index(stop)]


BAD_REQUESTS = {
    "temperature NaN": ({"max_tokens": 8, "temperature": "NaN"}, "temperature must be finite"),
    "temperature inf": ('{"max_tokens": 8, "temperature": Infinity}', "temperature must be finite"),
    "negative seed": ({"max_tokens": 8, "temperature": 0.7, "seed": -1}, "seed must be >= 0"),
    "top_p 0": ({"max_tokens": 8, "top_p": 0}, "top_p must be in"),
    "prompt too long": ({"max_tokens": 8}, "context window"),
}


@pytest.mark.parametrize("model, window", [("tiny_gpt", 512), ("smollm2", 8192)])
async def test_invalid_requests_among_concurrent_streams_fail_alone(request, model, window):
    server = request.getfixturevalue("models_server" if model == "tiny_gpt" else "smollm2_server")
    good = {"max_tokens": 12, "temperature": 0.7, "seed": 3}

    async with grpcaio.InferenceServerClient(server.url) as client:

        async def good_stream(i: int) -> Reply:
            prompt = chatml(f"Count to {i + 3}.")
            return await generate(client, generate_inputs(prompt, True, good, **ALL_OUTPUTS), model=model)

        async def bad_stream(kind: str) -> Reply:
            await asyncio.sleep(0.05)  # arrives while the good ones are being generated
            # Each word is at least one token: that prompt cannot fit the window.
            prompt = "word " * window if kind == "prompt too long" else chatml("Say hi.")
            sampling, _ = BAD_REQUESTS[kind]
            return await generate(client, generate_inputs(prompt, True, sampling), model=model)

        results = await asyncio.wait_for(
            asyncio.gather(
                *(good_stream(i) for i in range(4)),
                *(bad_stream(kind) for kind in BAD_REQUESTS),
                return_exceptions=True,
            ),
            timeout=120,
        )

    goods, bads = results[:4], results[4:]
    for (kind, (_, message)), bad in zip(BAD_REQUESTS.items(), bads):
        assert isinstance(bad, InferenceServerException), (kind, bad)
        assert f"{model}: invalid request" in str(bad) and message in str(bad), (kind, str(bad))
    for reply in goods:
        assert isinstance(reply, Reply), reply
        assert reply.final and reply.finish_reason in ("stop", "length")
        assert 0 < reply.output_tokens <= 12


SMOLLM2_SYSTEM = (
    "<|im_start|>system\nYou are the support assistant of a city library. Answer in one short "
    "sentence, politely, and never invent opening hours or fees.<|im_end|>\n"
)


def smollm2_chat(question: str) -> str:
    return f"{SMOLLM2_SYSTEM}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


async def test_smollm2_concurrent_requests_sharing_a_system_prompt_answer_as_the_uncached_model(
    smollm2_prefix_server,
):
    """smollm2's answer follows its prompt, so a wrongly reused prefix shows in the text.
    Its 8 sequences (max_active_sequences) at once: 3 identical, 5 other questions."""
    questions = ["What is a library card?"] * 3 + [
        "Can I borrow a book?",
        "What is an e-book?",
        "Who writes the books?",
        "Name a famous novel.",
        "What is the capital of France?",
    ]
    requests = [(smollm2_chat(question), 12) for question in questions]
    server = smollm2_prefix_server
    async with grpcaio.InferenceServerClient(server.address) as client:
        cold, warm = await answers_match_the_uncached_model(client, server, "smollm2", requests)
    assert len({reply.text for reply in cold}) >= 5, "different questions, different answers"
    assert sum(reply.cached_tokens >= 32 for reply in cold) >= len(requests) - 1
    assert all(reply.cached_tokens >= 32 for reply in warm)
