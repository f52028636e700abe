"""How the inference service turns Triton's streamed responses into deltas:
responses already waiting go out as one delta, with the stream interval
later ones wait for company (never the first, never the final one), counts
stay exact, and a stream that fails or ends early says so. Triton's call is a scripted fake
(this is the servicer's logic alone; tests/integration runs it on Triton)."""

from __future__ import annotations

import asyncio
import struct
import types

import grpc
import pytest
import structlog
from tritonclient.grpc import service_pb2

from meshgate import balancing
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.inference import backends
from services.inference.backends import OpenCalls, TritonStreams
from services.inference.servicer import _TritonStream
from tests.unit.test_streaming import until


def triton_response(
    text: str | bytes,
    tokens: int,
    final: bool = False,
    finish_reason: str = "",
    prompt_tokens: int | None = None,
) -> service_pb2.ModelStreamInferResponse:
    """A response of the model; ``text`` as bytes: what a byte-level backend
    sends, part of a character perhaps. The prompt's count comes on the
    final response (0 if not given), and on another where given (the
    bundled models send it on their first too)."""
    data = text.encode() if isinstance(text, str) else text
    message = service_pb2.ModelStreamInferResponse()
    response = message.infer_response
    response.parameters["triton_final_response"].bool_param = final
    outputs = [
        ("text_output", "BYTES", struct.pack("<I", len(data)) + data),
        ("num_output_tokens", "UINT32", struct.pack("<I", tokens)),
    ]
    if final:
        reason = struct.pack("<I", len(finish_reason)) + finish_reason.encode()
        outputs.append(("finish_reason", "BYTES", reason))
    if final or prompt_tokens is not None:
        outputs.append(("num_input_tokens", "UINT32", struct.pack("<I", prompt_tokens or 0)))
    for name, datatype, raw in outputs:
        response.outputs.add(name=name, datatype=datatype, shape=[1])
        response.raw_output_contents.append(raw)
    return message


class ScriptedCall:
    """A ModelStreamInfer call whose responses the test hands over one by one;
    it keeps the requests written to it."""

    def __init__(self) -> None:
        self._pending: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self._done = False
        self.requests: list[service_pb2.ModelInferRequest] = []
        self.half_closed = False

    async def write(self, request) -> None:
        if self._done:
            raise asyncio.InvalidStateError("RPC already finished.")
        self.requests.append(request)

    async def done_writing(self) -> None:
        """Triton then ends the stream: the test sends grpc.aio.EOF for it."""
        self.half_closed = True

    def send(self, item) -> None:
        """A response, grpc.aio.EOF (the stream ends), or an error to raise."""
        self._pending.put_nowait(item)

    async def read(self):
        item = await self._pending.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item is grpc.aio.EOF:
            self._done = True
        return item

    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        """As grpc's: False, doing nothing, once the call has ended."""
        if self._done:
            return False
        self.cancelled = self._done = True
        self._pending.put_nowait(asyncio.CancelledError())
        return True


def stream_on(
    call: ScriptedCall,
    hold_s=None,
    timeout=10.0,
    idle_streams: int = 0,
    completion_carries_text=False,
    stall_s=None,
) -> tuple[_TritonStream, types.SimpleNamespace]:
    """A stream on a backend whose pool opens ``call``, then new ScriptedCalls
    (all in ``backend.opened``), and keeps up to ``idle_streams`` idle."""
    unopened = [call]

    def open_stream() -> ScriptedCall:
        backend.opened.append(unopened.pop() if unopened else ScriptedCall())
        return backend.opened[-1]

    backend = types.SimpleNamespace(
        opened=[],
        streams=TritonStreams(open_stream, idle_streams),
        address="triton-a:8001",
        batched={},
        reports_cached_tokens={},
        takes_cache_salt={},
        in_flight=0,
        calls=OpenCalls(),
        active_tokens=0,
        queued_prefill_tokens=0,
        ttft=balancing.Ewma(),
    )
    return next_stream(backend, hold_s, timeout, completion_carries_text, stall_s), backend


def next_stream(
    backend, hold_s=None, timeout=10.0, completion_carries_text=False, stall_s=None
) -> _TritonStream:
    return _TritonStream(
        backend,
        "tiny_gpt",
        "prompt",
        "{}",
        timeout=timeout,
        prompt_tokens=7,
        hold_s=hold_s,
        completion_carries_text=completion_carries_text,
        stall_s=stall_s,
    )


def kinds(responses) -> list[str]:
    return [r.WhichOneof("event") for r in responses]


async def test_responses_already_waiting_go_out_as_one_delta_with_exact_counts():
    call = ScriptedCall()
    for text in ("Hel", "lo", ", "):
        call.send(triton_response(text, 1))
    call.send(triton_response("world", 2, final=True, finish_reason="length", prompt_tokens=9))
    call.send(grpc.aio.EOF)
    stream, backend = stream_on(call)

    responses = [r async for r in stream]

    assert kinds(responses) == ["delta", "completion"]
    assert responses[0].delta.text == "Hello, world"
    completion = responses[1].completion
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (9, 5)
    assert (completion.finish_reason, completion.backend) == ("length", "triton-a:8001")
    assert (backend.in_flight, backend.active_tokens) == (0, 0)
    assert not call.cancelled, "a finished stream ends by itself, not by a cancel"


async def test_each_delta_carries_the_completion_tokens_so_far_and_the_first_the_prompts():
    """A caller cut off midway is billed the counts of the last delta it
    got (the router's admission): the model's prompt count once, on the
    first delta after the model said it, and the running completion count
    on every delta (a sum of the responses' num_output_tokens)."""
    call = ScriptedCall()
    stream, _ = stream_on(call)
    deltas = aiter(stream)
    call.send(triton_response("Hel", 1, prompt_tokens=9))
    first = await asyncio.wait_for(anext(deltas), 5)
    call.send(triton_response("lo", 2))
    second = await asyncio.wait_for(anext(deltas), 5)
    call.send(triton_response(" world", 1, final=True, finish_reason="length", prompt_tokens=9))
    call.send(grpc.aio.EOF)
    rest = [r async for r in deltas]

    assert (first.delta.text, first.delta.completion_tokens, first.delta.prompt_tokens) == ("Hel", 1, 9)
    assert (second.delta.text, second.delta.completion_tokens, second.delta.prompt_tokens) == ("lo", 3, 0)
    assert (rest[0].delta.completion_tokens, rest[0].delta.prompt_tokens) == (4, 0)
    assert (rest[1].completion.usage.prompt_tokens, rest[1].completion.usage.completion_tokens) == (9, 4)


async def test_a_model_that_counts_the_prompt_only_at_its_end_sends_no_prompt_count_on_a_delta():
    call = ScriptedCall()
    stream, _ = stream_on(call, completion_carries_text=True)
    responses = aiter(stream)
    call.send(triton_response("Hel", 1))
    delta = await asyncio.wait_for(anext(responses), 5)
    call.send(triton_response("lo", 1, final=True, finish_reason="stop", prompt_tokens=9))
    call.send(grpc.aio.EOF)
    [completion] = [r async for r in responses]

    assert (delta.delta.completion_tokens, delta.delta.prompt_tokens) == (1, 0)
    assert (completion.completion.usage.prompt_tokens, completion.completion.text) == (9, "lo")


@pytest.mark.parametrize("finish_reason", ["abort", "error"])
async def test_a_final_response_that_says_the_answer_was_cut_short_ends_the_stream_non_ok(finish_reason):
    # vLLM's finish reasons for an answer the engine dropped or failed: what
    # was said goes out, and then no completion (which the router would
    # cache and bill as a whole answer) but STREAM_ENDED_EARLY.
    call = ScriptedCall()
    call.send(triton_response("Hel", 1))
    call.send(triton_response("lo", 1, final=True, finish_reason=finish_reason, prompt_tokens=2))
    call.send(grpc.aio.EOF)
    stream, backend = stream_on(call)

    responses = []
    with pytest.raises(MeshgateError) as failure:
        async for response in stream:
            responses.append(response)

    assert kinds(responses) == ["delta"] and responses[0].delta.text == "Hello"
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE
    assert failure.value.reason == Reason.STREAM_ENDED_EARLY
    assert (backend.in_flight, backend.active_tokens) == (0, 0)


async def test_a_caller_that_reads_the_completions_text_gets_the_last_text_there_not_in_a_delta():
    call = ScriptedCall()
    stream, _ = stream_on(call, completion_carries_text=True)
    deltas = aiter(stream)
    call.send(triton_response("Hel", 1))
    assert (await asyncio.wait_for(anext(deltas), 5)).delta.text == "Hel"
    call.send(triton_response("lo", 1))
    call.send(triton_response(" world", 1, final=True, finish_reason="length", prompt_tokens=4))
    call.send(grpc.aio.EOF)
    rest = [r async for r in deltas]

    # "lo" and " world" arrived together with the final response: one
    # message, the completion, carries both.
    assert kinds(rest) == ["completion"]
    completion = rest[0].completion
    assert completion.text == "lo world"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 3)
    assert stream.delivered_chars == len("Hel"), "only deltas count as sent before the completion"


async def test_a_caller_that_does_not_read_the_completions_text_gets_every_text_in_deltas():
    call = ScriptedCall()
    call.send(triton_response("Hel", 1))
    call.send(triton_response("lo", 1, final=True, finish_reason="stop", prompt_tokens=2))
    call.send(grpc.aio.EOF)
    stream, _ = stream_on(call)

    responses = [r async for r in stream]

    assert kinds(responses) == ["delta", "completion"]
    assert responses[0].delta.text == "Hello"
    assert responses[1].completion.text == ""


async def test_a_character_split_across_responses_reaches_the_caller_whole():
    call = ScriptedCall()
    stream, _ = stream_on(call)
    deltas = aiter(stream)
    call.send(triton_response(b"caf\xc3", 1))
    assert (await asyncio.wait_for(anext(deltas), 5)).delta.text == "caf"
    call.send(triton_response(b"\xa9!", 1))
    assert (await asyncio.wait_for(anext(deltas), 5)).delta.text == "é!"
    # The answer ends in the middle of "晨": the half is left out, as the
    # bundled engine leaves it, not sent as U+FFFD.
    call.send(triton_response("晨".encode()[:2], 1, final=True, finish_reason="length", prompt_tokens=3))
    call.send(grpc.aio.EOF)
    rest = [r async for r in deltas]

    assert kinds(rest) == ["completion"]
    assert (rest[0].completion.text, rest[0].completion.usage.completion_tokens) == ("", 3)


async def test_an_empty_final_response_leaves_the_completions_text_empty():
    call = ScriptedCall()
    call.send(triton_response("Hi", 1))
    stream, _ = stream_on(call, completion_carries_text=True)
    deltas = aiter(stream)
    assert (await asyncio.wait_for(anext(deltas), 5)).delta.text == "Hi"
    call.send(triton_response("", 0, final=True, finish_reason="stop", prompt_tokens=2))
    call.send(grpc.aio.EOF)
    rest = [r async for r in deltas]

    assert kinds(rest) == ["completion"]
    assert rest[0].completion.text == ""


async def test_a_response_is_passed_on_as_soon_as_it_arrives():
    call = ScriptedCall()
    stream, _ = stream_on(call)
    deltas = aiter(stream)
    call.send(triton_response("one", 1))
    first = await asyncio.wait_for(anext(deltas), 5)
    assert first.delta.text == "one", "nothing waits for a second response to batch with"
    call.send(triton_response(" two", 1))
    assert (await asyncio.wait_for(anext(deltas), 5)).delta.text == " two"
    call.send(triton_response("", 0, final=True, finish_reason="stop", prompt_tokens=3))
    call.send(grpc.aio.EOF)
    completion = (await asyncio.wait_for(anext(deltas), 5)).completion
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 2)
    with pytest.raises(StopAsyncIteration):
        await anext(deltas)


async def test_a_call_that_fails_midway_raises_after_the_deltas_that_arrived():
    call = ScriptedCall()
    call.send(triton_response("partial", 3))
    no_metadata = grpc.aio.Metadata()
    call.send(grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, no_metadata, no_metadata, "gone"))
    stream, backend = stream_on(call)
    delivered = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for response in stream:
            delivered.append(response)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [r.delta.text for r in delivered] == ["partial"]
    assert (stream.started, stream.delivered_deltas, stream.delivered_tokens) == (True, 1, 3)
    assert backend.in_flight == 0


async def test_a_stream_that_ends_without_its_final_response_is_an_error():
    call = ScriptedCall()
    call.send(triton_response("cut", 1))
    call.send(grpc.aio.EOF)
    stream, backend = stream_on(call)
    with structlog.testing.capture_logs() as logs, pytest.raises(MeshgateError) as failure:
        async for _ in stream:
            pass
    assert failure.value.reason == Reason.STREAM_ENDED_EARLY
    # Which Triton server it was is this service's to log: the router passes
    # ErrorInfo metadata on to its public callers.
    assert backend.address not in str(failure.value.to_status_proto())
    assert {"event": "triton stream ended early", "backend": backend.address} in [
        {"event": log["event"], "backend": log.get("backend")} for log in logs
    ]


async def test_leaving_early_cancels_the_triton_call():
    call = ScriptedCall()
    call.send(triton_response("first", 1))
    stream, backend = stream_on(call)
    deltas = aiter(stream)
    assert (await anext(deltas)).delta.text == "first"
    await deltas.aclose()
    assert call.cancelled
    assert (backend.in_flight, backend.active_tokens) == (0, 0)


# The stream interval, held longer than any test lasts: what comes before
# it was not held.
LONG_HOLD_S = 60.0


async def test_with_the_stream_interval_later_responses_wait_for_company_but_not_for_the_end():
    call = ScriptedCall()
    stream, _ = stream_on(call, hold_s=lambda: LONG_HOLD_S)
    deltas = aiter(stream)
    call.send(triton_response("one", 1))
    assert (await asyncio.wait_for(anext(deltas), 5)).delta.text == "one", "the first is never held"
    call.send(triton_response(" two", 1))
    call.send(triton_response(" three", 1))
    # Held: nothing goes out until the final response, which flushes at once.
    waiting = asyncio.ensure_future(anext(deltas))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    call.send(triton_response("!", 1, final=True, finish_reason="stop", prompt_tokens=3))
    call.send(grpc.aio.EOF)
    assert (await asyncio.wait_for(waiting, 5)).delta.text == " two three!"
    completion = (await asyncio.wait_for(anext(deltas), 5)).completion
    assert completion.usage.completion_tokens == 4, "tokens counted from Triton, not from deltas"


async def test_with_the_stream_interval_a_response_the_model_held_already_is_not_held_again():
    # A model with its own stream interval (model_repository/generation/
    # engine.py) sends several tokens a response under load: holding that
    # response again would stretch the gap to both intervals.
    call = ScriptedCall()
    stream, _ = stream_on(call, hold_s=lambda: LONG_HOLD_S)
    deltas = aiter(stream)
    call.send(triton_response("one", 1))
    assert (await asyncio.wait_for(anext(deltas), 5)).delta.text == "one"
    call.send(triton_response(" two", 1))
    waiting = asyncio.ensure_future(anext(deltas))
    await asyncio.sleep(0.05)
    assert not waiting.done(), "one token a response is held as before"
    call.send(triton_response(" three four five", 3))
    # What waited goes out with it at once, long before the hold would end.
    assert (await asyncio.wait_for(waiting, 5)).delta.text == " two three four five"
    call.send(triton_response("!", 1, final=True, finish_reason="stop", prompt_tokens=3))
    call.send(grpc.aio.EOF)
    assert (await asyncio.wait_for(anext(deltas), 5)).delta.text == "!"
    assert (await asyncio.wait_for(anext(deltas), 5)).completion.usage.completion_tokens == 6


async def test_a_model_error_after_held_responses_sends_them_first():
    call = ScriptedCall()
    call.send(triton_response("one", 1))
    stream, _ = stream_on(call, hold_s=lambda: LONG_HOLD_S)
    delivered = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async with asyncio.timeout(5):
            async for response in stream:
                delivered.append(response.delta.text)
                if delivered == ["one"]:
                    call.send(triton_response(" two", 1))
                    call.send(service_pb2.ModelStreamInferResponse(error_message="model broke"))
    assert failure.value.code() == grpc.StatusCode.INTERNAL
    assert delivered == ["one", " two"]
    assert (stream.delivered_deltas, stream.delivered_tokens) == (2, 2)


@pytest.mark.parametrize(
    ("error_message", "code"),
    [
        (
            "tiny_gpt: invalid request: max_tokens must be in [1, 511], got 600",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ("tiny_gpt: model is shutting down", grpc.StatusCode.UNAVAILABLE),
        ("tiny_gpt: internal error during generation", grpc.StatusCode.INTERNAL),
    ],
)
async def test_a_models_error_response_ends_the_stream_with_the_status_its_wording_stands_for(
    error_message, code
):
    call = ScriptedCall()
    call.send(triton_response("Hel", 1))
    stream, backend = stream_on(call, idle_streams=2)
    delivered = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for response in stream:
            delivered.append(response.delta.text)
            call.send(service_pb2.ModelStreamInferResponse(error_message=error_message))
    assert (failure.value.code(), failure.value.details()) == (code, error_message)
    # The text before it went out, and says so (Generate's _with_progress).
    assert delivered == ["Hel"] and (stream.started, stream.delivered_deltas) == (True, 1)
    assert len(backend.streams) == 0 and call.cancelled, "a stream whose request failed is not reused"


async def test_with_the_stream_interval_the_first_text_is_not_held_after_an_empty_first_response():
    call = ScriptedCall()
    stream, _ = stream_on(call, hold_s=lambda: LONG_HOLD_S)
    deltas = aiter(stream)
    # Part of a multi-byte character: a token, no text yet.
    call.send(triton_response("", 1))
    waiting = asyncio.ensure_future(anext(deltas))
    await asyncio.sleep(0.05)
    call.send(triton_response("é", 1))
    assert (await asyncio.wait_for(waiting, 5)).delta.text == "é", "the first text is never held"
    call.send(triton_response(" two", 1))
    # Held from the first text on.
    held = asyncio.ensure_future(anext(deltas))
    await asyncio.sleep(0.05)
    assert not held.done()
    call.send(triton_response("", 0, final=True, finish_reason="stop", prompt_tokens=3))
    call.send(grpc.aio.EOF)
    assert (await asyncio.wait_for(held, 5)).delta.text == " two"
    assert (await asyncio.wait_for(anext(deltas), 5)).completion.usage.completion_tokens == 3


async def test_with_the_stream_interval_nothing_is_held_past_the_callers_deadline():
    call = ScriptedCall()
    deadline_s = 0.3
    stream, _ = stream_on(call, hold_s=lambda: LONG_HOLD_S, timeout=deadline_s)
    deltas = aiter(stream)
    call.send(triton_response("one", 1))
    assert (await asyncio.wait_for(anext(deltas), 5)).delta.text == "one"
    call.send(triton_response(" two", 1))
    # Held only until just before the deadline (slack for a loaded machine),
    # not for the interval: the caller still gets it.
    assert (await asyncio.wait_for(anext(deltas), deadline_s + 1.0)).delta.text == " two"
    await deltas.aclose()


STALL_S = 0.2


async def test_a_stream_whose_model_stops_answering_midway_ends_unavailable_with_its_counts():
    # A model whose stub was killed sends nothing more, and its server and
    # itself read ready: the stream waited for its caller's deadline, or forever.
    call = ScriptedCall()
    stream, backend = stream_on(call, idle_streams=2, stall_s=STALL_S)
    deltas = aiter(stream)
    call.send(triton_response("partial", 2))
    assert (await asyncio.wait_for(anext(deltas), 5)).delta.text == "partial"
    with pytest.raises(MeshgateError) as failure:
        await asyncio.wait_for(anext(deltas), 5)
    assert (failure.value.code, failure.value.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        Reason.STREAM_ENDED_EARLY,
    )
    assert (stream.started, stream.delivered_deltas, stream.delivered_tokens) == (True, 1, 2)
    assert call.cancelled, "the request inside Triton is cancelled"
    assert (len(backend.streams), backend.in_flight, len(backend.calls)) == (0, 0, 0)


async def test_neither_the_prompts_prefill_nor_a_slow_caller_nor_a_pooled_stream_is_a_stall():
    call = ScriptedCall()
    stream, backend = stream_on(call, idle_streams=2, stall_s=STALL_S)
    deltas = aiter(stream)
    first = asyncio.ensure_future(anext(deltas))
    # A long prompt is read before the first response: not bounded here.
    await asyncio.sleep(3 * STALL_S)
    call.send(triton_response("one", 1))
    assert (await asyncio.wait_for(first, 5)).delta.text == "one"
    # The caller reads slowly (its writes wait): Triton is not what is slow.
    call.send(triton_response(" two", 1))
    await asyncio.sleep(3 * STALL_S)
    assert (await asyncio.wait_for(anext(deltas), 5)).delta.text == " two"
    call.send(triton_response("", 0, final=True, finish_reason="stop", prompt_tokens=3))
    assert (await asyncio.wait_for(anext(deltas), 5)).HasField("completion")
    with pytest.raises(StopAsyncIteration):
        await anext(deltas)
    # Idle in the pool, the stream is no request's: nothing ends it.
    await asyncio.sleep(3 * STALL_S)
    assert not call.cancelled and len(backend.streams) == 1


def answer(call: ScriptedCall, text: str = "hi") -> None:
    call.send(triton_response(text, 1))
    call.send(triton_response("", 0, final=True, finish_reason="stop", prompt_tokens=3))


async def test_a_stream_is_reused_after_its_requests_final_response_and_idles_as_no_work():
    call = ScriptedCall()
    stream, backend = stream_on(call, idle_streams=2)
    answer(call, "one")
    assert [r.delta.text async for r in stream][0] == "one"
    assert (len(backend.streams), backend.in_flight, len(backend.calls)) == (1, 0, 0)

    answer(call, "two")
    assert [r.delta.text async for r in next_stream(backend)][0] == "two"
    assert backend.opened == [call] and len(call.requests) == 2
    assert not (call.cancelled or call.half_closed), "kept open for the next request"
    ids = {request.id for request in call.requests}
    assert len(ids) == 2, "each request its own id on the one stream"


async def test_without_room_in_the_pool_a_stream_is_closed_cleanly_not_cancelled():
    call = ScriptedCall()
    stream, backend = stream_on(call, idle_streams=0)
    answer(call)
    # Triton has not ended the stream yet: the answer waits for none of it.
    async with asyncio.timeout(5):
        assert kinds([r async for r in stream]) == ["delta", "completion"]
    assert (backend.in_flight, len(backend.calls)) == (0, 0)
    await until(lambda: call.half_closed)
    call.send(grpc.aio.EOF)
    await until(call.done)
    assert not call.cancelled
    assert len(backend.streams) == 0


async def test_a_stream_that_fails_or_hangs_as_it_closes_after_its_answer_fails_no_generation(monkeypatch):
    # What Triton's connection does after the final response (it dropped:
    # the status UNAVAILABLE; it stalled: the wait for the stream's end,
    # until the caller's deadline) ended whole answers with an error.
    monkeypatch.setattr(backends, "STREAM_CLOSE_TIMEOUT_S", 0.05)
    dropped = ScriptedCall()
    stream, backend = stream_on(dropped, idle_streams=0)
    answer(dropped)
    failed_with_unavailable(dropped)
    assert kinds([r async for r in stream]) == ["delta", "completion"]

    stalled = ScriptedCall()
    stream, backend = stream_on(stalled, idle_streams=0)
    answer(stalled)
    async with asyncio.timeout(5):
        assert kinds([r async for r in stream]) == ["delta", "completion"]
    # Past its close's time it is cancelled, not left open.
    await until(lambda: stalled.cancelled)


def failed_with_unavailable(call: ScriptedCall) -> None:
    metadata = grpc.aio.Metadata()
    call.send(grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, metadata, metadata, "gone"))


def model_error(call: ScriptedCall) -> None:
    call.send(service_pb2.ModelStreamInferResponse(error_message="model broke"))


def ended_early(call: ScriptedCall) -> None:
    call.send(grpc.aio.EOF)


@pytest.mark.parametrize("ending", [failed_with_unavailable, model_error, ended_early])
async def test_a_stream_whose_request_failed_is_not_reused(ending):
    call = ScriptedCall()
    stream, backend = stream_on(call, idle_streams=2)
    call.send(triton_response("partial", 1))
    ending(call)
    with pytest.raises((grpc.aio.AioRpcError, MeshgateError)):
        async for _ in stream:
            pass
    assert len(backend.streams) == 0
    assert call.done()

    following = next_stream(backend)
    deltas = aiter(following)
    first = asyncio.ensure_future(anext(deltas))
    await until(lambda: len(backend.opened) == 2)
    answer(backend.opened[1])
    assert (await asyncio.wait_for(first, 5)).delta.text == "hi"
    await deltas.aclose()
    assert backend.opened[1] is not call


async def test_a_response_for_another_request_is_never_passed_on_and_ends_the_stream():
    call = ScriptedCall()
    stream, backend = stream_on(call, idle_streams=2)
    deltas = aiter(stream)
    first = asyncio.ensure_future(anext(deltas))
    await until(lambda: call.requests)
    own = triton_response("mine", 1)
    own.infer_response.id = call.requests[0].id
    call.send(own)
    assert (await asyncio.wait_for(first, 5)).delta.text == "mine"
    foreign = triton_response("not yours", 1, final=True, finish_reason="stop")
    foreign.infer_response.id = "another-request"
    call.send(foreign)
    with pytest.raises(MeshgateError) as raised:
        await anext(deltas)
    assert (raised.value.code, raised.value.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        Reason.STREAM_ENDED_EARLY,
    )
    # The stream is not what it seemed: cancelled, never pooled for the next request.
    assert call.cancelled and len(backend.streams) == 0
    assert (backend.in_flight, len(backend.calls)) == (0, 0)


async def test_a_stream_left_early_is_cancelled_and_not_reused():
    call = ScriptedCall()
    stream, backend = stream_on(call, idle_streams=2)
    call.send(triton_response("first", 1))
    deltas = aiter(stream)
    assert (await anext(deltas)).delta.text == "first"
    await deltas.aclose()
    assert call.cancelled and len(backend.streams) == 0
    assert (backend.in_flight, len(backend.calls)) == (0, 0)


async def test_a_pooled_stream_that_ended_while_idle_is_skipped():
    call = ScriptedCall()
    stream, backend = stream_on(call, idle_streams=2)
    answer(call)
    async for _ in stream:
        pass
    assert len(backend.streams) == 1
    ended_early(call)
    await call.read()  # as grpc does when the call ends: done() from then on

    following = next_stream(backend)
    deltas = aiter(following)
    first = asyncio.ensure_future(anext(deltas))
    await until(lambda: len(backend.opened) == 2)
    answer(backend.opened[1])
    assert (await asyncio.wait_for(first, 5)).delta.text == "hi"
    await deltas.aclose()
    assert not following.reused


def internal_error_from_core() -> grpc.aio.AioRpcError:
    metadata = grpc.aio.Metadata()
    return grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, metadata, metadata, "Internal error from Core")


@pytest.mark.parametrize(
    "write_failure",
    # Ended between take and write; the connection died under it (Triton killed).
    [asyncio.InvalidStateError("RPC already finished."), internal_error_from_core()],
)
async def test_a_pooled_stream_that_fails_the_write_reads_as_unavailable_before_any_response(write_failure):
    call = ScriptedCall()
    stream, backend = stream_on(call, idle_streams=2)
    answer(call)
    async for _ in stream:
        pass
    assert backend.streams.take() == (call, True)

    async def failing_write(request):
        raise write_failure

    call.write = failing_write
    backend.streams.take = lambda: (call, True)
    following = next_stream(backend)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for _ in following:
            pass
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert following.reused and not following.started


async def finished_then_taken_again():
    """Generation A read to its completion (its stream back in the pool, A's
    generator still open), then generation B's request on the same call,
    B waiting for its first response (``first``)."""
    call = ScriptedCall()
    stream, backend = stream_on(call, idle_streams=2)
    answer(call, "one")
    a = aiter(stream)
    assert (await anext(a)).delta.text == "one"
    assert (await anext(a)).HasField("completion")
    assert len(backend.streams) == 1, "given back before the completion went out"
    b = aiter(next_stream(backend))
    first = asyncio.ensure_future(anext(b))
    await until(lambda: len(call.requests) == 2)
    return call, backend, a, b, first


async def test_closing_a_finished_generation_leaves_its_stream_to_the_request_that_took_it_next():
    # A's handler goes on after its completion (the write to its caller), and
    # its generator is closed then: by now B's request rides the same call.
    call, backend, a, b, first = await finished_then_taken_again()
    await a.aclose()
    assert not call.cancelled, "A's close must not cancel B's request"
    assert len(backend.calls) == 1, "B's call is still open work"
    answer(call, "two")
    assert (await asyncio.wait_for(first, 5)).delta.text == "two"
    assert (await asyncio.wait_for(anext(b), 5)).HasField("completion")
    assert backend.opened == [call] and len(backend.streams) == 1


async def test_a_cancel_reaching_a_finished_generation_is_its_own_not_the_probes_end_of_the_next():
    # Nothing A awaits after giving its stream back, so a cancel reaches it
    # there only thrown in at the completion (athrow). The probes have ended
    # B's request on the same call meanwhile: that end is B's, and A's
    # cancel must go on, not pass for "the probes cut short a finished answer".
    call, backend, a, b, first = await finished_then_taken_again()
    assert backend.calls.end({"tiny_gpt"}) == 1

    with pytest.raises(asyncio.CancelledError):
        await a.athrow(asyncio.CancelledError())
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await asyncio.wait_for(first, 5)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE, "B's request left rotation"


def test_the_pool_keeps_at_most_its_bound_and_drop_cancels_the_idle():
    opened = []
    streams = TritonStreams(lambda: opened.append(ScriptedCall()) or opened[-1], idle_limit=2)
    taken = [streams.take() for _ in range(3)]
    assert [reused for _, reused in taken] == [False, False, False]
    assert [streams.give_back(call) for call, _ in taken] == [True, True, False]
    assert len(streams) == 2 and streams.opened == 3
    call, reused = streams.take()
    assert reused and call is opened[1], "the most recently used first"
    assert streams.give_back(call)
    assert streams.drop() == 2
    assert opened[0].cancelled and opened[1].cancelled and not opened[2].cancelled
    assert len(streams) == 0
