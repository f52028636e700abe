"""The cache service over real gRPC, against a real Redis and real embeddings
(its own minilm, the default ``cache.embedder``, or the inference service in
front of Triton's)."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import subprocess

import grpc
import pytest

from meshgate.cache.v1 import cache_service_pb2 as pb
from meshgate.cache.v1 import cache_service_pb2_grpc
from meshgate.common.v1 import common_pb2
from meshgate.config import Settings
from meshgate.errors import error_info
from meshgate.local import redis_server
from meshgate.local.stack import free_port
from services.cache import app
from tests.integration.conftest import running as running_service
from tests.mesh import mesh_settings, router_channel

pytestmark = pytest.mark.integration

USER, ASSISTANT = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT
STORED = "What is the quickest way to learn Python?"
PARAPHRASE = "How can I learn Python fast?"


def make_settings(redis_url: str, inference_address: str) -> Settings:
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.cache.inference_address = inference_address
    # Pinned: these tests check the mechanism, bench/cache_bench.py the
    # quality (the paraphrase below has cosine 0.92 with minilm).
    settings.cache.semantic_threshold = 0.9
    # The verifier's loosest calibrated bound, so that the paraphrase below
    # (verifier score 0.90, just above the default bound's 0.897) is served
    # with room to spare; test_cache_verification.py covers the default
    # bound and what the verifier refuses.
    settings.cache.max_false_hit_rate = 0.1
    return settings


@contextlib.asynccontextmanager
async def running(settings: Settings):
    """The service in-process on a free port, and a stub over a real channel."""
    async with (
        running_service(app, "cache", settings) as address,
        router_channel(address, "cache") as channel,
    ):
        yield cache_service_pb2_grpc.CacheServiceStub(channel)


@pytest.fixture(scope="module")
def settings(redis_url: str, inference_address: str) -> Settings:
    return make_settings(redis_url, inference_address)


@pytest.fixture(scope="module")
async def stub(settings: Settings):
    async with running(settings) as stub:
        yield stub


def scope(tenant: str, model: str = "tiny-gpt") -> pb.CacheScope:
    return pb.CacheScope(
        tenant_id=tenant, model=model, parameters=common_pb2.GenerationParameters(max_tokens=64)
    )


def conversation(*contents: str) -> list[common_pb2.Message]:
    """Alternating user and assistant messages, ending with the user's question."""
    return [
        common_pb2.Message(role=USER if i % 2 == 0 else ASSISTANT, content=c) for i, c in enumerate(contents)
    ]


async def store(stub, tenant, messages, text="an answer", model="tiny-gpt", ttl_seconds=0) -> str:
    response = await stub.Store(
        pb.StoreRequest(
            scope=scope(tenant, model),
            messages=messages,
            answer=pb.CachedAnswer(
                text=text,
                usage=common_pb2.Usage(prompt_tokens=12, completion_tokens=5),
                deployment="local",
                finish_reason="stop",
            ),
            ttl_seconds=ttl_seconds,
        )
    )
    return response.entry_id


async def lookup(stub, tenant, messages, model="tiny-gpt") -> pb.LookupResponse:
    return await stub.Lookup(pb.LookupRequest(scope=scope(tenant, model), messages=messages, semantic=True))


async def failure(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    info = error_info(caught.value)
    assert info is not None, caught.value
    return caught.value.code(), info.reason


async def test_exact_hit_returns_the_whole_answer(stub, tenant):
    entry_id = await store(stub, tenant, conversation(STORED), text="Build small projects daily.")
    response = await lookup(stub, tenant, conversation(f" {STORED}  "))
    assert response.status == pb.LOOKUP_STATUS_EXACT_HIT
    assert response.similarity == 1.0
    assert response.entry_id == entry_id
    assert response.answer.text == "Build small projects daily."
    assert response.answer.usage.completion_tokens == 5
    assert response.answer.deployment == "local" and response.answer.finish_reason == "stop"


async def test_paraphrase_is_a_semantic_hit(stub, settings, tenant):
    entry_id = await store(stub, tenant, conversation(STORED), text="Build small projects daily.")
    response = await lookup(stub, tenant, conversation(PARAPHRASE))
    assert response.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    assert settings.cache.semantic_threshold <= response.similarity < 1.0
    assert response.entry_id == entry_id
    assert response.answer.text == "Build small projects daily."


@pytest.mark.parametrize(("stored_by", "asked_of"), [("inference", "local"), ("local", "inference")])
async def test_an_entry_stored_through_one_embedder_is_a_semantic_hit_through_the_other(
    redis_url, inference_address, tenant, stored_by, asked_of
):
    """Replicas that embed differently (a rolling change of cache.embedder)
    share entries: the two give the same vectors."""
    caches = {}
    async with contextlib.AsyncExitStack() as stack:
        for embedder in (stored_by, asked_of):
            settings = make_settings(redis_url, inference_address)
            settings.cache.embedder = embedder
            caches[embedder] = await stack.enter_async_context(running(settings))
        entry_id = await store(caches[stored_by], tenant, conversation(STORED), text="Build small projects.")
        response = await lookup(caches[asked_of], tenant, conversation(PARAPHRASE))
    assert response.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    assert response.entry_id == entry_id


async def test_unrelated_question_misses(stub, tenant):
    await store(stub, tenant, conversation(STORED))
    response = await lookup(stub, tenant, conversation("What is the capital of France?"))
    assert response.status == pb.LOOKUP_STATUS_MISS


async def test_another_tenant_never_sees_the_entry(stub, tenant):
    await store(stub, tenant, conversation(STORED))
    for question in (STORED, PARAPHRASE):
        response = await lookup(stub, f"{tenant}-other", conversation(question))
        assert response.status == pb.LOOKUP_STATUS_MISS


async def test_same_question_in_another_conversation_misses(stub, tenant):
    france = ("What is the capital of France?", "The capital of France is Paris.")
    italy = ("What is the capital of Italy?", "The capital of Italy is Rome.")
    follow_up = "What famous landmark can you find there?"
    await store(stub, tenant, conversation(*france, follow_up), text="The Eiffel Tower.")
    assert (await lookup(stub, tenant, conversation(*italy, follow_up))).status == pb.LOOKUP_STATUS_MISS
    assert (await lookup(stub, tenant, conversation(follow_up))).status == pb.LOOKUP_STATUS_MISS
    same = await lookup(stub, tenant, conversation(*france, "What famous landmark can one find there?"))
    assert same.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    assert same.answer.text == "The Eiffel Tower."


SUBSCRIPTION = ("I'm subscribed to the premium streaming plan.", "Noted, you are on the premium plan.")
CANCEL = "How do I cancel it?"


async def test_a_conversation_with_the_same_context_is_served(stub, tenant):
    entry_id = await store(stub, tenant, conversation(*SUBSCRIPTION, CANCEL), text="Go to Settings > Plan.")
    reworded = conversation("I pay for the premium video streaming subscription.", "Of course.", CANCEL)
    small_talk = conversation(
        "Hi there!", "Hello!", *SUBSCRIPTION, "Thanks, that's helpful.", "Welcome!", CANCEL
    )
    unrelated_history = conversation(
        "What is the tallest mountain in the world?", "Mount Everest.", *SUBSCRIPTION, CANCEL
    )
    for messages in (reworded, small_talk, unrelated_history):
        response = await lookup(stub, tenant, messages)
        assert response.status == pb.LOOKUP_STATUS_SEMANTIC_HIT, messages[0].content
        assert response.entry_id == entry_id and response.answer.text == "Go to Settings > Plan."


async def test_a_conversation_whose_context_changed_is_not_served(stub, tenant):
    await store(stub, tenant, conversation(*SUBSCRIPTION, CANCEL), text="Go to Settings > Plan.")
    gym = conversation("I have a membership at the downtown gym.", "Noted.", CANCEL)
    flipped = conversation("I'm not subscribed to the premium streaming plan.", "Noted.", CANCEL)
    moved_on = conversation(*SUBSCRIPTION, "I also bought a Samsung Galaxy S23 last month.", "Nice.", CANCEL)
    for messages in (gym, flipped, moved_on):
        response = await lookup(stub, tenant, messages)
        assert response.status == pb.LOOKUP_STATUS_MISS, messages[-3].content
    # Nor does the bare follow-up, which names no subscription at all.
    assert (await lookup(stub, tenant, conversation(CANCEL))).status == pb.LOOKUP_STATUS_MISS


async def test_a_conversation_whose_later_reply_differs_is_not_served(stub, tenant):
    """A reply after the first may correct it: the answer given after
    "Oops, I meant 9." was served after "Oops, I meant 12.", at similarity 1.0."""

    def corrected(correction: str, thanks: str = "Thanks!") -> list[common_pb2.Message]:
        return conversation("Pick a number for me.", "7", thanks, correction, "What is it doubled?")

    await store(stub, tenant, corrected("Oops, I meant 9."), text="18.")
    other = await lookup(stub, tenant, corrected("Oops, I meant 12."))
    assert other.status == pb.LOOKUP_STATUS_MISS
    # The same correction after other small talk: served.
    same = await lookup(stub, tenant, corrected("Oops, I meant 9.", thanks="Ok, thank you."))
    assert same.status == pb.LOOKUP_STATUS_SEMANTIC_HIT and same.answer.text == "18."


async def test_a_question_after_other_assistant_news_and_no_topic_turn_is_not_served(stub, tenant):
    """No user turn says anything before the question, so it refers to what
    the assistant said: the answer given after one order's news was served
    after another's, and to the bare question, at similarity 1.0."""

    def after(*said: str) -> list[common_pb2.Message]:
        return [
            *(common_pb2.Message(role=ASSISTANT, content=text) for text in said),
            common_pb2.Message(role=USER, content="When will it arrive?"),
        ]

    shipped = "Your order 4521 has shipped and arrives Monday."
    await store(stub, tenant, after(shipped), text="On Monday.")
    for messages in (after("Your order 7788 was cancelled and refunded."), after()):
        response = await lookup(stub, tenant, messages)
        assert response.status == pb.LOOKUP_STATUS_MISS, messages[0].content
    # The same news after a greeting: served.
    again = await lookup(stub, tenant, [*conversation("Hi!", shipped, "When will it arrive?")])
    assert again.status == pb.LOOKUP_STATUS_SEMANTIC_HIT and again.answer.text == "On Monday."


async def test_expired_entries_are_gone(stub, tenant):
    await store(stub, tenant, conversation(STORED), ttl_seconds=1)
    assert (await lookup(stub, tenant, conversation(STORED))).status == pb.LOOKUP_STATUS_EXACT_HIT
    await asyncio.sleep(1.2)
    for question in (STORED, PARAPHRASE):
        assert (await lookup(stub, tenant, conversation(question))).status == pb.LOOKUP_STATUS_MISS


async def test_invalidate_removes_a_model_then_the_tenant(stub, tenant):
    for model in ("model-a", "model-b"):
        await store(stub, tenant, conversation(STORED), model=model)
    removed = await stub.Invalidate(pb.InvalidateRequest(tenant_id=tenant, model="model-a"))
    assert removed.entries_removed == 1
    assert (await lookup(stub, tenant, conversation(PARAPHRASE), "model-a")).status == pb.LOOKUP_STATUS_MISS
    assert (await lookup(stub, tenant, conversation(STORED), "model-b")).status == pb.LOOKUP_STATUS_EXACT_HIT
    removed = await stub.Invalidate(pb.InvalidateRequest(tenant_id=tenant))
    assert removed.entries_removed == 1
    assert (await lookup(stub, tenant, conversation(STORED), "model-b")).status == pb.LOOKUP_STATUS_MISS


async def test_entries_survive_a_restart(settings, tenant):
    async with running(settings) as first:
        await store(first, tenant, conversation(STORED), text="Build small projects daily.")
    async with running(settings) as second:
        response = await lookup(second, tenant, conversation(PARAPHRASE))
        assert response.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
        assert response.answer.text == "Build small projects daily."


async def test_entries_survive_a_restart_with_the_approximate_index(redis_url, inference_address, tenant):
    settings = make_settings(redis_url, inference_address)
    # Low enough that the stored questions put the partition on the graph,
    # both before and after the restart (where it is rebuilt from Redis).
    settings.cache.approximate_index_from = 4
    others = [
        "How do I bake sourdough bread?",
        "What is the capital of Australia?",
        "How many moons does Jupiter have?",
        "Which sorting algorithm is fastest for nearly sorted data?",
        "How do I change a flat bicycle tyre?",
    ]
    async with running(settings) as first:
        for question in others:
            await store(first, tenant, conversation(question), text=f"answer: {question}")
        entry_id = await store(first, tenant, conversation(STORED), text="Build small projects daily.")
        assert (await lookup(first, tenant, conversation(PARAPHRASE))).entry_id == entry_id
    async with running(settings) as second:
        response = await lookup(second, tenant, conversation(PARAPHRASE))
        assert response.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
        assert response.entry_id == entry_id and response.answer.text == "Build small projects daily."
        everest = conversation("What is the boiling point of water on Everest?")
        unrelated = await lookup(second, tenant, everest)
        assert unrelated.status == pb.LOOKUP_STATUS_MISS
        # A Store after the rebuild joins the graph without disturbing it.
        await store(second, tenant, conversation("How do I renew my passport?"), text="At the post office.")
        again = await lookup(second, tenant, conversation(PARAPHRASE))
        assert again.status == pb.LOOKUP_STATUS_SEMANTIC_HIT and again.entry_id == entry_id


async def test_stats_count_every_outcome(stub, settings, tenant):
    before = await stub.GetStats(pb.GetStatsRequest())
    await store(stub, tenant, conversation(STORED))
    await lookup(stub, tenant, conversation(STORED))
    await lookup(stub, tenant, conversation(PARAPHRASE))
    await lookup(stub, tenant, conversation("Who painted the Mona Lisa?"))
    after = await stub.GetStats(pb.GetStatsRequest())
    assert after.stores - before.stores == 1
    assert after.exact_hits - before.exact_hits == 1
    assert after.semantic_hits - before.semantic_hits == 1
    assert after.misses - before.misses == 1
    assert after.entries >= 1
    assert after.semantic_threshold == pytest.approx(settings.cache.semantic_threshold)


async def test_an_exact_lookup_the_caller_follows_with_a_semantic_one_counts_once(stub, tenant):
    """The router looks each prompt up exactly, then semantically after a
    miss: both misses were counted, so a generated turn counted two and a
    semantic hit one miss and one hit (the dashboards' hit rate 2/5 for
    three turns that hit twice)."""
    asked = conversation("Who sculpted the Thinker, and when?")
    scope_ = scope(tenant)
    before = await stub.GetStats(pb.GetStatsRequest())
    first = await stub.Lookup(pb.LookupRequest(scope=scope_, messages=asked, semantic_follows=True))
    assert first.status == pb.LOOKUP_STATUS_MISS
    assert (await stub.GetStats(pb.GetStatsRequest())).misses == before.misses
    assert (await lookup(stub, tenant, asked)).status == pb.LOOKUP_STATUS_MISS
    # An exact lookup nothing follows is a miss of its own.
    await stub.Lookup(pb.LookupRequest(scope=scope_, messages=asked))
    assert (await stub.GetStats(pb.GetStatsRequest())).misses - before.misses == 2


async def test_invalid_requests_are_rejected_with_a_reason(stub):
    no_tenant = pb.LookupRequest(scope=pb.CacheScope(model="m"), messages=conversation("q"))
    assert await failure(stub.Lookup(no_tenant)) == (grpc.StatusCode.INVALID_ARGUMENT, "TENANT_REQUIRED")
    no_model = pb.StoreRequest(
        scope=pb.CacheScope(tenant_id="t"), messages=conversation("q"), answer=pb.CachedAnswer()
    )
    assert await failure(stub.Store(no_model)) == (grpc.StatusCode.INVALID_ARGUMENT, "MISSING_MODEL")


async def test_without_the_inference_service_lookups_are_exact_only(redis_url, tenant):
    settings = make_settings(redis_url, f"127.0.0.1:{free_port()}")
    settings.cache.embedder = "inference"
    async with running(settings) as stub:
        await store(stub, tenant, conversation(STORED))
        assert (await lookup(stub, tenant, conversation(STORED))).status == pb.LOOKUP_STATUS_EXACT_HIT
        assert (await lookup(stub, tenant, conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS


async def test_the_local_embedder_needs_no_inference_service(redis_url, tenant):
    """With cache.embedder = "local" nothing is asked of the inference
    service: a semantic hit while none is listening."""
    settings = make_settings(redis_url, f"127.0.0.1:{free_port()}")
    settings.cache.embedder = "local"
    async with running(settings) as local_stub:
        entry_id = await store(local_stub, tenant, conversation(STORED), text="Build small projects.")
        response = await lookup(local_stub, tenant, conversation(PARAPHRASE))
    assert response.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    assert response.entry_id == entry_id


@pytest.mark.parametrize(
    ("stored", "asked"),
    [
        (
            "Translate into French:\nGood morning, how are you?",
            "Translate into French: Good morning, how are you?",
        ),
        (
            "Translate into French: Good morning, how are you?",
            "Translate into French:\nGood morning, how are you?",
        ),
    ],
)
async def test_a_question_differing_only_in_line_breaks_is_a_semantic_hit(redis_url, tenant, stored, asked):
    """Line breaks keep two prompts apart exactly (keys.py) but not by
    meaning: the embedding reads no whitespace. The verifier read a line
    break inside a question as the start of a topic turn, and refused the
    pair as of other contexts."""
    settings = make_settings(redis_url, f"127.0.0.1:{free_port()}")
    settings.cache.embedder = "local"
    async with running(settings) as local_stub:
        entry_id = await store(local_stub, tenant, conversation(stored), text="Bonjour, comment allez-vous ?")
        response = await lookup(local_stub, tenant, conversation(asked))
    assert response.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    assert response.entry_id == entry_id
    assert response.similarity > 0.99


async def test_redis_outage_is_unavailable(tmp_path: pathlib.Path, inference_address, tenant):
    port = free_port()
    process = redis_server.launch(port, tmp_path)

    def stop_redis(process: subprocess.Popen) -> None:
        process.terminate()
        process.wait(10)

    try:
        redis_server.wait_ready(port)
        async with running(make_settings(f"redis://127.0.0.1:{port}/0", inference_address)) as stub:
            await store(stub, tenant, conversation(STORED))
            await asyncio.to_thread(stop_redis, process)
            for call in (
                lambda: lookup(stub, tenant, conversation(STORED)),
                lambda: store(stub, tenant, conversation(STORED)),
                lambda: stub.Invalidate(pb.InvalidateRequest(tenant_id=tenant)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call()
                # Nothing of the error Redis's client raised, which names
                # its host and port: those are for the service's log.
                refused = (caught.value.code(), error_info(caught.value).reason, caught.value.details())
                assert refused == (
                    grpc.StatusCode.UNAVAILABLE,
                    "REDIS_UNAVAILABLE",
                    "cache store unavailable",
                )
    finally:
        if process.poll() is None:
            stop_redis(process)
