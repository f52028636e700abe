"""Bodies costly to parse are parsed in a child process, not on the router's
event loop: a real BodyParser and its real child, and a real HttpServer on
loopback with a recording turn behind it (no mesh)."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2

from meshgate.config import ModelSettings, RouterSettings
from meshgate.errors import MeshgateError, internal_error
from meshgate.reasons import Reason
from services.router import body_parser
from services.router.admission import TenantCalls
from services.router.auth import Authenticator
from services.router.body_parser import INLINE_MAX_BYTES, INLINE_MAX_CONTAINERS, BodyParser, parses_inline
from services.router.http_edge import ChatCall, HttpEdge, HttpServer, chat_call, embeddings_body
from tests.integration.test_http_edge_bodies import RecordingPipeline
from tests.unit.test_router_http_edge import KEY

pytestmark = pytest.mark.integration

MAX_MESSAGES = RouterSettings().max_messages
# 8 MiB of empty arrays where the messages go: 1.2 s of json.loads on the
# loop (services/router/body_parser.py), refused for their count.
HEAVY = b'{"model":"m","messages":[' + b"[]," * (8 * 1024 * 1024 // 3 - 20) + b"[]]}"


def chat_body(content: str) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()


# A body past the inline bound that the edge takes: 200 KiB of prose.
LONG = chat_body("A sentence, with a comma or two, that goes on. " * 4300)


def raises_a_bug(body: bytes, bound: int):
    """A decoder with a bug (the child reports it and goes on)."""
    raise ZeroDivisionError(len(body))


async def in_the_child(parser: BodyParser) -> None:
    """Returns once a body is in ``parser``'s child (fails after 10 s)."""

    async def busy() -> None:
        # A child under way, not one still starting.
        while not (parser.busy and parser.child_pid):
            await asyncio.sleep(0.001)

    await asyncio.wait_for(busy(), 10)


def refusal(error: MeshgateError) -> tuple:
    return error.code, error.reason, error.message, error.metadata


def test_only_small_bodies_of_few_containers_parse_inline():
    assert parses_inline(chat_body("hi"))
    assert parses_inline(b" " * INLINE_MAX_BYTES)
    assert not parses_inline(b" " * (INLINE_MAX_BYTES + 1))
    assert parses_inline(b"[" * INLINE_MAX_CONTAINERS)
    assert not parses_inline(b"[" * (INLINE_MAX_CONTAINERS - 1) + b"{{")
    assert not parses_inline(LONG)
    # A whole turn of router.max_messages messages is parsed on the loop.
    many = {"model": "m", "messages": [{"role": "user", "content": "hi"}] * MAX_MESSAGES}
    assert parses_inline(json.dumps(many).encode())


def test_a_refusal_crosses_a_pickle_whole():
    """The child sends its refusals back pickled: an Exception pickles as its
    message alone, which MeshgateError's constructor cannot take."""
    detail = error_details_pb2.QuotaFailure(
        violations=[error_details_pb2.QuotaFailure.Violation(subject="t")]
    )
    error = MeshgateError(grpc.StatusCode.RESOURCE_EXHAUSTED, "R", "m", {"k": "v"}, "d", [detail])
    back = pickle.loads(pickle.dumps(error))
    assert (back.code, back.reason, back.message, back.metadata, back.domain, back.details) == (
        error.code,
        "R",
        "m",
        {"k": "v"},
        "d",
        [detail],
    )


async def test_a_costly_body_is_decoded_in_the_child_exactly_as_inline():
    parser = BodyParser()
    try:
        call = await parser.decode(chat_call, LONG, MAX_MESSAGES)
        assert parser.child_pid not in (None, os.getpid())
        assert call.request == ChatCall(json.loads(LONG), MAX_MESSAGES).request
        with pytest.raises(MeshgateError) as in_child:
            await parser.decode(chat_call, HEAVY, MAX_MESSAGES)
        with pytest.raises(MeshgateError) as inline:
            chat_call(HEAVY, MAX_MESSAGES)
        assert refusal(in_child.value) == refusal(inline.value)
        assert in_child.value.reason == Reason.TOO_MANY_MESSAGES
        # The embeddings' decoder too, with its own bound.
        texts = json.dumps({"model": "e", "input": ["x" * 100] * 5000}).encode()
        with pytest.raises(MeshgateError) as too_many:
            await parser.decode(embeddings_body, texts, 128)
        assert too_many.value.reason == Reason.TOO_MANY_TEXTS
        assert (await parser.decode(embeddings_body, texts, 5000)).texts == ["x" * 100] * 5000
    finally:
        await parser.close()


def resident_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


async def test_the_child_lets_go_of_a_refused_body():
    """The refusal's traceback held the parsed body in a cycle with the
    child's loop: after 2.8 million empty arrays the child held 310 MiB
    (88 MiB before) until a garbage collection came."""
    parser = BodyParser()
    try:
        await parser.decode(chat_call, LONG, MAX_MESSAGES)
        before = resident_kib(parser.child_pid)
        with pytest.raises(MeshgateError):
            await parser.decode(chat_call, HEAVY, MAX_MESSAGES)
        assert resident_kib(parser.child_pid) < before + 100 * 1024
    finally:
        await parser.close()


async def test_a_bug_in_the_child_is_an_internal_error_and_the_child_goes_on():
    parser = BodyParser()
    try:
        with pytest.raises(MeshgateError) as raised:
            await parser.decode(raises_a_bug, LONG, 0)
        assert refusal(raised.value) == refusal(internal_error())
        pid = parser.child_pid
        assert (await parser.decode(chat_call, LONG, MAX_MESSAGES)).request.model == "m"
        assert parser.child_pid == pid
    finally:
        await parser.close()


async def test_a_child_that_dies_fails_its_body_and_the_next_body_gets_a_new_one():
    parser = BodyParser()
    try:
        await parser.decode(chat_call, LONG, MAX_MESSAGES)
        first = parser.child_pid
        decoding = asyncio.ensure_future(parser.decode(chat_call, HEAVY, MAX_MESSAGES))
        await in_the_child(parser)
        os.kill(first, signal.SIGKILL)
        with pytest.raises(MeshgateError) as raised:
            await decoding
        assert raised.value.code == grpc.StatusCode.INTERNAL
        assert (await parser.decode(chat_call, LONG, MAX_MESSAGES)).request.model == "m"
        assert parser.child_pid not in (None, first)
    finally:
        await parser.close()


async def test_a_hung_child_is_killed_at_the_timeout():
    # Room for the first exchange, which imports the decoders in the child.
    parser = BodyParser(timeout_s=3.0)
    try:
        await parser.decode(chat_call, LONG, MAX_MESSAGES)
        hung = parser.child_pid
        os.kill(hung, signal.SIGSTOP)
        with pytest.raises(MeshgateError) as raised:
            await parser.decode(chat_call, LONG, MAX_MESSAGES)
        assert raised.value.code == grpc.StatusCode.INTERNAL
        assert parser.child_pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(hung, 0)
    finally:
        await parser.close()


async def test_a_caller_that_leaves_mid_parse_leaves_the_next_body_its_own_answer():
    """The child parses the body of a caller that left to its end; the next
    body waits for it and reads its own answer, not the left one's."""
    parser = BodyParser()
    try:
        await parser.decode(chat_call, LONG, MAX_MESSAGES)
        left = asyncio.ensure_future(parser.decode(chat_call, HEAVY, MAX_MESSAGES))
        await in_the_child(parser)
        left.cancel()
        other = chat_body("another question, " * 8000)
        call = await parser.decode(chat_call, other, MAX_MESSAGES)
        assert call.request.messages[0].content == json.loads(other)["messages"][0]["content"]
    finally:
        await parser.close()


async def test_closing_ends_the_child_and_refuses_later_bodies():
    parser = BodyParser()
    await parser.decode(chat_call, LONG, MAX_MESSAGES)
    child = parser._child
    await parser.close()
    assert child.returncode == 0
    with pytest.raises(MeshgateError) as raised:
        await parser.decode(chat_call, LONG, MAX_MESSAGES)
    assert raised.value.code == grpc.StatusCode.INTERNAL
    # A small body needs no child.
    assert parser.child_pid is None
    assert (await parser.decode(chat_call, chat_body("hi"), MAX_MESSAGES)).request.messages[0].content == "hi"


async def test_a_body_whose_caller_leaves_while_it_waits_is_never_parsed():
    """A review: the exchange of a caller that hung up was kept, queued for
    the child with its body (80 costly bodies posted and left in 6 s held
    1.3 GiB). Only the body in the child is finished for a caller gone."""
    parser = BodyParser()
    try:
        await parser.decode(chat_call, LONG, MAX_MESSAGES)
        child = parser.child_pid
        os.kill(child, signal.SIGSTOP)
        first = asyncio.ensure_future(parser.decode(chat_call, LONG, MAX_MESSAGES, "t"))
        await in_the_child(parser)
        waiting = asyncio.ensure_future(parser.decode(chat_call, HEAVY, MAX_MESSAGES, "t"))
        await asyncio.sleep(0.05)
        assert parser.queued == 2
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert parser.queued == 1
        os.kill(child, signal.SIGCONT)
        assert (await first).request.model == "m"
        assert (parser.queued, parser.busy) == (0, False)
    finally:
        await parser.close()


async def test_large_bodies_waiting_are_bounded_per_tenant_and_in_all():
    parser = BodyParser()
    try:
        await parser.decode(chat_call, LONG, MAX_MESSAGES)
        child = parser.child_pid
        os.kill(child, signal.SIGSTOP)
        held = [
            asyncio.ensure_future(parser.decode(chat_call, LONG, MAX_MESSAGES, "a"))
            for _ in range(body_parser.MAX_QUEUED_PER_TENANT)
        ]
        await asyncio.sleep(0.05)
        with pytest.raises(MeshgateError) as per_tenant:
            await parser.decode(chat_call, LONG, MAX_MESSAGES, "a")
        assert (per_tenant.value.code, per_tenant.value.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.TOO_MANY_CALLS_IN_FLIGHT,
        )
        others = [
            asyncio.ensure_future(parser.decode(chat_call, LONG, MAX_MESSAGES, f"t{n}"))
            for n in range(body_parser.MAX_QUEUED - body_parser.MAX_QUEUED_PER_TENANT)
        ]
        await asyncio.sleep(0.05)
        with pytest.raises(MeshgateError) as replica:
            await parser.decode(chat_call, LONG, MAX_MESSAGES, "late")
        assert (replica.value.code, replica.value.reason) == (
            grpc.StatusCode.UNAVAILABLE,
            Reason.SERVICE_BUSY,
        )
        for refusal_ in (per_tenant.value, replica.value):
            assert any(isinstance(d, error_details_pb2.RetryInfo) for d in refusal_.details)
        # A small body is parsed on the loop whatever waits.
        assert (await parser.decode(chat_call, chat_body("hi"), MAX_MESSAGES, "a")).request.model == "m"
        os.kill(child, signal.SIGCONT)
        answered = await asyncio.gather(*held, *others)
        assert [call.request.model for call in answered] == ["m"] * body_parser.MAX_QUEUED
        assert parser.queued == 0
    finally:
        await parser.close()


async def test_a_body_that_waits_past_its_bound_is_refused_as_busy():
    parser = BodyParser(wait_s=0.3)
    try:
        await parser.decode(chat_call, LONG, MAX_MESSAGES)
        child = parser.child_pid
        os.kill(child, signal.SIGSTOP)
        first = asyncio.ensure_future(parser.decode(chat_call, LONG, MAX_MESSAGES))
        await in_the_child(parser)
        with pytest.raises(MeshgateError) as busy:
            await parser.decode(chat_call, LONG, MAX_MESSAGES)
        assert (busy.value.code, busy.value.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.SERVICE_BUSY)
        assert parser.queued == 1
        os.kill(child, signal.SIGCONT)
        assert (await first).request.model == "m"
    finally:
        await parser.close()


async def test_a_child_that_cannot_start_is_not_started_again_for_each_body(monkeypatch):
    """This test module as the child: it imports and exits, answering none."""
    starts = []
    start = asyncio.create_subprocess_exec

    async def counted(*args, **kwargs):
        starts.append(args)
        return await start(*args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", counted)
    parser = BodyParser(module=__name__)
    try:
        with pytest.raises(MeshgateError) as failed:
            await parser.decode(chat_call, LONG, MAX_MESSAGES)
        assert failed.value.code == grpc.StatusCode.INTERNAL
        for _ in range(2):
            with pytest.raises(MeshgateError) as refused:
                await parser.decode(chat_call, LONG, MAX_MESSAGES)
            assert (refused.value.code, refused.value.reason) == (
                grpc.StatusCode.UNAVAILABLE,
                Reason.SERVICE_BUSY,
            )
            (retry,) = [d for d in refused.value.details if isinstance(d, error_details_pb2.RetryInfo)]
            assert 1 <= retry.retry_delay.seconds <= body_parser.RESTART_BACKOFF_S
        assert len(starts) == 1
    finally:
        await parser.close()


async def test_children_that_die_of_their_bodies_are_replaced_every_time():
    """A final read: a replacement child killed on its first body was taken
    for one that cannot start, and every tenant's large body was refused
    for 30 s. Once any child has answered, a dead one died of its body."""
    parser = BodyParser()
    try:
        await parser.decode(chat_call, LONG, MAX_MESSAGES)
        for _ in range(2):
            dying = asyncio.ensure_future(parser.decode(chat_call, HEAVY, MAX_MESSAGES))
            await in_the_child(parser)
            os.kill(parser.child_pid, signal.SIGKILL)
            with pytest.raises(MeshgateError):
                await dying
        assert (await parser.decode(chat_call, LONG, MAX_MESSAGES)).request.model == "m"
    finally:
        await parser.close()


async def test_a_module_in_the_working_directory_does_not_shadow_the_childs(tmp_path, monkeypatch):
    """A review: python -m put the working directory first on the child's
    path alone, and a token.py there failed every large body."""
    (tmp_path / "token.py").write_text("raise SystemExit('the working directory was imported')\n")
    monkeypatch.chdir(tmp_path)
    parser = BodyParser()
    try:
        assert (await parser.decode(chat_call, LONG, MAX_MESSAGES)).request.model == "m"
    finally:
        await parser.close()


@pytest.mark.parametrize("depth", [128, 129, 985, 5000])
async def test_a_body_nested_deep_gets_one_answer_inline_and_in_the_child(depth):
    """A review: the recursion limit counts the frames on the stack, so 982
    levels were a 400 on the loop and a 200 in the child. One bound now."""
    # The body's object, its messages and the message are three levels.
    nested = "[" * (depth - 3) + "]" * (depth - 3)
    message = '{"role": "assistant", "content": "ok", "annotations": ' + nested + "}"
    body = ('{"model": "m", "messages": [' + message + ', {"role": "user", "content": "hi"}]}').encode()
    padded = body + b" " * (INLINE_MAX_BYTES + 1)
    assert parses_inline(body) == (depth < INLINE_MAX_CONTAINERS) and not parses_inline(padded)
    parser = BodyParser()
    try:
        answers = []
        for decode in (
            lambda: chat_call(body, MAX_MESSAGES),
            lambda: parser.decode(chat_call, padded, MAX_MESSAGES),
        ):
            try:
                call = decode()
                call = await call if asyncio.iscoroutine(call) else call
                answers.append(("served", call.request.messages[1].content))
            except MeshgateError as error:
                answers.append(refusal(error))
        assert answers[0] == answers[1]
        assert (answers[0][0] == "served") is (depth <= 128)
    finally:
        await parser.close()


async def test_a_deep_body_with_a_key_twice_gets_one_answer_inline_and_in_the_child():
    """A final read: past the depth where the loop's parse met the recursion
    limit (the frames under it counted), the loop said "too deep" and the
    child, its stack shallower, "a key twice". Both parse on a new thread's
    stack now, so they meet the limit at one depth, whatever it is."""
    parser = BodyParser()
    try:
        for depth in range(970, 1011, 8):
            nested = '{"x": ' * depth + '{"a": 1, "a": 2}' + "}" * depth
            body = (
                '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "metadata": ' + nested + "}"
            )
            inline, padded = body.encode(), body.encode() + b" " * (INLINE_MAX_BYTES + 1)
            assert parses_inline(inline) and not parses_inline(padded)
            with pytest.raises(MeshgateError) as on_the_loop:
                chat_call(inline, MAX_MESSAGES)
            with pytest.raises(MeshgateError) as in_the_child_:
                await parser.decode(chat_call, padded, MAX_MESSAGES)
            assert refusal(on_the_loop.value) == refusal(in_the_child_.value), depth
    finally:
        await parser.close()


def test_the_child_ends_when_its_pipe_does():
    """A router killed outright leaves no parser behind: the child reads the
    end of its pipe and exits."""
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-m", body_parser.__name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    frame = pickle.dumps((chat_call.__module__, chat_call.__qualname__, chat_body("hi"), 4))
    child.stdin.write(len(frame).to_bytes(8, "big") + frame)
    child.stdin.flush()
    length = int.from_bytes(child.stdout.read(8), "big")
    outcome, call = pickle.loads(child.stdout.read(length))
    assert (outcome, call.request.messages[0].content) == ("decoded", "hi")
    child.stdin.close()
    assert child.wait(10) == 0
    child.stdout.close()


# --- through the edge -----------------------------------------------------------------------


@pytest.fixture
async def edge():
    """(an httpx client on a real edge's /v1, the edge, the pipeline behind it)."""
    settings = RouterSettings(dev_api_key=KEY)
    pipeline = RecordingPipeline()
    app = HttpEdge(settings, {"m": ModelSettings()}, Authenticator(settings), TenantCalls(0), pipeline, None)
    server = HttpServer(app, "127.0.0.1:0", 5.0, 65536, stalled_client_timeout_s=30.0)
    await server.start()
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{server.port}/v1",
            headers={"authorization": f"Bearer {KEY}"},
            timeout=30,
        ) as http:
            yield http, app, pipeline
    finally:
        await server.stop()
        await app.close()


async def test_a_costly_body_leaves_the_loop_to_serve_others_while_it_is_parsed(edge):
    """The defect: 8 MiB of empty arrays held the router's loop 1.2 s, every
    other request and stream waiting. Now another request is answered while
    the child still parses it; then it is refused as before, with its reason."""
    http, app, pipeline = edge
    heavy = asyncio.ensure_future(http.post("/chat/completions", content=HEAVY))
    await in_the_child(app._bodies)
    models = await http.get("/models")
    assert models.status_code == 200
    # Answered while the costly body was still in the child.
    assert app._bodies.busy and not heavy.done()
    answer = await heavy
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "TOO_MANY_MESSAGES"
    assert pipeline.requests == []


async def test_a_long_body_parsed_in_the_child_is_served(edge):
    http, app, pipeline = edge
    pipeline.requests.clear()
    answer = await http.post("/chat/completions", content=LONG)
    assert answer.status_code == 200, answer.text
    assert app._bodies.child_pid is not None
    assert [m.content for m in pipeline.requests[0].messages] == [json.loads(LONG)["messages"][0]["content"]]


async def test_a_refusal_from_the_child_reads_as_an_inline_one(edge):
    http, _, _ = edge
    wide = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["{[" * 30] * 9}
    padded = dict(wide, metadata={"note": "[" * 60})
    inline, in_child = json.dumps(wide).encode(), json.dumps(padded).encode() + b" " * INLINE_MAX_BYTES
    assert parses_inline(inline) and not parses_inline(in_child)
    answers = [await http.post("/chat/completions", content=body) for body in (inline, in_child)]
    assert [a.status_code for a in answers] == [400, 400]
    assert answers[0].json()["error"] == answers[1].json()["error"]
    assert answers[0].json()["error"]["code"] == "INVALID_STOP"
