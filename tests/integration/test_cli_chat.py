"""`meshgate chat` as a user runs it, a process of its own, against real
routers in front of real context, cache and inference services, Redis and
Triton."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys

import pytest

from meshgate.common.v1 import common_pb2
from meshgate.local.stack import REPO_ROOT, free_port
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from tests.integration.conftest import (
    running_router,
    serve_tiny_gpt,
    service_settings,
    triton_cancellations,
    until_triton_cancels,
)
from tests.mesh import bounded_channel

pytestmark = pytest.mark.integration

KEY = "cli-test-key"
QUESTION = "Where do rivers begin?"
MAX_TOKENS = 12
SUMMARY = re.compile(
    r"\n\ncache: bypassed\ntokens: (\d+) prompt \+ (\d+) completion( \(cut at max_tokens; [^)]*\))?\n"
    r"time to first token: [\d.]+ ms\ntotal time: [\d.]+ ms\ndeployment: (\S+)   trace: \S*\n$"
)


@pytest.fixture(scope="module")
async def routers(redis_url, inference_address) -> dict[str, str]:
    """Two routers whose tiny-gpt deployments are named apart, so the CLI's
    summary says which one answered: deployment name -> router address."""
    async with contextlib.AsyncExitStack() as stack:
        addresses = {}
        for name in ("replica-a", "replica-b"):
            settings = service_settings(redis_url, inference_address, KEY)
            serve_tiny_gpt(settings, inference_address, name)
            addresses[name] = await stack.enter_async_context(running_router(settings))
        yield addresses


async def started_chat(
    *arguments: str, router: str, api_key: str = KEY, stdout: int = asyncio.subprocess.PIPE
) -> asyncio.subprocess.Process:
    """`meshgate chat` started, its stderr piped, its stdout too unless given."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshgate.cli",
        "chat",
        "--router",
        router,
        "--api-key",
        api_key,
        "--model",
        "tiny-gpt",
        "--max-tokens",
        str(MAX_TOKENS),
        "--cache",
        "bypass",
        *arguments,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )


async def meshgate_chat(*arguments: str, router: str, api_key: str = KEY) -> tuple[int, str, str]:
    """Runs `meshgate chat` to its end: exit status, stdout, stderr."""
    return await ended(await started_chat(*arguments, router=router, api_key=api_key))


async def meshgate_sessions(*arguments: str, router: str, api_key: str = KEY) -> tuple[int, str, str]:
    """Runs `meshgate sessions` to its end: exit status, stdout, stderr."""
    command = ("sessions", *arguments, "--router", router, "--api-key", api_key)
    return await ended(
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meshgate.cli",
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO_ROOT,
        )
    )


async def ended(process: asyncio.subprocess.Process) -> tuple[int, str, str]:
    """``process`` waited for (killed after 120 s): exit status, stdout, stderr."""
    try:
        out, err = await asyncio.wait_for(process.communicate(), 120)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode, out.decode(), err.decode()


async def grpc_answer(router: str) -> tuple[str, pb.ChatCompletion]:
    """The same greedy request, straight over gRPC."""
    request = pb.ChatRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=QUESTION)],
        parameters=common_pb2.GenerationParameters(max_tokens=MAX_TOKENS, temperature=0.0, top_p=1.0),
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )
    async with bounded_channel(router) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        text, completion = [], None
        async for response in stub.Chat(request, metadata=[("authorization", f"Bearer {KEY}")], timeout=60):
            if response.HasField("completion"):
                completion = response.completion
            else:
                text.append(response.delta.text)
    return "".join(text), completion


def parsed(out: str) -> tuple[str, int, int, str]:
    """The streamed answer, prompt and completion tokens, and deployment."""
    summary = SUMMARY.search(out)
    assert summary is not None, out
    # A cut answer says so: tiny-gpt runs to MAX_TOKENS unless it stops first.
    assert (summary[3] is not None) == (int(summary[2]) == MAX_TOKENS), out
    return out[: summary.start()], int(summary[1]), int(summary[2]), summary[4]


async def test_chat_streams_the_routers_answer_then_its_summary(routers):
    status, out, err = await meshgate_chat(QUESTION, router=routers["replica-a"])
    assert status == 0, err
    text, prompt_tokens, completion_tokens, deployment = parsed(out)
    expected_text, completion = await grpc_answer(routers["replica-a"])
    # Greedy by default: the CLI printed exactly what the router streams.
    assert text == expected_text and text
    assert (prompt_tokens, completion_tokens) == (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
    )
    assert deployment == "replica-a"


async def test_an_address_list_is_balanced_over_its_replicas_past_one_that_refuses(routers):
    """A list went to grpc as one host name ("ip:port,ip:port") and failed
    to resolve; it is a list of replicas now, and a dead one is skipped."""
    # A port nothing listens on, first in the list: the call goes past it.
    refusing = f"127.0.0.1:{free_port()}"
    listed = ",".join([refusing, *routers.values()])
    served = []
    # Each run is a new channel, whose round-robin starts at a random
    # replica: both answer within 20 runs unless that is broken (or with
    # odds of 2 in a million).
    while set(served) != set(routers) and len(served) < 20:
        status, out, err = await meshgate_chat(QUESTION, router=listed)
        assert status == 0, err
        served.append(parsed(out)[3])
    assert set(served) == set(routers), served


async def test_a_refused_call_exits_non_zero_with_its_status_and_reason(routers):
    status, out, err = await meshgate_chat(QUESTION, router=routers["replica-a"], api_key="not-a-key")
    assert status == 1
    assert err.startswith(f"error: UNAUTHENTICATED [{Reason.API_KEY_INVALID}]: "), err
    assert "cache:" not in out


def listed(out: str) -> list[tuple[str, int, int]]:
    """`meshgate sessions list`'s lines after its header: id, version, turns."""
    header, *lines = out.splitlines()
    assert header.split()[:3] == ["session", "version", "turns"], out
    return [(line.split()[0], int(line.split()[1]), int(line.split()[2])) for line in lines]


async def test_sessions_new_chat_on_it_list_newest_first_then_delete(routers):
    """The CLI starts a session, `chat --session` continues it, the listing
    shows both sessions (newest first, the turns each holds) and forgets the
    deleted one."""
    router = routers["replica-a"]
    status, out, err = await meshgate_sessions("new", router=router)
    assert status == 0, err
    older = out.strip()
    status, out, err = await meshgate_chat("--session", older, QUESTION, router=router)
    assert status == 0, err
    status, out, err = await meshgate_sessions("new", router=router)
    assert status == 0, err
    newer = out.strip()
    assert newer != older

    # The listing pages through every session of the dev tenant (other tests
    # of this file's Redis may hold some): ours are there, in their order.
    status, out, err = await meshgate_sessions(router=router)
    assert status == 0, err
    rows = {session: (version, turns) for session, version, turns in listed(out)}
    order = [session for session, _, _ in listed(out)]
    assert rows[older] == (1, 2) and rows[newer] == (0, 0), out
    assert order.index(newer) < order.index(older), out

    status, out, err = await meshgate_sessions("delete", older, router=router)
    assert (status, out) == (0, f"deleted {older}\n"), err
    status, out, err = await meshgate_sessions("list", router=router)
    assert status == 0, err
    assert older not in {session for session, _, _ in listed(out)} and newer in out
    # Deleting it again names why it failed.
    status, _, err = await meshgate_sessions("delete", older, router=router)
    assert status == 1
    assert err.startswith(f"error: NOT_FOUND [{Reason.SESSION_NOT_FOUND}]: "), err


async def test_sessions_with_a_refused_key_exits_non_zero_with_its_status_and_reason(routers):
    status, out, err = await meshgate_sessions(router=routers["replica-a"], api_key="not-a-key")
    assert (status, out) == (1, ""), err
    assert err.startswith(f"error: UNAUTHENTICATED [{Reason.API_KEY_INVALID}]: "), err


async def test_sessions_delete_without_an_id_is_refused_before_any_call():
    status, _, err = await meshgate_sessions("delete", router="127.0.0.1:1")
    assert status == 2
    assert "delete takes a session id" in err


async def test_a_list_of_names_is_refused_before_any_call():
    status, _, err = await meshgate_chat(QUESTION, router="router-a:50051,router-b:50051")
    assert status == 2
    assert "use dns:///name:port" in err


# Long enough a stream (tiny-gpt's most, some 0.6 s) to be cut mid-way.
LONG = ("--max-tokens", "256")


async def test_ctrl_c_mid_stream_cancels_the_turn_and_exits_130_without_a_traceback(routers, triton_server):
    _, triton_log = triton_server
    cancelled_before = triton_cancellations(triton_log)
    process = await started_chat(QUESTION, *LONG, router=routers["replica-a"])
    try:
        # The answer is streaming: Ctrl-C, as a terminal sends it.
        await asyncio.wait_for(process.stdout.readexactly(1), 60)
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 130, err.decode()
    assert err == b""
    # The router stopped the turn: the model's request was cancelled.
    await until_triton_cancels(triton_log, cancelled_before)


async def test_output_into_a_closed_pipe_ends_quietly_as_sigpipe_would(routers):
    """`meshgate chat ... | head -c 1`: the reader is gone after one byte."""
    reader, writer = os.pipe()
    process = await started_chat(QUESTION, *LONG, router=routers["replica-a"], stdout=writer)
    os.close(writer)
    try:
        with open(reader, "rb", buffering=0) as pipe:
            assert await asyncio.to_thread(pipe.read, 1)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert err == b""
    assert process.returncode == 128 + signal.SIGPIPE
