"""Property-based fuzzing of every RPC of the four services, over the real
mesh: arbitrary messages and raw garbage bytes, each with a deadline.

Whatever arrives, the answer is never INTERNAL or UNKNOWN, every failure
carries an ErrorInfo, no call overruns its deadline, a stream that ends OK
ends with its completion, and afterwards every service still answers and no
process has grown without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import os
import pathlib
import resource

import grpc
import pytest
from google.protobuf import message_factory
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st

from meshgate.cache.v1 import cache_service_pb2
from meshgate.context.v1 import context_service_pb2
from meshgate.inference.v1 import inference_service_pb2
from meshgate.router.v1 import admin_service_pb2, router_service_pb2
from tests.fuzz.conftest import ADMIN_AUTH, AUTH, DEADLINE_S, FORBIDDEN, FUZZ, LocalSendFailure
from tests.fuzz.strategies import GARBAGE, TEXT, messages, plausible
from tests.mesh import chat_session_admitted, router_channel

pytestmark = [pytest.mark.integration, pytest.mark.fuzz]

SERVICES = {
    "router": router_service_pb2.DESCRIPTOR.services_by_name["RouterService"],
    # Served by the router on its port, behind the admin credential.
    "admin": admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"],
    "context": context_service_pb2.DESCRIPTOR.services_by_name["ContextService"],
    "cache": cache_service_pb2.DESCRIPTOR.services_by_name["CacheService"],
    "inference": inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"],
}
RPCS = [(service, method) for service, descriptor in SERVICES.items() for method in descriptor.methods]
RPC_IDS = [f"{service}.{method.name}" for service, method in RPCS]

# The router's callers present an API key; these are the ways to get it wrong.
AUTHORIZATION = st.one_of(
    st.just(AUTH),
    st.just(()),
    st.sampled_from([(("authorization", "Bearer wrong"),), (("authorization", "Basic Zm9vOmJhcg=="),)]),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(
        lambda value: (("authorization", value),)
    ),
)
# Only the completion may end a stream that ends OK.
_COMPLETES = {"Chat", "Generate"}


@pytest.fixture(scope="module")
async def channels(fuzz_mesh):
    """One channel per service: the router as its clients reach it, the
    others as the router (their only caller besides the cache) does."""
    opened = {"router": grpc.aio.insecure_channel(fuzz_mesh["router"])}
    opened["admin"] = opened["router"]
    for service in ("context", "cache", "inference"):
        opened[service] = router_channel(fuzz_mesh[service], service)
    yield opened
    for channel in {id(channel): channel for channel in opened.values()}.values():
        await channel.close()


def _multicallable(channel: grpc.aio.Channel, service: str, method, raw: bool):
    path = f"/{SERVICES[service].full_name}/{method.name}"
    if raw:
        serializer = deserializer = None
    else:
        serializer = message_factory.GetMessageClass(method.input_type).SerializeToString
        deserializer = message_factory.GetMessageClass(method.output_type).FromString
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    return kind(path, request_serializer=serializer, response_deserializer=deserializer)


async def _call(callable_, method, requests: list, metadata, wait_for_admission: bool = True) -> list:
    """All responses of one call; raises AioRpcError if it ends non-OK.
    ``wait_for_admission``: a client stream writes nothing until the router
    has admitted it (tests/mesh.py chat_session_admitted)."""
    if not method.client_streaming:
        call = callable_(requests[0], timeout=DEADLINE_S, metadata=metadata)
        return [response async for response in call] if method.server_streaming else [await call]
    call = callable_(timeout=DEADLINE_S, metadata=metadata)
    # ChatSession, the mesh's one client stream: one the router refused at
    # open (its API key) is only read, for the router's status.
    if wait_for_admission and not await chat_session_admitted(call):
        return [response async for response in call]
    for request in requests:
        if call.done():
            break
        try:
            await call.write(request)
        except asyncio.InvalidStateError:
            break  # the server has answered already; its status follows
        except grpc.aio.AioRpcError as error:
            # grpc-python's own doing: a write that meets a stream the server
            # has just ended (say, for a malformed request before it)
            # replaces the server's status with a local INTERNAL ("Failed
            # execute_batch").
            if error.code() == grpc.StatusCode.INTERNAL and "execute_batch" in error.debug_error_string():
                raise LocalSendFailure() from error
            raise
    if not call.done():
        with contextlib.suppress(asyncio.InvalidStateError):
            await call.done_writing()
    if method.server_streaming:
        return [response async for response in call]
    return [await call]


def _check_stream(rpc: str, method, responses: list) -> None:
    if method.name in _COMPLETES and responses:
        assert responses[-1].HasField("completion"), f"{rpc} ended OK without its completion"
    if method.name == "ChatSession":
        for response in responses:
            if response.HasField("failure"):
                status = status_pb2.Status.FromString(response.failure)
                assert grpc.StatusCode(_code(status.code)) not in FORBIDDEN, f"{rpc} turn failed: {status}"
                assert status.details, f"{rpc} turn failure without ErrorInfo: {status}"


def _code(number: int):
    return next(code for code in grpc.StatusCode if code.value[0] == number).value


@pytest.mark.parametrize("rpc", RPCS, ids=RPC_IDS)
@FUZZ
@given(data=st.data())
async def test_arbitrary_messages_get_a_clear_answer(channels, outcomes, rpc, data):
    service, method = rpc
    request = messages(method.input_type)
    if (near_valid := plausible(method.input_type)) is not None:
        request = st.one_of(request, near_valid)
    if method.client_streaming:
        requests = data.draw(st.lists(request, min_size=1, max_size=3))
    else:
        requests = [data.draw(request)]
    metadata = ()
    if service == "router":
        # Mostly the right key: a refused key ends the call before anything else is checked.
        right_key = data.draw(st.sampled_from([True, True, True, False]))
        metadata = AUTH if right_key else data.draw(AUTHORIZATION)
    elif service == "admin":
        # Mostly the admin credential; else a tenant's key or a wrong one.
        metadata = data.draw(st.sampled_from([ADMIN_AUTH, ADMIN_AUTH, ADMIN_AUTH, AUTH]) | AUTHORIZATION)
    name = f"{service}.{method.name}"
    callable_ = _multicallable(channels[service], service, method, raw=False)
    responses = await outcomes.observe(name, lambda: _call(callable_, method, requests, metadata))
    _check_stream(name, method, responses)


@pytest.mark.parametrize("rpc", RPCS, ids=RPC_IDS)
@FUZZ
@given(data=st.data())
async def test_garbage_bytes_get_a_clear_answer(channels, outcomes, rpc, data):
    service, method = rpc
    count = data.draw(st.integers(1, 3)) if method.client_streaming else 1
    requests = [data.draw(GARBAGE) for _ in range(count)]
    metadata = {"router": AUTH, "admin": ADMIN_AUTH}.get(service, ())
    callable_ = _multicallable(channels[service], service, method, raw=True)
    name = f"{service}.{method.name} (bytes)"
    # The right key: a stream is never refused at open, and its first
    # garbage message ends it. Written at once, before the router reads the
    # first, the others meet no ended call, so far more statuses reach the
    # checks than when written after the admission (bench/reliability.md).
    garbage = functools.partial(_call, callable_, method, requests, metadata, wait_for_admission=False)
    await outcomes.observe(name, garbage)


@FUZZ
@given(texts=st.lists(TEXT, max_size=140).filter(lambda t: sum(map(len, t)) < 3_000_000))
async def test_embed_batches_of_any_size(channels, outcomes, texts):
    method = SERVICES["inference"].methods_by_name["Embed"]
    callable_ = _multicallable(channels["inference"], "inference", method, raw=False)
    request = inference_service_pb2.EmbedRequest(texts=texts)
    await outcomes.observe("inference.Embed (batches)", lambda: _call(callable_, method, [request], ()))


def _rss_bytes(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _release_freed_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS as it stands
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _process_tree(root: int) -> list[int]:
    """root and its descendants (Triton's model stubs are its children)."""
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def _triton_pid(triton_url: str) -> int:
    port = triton_url.rsplit(":", 1)[1]
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if command[0].endswith(b"tritonserver") and f"--grpc-port={port}".encode() in command:
                return int(entry.name)
    raise AssertionError(f"no tritonserver serves {triton_url}")


# Generous bounds: a leak or an unbounded request grows far past them
# (a 3.6 MB text once grew the embedding model alone to 3.6 GB).
MAX_TRITON_RSS = 3 * 1024**3
# Collected and trimmed, the in-process services read ~0.6 GiB after the fuzz
# profile (their embedding models included): 1 GiB leaves room, not a leak's.
MAX_TEST_PROCESS_RSS = 1024**3


async def test_every_service_survived_and_stayed_bounded(fuzz_mesh, channels, triton_url, outcomes):
    assert outcomes.counts, "runs after the fuzzing tests in this module"
    for service, channel in channels.items():
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    list_models = SERVICES["router"].methods_by_name["ListModels"]
    router = _multicallable(channels["router"], "router", list_models, raw=False)
    models = await router(router_service_pb2.ListModelsRequest(), timeout=DEADLINE_S, metadata=AUTH)
    assert [m.alias for m in models.models] == ["tiny-gpt"]
    triton_rss = sum(_rss_bytes(pid) for pid in _process_tree(_triton_pid(triton_url)))
    assert triton_rss < MAX_TRITON_RSS, f"Triton and its model stubs hold {triton_rss / 2**20:.0f} MiB"
    # What the services still hold, not what the allocator kept of what they
    # freed: after the fuzz profile's megabyte texts, glibc's arenas alone
    # read 1.9-2.3 GiB of RSS, 0.6 GiB once collected and trimmed.
    _release_freed_memory()
    own_rss = _rss_bytes(os.getpid())
    assert own_rss < MAX_TEST_PROCESS_RSS, f"the in-process services hold {own_rss / 2**20:.0f} MiB"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"\nRSS: Triton tree {triton_rss / 2**20:.0f} MiB, services {own_rss / 2**20:.0f} MiB "
        f"(peak {peak / 2**20:.0f} MiB)"
    )
