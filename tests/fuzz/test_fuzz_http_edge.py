"""Property-based fuzzing of the router's OpenAI HTTP edge, over the real
mesh: JSON bodies near the OpenAI shape and far from it, raw bytes, any
header, streamed or not, each within a deadline.

The edge is the one surface apps reach directly, so whatever arrives: never
a 500, every error is OpenAI's error object (message, type, code), a 200
is a whole completion, and a stream ends with ``[DONE]`` or with an error
event, never cut short in silence.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.conftest import API_KEY, DEADLINE_S, FUZZ, MARGIN_S
from tests.fuzz.strategies import GARBAGE, TEXT

pytestmark = [pytest.mark.integration, pytest.mark.fuzz]

# Text with a lone surrogate: JSON's "\ud800" escape reads as one, a str
# with no UTF-8 form that protobuf refuses (st.text() never draws them).
SURROGATE_TEXT = st.builds(
    lambda before, surrogate, after: before + surrogate + after,
    st.text(max_size=8),
    st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"]),
    st.text(max_size=8),
)
# Integers past a double (float() overflows) yet under Python's 4,300 digits
# json.dumps writes; longer ones are in HUGE_INT_BODIES.
HUGE_INTS = st.sampled_from([10**400, -(10**400), 2**1100])
# Any JSON value, nested a little.
JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()  # NaN and infinities too: Python's json writes and reads them
    | st.text(max_size=20)
    | SURROGATE_TEXT
    | HUGE_INTS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
NUMBER = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([0, -1, 2**31, 2**63, 10**30, 1e308, 0.5, 2.5]),
    st.floats(),
    HUGE_INTS,
)
# Strings, and what is looked up as one: arrays and objects are unhashable.
ROLE = (
    st.sampled_from(["user", "system", "developer", "assistant", "tool", "function", "", "USER"])
    | st.text(max_size=10)
    | JUNK
)
CONTENT = st.one_of(
    TEXT,
    SURROGATE_TEXT,
    st.none(),
    st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio"]), "text": TEXT}),
        max_size=3,
    ),
    JUNK,
)
MESSAGE = (
    st.fixed_dictionaries(
        {"role": ROLE, "content": CONTENT},
        optional={
            "name": JUNK,
            "refusal": TEXT | SURROGATE_TEXT | JUNK,
            "audio": JUNK,
            "annotations": JUNK,
            "contnet": TEXT,
        },
    )
    | JUNK
)
FUZZY_CHAT = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["tiny-gpt", "tiny-gpt", "no-such-model"]) | SURROGATE_TEXT | JUNK,
        "messages": st.lists(MESSAGE, max_size=3) | JUNK,
    },
    optional={
        "max_tokens": NUMBER | JUNK,
        "max_completion_tokens": NUMBER,
        "temperature": NUMBER | JUNK,
        "top_p": NUMBER,
        "seed": NUMBER,
        "stop": st.text(max_size=70) | st.lists(st.text(max_size=70) | SURROGATE_TEXT, max_size=10) | JUNK,
        "stream": st.booleans() | JUNK,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | JUNK}) | JUNK,
        "n": NUMBER | st.none(),
        "tools": JUNK,
        "response_format": JUNK,
        "session_id": st.sampled_from(["", "new"]) | st.text(max_size=40) | JUNK,
        "cache_policy": st.sampled_from(["use", "bypass", "refresh"]) | JUNK,
        "user": JUNK,
    },
)
# Bodies an app would send, so the fuzzing also reaches generation,
# streaming and the cache behind validation.
PLAUSIBLE_CHAT = st.fixed_dictionaries(
    {
        "model": st.just("tiny-gpt"),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user"]), "content": st.text(min_size=1, max_size=60)}
            ),
            min_size=1,
            max_size=2,
        ).map(lambda messages: [*messages, {"role": "user", "content": "and so?"}]),
        "max_tokens": st.integers(1, 8),
    },
    optional={
        "temperature": st.floats(0, 2),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "stop": st.lists(st.text(min_size=1, max_size=5), max_size=2),
        "cache_policy": st.sampled_from(["use", "bypass"]),
    },
)
CHAT = PLAUSIBLE_CHAT | FUZZY_CHAT
EMBEDDINGS = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["minilm", "tiny-gpt"]) | JUNK,
        "input": TEXT | SURROGATE_TEXT | st.lists(TEXT | SURROGATE_TEXT, max_size=4) | JUNK,
    },
    optional={"encoding_format": st.sampled_from(["float", "base64", "int8"]) | JUNK, "dimensions": NUMBER},
)
# Bodies with an integer of more digits than Python converts (4,300):
# json.loads raises ValueError; json.dumps cannot write them, so raw bytes.
HUGE_INT_BODIES = st.builds(
    lambda field, digits: (
        b'{"model":"tiny-gpt","messages":[{"role":"user","content":"hi"}],"%s":%s}'
        % (field.encode(), b"9" * digits)
    ),
    st.sampled_from(["max_tokens", "temperature", "seed", "n"]),
    st.sampled_from([4301, 5000, 20_000]),
)
ENDPOINTS = {"/v1/chat/completions": CHAT, "/v1/embeddings": EMBEDDINGS}
AUTHORIZATION = st.sampled_from(
    [f"Bearer {API_KEY}"] * 4 + ["", "Bearer wrong", "Basic Zm9vOmJhcg==", "Bearer"]
)
# The statuses the edge answers with (http_edge.HTTP_ERRORS); 500 is never one.
ANSWERED = {200, 400, 401, 403, 404, 405, 409, 413, 429, 503, 504}


@pytest.fixture(scope="module")
async def http(fuzz_mesh):
    # No transport retries: each example is exactly one request.
    async with httpx.AsyncClient(base_url=f"http://{fuzz_mesh['http']}", timeout=DEADLINE_S) as client:
        yield client


def _body(value, raw: bytes | None) -> bytes:
    if raw is not None:
        return raw
    return json.dumps(value, allow_nan=True).encode()


def _check_error(content: bytes) -> None:
    body = json.loads(content)
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], body
    assert isinstance(error["type"], str) and error["type"], body
    assert isinstance(error["code"], str) and error["code"], body


def _check_stream(content: bytes) -> None:
    events = content.decode().split("\n\n")
    assert events[-1] == "", "a stream ends with a whole event"
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: "), event[:200]
        payloads.append(event[len("data: ") :])
    last = payloads[-1]
    if last == "[DONE]":
        chunks = [json.loads(payload) for payload in payloads[:-1]]
        # The role comes on the first chunk, whatever the answer's pieces.
        assert chunks[0]["choices"][0]["delta"].get("role") == "assistant", chunks[0]
        finishes = [c for c in chunks if c.get("choices") and c["choices"][0].get("finish_reason")]
        assert len(finishes) == 1, "one finish chunk, before [DONE]"
    else:
        # Failed midway: an error event ends it, never [DONE].
        assert "[DONE]" not in payloads
        _check_error(last.encode())


def _check_answer(path: str, response: httpx.Response, stream: bool) -> None:
    assert response.status_code in ANSWERED, f"{path} answered {response.status_code}: {response.text[:300]}"
    if response.status_code != 200:
        _check_error(response.content)
        return
    if stream:
        _check_stream(response.content)
        return
    body = response.json()
    if path == "/v1/chat/completions":
        (choice,) = body["choices"]
        assert isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] >= 0
    else:
        assert body["data"] and all(isinstance(item["embedding"], (list, str)) for item in body["data"]), str(
            body
        )[:300]


@FUZZ
@given(
    path=st.sampled_from(sorted(ENDPOINTS)),
    data=st.data(),
    raw=st.none() | st.none() | st.none() | GARBAGE | HUGE_INT_BODIES,
    authorization=AUTHORIZATION,
)
async def test_any_body_gets_an_openai_answer_or_error(http, outcomes, path, data, raw, authorization):
    value = data.draw(ENDPOINTS[path])
    stream = raw is None and isinstance(value, dict) and value.get("stream") is True
    headers = {"content-type": "application/json"}
    if authorization:
        headers["authorization"] = authorization
    started = time.monotonic()
    response = await http.post(path, content=_body(value, raw), headers=headers)
    elapsed = time.monotonic() - started
    outcomes.counts[f"http {path}"][str(response.status_code)] += 1
    assert elapsed <= DEADLINE_S + MARGIN_S, f"{path} took {elapsed:.1f}s"
    _check_answer(path, response, stream)


@FUZZ
@given(
    method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST"]),
    path=st.sampled_from(["/v1/models", "/v1/chat/completions", "/v1/embeddings", "/", "/v1/../v1/models"])
    | st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30).map(
        lambda p: "/" + p
    ),
)
async def test_any_method_and_path_gets_an_openai_answer_or_error(http, outcomes, method, path):
    response = await http.request(
        method,
        path,
        headers={"authorization": f"Bearer {API_KEY}"},
        content=b"{}" if method != "GET" else None,
    )
    outcomes.counts["http any path"][str(response.status_code)] += 1
    assert response.status_code in ANSWERED, f"{method} {path} answered {response.status_code}"
    if response.status_code != 200:
        _check_error(response.content)


def test_the_fuzzing_reached_answers_and_refusals(outcomes):
    """Runs after the tests above (in this module's order; alone, as with -k,
    it has nothing to read and fails): both kinds of outcome were met, or the
    fuzzing never got past the first refusal (or never met one)."""
    chat = outcomes.counts["http /v1/chat/completions"]
    assert chat["200"] > 0 and any(status.startswith("4") for status in chat), dict(chat)
