"""The router's OpenAI-compatible HTTP edge against the real mesh (router,
context, cache and inference in-process, real Triton tiny_gpt and minilm,
real Redis), through the official openai SDK and through raw httpx."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
import socket
import time
import uuid

import grpc
import httpx
import numpy as np
import openai
import pytest

from meshgate import metrics, redis_access
from meshgate.common.v1 import common_pb2 as common_pb
from meshgate.config import (
    DEV_TENANT_ID,
    DeploymentSettings,
    LimitSettings,
    ModelSettings,
    PriceSettings,
    TenantSettings,
    hash_api_key,
)
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.errors import error_info
from meshgate.inference.v1 import inference_service_pb2 as inference_pb
from meshgate.inference.v1 import inference_service_pb2_grpc
from meshgate.local.stack import free_port
from meshgate.router.v1 import admin_service_pb2 as admin_pb
from meshgate.router.v1 import admin_service_pb2_grpc, router_service_pb2_grpc
from meshgate.router.v1 import router_service_pb2 as router_pb
from services.cache import app as cache_app
from services.context import app as context_app
from services.context import store as session_store
from services.router import app as router_app
from services.router import body_parser, http_edge
from tests.integration.conftest import (
    running,
    running_router,
    serve_tiny_gpt,
    service_settings,
    triton_cancellations,
    until_triton_cancels,
)
from tests.integration.test_router_accounting import eventually
from tests.mesh import bounded_channel, router_channel
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

KEY = "http-edge-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
LIMITED_KEY = "http-edge-limited-key"
NARROW_KEY = "http-edge-narrow-key"
LIMITED_RPM = 2
EMBED_LIMITED_KEY = "http-edge-embed-limited-key"
EMBED_HANGUP_KEY = "http-edge-embed-hangup-key"
# A tenant whose minute holds fewer tokens than any turn reserves.
TINY_KEY = "http-edge-tiny-limit-key"
# A tenant with both per-minute windows, and a tighter request window on its model.
RATED_KEY = "http-edge-rated-key"
RATED_TPM = 100_000
# A tenant whose session turns grow their reservation by their history.
SESSION_RATED_KEY = "http-edge-session-rated-key"
SESSION_RATED_TPM = 6_000
# A tenant whose gRPC turns say its windows on their completions.
GRPC_RATED_KEY = "http-edge-grpc-rated-key"
GRPC_RATED_RPM = 3


@pytest.fixture(scope="module")
async def edge(redis_url, inference_address):
    """The edge's base URL and the router's gRPC address."""
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.tenants = [
        TenantSettings(
            id=f"limited-{uuid.uuid4().hex[:8]}",
            api_key_sha256=[hash_api_key(LIMITED_KEY)],
            limits=LimitSettings(requests_per_minute=LIMITED_RPM),
        ),
        TenantSettings(
            id=f"embed-limited-{uuid.uuid4().hex[:8]}",
            api_key_sha256=[hash_api_key(EMBED_LIMITED_KEY)],
            limits=LimitSettings(requests_per_minute=LIMITED_RPM),
        ),
        TenantSettings(
            id=f"embed-hangup-{uuid.uuid4().hex[:8]}", api_key_sha256=[hash_api_key(EMBED_HANGUP_KEY)]
        ),
        TenantSettings(id="narrow", api_key_sha256=[hash_api_key(NARROW_KEY)], models=["other"]),
        TenantSettings(
            id=f"tiny-{uuid.uuid4().hex[:8]}",
            api_key_sha256=[hash_api_key(TINY_KEY)],
            limits=LimitSettings(tokens_per_minute=8),
        ),
        TenantSettings(
            id=f"rated-{uuid.uuid4().hex[:8]}",
            api_key_sha256=[hash_api_key(RATED_KEY)],
            limits=LimitSettings(requests_per_minute=50, tokens_per_minute=RATED_TPM),
        ),
        TenantSettings(
            id=f"session-rated-{uuid.uuid4().hex[:8]}",
            api_key_sha256=[hash_api_key(SESSION_RATED_KEY)],
            limits=LimitSettings(tokens_per_minute=SESSION_RATED_TPM),
        ),
        TenantSettings(
            id=f"grpc-rated-{uuid.uuid4().hex[:8]}",
            api_key_sha256=[hash_api_key(GRPC_RATED_KEY)],
            limits=LimitSettings(requests_per_minute=GRPC_RATED_RPM, tokens_per_minute=RATED_TPM),
        ),
    ]
    (live,) = settings.models["tiny-gpt"].deployments
    settings.models["other"] = ModelSettings(deployments=[live])
    settings.models["rated-model"] = ModelSettings(deployments=[live])
    settings.router.model_limits = {"rated-model": LimitSettings(requests_per_minute=5)}
    settings.router.http_listen = f"127.0.0.1:{free_port()}"
    async with running_router(settings) as router_address:
        yield f"http://{settings.router.http_listen}/v1", router_address


@pytest.fixture(scope="module")
def base_url(edge):
    return edge[0]


@pytest.fixture
def client(base_url):
    with openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture
async def async_client(base_url):
    async with openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=60) as client:
        yield client


def question(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def unique(text: str) -> str:
    """A question the cache has not seen."""
    return f"{text} {uuid.uuid4().hex[:8]}"


# The SDK's sync client blocks; the mesh runs on this test's event loop.
async def sync(function, *args, **kwargs):
    return await asyncio.to_thread(function, *args, **kwargs)


# --- the openai SDK ----------------------------------------------------------


async def test_sync_sdk_without_streaming(client):
    completion = await sync(
        client.chat.completions.create,
        model="tiny-gpt",
        messages=question(unique("hello there")),
        max_tokens=5,
        temperature=0,
        extra_body={"cache_policy": "bypass"},
    )
    choice = completion.choices[0]
    assert completion.object == "chat.completion"
    assert completion.model == "tiny-gpt"
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens > 0
    assert 0 < completion.usage.completion_tokens <= 5
    usage = completion.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert completion.meshgate["cache_status"] == "bypassed"
    assert completion.meshgate["deployment"] == "live"
    assert "trace_id" in completion.meshgate  # empty here: the tests install no tracer


async def test_sync_sdk_streaming_joins_to_the_non_streamed_answer(client):
    text = unique("tell me about rivers")
    stream = await sync(
        client.chat.completions.create,
        model="tiny-gpt",
        messages=question(text),
        max_tokens=8,
        temperature=0,
        seed=7,
        stream=True,
    )
    chunks = await sync(list, stream)
    pieces = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len({chunk.id for chunk in chunks}) == 1
    assert all(chunk.usage is None for chunk in chunks)  # include_usage was not asked for
    # The same question again comes from the cache, whole.
    again = await sync(
        client.chat.completions.create,
        model="tiny-gpt",
        messages=question(text),
        max_tokens=8,
        temperature=0,
        seed=7,
    )
    assert again.choices[0].message.content == "".join(pieces)
    assert again.meshgate["cache_status"] == "exact_hit"


async def test_async_sdk_streaming_with_usage_in_the_final_chunk(async_client):
    stream = await async_client.chat.completions.create(
        model="tiny-gpt",
        messages=question(unique("count to three")),
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens > 0
    assert last.usage.prompt_tokens > 0
    assert all(chunk.usage is None for chunk in chunks[:-1])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text


async def test_async_sdk_without_streaming(async_client):
    completion = await async_client.chat.completions.create(
        model="tiny-gpt",
        messages=[{"role": "system", "content": "Be brief."}, *question(unique("hi"))],
        max_completion_tokens=3,
    )
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens <= 3


async def test_a_session_continues_across_requests(async_client):
    first = await async_client.chat.completions.create(
        model="tiny-gpt",
        messages=question("My name is Ada."),
        max_tokens=3,
        extra_body={"session_id": "new"},
    )
    session_id = first.meshgate["session_id"]
    assert session_id and first.meshgate["session_version"] > 0
    second = await async_client.chat.completions.create(
        model="tiny-gpt",
        messages=question("What is my name?"),
        max_tokens=3,
        extra_body={"session_id": session_id},
    )
    assert second.meshgate["session_id"] == session_id
    assert second.meshgate["session_version"] > first.meshgate["session_version"]
    # The earlier turn is part of the prompt the model saw.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


async def test_models_lists_what_the_tenant_may_use(async_client, base_url):
    models = await async_client.models.list()
    assert {model.id for model in models.data} == {"tiny-gpt", "other", "rated-model", "minilm"}
    async with openai.AsyncOpenAI(base_url=base_url, api_key=NARROW_KEY, max_retries=0) as narrow:
        assert [model.id for model in (await narrow.models.list()).data] == ["other"]


async def test_embeddings_float_and_base64(async_client):
    # The SDK asks for base64 by default and decodes it.
    result = await async_client.embeddings.create(model="minilm", input=["a cat", "a dog", "a car"])
    vectors = np.array([item.embedding for item in result.data])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    floats = await async_client.embeddings.create(model="minilm", input="a cat", encoding_format="float")
    assert np.allclose(floats.data[0].embedding, vectors[0], atol=1e-6)


async def test_embeddings_pass_the_tenants_limits_and_are_billed_in_the_ledger(edge):
    base_url, router_address = edge
    async with openai.AsyncOpenAI(base_url=base_url, api_key=EMBED_LIMITED_KEY, max_retries=0) as limited:
        for left in reversed(range(LIMITED_RPM)):
            raw = await limited.embeddings.with_raw_response.create(model="minilm", input=["a cat", "a dog"])
            result = raw.parse()
            # [CLS] a cat [SEP], twice: the tokens the model read.
            assert (result.usage.prompt_tokens, result.usage.total_tokens) == (8, 8)
            # What the minute has left, as for a chat completion.
            assert raw.headers["x-ratelimit-limit-requests"] == str(LIMITED_RPM)
            assert raw.headers["x-ratelimit-remaining-requests"] == str(left)
        # Before, embeddings passed no limit: a tenant held to 2 requests a
        # minute embedded without bound, and none of it was billed.
        with pytest.raises(openai.RateLimitError) as refused:
            await limited.embeddings.create(model="minilm", input="a cat")
    assert refused.value.code == "RATE_LIMITED"
    auth = [("authorization", f"Bearer {EMBED_LIMITED_KEY}")]
    async with bounded_channel(router_address) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)

        async def billed():
            usage = await stub.GetUsage(router_pb.GetUsageRequest(), metadata=auth, timeout=10)
            rows = [row for row in usage.rows if row.model == "minilm"]
            return rows if rows and rows[0].requests == LIMITED_RPM else None

        (row,) = await eventually(billed)
    assert (row.prompt_tokens, row.completion_tokens, row.failures) == (16, 0, 0)


async def test_an_embedding_request_hung_up_on_is_billed_what_it_reserved(edge, inference_address):
    """A client that hangs up while the model reads its texts pays for them,
    as a chat turn hung up on pays its prompt: billed nothing, every
    embedding could be had by hanging up just before the answer."""
    base_url, router_address = edge
    tag = uuid.uuid4().hex
    # Texts of over 256 bytes each (each reserves the 256 tokens the model
    # reads at most): a batch keeps minilm busy for a second or more.
    texts = [f"{tag} {index}: " + " ".join(f"word{index}x{n}" for n in range(80)) for index in range(16)]
    headers = {"authorization": f"Bearer {EMBED_HANGUP_KEY}"}
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=60) as http,
        router_channel(inference_address, "inference") as inference_channel,
    ):
        inference = inference_service_pb2_grpc.InferenceServiceStub(inference_channel)

        async def in_triton():
            health = await inference.GetBackendHealth(inference_pb.GetBackendHealthRequest(), timeout=10)
            return any(backend.in_flight for backend in health.backends)

        request = asyncio.ensure_future(
            http.post("/embeddings", json={"model": "minilm", "input": texts}, headers=headers)
        )
        await eventually(in_triton)
        request.cancel()  # closes the connection: the edge cancels the request
        with pytest.raises(asyncio.CancelledError):
            await request
    async with bounded_channel(router_address) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)

        async def billed():
            usage = await stub.GetUsage(
                router_pb.GetUsageRequest(), metadata=list(headers.items()), timeout=10
            )
            return [row for row in usage.rows if row.model == "minilm"]

        (row,) = await eventually(billed)
    assert (row.requests, row.failures) == (1, 1)
    assert row.prompt_tokens == 16 * 256


async def test_a_stored_key_may_be_limited_to_the_embedding_model(redis_url, inference_address):
    """A bug hunt's finding: CreateKey took only chat aliases as a key's
    models and refused the embedding model NOT_FOUND ("no model alias
    'minilm' is configured"), so a stored key limited to some models could
    never embed, and none could be made for embeddings alone; a configured
    tenant's models may name it."""
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.admin_api_key_sha256 = [hash_api_key("edge-admin")]
    settings.router.http_listen = f"127.0.0.1:{free_port()}"
    embedding = settings.router.embedding_model
    async with running_router(settings) as address, bounded_channel(address) as channel:
        created = await admin_service_pb2_grpc.AdminServiceStub(channel).CreateKey(
            admin_pb.CreateKeyRequest(tenant_id=f"t-{uuid.uuid4().hex[:8]}", models=[embedding]),
            metadata=(("authorization", "Bearer edge-admin"),),
            timeout=10,
        )
        async with openai.AsyncOpenAI(
            base_url=f"http://{settings.router.http_listen}/v1", api_key=created.api_key, max_retries=0
        ) as holder:
            embedded = await holder.embeddings.create(model=embedding, input="a cat")
            listed = [model.id async for model in holder.models.list()]
            with pytest.raises(openai.PermissionDeniedError) as refused:
                await holder.chat.completions.create(model="tiny-gpt", messages=question("hi"), max_tokens=4)
    assert list(created.key.models) == [embedding]
    assert len(embedded.data[0].embedding) == 384
    assert listed == [embedding]
    assert refused.value.code == "MODEL_NOT_ALLOWED"


# --- errors --------------------------------------------------------------------


async def test_a_bad_key_is_401(base_url):
    async with openai.AsyncOpenAI(base_url=base_url, api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as raised:
            await wrong.chat.completions.create(model="tiny-gpt", messages=question("hi"))
    assert raised.value.status_code == 401
    assert raised.value.code == "API_KEY_INVALID"
    assert raised.value.type == "authentication_error"


async def test_an_unknown_model_is_404(async_client):
    with pytest.raises(openai.NotFoundError) as raised:
        await async_client.chat.completions.create(model="no-such-model", messages=question("hi"))
    assert raised.value.code == "MODEL_NOT_FOUND"
    assert raised.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        await async_client.embeddings.create(model="no-such-model", input="hi")


async def test_a_forbidden_model_is_403(base_url):
    async with openai.AsyncOpenAI(base_url=base_url, api_key=NARROW_KEY, max_retries=0) as narrow:
        with pytest.raises(openai.PermissionDeniedError) as raised:
            await narrow.chat.completions.create(model="tiny-gpt", messages=question("hi"), stream=True)
    assert raised.value.code == "MODEL_NOT_ALLOWED"


async def test_a_restricted_tenant_cannot_tell_an_existing_model_outside_its_list_from_a_missing_one(
    base_url,
):
    """AIP-211: the narrow tenant was refused 403 MODEL_NOT_ALLOWED for
    tiny-gpt and minilm, which exist, and 404 MODEL_NOT_FOUND for a name
    that does not, so it could probe which aliases exist (its model list
    hides them). Whatever it sends outside its list is answered alike, its
    own name echoed; a model retrieved is not found either way."""
    headers = {"authorization": f"Bearer {NARROW_KEY}"}

    def answer(response: httpx.Response, model: str) -> tuple[int, str]:
        return response.status_code, response.text.replace(model, "MODEL")

    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        for path, body, existing in [
            ("/chat/completions", {"messages": question("hi")}, "tiny-gpt"),
            ("/embeddings", {"input": "hi"}, "minilm"),
        ]:
            refused = await http.post(path, json={**body, "model": existing}, headers=headers)
            missing = await http.post(path, json={**body, "model": "no-such-model"}, headers=headers)
            assert answer(refused, existing) == answer(missing, "no-such-model")
            assert (refused.status_code, refused.json()["error"]["code"]) == (403, "MODEL_NOT_ALLOWED")
        retrieved = await http.get("/models/tiny-gpt", headers=headers)
        assert answer(retrieved, "tiny-gpt") == answer(
            await http.get("/models/no-such", headers=headers), "no-such"
        )
        assert retrieved.status_code == 404


async def test_a_request_larger_than_the_limit_itself_is_not_resent_by_the_sdk(base_url):
    """A 429 the SDKs would resend twice (after their backoff) for the same
    answer: the edge's x-should-retry: false keeps it to one request."""
    sent = []

    async def count(request: httpx.Request) -> None:
        sent.append(request.url.path)

    async with (
        httpx.AsyncClient(event_hooks={"request": [count]}) as http,
        openai.AsyncOpenAI(base_url=base_url, api_key=TINY_KEY, max_retries=2, http_client=http) as sdk,
    ):
        with pytest.raises(openai.RateLimitError) as refused:
            await sdk.chat.completions.create(model="tiny-gpt", messages=question("hi"), max_tokens=64)
    assert refused.value.code == "REQUEST_EXCEEDS_LIMIT"
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert sent == ["/v1/chat/completions"]


@pytest.mark.parametrize(
    ("fields", "reason", "param"),
    [
        ({"max_tokens": 0}, "INVALID_MAX_TOKENS", "max_tokens"),
        ({"max_tokens": 10_000}, "MAX_TOKENS_TOO_LARGE", "max_tokens"),
        ({"temperature": -1}, "INVALID_TEMPERATURE", "temperature"),
        ({"messages": []}, "EMPTY_MESSAGES", "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "INVALID_ROLE", "messages"),
        ({"n": 2}, "UNSUPPORTED_PARAMETER", "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "UNSUPPORTED_PARAMETER", "tools"),
        # Without tools there is nothing to call: "auto" and "required" cannot be served.
        ({"tool_choice": "required"}, "UNSUPPORTED_PARAMETER", "tool_choice"),
        ({"modalities": ["text", "audio"]}, "UNSUPPORTED_PARAMETER", "modalities"),
        # OpenAI refuses it without tools, and a field it does not know.
        ({"parallel_tool_calls": False}, "UNSUPPORTED_PARAMETER", "parallel_tool_calls"),
        ({"extra_body": {"top_k": 40}}, "UNSUPPORTED_PARAMETER", "top_k"),
        ({"max_tokens": "many"}, "MALFORMED_REQUEST", "max_tokens"),
        # The refusal names the field the caller sent, not the one the pipeline checks.
        ({"max_completion_tokens": 0}, "INVALID_MAX_TOKENS", "max_completion_tokens"),
        # A string is no boolean: "true" was served as a non-streamed answer.
        ({"extra_body": {"stream": "true"}}, "MALFORMED_REQUEST", "stream"),
        # Without stream, OpenAI refuses stream_options rather than ignore them.
        ({"stream_options": {"include_usage": True}}, "MALFORMED_REQUEST", "stream_options"),
    ],
)
async def test_invalid_parameters_are_400(async_client, fields, reason, param):
    request = {"model": "tiny-gpt", "messages": question("hi"), **fields}
    with pytest.raises(openai.BadRequestError) as raised:
        await async_client.chat.completions.create(**request)
    assert raised.value.code == reason
    assert raised.value.param == param
    assert raised.value.type == "invalid_request_error"


@pytest.mark.parametrize(
    "fields",
    [
        {"modalities": ["text"]},
        {"modalities": None},
        {"tool_choice": "none"},
        {"tool_choice": None},
        {"tools": [], "tool_choice": "none"},
        {"function_call": "none"},
        {"user": "u-1", "metadata": {"purpose": "test"}, "store": False, "service_tier": "auto"},
    ],
    ids=[
        "text",
        "null modalities",
        "no tool calls",
        "null tool_choice",
        "no tools",
        "no function call",
        "informational",
    ],
)
async def test_fields_that_ask_for_what_the_mesh_does_anyway_are_served(base_url, fields):
    """SDKs and proxies send these: refused, they failed requests that ask
    for nothing the mesh does not do."""
    body = {"model": "tiny-gpt", "messages": question(unique("harmless")), "max_tokens": 2, **fields}
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=60) as http:
        answer = await http.post("/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["role"] == "assistant"


async def test_a_limit_is_429_with_retry_after(base_url):
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        headers = {"authorization": f"Bearer {LIMITED_KEY}"}
        body = {"model": "tiny-gpt", "messages": question("hi"), "max_tokens": 1}
        admitted = []
        for _ in range(LIMITED_RPM):
            answer = await http.post("/chat/completions", json=body, headers=headers)
            assert answer.status_code == 200
            admitted.append(answer.headers)
        refused = await http.post("/chat/completions", json=dict(body, stream=True), headers=headers)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["error"]["code"] == "RATE_LIMITED"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    # OpenAI's rate-limit headers: each answer says what is left of the minute.
    assert [h["x-ratelimit-limit-requests"] for h in admitted] == [str(LIMITED_RPM)] * LIMITED_RPM
    assert [int(h["x-ratelimit-remaining-requests"]) for h in admitted] == list(range(LIMITED_RPM))[::-1]
    assert all(0 < reset_s(h["x-ratelimit-reset-requests"]) <= 60 for h in admitted)
    assert "x-ratelimit-limit-tokens" not in admitted[0]  # no token window set
    assert refused.headers["x-ratelimit-limit-requests"] == str(LIMITED_RPM)
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert 0 < reset_s(refused.headers["x-ratelimit-reset-requests"]) <= 60


async def test_a_session_turns_headers_count_its_history(base_url):
    """A session turn's reservation grows by its history once assembled
    (the prompt's top-up): its headers said the window as admitted, before
    the growth (a review: 2,583 told left where ~1,600 were; a turn sized by
    them was refused). A turn sized by what they say now is admitted."""
    history = " ".join(f"word{i}" for i in range(150))  # ~1,000 bytes
    body = {"model": "tiny-gpt", "max_tokens": 2}
    headers = {"authorization": f"Bearer {SESSION_RATED_KEY}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as http:
        first = await http.post(
            "/chat/completions", json=dict(body, messages=question(history), session_id="new")
        )
        assert first.status_code == 200, first.text
        session_id = first.json()["meshgate"]["session_id"]
        again = dict(body, messages=question("hi"), session_id=session_id)
        second = await http.post("/chat/completions", json=again)
        assert second.status_code == 200, second.text
        told = int(second.headers["x-ratelimit-remaining-tokens"])
        # The window holds the first turn's use at least (its reservation
        # until it settles), and the second's reservation, its history's
        # bytes at least.
        used_first = first.json()["usage"]["total_tokens"]
        assert told <= SESSION_RATED_TPM - used_first - len(history), (told, used_first)
        sized = await http.post(
            "/chat/completions", json=dict(body, messages=question("x" * (told - 40)), max_tokens=20)
        )
    assert sized.status_code == 200, sized.text


def reset_s(duration: str) -> float:
    """Seconds of an x-ratelimit-reset-* value ("250ms", "1.5s", "1m0s")."""
    match = re.fullmatch(r"(?:(\d+)m)?(?:([\d.]+)s)?|(\d+)ms", duration)
    assert match, duration
    minutes, seconds, ms = match.groups()
    return int(ms) / 1000 if ms else int(minutes or 0) * 60 + float(seconds or 0)


async def test_rate_limit_headers_name_the_tightest_window_of_each_kind(base_url):
    """Of a turn's scopes (tenant, key, model), each header set names the
    window with the least left: the model alias's 5 requests a minute under
    the tenant's 50; the tokens, the tenant's, less what each turn reserves.
    Streamed or not, the same headers; a tenant with no limit gets none."""
    headers = {"authorization": f"Bearer {RATED_KEY}"}
    body = {"model": "rated-model", "messages": question(unique("rated")), "max_tokens": 4}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as http:
        whole = await http.post("/chat/completions", json=body)
        streamed = await http.post("/chat/completions", json=dict(body, stream=True))
        on_tiny = await http.post("/chat/completions", json=dict(body, model="tiny-gpt"))
        unlimited = await http.post("/chat/completions", json=dict(body, model="tiny-gpt"), headers=AUTH)
    rated = (whole, streamed, on_tiny)
    for answer in (*rated, unlimited):
        assert answer.status_code == 200, answer.text
    requests = [
        (answer.headers["x-ratelimit-limit-requests"], answer.headers["x-ratelimit-remaining-requests"])
        for answer in rated
    ]
    # On tiny-gpt no model alias's window applies: the tenant's 50, three used.
    assert requests == [("5", "4"), ("5", "3"), ("50", "47")]
    assert all(a.headers["x-ratelimit-limit-tokens"] == str(RATED_TPM) for a in rated)
    # Less this turn's reservation, its prompt's estimate and max_tokens (an
    # earlier turn's may be settled to its use by then: no order between them).
    assert all(RATED_TPM - int(a.headers["x-ratelimit-remaining-tokens"]) >= 4 for a in rated)
    assert all(0 < reset_s(a.headers["x-ratelimit-reset-tokens"]) <= 60 for a in rated)
    assert not any(name.startswith("x-ratelimit-") for name in unlimited.headers)


async def test_a_grpc_completion_says_the_windows_the_headers_say(edge):
    """Chat and ChatSession turns carry on their completion what an HTTP
    answer's x-ratelimit-* headers say: each limited kind's tightest
    window, what it holds after the turn, and when it next frees. A tenant
    with no limit gets none; the turn past the minute is refused, saying
    what its window holds."""
    _, router_address = edge
    auth = [("authorization", f"Bearer {GRPC_RATED_KEY}")]
    kinds = (router_pb.RATE_LIMIT_KIND_REQUESTS_PER_MINUTE, router_pb.RATE_LIMIT_KIND_TOKENS_PER_MINUTE)

    def turn():
        return router_pb.ChatRequest(
            model="tiny-gpt",
            messages=[common_pb.Message(role=common_pb.ROLE_USER, content=unique("windows"))],
            parameters=common_pb.GenerationParameters(max_tokens=4),
        )

    async def completion_of(call):
        return [response async for response in call][-1].completion

    async with bounded_channel(router_address) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        completions = [await completion_of(stub.Chat(turn(), metadata=auth, timeout=60)) for _ in range(2)]
        session = stub.ChatSession(metadata=auth, timeout=60)
        await session.initial_metadata()
        chat = turn()
        await session.write(
            router_pb.ChatSessionRequest(model=chat.model, messages=chat.messages, parameters=chat.parameters)
        )
        while not (response := await session.read()).HasField("completion"):
            assert response.HasField("delta"), response
        completions.append(response.completion)
        await session.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await completion_of(stub.Chat(turn(), metadata=auth, timeout=60))
        unlimited = await completion_of(stub.Chat(turn(), metadata=list(AUTH.items()), timeout=60))
    for left, completion in zip(reversed(range(GRPC_RATED_RPM)), completions, strict=True):
        requests, tokens = completion.rate_limits
        assert (requests.kind, tokens.kind) == kinds
        assert (requests.limit, requests.remaining) == (GRPC_RATED_RPM, left)
        # Less this turn's reservation at least: its prompt's estimate and max_tokens.
        assert tokens.limit == RATED_TPM and tokens.remaining <= RATED_TPM - 4
        assert all(0 < window.reset_ms <= 60_000 for window in (requests, tokens))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(refused.value)
    assert (info.metadata["limit"], info.metadata["limit_remaining"]) == ("requests_per_minute", "0")
    assert not unlimited.rate_limits


async def test_bodies_parsed_off_the_loop_are_answered_through_the_mesh(base_url):
    """A chat body and an embeddings body past the inline bound (whitespace
    after the object: valid JSON) go through the router's body parser child
    and are answered as the same bodies without the padding."""
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    pad = b" " * (body_parser.INLINE_MAX_BYTES + 1)
    chat = json.dumps({"model": "tiny-gpt", "messages": question("hi"), "max_tokens": 2, "seed": 7}).encode()
    embed = json.dumps({"model": "minilm", "input": ["a cat", "a dog"]}).encode()
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        answers = {}
        for name, path, body in (("chat", "/chat/completions", chat), ("embed", "/embeddings", embed)):
            answers[name] = [
                await http.post(path, content=raw, headers=headers) for raw in (body, body + pad)
            ]
    for name, (plain, padded) in answers.items():
        assert (plain.status_code, padded.status_code) == (200, 200), (name, padded.text)
    chat_plain, chat_padded = (a.json()["choices"][0]["message"]["content"] for a in answers["chat"])
    assert chat_padded == chat_plain
    assert answers["embed"][1].json()["data"] == answers["embed"][0].json()["data"]


async def test_malformed_bodies_and_paths(base_url):
    headers = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        not_json = await http.post("/chat/completions", content=b"{not json", headers=headers)
        assert not_json.status_code == 400
        assert not_json.json()["error"]["code"] == "MALFORMED_REQUEST"
        array = await http.post("/chat/completions", json=[1, 2], headers=headers)
        assert array.status_code == 400
        assert (await http.get("/nothing-here", headers=headers)).status_code == 404
        wrong_method = await http.get("/chat/completions", headers=headers)
        # RFC 9110: a 405 says which method the resource takes.
        assert (wrong_method.status_code, wrong_method.headers.get("allow")) == (405, "POST")
        # POST does not read a GET resource, nor HEAD a POST one.
        posted_to_models = await http.post("/models", json={}, headers=headers)
        assert (posted_to_models.status_code, posted_to_models.headers.get("allow")) == (405, "GET, HEAD")
        head_of_chat = await http.head("/chat/completions", headers=headers)
        assert (head_of_chat.status_code, head_of_chat.headers.get("allow")) == (405, "POST")
        missing = await http.get("/models")
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "API_KEY_MISSING"
        # metadata is always an object, {} when the error has none.
        assert missing.json()["error"]["metadata"] == {}


# --- what the edge sends back, and how it reads what it is sent -----------------------------


# Bodies that failed with a 500 and a traceback before they were checked:
# JSON's \ud800 escape reads as a lone surrogate, which protobuf cannot
# take; json.loads refuses an int of over 4,300 digits with ValueError;
# float() overflows on one of 400.
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/chat/completions",
            b'{"model":"tiny-gpt","messages":[{"role":"user","content":"hi \\ud800"}]}',
            "messages",
        ),
        ("/chat/completions", b'{"model":"\\udc00","messages":[{"role":"user","content":"hi"}]}', "model"),
        (
            "/chat/completions",
            b'{"model":"tiny-gpt","messages":[{"role":"user","content":"hi"}],"stop":"\\ud800"}',
            "stop",
        ),
        (
            "/chat/completions",
            b'{"model":"tiny-gpt","messages":[{"role":["user"],"content":"hi"}]}',
            "messages",
        ),
        ("/chat/completions", b'{"model":"tiny-gpt","messages":[],"cache_policy":["use"]}', "cache_policy"),
        (
            "/chat/completions",
            b'{"model":"tiny-gpt","messages":[],"temperature":' + b"1" * 400 + b"}",
            "temperature",
        ),
        ("/chat/completions", b'{"model":"tiny-gpt","messages":[],"max_tokens":' + b"1" * 5000 + b"}", ""),
        ("/embeddings", b'{"model":"minilm","input":"a \\ud800"}', "input"),
        ("/embeddings", b'{"model":"\\ud800","input":"a cat"}', "model"),
    ],
    ids=[
        "surrogate content",
        "surrogate model",
        "surrogate stop",
        "role array",
        "cache_policy array",
        "temperature of 400 digits",
        "integer of 5000 digits",
        "surrogate embeddings input",
        "surrogate embeddings model",
    ],
)
async def test_bodies_python_or_protobuf_cannot_take_are_400_about_their_field(base_url, path, body, param):
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=60) as http:
        answer = await http.post(path, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] in ("MALFORMED_REQUEST", "INVALID_ROLE", "INVALID_CACHE_POLICY")
    assert (error["param"] or "") == param


async def test_null_n_session_id_and_cache_policy_are_their_defaults(base_url):
    # OpenAI's n is "integer or null"; SDKs and proxies send explicit nulls.
    body = {
        "model": "tiny-gpt",
        "messages": question(unique("nulls")),
        "max_tokens": 2,
        "n": None,
        "session_id": None,
        "cache_policy": None,
    }
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=60) as http:
        answer = await http.post("/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["meshgate"]["session_id"] == ""


async def test_a_stream_in_one_piece_says_who_speaks_on_its_first_chunk(async_client):
    """max_tokens=1, and then the same question from the cache, each come
    whole on the completion: the role went after the content."""
    messages = question(unique("one piece"))
    for expected_cache in ("miss", "exact_hit"):
        stream = await async_client.chat.completions.create(
            model="tiny-gpt", messages=messages, max_tokens=1, temperature=0, stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[0].choices[0].delta.content
        assert [chunk.choices[0].delta.role for chunk in chunks[1:]] == [None] * (len(chunks) - 1)
        assert chunks[-1].meshgate["cache_status"] == expected_cache


async def test_an_error_does_not_echo_a_huge_input_whole(base_url):
    """A 1 MB model name made a 2 MB 404; the body is clipped as the gRPC
    status is (512 characters of message, 128 of each metadata value)."""
    name = "m" * 1_000_000
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=60) as http:
        for path, body in (
            ("/chat/completions", {"model": name, "messages": question("hi")}),
            ("/embeddings", {"model": name, "input": "hi"}),
        ):
            answer = await http.post(path, json=body)
            assert answer.status_code == 404, answer.text[:300]
            assert len(answer.content) < 2048
            assert answer.json()["error"]["code"] == "MODEL_NOT_FOUND"


async def test_the_callers_traceparent_is_continued(base_url):
    """The request's spans join the caller's W3C trace, as on the gRPC port.
    (No tracer is installed here: the API's no-op spans still carry the
    parent's trace id, which the answer reports.)"""
    trace_id = uuid.uuid4().hex
    headers = {**AUTH, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    body = {"model": "tiny-gpt", "messages": question(unique("traced")), "max_tokens": 2}
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        answer = await http.post("/chat/completions", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["meshgate"]["trace_id"] == trace_id


async def test_one_model_is_retrieved_as_its_entry_in_the_list(async_client, base_url):
    listed = {model.id: model for model in (await async_client.models.list()).data}
    for model_id in ("tiny-gpt", "minilm"):
        assert await async_client.models.retrieve(model_id) == listed[model_id]
    with pytest.raises(openai.NotFoundError) as raised:
        await async_client.models.retrieve("no-such-model")
    assert (raised.value.code, raised.value.param) == ("MODEL_NOT_FOUND", "model")
    # A model the tenant may not use is not found either, as in its list.
    async with openai.AsyncOpenAI(base_url=base_url, api_key=NARROW_KEY, max_retries=0) as narrow:
        assert (await narrow.models.retrieve("other")).id == "other"
        with pytest.raises(openai.NotFoundError):
            await narrow.models.retrieve("tiny-gpt")


@pytest.mark.parametrize("path", ["/models", "/models/tiny-gpt", "/models/no-such-model"])
async def test_head_is_answered_as_get_without_a_body(base_url, path):
    """HEAD (link checkers, load balancers' probes, curl -I) was a 405."""
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=60) as http:
        got = await http.get(path)
        head = await http.head(path)
        without_key = await http.head(path, headers={"authorization": ""})
    assert (head.status_code, head.headers["content-type"]) == (got.status_code, got.headers["content-type"])
    assert (head.content, bool(got.content)) == (b"", True)
    # The length its GET's body has (RFC 9110 §9.3.2): a HEAD answer had none.
    assert head.headers.get("content-length") == got.headers["content-length"] == str(len(got.content))
    assert head.headers["x-request-id"]
    # Then the same connection's next request: the HEAD answer's framing held.
    assert without_key.status_code == 401


async def test_a_bearer_without_a_key_is_a_missing_key_and_a_401_names_the_scheme(base_url):
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        for authorization in (None, "Bearer"):
            headers = {} if authorization is None else {"authorization": authorization}
            refused = await http.get("/models", headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "API_KEY_MISSING"
            assert refused.headers["www-authenticate"] == "Bearer"


async def test_every_answer_has_a_request_id_and_a_completion_is_named_by_it(base_url):
    body = {"model": "tiny-gpt", "messages": question(unique("request id")), "max_tokens": 2}
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=60) as http:
        answered = await http.post("/chat/completions", json=body)
        refused = await http.post("/chat/completions", json={"model": "tiny-gpt"})
        again = await http.post("/chat/completions", json=body)
    ids = [response.headers["x-request-id"] for response in (answered, refused, again)]
    assert len(set(ids)) == 3 and all(ids)
    assert answered.json()["id"] == f"chatcmpl-{ids[0]}"


async def test_the_http_edge_listens_on_ipv6_and_on_both_families_for_the_any_address(
    redis_url, inference_address
):
    """router.http_listen takes an IPv6 host as gRPC's listen does ("[::]:port"):
    it was bound as IPv4 and the router failed to start."""
    settings = service_settings(redis_url, inference_address, KEY)
    port = free_port()
    settings.router.http_listen = f"[::]:{port}"
    async with running_router(settings):
        for host in ("[::1]", "127.0.0.1"):
            async with httpx.AsyncClient(
                base_url=f"http://{host}:{port}/v1", headers=AUTH, timeout=60
            ) as http:
                assert (await http.get("/models")).status_code == 200


def test_the_http_edge_binds_an_ipv4_mapped_ipv6_host_the_settings_accept():
    """'[::ffff:127.0.0.1]:0' loads, and gRPC and the metrics endpoint bind
    it; the edge's IPv6-only socket refused it (EINVAL: a review)."""
    with http_edge._listening_socket("[::ffff:127.0.0.1]:0") as listening:
        port = listening.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass


# --- raw SSE framing and disconnects ---------------------------------------------


async def test_raw_sse_framing(base_url):
    body = {
        "model": "tiny-gpt",
        "messages": question(unique("raw framing")),
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=60) as http,
        http.stream("POST", "/chat/completions", json=body, headers=AUTH) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join([chunk async for chunk in response.aiter_raw()]).decode()
    assert raw.endswith("\n\ndata: [DONE]\n\n")
    events = raw.split("\n\n")
    assert events[-1] == ""
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: "), event
        assert "\n" not in event  # one data line per event
        payloads.append(event[len("data: ") :])
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    # With include_usage, OpenAI's chunks before the last say "usage": null
    # (clients that read chunk["usage"] fail on an absent key).
    assert all("usage" in chunk and chunk["usage"] is None for chunk in chunks[:-1])
    finish = chunks[-2]
    assert finish["choices"][0]["finish_reason"] in ("stop", "length")
    assert finish["meshgate"]["cache_status"] == "miss"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


async def test_a_client_that_disconnects_cancels_the_generation(base_url, triton_server):
    _, log_path = triton_server
    before = triton_cancellations(log_path)
    body = {
        "model": "tiny-gpt",
        "messages": question(unique("Write a long essay")),
        "max_tokens": 256,
        "stream": True,
    }
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=60) as http,
        http.stream("POST", "/chat/completions", json=body, headers=AUTH) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break  # the first piece arrived: hang up mid-generation
    await until_triton_cancels(log_path, before, timeout_s=10)


async def test_each_request_is_counted_against_the_tenants_call_cap_only_while_it_runs(
    redis_url, inference_address
):
    """Through uvicorn, each request in a task of its own: with a cap of one
    call in flight, requests one after another all pass (each counted out as
    it ends), and while one request's body is still coming (counted from its
    headers: the key is checked first) another is refused 429."""
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.max_concurrent_rpcs_per_tenant = 1
    settings.router.http_listen = f"127.0.0.1:{free_port()}"
    release = asyncio.Event()

    async def slow_body():
        yield b'{"model": "tiny-gpt", '
        await release.wait()
        yield json.dumps({"messages": question(unique("count me")), "max_tokens": 4}).encode()[1:]

    async with running_router(settings):
        base = f"http://{settings.router.http_listen}/v1"
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=60) as http:
            for _ in range(10):
                assert (await http.get("/models")).status_code == 200
            held = asyncio.ensure_future(http.post("/chat/completions", content=slow_body()))
            # Its headers first (on the pooled connection, while the probes
            # below open another): a probe in flight when they come would be
            # the one call, and the held request refused instead.
            await asyncio.sleep(0.2)
            for _ in range(200):  # until the held request's headers are in
                assert not held.done(), (await held).text  # it was the one refused
                refused = await http.get("/models")
                if refused.status_code != 200:
                    break
                await asyncio.sleep(0.01)
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "TOO_MANY_CALLS_IN_FLIGHT"
            release.set()
            answer = await held
            assert answer.status_code == 200, answer.text
            assert (await http.get("/models")).status_code == 200


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response off a raw connection: its status, headers
    (lower-case names) and body (chunked or of a Content-Length)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.split("\r\n")[:-2]
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines)}
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readexactly(2)  # the empty chunk's line end
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def raw_request(method: str, path: str, body: bytes = b"", key: str = KEY) -> bytes:
    """A keep-alive HTTP/1.1 request with ``key`` (the test key), as bytes."""
    head = f"{method} /v1{path} HTTP/1.1\r\nhost: edge\r\nauthorization: Bearer {key}\r\n"
    if body:
        head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


@pytest.fixture
async def capped_at_one(redis_url, inference_address):
    """A router whose tenant may have one call in flight and whose HTTP
    bodies must arrive within half a second; yields its HTTP (host, port)."""
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.max_concurrent_rpcs_per_tenant = 1
    settings.router.http_body_timeout_s = 0.5
    settings.router.http_listen = f"127.0.0.1:{free_port()}"
    async with running_router(settings):
        host, _, port = settings.router.http_listen.rpartition(":")
        yield host, int(port)


@pytest.mark.serial  # timing-sensitive: make test runs it alone
@pytest.mark.parametrize("sent", ["half the body", "no body"])
async def test_a_stalled_body_is_answered_408_its_connection_closed_and_its_place_freed(capped_at_one, sent):
    host, port = capped_at_one
    body = json.dumps({"model": "tiny-gpt", "messages": question(unique("stall")), "max_tokens": 4}).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        # The headers and half the body, or the headers alone, then nothing.
        writer.write(
            raw_request("POST", "/chat/completions", body)[
                : -(len(body) // 2 if sent == "half the body" else len(body))
            ]
        )
        await writer.drain()
        stalled_at = asyncio.get_running_loop().time()
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}/v1", headers=AUTH, timeout=60) as http:
            for _ in range(100):  # until the stalled request's headers are in: it holds the one place
                refused = await http.get("/models")
                if refused.status_code != 200:
                    break
                await asyncio.sleep(0.01)
            assert refused.status_code == 429, refused.text
            status, headers, answer = await asyncio.wait_for(read_response(reader), 10)
            assert status == 408, answer
            assert json.loads(answer)["error"]["code"] == "REQUEST_BODY_TIMEOUT"
            assert headers.get("connection") == "close"
            # Closed by the router with the answer: not kept until
            # uvicorn's keep-alive timeout (5 s).
            assert await asyncio.wait_for(reader.read(), 2) == b""
            assert asyncio.get_running_loop().time() - stalled_at < 3
            assert (await http.get("/models")).status_code == 200
    finally:
        writer.close()


async def test_requests_pipelined_on_one_connection_all_pass_at_a_cap_of_one(capped_at_one):
    """uvicorn starts each pipelined request as the one before it is
    answered, while a chat's task still settles its turn."""
    host, port = capped_at_one
    streamed = {"model": "tiny-gpt", "messages": question(unique("piped")), "max_tokens": 4, "stream": True}
    whole = {"model": "tiny-gpt", "messages": question(unique("piped")), "max_tokens": 4}
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            raw_request("POST", "/chat/completions", json.dumps(streamed).encode())
            + raw_request("GET", "/models")
            + raw_request("POST", "/chat/completions", json.dumps(whole).encode())
            + raw_request("GET", "/models")
        )
        await writer.drain()
        answers = [await asyncio.wait_for(read_response(reader), 30) for _ in range(4)]
    finally:
        writer.close()
    assert [status for status, _, _ in answers] == [200] * 4, [body for _, _, body in answers]
    assert answers[0][2].endswith(b"data: [DONE]\n\n")
    assert json.loads(answers[2][2])["choices"][0]["finish_reason"] in ("stop", "length")
    assert json.loads(answers[3][2])["data"]


async def test_an_error_answer_frees_its_place_for_the_next_pipelined_request(capped_at_one):
    """A request refused after its place was taken (here: a body that is not
    JSON) gives the place back with its answer, as uvicorn starts the
    connection's next request, not only when its task ends."""
    host, port = capped_at_one
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw_request("POST", "/chat/completions", b"{not json") + raw_request("GET", "/models"))
        await writer.drain()
        answers = [await asyncio.wait_for(read_response(reader), 30) for _ in range(2)]
    finally:
        writer.close()
    assert [status for status, _, _ in answers] == [400, 200], [body for _, _, body in answers]


HEADER_TIMEOUT_S = 0.5
MAX_HEADER_BYTES = 4096


@pytest.fixture(scope="module")
async def header_bounded(redis_url, inference_address):
    """A router whose HTTP headers must arrive within half a second and
    take at most 4 KiB, and whose bodies have 5 s; yields its HTTP (host, port)."""
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.http_header_timeout_s = HEADER_TIMEOUT_S
    settings.router.http_max_header_bytes = MAX_HEADER_BYTES
    settings.router.http_body_timeout_s = 5
    settings.router.http_listen = f"127.0.0.1:{free_port()}"
    async with running_router(settings):
        host, _, port = settings.router.http_listen.rpartition(":")
        yield host, int(port)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> tuple[bytes, float]:
    """What the server sent until it closed the connection, and how long
    that took; fails if it is still open after ``seconds``."""
    started = asyncio.get_running_loop().time()
    sent = await asyncio.wait_for(reader.read(), seconds)
    return sent, asyncio.get_running_loop().time() - started


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /v1/models HTTP/1.1\r\nhost: edge\r\nauthoriz"],
    ids=["nothing", "half the headers"],
)
@pytest.mark.serial  # timing-sensitive: make test runs it alone
async def test_a_connection_whose_headers_do_not_come_is_closed_at_the_header_timeout(header_bounded, sent):
    reader, writer = await asyncio.open_connection(*header_bounded)
    try:
        writer.write(sent)
        await writer.drain()
        answer, waited = await closed_within(reader, 5)
    finally:
        writer.close()
    assert answer == b""
    assert HEADER_TIMEOUT_S - 0.1 < waited < 3


@pytest.mark.serial  # timing-sensitive: make test runs it alone
async def test_headers_dripped_a_byte_at_a_time_are_cut_at_the_header_timeout(header_bounded):
    """Each byte restarts uvicorn's keep-alive timer, never this deadline."""
    reader, writer = await asyncio.open_connection(*header_bounded)

    async def drip():
        for byte in raw_request("GET", "/models"):
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    dripping = asyncio.ensure_future(drip())
    try:
        answer, waited = await closed_within(reader, 5)
    finally:
        dripping.cancel()
        writer.close()
    assert answer == b""
    assert waited < 3


@pytest.mark.parametrize(
    ("request_bytes", "then"),
    [
        (raw_request("GET", "/models"), b"\r\n"),
        # Refused before its body is read: uvicorn reads and drops the rest.
        (b"POST /v1/chat/completions HTTP/1.1\r\nhost: edge\r\ncontent-length: 10\r\n\r\n", b"x"),
    ],
    ids=["a blank line after an answer", "a body's first byte after a 401"],
)
@pytest.mark.serial  # timing-sensitive: make test runs it alone
async def test_bytes_after_an_answer_that_begin_no_request_are_bound_by_the_header_timeout(
    header_bounded, request_bytes, then
):
    """Each byte cancels uvicorn's keep-alive timer (5 s), and these start
    no request: without this deadline one byte held the connection for good."""
    reader, writer = await asyncio.open_connection(*header_bounded)
    try:
        writer.write(request_bytes)
        status, _, _ = await asyncio.wait_for(read_response(reader), 10)
        writer.write(then)
        await writer.drain()
        answer, waited = await closed_within(reader, 5)
    finally:
        writer.close()
    assert status in (200, 401) and answer == b""
    assert waited < 3


async def header_block_refusal(host_port, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(*host_port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(read_response(reader), 5)
        # Closed with the answer, before the header timeout could.
        assert await asyncio.wait_for(reader.read(), HEADER_TIMEOUT_S / 2) == b""
    finally:
        writer.close()
    return answer


@pytest.mark.parametrize("layout", ["many headers", "one long value"])
async def test_a_header_block_over_the_bound_is_answered_431_and_closed(header_bounded, layout):
    if layout == "many headers":
        extra = "".join(f"x-filler-{index}: {'v' * 40}\r\n" for index in range(100))
    else:
        extra = f"x-filler: {'v' * MAX_HEADER_BYTES}\r\n"
    request = raw_request("GET", "/models").replace(b"\r\n\r\n", f"\r\n{extra}\r\n".encode())
    status, headers, body = await header_block_refusal(header_bounded, request)
    assert status == 431, body
    assert headers["connection"] == "close" and "date" in headers
    # Written outside the app's responses, it still carries a request id.
    assert len(headers["x-request-id"]) == 32
    error = json.loads(body)["error"]
    assert (error["code"], error["metadata"]) == ("HEADERS_TOO_LARGE", {"limit": str(MAX_HEADER_BYTES)})


async def test_a_header_value_that_never_ends_is_refused_once_past_the_bound(header_bounded):
    """httptools holds a header value until it ends: one sent in pieces
    without end is refused once past the bound, not held to the timeout."""
    reader, writer = await asyncio.open_connection(*header_bounded)

    async def endless():
        writer.write(b"GET /v1/models HTTP/1.1\r\nx-endless: ")
        for _ in range(64):
            writer.write(b"v" * 16384)
            await asyncio.sleep(0.01)

    sending = asyncio.ensure_future(endless())
    try:
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
    finally:
        sending.cancel()
        writer.close()
    assert status == 431, body


async def test_a_chunked_bodys_endless_trailer_closes_the_connection_even_after_a_401(header_bounded):
    """uvicorn reads a body's rest after an early answer, and httptools
    holds a trailer's value until it ends."""
    reader, writer = await asyncio.open_connection(*header_bounded)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: edge\r\ntransfer-encoding: chunked\r\n\r\n"

    async def endless_trailer():
        writer.write(head + b"2\r\n{}\r\n0\r\nx-trailer: ")
        for _ in range(64):
            writer.write(b"v" * 16384)
            await asyncio.sleep(0.01)

    sending = asyncio.ensure_future(endless_trailer())
    try:
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
        assert status == 401, body
        rest, _ = await closed_within(reader, 5)
    finally:
        sending.cancel()
        writer.close()
    assert rest == b""


async def test_a_chunked_body_with_a_trailer_in_bounds_passes(header_bounded):
    request = {"model": "tiny-gpt", "messages": question(unique("chunked")), "max_tokens": 4}
    chat = json.dumps(request).encode()
    half = len(chat) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in (chat[:half], chat[half:]))
    reader, writer = await asyncio.open_connection(*header_bounded)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: edge\r\n"
            + f"authorization: Bearer {KEY}\r\ntransfer-encoding: chunked\r\n\r\n".encode()
            + chunks
            + b"0\r\nx-trailer: small\r\n\r\n"
        )
        status, _, answer = await asyncio.wait_for(read_response(reader), 30)
    finally:
        writer.close()
    assert status == 200, answer


@pytest.mark.serial  # timing-sensitive: make test runs it alone
async def test_requests_in_bounds_pass_one_by_one_after_idling_and_pipelined(header_bounded):
    reader, writer = await asyncio.open_connection(*header_bounded)
    try:
        writer.write(raw_request("GET", "/models"))
        assert (await asyncio.wait_for(read_response(reader), 10))[0] == 200
        # Idle between requests is uvicorn's keep-alive (5 s), not the header timeout.
        await asyncio.sleep(HEADER_TIMEOUT_S * 3)
        whole = {"model": "tiny-gpt", "messages": question(unique("bounded")), "max_tokens": 4}
        writer.write(raw_request("POST", "/chat/completions", json.dumps(whole).encode()))
        assert (await asyncio.wait_for(read_response(reader), 30))[0] == 200
        # Headers just under the bound pass.
        near_bound = raw_request("GET", "/models").replace(
            b"\r\n\r\n", f"\r\nx-filler: {'v' * (MAX_HEADER_BYTES - 200)}\r\n\r\n".encode()
        )
        chat = raw_request("POST", "/chat/completions", json.dumps(whole).encode())
        writer.write(near_bound + chat + near_bound)
        answers = [await asyncio.wait_for(read_response(reader), 30) for _ in range(3)]
    finally:
        writer.close()
    assert [status for status, _, _ in answers] == [200] * 3, [body for _, _, body in answers]


@pytest.mark.serial  # timing-sensitive: make test runs it alone
async def test_a_slow_body_is_bound_by_the_body_timeout_not_the_header_timeout(header_bounded):
    chat = {"model": "tiny-gpt", "messages": question(unique("slow body")), "max_tokens": 4}
    body = json.dumps(chat).encode()
    request = raw_request("POST", "/chat/completions", body)
    head = len(request) - len(body)
    reader, writer = await asyncio.open_connection(*header_bounded)
    started = asyncio.get_running_loop().time()
    try:
        writer.write(request[:head])
        for start in range(0, len(body), len(body) // 4 + 1):
            await asyncio.sleep(HEADER_TIMEOUT_S)
            writer.write(body[start : start + len(body) // 4 + 1])
        status, _, answer = await asyncio.wait_for(read_response(reader), 30)
    finally:
        writer.close()
    assert asyncio.get_running_loop().time() - started > HEADER_TIMEOUT_S * 3
    assert status == 200, answer


async def test_a_body_that_comes_after_its_key_expired_is_refused(redis_url, inference_address):
    """A bug hunt's finding, as for gRPC calls (tests/integration/test_router_keys.py):
    the key is checked from the headers, and the body may come up to
    router.http_body_timeout_s later; a key expired (or revoked) meanwhile
    was served."""
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.admin_api_key_sha256 = [hash_api_key("edge-admin")]
    settings.router.http_listen = f"127.0.0.1:{free_port()}"
    async with running_router(settings) as address, bounded_channel(address) as channel:
        create = admin_pb.CreateKeyRequest(tenant_id=f"t-{uuid.uuid4().hex[:8]}")
        create.expires_at.FromNanoseconds(int((time.time() + 1.0) * 1e9))
        created = await admin_service_pb2_grpc.AdminServiceStub(channel).CreateKey(
            create, metadata=(("authorization", "Bearer edge-admin"),), timeout=10
        )
        body = json.dumps({"model": "tiny-gpt", "messages": question(unique("late body")), "max_tokens": 4})
        request = raw_request("POST", "/chat/completions", body.encode(), key=created.api_key)
        host, _, port = settings.router.http_listen.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(request[:-10])
            await writer.drain()
            await asyncio.sleep(1.6)  # past the expiry and the key cache's half second
            writer.write(request[-10:])
            status, _, answer = await asyncio.wait_for(read_response(reader), 30)
        finally:
            writer.close()
    assert status == 401, answer
    assert json.loads(answer)["error"]["code"] == "API_KEY_EXPIRED", answer


async def test_a_session_turn_that_failed_as_it_was_stored_is_not_resent_by_the_sdk(
    redis_url, inference_address
):
    """A bug hunt's finding: a non-streamed session turn whose append failed
    ambiguously (the context service's Redis took it, its reply came after
    the router's downstream_timeout_s) was a 504 the openai SDK resent, and
    the resend stored the turn a second time (beside another answer). Once a
    turn begins to be stored, no answer invites a resend, as gRPC's Chat
    commits its call there."""
    redis_host, redis_port = redis_url.removeprefix("redis://").split("/")[0].rsplit(":", 1)
    assert redis_host == "127.0.0.1"
    context_redis = TcpProxy(int(redis_port))
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.downstream_timeout_s = 2.0
    settings.router.http_listen = f"127.0.0.1:{free_port()}"
    # The context service alone reaches Redis through the proxy.
    context_settings = copy.deepcopy(settings)
    context_settings.redis.url = f"redis://127.0.0.1:{await context_redis.start()}/0"
    sent = []

    async def count(request: httpx.Request) -> None:
        sent.append(request.url.path)

    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(context_redis.close)
        stack.callback(context_redis.release)
        settings.router.context_address = await stack.enter_async_context(
            running(context_app, "context", context_settings)
        )
        settings.router.cache_address = await stack.enter_async_context(running(cache_app, "cache", settings))
        await stack.enter_async_context(running(router_app, "router", settings))
        http = await stack.enter_async_context(httpx.AsyncClient(event_hooks={"request": [count]}))
        sdk = await stack.enter_async_context(
            openai.AsyncOpenAI(
                base_url=f"http://{settings.router.http_listen}/v1",
                api_key=KEY,
                max_retries=2,
                http_client=http,
            )
        )
        first = await sdk.chat.completions.create(
            model="tiny-gpt", messages=question("first"), max_tokens=2, extra_body={"session_id": "new"}
        )
        session_id = first.meshgate["session_id"]
        marker = unique("stored once")
        # Redis runs the append; its reply is held past the router's timeout.
        context_redis.hold_when_sent(marker.encode())
        sent.clear()
        with pytest.raises(openai.InternalServerError) as failed:
            await sdk.chat.completions.create(
                model="tiny-gpt",
                messages=question(marker),
                max_tokens=2,
                extra_body={"session_id": session_id},
            )
        context_redis.release()
        context = context_service_pb2_grpc.ContextServiceStub(
            await stack.enter_async_context(router_channel(settings.router.context_address, "context"))
        )
        session = await context.GetSession(
            context_pb.GetSessionRequest(tenant_id=DEV_TENANT_ID, session_id=session_id), timeout=10
        )
    assert (failed.value.status_code, failed.value.code) == (504, "DOWNSTREAM_FAILED")
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert sent == ["/v1/chat/completions"]
    # The first attempt's append landed: the turn is stored, once.
    assert [message.content for message in session.session.messages].count(marker) == 1


async def test_a_new_session_turn_that_fails_before_it_is_stored_leaves_no_session(
    redis_url, inference_address
):
    """A turn with session_id "new" whose generation failed (its model's one
    deployment is down) left the session it had created, empty, for
    context.session_ttl_s, and the openai SDK resends a 503: an empty session
    per try. Nothing was stored in it and only the router knew its id (no
    answer had named it): it is deleted, and the failure names none."""
    tenant = f"new-session-{uuid.uuid4().hex[:8]}"
    key = f"key-{tenant}"
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.tenants = [TenantSettings(id=tenant, api_key_sha256=[hash_api_key(key)])]
    dead = DeploymentSettings(name="dead", address="127.0.0.1:1", model="tiny-gpt")
    settings.models["nowhere"] = ModelSettings(deployments=[dead])
    settings.router.http_listen = f"127.0.0.1:{free_port()}"
    redis = redis_access.connect(redis_url)
    sent = []

    async def count(request: httpx.Request) -> None:
        sent.append(request.url.path)

    async def sessions() -> list[bytes]:
        return [name async for name in redis.scan_iter(match=session_store.key(tenant, "*", "meta"))]

    async def none_left() -> bool:
        return not await sessions()

    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(redis.aclose)
        await stack.enter_async_context(running_router(settings))
        http = await stack.enter_async_context(httpx.AsyncClient(event_hooks={"request": [count]}))
        sdk = await stack.enter_async_context(
            openai.AsyncOpenAI(
                base_url=f"http://{settings.router.http_listen}/v1",
                api_key=key,
                max_retries=2,
                http_client=http,
            )
        )
        failures = []
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as failed:
                await sdk.chat.completions.create(
                    model="nowhere",
                    messages=question("hello"),
                    max_tokens=2,
                    stream=stream,
                    extra_body={"session_id": "new"},
                )
            failures.append(failed.value)
        await eventually(none_left)
        # A turn that is stored keeps the session it created (and this
        # scan finds one).
        answered = await sdk.chat.completions.create(
            model="tiny-gpt", messages=question("hello"), max_tokens=2, extra_body={"session_id": "new"}
        )
        kept = await sessions()
    # The SDK sent each request three times (two resends of the 503).
    assert sent == ["/v1/chat/completions"] * 7
    for failure in failures:
        assert (failure.status_code, failure.code) == (503, "NO_DEPLOYMENT_AVAILABLE")
        assert "session_id" not in failure.body["metadata"]
    assert kept == [session_store.key(tenant, answered.meshgate["session_id"], "meta").encode()]


def _first_tokens(model: str, deployment: str) -> float:
    """How many turns' first token the router (in this process) has seen
    come from ``deployment``."""
    return sum(
        sample.value
        for family in metrics.router().time_to_first_token.collect()
        for sample in family.samples
        if sample.name.endswith("_count")
        and (sample.labels["model"], sample.labels["deployment"]) == (model, deployment)
    )


async def test_a_non_streamed_answer_cut_mid_generation_says_and_bills_nothing_delivered(
    redis_url, inference_address
):
    """A bug hunt's finding: a non-streamed turn whose inference stream broke
    after its first pieces (its deployment's connection dropped) answered a
    503 whose metadata said delivered_deltas=N, though the caller holds
    nothing (the edge keeps the pieces for the whole answer), and was billed
    those pieces as completion tokens (a failure's delivered bytes), beside
    its prompt; the openai SDK resends a 503, each try billed again. A
    non-streamed caller receives the answer whole or not at all: like a turn
    that failed before any output, it says and pays for none."""
    tenant = f"cut-{uuid.uuid4().hex[:8]}"
    key = f"key-{tenant}"
    deployment = f"cut-{uuid.uuid4().hex[:8]}"
    inference = TcpProxy(int(inference_address.rsplit(":", 1)[1]))
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.tenants = [TenantSettings(id=tenant, api_key_sha256=[hash_api_key(key)])]
    # The router's generations alone go through the proxy (not the cache's embeddings).
    serve_tiny_gpt(settings, f"127.0.0.1:{await inference.start()}", name=deployment)
    settings.models["tiny-gpt"].max_output_tokens = 480
    settings.router.prices = {
        "tiny-gpt": PriceSettings(prompt_usd_per_million=1.0, completion_usd_per_million=2.0)
    }
    settings.router.http_listen = f"127.0.0.1:{free_port()}"
    body = {
        "model": "tiny-gpt",
        "messages": question(unique("Write a long essay")),
        "max_tokens": 480,
        "temperature": 0,
        "cache_policy": "bypass",
    }
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(inference.close)
        address = await stack.enter_async_context(running_router(settings))
        router = router_service_pb2_grpc.RouterServiceStub(
            await stack.enter_async_context(bounded_channel(address))
        )
        http = await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"http://{settings.router.http_listen}/v1", timeout=60)
        )
        asked = asyncio.ensure_future(
            http.post("/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
        )
        # The first pieces reached the pipeline (the edge holds them): the
        # deployment's connection drops, as a server dying mid-answer.
        deadline = time.monotonic() + 30
        while not (_first_tokens("tiny-gpt", deployment) or asked.done()) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        await inference.close()
        response = await asked
        auth = (("authorization", f"Bearer {key}"),)

        async def recorded():
            usage = await router.GetUsage(router_pb.GetUsageRequest(), metadata=auth, timeout=10)
            return next((row for row in usage.rows if row.failures), None)

        row = await eventually(recorded)
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert (error["code"], error["metadata"]["code"]) == ("DOWNSTREAM_FAILED", "UNAVAILABLE")
    assert not any(name.startswith("delivered_") for name in error["metadata"]), error
    assert (row.requests, row.prompt_tokens, row.completion_tokens, row.cost_nano_usd) == (1, 0, 0, 0)


def _turns(outcome: str) -> float:
    """The router's turns of ``outcome`` so far (the router runs in this process)."""
    return sum(
        sample.value
        for family in metrics.router().turns.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["outcome"] == outcome
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answered_http_chat_turn_is_recorded_completed_not_cancelled(async_client, stream):
    completed, cancelled = _turns("completed"), _turns("cancelled")
    answer = await async_client.chat.completions.create(
        model="tiny-gpt", messages=question(unique("recorded")), max_tokens=4, stream=stream
    )
    if stream:
        async for _ in answer:
            pass
    # The turn is settled in the request's task, just after the answer went out.
    for _ in range(250):
        if _turns("completed") > completed:
            break
        await asyncio.sleep(0.02)
    assert (_turns("completed") - completed, _turns("cancelled") - cancelled) == (1, 0)


# The stall timeout the slow reader's router allows: its reads, 50 ms apart,
# must keep being acknowledged within it while the test's loop (the
# router's too) is busy.
STALL_TIMEOUT_S = 0.5
# The stopped reader's router cuts sooner: a tiny-gpt answer of 480 tokens
# took 0.88 s once on a busy machine, and a cut after it (at window shut +
# the timeout) finds nothing left to cancel.
STOPPED_STALL_TIMEOUT_S = 0.15
# A client socket's receive buffer: its window shuts after a few KiB unread.
SMALL_RECEIVE_BUFFER = 4096
# A tenant of its own, whose usage holds the stalled turn alone.
STALL_KEY = "http-edge-stall-key"


@contextlib.asynccontextmanager
async def stall_bounded_router(redis_url: str, inference_address: str, timeout_s: float):
    """A router that drops an HTTP client which acknowledges none of its
    bytes for ``timeout_s``, whose tenant may have one call in flight, and
    whose tiny-gpt answers run to 480 tokens (a generation of a second or
    so); yields its HTTP (host, port) and its gRPC address."""
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.tenants = [
        TenantSettings(id=f"stall-{uuid.uuid4().hex[:8]}", api_key_sha256=[hash_api_key(STALL_KEY)])
    ]
    settings.router.http_stalled_client_timeout_s = timeout_s
    settings.router.max_concurrent_rpcs_per_tenant = 1
    settings.models["tiny-gpt"].max_output_tokens = 480
    settings.router.http_listen = f"127.0.0.1:{free_port()}"
    async with running_router(settings) as router_address:
        host, _, port = settings.router.http_listen.rpartition(":")
        yield (host, int(port)), router_address


@pytest.fixture(scope="module")
async def stall_bounded(redis_url, inference_address):
    async with stall_bounded_router(redis_url, inference_address, STALL_TIMEOUT_S) as addresses:
        yield addresses


@pytest.fixture(scope="module")
async def stall_cut_soon(redis_url, inference_address):
    async with stall_bounded_router(redis_url, inference_address, STOPPED_STALL_TIMEOUT_S) as addresses:
        yield addresses


async def streaming_socket(host_port, text: str, key: str = KEY) -> socket.socket:
    """A raw connection with a small receive buffer that has sent a long
    streamed chat request (480 tokens, greedy, past the cache)."""
    loop = asyncio.get_running_loop()
    connection = socket.socket()
    # Set before connecting: the window the router sees is fixed then.
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RECEIVE_BUFFER)
    connection.setblocking(False)
    await loop.sock_connect(connection, host_port)
    body = {
        "model": "tiny-gpt",
        "messages": question(unique(text)),
        "max_tokens": 480,
        "temperature": 0,
        "stream": True,
        "cache_policy": "bypass",
    }
    request = raw_request("POST", "/chat/completions", json.dumps(body).encode(), key)
    await loop.sock_sendall(connection, request)
    return connection


@pytest.mark.serial  # timing-sensitive: make test runs it alone
async def test_a_client_that_stops_reading_is_dropped_and_its_generation_cancelled(
    stall_cut_soon, triton_server
):
    """No FIN, no RST: the client reads the answer's start, then nothing. Its
    receive window shuts, the router's bytes go unacknowledged, and the
    router drops it at its stall timeout: the generation is cancelled
    (recorded so, billed for what was generated), the tenant's one call
    place freed, though the answer would have gone on for 480 tokens."""
    _, log_path = triton_server
    loop = asyncio.get_running_loop()
    cancelled_in_triton, cancelled, completed = (
        triton_cancellations(log_path),
        *map(_turns, ("cancelled", "completed")),
    )
    host_port, router_address = stall_cut_soon
    connection = await streaming_socket(host_port, "Write a long essay", STALL_KEY)
    try:
        received = b""
        while b"data: " not in received:
            received += await asyncio.wait_for(loop.sock_recv(connection, 1024), 30)
        assert received.startswith(b"HTTP/1.1 200"), received
        stopped_at = loop.time()  # and reads nothing more
        await until_triton_cancels(log_path, cancelled_in_triton, timeout_s=10)
        assert loop.time() - stopped_at < STOPPED_STALL_TIMEOUT_S * 1.5 + 1
        for _ in range(250):
            if _turns("cancelled") > cancelled:
                break
            await asyncio.sleep(0.02)
        assert (_turns("cancelled") - cancelled, _turns("completed") - completed) == (1, 0)
        # The connection was dropped: what was sent before ends with no [DONE].
        rest = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := await asyncio.wait_for(loop.sock_recv(connection, 65536), 5):
                rest += chunk
        assert b"data: [DONE]" not in received + rest
    finally:
        connection.close()
    auth = {"authorization": f"Bearer {STALL_KEY}"}
    async with httpx.AsyncClient(base_url="http://{}:{}/v1".format(*host_port), headers=auth) as http:
        assert (await http.get("/models")).status_code == 200  # the one call place is free
    async with bounded_channel(router_address) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)

        async def billed():
            usage = await stub.GetUsage(router_pb.GetUsageRequest(), metadata=list(auth.items()), timeout=10)
            return [row for row in usage.rows if row.model == "tiny-gpt"]

        (row,) = await eventually(billed)
    # Ended early, as a turn whose caller hangs up: billed its prompt and
    # what was generated.
    assert (row.requests, row.failures) == (1, 1)
    assert row.prompt_tokens > 0 and row.completion_tokens > 0


@pytest.mark.serial  # timing-sensitive: make test runs it alone
async def test_a_client_that_reads_slowly_but_steadily_gets_its_whole_answer(stall_bounded):
    """At 10 KB/s, a quarter of the pace the answer is generated at, through
    the same small window: the router's bytes back up, but each read makes
    room for more, acknowledged within the stall timeout. (TCP_USER_TIMEOUT
    at the same timeout cut this client: the kernel counts its window, too
    small for the next queued segment, as shut.)"""
    loop = asyncio.get_running_loop()
    completed = _turns("completed")
    connection = await streaming_socket(stall_bounded[0], "Write a long essay, slowly read")
    received = b""
    try:
        started = loop.time()
        while not received.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
            chunk = await asyncio.wait_for(loop.sock_recv(connection, 512), 30)
            assert chunk, received[-200:]  # closed before the answer's end
            received += chunk
            await asyncio.sleep(0.05)
        took = loop.time() - started
    finally:
        connection.close()
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    assert received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), received[-200:]
    # Longer than the stall timeout several times over: it was slow throughout.
    assert took > STALL_TIMEOUT_S * 3, took
    for _ in range(250):
        if _turns("completed") > completed:
            break
        await asyncio.sleep(0.02)
    assert _turns("completed") - completed == 1
