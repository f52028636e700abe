"""The HTTP edge's reading of OpenAI bodies and the shape of what it sends
back, without a mesh: whatever JSON a caller sends is either a request or a
400 with the field it is about (never a 500 from building the protobuf),
and the stream and error details OpenAI clients rely on."""

from __future__ import annotations

import json

import grpc
import pytest

from meshgate.config import ModelSettings, RouterSettings
from meshgate.errors import MeshgateError, not_found
from meshgate.reasons import Reason
from services.router import http_edge
from services.router.admission import TenantCalls
from services.router.auth import Authenticator
from services.router.http_edge import (
    CACHE_POLICIES,
    HttpEdge,
    _Chunks,
    _parse_json,
    error_body,
    http_error,
)
from services.router.pipeline import Answer, CacheStatus, Completion, Delta, Failure
from tests.unit.test_router_http_edge import KEY, ScriptedPipeline, events_of, posted, streamed

USER = {"role": "user", "content": "hi"}
# An assistant's tool call as OpenAI's schema has it.
CALL = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
# JSON's escape for half a UTF-16 pair: Python reads it as a lone surrogate,
# which has no UTF-8 form, so protobuf refuses it when the request is built.
SURROGATE = "\ud800"
# More digits than a float holds (float() overflows), fewer than Python's
# limit on converting digits to an int (4,300).
HUGE_INT = int("1" * 400)


def ChatCall(body) -> http_edge.ChatCall:  # noqa: N802 - the class, with the router's default cap
    return http_edge.ChatCall(body, RouterSettings().max_messages)


def chat(**fields) -> dict:
    return {"model": "m", "messages": [USER], **fields}


def refusal(body) -> tuple[str, str | None, str]:
    """(reason, param, message) of the 400 that ``body`` gets."""
    with pytest.raises(MeshgateError) as raised:
        ChatCall(body)
    error = raised.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    answer = error_body(error)["error"]
    return answer["code"], answer["param"], answer["message"]


async def answered(events, body: dict) -> tuple[int, dict]:
    """The status and JSON body of one non-streamed POST /v1/chat/completions
    of ``body``, whose turn yields ``events``."""
    settings = RouterSettings(dev_api_key=KEY)
    edge = HttpEdge(
        settings,
        {"m": ModelSettings()},
        Authenticator(settings),
        TenantCalls(0),
        ScriptedPipeline(events),
        None,
    )
    return await posted(edge, "/v1/chat/completions", body)


# --- values that failed as the protobuf was built (500s) ----------------------------------


@pytest.mark.parametrize(
    ("body", "reason", "param"),
    [
        (chat(messages=[{"role": "user", "content": f"hi {SURROGATE}"}]), "MALFORMED_REQUEST", "messages"),
        (
            chat(messages=[{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]),
            "MALFORMED_REQUEST",
            "messages",
        ),
        (chat(model=SURROGATE), "MALFORMED_REQUEST", "model"),
        (chat(stop=SURROGATE), "MALFORMED_REQUEST", "stop"),
        (chat(stop=["ok", SURROGATE]), "MALFORMED_REQUEST", "stop"),
        (chat(session_id=SURROGATE), "MALFORMED_REQUEST", "session_id"),
        # Unhashable where a string was looked up in a dict (TypeError).
        (chat(messages=[{"role": ["user"], "content": "hi"}]), "INVALID_ROLE", "messages"),
        (chat(messages=[{"role": {}, "content": "hi"}]), "INVALID_ROLE", "messages"),
        (chat(cache_policy=["use"]), "INVALID_CACHE_POLICY", "cache_policy"),
        # float() of an int past a double's range (OverflowError).
        (chat(temperature=HUGE_INT), "MALFORMED_REQUEST", "temperature"),
        (chat(top_p=-HUGE_INT), "MALFORMED_REQUEST", "top_p"),
    ],
    ids=[
        "surrogate content",
        "surrogate text part",
        "surrogate model",
        "surrogate stop",
        "surrogate stop item",
        "surrogate session_id",
        "role array",
        "role object",
        "cache_policy array",
        "temperature huge int",
        "top_p huge int",
    ],
)
def test_a_value_protobuf_or_python_cannot_take_is_a_400_about_its_field(body, reason, param):
    assert refusal(body)[:2] == (reason, param)


@pytest.mark.parametrize(
    "stop", [["s"] * 9, [5] * 9, [""] * 1_000_000], ids=["strings", "numbers", "a million"]
)
def test_stop_strings_past_the_cap_are_refused_before_any_is_converted(stop):
    """A million empty stop strings in an 8 MiB body were each made a
    protobuf string (0.34 s of the loop) before the pipeline counted them.
    Past the cap the count is the answer, whatever the items are (nine
    numbers were "must be strings": each was looked into first)."""
    assert refusal(chat(stop=stop))[:2] == ("INVALID_STOP", "stop")


def test_the_most_stop_strings_are_served():
    assert list(ChatCall(chat(stop=["a"] * 8)).request.parameters.stop) == ["a"] * 8


def test_an_integer_of_more_digits_than_python_converts_is_malformed_json_not_a_500():
    # json.loads raises ValueError past sys.get_int_max_str_digits() (4,300).
    body = b'{"model":"m","messages":[],"max_tokens":' + b"1" * 5000 + b"}"
    with pytest.raises(MeshgateError) as raised:
        _parse_json(body)
    assert raised.value.reason == Reason.MALFORMED_REQUEST


def test_an_escaped_surrogate_in_a_json_body_is_refused_where_it_was_sent():
    # As a client sends it: the escape, not the character (json.dumps writes it so).
    body = _parse_json(b'{"model":"m","messages":[{"role":"user","content":"\\udc00"}]}')
    assert refusal(body)[:2] == ("MALFORMED_REQUEST", "messages")


# --- null and types as OpenAI takes them ----------------------------------------------------


def test_null_n_session_id_and_cache_policy_are_their_defaults():
    call = ChatCall(chat(n=None, session_id=None, cache_policy=None))
    assert (call.session_id, call.create_session) == ("", False)
    assert call.request.cache_policy == CACHE_POLICIES["use"]


@pytest.mark.parametrize("stream", ["true", "false", 1, 0, {}])
def test_stream_must_be_a_boolean(stream):
    # "false" used to be read as not streamed, "true" too: neither is what was meant.
    assert refusal(chat(stream=stream))[:2] == ("MALFORMED_REQUEST", "stream")


@pytest.mark.parametrize("stream", [None, False])
def test_stream_options_without_stream_are_refused_as_openai_does(stream):
    body = chat(stream_options={"include_usage": True}, **({} if stream is None else {"stream": stream}))
    assert refusal(body)[:2] == ("MALFORMED_REQUEST", "stream_options")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(stream=True, stream_options=[]), "stream_options"),
        (chat(stream=True, stream_options=False), "stream_options"),
        (chat(stream=True, stream_options=0), "stream_options"),
        (chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options"),
        (chat(stream=True, stream_options={"include_usage": 1}), "stream_options"),
        (chat(max_tokens="abc", max_completion_tokens=5), "max_tokens"),
        # Not used, yet typed as OpenAI types them (it refuses these too).
        (chat(user=7), "user"),
        (chat(metadata=["a"]), "metadata"),
        (chat(metadata={"a": 1}), "metadata"),
        (chat(messages=[{"role": "user", "content": "hi", "name": ["ann"]}]), "messages"),
    ],
    ids=[
        "options array",
        "options false",
        "options 0",
        "usage yes",
        "usage 1",
        "bad max_tokens beside",
        "user number",
        "metadata array",
        "metadata number",
        "name array",
    ],
)
def test_a_value_of_the_wrong_type_is_refused_not_read_as_its_default(body, param):
    """A hunt: these were taken (no usage chunk; the bad max_tokens unread)."""
    assert refusal(body)[:2] == ("MALFORMED_REQUEST", param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(n=True), "n"),
        (chat(top_logprobs=5), "top_logprobs"),
        (chat(top_logprobs=0, logprobs=False), "top_logprobs"),
        (
            chat(
                messages=[
                    {"role": "user", "content": "What's the weather in Paris?"},
                    {"role": "assistant", "content": None, "tool_calls": [CALL]},
                    {"role": "user", "content": "And tomorrow?"},
                ]
            ),
            "messages",
        ),
        (
            chat(messages=[{"role": "assistant", "content": "", "function_call": CALL["function"]}]),
            "messages",
        ),
        (chat(messages=[{"role": "user", "content": "hi", "tool_call_id": "c1"}]), "messages"),
    ],
    ids=["n true", "top_logprobs", "top_logprobs 0", "assistant tool_calls", "function_call", "tool_call_id"],
)
def test_what_would_be_dropped_silently_is_refused(body, param):
    """A hunt: an assistant's tool calls became an empty assistant turn (the
    answer changed, nothing said); top_logprobs and n: true were taken."""
    assert refusal(body)[:2] == ("UNSUPPORTED_PARAMETER", param)


@pytest.mark.parametrize(
    "fields",
    [
        {"modalities": ["text"]},
        {"modalities": None},
        {"modalities": []},
        {"tool_choice": "none"},
        {"tool_choice": None},
        {"tools": [], "tool_choice": "none"},
        {"functions": [], "function_call": "none"},
    ],
)
def test_fields_that_ask_for_what_the_mesh_does_anyway_are_accepted(fields):
    assert ChatCall(chat(**fields)).request.messages[0].content == "hi"


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"modalities": ["text", "audio"]}, "modalities", 'modalities is supported only as ["text"]'),
        ({"modalities": ["audio"]}, "modalities", 'modalities is supported only as ["text"]'),
        ({"modalities": "text"}, "modalities", 'modalities is supported only as ["text"]'),
        ({"tool_choice": "auto"}, "tool_choice", 'tool_choice is supported only as "none"'),
        ({"tool_choice": "required"}, "tool_choice", 'tool_choice is supported only as "none"'),
        (
            {"tools": [], "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool_choice",
            'tool_choice is supported only as "none"',
        ),
        ({"function_call": "auto"}, "function_call", 'function_call is supported only as "none"'),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"},
            "tools",
            "tools is not supported",
        ),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "audio is not supported"),
    ],
)
def test_fields_that_ask_for_more_than_text_without_tools_are_refused_by_name(fields, param, message):
    assert refusal(chat(**fields)) == ("UNSUPPORTED_PARAMETER", param, message)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_k": 40}, "top_k"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"temprature": 0}, "temprature"),
        ({SURROGATE: 1}, ascii(SURROGATE)),
    ],
    ids=["a provider's top_k", "reasoning_effort", "a misspelt field", "a key with no UTF-8 form"],
)
def test_a_field_the_edge_does_not_know_is_refused_in_openais_words(fields, param):
    """A hunt: unknown fields were dropped silently (a misspelt temperature
    was served at the default); OpenAI refuses them with this message."""
    assert refusal(chat(**fields)) == (
        "UNSUPPORTED_PARAMETER",
        param,
        f"Unrecognized request argument supplied: {param}",
    )


@pytest.mark.parametrize("value", [True, False])
def test_parallel_tool_calls_is_refused_as_the_tools_it_is_about(value):
    """OpenAI refuses it without tools; tools are never offered here. It was ignored."""
    assert refusal(chat(parallel_tool_calls=value))[:2] == ("UNSUPPORTED_PARAMETER", "parallel_tool_calls")


def test_fields_that_ask_nothing_of_the_answer_are_accepted():
    fields = {
        "user": "u-1",
        "safety_identifier": "s-1",
        "metadata": {"purpose": "test"},
        "store": False,
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "parallel_tool_calls": None,
    }
    assert ChatCall(chat(**fields)).request.messages[0].content == "hi"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"service_tier": 5}, "service_tier"),
        ({"service_tier": ["auto"]}, "service_tier"),
        ({"store": "yes"}, "store"),
        ({"store": 1}, "store"),
    ],
)
def test_fields_not_used_of_a_type_openai_refuses_are_refused(fields, param):
    """service_tier is a string and store a boolean in OpenAI's API; of
    another type they were served, unlike the other fields not used."""
    assert refusal(chat(**fields))[:2] == ("MALFORMED_REQUEST", param)


async def test_an_embeddings_field_the_edge_does_not_know_is_refused():
    settings = RouterSettings(dev_api_key=KEY)
    edge = HttpEdge(
        settings, {"m": ModelSettings()}, Authenticator(settings), TenantCalls(0), ScriptedPipeline([]), None
    )
    status, body = await posted(edge, "/v1/embeddings", {"model": "minilm", "input": "hi", "truncate": True})
    assert status == 400
    assert (body["error"]["code"], body["error"]["param"]) == ("UNSUPPORTED_PARAMETER", "truncate")


def test_messages_past_the_cap_are_refused_before_any_is_read():
    """A review's finding: the edge made a protobuf Message of each element
    before the pipeline counted them, on the event loop every stream shares
    (270,000 empty messages in an 8 MB body held it 1.2 s). Past the cap,
    the count is the answer, whatever the elements are."""
    cap = RouterSettings().max_messages
    reason, param, message = refusal(chat(messages=[5] * (cap + 1)))
    assert (reason, param) == ("TOO_MANY_MESSAGES", "messages")
    assert f"at most {cap} messages" in message
    # At the cap, the elements are read (and this one refused for its shape).
    assert refusal(chat(messages=[5] * cap))[0] == "MALFORMED_REQUEST"


def test_a_stream_options_key_the_edge_does_not_know_is_refused():
    """A review's finding: a misspelt include_usage streamed with no usage
    and no error, where every other unknown field is refused. OpenAI's other
    option, include_obfuscation (its SDK's StreamOptions), is served: meshgate
    pads no chunk, whichever is asked; of another type than boolean, refused."""
    assert refusal(chat(stream=True, stream_options={"include_usag": True}))[:2] == (
        "UNSUPPORTED_PARAMETER",
        "stream_options",
    )
    for obfuscation in (False, True, None):
        call = ChatCall(
            chat(stream=True, stream_options={"include_obfuscation": obfuscation, "include_usage": True})
        )
        assert call.stream and call.include_usage
    assert refusal(chat(stream=True, stream_options={"include_obfuscation": "no"}))[:2] == (
        "MALFORMED_REQUEST",
        "stream_options",
    )


def test_include_usage_false_and_empty_options_stream_without_usage():
    assert not ChatCall(chat(stream=True, stream_options={"include_usage": False})).include_usage
    assert not ChatCall(chat(stream=True, stream_options={})).include_usage
    assert ChatCall(chat(stream=True, stream_options={"include_usage": True})).include_usage


def test_an_error_without_metadata_has_an_empty_metadata_object():
    error = MeshgateError(grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_INVALID, "the API key is not valid")
    assert json.loads(http_error(error)[2])["error"]["metadata"] == {}


def test_a_max_tokens_past_int32_is_out_of_range_not_said_to_be_no_integer():
    reason, param, message = refusal(chat(max_tokens=2**31))
    assert (reason, param) == ("MALFORMED_REQUEST", "max_tokens")
    assert "out of range" in message and "must be an integer" not in message


def test_a_max_completion_tokens_refused_at_the_edge_names_max_completion_tokens():
    assert refusal(chat(max_completion_tokens=2**40))[1] == "max_completion_tokens"
    assert refusal(chat(max_completion_tokens="many"))[1] == "max_completion_tokens"


async def test_a_max_completion_tokens_the_pipeline_refuses_names_the_field_sent():
    """The pipeline judges the value as max_tokens (INVALID_MAX_TOKENS); the
    caller sent max_completion_tokens and must be told about that."""
    error = MeshgateError(
        grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_MAX_TOKENS, "max_tokens must be > 0"
    )
    for field, param in (("max_completion_tokens", "max_completion_tokens"), ("max_tokens", "max_tokens")):
        status, body = await answered([Failure(error)], chat(**{field: 0}))
        assert (status, body["error"]["param"]) == (400, param)


# --- streams ------------------------------------------------------------------------------------


async def test_an_answer_in_one_piece_carries_the_role_on_its_first_chunk():
    """A short exact hit (or max_tokens=1) comes whole on the completion:
    its one content chunk is the stream's first and says who speaks (the
    openai SDK and others take the role from the first chunk)."""
    answer = Answer(text="Paris.", completion_tokens=2, finish_reason="stop")
    sent = await streamed([Completion(answer, CacheStatus.EXACT_HIT, 1.0, "", 0, "", text="Paris.")])
    chunks = events_of(b"".join(message.get("body", b"") for message in sent))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Paris."}
    assert all("role" not in chunk["choices"][0]["delta"] for chunk in chunks[1:])


def test_with_include_usage_every_chunk_before_the_last_says_usage_null():
    answer = Answer(text="Hello", prompt_tokens=3, completion_tokens=2, finish_reason="stop")
    chunks = _Chunks("chatcmpl-x", 0, "m", include_usage=True)
    body = chunks.delta("Hel") + chunks.finish(Completion(answer, CacheStatus.MISS, 0.0, "", 0, ""), "lo")
    events = events_of(body)
    assert [event["usage"] for event in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1]["usage"]["total_tokens"] == 5 and events[-1]["choices"] == []
    # Without it, no chunk has the key (as OpenAI).
    plain = _Chunks("chatcmpl-x", 0, "m")
    body = plain.delta("Hel") + plain.finish(Completion(answer, CacheStatus.MISS, 0.0, "", 0, ""), "lo")
    assert all("usage" not in event for event in events_of(body))


async def test_a_failure_midway_has_the_type_its_status_would_have():
    """A full session is a 409 conflict_error as a status (it stays full);
    mid-stream its error event said rate_limit_error, its code's default."""
    full = MeshgateError(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.SESSION_FULL, "the session is full")
    sent = await streamed([Delta("Hel"), Failure(full)])
    error = events_of(b"".join(message.get("body", b"") for message in sent))[-1]["error"]
    assert (error["code"], error["type"]) == ("SESSION_FULL", "conflict_error")
    status, _, body = http_error(full)
    assert (status, json.loads(body)["error"]["type"]) == (409, error["type"])


# --- error bodies ---------------------------------------------------------------------------------


def test_an_error_body_clips_what_it_echoes_as_the_grpc_status_does():
    """A 1 MB model name made a 2 MB 404: the body now carries the message
    and metadata as MeshgateError.to_status_proto clips them."""
    name = "m" * 1_000_000
    error = not_found(Reason.MODEL_NOT_FOUND, f"unknown model {name!r}", model=name)
    status, _, body = http_error(error)
    proto = error.to_status_proto()
    answer = json.loads(body)["error"]
    assert status == 404 and len(body) < 2048
    assert answer["message"] == proto.message
    assert answer["metadata"]["model"].startswith("mmm") and len(answer["metadata"]["model"]) <= 128
    assert (answer["code"], answer["param"]) == ("MODEL_NOT_FOUND", "model")


def test_a_401_names_the_bearer_scheme():
    error = MeshgateError(grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_MISSING, "no key")
    assert (b"www-authenticate", b"Bearer") in http_error(error)[1]
    assert not any(name == b"www-authenticate" for name, _ in http_error(not_found("X", "x"))[1])


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"role": "user", "contnet": "hi"}, "contnet"),
        ({"role": "user", "content": "hi", SURROGATE: 1}, ascii(SURROGATE)),
    ],
    ids=["a misspelt content", "a key with no UTF-8 form"],
)
def test_a_message_field_the_edge_does_not_know_is_refused(message, field):
    """The left of a hunt: a message's unknown fields were dropped, so a
    misspelt content was served as an empty turn."""
    assert refusal(chat(messages=[message])) == (
        "UNSUPPORTED_PARAMETER",
        "messages",
        f"messages[0]: Unrecognized argument supplied: {field}",
    )


@pytest.mark.parametrize("role", ["user", "system", "developer"])
@pytest.mark.parametrize(
    ("field", "value"),
    [("refusal", "I can't help with that."), ("refusal", None), ("annotations", []), ("audio", None)],
)
def test_an_assistants_own_field_on_another_roles_message_is_refused(role, field, value):
    """OpenAI has refusal, annotations and audio on an assistant's message
    alone: a user's refusal was served as what the user said, the others
    were dropped, where OpenAI answers 400."""
    assert refusal(chat(messages=[{"role": role, "content": None, field: value}, USER])) == (
        "UNSUPPORTED_PARAMETER",
        "messages",
        f"messages[0]: Unrecognized argument supplied: {field}",
    )


def test_a_participant_name_is_accepted_and_an_assistants_refusal_is_what_it_said():
    request = ChatCall(
        chat(
            messages=[
                {"role": "user", "content": "hi", "name": "ann"},
                {"role": "assistant", "content": None, "refusal": "I can't help with that."},
                {"role": "assistant", "content": "Hello.", "refusal": None},
                USER,
            ]
        )
    ).request
    assert [message.content for message in request.messages] == [
        "hi",
        "I can't help with that.",
        "Hello.",
        "hi",
    ]


@pytest.mark.parametrize(("refused", "message"), [(3, "must be a string"), (SURROGATE, "must be UTF-8 text")])
def test_a_refusal_that_is_not_text_is_refused(refused, message):
    assert refusal(chat(messages=[{"role": "assistant", "refusal": refused}, USER]))[1:] == (
        "messages",
        f"messages[0].refusal {message}",
    )


def test_an_answer_sent_back_as_the_sdk_dumps_it_is_accepted():
    """openai-python's ``message.model_dump()`` of the mesh's own answer has
    annotations and audio (None), OpenAI's answers annotations [] and
    refusal null: a client keeping its history so was refused (400
    Unrecognized argument supplied: annotations) on its second turn."""
    from openai.types.chat import ChatCompletionMessage

    dumped = ChatCompletionMessage.model_validate({"role": "assistant", "content": "Hello."}).model_dump()
    from_openai = {"role": "assistant", "content": "Hi.", "refusal": None, "annotations": []}
    request = ChatCall(chat(messages=[USER, dumped, USER, from_openai, USER])).request
    assert [message.content for message in request.messages] == ["hi", "Hello.", "hi", "Hi.", "hi"]


def test_an_earlier_audio_answer_is_refused():
    assert refusal(
        chat(messages=[{"role": "assistant", "content": None, "audio": {"id": "audio_1"}}, USER])
    ) == (
        "UNSUPPORTED_PARAMETER",
        "messages",
        "messages[0].audio: audio answers are not supported",
    )


def test_an_assistants_empty_tool_calls_array_is_refused_as_openai_refuses_it():
    """OpenAI answers 400 to ``"tool_calls": []`` (an array of at least one
    call); the edge took it as no calls. Null stays accepted: openai-python's
    ``model_dump()`` sends it so."""
    assistant = {"role": "assistant", "content": "a", "tool_calls": []}
    assert refusal(chat(messages=[USER, assistant, USER])) == (
        "MALFORMED_REQUEST",
        "messages",
        "Invalid 'messages[1].tool_calls': empty array. "
        "Expected an array with minimum length 1, but got an empty array instead.",
    )
    assistant["tool_calls"] = None
    assert [m.content for m in ChatCall(chat(messages=[USER, assistant, USER])).request.messages] == [
        "hi",
        "a",
        "hi",
    ]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"tool_calls": {}},
            "Invalid type for 'messages[1].tool_calls': expected an array, but got an object instead.",
        ),
        (
            {"tool_calls": "c1"},
            "Invalid type for 'messages[1].tool_calls': expected an array, but got a string instead.",
        ),
        (
            {"tool_calls": [CALL, 1]},
            "Invalid type for 'messages[1].tool_calls[1]': expected an object, but got an integer instead.",
        ),
        ({"tool_calls": [{}]}, "Missing required parameter: 'messages[1].tool_calls[0].id'."),
        (
            {"tool_calls": [{**CALL, "id": None}]},
            "Invalid type for 'messages[1].tool_calls[0].id': expected a string, but got null instead.",
        ),
        (
            {"tool_calls": [{**CALL, "type": "code"}]},
            "Invalid value for 'messages[1].tool_calls[0].type': supported values are: 'function'.",
        ),
        (
            {"tool_calls": [{key: value for key, value in CALL.items() if key != "function"}]},
            "Missing required parameter: 'messages[1].tool_calls[0].function'.",
        ),
        (
            {"tool_calls": [{**CALL, "function": {"name": "weather"}}]},
            "Missing required parameter: 'messages[1].tool_calls[0].function.arguments'.",
        ),
        (
            {"tool_calls": [{**CALL, "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
            "Invalid type for 'messages[1].tool_calls[0].function.arguments': "
            "expected a string, but got an object instead.",
        ),
        ({"function_call": {}}, "Missing required parameter: 'messages[1].function_call.name'."),
        (
            {"function_call": []},
            "Invalid type for 'messages[1].function_call': expected an object, but got an array instead.",
        ),
        (
            {"function_call": {"name": True, "arguments": "{}"}},
            "Invalid type for 'messages[1].function_call.name': "
            "expected a string, but got a boolean instead.",
        ),
    ],
    ids=[
        "tool_calls object",
        "tool_calls string",
        "a call not an object",
        "a call without id",
        "a call's id null",
        "a call's type not function",
        "a call without function",
        "a function without arguments",
        "arguments not a string",
        "function_call empty object",
        "function_call array",
        "function_call name not a string",
    ],
)
def test_an_assistants_malformed_tool_fields_are_refused_as_openai_refuses_them(fields, message):
    """OpenAI's schema: tool_calls an array of {id, type: "function",
    function: {name, arguments}}, function_call one {name, arguments}, all
    strings. ``"function_call": {}`` and ``"tool_calls": {}`` were served as
    no calls; other wrong shapes were refused as calls the mesh does not
    support (UNSUPPORTED_PARAMETER), telling a broken client to stop using
    a feature rather than what is wrong with its body."""
    assistant = {"role": "assistant", "content": "a", **fields}
    assert refusal(chat(messages=[USER, assistant, USER])) == ("MALFORMED_REQUEST", "messages", message)
