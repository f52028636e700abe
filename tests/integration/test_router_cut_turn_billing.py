"""What a streamed turn cut short is billed, on the real mesh (router,
context, cache and inference services, Redis, Triton's tiny_gpt): a caller
that hangs up after a few pieces, and one whose deadline passes midway, pay
the prompt tokens the model read and the completion tokens behind the text
they received, in GetUsage and in the tenant's day budget alike."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import time
import uuid

import grpc
import pytest
import tritonclient.grpc.aio as triton_grpc

from meshgate import redis_access
from meshgate.common.v1 import common_pb2
from meshgate.config import LimitSettings, PriceSettings, TenantSettings, hash_api_key
from meshgate.errors import error_info
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.router.admission import Scope
from tests.integration.conftest import running_router, service_settings
from tests.mesh import bounded_channel
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

STORY = "tell me a long story about the sea"
MAX_TOKENS = 256
# The router bills the pieces it sent; the last of them may still have been
# on the way when the caller hung up or its deadline passed, and the caller
# never read them: it may be billed this many tokens more than it read
# (about 0.1 s of tiny_gpt alone), never fewer. Byte bounds were 3x to 4x.
IN_FLIGHT_TOKENS = 32


@contextlib.asynccontextmanager
async def billed_router(redis_url: str, inference_address: str):
    """A router of a tenant of its own, priced and with a day budget, whose
    tiny-gpt is the inference service at ``inference_address``; yields
    (router stub, the tenant's auth metadata, the tenant's day budget key,
    a Redis client)."""
    tenant = f"cut-{uuid.uuid4().hex[:8]}"
    key = f"key-{tenant}"
    settings = service_settings(redis_url, inference_address)
    settings.router.tenants = [
        TenantSettings(
            id=tenant, api_key_sha256=[hash_api_key(key)], limits=LimitSettings(tokens_per_day=10_000_000)
        )
    ]
    settings.router.prices = {
        "tiny-gpt": PriceSettings(prompt_usd_per_million=1.0, completion_usd_per_million=1.0)
    }
    day = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    budget_key = f"{Scope('tenant', tenant, LimitSettings()).prefix}:tokens:day:{day}"
    client = redis_access.connect(redis_url)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(client.aclose)
        address = await stack.enter_async_context(running_router(settings))
        channel = await stack.enter_async_context(bounded_channel(address))
        auth = (("authorization", f"Bearer {key}"),)
        yield router_service_pb2_grpc.RouterServiceStub(channel), auth, budget_key, client


@pytest.fixture(scope="module")
async def billing(redis_url, inference_address):
    """billed_router's, straight to the inference service."""
    async with billed_router(redis_url, inference_address) as billed:
        yield billed


def ask(max_tokens: int, session_id: str = "", text: str = STORY) -> pb.ChatRequest:
    # Greedy: the same prompt gives the same tokens, so a completed turn
    # of it tells what the model produced for a turn cut short.
    return pb.ChatRequest(
        model="tiny-gpt",
        session_id=session_id,
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=max_tokens, temperature=0.0),
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )


async def completed(
    ledger, stub, auth, max_tokens: int, session_id: str = "", text: str = STORY
) -> tuple[str, pb.ChatCompletion]:
    ledger.turns += 1
    pieces = []
    async for response in stub.Chat(ask(max_tokens, session_id, text), metadata=auth, timeout=60):
        if response.HasField("delta"):
            pieces.append(response.delta.text)
        else:
            return "".join(pieces) + response.completion.text, response.completion
    raise AssertionError("no completion")


class Ledger:
    """The tenant's use so far, as GetUsage and its day budget say it."""

    def __init__(self, stub, auth, budget_key: str, client) -> None:
        self._stub, self._auth, self._budget_key, self._client = stub, auth, budget_key, client
        # Turns asked of the router so far: each is recorded once it ends.
        self.turns = 0

    async def settled(self) -> tuple[int, int, int]:
        """(prompt tokens, completion tokens, the day budget's counter) once
        every turn so far is recorded and settled: the ledger and the
        budget are written in batches just after a turn ends, and until its
        settlement the budget holds its reservation."""
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            answer = await self._stub.GetUsage(pb.GetUsageRequest(), metadata=self._auth, timeout=10)
            row = next((row for row in answer.rows if row.model == "tiny-gpt"), pb.UsageRow())
            counter = int(await self._client.get(self._budget_key) or 0)
            if row.requests == self.turns and counter == row.prompt_tokens + row.completion_tokens:
                return row.prompt_tokens, row.completion_tokens, counter
            assert asyncio.get_running_loop().time() < deadline, f"never settled: {row}, budget {counter}"
            await asyncio.sleep(0.05)


async def billed(ledger: Ledger, cut) -> tuple[str, tuple[int, int, int]]:
    """Runs ``cut`` (a turn cut short; it returns the text received) and
    says what it added to GetUsage (prompt, completion) and to the budget."""
    before = await ledger.settled()
    ledger.turns += 1
    delivered = await cut()
    after = await ledger.settled()
    return delivered, tuple(now - then for now, then in zip(after, before, strict=True))


async def produced(ledger, stub, auth, delivered: str) -> int:
    """The completion tokens behind ``delivered``: the most a completed
    greedy turn of the same prompt can be given whose answer ``delivered``
    begins with (binary search; tiny_gpt gives no token an empty text)."""
    low, high = 0, MAX_TOKENS
    while low < high:
        middle = (low + high + 1) // 2
        text, _ = await completed(ledger, stub, auth, middle)
        if delivered.startswith(text):
            low = middle
        else:
            high = middle - 1
    return low


async def test_a_turn_cut_short_is_billed_the_tokens_the_model_read_and_produced(billing):
    stub, auth, budget_key, client = billing
    ledger = Ledger(stub, auth, budget_key, client)
    started = time.monotonic()
    _, reference = await completed(ledger, stub, auth, MAX_TOKENS)
    # A deadline half the whole answer's time passes midway, however busy
    # the machine is.
    midway_s = (time.monotonic() - started) / 2
    assert reference.usage.completion_tokens == MAX_TOKENS  # no early end to cut before
    prompt_tokens = reference.usage.prompt_tokens

    async def hang_up_after_two_pieces() -> str:
        # A stop button.
        call = stub.Chat(ask(MAX_TOKENS), metadata=auth, timeout=60)
        pieces = []
        async for response in call:
            pieces.append(response.delta.text)
            if len(pieces) == 2:
                break
        call.cancel()
        return "".join(pieces)

    async def deadline_midway(timeout_s: float) -> tuple[str, int | None, bool]:
        """The text received ("" where the deadline passed before the first
        piece), the tokens the router's status says went out (None: the
        caller's own timer may have ended the call first), and whether the
        deadline cut the answer at all (False: all of it came first)."""
        pieces = []
        loop = asyncio.get_running_loop()
        started = loop.time()  # before the call's own clock starts
        try:
            async for response in stub.Chat(ask(MAX_TOKENS), metadata=auth, timeout=timeout_s):
                pieces.append(response.delta.text)
        except grpc.aio.AioRpcError as error:
            cut = error
        else:
            return "".join(pieces), None, False
        assert cut.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        if loop.time() - started >= timeout_s:
            # The caller's own deadline passed before it had read to the
            # status: its gRPC core then drops the pieces that had come but
            # were not read yet, and still reports the router's status if
            # that had come too (reproduced here under load: 17 and 26 pieces
            # said, 16 and 25 read, every such case past the caller's
            # deadline; a CI run failed on it, 114 said and billed, 113
            # read). Those pieces went out: the status proves the bound only.
            return "".join(pieces), None, True
        info = error_info(cut)
        said = int(info.metadata["delivered_tokens"]) if info is not None else None
        return "".join(pieces), said, True

    cancelled_text, cancelled = await billed(ledger, hang_up_after_two_pieces)
    cancelled_produced = await produced(ledger, stub, auth, cancelled_text)
    print(
        f"\nmodel's prompt: {prompt_tokens} tokens ({len(STORY)} bytes of content)"
        f"\ncancel after 2 pieces ({len(cancelled_text.encode())} bytes): billed (prompt, completion,"
        f" budget) {cancelled}, model read/produced ({prompt_tokens}, {cancelled_produced})"
    )
    prompt, completion, budget = cancelled
    assert prompt == prompt_tokens
    assert cancelled_produced <= completion <= cancelled_produced + IN_FLIGHT_TOKENS
    assert budget == prompt + completion

    # The router ends a turn router.deadline_margin_s before its caller's
    # deadline, so that its status (delivered_tokens) reaches the caller
    # first; a caller whose own loop lags past that margin (this one shares
    # its loop with the router, context and cache on 2 busy cores in CI:
    # 63 tokens behind once) ends on its own timer, with pieces sent but
    # never read. Such a try proves only the lower bound, so it is tried
    # again, up to three times, for one the router's status ended.
    # A machine slower now than for the reference answer may pass the
    # deadline before the first piece (a CI run, 3 workers beside it): no
    # midway cut, so it is tried again with half as much time more (a
    # machine that slow still cuts the answer midway). One faster now than
    # for the reference (whose answer paid a cold start) may give the whole
    # answer before the deadline (a clean-clone run: 256 tokens in 0.61 s
    # against a deadline of 0.65 s): it is tried again with half the time.
    midway_cuts = tries = 0
    while midway_cuts < 3 and tries < 6:
        tries += 1
        (deadline_text, said, was_cut), deadline_cut = await billed(
            ledger, functools.partial(deadline_midway, midway_s)
        )
        if not was_cut:
            midway_s /= 2
            continue
        if not deadline_text:
            midway_s *= 1.5
            continue
        midway_cuts += 1
        deadline_produced = await produced(ledger, stub, auth, deadline_text)
        print(
            f"\ndeadline midway ({len(deadline_text.encode())} bytes): billed {deadline_cut},"
            f" model read/produced ({prompt_tokens}, {deadline_produced}), router said {said}"
        )
        prompt, completion, budget = deadline_cut
        assert prompt == prompt_tokens
        assert budget == prompt + completion
        assert deadline_produced <= completion
        if said is not None:
            # The caller read every piece before the status: billed exactly
            # the model's count behind them (bytes were 3x to 4x).
            assert completion == said == deadline_produced
            break
    assert midway_cuts, "every deadline passed before the first piece: no midway cut was billed"


async def test_a_session_turn_cut_before_its_first_piece_is_billed_the_prompt_as_the_model_counts_it(
    redis_url, inference_address, triton_url
):
    """A turn cut before any delta reached the router (a hang-up, a deadline
    while the model reads a long history) was billed its assembled prompt's
    bytes as prompt tokens, though its assembly had counted them exactly
    (the context service's manifest: the model's tokenizer and template).
    Here the inference service's replies are held back (a link between the
    router and it), so the model reads and answers the turn and the router
    hears nothing of it before its caller hangs up."""
    link = TcpProxy(int(inference_address.rsplit(":", 1)[1]))
    port = await link.start()
    triton = triton_grpc.InferenceServerClient(triton_url)
    try:
        async with billed_router(redis_url, f"127.0.0.1:{port}") as (stub, auth, budget_key, client):
            ledger = Ledger(stub, auth, budget_key, client)
            # Two sessions of one greedy turn each: the same history, so the
            # same turn next assembles the same prompt in both.
            sessions = []
            for _ in range(2):
                created = await stub.CreateSession(pb.CreateSessionRequest(), metadata=auth, timeout=10)
                sessions.append(created.session_id)
                await completed(ledger, stub, auth, 24, created.session_id, "hello, who are you?")
            cut_session, reference_session = sessions
            _, reference = await completed(ledger, stub, auth, 4, reference_session)
            model_count = reference.usage.prompt_tokens

            async def hang_up_before_the_first_piece() -> str:
                generations = await triton_generations(triton)
                link.hold()
                call = stub.Chat(ask(4, cut_session), metadata=auth, timeout=60)
                reading = asyncio.ensure_future(call.read())
                # The model has read the prompt and answered; nothing of it
                # reached the router.
                async with asyncio.timeout(30):
                    while await triton_generations(triton) == generations:
                        await asyncio.sleep(0.05)
                assert not reading.done()
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
                link.release()
                return ""

            _, (prompt, completion, budget) = await billed(ledger, hang_up_before_the_first_piece)
    finally:
        await triton.close()
        await link.close()
    print(f"\nthe model's count of the prompt: {model_count}; billed ({prompt}, {completion}, {budget})")
    assert (prompt, completion, budget) == (model_count, 0, model_count)


async def triton_generations(triton) -> int:
    """The generation requests Triton's tiny_gpt has completed."""
    statistics = await triton.get_inference_statistics(model_name="tiny_gpt")
    (model,) = statistics.model_stats
    return model.inference_stats.success.count
