"""The cache's request path against a real Redis, with a fake embedder whose
vectors are chosen directions, so similarities are known exactly."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import math
import threading
import time

import grpc
import numpy as np
import pytest
import redis.asyncio as redis
import structlog

from meshgate import metrics, redis_access, serving
from meshgate.cache.v1 import cache_service_pb2 as pb
from meshgate.common.v1 import common_pb2
from meshgate.config import CacheSettings
from meshgate.embedding import Embedding, embedder_name
from meshgate.errors import MeshgateError
from meshgate.local.stack import free_port
from meshgate.reasons import Reason
from services.cache import index as index_module
from services.cache import keys
from services.cache import servicer as servicer_module
from services.cache import store as store_module
from services.cache.embedding_memo import EmbeddingMemo
from services.cache.index import IndexRegistry
from services.cache.keys import normalize_text
from services.cache.servicer import CacheServicer
from services.cache.stats import Stats
from services.cache.store import CacheStore
from services.cache.verifier import CONTEXT_SEPARATOR, Decision, Verifier
from tests.conftest import own_redis_server
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

DIMS = 64
USER = common_pb2.ROLE_USER
ASSISTANT = common_pb2.ROLE_ASSISTANT
STORED = "What is the quickest way to learn Python?"
PARAPHRASE = "How can I learn Python fast?"  # similarity 0.95 to STORED
LOOSE = "Is Python worth learning?"  # similarity 0.85 to STORED
EMBEDDER = "fake@1"


def _direction(similarity: float) -> np.ndarray:
    vector = np.zeros(DIMS, np.float32)
    vector[0], vector[1] = similarity, np.sqrt(1 - similarity**2)
    return vector


class FakeEmbedder:
    """Known texts get chosen directions; any other text a pseudo-random
    direction, nearly orthogonal to everything else in 64 dimensions."""

    def __init__(self) -> None:
        self.table = {STORED: _direction(1.0), PARAPHRASE: _direction(0.95), LOOSE: _direction(0.85)}
        self.calls: list[str] = []
        self.available = True
        # The name the vectors come under (meshgate.embedding.embedder_name).
        self.embedder = EMBEDDER

    async def embed_or_none(self, text: str, timeout_s: float | None = None) -> Embedding | None:
        self.calls.append(text)
        if not self.available:
            return None
        if text in self.table:
            return Embedding(self.table[text], self.embedder)
        return Embedding(_random_direction(text, DIMS), self.embedder)


def _random_direction(text: str, dimensions: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    vector = np.random.default_rng(seed).standard_normal(dimensions).astype(np.float32)
    return vector / np.linalg.norm(vector)


class AcceptingVerifier:
    """Accepts every candidate above the pre-filter unless the sub-partition
    had a wrong hit reported: the servicer's plumbing, not the verifier's
    policy (tests/unit/test_cache_verifier.py), is under test here."""

    expected_false_hit_rate = 0.01

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, int]] = []

    def trained_on(self, embedder: str) -> bool:
        return True  # every revision's vectors: the servicer keeps them apart

    def decide(self, query, query_vector, candidate, candidate_vector, strictness=0) -> Decision:
        self.seen.append((query, candidate, strictness))
        if strictness:
            return Decision(False, 0.0, "score")
        return Decision(True, float(query_vector @ candidate_vector), None)


def make_servicer(
    client,
    embedder,
    *,
    max_entries: int = 100,
    memo_entries: int = 0,
    verifier=None,
    semantic_threshold: float = 0.9,
    **settings,
) -> CacheServicer:
    """A servicer whose embeddings come from ``embedder``, through no memo
    unless ``memo_entries`` asks for one (the tests count embedder calls),
    and whose candidates ``verifier`` judges (an AcceptingVerifier unless
    given)."""
    settings = CacheSettings(
        semantic_threshold=semantic_threshold, max_entries_per_partition=max_entries, **settings
    )
    return CacheServicer(
        settings,
        CacheStore(client, max_entries),
        EmbeddingMemo(embedder, settings.embedding_model, memo_entries),
        Stats(client),
        IndexRegistry(max_entries, settings.max_resident_rows, settings.approximate_index_from),
        AcceptingVerifier() if verifier is None else verifier,
    )


@pytest.fixture
def embedder() -> FakeEmbedder:
    return FakeEmbedder()


@pytest.fixture
def cache(redis_client, embedder) -> CacheServicer:
    return make_servicer(redis_client, embedder)


def scope(tenant: str, model: str = "tiny-gpt", **parameters) -> pb.CacheScope:
    return pb.CacheScope(
        tenant_id=tenant, model=model, parameters=common_pb2.GenerationParameters(**parameters)
    )


def conversation(*contents: str) -> list[common_pb2.Message]:
    """Alternating user and assistant messages, ending with a user question."""
    roles = [USER if i % 2 == 0 else ASSISTANT for i in range(len(contents))]
    if roles[-1] != USER:
        raise ValueError("end with a question")
    return [common_pb2.Message(role=r, content=c) for r, c in zip(roles, contents)]


async def store(cache, s, messages, text="an answer", ttl_seconds=0) -> str:
    response = await cache.Store(
        pb.StoreRequest(
            scope=s, messages=messages, answer=pb.CachedAnswer(text=text), ttl_seconds=ttl_seconds
        ),
        None,
    )
    return response.entry_id


async def lookup(cache, s, messages, semantic=True) -> pb.LookupResponse:
    return await cache.Lookup(pb.LookupRequest(scope=s, messages=messages, semantic=semantic), None)


async def test_exact_hit_computes_no_embedding(cache, embedder, tenant):
    entry_id = await store(cache, scope(tenant), conversation(STORED), text="Practice daily.")
    calls = len(embedder.calls)
    response = await lookup(cache, scope(tenant), conversation(f"  {STORED.replace(' ', '   ')} "))
    assert response.status == pb.LOOKUP_STATUS_EXACT_HIT
    assert response.similarity == 1.0
    assert response.answer.text == "Practice daily."
    assert response.entry_id == entry_id
    assert len(embedder.calls) == calls


async def test_semantic_hit_needs_similarity_at_the_threshold(cache, tenant):
    entry_id = await store(cache, scope(tenant), conversation(STORED), text="Practice daily.")
    hit = await lookup(cache, scope(tenant), conversation(PARAPHRASE))
    assert hit.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    assert hit.similarity == pytest.approx(0.95, abs=1e-5)
    assert hit.entry_id == entry_id and hit.answer.text == "Practice daily."
    assert (await lookup(cache, scope(tenant), conversation(LOOSE))).status == pb.LOOKUP_STATUS_MISS
    unrelated = await lookup(cache, scope(tenant), conversation("What is the capital of France?"))
    assert unrelated.status == pb.LOOKUP_STATUS_MISS


async def test_semantic_matching_only_when_asked_and_for_user_questions(cache, embedder, tenant):
    await store(cache, scope(tenant), conversation(STORED))
    exact_only = await lookup(cache, scope(tenant), conversation(PARAPHRASE), semantic=False)
    assert exact_only.status == pb.LOOKUP_STATUS_MISS
    await asyncio.sleep(0)  # its embedding ahead (see the next test) has started
    calls = len(embedder.calls)
    not_a_question = [common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=PARAPHRASE)]
    for semantic in (True, False):
        response = await lookup(cache, scope(tenant), not_a_question, semantic=semantic)
        assert response.status == pb.LOOKUP_STATUS_MISS
    await asyncio.sleep(0)
    assert len(embedder.calls) == calls


class GatedEmbedder(FakeEmbedder):
    """Holds every embedding until ``release`` is set; ``started`` lists
    every embedding begun, ``calls`` those finished."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.started: list[str] = []

    async def embed_or_none(self, text: str, timeout_s: float | None = None) -> Embedding | None:
        self.started.append(text)
        await self.release.wait()
        return await super().embed_or_none(text)


async def _primed(redis_client, tenant, embedder):
    """A servicer holding STORED whose lookups have seen the vector size
    (from then on the first stage runs), the embedder's records cleared.
    With a memo: an embedding started ahead that finished before its
    lookup or Store asked is found there."""
    cache = make_servicer(redis_client, embedder, memo_entries=64)
    await store(cache, scope(tenant), conversation(STORED))
    other = await lookup(cache, scope(tenant), conversation(STORED + " Fast?"))
    assert other.status == pb.LOOKUP_STATUS_MISS
    embedder.calls.clear()
    if isinstance(embedder, GatedEmbedder):
        embedder.started.clear()
        embedder.release.clear()
    return cache


async def test_an_exact_only_miss_starts_the_embedding_its_semantic_lookup_uses(redis_client, tenant):
    embedder = GatedEmbedder()
    embedder.release.set()
    cache = await _primed(redis_client, tenant, embedder)
    # An exact hit starts nothing; an exact-only miss starts the embedding
    # the router's semantic lookup of the same prompt will need, and still
    # answers at once, a miss.
    exact = await lookup(cache, scope(tenant), conversation(STORED), semantic=False)
    assert exact.status == pb.LOOKUP_STATUS_EXACT_HIT
    miss = await asyncio.wait_for(lookup(cache, scope(tenant), conversation(PARAPHRASE), semantic=False), 10)
    assert miss.status == pb.LOOKUP_STATUS_MISS
    await asyncio.sleep(0)
    assert embedder.started == [PARAPHRASE]
    # The semantic lookup waits for that embedding rather than starting one.
    semantic = asyncio.ensure_future(lookup(cache, scope(tenant), conversation(PARAPHRASE)))
    await asyncio.sleep(0.05)
    assert not semantic.done() and embedder.started == [PARAPHRASE]
    embedder.release.set()
    hit = await asyncio.wait_for(semantic, 10)
    assert hit.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    assert embedder.calls == [PARAPHRASE]
    # A question sharing no word with the partition is left to the
    # semantic lookup's first stage: nothing embedded ahead.
    sistine = "Who painted the Sistine Chapel ceiling?"
    unrelated = await lookup(cache, scope(tenant), conversation(sistine), semantic=False)
    assert unrelated.status == pb.LOOKUP_STATUS_MISS
    await asyncio.sleep(0)
    assert embedder.started == [PARAPHRASE]


async def test_a_store_uses_the_embedding_an_exact_only_miss_started(redis_client, embedder, tenant):
    cache = await _primed(redis_client, tenant, embedder)
    miss = await lookup(cache, scope(tenant), conversation(PARAPHRASE), semantic=False)
    assert miss.status == pb.LOOKUP_STATUS_MISS
    # Long enough for the embedding ahead to finish and its flight to end:
    # the Store below finds the vector in the memo, not a call under way.
    await asyncio.sleep(0.05)
    # Embedded by the miss, before any Store: the Store below must not embed again.
    assert embedder.calls == [PARAPHRASE]
    await store(cache, scope(tenant), conversation(PARAPHRASE), text="Build small projects.")
    assert embedder.calls == [PARAPHRASE]


class FailingEmbedder(FakeEmbedder):
    """Raises instead of answering while ``broken``: a bug below the
    embedder, not the inference service being down (that is None)."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False

    async def embed_or_none(self, text: str, timeout_s: float | None = None) -> Embedding | None:
        if self.broken:
            self.calls.append(text)
            raise RuntimeError("embedding broke")
        return await super().embed_or_none(text)


async def _ahead_finished(embedder: FakeEmbedder, calls: list[str]) -> None:
    """Waits until the embedder has seen ``calls``; the real-time sleep
    after it lets the finished task's done-callbacks run."""
    async with asyncio.timeout(10):
        while embedder.calls != calls:
            await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)


@pytest.mark.parametrize("failure", ["unavailable", "error"])
async def test_a_failed_embedding_ahead_is_not_handed_to_a_later_lookup(redis_client, tenant, failure):
    embedder = FailingEmbedder()
    cache = await _primed(redis_client, tenant, embedder)
    if failure == "unavailable":
        embedder.available = False
    else:
        embedder.broken = True
    unretrieved: list[dict] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    try:
        miss = await lookup(cache, scope(tenant), conversation(PARAPHRASE), semantic=False)
        assert miss.status == pb.LOOKUP_STATUS_MISS
        await _ahead_finished(embedder, [PARAPHRASE])
        # The inference service is back: the semantic lookup embeds anew and hits.
        embedder.available, embedder.broken = True, False
        hit = await lookup(cache, scope(tenant), conversation(PARAPHRASE))
        assert hit.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
        assert embedder.calls == [PARAPHRASE, PARAPHRASE]
        # A failed embedding ahead nobody claimed: the next exact-only miss
        # starts one again, and the Store after it is found semantically.
        question = "How do I learn Python quickly?"
        embedder.table[question] = _direction(0.97)
        embedder.available, embedder.broken = failure != "unavailable", failure == "error"
        await lookup(cache, scope(tenant), conversation(question), semantic=False)
        await _ahead_finished(embedder, [PARAPHRASE, PARAPHRASE, question])
        embedder.available, embedder.broken = True, False
        await lookup(cache, scope(tenant), conversation(question), semantic=False)
        await _ahead_finished(embedder, [PARAPHRASE, PARAPHRASE, question, question])
        await store(cache, scope(tenant), conversation(question), text="Daily practice.")
        assert embedder.calls == [PARAPHRASE, PARAPHRASE, question, question]
        reworded = "What is the fastest way to learn Python?"
        embedder.table[reworded] = _direction(0.97)
        found = await lookup(cache, scope(tenant), conversation(reworded))
        assert found.status == pb.LOOKUP_STATUS_SEMANTIC_HIT and found.answer.text == "Daily practice."
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert unretrieved == []


async def test_close_cancels_the_embeddings_started_ahead(redis_client, tenant):
    embedder = GatedEmbedder()
    embedder.release.set()  # for priming; cleared after it
    cache = await _primed(redis_client, tenant, embedder)
    await lookup(cache, scope(tenant), conversation(PARAPHRASE), semantic=False)
    await asyncio.sleep(0)
    assert embedder.started == [PARAPHRASE]
    # Never released: close returns only by cancelling it.
    await asyncio.wait_for(cache.close(), 10)
    assert embedder.calls == []


async def test_the_embedding_memo_is_kept_per_tenant(redis_client, embedder, tenant):
    """A remembered question answers faster: tenant B must not learn from
    that what tenant A asked, so B's lookup embeds the text again."""
    cache = make_servicer(redis_client, embedder, memo_entries=64)
    tenants = (tenant, tenant + "-b")
    for who in tenants:
        await store(cache, scope(who), conversation(STORED))
    embedder.calls.clear()
    for who in tenants * 2:
        response = await lookup(cache, scope(who), conversation(PARAPHRASE))
        assert response.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    # Each tenant's first lookup embedded; its repeat came from its own memo.
    assert embedder.calls == [PARAPHRASE, PARAPHRASE]


@pytest.mark.parametrize(
    "other",
    [
        {"tenant": "someone-else"},
        {"model": "other-model"},
        {"parameters": {"temperature": 0.5}},
        {"parameters": {"stop": ["\n"]}},
    ],
    ids=["tenant", "model", "temperature", "stop"],
)
async def test_partitions_never_share_entries(cache, tenant, other):
    await store(cache, scope(tenant), conversation(STORED))
    other_scope = scope(
        other.get("tenant", tenant) + ("-x" if "tenant" in other else ""),
        other.get("model", "tiny-gpt"),
        **other.get("parameters", {}),
    )
    for question in (STORED, PARAPHRASE):
        response = await lookup(cache, other_scope, conversation(question))
        assert response.status == pb.LOOKUP_STATUS_MISS


async def test_follow_ups_are_matched_with_their_topic_turn(cache, embedder, tenant):
    paris = ("What is the capital of France?", "Paris.")
    rome = ("What is the capital of Italy?", "Rome.")
    # What the service embeds for a follow-up: the question, then the topic turn.
    embedder.table[f"{STORED}{CONTEXT_SEPARATOR}{paris[0]}"] = _direction(1.0)
    embedder.table[f"{PARAPHRASE}{CONTEXT_SEPARATOR}{paris[0]}"] = _direction(0.95)
    await store(cache, scope(tenant), conversation(*paris, STORED))
    assert embedder.calls[-1] == f"{STORED}{CONTEXT_SEPARATOR}{paris[0]}"
    assert (await lookup(cache, scope(tenant), conversation(*rome, STORED))).status == pb.LOOKUP_STATUS_MISS
    # A bare question is matched among single questions, never conversations.
    assert (await lookup(cache, scope(tenant), conversation(STORED))).status == pb.LOOKUP_STATUS_MISS
    # Small talk between the topic and the follow-up drops out.
    chatty = conversation(*paris, "Thanks!", "You're welcome.", PARAPHRASE)
    same = await lookup(cache, scope(tenant), chatty)
    assert same.status == pb.LOOKUP_STATUS_SEMANTIC_HIT


async def test_a_question_under_another_system_message_is_never_matched_by_meaning(cache, embedder, tenant):
    """A system message says how to answer: the same question under another
    one has another answer, however close the words."""
    french = common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Answer only in French.")
    english = common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Answer only in English, as JSON.")
    await store(cache, scope(tenant), [french, *conversation(STORED)], text="Pratiquez chaque jour.")
    asked = await lookup(cache, scope(tenant), [english, *conversation(PARAPHRASE)])
    assert asked.status == pb.LOOKUP_STATUS_MISS
    # Nor without one; under the same one, the paraphrase is served.
    assert (await lookup(cache, scope(tenant), conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS
    same = await lookup(cache, scope(tenant), [french, *conversation(PARAPHRASE)])
    assert same.status == pb.LOOKUP_STATUS_SEMANTIC_HIT and same.answer.text == "Pratiquez chaque jour."


async def test_a_follow_up_after_another_reply_to_its_topic_is_not_matched(cache, embedder, tenant):
    """The reply to the topic turn is often what the follow-up is about."""
    pick = "Pick a random number between 1 and 10."
    embedder.table[f"{STORED}{CONTEXT_SEPARATOR}{normalize_text(pick)}"] = _direction(1.0)
    embedder.table[f"{PARAPHRASE}{CONTEXT_SEPARATOR}{normalize_text(pick)}"] = _direction(0.95)
    await store(cache, scope(tenant), conversation(pick, "7", STORED), text="14")
    other_reply = await lookup(cache, scope(tenant), conversation(pick, "3", PARAPHRASE))
    assert other_reply.status == pb.LOOKUP_STATUS_MISS
    # Small talk after the same reply still drops out.
    chatty = conversation(pick, "7", "Thanks!", "Anything else?", PARAPHRASE)
    same = await lookup(cache, scope(tenant), chatty)
    assert same.status == pb.LOOKUP_STATUS_SEMANTIC_HIT and same.answer.text == "14"


async def test_full_partition_evicts_oldest_first_also_after_a_restart(redis_client, embedder, tenant):
    cache = make_servicer(redis_client, embedder, max_entries=2)
    oldest, middle, newest = STORED, "Who wrote Hamlet?", "How far is the Moon?"
    for question in (oldest, middle, newest):
        await store(cache, scope(tenant), conversation(question))
    assert (
        await lookup(cache, scope(tenant), conversation(oldest), semantic=False)
    ).status == pb.LOOKUP_STATUS_MISS
    restarted = make_servicer(redis_client, embedder, max_entries=2)
    assert (await lookup(restarted, scope(tenant), conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS
    for question in (middle, newest):
        response = await lookup(restarted, scope(tenant), conversation(question), semantic=False)
        assert response.status == pb.LOOKUP_STATUS_EXACT_HIT


async def test_semantic_index_reloads_after_a_restart(redis_client, embedder, tenant):
    await store(make_servicer(redis_client, embedder), scope(tenant), conversation(STORED))
    restarted = make_servicer(redis_client, embedder)
    response = await lookup(restarted, scope(tenant), conversation(PARAPHRASE))
    assert response.status == pb.LOOKUP_STATUS_SEMANTIC_HIT


# Over servicer.MAX_SEMANTIC_TEXT_BYTES in UTF-8 (1,241 bytes) but not in characters (641).
LONG_STORED = STORED + " " + "é" * 600
LONG_PARAPHRASE = PARAPHRASE + " " + "é" * 600


async def test_a_question_longer_than_the_bound_is_cached_exactly_only(cache, embedder, tenant):
    embedder.table |= {LONG_STORED: _direction(1.0), LONG_PARAPHRASE: _direction(0.95)}
    await store(cache, scope(tenant), conversation(LONG_STORED), text="Practice daily.")
    exact = await lookup(cache, scope(tenant), conversation(LONG_STORED))
    assert exact.status == pb.LOOKUP_STATUS_EXACT_HIT and exact.answer.text == "Practice daily."
    # Its vector would be a hit at 0.95: no row of it is resident, nor is the long question embedded.
    assert (await lookup(cache, scope(tenant), conversation(LONG_PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS
    assert (await lookup(cache, scope(tenant), conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS
    assert LONG_STORED not in embedder.calls and LONG_PARAPHRASE not in embedder.calls


async def test_a_stored_row_longer_than_the_bound_is_not_loaded(redis_client, embedder, tenant, monkeypatch):
    embedder.table[LONG_STORED] = _direction(1.0)
    # Stored as before the bound existed.
    monkeypatch.setattr(servicer_module, "MAX_SEMANTIC_TEXT_BYTES", 1 << 20)
    await store(make_servicer(redis_client, embedder), scope(tenant), conversation(LONG_STORED))
    monkeypatch.undo()
    restarted = make_servicer(redis_client, embedder)
    # Its vector would be a hit at 0.95 (as test_semantic_index_reloads_after_a_restart's).
    assert (await lookup(restarted, scope(tenant), conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS


async def test_lookups_are_answered_while_a_large_partition_rebuilds_its_graph(
    redis_client, embedder, tenant, monkeypatch
):
    """After a restart the first lookup loads every row from Redis; their
    graph is built by a worker (held here until the test opens the gate),
    and lookups of that partition and of others are answered meanwhile."""
    gate = threading.Event()
    real_add = index_module._add_to_graph

    def add_after_gate(graph, keys_, vectors):
        gate.wait(timeout=120)
        real_add(graph, keys_, vectors)

    monkeypatch.setattr(index_module, "_add_to_graph", add_after_gate)
    settings = CacheSettings(semantic_threshold=0.9, approximate_index_from=100)

    def restarted() -> CacheServicer:
        return CacheServicer(
            settings,
            CacheStore(redis_client, 10_000),
            EmbeddingMemo(embedder, settings.embedding_model, 0),
            Stats(redis_client),
            IndexRegistry(10_000, settings.max_resident_rows, settings.approximate_index_from),
            AcceptingVerifier(),
        )

    try:
        large = scope(tenant)
        entry_id = await store(restarted(), large, conversation(STORED), text="Build small projects daily.")
        partition = keys.partition(large)
        context_id = keys.context_id(partition, EMBEDDER)
        rows = 2000
        for start in range(0, rows, 200):
            await asyncio.gather(
                *(
                    redis_client_put(redis_client, partition, context_id, f"filler question {i}", embedder)
                    for i in range(start, start + 200)
                )
            )
        small = scope(tenant, model="other-model")
        await store(restarted(), small, conversation("Who wrote Hamlet?"), text="Shakespeare.")

        cache = restarted()
        first = await lookup(cache, large, conversation(PARAPHRASE))
        assert first.status == pb.LOOKUP_STATUS_SEMANTIC_HIT and first.entry_id == entry_id
        index = cache._indexes.get(partition.vectors_key(context_id))
        assert len(index) == rows + 1 and index.building
        # Meanwhile: the same partition by exact scan, another one, a Store.
        again = await lookup(cache, large, conversation(PARAPHRASE))
        assert again.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
        assert again.answer.text == "Build small projects daily."
        other = await lookup(cache, small, conversation("Who wrote Hamlet?"))
        assert other.status == pb.LOOKUP_STATUS_EXACT_HIT and other.answer.text == "Shakespeare."
        await store(cache, large, conversation("How do I renew my passport?"), text="At the post office.")
        assert index.building
        gate.set()
        assert await asyncio.to_thread(index.wait_for_graph, 120)
        after = await lookup(cache, large, conversation(PARAPHRASE))
        assert after.status == pb.LOOKUP_STATUS_SEMANTIC_HIT and after.entry_id == entry_id
        assert index.approximate and not index.building and len(index._graph) == rows + 2
    finally:
        gate.set()


async def redis_client_put(client, partition, context_id: str, question: str, embedder) -> None:
    vector = (await embedder.embed_or_none(question)).vector
    messages = conversation(question)
    await CacheStore(client, 10_000).put_semantic(
        partition,
        context_id,
        keys.entry_id(partition, messages),
        pb.CachedAnswer(text=f"answer to {question}").SerializeToString(),
        vector.tobytes(),
        question,
        int(time.time() * 1000),
        600_000,
    )


class CountedReads:
    """Stands in for a store's read of one batch of entries (the script
    behind ``CacheStore.batches_since``): counts the reads, fails those
    numbered in ``failing``, holds the one numbered ``held`` until ``resume``
    is set, and records the most rows already read that the sub-partition's
    index did not hold when another read began."""

    def __init__(
        self, cache: CacheServicer, index_key: str, failing: tuple[int, ...] = (), held: int = 0
    ) -> None:
        self._read = cache._store._entries_since
        cache._store._entries_since = self
        self._indexes = cache._indexes
        self._index_key = index_key
        self._failing = failing
        self._held = held
        self.resume = asyncio.Event()
        self.reads = 0
        self.rows_read = 0
        self.most_held_outside = 0

    async def __call__(self, keys, args):
        self.reads += 1
        index = self._indexes.get(self._index_key)
        held_outside = self.rows_read - (len(index) if index is not None else 0)
        self.most_held_outside = max(self.most_held_outside, held_outside)
        if self.reads in self._failing:
            raise redis.ConnectionError("injected")
        if self.reads == self._held:
            await self.resume.wait()
        reply = await self._read(keys=keys, args=args)
        self.rows_read += len(reply[2])
        return reply


async def _lookup_held_at_its_second_read(
    cache: CacheServicer, index_key: str, tenant: str, question: str = PARAPHRASE
) -> tuple[CountedReads, asyncio.Future]:
    """A lookup of ``question`` started and held at the second read of its
    sub-partition's load (until ``reads.resume`` is set), and the reads."""
    reads = CountedReads(cache, index_key, held=2)
    held = asyncio.ensure_future(lookup(cache, scope(tenant), conversation(question)))
    while reads.reads < 2:
        await asyncio.sleep(0.001)
    return reads, held


# Batches of the load in the tests below: 101 rows are 7 reads (the last one short).
TEST_SYNC_BATCH = 16
LOAD_READS = 101 // TEST_SYNC_BATCH + 1


async def _cold_partition(redis_client, embedder, tenant, monkeypatch) -> tuple[CacheServicer, str]:
    """A sub-partition of 101 entries, STORED among them, in Redis; and a
    restarted servicer that has none of it resident, reading batches of
    ``TEST_SYNC_BATCH``."""
    monkeypatch.setattr(store_module, "SYNC_BATCH", TEST_SYNC_BATCH)
    s = scope(tenant)
    await store(make_servicer(redis_client, embedder, max_entries=1000), s, conversation(STORED))
    partition = keys.partition(s)
    context_id = keys.context_id(partition, EMBEDDER)
    await asyncio.gather(
        *(
            redis_client_put(redis_client, partition, context_id, f"filler question {i}", embedder)
            for i in range(100)
        )
    )
    return make_servicer(redis_client, embedder, max_entries=1000), partition.vectors_key(context_id)


async def test_a_cold_partition_is_applied_batch_by_batch(redis_client, embedder, tenant, monkeypatch):
    cache, index_key = await _cold_partition(redis_client, embedder, tenant, monkeypatch)
    reads = CountedReads(cache, index_key)
    response = await lookup(cache, scope(tenant), conversation(PARAPHRASE))
    assert response.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    assert len(cache._indexes.get(index_key)) == 101 and reads.reads == LOAD_READS
    # Each batch was in the index before the next one was read: the load
    # never holds more than one round trip's rows outside it.
    assert reads.most_held_outside == 0


async def test_concurrent_lookups_of_a_cold_partition_share_one_load(
    redis_client, embedder, tenant, monkeypatch
):
    cache, index_key = await _cold_partition(redis_client, embedder, tenant, monkeypatch)
    reads = CountedReads(cache, index_key)
    responses = await asyncio.gather(
        lookup(cache, scope(tenant), conversation(PARAPHRASE)),
        lookup(cache, scope(tenant), conversation(PARAPHRASE)),
    )
    assert [r.status for r in responses] == [pb.LOOKUP_STATUS_SEMANTIC_HIT] * 2
    # One load, and the second lookup's own read of what was stored since
    # it began (the load's last read may have begun before).
    assert reads.reads == LOAD_READS + 1


async def test_a_lookup_that_gives_up_leaves_the_load_running(redis_client, embedder, tenant, monkeypatch):
    cache, index_key = await _cold_partition(redis_client, embedder, tenant, monkeypatch)
    reads, gives_up = await _lookup_held_at_its_second_read(cache, index_key, tenant)
    gives_up.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gives_up
    waits = asyncio.ensure_future(lookup(cache, scope(tenant), conversation(PARAPHRASE)))
    await asyncio.sleep(0.05)
    assert not waits.done() and reads.reads == 2
    reads.resume.set()
    assert (await waits).status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    # The load went on and served the later lookup, which read once more.
    assert reads.reads == LOAD_READS + 1


async def test_a_failed_load_is_shared_and_the_next_lookup_loads_again(
    redis_client, embedder, tenant, monkeypatch
):
    cache, index_key = await _cold_partition(redis_client, embedder, tenant, monkeypatch)
    reads = CountedReads(cache, index_key, failing=(3,))
    failures = await asyncio.gather(
        lookup(cache, scope(tenant), conversation(PARAPHRASE)),
        lookup(cache, scope(tenant), conversation(PARAPHRASE)),
        return_exceptions=True,
    )
    assert [getattr(f, "code", f) for f in failures] == [grpc.StatusCode.UNAVAILABLE] * 2
    assert reads.reads == 3
    response = await lookup(cache, scope(tenant), conversation(PARAPHRASE))
    assert response.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    assert len(cache._indexes.get(index_key)) == 101
    # The retry resumed after the two batches applied before the failure.
    assert reads.reads == 3 + (101 - 2 * TEST_SYNC_BATCH) // TEST_SYNC_BATCH + 1


async def _seeded_other_partition(redis_client, embedder, tenant) -> str:
    """Another tenant's partition of 30 entries: loading it pushes out
    a partition under a bound of 40 resident rows."""
    other = tenant + "-other"
    seeder = make_servicer(redis_client, embedder, max_entries=1000)
    for i in range(30):
        await store(seeder, scope(other), conversation(f"other topic number {i} about gardening"))
    return other


OTHER_QUESTION = "about gardening, other topic number 3"


async def test_a_partition_pushed_out_mid_load_is_loaded_afresh(redis_client, embedder, tenant, monkeypatch):
    _, index_key = await _cold_partition(redis_client, embedder, tenant, monkeypatch)
    other = await _seeded_other_partition(redis_client, embedder, tenant)
    cache = make_servicer(redis_client, embedder, max_entries=1000, max_resident_rows=40)
    reads, pushed_out = await _lookup_held_at_its_second_read(cache, index_key, tenant)
    # The other partition's load goes over the bound and pushes out the
    # partial index (the least recently used).
    await lookup(cache, scope(other), conversation(OTHER_QUESTION))
    assert cache._indexes._indexes.get(index_key) is None
    reads.resume.set()
    assert (await pushed_out).status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    # The first load stopped at its next batch, and a fresh one loaded the
    # partition whole into the registry, counted against the bound.
    index = cache._indexes._indexes[index_key]
    assert index.loaded and len(index) == 101
    # (Reads of the other partition's load count too: its 30 rows are 2.)
    assert reads.reads == 2 + 2 + LOAD_READS
    assert cache._indexes.resident_rows == index.weight_rows
    assert (
        await lookup(cache, scope(tenant), conversation(PARAPHRASE))
    ).status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    # Served by the resident index: one read of what is new, no reload.
    assert reads.reads == 2 + 2 + LOAD_READS + 1


async def test_loads_that_together_exceed_the_bound_still_answer_every_lookup(
    redis_client, embedder, tenant, monkeypatch
):
    # Two cold partitions of 101 rows under a bound of 40: each load's
    # batches push the other out, again after each one's fresh start.
    tenants = [tenant, tenant + "-2"]
    index_keys = [(await _cold_partition(redis_client, embedder, t, monkeypatch))[1] for t in tenants]
    cache = make_servicer(redis_client, embedder, max_entries=1000, max_resident_rows=40)
    reads = CountedReads(cache, index_keys[0])  # counts both partitions' reads
    responses = await asyncio.wait_for(
        asyncio.gather(*(lookup(cache, scope(t), conversation(PARAPHRASE)) for t in tenants)), timeout=30
    )
    # Each lookup waited on two loads at most (its own, one fresh start),
    # then answered a miss rather than wait on a third; the last load
    # standing is pushed out by nobody and serves its lookup.
    statuses = [r.status for r in responses]
    assert set(statuses) <= {pb.LOOKUP_STATUS_SEMANTIC_HIT, pb.LOOKUP_STATUS_MISS}
    assert pb.LOOKUP_STATUS_SEMANTIC_HIT in statuses
    assert reads.reads <= 4 * LOAD_READS
    registry = cache._indexes
    assert registry.resident_rows == sum(index.weight_rows for index in registry._indexes.values())


RIVER = "Which river is the longest in Europe?"
RIVER_PARAPHRASE = "What is the longest river of Europe?"


async def test_a_store_during_a_load_is_found_by_a_lookup_after_it(
    redis_client, embedder, tenant, monkeypatch
):
    cache, index_key = await _cold_partition(redis_client, embedder, tenant, monkeypatch)
    river = np.zeros(DIMS, np.float32)
    river[2] = 1.0
    paraphrase = np.zeros(DIMS, np.float32)
    paraphrase[2], paraphrase[3] = 0.95, np.sqrt(1 - 0.95**2)
    embedder.table.update({RIVER: river, RIVER_PARAPHRASE: paraphrase})
    reads, loading = await _lookup_held_at_its_second_read(cache, index_key, tenant)
    stored_id = await store(cache, scope(tenant), conversation(RIVER))
    reads.resume.set()
    assert (await loading).status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    response = await lookup(cache, scope(tenant), conversation(RIVER_PARAPHRASE))
    assert response.status == pb.LOOKUP_STATUS_SEMANTIC_HIT and response.entry_id == stored_id


async def test_close_during_a_load_leaves_no_task_behind(redis_client, embedder, tenant, monkeypatch):
    cache, index_key = await _cold_partition(redis_client, embedder, tenant, monkeypatch)
    reads, waiting = await _lookup_held_at_its_second_read(cache, index_key, tenant)
    await cache.close()
    assert not cache._loads._flights and not cache._loads._running
    assert not [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "CacheServicer._load"]
    # The lookup that waited on the load ends with it, rather than hang.
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, timeout=5)
    assert reads.reads == 2


class ResizedEmbedder(FakeEmbedder):
    """Holds the embeddings of ``gated`` until ``release`` is set; after
    ``resized`` is set every vector has half the size (the model changed)."""

    def __init__(self, gated: str) -> None:
        super().__init__()
        self.gated = gated
        self.release = asyncio.Event()
        self.resized = False

    async def embed_or_none(self, text: str, timeout_s: float | None = None) -> Embedding | None:
        if text == self.gated:
            await self.release.wait()
        if not self.resized:
            return await super().embed_or_none(text)
        return Embedding(_random_direction(text, DIMS // 2), self.embedder)


async def test_a_lookup_after_the_model_changed_never_searches_an_index_of_the_old_size(
    redis_client, tenant, monkeypatch
):
    embedder = ResizedEmbedder(gated=PARAPHRASE)
    _, index_key = await _cold_partition(redis_client, embedder, tenant, monkeypatch)
    other = await _seeded_other_partition(redis_client, embedder, tenant)
    cache = make_servicer(redis_client, embedder, max_entries=1000, max_resident_rows=40)
    embedder.release.set()
    assert (
        await lookup(cache, scope(tenant), conversation(PARAPHRASE))
    ).status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    embedder.release.clear()
    # Embeds (held) while the loaded index tops itself up.
    resized = asyncio.ensure_future(lookup(cache, scope(tenant), conversation(PARAPHRASE)))
    await asyncio.sleep(0.05)
    # Meanwhile the index is pushed out, and a lookup of a question that
    # shares no word with it starts a load at the old size.
    await lookup(cache, scope(other), conversation(OTHER_QUESTION))
    reads, old_size = await _lookup_held_at_its_second_read(
        cache, index_key, tenant, "Any news on the weather?"
    )
    # The model changes: the held lookup's vector has the new size, and its
    # re-sync finds the load at the old size in flight.
    embedder.resized = True
    embedder.release.set()
    await asyncio.sleep(0.05)
    reads.resume.set()
    responses = await asyncio.gather(resized, old_size)
    assert [r.status for r in responses] == [pb.LOOKUP_STATUS_MISS] * 2
    assert cache._indexes._indexes[index_key].dimensions == DIMS // 2


async def test_entries_stored_by_another_replica_are_found(redis_client, embedder, tenant):
    one, two = make_servicer(redis_client, embedder), make_servicer(redis_client, embedder)
    # Replica one loads the (empty) sub-partition, then replica two stores into it.
    assert (await lookup(one, scope(tenant), conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS
    await store(two, scope(tenant), conversation(STORED))
    response = await lookup(one, scope(tenant), conversation(PARAPHRASE))
    assert response.status == pb.LOOKUP_STATUS_SEMANTIC_HIT


async def _rows_checked(cache: CacheServicer) -> None:
    """Waits for the checks of indexes against Redis the last lookup started (_drop_rows_gone)."""
    if cache._row_checks._running:
        await asyncio.wait(cache._row_checks._running)


async def test_an_index_another_replica_emptied_is_dropped_without_checking_its_rows(
    redis_client, embedder, tenant, monkeypatch
):
    """A review: after another replica's Invalidate, Redis lists no entry of
    the sub-partition, and this replica checked its whole index against it,
    1,024 rows a ZMSCORE round trip (a thousand at 1M rows), to drop every
    row. It drops the index at once now; a partial removal (a report) is
    still checked row by row."""
    one, two = make_servicer(redis_client, embedder), make_servicer(redis_client, embedder)
    s = scope(tenant)
    for text in (STORED, "Who wrote the play Hamlet?", "How far away is the Moon from the Earth?"):
        await store(two, s, conversation(text))
    hit = await lookup(one, s, conversation(PARAPHRASE))
    assert hit.status == pb.LOOKUP_STATUS_SEMANTIC_HIT and one._indexes.resident_entries == 3
    checked = []
    versions_held = one._store.versions_held

    async def counted(partition, context_id, entry_ids):
        checked.append(len(entry_ids))
        return await versions_held(partition, context_id, entry_ids)

    monkeypatch.setattr(one._store, "versions_held", counted)

    report = await two.ReportWrongHit(
        pb.ReportWrongHitRequest(scope=s, messages=conversation(PARAPHRASE), entry_id=hit.entry_id), None
    )
    assert report.entry_removed
    await lookup(one, s, conversation("Who painted the Mona Lisa?"))
    await _rows_checked(one)
    assert checked == [3] and one._indexes.resident_entries == 2

    await two.Invalidate(pb.InvalidateRequest(tenant_id=tenant), None)
    await lookup(one, s, conversation("Who painted the Mona Lisa?"))
    await _rows_checked(one)
    assert checked == [3] and one._indexes.resident_entries == 0
    # Dropped, not lost: what is stored since is found by meaning.
    await store(two, s, conversation(STORED))
    assert (await lookup(one, s, conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_SEMANTIC_HIT


async def test_a_report_to_a_replica_that_cannot_tell_the_entrys_partition_is_refused_not_misfiled(
    redis_client, tenant
):
    """A replica that has not embedded yet, whose embedder is down: the
    report removed the answer but filed the pair in another sub-partition,
    and once the entry's prompt was stored again the reported prompt was
    served it again (a review). Refused UNAVAILABLE; taken once it can."""
    one = make_servicer(redis_client, FakeEmbedder())
    s = scope(tenant)
    entry_id = await store(one, s, conversation(STORED), text="Practice daily.")
    assert (await lookup(one, s, conversation(PARAPHRASE))).entry_id == entry_id
    down = FakeEmbedder()
    down.available = False
    two = make_servicer(redis_client, down)
    request = pb.ReportWrongHitRequest(scope=s, messages=conversation(PARAPHRASE), entry_id=entry_id)
    with pytest.raises(MeshgateError) as refused:
        await two.ReportWrongHit(request, None)
    assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.UNAVAILABLE, "EMBEDDER_UNAVAILABLE")
    down.available = True
    assert (await two.ReportWrongHit(request, None)).entry_removed
    assert await store(one, s, conversation(STORED), text="Practice daily.") == entry_id
    assert (await lookup(one, s, conversation(PARAPHRASE))).status != pb.LOOKUP_STATUS_SEMANTIC_HIT


async def test_a_check_of_an_indexs_rows_leaves_it_where_its_last_lookup_put_it(
    redis_client, embedder, tenant
):
    """The registry pushes out the index least recently looked up. A check
    of an index's rows against Redis (another replica's report removed one)
    marked it used as it ended: an index looked up after it was pushed out
    in its place, and the one nobody had looked up since stayed."""
    one, two = make_servicer(redis_client, embedder), make_servicer(redis_client, embedder)
    one._indexes._max_indexes = 2
    checked, looked_up_since, loaded_last = (
        scope(tenant, "checked"),
        scope(tenant, "since"),
        scope(tenant, "last"),
    )
    for s in (checked, looked_up_since, loaded_last):
        await store(two, s, conversation(STORED))
    await store(two, checked, conversation("Who wrote the play Hamlet?"))
    hit = await lookup(one, checked, conversation(PARAPHRASE))
    request = pb.ReportWrongHitRequest(
        scope=checked, messages=conversation(PARAPHRASE), entry_id=hit.entry_id
    )
    assert (await two.ReportWrongHit(request, None)).entry_removed
    # The next lookup's top-up finds a row Redis no longer lists and starts the check, held until
    # another index has been looked up.
    other_looked_up = asyncio.Event()
    versions_held = one._store.versions_held

    async def held(*args):
        await other_looked_up.wait()
        return await versions_held(*args)

    one._store.versions_held = held
    await lookup(one, checked, conversation("Who painted the Mona Lisa?"))
    checked_key = next(reversed(one._indexes._indexes))
    await lookup(one, looked_up_since, conversation(PARAPHRASE))
    other_looked_up.set()
    await _rows_checked(one)
    assert len(one._indexes._indexes[checked_key]) == 1
    await lookup(one, loaded_last, conversation(PARAPHRASE))
    assert checked_key not in one._indexes._indexes and len(one._indexes) == 2


async def test_concurrent_lookups_on_an_index_behind_redis_read_its_backlog_once(
    redis_client, embedder, tenant
):
    """Each of them read (and applied) the whole backlog: 32 lookups over
    8,192 rows another replica stored took 226 round trips, where one
    top-up takes 9."""
    one = make_servicer(redis_client, embedder, max_entries=10_000)
    two = make_servicer(redis_client, embedder, max_entries=10_000)
    await store(one, scope(tenant), conversation(STORED))
    loaded = await lookup(two, scope(tenant), conversation(PARAPHRASE))
    assert loaded.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    backlog = 2 * store_module.SYNC_BATCH
    for i in range(backlog):
        await store(one, scope(tenant), conversation(f"stored question {i} about topic {i % 97}"))
    round_trips, rows = [], []
    entries_since = two._store._entries_since

    async def counted(*args, **kwargs):
        reply = await entries_since(*args, **kwargs)
        round_trips.append(1)
        rows.append(len(reply[1]) // 2)
        return reply

    two._store._entries_since = counted
    lookups = [lookup(two, scope(tenant), conversation(PARAPHRASE)) for _ in range(32)]
    answers = await asyncio.gather(*lookups)
    assert {a.status for a in answers} == {pb.LOOKUP_STATUS_SEMANTIC_HIT}
    # One top-up reads the backlog (three round trips); the lookups that
    # waited for it begun before them read what is new since, once more.
    assert sum(rows) == backlog
    assert len(round_trips) <= 2 * (backlog // store_module.SYNC_BATCH + 1)


@pytest.mark.serial  # timing-sensitive: make test runs it alone
async def test_lookups_do_not_wait_out_a_top_up_hung_on_a_stalled_connection(
    redis_url, redis_client, embedder, tenant
):
    """One pooled connection stalls (a proxy holds it) during a top-up,
    while Redis answers every other connection at once: the lookups of the
    same sub-partition arriving meanwhile waited for the hung one's own
    deadline (the router's: 10 s) behind its lock; they now read for
    themselves after servicer.STALLED_TOP_UP_S, and find the entry stored
    since."""
    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    proxied = redis_access.connect(f"redis://127.0.0.1:{await proxy.start()}/0")
    try:
        writer, reader = make_servicer(redis_client, embedder), make_servicer(proxied, embedder)
        await store(writer, scope(tenant), conversation("Who wrote Hamlet?"))
        # Loads the reader's index (and opens pooled connections).
        assert (await lookup(reader, scope(tenant), conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS
        stored = await store(writer, scope(tenant), conversation(STORED))
        proxy.stall_when_sent(reader._store._entries_since.sha.encode())
        hung = asyncio.ensure_future(lookup(reader, scope(tenant), conversation(PARAPHRASE)))
        await asyncio.sleep(0.1)
        assert proxy.stalled == 1 and not hung.done()
        started = time.monotonic()
        behind = await asyncio.wait_for(
            asyncio.gather(*(lookup(reader, scope(tenant), conversation(PARAPHRASE)) for _ in range(4))),
            timeout=5,
        )
        waited_s = time.monotonic() - started
        assert [(r.status, r.entry_id) for r in behind] == [(pb.LOOKUP_STATUS_SEMANTIC_HIT, stored)] * 4
        assert waited_s < servicer_module.STALLED_TOP_UP_S + 1.0
        assert not hung.done()
        hung.cancel()
    finally:
        await proxied.aclose()
        await proxy.close()


@pytest.mark.serial  # timing-sensitive: make test runs it alone
async def test_lookups_do_not_wait_out_a_first_load_hung_on_a_stalled_connection(
    redis_url, redis_client, embedder, tenant
):
    """The same stall during the sub-partition's first load, which the
    lookups arriving meanwhile share (a single flight): they waited for the
    hung read until the socket timeout (10 s) ended it; now, after
    servicer.STALLED_TOP_UP_S without a reply, each reads for itself."""
    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    proxied = redis_access.connect(f"redis://127.0.0.1:{await proxy.start()}/0")
    try:
        writer, reader = make_servicer(redis_client, embedder), make_servicer(proxied, embedder)
        stored = await store(writer, scope(tenant), conversation(STORED))
        # Another partition's lookup: the reader learns the vectors' size and
        # opens pooled connections, but has not loaded this one's index.
        await lookup(reader, scope(tenant, model="smollm2"), conversation(PARAPHRASE))
        proxy.stall_when_sent(reader._store._entries_since.sha.encode())
        started = time.monotonic()
        first = asyncio.ensure_future(lookup(reader, scope(tenant), conversation(PARAPHRASE)))
        await asyncio.sleep(0.1)
        assert proxy.stalled == 1 and not first.done()
        answered = await asyncio.wait_for(
            asyncio.gather(
                first, *(lookup(reader, scope(tenant), conversation(PARAPHRASE)) for _ in range(4))
            ),
            timeout=5,
        )
        waited_s = time.monotonic() - started
        assert [(r.status, r.entry_id) for r in answered] == [(pb.LOOKUP_STATUS_SEMANTIC_HIT, stored)] * 5
        assert waited_s < servicer_module.STALLED_TOP_UP_S + 1.0
    finally:
        await proxied.aclose()
        await proxy.close()


async def test_expired_entries_are_never_returned(cache, tenant):
    """And a hit says how long its entry has left: expiry announces nothing,
    and the router's copies of a hit are served no longer."""
    await store(cache, scope(tenant), conversation(STORED), ttl_seconds=1)
    hits = [await lookup(cache, scope(tenant), conversation(question)) for question in (STORED, PARAPHRASE)]
    assert [hit.status for hit in hits] == [pb.LOOKUP_STATUS_EXACT_HIT, pb.LOOKUP_STATUS_SEMANTIC_HIT]
    assert all(0 < hit.expires_in_ms <= 1000 for hit in hits)
    await asyncio.sleep(1.1)
    for question in (STORED, PARAPHRASE):
        assert (await lookup(cache, scope(tenant), conversation(question))).status == pb.LOOKUP_STATUS_MISS


async def test_a_store_after_a_miss_reuses_its_embedding(redis_client, embedder, tenant):
    # Through the memo: with none (0 entries) the Store embeds again.
    cache = make_servicer(redis_client, embedder, memo_entries=64)
    assert (await lookup(cache, scope(tenant), conversation(STORED))).status == pb.LOOKUP_STATUS_MISS
    calls = len(embedder.calls)
    await store(cache, scope(tenant), conversation(STORED))
    assert len(embedder.calls) == calls
    assert (
        await lookup(cache, scope(tenant), conversation(PARAPHRASE))
    ).status == pb.LOOKUP_STATUS_SEMANTIC_HIT


async def test_a_miss_sharing_no_word_with_the_partition_is_not_embedded(redis_client, embedder, tenant):
    cache = make_servicer(redis_client, embedder)
    other = make_servicer(redis_client, embedder)
    await store(cache, scope(tenant), conversation(STORED))
    # The first lookup learns the vector size; from then on the first stage runs.
    first = await lookup(cache, scope(tenant), conversation(PARAPHRASE))
    assert first.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    sistine = "Who painted the Sistine Chapel ceiling?"
    reworded = "Which artist painted the Sistine Chapel ceiling?"
    embedder.table[reworded] = (await embedder.embed_or_none(sistine)).vector
    embedder.calls.clear()
    assert (await lookup(cache, scope(tenant), conversation(sistine))).status == pb.LOOKUP_STATUS_MISS
    assert embedder.calls == []
    # The Store after that miss embeds, and the entry is found from then on.
    await store(cache, scope(tenant), conversation(sistine), text="Michelangelo.")
    assert embedder.calls == [sistine]
    found = await lookup(cache, scope(tenant), conversation(reworded))
    assert found.status == pb.LOOKUP_STATUS_SEMANTIC_HIT and found.answer.text == "Michelangelo."
    # An entry another replica stored since counts: the index tops itself
    # up before the first stage decides.
    moon, distance = "How far away is the Moon?", "What is the distance to the Moon?"
    embedder.table[distance] = (await embedder.embed_or_none(moon)).vector
    await store(other, scope(tenant), conversation(moon), text="384,400 km.")
    embedder.calls.clear()
    answer = await lookup(cache, scope(tenant), conversation(distance))
    assert answer.status == pb.LOOKUP_STATUS_SEMANTIC_HIT and answer.answer.text == "384,400 km."
    assert embedder.calls == [distance]


async def test_a_busy_partition_embeds_only_questions_sharing_enough_words(redis_client, embedder, tenant):
    strict = make_servicer(redis_client, embedder)
    loose = make_servicer(redis_client, embedder, first_stage_word_share=0.0)
    stored = (STORED, "How do I bake sourdough bread at home?", "Which books are worth reading?")
    for question in stored:
        await store(strict, scope(tenant), conversation(question), text=question)
    for cache in (strict, loose):  # each learns the vector size
        assert (await lookup(cache, scope(tenant), conversation(PARAPHRASE))).status == (
            pb.LOOKUP_STATUS_SEMANTIC_HIT
        )
    # One word each with two stored questions ("learn", "home"), 1/5 of its
    # words in either: a miss at once, where any one shared word embeds it.
    guitar = "What is the best way to learn to play the guitar at home?"
    embedder.calls.clear()
    assert (await lookup(strict, scope(tenant), conversation(guitar))).status == pb.LOOKUP_STATUS_MISS
    assert embedder.calls == []
    assert (await lookup(loose, scope(tenant), conversation(guitar))).status == pb.LOOKUP_STATUS_MISS
    assert embedder.calls == [guitar]
    # A paraphrase sharing 1/3 of its words, of a pair the verifier serves
    # at the default bound (bench/README.md): looked up by meaning.
    books = "What are good books to read?"
    embedder.table[books] = (await embedder.embed_or_none(stored[2])).vector
    embedder.calls.clear()
    found = await lookup(strict, scope(tenant), conversation(books))
    assert found.status == pb.LOOKUP_STATUS_SEMANTIC_HIT and found.answer.text == stored[2]
    assert embedder.calls == [books]


async def test_without_embeddings_the_cache_is_exact_only(cache, embedder, tenant):
    embedder.available = False
    await store(cache, scope(tenant), conversation(STORED))
    assert (await lookup(cache, scope(tenant), conversation(STORED))).status == pb.LOOKUP_STATUS_EXACT_HIT
    assert (await lookup(cache, scope(tenant), conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS


async def test_redis_down_is_unavailable(embedder):
    client = redis_access.connect(f"redis://127.0.0.1:{free_port()}/0")
    cache = make_servicer(client, embedder)
    try:
        for call in (
            lambda: lookup(cache, scope("t"), conversation(STORED)),
            lambda: store(cache, scope("t"), conversation(STORED)),
            lambda: cache.Invalidate(pb.InvalidateRequest(tenant_id="t"), None),
            lambda: cache.GetStats(pb.GetStatsRequest(), None),
        ):
            with pytest.raises(MeshgateError) as failure:
                await call()
            assert failure.value.code == grpc.StatusCode.UNAVAILABLE
            assert failure.value.reason == "REDIS_UNAVAILABLE"
    finally:
        await client.aclose()


# One message past the bound, all but the question empty: the cheapest to send.
_TOO_MANY = [common_pb2.Message(role=ASSISTANT)] * servicer_module.MAX_PROMPT_MESSAGES + conversation("q")


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (pb.LookupRequest(scope=pb.CacheScope(model="m"), messages=conversation("q")), "TENANT_REQUIRED"),
        (pb.LookupRequest(scope=pb.CacheScope(tenant_id="t"), messages=conversation("q")), "MISSING_MODEL"),
        (pb.LookupRequest(scope=pb.CacheScope(tenant_id="t", model="m")), "EMPTY_MESSAGES"),
        (
            pb.StoreRequest(scope=pb.CacheScope(tenant_id="t", model="m"), messages=conversation("q")),
            "MISSING_ANSWER",
        ),
        (
            pb.StoreRequest(
                scope=pb.CacheScope(tenant_id="t", model="m"),
                messages=conversation("q"),
                answer=pb.CachedAnswer(text="a"),
                ttl_seconds=-1,
            ),
            "INVALID_TTL",
        ),
        # Past cache.ttl_s (a day by default): the entry and its sub-partition would outlive the bound.
        (
            pb.StoreRequest(
                scope=pb.CacheScope(tenant_id="t", model="m"),
                messages=conversation("q"),
                answer=pb.CachedAnswer(text="a"),
                ttl_seconds=2**31 - 1,
            ),
            "INVALID_TTL",
        ),
        (pb.InvalidateRequest(model="m"), "TENANT_REQUIRED"),
        # More text than the cache reads on its event loop (a review: 120
        # messages of 256 KiB held it 5-6.6 s a Lookup).
        (
            pb.LookupRequest(scope=scope("t"), messages=conversation("x" * (1 << 19), "y", "q")),
            "PROMPT_TOO_LARGE",
        ),
        # A review's: each was stored and served, under a scope no valid
        # request makes, with usage records of negative tokens saved, or
        # dropped as if an Invalidate had come since its lookup.
        (
            pb.LookupRequest(scope=scope("t", max_tokens=0), messages=conversation("q")),
            "INVALID_MAX_TOKENS",
        ),
        (
            pb.StoreRequest(
                scope=scope("t", max_tokens=-1), messages=conversation("q"), answer=pb.CachedAnswer(text="a")
            ),
            "INVALID_MAX_TOKENS",
        ),
        (
            pb.StoreRequest(
                scope=scope("t"),
                messages=conversation("q"),
                answer=pb.CachedAnswer(
                    text="a", usage=common_pb2.Usage(prompt_tokens=-5, completion_tokens=7)
                ),
            ),
            "INVALID_USAGE",
        ),
        (
            pb.StoreRequest(
                scope=scope("t"),
                messages=conversation("q"),
                answer=pb.CachedAnswer(text="a"),
                store_fence="x*{}",
            ),
            "INVALID_STORE_FENCE",
        ),
        # A scope of megabytes would be kept by count-bounded memos: refused.
        (
            pb.LookupRequest(scope=pb.CacheScope(tenant_id="t" * 513, model="m"), messages=conversation("q")),
            "SCOPE_TOO_LARGE",
        ),
        (
            pb.LookupRequest(scope=pb.CacheScope(tenant_id="t", model="m" * 513), messages=conversation("q")),
            "SCOPE_TOO_LARGE",
        ),
        (
            pb.StoreRequest(
                scope=pb.CacheScope(
                    tenant_id="t", model="m", parameters=common_pb2.GenerationParameters(stop=["x" * 9000])
                ),
                messages=conversation("q"),
                answer=pb.CachedAnswer(text="a"),
            ),
            "SCOPE_TOO_LARGE",
        ),
        # A bug hunt: the route went unchecked, and each distinct one stayed in keys.partition's memo.
        (
            pb.LookupRequest(
                scope=pb.CacheScope(
                    tenant_id="t", model="m", route="r" * (servicer_module.MAX_SCOPE_ROUTE_CHARS + 1)
                ),
                messages=conversation("q"),
            ),
            "SCOPE_TOO_LARGE",
        ),
        (pb.InvalidateRequest(tenant_id="t" * 513), "SCOPE_TOO_LARGE"),
        # A bug hunt: messages went unbounded, each hashed and read on the
        # event loop, and 2 MB of empty ones held a neighbour's Lookup 11.5 s.
        (
            pb.LookupRequest(scope=pb.CacheScope(tenant_id="t", model="m"), messages=_TOO_MANY),
            "TOO_MANY_MESSAGES",
        ),
        (
            pb.StoreRequest(
                scope=pb.CacheScope(tenant_id="t", model="m"),
                messages=_TOO_MANY,
                answer=pb.CachedAnswer(text="a"),
            ),
            "TOO_MANY_MESSAGES",
        ),
        (
            pb.ReportWrongHitRequest(
                scope=pb.CacheScope(tenant_id="t", model="m"), messages=_TOO_MANY, entry_id="0" * 32
            ),
            "TOO_MANY_MESSAGES",
        ),
        # A review: refused by the router and the inference service, these
        # were stored here, and looked up, under keys no valid request makes.
        (
            pb.StoreRequest(
                scope=pb.CacheScope(tenant_id="t", model="m"),
                messages=[common_pb2.Message(role=8, content="q")],
                answer=pb.CachedAnswer(text="a"),
            ),
            "INVALID_ROLE",
        ),
        (
            pb.LookupRequest(
                scope=pb.CacheScope(tenant_id="t", model="m"),
                messages=[common_pb2.Message(content="q")],  # ROLE_UNSPECIFIED
            ),
            "INVALID_ROLE",
        ),
        (
            pb.ReportWrongHitRequest(
                scope=pb.CacheScope(tenant_id="t", model="m"),
                messages=[common_pb2.Message(role=-1, content="q")],
                entry_id="0" * 32,
            ),
            "INVALID_ROLE",
        ),
        (
            pb.StoreRequest(
                scope=pb.CacheScope(
                    tenant_id="t",
                    model="m",
                    parameters=common_pb2.GenerationParameters(temperature=math.nan),
                ),
                messages=conversation("q"),
                answer=pb.CachedAnswer(text="a"),
            ),
            "INVALID_TEMPERATURE",
        ),
        (
            pb.LookupRequest(
                scope=pb.CacheScope(
                    tenant_id="t", model="m", parameters=common_pb2.GenerationParameters(top_p=math.nan)
                ),
                messages=conversation("q"),
            ),
            "INVALID_TOP_P",
        ),
        (
            pb.StoreRequest(
                scope=pb.CacheScope(
                    tenant_id="t", model="m", parameters=common_pb2.GenerationParameters(stop=["x"] * 9)
                ),
                messages=conversation("q"),
                answer=pb.CachedAnswer(text="a"),
            ),
            "INVALID_STOP",
        ),
    ],
)
async def test_invalid_requests(cache, request_, reason):
    method = {
        pb.LookupRequest: cache.Lookup,
        pb.StoreRequest: cache.Store,
        pb.InvalidateRequest: cache.Invalidate,
        pb.ReportWrongHitRequest: cache.ReportWrongHit,
    }[type(request_)]
    with pytest.raises(MeshgateError) as failure:
        await method(request_, None)
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.reason == reason


async def test_an_answer_no_lookup_could_return_is_not_stored(cache, tenant):
    """A hunt's finding: a Store just under the mesh's 32 MiB message bound
    was taken, and every Lookup of its prompt then failed RESOURCE_EXHAUSTED
    in grpc's words, without ErrorInfo, for the entry's TTL (the reply
    carries the answer and more)."""
    text = "a" * servicer_module.MAX_ANSWER_BYTES
    request = pb.StoreRequest(
        scope=scope(tenant), messages=conversation(STORED), answer=pb.CachedAnswer(text=text)
    )
    assert request.answer.ByteSize() > servicer_module.MAX_ANSWER_BYTES
    with pytest.raises(MeshgateError) as failure:
        await cache.Store(request, None)
    assert failure.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert failure.value.reason == "RESPONSE_TOO_LARGE"
    assert (await lookup(cache, scope(tenant), conversation(STORED))).status == pb.LOOKUP_STATUS_MISS
    # At the bound, stored and returned.
    request.answer.text = "a" * (servicer_module.MAX_ANSWER_BYTES - 5)
    assert request.answer.ByteSize() <= servicer_module.MAX_ANSWER_BYTES
    await cache.Store(request, None)
    found = await lookup(cache, scope(tenant), conversation(STORED))
    assert found.status == pb.LOOKUP_STATUS_EXACT_HIT and found.ByteSize() < serving.MAX_MESSAGE_BYTES


async def test_invalidate_a_model_then_the_tenant(cache, tenant):
    bystander = f"{tenant}-bystander"
    for model in ("a", "b"):
        await store(cache, scope(tenant, model), conversation(STORED))
        await store(cache, scope(tenant, model), conversation("Who wrote Hamlet?"))
    await store(cache, scope(bystander, "a"), conversation(STORED))

    removed = await cache.Invalidate(pb.InvalidateRequest(tenant_id=tenant, model="a"), None)
    assert removed.entries_removed == 2
    assert (await lookup(cache, scope(tenant, "a"), conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS
    assert (
        await lookup(cache, scope(tenant, "b"), conversation(STORED))
    ).status == pb.LOOKUP_STATUS_EXACT_HIT

    removed = await cache.Invalidate(pb.InvalidateRequest(tenant_id=tenant), None)
    assert removed.entries_removed == 2
    assert (await lookup(cache, scope(tenant, "b"), conversation(STORED))).status == pb.LOOKUP_STATUS_MISS
    assert (
        await lookup(cache, scope(bystander, "a"), conversation(STORED))
    ).status == pb.LOOKUP_STATUS_EXACT_HIT


async def test_an_invalidate_failing_midway_still_announces_it(redis_url, redis_client, embedder, tenant):
    """Redis fails partway through an Invalidate's deletion (the connection
    of an UNLINK Redis ran drops before its reply): the call fails, but
    the entries are gone, and the routers' copies of them (hot_exact.py)
    must go too. The notice went out only after the whole SCAN, so they were
    served for up to router.hot_exact_max_age_s after their entries went."""
    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    proxied = redis_access.connect(f"redis://127.0.0.1:{await proxy.start()}/0")
    try:
        cache = make_servicer(proxied, embedder)
        await store(cache, scope(tenant), conversation(STORED))
        async with redis_client.pubsub() as notices:
            await notices.subscribe(store_module.cache_notices.CHANNEL)
            assert (await notices.get_message(timeout=5.0))["type"] == "subscribe"
            # The UNLINK of the entries' answers.
            proxy.hold_when_sent(b":x:")
            invalidating = asyncio.ensure_future(
                cache.Invalidate(pb.InvalidateRequest(tenant_id=tenant), None)
            )
            deadline = time.monotonic() + 5
            while not proxy.drop_held():
                assert time.monotonic() < deadline and not invalidating.done()
                await asyncio.sleep(0.01)
            with pytest.raises(MeshgateError) as raised:
                await invalidating
            assert raised.value.code == grpc.StatusCode.UNAVAILABLE
            heard = []
            while (message := await notices.get_message(timeout=0.5)) is not None:
                heard.append(message["data"])
        assert store_module.cache_notices.scope_notice(tenant, "") in heard
        assert (await lookup(cache, scope(tenant), conversation(STORED))).status == pb.LOOKUP_STATUS_MISS
    finally:
        await proxied.aclose()
        await proxy.close()


async def _tenant_keys(redis_client, tenant: str, marker: str = "") -> list[bytes]:
    return [
        key
        async for key in redis_client.scan_iter(match=f"{keys.tenant_prefix(tenant)}*")
        if marker.encode() in key
    ]


@pytest.mark.parametrize("max_bytes_per_tenant", [0, 1 << 20], ids=["no quota", "quota"])
async def test_a_key_of_another_type_stops_no_invalidate(
    redis_client, embedder, tenant, max_bytes_per_tenant
):
    """A key of the tenant's holding another type (an operator's or another
    program's write, with no TTL): its partition's script failed WRONGTYPE,
    and with it the Invalidate, after other partitions' answers were
    deleted; every retry failed the same way and the tenant's other entries
    stayed served (a review: 28 of 29). The Invalidate deletes the key and
    finishes; a vectors hash of another type is deleted too (walked for its
    rows' charges where a quota is kept)."""
    cache = make_servicer(redis_client, embedder, max_bytes_per_tenant=max_bytes_per_tenant)
    scopes = [scope(tenant, max_tokens=n) for n in range(1, 7)]
    for s in scopes:
        await store(cache, s, conversation(STORED))
    broken = keys.partition(scopes[2])
    entry_key = broken.exact_key(keys.entry_id(broken, conversation(STORED)))
    await redis_client.delete(entry_key)
    await redis_client.hset(entry_key, "x", "y")
    vectors_key = (await _tenant_keys(redis_client, tenant, keys.partition(scopes[4]).key_prefix + "v:"))[0]
    await redis_client.delete(vectors_key)
    await redis_client.set(vectors_key, "not a hash")

    removed = await cache.Invalidate(pb.InvalidateRequest(tenant_id=tenant), None)

    assert removed.entries_removed == len(scopes) - 1
    assert await _tenant_keys(redis_client, tenant) == []
    for s in scopes:
        assert (await lookup(cache, s, conversation(STORED))).status == pb.LOOKUP_STATUS_MISS


async def test_an_entry_key_of_another_type_is_a_miss_that_a_store_replaces(redis_client, embedder, tenant):
    """Every Lookup of the prompt answered INTERNAL, and its Store could
    not replace the key (its script read the old value's length first) (a
    review)."""
    cache = make_servicer(redis_client, embedder)
    s = scope(tenant)
    entry_id = await store(cache, s, conversation(STORED), text="old")
    partition = keys.partition(s)
    await redis_client.delete(partition.exact_key(entry_id))
    await redis_client.hset(partition.exact_key(entry_id), "x", "y")

    assert (await lookup(cache, s, conversation(STORED), semantic=False)).status == pb.LOOKUP_STATUS_MISS
    # The paraphrase finds the entry's row, whose answer is no answer.
    assert (await lookup(cache, s, conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS
    await store(cache, s, conversation(STORED), text="new")
    hit = await lookup(cache, s, conversation(STORED))
    assert hit.status == pb.LOOKUP_STATUS_EXACT_HIT and hit.answer.text == "new"
    # An exact-only Store (no user question last) replaces one too.
    exact_only = conversation(STORED, "an answer", "thanks") + [
        common_pb2.Message(role=ASSISTANT, content="welcome")
    ]
    exact_key = partition.exact_key(keys.entry_id(partition, exact_only))
    await redis_client.sadd(exact_key, "x")
    await cache.Store(pb.StoreRequest(scope=s, messages=exact_only, answer=pb.CachedAnswer(text="x")), None)
    assert await redis_client.type(exact_key) == b"string"


def _refused_for(raised: pytest.ExceptionInfo[MeshgateError], key_kind: str) -> bool:
    error = raised.value
    return (
        error.code == grpc.StatusCode.FAILED_PRECONDITION
        and error.reason == Reason.CACHE_KEY_WRONG_TYPE
        and error.metadata["key_kind"] == key_kind
    )


async def test_keys_of_another_type_fail_only_their_own_calls_and_are_replaced(
    redis_client, embedder, tenant
):
    """A sub-partition's vectors hash held as a string failed its semantic
    Lookups and Stores, the tenant's invalidation marks held as a string
    every missed Lookup and every Invalidate of the tenant, a quota count
    held as a hash every Store of the tenant, each INTERNAL (a review). Now
    a write replaces such a key (a Store the vectors hash and the count, an
    Invalidate the marks); a call that cannot go on without it is refused
    FAILED_PRECONDITION naming the key; other tenants are never touched."""
    cache = make_servicer(redis_client, embedder, max_bytes_per_tenant=1 << 20)
    s, bystander = scope(tenant), scope(f"{tenant}-bystander")
    for t in (s, bystander):
        await store(cache, t, conversation(STORED))

    vectors_key = (await _tenant_keys(redis_client, tenant, "}:v:"))[0]
    await redis_client.delete(vectors_key)
    await redis_client.set(vectors_key, "not a hash")
    fresh = make_servicer(redis_client, embedder, max_bytes_per_tenant=1 << 20)  # no index resident
    with pytest.raises(MeshgateError) as raised:
        await lookup(fresh, s, conversation(PARAPHRASE))
    assert _refused_for(raised, "sub-partition's vectors hash")
    assert (await lookup(fresh, bystander, conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    await store(fresh, s, conversation(STORED))
    assert (await lookup(fresh, s, conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_SEMANTIC_HIT

    marks_key = keys.invalidated_key(tenant)
    await redis_client.set(marks_key, "not a hash")
    with pytest.raises(MeshgateError) as raised:
        await lookup(cache, s, conversation("Who wrote Hamlet?"), semantic=False)
    assert _refused_for(raised, "invalidation marks")
    assert (await lookup(cache, bystander, conversation("Who wrote Hamlet?"))).status == pb.LOOKUP_STATUS_MISS
    await cache.Invalidate(pb.InvalidateRequest(tenant_id=tenant), None)
    assert await redis_client.type(marks_key) == b"hash"
    fence = (await lookup(cache, s, conversation("Who wrote Hamlet?"), semantic=False)).store_fence
    await fenced_store(cache, s, conversation("Who wrote Hamlet?"), "Shakespeare", fence)
    assert (await lookup(cache, s, conversation("Who wrote Hamlet?"))).answer.text == "Shakespeare"

    windows = keys.stored_bytes_key(tenant, 0, 0).split("}:", 1)[0] + "}:*"
    counts = [key async for key in redis_client.scan_iter(match=windows)]
    assert counts
    for key in counts:
        await redis_client.delete(key)
        await redis_client.hset(key, "x", "1")
    await store(cache, s, conversation("Yet another question about dogs?"))
    assert (
        await lookup(cache, s, conversation("Yet another question about dogs?"))
    ).status == pb.LOOKUP_STATUS_EXACT_HIT


async def fenced_store(cache, s, messages, text: str, store_fence: str) -> pb.StoreResponse:
    return await cache.Store(
        pb.StoreRequest(
            scope=s, messages=messages, answer=pb.CachedAnswer(text=text), store_fence=store_fence
        ),
        None,
    )


async def exact_miss_fence(cache, s, messages) -> str:
    """The store_fence of an exact-only lookup's miss, as the router's turn reads it before generating."""
    missed = await cache.Lookup(
        pb.LookupRequest(scope=s, messages=messages, semantic=False, semantic_follows=True), None
    )
    assert missed.status == pb.LOOKUP_STATUS_MISS and missed.store_fence
    return missed.store_fence


def invalidating_before_the_write(cache, semantic: bool, invalidate, after_write=None):
    """Makes the next Store's write (exact, or semantic with its row) land
    after ``invalidate`` has marked and scanned: past the Store's first look
    at the marks, so only its look after the write can undo it. Then
    ``after_write``, before that look."""
    name = "put_semantic" if semantic else "put_exact"
    put = getattr(cache._store, name)

    async def write(*args):
        setattr(cache._store, name, put)
        await invalidate()
        written = await put(*args)
        if after_write is not None:
            await after_write()
        return written

    setattr(cache._store, name, write)


@pytest.mark.parametrize(
    "semantic", [True, False], ids=["with its question's vector", "exact only (no embedding)"]
)
@pytest.mark.parametrize("when", ["before the store", "while it writes"])
async def test_an_answer_generated_across_an_invalidate_is_not_kept(
    redis_client, embedder, tenant, semantic, when
):
    """A turn misses, generates, and stores its answer: an Invalidate of its
    tenant or model between the miss and the Store kept that answer from
    before it, served as an exact hit (and by meaning) right after; now the
    Store passes its lookup's fence and writes nothing (the Invalidate came
    before it), or is undone, row included (the Invalidate's SCAN passed
    before the write landed). Either way the tenant is left charged nothing
    for it: an undone Store kept its charge (1,846 bytes with its row,
    1,549 without), for two windows of cache.ttl_s."""
    cache = make_servicer(redis_client, embedder, max_bytes_per_tenant=1 << 20)
    embedder.available = semantic
    s = scope(tenant)
    for invalidated in (tenant, ""), (tenant, "tiny-gpt"):
        fence = await exact_miss_fence(cache, s, conversation(STORED))
        request = pb.InvalidateRequest(tenant_id=invalidated[0], model=invalidated[1])
        if when == "before the store":
            await cache.Invalidate(request, None)
        else:
            invalidating_before_the_write(
                cache, semantic, lambda request=request: cache.Invalidate(request, None)
            )
        stored = await fenced_store(cache, s, conversation(STORED), "from before", fence)
        assert stored.invalidated_since_lookup
        assert await charged_bytes(redis_client, tenant) == 0
        assert (await lookup(cache, s, conversation(STORED))).status == pb.LOOKUP_STATUS_MISS
        embedder.available = True
        assert (await lookup(cache, s, conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS
        embedder.available = semantic

    # Another model's Invalidate, or another tenant's, leaves the fence standing.
    fence = await exact_miss_fence(cache, s, conversation(STORED))
    await cache.Invalidate(pb.InvalidateRequest(tenant_id=tenant, model="another-model"), None)
    await cache.Invalidate(pb.InvalidateRequest(tenant_id=f"{tenant}-other"), None)
    stored = await fenced_store(cache, s, conversation(STORED), "generated after", fence)
    assert not stored.invalidated_since_lookup
    hit = await lookup(cache, s, conversation(STORED))
    assert (hit.status, hit.answer.text) == (pb.LOOKUP_STATUS_EXACT_HIT, "generated after")
    assert await charged_bytes(redis_client, tenant) > 0
    if semantic:
        assert (await lookup(cache, s, conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_SEMANTIC_HIT


async def test_a_fence_only_lookup_reads_no_entry_counts_nothing_and_fences_the_store(
    cache, embedder, tenant
):
    """A turn that stores without looking up (the router's
    CACHE_POLICY_REFRESH) reads the fence alone before it generates: an
    Invalidate after it keeps the answer out, as after an exact miss."""
    s = scope(tenant)
    await store(cache, s, conversation(STORED), text="the old answer")
    before = await cache.GetStats(pb.GetStatsRequest(), None)
    embeddings = len(embedder.calls)
    fenced = await cache.Lookup(pb.LookupRequest(scope=s, fence_only=True), None)
    assert fenced.status == pb.LOOKUP_STATUS_MISS and fenced.store_fence
    assert not fenced.HasField("answer") and not fenced.entry_id
    after = await cache.GetStats(pb.GetStatsRequest(), None)
    assert (after.exact_hits, after.semantic_hits, after.misses) == (
        before.exact_hits,
        before.semantic_hits,
        before.misses,
    )
    assert len(embedder.calls) == embeddings

    await cache.Invalidate(pb.InvalidateRequest(tenant_id=tenant), None)
    stored = await fenced_store(cache, s, conversation(STORED), "from before", fenced.store_fence)
    assert stored.invalidated_since_lookup
    assert (await lookup(cache, s, conversation(STORED))).status == pb.LOOKUP_STATUS_MISS

    fenced = await cache.Lookup(pb.LookupRequest(scope=s, fence_only=True), None)
    stored = await fenced_store(cache, s, conversation(STORED), "generated after", fenced.store_fence)
    assert not stored.invalidated_since_lookup
    hit = await lookup(cache, s, conversation(STORED))
    assert (hit.status, hit.answer.text) == (pb.LOOKUP_STATUS_EXACT_HIT, "generated after")


async def test_undoing_a_fenced_store_keeps_a_later_store_of_the_entry(redis_client, embedder, tenant):
    """The undo removes what its own Store wrote, not an answer (and row)
    stored since by a turn whose lookup came after the Invalidate, nor gives
    back what that one was charged; and it is announced, for the routers'
    copies fetched in between."""
    cache = make_servicer(redis_client, embedder, max_bytes_per_tenant=1 << 20)
    s = scope(tenant)
    stale_fence = await exact_miss_fence(cache, s, conversation(STORED))
    fresh_fence = []

    async def an_invalidate_then_a_fresh_lookup():
        await cache.Invalidate(pb.InvalidateRequest(tenant_id=tenant), None)
        fresh_fence.append(await exact_miss_fence(cache, s, conversation(STORED)))

    async def a_fresh_store_lands():
        stored = await fenced_store(cache, s, conversation(STORED), "fresh", fresh_fence[0])
        assert not stored.invalidated_since_lookup

    invalidating_before_the_write(cache, True, an_invalidate_then_a_fresh_lookup, a_fresh_store_lands)
    entry_id = keys.entry_id(keys.partition(s), conversation(STORED))
    async with redis_client.pubsub() as notices:
        await notices.subscribe(store_module.cache_notices.CHANNEL)
        assert (await notices.get_message(timeout=5.0))["type"] == "subscribe"
        stored = await fenced_store(cache, s, conversation(STORED), "stale", stale_fence)
        heard = []
        while (message := await notices.get_message(timeout=0.5)) is not None:
            heard.append(message["data"])
    assert stored.invalidated_since_lookup
    # The stale Store's notice, the fresh one's, then the undo's.
    assert heard.count(store_module.cache_notices.entry_notice(entry_id)) == 3
    hit = await lookup(cache, s, conversation(STORED))
    assert (hit.status, hit.answer.text) == (pb.LOOKUP_STATUS_EXACT_HIT, "fresh")
    assert (await lookup(cache, s, conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    fresh = pb.CachedAnswer(text="fresh").SerializeToString()
    one_entry = len(fresh) + store_module.ENTRY_OVERHEAD_BYTES + DIMS * 4 + len(STORED)
    assert await charged_bytes(redis_client, tenant) == one_entry


@pytest.mark.parametrize("cancelled", ["while it writes", "while it undoes"])
async def test_a_store_cancelled_after_the_invalidate_still_undoes(cache, embedder, tenant, cancelled):
    """The router's deadline or its caller's hang-up cancels a Store: one
    cancelled once its write went out, or while it undoes it, must not leave
    the answer from before an Invalidate for the entry's whole TTL."""
    embedder.available = False
    s = scope(tenant)
    fence = await exact_miss_fence(cache, s, conversation(STORED))
    in_flight = asyncio.Event()

    async def invalidate_then_hold_the_write():
        await cache.Invalidate(pb.InvalidateRequest(tenant_id=tenant), None)
        if cancelled == "while it writes":
            in_flight.set()
            await asyncio.sleep(0.3)

    invalidating_before_the_write(cache, False, invalidate_then_hold_the_write)
    undo_store = cache._store.undo_store
    undone = asyncio.Event()

    async def slow_undo(*args):
        in_flight.set()
        await asyncio.sleep(0.3)
        await undo_store(*args)
        undone.set()

    cache._store.undo_store = slow_undo
    storing = asyncio.ensure_future(fenced_store(cache, s, conversation(STORED), "from before", fence))
    await asyncio.wait_for(in_flight.wait(), 10)
    storing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await storing
    await asyncio.wait_for(undone.wait(), 10)
    assert (await lookup(cache, s, conversation(STORED), semantic=False)).status == pb.LOOKUP_STATUS_MISS


async def test_racing_stores_and_lookups_keep_the_index_consistent(redis_client, embedder, tenant):
    cache = make_servicer(redis_client, embedder, max_entries=20)
    questions = [f"Question number {i}?" for i in range(60)]
    await asyncio.gather(
        *(store(cache, scope(tenant), conversation(q), text=q) for q in questions),
        *(lookup(cache, scope(tenant), conversation(q)) for q in reversed(questions)),
    )
    hits = 0
    for question in questions:
        response = await lookup(cache, scope(tenant), conversation(question))
        if response.status != pb.LOOKUP_STATUS_MISS:
            hits += 1
            # Whatever matched is the entry of that very question.
            assert response.answer.text == question
    assert hits == 20


async def test_stats_count_hits_misses_and_stores(cache, tenant):
    before = await cache.GetStats(pb.GetStatsRequest(), None)
    await store(cache, scope(tenant), conversation(STORED))
    await lookup(cache, scope(tenant), conversation(STORED))
    await lookup(cache, scope(tenant), conversation(PARAPHRASE))
    await lookup(cache, scope(tenant), conversation("Who wrote Hamlet?"))
    after = await cache.GetStats(pb.GetStatsRequest(), None)
    assert after.stores - before.stores == 1
    assert after.exact_hits - before.exact_hits == 1
    assert after.semantic_hits - before.semantic_hits == 1
    assert after.misses - before.misses == 1
    assert after.entries >= 1
    assert after.semantic_threshold == pytest.approx(0.9)


async def test_counts_whose_flush_reply_was_lost_are_added_once(tmp_path, embedder, tenant):
    """A flush that reached Redis but whose reply did not come back (a
    timeout behind a stalled connection) is sent again as the same batch:
    its counts went back into the pending ones and were added twice (10
    hits read 20). A Redis of its own: other tests add to the totals."""
    with own_redis_server(tmp_path) as url:
        proxy = TcpProxy(int(url.rsplit(":", 1)[1].split("/")[0]))
        proxied = redis_access.connect(f"redis://127.0.0.1:{await proxy.start()}/0", timeout_s=0.5)
        try:
            cache = make_servicer(proxied, embedder)
            await store(cache, scope(tenant), conversation(STORED))
            for _ in range(10):
                assert (
                    await lookup(cache, scope(tenant), conversation(STORED))
                ).status == pb.LOOKUP_STATUS_EXACT_HIT
            proxy.hold()  # Redis gets the flush; its reply is held back
            with pytest.raises(MeshgateError) as failure:
                await cache.GetStats(pb.GetStatsRequest(), None)
            assert failure.value.code == grpc.StatusCode.UNAVAILABLE
            proxy.release()
            stats = await cache.GetStats(pb.GetStatsRequest(), None)
            assert (stats.exact_hits, stats.stores) == (10, 1)
        finally:
            await proxied.aclose()
            await proxy.close()


async def test_counts_flushed_while_the_totals_hold_another_type_are_kept_and_named(
    tmp_path, embedder, tenant
):
    """While the totals' key holds another type (an operator's or another
    program's write), GetStats answered INTERNAL for everyone, and each
    batch flushed meanwhile was marked added before its HINCRBY failed, so
    its resend added nothing: of 13 stores, 12 were lost (a review). Now
    GetStats names the key (FAILED_PRECONDITION), and every count is added
    once the key is deleted. A Redis of its own: other tests add to the
    totals."""
    with own_redis_server(tmp_path) as url:
        client = redis_access.connect(url)
        try:
            cache = make_servicer(client, embedder)
            stats = cache._stats
            await client.set(keys.STATS_KEY, "not a hash")
            stats.pending["stores"] += 5
            with pytest.raises(redis.ResponseError):
                await stats.flush()  # the periodic flush, failing
            stats.pending["stores"] += 7
            with pytest.raises(MeshgateError) as refused:
                await cache.GetStats(pb.GetStatsRequest(), None)
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert refused.value.reason == Reason.CACHE_KEY_WRONG_TYPE
            assert refused.value.metadata["key"] == keys.STATS_KEY
            await client.delete(keys.STATS_KEY)  # the operator's repair
            stats.pending["stores"] += 1
            assert (await cache.GetStats(pb.GetStatsRequest(), None)).stores == 13
        finally:
            await client.aclose()


async def test_a_resent_report_counts_once_in_the_stats(tmp_path, embedder, tenant):
    """A report sent again after a lost reply is the same wrong hit:
    GetStats counted it twice while reports_in_partition said 1. A Redis
    of its own: other tests add to the totals."""
    with own_redis_server(tmp_path) as url:
        client = redis_access.connect(url)
        try:
            cache = make_servicer(client, embedder)
            entry_id = await store(cache, scope(tenant), conversation(STORED))
            assert (await lookup(cache, scope(tenant), conversation(PARAPHRASE))).entry_id == entry_id
            report = pb.ReportWrongHitRequest(
                scope=scope(tenant), messages=conversation(PARAPHRASE), entry_id=entry_id
            )
            replies = [await cache.ReportWrongHit(report, None) for _ in range(2)]
            assert [r.reports_in_partition for r in replies] == [1, 1]
            assert (await cache.GetStats(pb.GetStatsRequest(), None)).wrong_hit_reports == 1
        finally:
            await client.aclose()


async def test_verifier_sees_the_stored_question_and_a_reported_wrong_hit_is_gone(cache, tenant):
    entry_id = await store(cache, scope(tenant), conversation(STORED), text="Practice daily.")
    hit = await lookup(cache, scope(tenant), conversation(PARAPHRASE))
    assert hit.status == pb.LOOKUP_STATUS_SEMANTIC_HIT and hit.entry_id == entry_id
    assert cache._verifier.seen[-1] == (PARAPHRASE, STORED, 0)

    report = await cache.ReportWrongHit(
        pb.ReportWrongHitRequest(scope=scope(tenant), messages=conversation(PARAPHRASE), entry_id=entry_id),
        None,
    )
    assert report.entry_removed and report.reports_in_partition == 1
    assert (await lookup(cache, scope(tenant), conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS
    assert (await lookup(cache, scope(tenant), conversation(STORED))).status == pb.LOOKUP_STATUS_MISS
    again = await cache.ReportWrongHit(
        pb.ReportWrongHitRequest(scope=scope(tenant), messages=conversation(PARAPHRASE), entry_id=entry_id),
        None,
    )
    # The same pair again (a client resending after a lost reply): nothing
    # more is kept, and the sub-partition gets no stricter.
    assert not again.entry_removed and again.reports_in_partition == 1


async def test_a_report_makes_the_sub_partition_stricter_for_new_entries(cache, tenant):
    first = await store(cache, scope(tenant), conversation(STORED))
    await cache.ReportWrongHit(
        pb.ReportWrongHitRequest(scope=scope(tenant), messages=conversation(PARAPHRASE), entry_id=first),
        None,
    )
    await store(cache, scope(tenant), conversation(STORED))
    assert (await lookup(cache, scope(tenant), conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS
    assert cache._verifier.seen[-1] == (PARAPHRASE, STORED, 1)
    # Another tenant's sub-partition is not affected.
    other = f"{tenant}-other"
    await store(cache, scope(other), conversation(STORED))
    other_hit = await lookup(cache, scope(other), conversation(PARAPHRASE))
    assert other_hit.status == pb.LOOKUP_STATUS_SEMANTIC_HIT


async def test_report_wrong_hit_rejects_a_malformed_entry_id(cache, tenant):
    with pytest.raises(MeshgateError) as raised:
        await cache.ReportWrongHit(
            pb.ReportWrongHitRequest(scope=scope(tenant), messages=conversation(STORED), entry_id="mg:*"),
            None,
        )
    assert raised.value.reason == "INVALID_ENTRY_ID"


def two_entries_bytes(other: str) -> int:
    """What the Stores of "Practice daily." under STORED and ``other``
    count against cache.max_bytes_per_tenant."""
    answer = pb.CachedAnswer(text="Practice daily.").SerializeToString()
    return sum(
        len(answer) + store_module.ENTRY_OVERHEAD_BYTES + DIMS * 4 + len(question)
        for question in (STORED, other)
    )


async def test_a_report_of_no_entry_of_the_scope_is_refused_and_keeps_nothing(redis_client, cache, tenant):
    """A bug hunt: a report of any well-formed id was kept (its pair, and a
    count), so made-up ids grew the sub-partition's set of reported pairs by
    one each, for as long as the sub-partition lived: against a real cache
    service and Redis, 8,000 reports of random ids left 8,000 members (and
    a count of 8,000 reports) where no entry had ever been served."""
    s, asked = scope(tenant), conversation(PARAPHRASE)
    stored = await store(cache, s, conversation(STORED))
    elsewhere = await store(cache, scope(f"{tenant}-other"), conversation(STORED))
    for entry_id in ("0123456789abcdef" * 2, elsewhere):
        with pytest.raises(MeshgateError) as raised:
            await cache.ReportWrongHit(
                pb.ReportWrongHitRequest(scope=s, messages=asked, entry_id=entry_id), None
            )
        assert (raised.value.code, raised.value.reason) == (
            grpc.StatusCode.NOT_FOUND,
            "CACHE_ENTRY_NOT_FOUND",
        )
        assert raised.value.metadata == {"entry_id": entry_id}
    partition = keys.partition(s)
    context_id = cache._context_id(partition, asked, EMBEDDER)
    assert not await redis_client.exists(
        partition.reported_key(context_id), partition.strictness_key(context_id)
    )
    hit = await lookup(cache, s, asked)
    assert (hit.status, hit.entry_id) == (pb.LOOKUP_STATUS_SEMANTIC_HIT, stored)


async def test_a_report_of_an_expired_answer_whose_row_is_kept_still_holds(cache, tenant):
    """An answer that expired between its hit and the report still has its
    row until a Store trims it (its sub-partition lives as long as its
    longest-lived entry): the report is the hit's, kept as before."""
    s, asked = scope(tenant), conversation(PARAPHRASE)
    await store(cache, s, conversation("Who wrote Hamlet?"))
    entry_id = await store(cache, s, conversation(STORED), ttl_seconds=1)
    await asyncio.sleep(1.1)
    report = await cache.ReportWrongHit(
        pb.ReportWrongHitRequest(scope=s, messages=asked, entry_id=entry_id), None
    )
    assert not report.entry_removed and report.reports_in_partition == 1


async def test_a_partitions_sequence_counter_expires_with_its_entries_and_numbers_keep_growing(
    redis_client, cache, embedder, tenant
):
    """The counter lived for good before: one key left in Redis per
    partition ever used, a caller's seed or max_tokens each making one. A
    resident index reads only numbers above the last it applied, so the
    numbers must keep growing after the counter went."""
    partition = keys.partition(scope(tenant))
    await store(cache, scope(tenant), conversation(STORED), text="first", ttl_seconds=1)
    assert (await lookup(cache, scope(tenant), conversation(PARAPHRASE))).answer.text == "first"
    assert 0 < await redis_client.pttl(partition.sequence_key) <= 1000
    for _ in range(100):
        if not await redis_client.exists(partition.sequence_key):
            break
        await asyncio.sleep(0.05)
    assert not await redis_client.exists(partition.sequence_key)
    # The same replica, its index of the sub-partition still resident.
    await store(cache, scope(tenant), conversation(STORED), text="second")
    response = await lookup(cache, scope(tenant), conversation(PARAPHRASE))
    assert response.status == pb.LOOKUP_STATUS_SEMANTIC_HIT and response.answer.text == "second"


async def test_a_store_trims_its_sub_partitions_expired_rows(redis_client, embedder, tenant):
    """A sub-partition in use lives as long as its newest entry: without a
    trim, rows of entries long expired stayed in Redis (and in every index
    load) until max entries pushed them out. A Store trims them before it
    evicts the oldest entry of a full sub-partition, and so does a replica's
    index: it evicted the oldest for another replica's Store, though Redis
    kept that one, and missed it for good (a fresh replica hit it)."""
    one, two = (make_servicer(redis_client, embedder, max_entries=3) for _ in range(2))
    s = scope(tenant)
    oldest = await store(one, s, conversation(STORED), ttl_seconds=60)
    expiring = await store(one, s, conversation("Who wrote Hamlet?"), ttl_seconds=1)
    moon = await store(one, s, conversation("How far is the Moon?"), ttl_seconds=60)
    # Replica one's index is full: the three entries.
    assert (await lookup(one, s, conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    await asyncio.sleep(1.1)  # Hamlet's entry has expired
    newest = await store(two, s, conversation("Who painted the Mona Lisa?"), ttl_seconds=60)
    partition = keys.partition(s)
    context_id = keys.context_id(partition, EMBEDDER)
    listed = {
        entry_id.decode() for entry_id in await redis_client.zrange(partition.order_key(context_id), 0, -1)
    }
    assert listed == {oldest, moon, newest} and expiring not in listed
    assert await redis_client.hlen(partition.vectors_key(context_id)) == 3
    # Replica one reads the newest entry into its full index.
    assert (await lookup(one, s, conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_SEMANTIC_HIT


class StrictnessBlindVerifier(AcceptingVerifier):
    """Accepts whatever the sub-partition's strictness: the real verifier's
    stricter threshold still passes a candidate that scores high enough (a
    reported pair hit again at bounds 0.01 to 0.1), which is what this
    test needs to see handled by something other than strictness."""

    def trained_on(self, embedder: str) -> bool:
        return True  # every revision's vectors: the servicer keeps them apart

    def decide(self, query, query_vector, candidate, candidate_vector, strictness=0) -> Decision:
        self.seen.append((query, candidate, strictness))
        return Decision(True, float(query_vector @ candidate_vector), None)


async def test_a_reported_pair_is_never_served_again_after_its_entry_is_stored_again(
    redis_client, embedder, tenant
):
    """The report deletes the entry, but the next answer to its own prompt
    is stored under the same id: the prompt reported must still not get it."""
    another = "How do I learn Python fast?"
    embedder.table[another] = _direction(0.96)
    cache = make_servicer(redis_client, embedder)
    cache._verifier = StrictnessBlindVerifier()
    entry_id = await store(cache, scope(tenant), conversation(STORED), text="Practice daily.")
    assert (await lookup(cache, scope(tenant), conversation(PARAPHRASE))).entry_id == entry_id
    await cache.ReportWrongHit(
        pb.ReportWrongHitRequest(scope=scope(tenant), messages=conversation(PARAPHRASE), entry_id=entry_id),
        None,
    )
    assert await store(cache, scope(tenant), conversation(STORED), text="Practice daily.") == entry_id
    for servicer in (cache, make_servicer(redis_client, embedder)):  # this replica, and one restarted
        servicer._verifier = StrictnessBlindVerifier()
        assert (
            await lookup(servicer, scope(tenant), conversation(PARAPHRASE))
        ).status == pb.LOOKUP_STATUS_MISS
        # The entry is its own prompt's answer still, and another's by meaning.
        assert (
            await lookup(servicer, scope(tenant), conversation(STORED))
        ).status == pb.LOOKUP_STATUS_EXACT_HIT
        other = await lookup(servicer, scope(tenant), conversation(another))
        assert other.status == pb.LOOKUP_STATUS_SEMANTIC_HIT and other.entry_id == entry_id


async def test_an_eviction_applied_after_a_later_store_of_the_same_entry_keeps_the_new_row(
    redis_client, embedder, tenant
):
    """Store C's script evicts A; Store A's, after it, stores A again. When
    this replica applies A's reply first and C's after, C's eviction must
    remove the version it evicted, not the row A's Store just put back: the
    replica then never found A by meaning again (a missed hit for as long
    as the index lived)."""
    cache = make_servicer(redis_client, embedder, max_entries=2)
    s = scope(tenant)
    first, second, third = (conversation(q) for q in ("Who wrote Hamlet?", "How far is the Moon?", STORED))
    entry_a = await store(cache, s, first)
    await store(cache, s, second)
    await lookup(cache, s, conversation(PARAPHRASE))  # this replica's index of them, loaded
    put_semantic = cache._store.put_semantic
    c_ran, a_stored = asyncio.Event(), asyncio.Event()

    async def reply_after_a(partition, context_id, entry_id, *args):
        reply = await put_semantic(partition, context_id, entry_id, *args)
        if entry_id != entry_a:  # C's Store: its script ran; its reply waits for A's
            c_ran.set()
            await a_stored.wait()
        return reply

    cache._store.put_semantic = reply_after_a
    storing_c = asyncio.ensure_future(store(cache, s, third))
    await c_ran.wait()
    await store(cache, s, first)
    a_stored.set()
    await storing_c
    partition = keys.partition(s)
    context_id = cache._context_id(partition, first, EMBEDDER)
    assert entry_a in cache._indexes.get(partition.vectors_key(context_id))


async def test_a_report_applied_after_a_later_store_of_the_same_entry_keeps_the_new_row(
    redis_client, embedder, tenant
):
    """As for evictions: the report's script ran first and a Store of the
    entry after it, but this replica applied the Store's reply first; the
    report's then removed the row the Store had put back."""
    cache = make_servicer(redis_client, embedder)
    s = scope(tenant)
    stored = conversation(STORED)
    entry_id = await store(cache, s, stored)
    await lookup(cache, s, conversation(PARAPHRASE))  # this replica's index, loaded
    report_wrong = cache._store.report_wrong
    report_ran, stored_again = asyncio.Event(), asyncio.Event()

    async def reply_after_the_store(*args, **kwargs):
        reply = await report_wrong(*args, **kwargs)
        report_ran.set()
        await stored_again.wait()
        return reply

    cache._store.report_wrong = reply_after_the_store
    request = pb.ReportWrongHitRequest(scope=s, messages=conversation(PARAPHRASE), entry_id=entry_id)
    reporting = asyncio.ensure_future(cache.ReportWrongHit(request, None))
    await report_ran.wait()
    await store(cache, s, stored)
    stored_again.set()
    assert (await reporting).entry_removed
    partition = keys.partition(s)
    context_id = cache._context_id(partition, stored, EMBEDDER)
    assert entry_id in cache._indexes.get(partition.vectors_key(context_id))


async def test_a_second_prompts_report_of_an_entry_a_first_report_deleted_still_holds(
    redis_client, embedder, tenant
):
    """Two prompts served the same wrong entry: the first's report deletes
    it, the second's must still be kept (its pair), as the entry's next
    answer is stored under the same id and would be served it again."""
    another = "How do I learn Python fast?"
    embedder.table[another] = _direction(0.96)
    cache = make_servicer(redis_client, embedder)
    cache._verifier = StrictnessBlindVerifier()
    s = scope(tenant)
    entry_id = await store(cache, s, conversation(STORED), text="Practice daily.")
    for asked in (PARAPHRASE, another):
        assert (await lookup(cache, s, conversation(asked))).entry_id == entry_id
    for asked in (PARAPHRASE, another):
        await cache.ReportWrongHit(
            pb.ReportWrongHitRequest(scope=s, messages=conversation(asked), entry_id=entry_id), None
        )
    assert await store(cache, s, conversation(STORED), text="Practice daily.") == entry_id
    assert (await lookup(cache, s, conversation(another))).status == pb.LOOKUP_STATUS_MISS


async def test_reports_of_an_entry_already_deleted_are_held_to_the_tenants_quota(
    redis_client, embedder, tenant
):
    """Once a report deleted an entry, any prompt's report of it is taken
    (another prompt it was served to must be kept from it too), deleting
    nothing: a bug hunt kept a pair and a count for each of 2,000 made-up
    prompts, a day's worth of Redis that no Store paid for. Such a report
    is charged to cache.max_bytes_per_tenant and refused past it; a report
    that deletes an entry is still taken there."""
    s = scope(tenant)
    other = "What is the capital of France?"
    stored_bytes = two_entries_bytes(other)
    pair = store_module.REPORTED_PAIR_BYTES
    # The Stores, the report of the entry served, and four pairs more.
    cache = make_servicer(redis_client, embedder, max_bytes_per_tenant=stored_bytes + 5 * pair + pair // 2)
    entry_id = await store(cache, s, conversation(STORED), text="Practice daily.")
    other_id = await store(cache, s, conversation(other), text="Practice daily.")
    assert (await lookup(cache, s, conversation(PARAPHRASE))).entry_id == entry_id
    await cache.ReportWrongHit(
        pb.ReportWrongHitRequest(scope=s, messages=conversation(PARAPHRASE), entry_id=entry_id), None
    )
    partition = keys.partition(s)
    context_id = cache._context_id(partition, conversation(PARAPHRASE), EMBEDDER)
    reported_key = partition.reported_key(context_id)
    pairs = await redis_client.scard(reported_key)
    with pytest.raises(MeshgateError) as refused:
        for n in range(50):
            made_up = conversation(f"Made-up question number {n}?")
            await cache.ReportWrongHit(
                pb.ReportWrongHitRequest(scope=s, messages=made_up, entry_id=entry_id), None
            )
    assert n == 4
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.reason == "CACHE_QUOTA_EXCEEDED"
    assert refused.value.metadata["limit"] == "max_bytes_per_tenant"
    assert await redis_client.scard(reported_key) == pairs + 4
    # A report that deletes an entry is taken without room.
    report = await cache.ReportWrongHit(
        pb.ReportWrongHitRequest(scope=s, messages=conversation(other), entry_id=other_id), None
    )
    assert report.entry_removed
    assert (await lookup(cache, s, conversation(other))).status == pb.LOOKUP_STATUS_MISS


async def charged_bytes(redis_client, tenant: str) -> int:
    """What the tenant's windows hold against cache.max_bytes_per_tenant
    (store.py, ``charge``), all windows and window lengths together."""
    windows = keys.stored_bytes_key(tenant, 0, 0).split("}:", 1)[0] + "}:*"
    return sum([int(await redis_client.get(key)) async for key in redis_client.scan_iter(match=windows)])


async def test_a_retried_report_is_charged_once_for_the_one_pair_it_keeps(redis_client, embedder, tenant):
    """A report is charged its pair (REPORTED_PAIR_BYTES) before it runs.
    A client that resends a report after its reply was lost (or any
    second report of the same prompt and entry) keeps no new pair: the
    reported set holds each pair once. Each resend was charged again, so
    a tenant retrying reports used its quota up on a pair Redis held once,
    and its Stores were refused."""
    s = scope(tenant)
    cache = make_servicer(redis_client, embedder, max_bytes_per_tenant=1 << 20)
    entry_id = await store(cache, s, conversation(STORED), text="Practice daily.")
    assert (await lookup(cache, s, conversation(PARAPHRASE))).entry_id == entry_id
    stored = await charged_bytes(redis_client, tenant)
    request = pb.ReportWrongHitRequest(scope=s, messages=conversation(PARAPHRASE), entry_id=entry_id)
    first = await cache.ReportWrongHit(request, None)
    assert first.entry_removed
    for _ in range(5):
        await cache.ReportWrongHit(request, None)
    partition = keys.partition(s)
    context_id = cache._context_id(partition, conversation(PARAPHRASE), EMBEDDER)
    # Held once: the pair, and the entry's bare id (a report deleted it).
    assert await redis_client.scard(partition.reported_key(context_id)) == 2
    assert await charged_bytes(redis_client, tenant) == stored + store_module.REPORTED_PAIR_BYTES


@pytest.mark.parametrize("question", [STORED, "x" * 2000], ids=["semantic", "exact"])
async def test_stores_of_one_entry_are_charged_as_the_one_entry_they_leave(
    redis_client, embedder, tenant, question
):
    """Identical turns answered at once by routers that each generated
    (and so each Store) under the same entry, and a refresh, store over
    one: each
    Store was charged to cache.max_bytes_per_tenant in full, though the
    entry replaced no longer held its bytes (8 such Stores counted 8
    entries against the tenant's bound). What the replaced version was
    charged is given back."""
    cache = make_servicer(redis_client, embedder)
    s = scope(tenant)
    answer = pb.CachedAnswer(text="Practice daily.").SerializeToString()
    semantic = question == STORED
    one_entry = (
        len(answer) + store_module.ENTRY_OVERHEAD_BYTES + (DIMS * 4 + len(question) if semantic else 0)
    )
    await asyncio.gather(*(store(cache, s, conversation(question), text="Practice daily.") for _ in range(8)))
    for _ in range(3):  # refreshes
        await store(cache, s, conversation(question), text="Practice daily.")
    assert await charged_bytes(redis_client, tenant) == one_entry


async def test_an_invalidate_gives_back_what_the_entries_it_removes_were_charged(
    redis_client, embedder, tenant
):
    """A bug hunt: an Invalidate gave back nothing of what its entries were
    charged to cache.max_bytes_per_tenant, so a tenant that invalidated its
    entries stayed charged for them (and was refused Stores) for up to two
    windows of cache.ttl_s. Now each entry it removes gives back what it was
    charged, once (Invalidates at once, or again, give back nothing more),
    and an entry that expired before it gives back nothing (it was never in
    Redis to remove; expiry refunds nothing)."""
    cache = make_servicer(redis_client, embedder, max_bytes_per_tenant=1 << 20)
    kept, invalidated = scope(tenant, "kept"), scope(tenant, "invalidated")
    await store(cache, kept, conversation(STORED), text="Practice daily.")
    await store(cache, invalidated, conversation("Who wrote Hamlet?"), text="Shakespeare.", ttl_seconds=1)
    still_charged = await charged_bytes(redis_client, tenant)
    # Semantic (an answer and a row) and exact only (a question past the bound).
    await store(cache, invalidated, conversation(STORED), text="Practice daily.")
    await store(cache, invalidated, conversation("x" * 2000), text="Practice daily.")
    assert await charged_bytes(redis_client, tenant) > still_charged
    await asyncio.sleep(1.1)  # the first entry expires

    request = pb.InvalidateRequest(tenant_id=tenant, model="invalidated")
    removed = await asyncio.gather(*(cache.Invalidate(request, None) for _ in range(3)))
    assert sum(response.entries_removed for response in removed) == 2
    assert await charged_bytes(redis_client, tenant) == still_charged
    await cache.Invalidate(request, None)
    assert await charged_bytes(redis_client, tenant) == still_charged


@pytest.mark.parametrize("quota", [1 << 24, 0], ids=["quota kept", "no quota"])
async def test_an_invalidate_gives_back_every_row_of_a_sub_partition_it_reads_in_steps(
    redis_client, embedder, tenant, monkeypatch, quota
):
    """A sub-partition's rows are deleted (and given back) one HSCAN step
    of a script at a time, never in one script over a hash of up to a
    million rows: 200 rows (a hash table, past Redis's small encoding) in
    steps of 16 all give back. With no quota kept there is nothing to give
    back, and the hash goes whole, unwalked (an Invalidate of 10,000 entries
    in 0.58-0.67 of the time: bench/cache_invalidate_bench.py)."""
    monkeypatch.setattr(store_module, "_SCAN_COUNT", 16)
    cache = make_servicer(redis_client, embedder, max_entries=1000, max_bytes_per_tenant=quota)
    s = scope(tenant)
    for number in range(200):
        await store(cache, s, conversation(f"Question number {number}?"))
    if quota:
        assert await charged_bytes(redis_client, tenant) > 200 * DIMS * 4
    steps = []
    step = cache._store._invalidate_rows

    async def counted_step(**kwargs):
        steps.append(kwargs)
        return await step(**kwargs)

    cache._store._invalidate_rows = counted_step
    removed = await cache.Invalidate(pb.InvalidateRequest(tenant_id=tenant), None)
    assert removed.entries_removed == 200
    assert await charged_bytes(redis_client, tenant) == 0
    assert not [key async for key in redis_client.scan_iter(match=keys.tenant_prefix(tenant, "") + "*")]
    if quota:
        assert len(steps) > 1  # COUNT is a hint: about 16 rows a step
    else:
        assert steps == []


async def test_an_entry_living_less_than_the_ttl_is_charged_to_the_window_before_and_given_back_there(
    redis_client, embedder, tenant
):
    """An entry whose ttl_seconds ends before the current window of the
    count does is charged to the window before (charge_window), which the
    bound reads while it lives; an Invalidate before it expires finds that
    window from the entry's expiry, in the answer and in the row, and gives
    it back there: the count is what it was."""
    # A window length (cache.ttl_s) whose current window has two minutes
    # yet, so that an entry of 60 s stored now expires within it.
    now_s = servicer_module._now_ms() // 1000
    ttl_s = next(length for length in range(3600, 3700) if length - now_s % length > 120)
    cache = make_servicer(redis_client, embedder, max_bytes_per_tenant=1 << 20, ttl_s=ttl_s)
    window = now_s // ttl_s

    async def window_before_holds() -> int:
        return int(await redis_client.get(keys.stored_bytes_key(tenant, ttl_s, window - 1)) or 0)

    kept, invalidated = scope(tenant, "kept"), scope(tenant, "invalidated")
    await store(cache, kept, conversation("Who wrote Hamlet?"), text="Shakespeare.")
    still_charged = await charged_bytes(redis_client, tenant)
    assert await window_before_holds() == 0

    await store(cache, invalidated, conversation(STORED), text="Practice daily.", ttl_seconds=60)
    charged = await window_before_holds()
    assert charged > DIMS * 4  # the answer and its row
    assert await charged_bytes(redis_client, tenant) == still_charged + charged

    removed = await cache.Invalidate(pb.InvalidateRequest(tenant_id=tenant, model="invalidated"), None)
    assert removed.entries_removed == 1
    assert await window_before_holds() == 0
    assert await charged_bytes(redis_client, tenant) == still_charged


@pytest.mark.parametrize("semantic", [True, False], ids=["with its question's vector", "exact only"])
async def test_a_store_over_an_entry_of_the_window_before_gives_its_charge_back_there(
    redis_client, embedder, tenant, monkeypatch, semantic
):
    """A review's finding: a Store over an entry (a refresh, or coalesced
    callers storing one answer) gave the entry's charge back to the window
    it ran in. An entry first stored in the window before was still charged
    there, so once that window left the two the bound reads, the refreshed
    entry, live, was counted nowhere: 3 such entries of ~9.8 KB each, then 3
    new ones, all admitted under a bound of 40,000 bytes. Given back to the
    window charged (from the replaced entry's expiry), the bound holds."""
    ttl_s, bound = 60, 40_000
    clock = {"ms": 29_000_000 * ttl_s * 1000 + 1000}  # 1 s into a window
    monkeypatch.setattr(servicer_module, "_now_ms", lambda: clock["ms"])
    cache = make_servicer(redis_client, embedder, max_bytes_per_tenant=bound, ttl_s=ttl_s)
    embedder.available = semantic
    answer = "x" * 8000
    questions = [f"Question number {n}?" for n in range(3)]

    async def stored(question: str) -> bool:
        try:
            await store(cache, scope(tenant), conversation(question), text=answer)
        except MeshgateError as error:
            assert error.reason == Reason.CACHE_QUOTA_EXCEEDED
            return False
        return True

    assert [await stored(q) for q in questions] == [True] * 3
    clock["ms"] += ttl_s * 1000  # the next window: each entry refreshed
    assert [await stored(q) for q in questions] == [True] * 3
    clock["ms"] += ttl_s * 1000 - 500  # the refreshed entries live 0.5 s more
    for question in questions:
        hit = await cache.Lookup(pb.LookupRequest(scope=scope(tenant), messages=conversation(question)), None)
        assert hit.status == pb.LOOKUP_STATUS_EXACT_HIT
    # Room for one entry more under the bound, not for three.
    assert [await stored(f"Another question {n}?") for n in range(3)] == [True, False, False]


class NewRevision(FakeEmbedder):
    """The same model under another revision (meshgate/minilm.py, REVISION):
    an unrelated question lands where STORED's vector of the old one was."""

    def __init__(self) -> None:
        super().__init__()
        self.embedder = "fake@2"
        self.table = {UNRELATED: _direction(0.97), UNRELATED_REWORDED: _direction(0.96)}


UNRELATED = "What is the capital of France?"
UNRELATED_REWORDED = "Which city is the capital of France?"


async def test_vectors_of_another_revision_of_the_model_are_never_compared(redis_client, embedder, tenant):
    # A replica of the old revision stores; one of the new revision (the
    # inference service's Triton upgraded under it, or a new replica) asks
    # an unrelated question whose new vector is close to the old entry's.
    old = make_servicer(redis_client, embedder)
    await store(old, scope(tenant), conversation(STORED), text="use a good book")
    new = make_servicer(redis_client, NewRevision())
    response = await lookup(new, scope(tenant), conversation(UNRELATED))
    assert response.status == pb.LOOKUP_STATUS_MISS
    # Each revision's entries are found by its own vectors only.
    await store(new, scope(tenant), conversation(UNRELATED), text="Paris")
    assert (await lookup(old, scope(tenant), conversation(PARAPHRASE))).answer.text == "use a good book"
    again = await lookup(new, scope(tenant), conversation(UNRELATED_REWORDED))
    assert (again.status, again.answer.text) == (pb.LOOKUP_STATUS_SEMANTIC_HIT, "Paris")


async def test_a_revision_change_under_a_running_cache_moves_its_lookups(redis_client, tenant):
    # The embedder's revision changes between two lookups of one replica
    # (the inference service answers for the new one): its next lookup
    # matches among the new revision's entries, not the index it had loaded.
    embedder = FakeEmbedder()
    cache = make_servicer(redis_client, embedder, memo_entries=16)
    await store(cache, scope(tenant), conversation(STORED), text="use a good book")
    assert (
        await lookup(cache, scope(tenant), conversation(PARAPHRASE))
    ).status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    embedder.embedder = "fake@2"
    # Sharing enough of STORED's words to be embedded (not a first-stage
    # miss), and close to STORED's old vector under the new revision.
    other_language = "What is the quickest way to learn French?"
    embedder.table[other_language] = _direction(0.97)
    assert (await lookup(cache, scope(tenant), conversation(other_language))).status == pb.LOOKUP_STATUS_MISS
    # Once a vector of the new revision came, the old entries are not looked
    # at again, not even for a question whose old vector is remembered.
    assert (await lookup(cache, scope(tenant), conversation(PARAPHRASE))).status == pb.LOOKUP_STATUS_MISS


async def test_a_replica_whose_lookups_end_at_the_first_stage_moves_to_a_new_revision_by_its_stores(
    redis_client, tenant
):
    # Its lookups of questions unlike what the old revision's entries hold
    # end at the first stage, which embeds nothing: the revision's change
    # is seen by the Stores that follow their misses, and the replica's
    # lookups then look among the new revision's entries.
    embedder = FakeEmbedder()
    cache = make_servicer(redis_client, embedder, memo_entries=16)
    await store(cache, scope(tenant), conversation(STORED), text="use a good book")
    assert (
        await lookup(cache, scope(tenant), conversation(PARAPHRASE))
    ).status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    embedder.embedder = "fake@2"
    embedder.table[UNRELATED], embedder.table[UNRELATED_REWORDED] = _direction(1.0), _direction(0.96)
    assert (await lookup(cache, scope(tenant), conversation(UNRELATED))).status == pb.LOOKUP_STATUS_MISS
    await store(cache, scope(tenant), conversation(UNRELATED), text="Paris")
    again = await lookup(cache, scope(tenant), conversation(UNRELATED_REWORDED))
    assert (again.status, again.answer.text) == (pb.LOOKUP_STATUS_SEMANTIC_HIT, "Paris")


class NamedMiniLM:
    """minilm's real vectors (meshgate/minilm.py, run here), under the name
    of ``embedder``: what the inference service answers once its Triton
    model is another revision whose vectors the verifier never saw."""

    def __init__(self, model, embedder: str) -> None:
        self._model = model
        self.embedder = embedder

    async def embed_or_none(self, text: str, timeout_s: float | None = None) -> Embedding | None:
        return Embedding(self._model.embed([text])[0], self.embedder)


async def test_vectors_of_an_embedder_the_verifier_was_not_trained_on_are_never_served(redis_client, tenant):
    # The real verifier, at the default pre-filter and bound, with vectors
    # it would accept the pair by: a cosine of another revision can be high
    # for unrelated texts, and its learned score would pass them as well.
    from meshgate.minilm import MiniLM

    defaults = CacheSettings()
    verifier = Verifier.load(defaults.max_false_hit_rate)
    model = MiniLM()

    def servicer(embedder: str) -> CacheServicer:
        return make_servicer(
            redis_client,
            NamedMiniLM(model, embedder),
            verifier=verifier,
            semantic_threshold=defaults.semantic_threshold,
        )

    trained = servicer(verifier.embedder)
    await store(trained, scope(tenant), conversation(STORED), text="Practice daily.")
    hit = await lookup(trained, scope(tenant), conversation(PARAPHRASE))
    assert (hit.status, hit.answer.text) == (pb.LOOKUP_STATUS_SEMANTIC_HIT, "Practice daily.")

    other = embedder_name("minilm", verifier.embedder.rpartition("@")[2] + "-next")
    untrained = servicer(other)
    await store(untrained, scope(tenant, "smollm2"), conversation(STORED), text="Practice daily.")
    unverifiable = metrics.cache().unverifiable_lookups
    before = unverifiable._value.get()
    with structlog.testing.capture_logs() as logged:
        for _ in range(2):
            missed = await lookup(untrained, scope(tenant, "smollm2"), conversation(PARAPHRASE))
            assert missed.status == pb.LOOKUP_STATUS_MISS
    assert unverifiable._value.get() == before + 2
    warned = [(w["verifier_embedder"], w["vector_embedder"]) for w in logged if w["log_level"] == "warning"]
    assert warned == [(verifier.embedder, other)]
    # Exact hits hold no vectors: still served.
    exact = await lookup(untrained, scope(tenant, "smollm2"), conversation(STORED))
    assert (exact.status, exact.answer.text) == (pb.LOOKUP_STATUS_EXACT_HIT, "Practice daily.")


async def test_a_report_of_no_entry_is_charged_nothing(redis_client, embedder, tenant):
    """A report is charged its pair (REPORTED_PAIR_BYTES) before it runs;
    one naming no entry the cache holds is NOT_FOUND and writes nothing,
    yet its charge stayed: a tenant reporting stale ids (entries expired,
    evicted or invalidated since their hit) used up its quota on nothing,
    and its next Stores were refused CACHE_QUOTA_EXCEEDED."""
    s = scope(tenant)
    other = "What is the capital of France?"
    stored_bytes = two_entries_bytes(other)
    cache = make_servicer(redis_client, embedder, max_bytes_per_tenant=stored_bytes + 256)
    await store(cache, s, conversation(STORED), text="Practice daily.")
    before = await charged_bytes(redis_client, tenant)
    gone_id = keys.entry_id(keys.partition(s), conversation("A question never stored?"))
    for _ in range(10):
        with pytest.raises(MeshgateError) as refused:
            await cache.ReportWrongHit(
                pb.ReportWrongHitRequest(scope=s, messages=conversation(PARAPHRASE), entry_id=gone_id), None
            )
        assert refused.value.code == grpc.StatusCode.NOT_FOUND
        assert refused.value.reason == "CACHE_ENTRY_NOT_FOUND"
    assert await charged_bytes(redis_client, tenant) == before
    await store(cache, s, conversation(other), text="Practice daily.")
