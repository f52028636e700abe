"""The turns of a router killed outright (SIGKILL) or stalled (SIGSTOP) with
streams open, on real processes (router processes as ``meshgate up`` starts
them, context and cache services, the inference service, Triton's tiny_gpt,
Redis): another router claims the lost one's journal and bills each turn
once, what it had delivered (services/router/turn_journal.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid

import grpc
import pytest

from meshgate import redis_access
from meshgate.common.v1 import common_pb2
from meshgate.config import Settings, hash_api_key
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.cache import app as cache_app
from services.context import app as context_app
from services.router import ledger
from services.router.turn_journal import ROUTER_LOST
from tests.integration.conftest import running
from tests.integration.test_router_replicas import Replicas, base_settings, toml_string
from tests.mesh import bounded_channel, mesh_settings
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

STREAMS = 3
INTERVAL_S = 0.2
STALE_S = 1.5
# tiny-gpt's prices here (router.prices): whole nano-USD a token, so a
# turn's cost is exact arithmetic of its tokens.
PROMPT_NANO_USD = 1_000
COMPLETION_NANO_USD = 3_000


@pytest.fixture
async def routers(redis_url, inference_address, tmp_path):
    """(the router processes, the link between them and the inference
    service, the tenant's auth metadata), the first router serving."""
    mesh = mesh_settings()
    settings = Settings(mesh=mesh)
    settings.redis.url = redis_url
    settings.cache.inference_address = inference_address
    link = TcpProxy(int(inference_address.rsplit(":", 1)[1]))
    port = await link.start()
    tenant, key = f"lost-{uuid.uuid4().hex[:8]}", f"key-{uuid.uuid4().hex}"
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(link.close)
        context_address = await stack.enter_async_context(running(context_app, "context", settings))
        cache_address = await stack.enter_async_context(running(cache_app, "cache", settings))
        base = base_settings(mesh, redis_url, f"127.0.0.1:{port}", context_address, cache_address)
        group = Replicas(tmp_path, base)
        group.write(f"""journal_interval_s = {INTERVAL_S}
journal_stale_s = {STALE_S}
# The link is held for seconds: its probes must not end the streams meanwhile.
deployment_health_interval_s = 60

[router.prices.tiny-gpt]
prompt_usd_per_million = {PROMPT_NANO_USD / 1000}
completion_usd_per_million = {COMPLETION_NANO_USD / 1000}

[[router.tenants]]
id = {toml_string(tenant)}
api_key_sha256 = [{toml_string(hash_api_key(key))}]
""")
        stack.callback(group.stop)
        group.tenant = tenant
        group.start(1)
        await group.wait_serving()
        yield group, link, (("authorization", f"Bearer {key}"),)


def ask() -> pb.ChatRequest:
    return pb.ChatRequest(
        model="tiny-gpt",
        messages=[
            common_pb2.Message(role=common_pb2.ROLE_USER, content="tell me a long story about the sea")
        ],
        parameters=common_pb2.GenerationParameters(max_tokens=256, temperature=0.0),
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )


class Streams:
    """STREAMS turns on one router, the link held once each received a piece,
    so that each stays open having delivered some of its answer."""

    def __init__(self, stub, auth, link: TcpProxy) -> None:
        self.pieces: list[list[str]] = [[] for _ in range(STREAMS)]
        self.completions: list[pb.ChatCompletion | None] = [None] * STREAMS
        self._link = link
        self._readers = [asyncio.create_task(self._read(index, stub, auth)) for index in range(STREAMS)]

    async def _read(self, index: int, stub, auth) -> None:
        async for response in stub.Chat(ask(), metadata=auth, timeout=60):
            if response.HasField("completion"):
                self.completions[index] = response.completion
                continue
            self.pieces[index].append(response.delta.text)
            if all(self.pieces):
                self._link.hold()

    async def held(self) -> None:
        """Once the link is held and the router's journal has written what
        went out (a few intervals)."""
        while not all(self.pieces):
            assert not any(reader.done() for reader in self._readers), [r.exception() for r in self._readers]
            await asyncio.sleep(0.01)
        await asyncio.sleep(5 * INTERVAL_S)

    def cut(self) -> list[int]:
        """The streams that had not completed."""
        return [index for index, completion in enumerate(self.completions) if completion is None]

    async def ended(self) -> list[BaseException | None]:
        return await asyncio.gather(*self._readers, return_exceptions=True)


async def usage(address: str, auth) -> pb.UsageRow:
    async with bounded_channel(address) as channel:
        answer = await router_service_pb2_grpc.RouterServiceStub(channel).GetUsage(
            pb.GetUsageRequest(), metadata=auth, timeout=10
        )
    return next((row for row in answer.rows if row.model == "tiny-gpt"), pb.UsageRow())


async def until_billed(
    address: str, auth, requests: int, completion_tokens: int = 0, timeout_s: float = 30.0
) -> pb.UsageRow:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        row = await usage(address, auth)
        if row.requests >= requests and row.completion_tokens >= completion_tokens:
            return row
        assert asyncio.get_running_loop().time() < deadline, (
            f"never billed {requests} turns, {completion_tokens} completion tokens: {row}"
        )
        await asyncio.sleep(0.2)


async def test_a_killed_routers_open_turns_are_billed_by_another(routers):
    group, link, auth = routers
    async with bounded_channel(group.addresses[0]) as channel:
        streams = Streams(router_service_pb2_grpc.RouterServiceStub(channel), auth, link)
        await streams.held()
        cut = streams.cut()
        delivered = [list(pieces) for pieces in streams.pieces]
        group.processes[0].kill()
        group.processes[0].wait(10)
        ended = await streams.ended()
    assert cut, "every turn completed before the link was held: none was open when the router was killed"
    assert all(isinstance(ended[index], grpc.aio.AioRpcError) for index in cut), ended
    link.release()

    group.start(1)
    await group.wait_serving(first=1)
    row = await until_billed(group.addresses[1], auth, STREAMS)
    print(f"\n{len(cut)} of {STREAMS} turns open when the router was killed; billed {row}")
    # Each once: the completed ones by their settlement, the others by the claim.
    assert row.requests == STREAMS
    assert row.failures == len(cut)
    completed = sum(completion.usage.completion_tokens for completion in streams.completions if completion)
    cut_tokens = row.completion_tokens - completed
    # Every piece is a token or more, every token a byte or more: billed
    # what went out, as the last snapshot before the kill had it (the link
    # held: nothing more went out after it).
    assert sum(len(delivered[index]) for index in cut) <= cut_tokens
    assert cut_tokens <= sum(len("".join(delivered[index]).encode()) for index in cut)
    # The prompt as the model read it, once per turn (a completed turn's
    # count, or one asked now of the same prompt).
    async with bounded_channel(group.addresses[1]) as channel:
        async for response in router_service_pb2_grpc.RouterServiceStub(channel).Chat(
            ask(), metadata=auth, timeout=60
        ):
            if response.HasField("completion"):
                prompt_tokens = response.completion.usage.prompt_tokens
    assert row.prompt_tokens == STREAMS * prompt_tokens


async def test_a_stalled_routers_turns_are_billed_once_in_full_when_it_comes_back(routers, redis_url):
    """Its journal claimed while it is stopped (SIGSTOP), each turn billed as
    the snapshot had it; resumed, its turns go on to their ends, whose
    settlements bill the rest (reproduced before: 3 turns claimed at 1
    completion token each went on to 256, and were billed 1)."""
    group, link, auth = routers
    tenant = group.tenant
    async with bounded_channel(group.addresses[0]) as channel:
        streams = Streams(router_service_pb2_grpc.RouterServiceStub(channel), auth, link)
        await streams.held()
        cut = streams.cut()
        assert cut, "every turn completed before the link was held"
        stalled = group.processes[0].pid
        os.kill(stalled, signal.SIGSTOP)
        try:
            group.start(1)
            await group.wait_serving(first=1)
            claimed = await until_billed(group.addresses[1], auth, STREAMS)
            assert (claimed.requests, claimed.failures) == (STREAMS, len(cut))
        finally:
            os.kill(stalled, signal.SIGCONT)
        link.release()
        # The stalled router finishes its turns and settles them: the rest of
        # what each used is billed now.
        ended = await streams.ended()
    assert all(outcome is None for outcome in ended), ended
    assert all(streams.completions)
    used = [completion.usage for completion in streams.completions]
    delivered = sum(usage.completion_tokens for usage in used)
    # Their settlements (within a ledger flush of their ends), or 10 s.
    with contextlib.suppress(AssertionError):
        await until_billed(group.addresses[1], auth, STREAMS, completion_tokens=delivered, timeout_s=10)
    # Then nothing more comes (a settlement, or a claim, billed twice).
    await asyncio.sleep(2 * STALE_S)
    row = await usage(group.addresses[1], auth)
    client = redis_access.connect(redis_url)
    try:
        entries = [
            {name.decode(): value.decode() for name, value in fields.items()}
            for _, fields in await client.xrange(ledger.STREAM)
            if fields[b"tenant"] == tenant.encode()
        ]
    finally:
        await client.aclose()
    print(
        f"\n{len(cut)} of {STREAMS} turns claimed: billed {claimed.completion_tokens} completion tokens,"
        f" {claimed.cost_nano_usd} nano-USD; used {delivered}; billed in the end"
        f" {str(row).replace(chr(10), ' ')}"
        + "".join(
            f"\n  log: {entry['turn_id'] or '-'} {entry['cache_status']} {entry['failure'] or '-'} prompt"
            f" {entry['prompt_tokens']} completion {entry['completion_tokens']} cost {entry['cost_nano_usd']}"
            for entry in entries
        )
    )
    # Each turn once (requests), in full: what its completion said it used,
    # and its price; the claimed turns counted failed as the claim found them.
    assert (row.requests, row.failures) == (STREAMS, len(cut))
    assert row.completion_tokens == delivered
    assert row.prompt_tokens == sum(usage.prompt_tokens for usage in used)
    prices = (PROMPT_NANO_USD, COMPLETION_NANO_USD)
    assert row.cost_nano_usd == sum(
        usage.prompt_tokens * prices[0] + usage.completion_tokens * prices[1] for usage in used
    )
    # The log agrees: a claimed turn's entry, then its rest's, once each.
    by_turn: dict[str, list[dict[str, str]]] = {}
    for entry in entries:
        by_turn.setdefault(entry["turn_id"], []).append(entry)
    claimed_turns = [turn for turn in by_turn.values() if turn[0]["failure"] == ROUTER_LOST]
    assert len(claimed_turns) == len(cut)
    for turn in claimed_turns:
        assert [entry["cache_status"] for entry in turn[1:]] == [ledger.CLAIMED_REST], turn
        assert turn[1]["failure"] == ""  # how the turn ended: completed
    assert sum(int(entry["completion_tokens"]) for entry in entries) == delivered
    assert sum(int(entry["cost_nano_usd"]) for entry in entries) == row.cost_nano_usd
