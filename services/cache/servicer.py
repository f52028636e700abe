"""The cache's request path: Lookup, Store, Invalidate, GetStats,
ReportWrongHit.

An exact hit costs one GET and no embedding. A miss with ``semantic`` set
embeds the question once, while the sub-partition's index tops itself up
from Redis over the same wait, and a Store right after that miss reuses the
vector instead of embedding the question again. The index's best matches
above the cosine pre-filter go to the verifier (``verifier/``), and the
best-scoring accepted one is served. The last question of a multi-turn prompt
is matched together with the topic turn it refers to (``conversation.py``).

A first stage spares many misses the embedding: a question is embedded
only if some question its sub-partition holds has at least
``cache.first_stage_word_share`` (0.3) of its content words (and one at
least); otherwise it is a miss at once. In a small partition most misses
share no word at all; in a busy one (3,001 questions) nearly every question
shares some word, but about a third share less than 0.3 of theirs with any
one stored question, while ~1% of the hits the verifier serves at the
default bound are below that share (bench/cache_first_stage.py;
bench/README.md). A multi-turn text (question and topic turn) is held to
the same share: no same-context conversation of the development scenarios
falls below it.

A miss that passes the first stage still embeds, and the router holds its
first generated token until the semantic lookup answers. The router asks
for it right after an exact-only lookup of the same prompt missed, so that
miss starts the embedding at once (``EmbeddingMemo.embed_ahead``): the
semantic lookup that follows finds it under way or remembered instead of
starting it a round trip later. With one cache replica the vector is not
wasted on a turn that completes: the Store after a miss needs it too. The
router balances its cache calls round robin, so with k replicas the
semantic lookup and the Store reach the replica that embedded ahead about
1/k of the time; the others embed the question again (with ``cache.embedder
= "inference"`` the inference service's shared embeddings usually answer
that from memory, without Triton; the default local embedder runs the model
again, ~5 ms of one core).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import re
import time

import grpc
import numpy as np
import structlog

from meshgate import metrics, redis_access, serving
from meshgate.cache.v1 import cache_service_pb2 as pb
from meshgate.cache.v1 import cache_service_pb2_grpc
from meshgate.common.v1 import common_pb2
from meshgate.config import (
    MAX_CACHED_PROMPT_CHARS,
    MAX_CACHED_PROMPT_MESSAGES,
    MAX_SCOPE_ROUTE_CHARS,
    CacheSettings,
)
from meshgate.embedding import Embedding
from meshgate.errors import MeshgateError, invalid_argument, not_found, unavailable
from meshgate.reasons import Reason
from meshgate.sampling import check_sampling
from meshgate.single_flight import SingleFlight
from meshgate.tokenization import ROLE_NAMES
from services.cache import conversation, keys
from services.cache.embedding_memo import EmbeddingMemo
from services.cache.index import IndexRegistry, Match, TopUps, VectorIndex
from services.cache.stats import Stats
from services.cache.store import (
    ENTRY_OVERHEAD_BYTES,
    REPORTED_PAIR_BYTES,
    SYNC_BATCH,
    CacheStore,
    NoRoomForReport,
    live_answer,
    split_payload,
)
from services.cache.verifier import Verifier, analyze, readable

# Best matches verified per lookup. The best by cosine is often not the one
# to serve (a negation of the question scores above its paraphrase), and
# calibration (bench/train_cache_verifier.py) ran with this many. Accepted
# candidates whose answer is gone from Redis (evicted, expired, reported)
# are dropped from the index and the next accepted one is tried.
MAX_CANDIDATES = 5

_USER = common_pb2.ROLE_USER

# What a lookup's answer counts as: its total in the mesh's stats
# (services/cache/stats.py) and its label in this replica's metrics.
_COUNTED_AS = {
    pb.LOOKUP_STATUS_EXACT_HIT: ("exact_hits", "exact_hit"),
    pb.LOOKUP_STATUS_SEMANTIC_HIT: ("semantic_hits", "semantic_hit"),
    pb.LOOKUP_STATUS_MISS: ("misses", "miss"),
}

# How long lookups wait for a top-up of their index that has had no reply
# from Redis, before each reads for itself (``_queue_for_top_up``). A round
# trip of a top-up takes milliseconds (at most SYNC_BATCH rows, ~1.6 MB at
# 384 dimensions); one hung on a stalled connection held every semantic
# lookup of its sub-partition until the holder's deadline (the router's:
# 10 s) or the Redis timeout (redis.timeout_s) ended it. A second, not less: a
# busy event loop delays the holder's turn after a reply has come, and
# waiters that gave up too early would each read the whole backlog, the
# stampede the shared top-up is for.
STALLED_TOP_UP_S = 1.0

log = structlog.get_logger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# A scope names one of the router's tenants (ids of at most 128 characters,
# services/router/keys.py), model aliases, parameter sets (at most 8 stop
# strings of 64 characters, meshgate/sampling.py: ~2 KiB serialized at worst)
# and routes (the model names of an alias's deployments, or of the two
# aliases it selects between: config.route_of, a few names).
# It keys memos that are bounded by count (keys.partition's), Redis keys and
# resident indexes, so a caller that sent megabytes of scope would hold that
# much memory per scope: refused before anything keeps it. The bounds leave
# room above what the router sends.
# The most an answer stored may take, serialized: a Lookup's reply carries
# it whole, with the entry ids (64 hex characters each), the similarity, a
# status and a fence beside it, well inside the room left here, and must
# pass the mesh's message bound.
MAX_ANSWER_BYTES = serving.MAX_MESSAGE_BYTES - 4096
MAX_SCOPE_NAME_CHARS = 512
MAX_SCOPE_PARAMETERS_BYTES = 8192
# Routes: MAX_SCOPE_ROUTE_CHARS, which the router's configuration is held
# to (meshgate/config.py).


# The most messages a prompt may have (meshgate/config.py, which the router
# reads too). The router sends a turn's own (router.max_messages, 256 by
# default) or the prompt assembled for a session turn, which fits its
# model's window, where every message takes a token of its template at
# least (8,192 for the largest bundled window); a longer one, for a model
# of a larger window, it keeps uncached without asking. Each message is
# hashed and read for the conversation's topic on the event loop: before
# this bound, a Lookup of 500,000 empty messages (2 MB, well inside the
# mesh's 32 MiB message bound) held a neighbour's Lookup for 11.5 s, and
# 8 MB ones for over a minute.
MAX_PROMPT_MESSAGES = MAX_CACHED_PROMPT_MESSAGES


# The longest text matched by meaning (a question, with its topic turn when
# it has one), in UTF-8 bytes; a longer prompt is cached and looked up
# exactly only. Every resident index row keeps its text (for the verifier
# and the first stage), and resident rows are bounded by count
# (cache.max_resident_rows, 1.2M): at the router's message limit (256 KiB,
# twice with a topic turn) that count could hold ~600 GiB of text, at this
# bound 1.2 GiB. The embedding model reads a text's first 256 tokens
# (~1 KB of English) anyway; the longest question of the QQP pairs is 589
# characters, of bench/data's conversation scenarios 180 bytes resolved.
MAX_SEMANTIC_TEXT_BYTES = 1024


def _matched_by_meaning(text: str) -> bool:
    # len() first: a text of more characters than the bound is over it in
    # bytes too, without encoding a message of up to 256 KiB. A text the
    # verifier cannot read (verifier.readable) is matched exactly only.
    return (
        len(text) <= MAX_SEMANTIC_TEXT_BYTES
        and len(text.encode()) <= MAX_SEMANTIC_TEXT_BYTES
        and readable(text)
    )


# A LookupResponse.store_fence: the scope's invalidation marks, the tenant's
# and the model's, each Redis's clock in microseconds or 0 (store._fence).
_FENCE = re.compile(r"[0-9]{1,20}/[0-9]{1,20}")


def _partition(scope: pb.CacheScope) -> keys.Partition:
    if not scope.tenant_id:
        raise invalid_argument(Reason.TENANT_REQUIRED, "scope.tenant_id is required")
    if not scope.model:
        raise invalid_argument(Reason.MISSING_MODEL, "scope.model is required")
    _check_scope_names(scope.tenant_id, scope.model)
    if scope.parameters.ByteSize() > MAX_SCOPE_PARAMETERS_BYTES:
        raise invalid_argument(
            Reason.SCOPE_TOO_LARGE, f"scope.parameters must be at most {MAX_SCOPE_PARAMETERS_BYTES} bytes"
        )
    if len(scope.route) > MAX_SCOPE_ROUTE_CHARS:
        # A bug hunt: the route alone went unchecked, and Lookups of distinct
        # 4 MiB routes each left theirs in keys.partition's memo (4,096 kept).
        raise invalid_argument(
            Reason.SCOPE_TOO_LARGE, f"scope.route must be at most {MAX_SCOPE_ROUTE_CHARS} characters"
        )
    # Refused as the router and the inference service refuse them (a review:
    # a NaN temperature, nine stop strings, were stored here under keys no
    # valid request makes).
    check_sampling(scope.parameters)
    # max_tokens is no sampling parameter (its bound differs per service),
    # but one no caller may send: stored under it, a scope no valid request
    # makes (a review: -1, 0 and -2^31 stored and served).
    if scope.parameters.HasField("max_tokens") and scope.parameters.max_tokens < 1:
        raise invalid_argument(Reason.INVALID_MAX_TOKENS, "scope.parameters.max_tokens must be positive")
    return keys.partition(scope)


def _check_scope_names(tenant_id: str, model: str) -> None:
    if len(tenant_id) > MAX_SCOPE_NAME_CHARS or len(model) > MAX_SCOPE_NAME_CHARS:
        raise invalid_argument(
            Reason.SCOPE_TOO_LARGE, f"tenant_id and model must be at most {MAX_SCOPE_NAME_CHARS} characters"
        )


def _check_messages(messages) -> None:
    if not messages:
        raise invalid_argument(Reason.EMPTY_MESSAGES, "messages must not be empty")
    if len(messages) > MAX_PROMPT_MESSAGES:
        raise invalid_argument(
            Reason.TOO_MANY_MESSAGES,
            f"a prompt of {len(messages)} messages is more than the cache takes ({MAX_PROMPT_MESSAGES})",
            limit=str(MAX_PROMPT_MESSAGES),
        )
    chars = sum(len(message.content) for message in messages)
    if chars > MAX_CACHED_PROMPT_CHARS:
        raise invalid_argument(
            Reason.PROMPT_TOO_LARGE,
            f"a prompt of {chars} characters is more than the cache takes ({MAX_CACHED_PROMPT_CHARS})",
            limit=str(MAX_CACHED_PROMPT_CHARS),
        )
    for index, message in enumerate(messages):
        if message.role not in ROLE_NAMES:
            raise invalid_argument(
                Reason.INVALID_ROLE, f"messages[{index}] has no valid role", index=str(index)
            )


def _quota_exceeded(held: int, size: int, most: int) -> MeshgateError:
    return MeshgateError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.CACHE_QUOTA_EXCEEDED,
        f"the tenant's cache Stores and reports of the last two windows of cache.ttl_s charged {held} "
        f"bytes; {size} more would pass cache.max_bytes_per_tenant ({most})",
        {
            "limit": "max_bytes_per_tenant",
            "scope": "tenant",
            "limit_value": str(most),
            "bytes": str(held),
        },
    )


def _log_fenced_write_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("cache store's write or its undo failed", error=str(task.exception()))


class CacheServicer(cache_service_pb2_grpc.CacheServiceServicer):
    def __init__(
        self,
        settings: CacheSettings,
        store: CacheStore,
        embedder: EmbeddingMemo,
        stats: Stats,
        indexes: IndexRegistry,
        verifier: Verifier,
        heartbeat_id: str = "",
    ) -> None:
        self._settings = settings
        # What this replica's heartbeat carries (heartbeat.py); its hits name
        # it, and a router copies a hit only while it hears that heartbeat.
        # Empty (a servicer publishing none): no router copies its hits.
        self._heartbeat_id = heartbeat_id
        self._verifier = verifier
        self._threshold = settings.semantic_threshold
        self._store = store
        self._embedder = embedder
        self._stats = stats
        self._indexes = indexes
        # The embedding model's vector size and its embedder's name
        # (meshgate.embedding.embedder_name: model and revision), once a
        # lookup has seen a vector: the first stage loads an index before (or
        # without) embedding, and the name picks the sub-partition.
        self._dimensions: int | None = None
        self._embedder_name: str | None = None
        # Embedders whose vectors came here that the verifier was not trained
        # on, each warned of once (_refuse_untrained_embedder): a handful.
        self._untrained_embedders_seen: set[str] = set()
        # The loads from Redis in flight, by index key: one per sub-partition,
        # shared by the lookups that find its index not loaded (``_synced``).
        # A load whose lookups all gave up goes on: the index stays resident.
        self._loads: SingleFlight[str, tuple[VectorIndex, int | None]] = SingleFlight(
            "index load", cancel_when_abandoned=False
        )
        # Checks of an index's rows against Redis, by index key, one at a
        # time each, in the background (``_drop_rows_gone``).
        self._row_checks: SingleFlight[str, None] = SingleFlight(
            "index row check", cancel_when_abandoned=False
        )
        # The replica's own counts for Prometheus; _stats keeps the mesh's totals in Redis.
        self._metrics = metrics.cache()
        self._metrics.resident_entries.set_function(lambda: indexes.resident_entries)
        self._metrics.resident_rows.set_function(lambda: indexes.resident_rows)
        self._metrics.resident_indexes.set_function(lambda: len(indexes))

    async def Lookup(self, request: pb.LookupRequest, context: grpc.aio.ServicerContext) -> pb.LookupResponse:
        partition = _partition(request.scope)
        if request.fence_only:
            return pb.LookupResponse(
                status=pb.LOOKUP_STATUS_MISS, store_fence=await self._store.store_fence(partition)
            )
        messages = request.messages
        _check_messages(messages)
        entry_id = keys.entry_id(partition, messages)
        live = live_answer(await self._store.get(partition, entry_id), _now_ms())
        if live is not None:
            return self._hit(pb.LOOKUP_STATUS_EXACT_HIT, live, 1.0, entry_id)
        if messages[-1].role == _USER:
            if not request.semantic:
                self._embed_ahead(partition, messages)
            elif (hit := await self._semantic_lookup(partition, messages, entry_id)) is not None:
                match, live = hit
                return self._hit(
                    pb.LOOKUP_STATUS_SEMANTIC_HIT, live, match.similarity, match.entry_id, entry_id
                )
        # The fence the Store of this prompt's answer will carry: only the
        # exact lookup's, which answers before the generation starts (a
        # semantic one may read after an Invalidate it began before).
        store_fence = "" if request.semantic else await self._store.store_fence(partition)
        response = pb.LookupResponse(status=pb.LOOKUP_STATUS_MISS, store_fence=store_fence)
        if request.semantic_follows and not request.semantic:
            return response  # the semantic lookup that follows counts this prompt
        return self._counted(response)

    def _hit(
        self,
        status: pb.LookupStatus,
        live: tuple[bytes, int],
        similarity: float,
        entry_id: str,
        asked_entry_id: str = "",
    ) -> pb.LookupResponse:
        """A hit on ``entry_id``, with its stored answer and time left
        (``live``, from live_answer), counted."""
        answer, expires_in_ms = live
        response = pb.LookupResponse(
            status=status,
            similarity=similarity,
            entry_id=entry_id,
            asked_entry_id=asked_entry_id,
            expires_in_ms=expires_in_ms,
            heartbeat_id=self._heartbeat_id,
        )
        response.answer.MergeFromString(answer)
        return self._counted(response)

    def _counted(self, response: pb.LookupResponse) -> pb.LookupResponse:
        """``response``, counted by its status in the mesh's totals and this replica's metrics."""
        total, label = _COUNTED_AS[response.status]
        self._stats.pending[total] += 1
        self._metrics.lookups.labels(label).inc()
        return response

    async def Store(self, request: pb.StoreRequest, context: grpc.aio.ServicerContext) -> pb.StoreResponse:
        partition = _partition(request.scope)
        messages = request.messages
        _check_messages(messages)
        if not request.HasField("answer"):
            raise invalid_argument(Reason.MISSING_ANSWER, "answer is required")
        usage = request.answer.usage
        if usage.prompt_tokens < 0 or usage.completion_tokens < 0:
            # Served with every hit, and read by the router as the tokens a
            # hit saved: its usage records would say negative (a review).
            raise invalid_argument(Reason.INVALID_USAGE, "answer.usage token counts must not be negative")
        if request.store_fence and not _FENCE.fullmatch(request.store_fence):
            # Any fence but the scope's current one reads as an Invalidate
            # since its lookup: a made-up one dropped the answer and said so,
            # OK, though no Invalidate had come (a review).
            raise invalid_argument(
                Reason.INVALID_STORE_FENCE,
                "store_fence must be empty or a LookupResponse.store_fence of the same scope",
            )
        # At most the configured TTL: an entry (and the keys of its whole
        # sub-partition, which live as long as their longest entry) asked to
        # live 68 years would, and an operator's cache.ttl_s is the bound.
        if not 0 <= request.ttl_seconds <= self._settings.ttl_s:
            raise invalid_argument(
                Reason.INVALID_TTL,
                f"ttl_seconds must be 0 (the default) to cache.ttl_s ({self._settings.ttl_s})",
                limit=str(self._settings.ttl_s),
            )
        ttl_ms = (request.ttl_seconds or self._settings.ttl_s) * 1000
        entry_id = keys.entry_id(partition, messages)
        answer = request.answer.SerializeToString()
        if len(answer) > MAX_ANSWER_BYTES:
            # Every Lookup of it would fail in grpc's own words (its reply
            # carries the answer and a few fields more), for the entry's TTL.
            raise MeshgateError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                Reason.RESPONSE_TOO_LARGE,
                f"the answer's {len(answer)} bytes are more than a lookup may return ({MAX_ANSWER_BYTES})",
                {"bytes": str(len(answer)), "limit": str(MAX_ANSWER_BYTES)},
            )
        vector = None
        if messages[-1].role == _USER:
            resolved = conversation.resolve(messages)
            text = resolved[0]
            if _matched_by_meaning(text):
                # Usually remembered from the lookup that missed just before.
                embedded = await self._embedder.embed_or_none(text, tenant_id=partition.tenant_id)
                if embedded is not None:
                    # Among the vectors of the revision that made this one.
                    vector = embedded.vector
                    self._learn_embedder(embedded)
                    context_id = self._context_id(partition, messages, embedded.embedder, resolved)
        if await self._invalidated_since(partition, request.store_fence):
            # Seen before writing (the usual case: an Invalidate during a
            # generation of seconds): nothing to undo.
            return pb.StoreResponse(entry_id=entry_id, invalidated_since_lookup=True)
        now_ms = _now_ms()
        await self._charge(partition, answer, vector, text if vector is not None else "", now_ms, ttl_ms)
        if vector is None:
            write = functools.partial(self._store.put_exact, partition, entry_id, answer, now_ms, ttl_ms)

            def undo(_written):
                return self._undo_store(partition, entry_id, answer, now_ms + ttl_ms)

            replaced, invalidated = await self._fenced_write(partition, request.store_fence, write, undo)
            await self._give_back_removed(partition.tenant_id, replaced.charges(self._settings.ttl_s))
            if invalidated:
                return pb.StoreResponse(entry_id=entry_id, invalidated_since_lookup=True)
        else:
            write = functools.partial(
                self._store.put_semantic,
                partition, context_id, entry_id, answer, vector.tobytes(), text, now_ms, ttl_ms,
            )  # fmt: skip

            def undo(written):
                seq = written[0]
                return self._undo_store(partition, entry_id, answer, now_ms + ttl_ms, context_id, seq)

            (seq, evicted, replaced), invalidated = await self._fenced_write(
                partition, request.store_fence, write, undo
            )
            await self._give_back_removed(partition.tenant_id, replaced.charges(self._settings.ttl_s))
            index_key = partition.vectors_key(context_id)
            index = self._indexes.get(index_key)
            if index is not None and index.dimensions == len(vector):
                for evicted_id, evicted_seq in evicted:
                    # That version only: a later Store of the same entry
                    # whose reply came first must keep its row.
                    index.remove(evicted_id, evicted_seq)
                if not invalidated:
                    index.upsert(entry_id, seq, now_ms + ttl_ms, vector, text, now_ms=now_ms)
                self._indexes.settle(index_key)
            if invalidated:
                return pb.StoreResponse(entry_id=entry_id, invalidated_since_lookup=True)
        self._stats.pending["stores"] += 1
        self._metrics.stores.inc()
        return pb.StoreResponse(entry_id=entry_id)

    async def _charge(
        self,
        partition: keys.Partition,
        answer: bytes,
        vector: np.ndarray | None,
        question: str,
        now_ms: int,
        ttl_ms: int,
    ) -> None:
        """Charges a Store's bytes to its tenant (cache.max_bytes_per_tenant),
        or refuses it: one tenant's entries filling the Redis every tenant's
        sessions share failed all their writes."""
        most = self._settings.max_bytes_per_tenant
        if not most:
            return
        size = len(answer) + ENTRY_OVERHEAD_BYTES
        if vector is not None:
            size += vector.nbytes + len(question.encode())
        held = await self._store.charge(
            partition.tenant_id, size, most, self._settings.ttl_s, now_ms, expires_ms=now_ms + ttl_ms
        )
        if held is not None:
            raise _quota_exceeded(held, size, most)

    async def _give_back(self, partition: keys.Partition, size: int, now_ms: int) -> None:
        """Gives back to the tenant's count bytes charged at ``now_ms`` that
        Redis does not hold: a report's pair that it did not keep (it named
        no entry, or the pair was held already). A failure is only logged:
        the count errs high, as it does for a write that fails after its
        charge."""
        if not size or not self._settings.max_bytes_per_tenant:
            return
        try:
            await self._store.refund(partition.tenant_id, size, self._settings.ttl_s, now_ms)
        except MeshgateError as error:
            log.warning("cache's refund of bytes it does not hold failed", error=error.message)

    async def _give_back_removed(self, tenant_id: str, charged: collections.Counter[int]) -> None:
        """Gives back to the tenant's counts what the entries an Invalidate, a
        Store's undo, or a Store over them removed were charged (``charged``:
        bytes by the window charged, which for a Store over an entry stored
        in the window before is that one). Each caller sharing a generation
        (the router's coalescing) Stores the same answer under one entry,
        and a refresh stores over it: in a bug hunt, 8 identical greedy
        turns at once through the router charged 33,088 bytes, 8 entries'
        worth, for the one entry they left. A failure is only logged: the
        entries are gone all the same, and the count errs high, for two
        windows at most, as for a Store's write that failed."""
        if not charged or not self._settings.max_bytes_per_tenant:
            return
        try:
            await self._store.refund_windows(tenant_id, charged, self._settings.ttl_s, _now_ms())
        except MeshgateError as error:
            log.warning("cache's refund of the entries it removed failed", error=error.message)

    async def _undo_store(
        self,
        partition: keys.Partition,
        entry_id: str,
        answer: bytes,
        expires_ms: int,
        context_id: str = "",
        seq: int = 0,
    ) -> None:
        """Undoes a Store whose fence moved (``CacheStore.undo_store``) and
        gives back what it was charged for what the undo removed."""
        charged = await self._store.undo_store(
            partition, entry_id, answer, expires_ms, self._settings.ttl_s * 1000, context_id, seq
        )
        await self._give_back_removed(partition.tenant_id, charged)

    async def _invalidated_since(self, partition: keys.Partition, store_fence: str) -> bool:
        """Whether the scope was invalidated after the lookup that gave
        ``store_fence``."""
        return bool(store_fence) and await self._store.store_fence(partition) != store_fence

    async def _fenced_write(self, partition: keys.Partition, store_fence: str, write, undo):
        """``write()``, then the marks again (store.py says why this closes
        the race with an Invalidate's SCAN), and ``undo(written)`` if they
        moved; returns (written, whether undone). Shielded as one: a Store
        cancelled once its write went out (the router's deadline, its caller
        gone after the last delta) would otherwise leave a stale answer for
        the entry's whole TTL. A failure after its caller left is logged."""

        async def write_check_undo():
            written = await write()
            if not await self._invalidated_since(partition, store_fence):
                return written, False
            await undo(written)
            return written, True

        task = asyncio.ensure_future(write_check_undo())
        task.add_done_callback(_log_fenced_write_failure)
        return await asyncio.shield(task)

    async def Invalidate(
        self, request: pb.InvalidateRequest, context: grpc.aio.ServicerContext
    ) -> pb.InvalidateResponse:
        if not request.tenant_id:
            raise invalid_argument(Reason.TENANT_REQUIRED, "tenant_id is required")
        _check_scope_names(request.tenant_id, request.model)
        prefix = keys.tenant_prefix(request.tenant_id, request.model)
        removed = await self._store.invalidate(
            request.tenant_id,
            request.model,
            self._settings.ttl_s * 1000,
            read_row_charges=bool(self._settings.max_bytes_per_tenant),
        )
        # After the deletion, so that no index reloaded during the scan keeps
        # rows of deleted entries (those would only cost a GET, not a wrong hit).
        self._indexes.drop_prefix(prefix)
        await self._give_back_removed(request.tenant_id, removed.charged)
        return pb.InvalidateResponse(entries_removed=removed.entries)

    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatsResponse:
        totals = await self._stats.totals()
        entries = await self._store.count_entries()
        return pb.GetStatsResponse(
            **totals,
            entries=entries,
            semantic_threshold=self._threshold,
            expected_false_hit_rate=self._verifier.expected_false_hit_rate,
            max_false_hit_rate=self._settings.max_false_hit_rate,
        )

    async def ReportWrongHit(
        self, request: pb.ReportWrongHitRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportWrongHitResponse:
        partition = _partition(request.scope)
        _check_messages(request.messages)
        if not keys.is_entry_id(request.entry_id):
            raise invalid_argument(Reason.INVALID_ENTRY_ID, "entry_id must be a LookupResponse.entry_id")
        # A semantic hit comes from the sub-partition the lookup was matched
        # in, so that is where the entry and its neighbours live: that of the
        # embedder's revision the lookups here see.
        embedder = self._embedder_name
        resolved = conversation.resolve(request.messages)
        if embedder is None:
            # No lookup here has embedded yet (a replica just started).
            embedded = await self._embedder.embed_or_none(resolved[0], tenant_id=partition.tenant_id)
            if embedded is None:
                # Which sub-partition holds the entry is not known: the
                # report filed under another removed the answer but left its
                # row and kept the pair apart from it, so once the entry's own
                # prompt was stored again the reported prompt was served it
                # again (a review). Refused: the caller sends it again.
                raise unavailable(
                    Reason.EMBEDDER_UNAVAILABLE,
                    "the cache could not embed the reported question to find its entry's partition; retry",
                )
            embedder = embedded.embedder
        context_id = self._context_id(partition, request.messages, embedder, resolved)
        asked_id = keys.entry_id(partition, request.messages)
        # Charged before the report, as a Store is: the pair it keeps is the
        # tenant's bytes too. Without room, a report that deletes an entry
        # is still taken (its pair is bounded by the Stores that paid for
        # the entry), one of an entry already gone is refused.
        most = self._settings.max_bytes_per_tenant
        held = None
        charged_at_ms = _now_ms()
        full = None  # Redis's refusal of the charge, when it is full
        if most:
            try:
                held = await self._store.charge(
                    partition.tenant_id, REPORTED_PAIR_BYTES, most, self._settings.ttl_s, charged_at_ms
                )
            except MeshgateError as refused:
                if not redis_access.is_full(refused.__cause__):
                    raise
                # Redis is full (noeviction): the report is taken as one
                # without room, which deletes the entry it names (deletes
                # pass a full Redis: store._REPORT_WRONG) and keeps its pair.
                full, held = refused, 0
        try:
            report = await self._store.report_wrong(
                partition,
                context_id,
                request.entry_id,
                asked_id,
                self._settings.ttl_s * 1000,
                self._settings.report_replicas,
                self._settings.report_replication_timeout_s,
                room_for_a_pair=held is None,
            )
        except NoRoomForReport:
            if full is not None:
                # Of an entry gone: nothing to delete, and no room for its pair.
                raise full from None
            raise _quota_exceeded(held, REPORTED_PAIR_BYTES, most) from None
        if held is None and (report is None or not report.kept_new_pair):
            # Charged for a pair it did not keep: it named no entry (a tenant
            # reporting stale ids, of entries expired, evicted or invalidated
            # since their hit), or Redis held the pair already (a client
            # resending after a lost reply). Either would otherwise use the
            # tenant's quota up on bytes Redis does not hold.
            await self._give_back(partition, REPORTED_PAIR_BYTES, charged_at_ms)
        if report is None:
            raise not_found(
                Reason.CACHE_ENTRY_NOT_FOUND,
                "entry_id names no entry of this scope: report a hit's LookupResponse.entry_id "
                "with the scope and messages of its lookup",
                entry_id=request.entry_id,
            )
        index = self._indexes.get(partition.vectors_key(context_id))
        if index is not None and report.seq is not None:
            # That version only: a Store of the entry after the report, its
            # reply applied here first, keeps its row (the pair stays
            # reported). With no row in Redis there is none to drop: a
            # lookup drops a row whose entry it finds gone.
            index.remove(request.entry_id, report.seq)
        if report.replicas_acknowledged < report.replicas_wanted:
            # Still OK: the report holds on the master, and an error would
            # only have the client send it again (which keeps and counts
            # nothing more). Only a failover before the replicas catch up
            # loses it.
            self._metrics.unreplicated_reports.inc()
            log.warning(
                "wrong-hit report not yet on Redis's replicas",
                replicas_wanted=report.replicas_wanted,
                replicas_acknowledged=report.replicas_acknowledged,
                timeout_s=self._settings.report_replication_timeout_s,
            )
        if report.kept_new_pair:
            # Distinct wrong hits, as reports_in_partition counts them: a
            # report resent after a lost reply is the same wrong hit.
            self._stats.pending["wrong_hit_reports"] += 1
        return pb.ReportWrongHitResponse(entry_removed=report.removed, reports_in_partition=report.strictness)

    async def _semantic_lookup(
        self, partition: keys.Partition, messages, asked_id: str
    ) -> tuple[Match, tuple[bytes, int]] | None:
        """The best verified neighbour of the prompt (``asked_id``: its own
        entry id) with its answer and time left (``live_answer``), never one
        reported wrong for it."""
        resolved = conversation.resolve(messages)
        question = resolved[0]
        if not _matched_by_meaning(question):
            return None
        # The vector size and embedder the index is synced for (``_synced``
        # returns no index of another size; the embedder names the
        # sub-partition): a concurrent lookup may change them.
        dimensions, embedder = self._dimensions, self._embedder_name
        if dimensions is None or embedder is None:
            # Rows are read as vectors of the model's size, and looked for
            # among its embedder's: known from this process's first vector on.
            embedded = await self._embedder.embed_or_none(question, tenant_id=partition.tenant_id)
            if embedded is None:
                return None
            dimensions, embedder = self._learn_embedder(embedded)
            context_id = self._context_id(partition, messages, embedder, resolved)
            synced = await self._synced(partition, context_id, dimensions)
        else:
            context_id = self._context_id(partition, messages, embedder, resolved)
            if self._embeds_at_once(self._indexes.get(partition.vectors_key(context_id)), question):
                # Likely a candidate: embed while the index tops itself up.
                embedded, synced = await asyncio.gather(
                    self._embedder.embed_or_none(question, tenant_id=partition.tenant_id),
                    self._synced(partition, context_id, dimensions),
                )
            else:
                # The first stage: no entry the index holds shares enough of the
                # question's content words, so only an entry stored since can
                # make it a candidate. Many misses end here, without the embedding
                # that would delay the first token (the router holds its
                # generation's output until the lookup answers); the Store that
                # follows embeds, after the answer went out.
                synced = await self._synced(partition, context_id, dimensions)
                if synced is not None and not self._may_match(synced[0], question):
                    self._metrics.misses_without_embedding.inc()
                    return None
                embedded = await self._embedder.embed_or_none(question, tenant_id=partition.tenant_id)
        if embedded is None:
            return None
        if not self._verifier.trained_on(embedded.embedder):
            # The verifier's score weighs the cosine as its training
            # embedder's vectors gave it: for another's, a wrong candidate
            # could pass as a verified hit. Stores go on, into that
            # embedder's sub-partition, for a verifier retrained on it.
            self._refuse_untrained_embedder(embedded.embedder)
            self._learn_embedder(embedded)
            return None
        vector = embedded.vector
        if len(vector) != dimensions or embedded.embedder != embedder:
            # The embedding model changed under a running service (the
            # inference service's Triton upgraded): its vectors are matched
            # among its own revision's only, never the old vectors.
            dimensions, _ = self._learn_embedder(embedded)
            context_id = self._context_id(partition, messages, embedded.embedder, resolved)
            synced = await self._synced(partition, context_id, dimensions)
        if synced is None:
            return None
        index, strictness = synced
        accepted = []
        for match in index.nearest(vector, _now_ms(), MAX_CANDIDATES, self._threshold):
            decision = self._verifier.decide(question, vector, match.question, match.vector, strictness)
            if decision.accepted:
                accepted.append((decision.score, match))
            else:
                self._stats.pending["verifier_rejections"] += 1
                self._metrics.verifier_rejections.inc()
        accepted.sort(key=lambda scored: -scored[0])
        for _, match in accepted:
            value, reported = await self._store.get_unless_reported(
                partition, context_id, match.entry_id, asked_id
            )
            if reported:
                continue  # another prompt's answer still, but never this one's
            live = live_answer(value, _now_ms())
            if live is not None:
                return match, live
            index.remove(match.entry_id, match.seq)
        return None

    def _refuse_untrained_embedder(self, embedder: str) -> None:
        """Counts a semantic lookup missed for want of a verifier trained on
        ``embedder``'s vectors, with a warning at the first of each embedder."""
        self._metrics.unverifiable_lookups.inc()
        if embedder not in self._untrained_embedders_seen:
            self._untrained_embedders_seen.add(embedder)
            log.warning(
                "the cache verifier was trained on another embedder's vectors: no semantic hits "
                "for these until it is retrained on them (bench/train_cache_verifier.py)",
                verifier_embedder=self._verifier.embedder,
                vector_embedder=embedder,
            )

    def _learn_embedder(self, embedded: Embedding) -> tuple[int, str]:
        """The vector size and embedder this replica's lookups look among,
        from a vector just made: a Store's as a lookup's, so that a replica
        whose lookups end at the first stage (which embeds nothing) still
        moves to a new revision's sub-partition once its Stores see one."""
        self._dimensions = len(embedded.vector)
        self._embedder_name = embedded.embedder
        return self._dimensions, self._embedder_name

    def _embed_ahead(self, partition: keys.Partition, messages) -> None:
        """After an exact-only miss: starts embedding the prompt's question
        when the semantic lookup (expected next) would embed it, i.e. the
        first stage would not call it a miss at once."""
        resolved = conversation.resolve(messages)
        question = resolved[0]
        if not _matched_by_meaning(question):
            return
        index = None
        if self._embedder_name is not None:
            context_id = self._context_id(partition, messages, self._embedder_name, resolved)
            index = self._indexes.get(partition.vectors_key(context_id))
        if not self._embeds_at_once(index, question):
            # Unknown (an index not loaded here) or a likely first-stage
            # miss: the semantic lookup decides, as without this.
            return
        self._embedder.embed_ahead(question, tenant_id=partition.tenant_id)

    def _embeds_at_once(self, index: VectorIndex | None, question: str) -> bool:
        """Whether a semantic lookup of ``question`` embeds it at once, without
        the first stage: the vector size still unknown, or ``index`` (the
        sub-partition's, if loaded here) passes it (``_may_match``)."""
        return self._dimensions is None or (
            index is not None and index.loaded and self._may_match(index, question)
        )

    def _may_match(self, index: VectorIndex, question: str) -> bool:
        """The first stage: whether ``question`` is worth embedding to search
        ``index``."""
        return index.may_match(analyze(question).stems, self._settings.first_stage_word_share)

    async def close(self) -> None:
        """Cancels the embeddings and index loads under way, before the
        channel and the Redis client they use close."""
        await self._embedder.close()
        await self._loads.cancel_all()
        await self._row_checks.cancel_all()

    def _context_id(
        self, partition: keys.Partition, messages, embedder: str, resolved: tuple[str, bool] | None = None
    ) -> str:
        """The sub-partition a prompt's last question is matched in among
        the vectors of ``embedder`` (meshgate.embedding.embedder_name): all
        multi-turn questions (the question resolved with the topic turn it
        refers to), or the bare ones, among those with the same system
        messages and reply to the topic. ``resolved``:
        ``conversation.resolve(messages)``, where the caller has it (it
        normalizes a question of up to 256 KiB)."""
        _, in_context = conversation.resolve(messages) if resolved is None else resolved
        return keys.context_id(partition, embedder, in_context, conversation.matched_exactly(messages))

    async def _synced(
        self, partition: keys.Partition, context_id: str, dimensions: int
    ) -> tuple[VectorIndex, int] | None:
        """The sub-partition's index, of vectors of ``dimensions``, holding
        every entry stored before this call that its bounds keep, and the
        wrong hits reported there; None when no such index could be kept
        resident (a miss: the lookup is answered without it).

        A loaded index tops itself up with what is new since (usually one
        round trip). One that is not resident, or whose load failed midway,
        is loaded by one task per sub-partition, which the lookups arriving
        meanwhile share: each of them would otherwise read the whole
        partition again. A failed load is not kept; the next lookup starts
        another, from the rows applied so far.

        An index pushed out of the registry during its load or top-up
        (other partitions' loads over the bound on rows), or a shared load
        of vectors of another size (the embedding model changed), is
        followed by one fresh load. Only one: loads that together exceed
        the bound push each other out, and a lookup waiting on them in
        turn would never be answered.
        """
        index_key = partition.vectors_key(context_id)
        for _ in range(2):
            load = self._loads.flight(index_key)
            if load is None:
                index = self._indexes.get(index_key)
                if index is not None and index.loaded and index.dimensions == dimensions:
                    strictness = await self._top_up(index_key, index, partition, context_id)
                else:
                    # Every read of the load begins after this call. A caller
                    # that gives up leaves it to the others (meshgate/single_flight.py).
                    load = self._loads.start(
                        (index_key,), self._load(index_key, partition, context_id, dimensions)
                    )
                    index, strictness, _ = await self._wait_for_load(load, index_key, partition, context_id)
            else:
                index, strictness, alone = await self._wait_for_load(load, index_key, partition, context_id)
                if strictness is not None and index.dimensions == dimensions and not alone:
                    # The load's last read may have begun before this call.
                    strictness = await self._top_up(index_key, index, partition, context_id)
            if strictness is not None and index.dimensions == dimensions:
                return index, strictness
        return None

    async def _wait_for_load(
        self, load, index_key: str, partition: keys.Partition, context_id: str
    ) -> tuple[VectorIndex, int | None, bool]:
        """The load's outcome; or, once it has had no reply from Redis for
        STALLED_TOP_UP_S, this lookup's own read into the index the load
        fills, as a top-up's waiters do (_queue_for_top_up): a first load
        whose read hung on one stalled pooled connection, while Redis
        answered the others, held every lookup of the sub-partition until
        the Redis timeout (redis.timeout_s) ended it. The load itself goes on; the
        lookups arriving while it hangs each read for themselves. Last:
        whether this lookup read alone (a read begun after it asked)."""
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(self._loads.wait((load,)))
        try:
            while True:
                # Until the bound past the load's last reply (a load not yet
                # begun has had none: a whole bound from now).
                index = self._indexes.get(index_key)
                last_reply_at = loop.time() if index is None else index.top_ups.progress_at
                timeout = max(last_reply_at + STALLED_TOP_UP_S - loop.time(), 0.01)
                done, _ = await asyncio.wait((waiting,), timeout=timeout)
                if done:
                    ((index, strictness),) = waiting.result()
                    return index, strictness, False
                index = self._indexes.get(index_key)
                if index is not None and loop.time() - index.top_ups.progress_at >= STALLED_TOP_UP_S:
                    # Alone, as past a stalled top-up: its lock is the hung load's.
                    return index, await self._apply_new_rows(index_key, index, partition, context_id), True
        finally:
            waiting.cancel()

    async def _load(
        self, index_key: str, partition: keys.Partition, context_id: str, dimensions: int
    ) -> tuple[VectorIndex, int | None]:
        # Resident from the first batch on: a Store meanwhile adds its entry,
        # an eviction or report removes one, as in a loaded index.
        index = self._indexes.get_or_create(index_key, dimensions)
        strictness = await self._top_up(index_key, index, partition, context_id)
        if strictness is not None:
            index.loaded = True
        return index, strictness

    async def _top_up(
        self, index_key: str, index: VectorIndex, partition: keys.Partition, context_id: str
    ) -> int | None:
        """Applies the entries stored since ``index.synced_seq``, one round
        trip's batch at a time; returns the wrong hits reported in the
        sub-partition, or None when ``index`` was pushed out of the
        registry (or replaced) on the way: it stops there rather than grow
        a copy of the partition that no bound counts and no lookup finds.

        One top-up of an index at a time (a hung one is waited for
        STALLED_TOP_UP_S at most): concurrent lookups on an index
        behind Redis each read the whole backlog (a bug hunt: 32 lookups
        over 8,192 new rows, 226 round trips applying 198,656 rows, 2.3 s,
        where one top-up takes 9). A lookup that waited for a top-up begun
        after it asked takes that one's outcome, which holds every entry
        stored before it asked: under load one round trip serves the
        lookups that arrived while the last one ran.
        """
        top_ups = index.top_ups
        asked = top_ups.begun
        if not await self._queue_for_top_up(top_ups):
            return await self._apply_new_rows(index_key, index, partition, context_id)
        try:
            if top_ups.finished > asked:
                return top_ups.strictness
            top_ups.begun += 1
            number = top_ups.begun
            top_ups.progress_at = asyncio.get_running_loop().time()
            strictness = await self._apply_new_rows(index_key, index, partition, context_id, top_ups)
            if strictness is not None:
                top_ups.finished, top_ups.strictness = number, strictness
            return strictness
        finally:
            top_ups.lock.release()

    @staticmethod
    async def _queue_for_top_up(top_ups: TopUps) -> bool:
        """Takes ``top_ups.lock`` (True), or gives up waiting for it (False)
        once the top-up holding it has had no reply from Redis for
        STALLED_TOP_UP_S: its read hangs (one stalled connection, while
        Redis answers the others), and every lookup of the sub-partition
        would wait for it, up to their deadlines, until the holder's own
        deadline or socket timeout ended it. Reading alone is safe (each
        upsert is whole and never replaces a newer version), only not
        shared."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(STALLED_TOP_UP_S):
                    await top_ups.lock.acquire()
                return True
            except TimeoutError:
                if loop.time() - top_ups.progress_at >= STALLED_TOP_UP_S:
                    return False

    async def _apply_new_rows(
        self,
        index_key: str,
        index: VectorIndex,
        partition: keys.Partition,
        context_id: str,
        progress: TopUps | None = None,
    ) -> int | None:
        """_top_up's reading (noting each reply in ``progress``, the top-ups
        it holds the lock of). Between batches other requests run. Each
        upsert is whole, and an older version never replaces a newer one,
        so a Store meanwhile interleaves safely; the batches follow each
        other in the one ``index`` they were read for, so each one's rows
        are complete on top of the last."""
        strictness = 0
        listed = None
        dimensions = index.dimensions
        batches = self._store.batches_since(partition, context_id, index.synced_seq)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                if progress is not None:
                    progress.progress_at = asyncio.get_running_loop().time()
                # Checked after each read: other requests ran during it.
                if not self._indexes.holds(index_key, index):
                    return None
                now_ms = _now_ms()
                # A longer text (stored before MAX_SEMANTIC_TEXT_BYTES) is not kept
                # resident, nor decoded: its length alone says so.
                longest_payload = dimensions * 4 + MAX_SEMANTIC_TEXT_BYTES
                for row in batch.rows:
                    if row.expires_ms <= now_ms or len(row.payload) > longest_payload:
                        continue
                    stored = split_payload(row.payload, dimensions)
                    if stored is not None:
                        vector, question = stored
                        vector = np.frombuffer(vector, "<f4")
                        index.upsert(row.entry_id, row.seq, row.expires_ms, vector, question, now_ms=now_ms)
                index.mark_synced(batch.through_seq)
                # Never pushes out ``index`` itself.
                self._indexes.settle(index_key)
                strictness, listed = batch.strictness, batch.listed
                if progress is not None:
                    # Applying a batch is progress too (up to SYNC_BATCH rows).
                    progress.progress_at = asyncio.get_running_loop().time()
        if listed is not None and index.live_rows(_now_ms()) > listed:
            self._check_rows(index_key, index, partition, context_id, listed)
        return strictness

    def _check_rows(
        self, index_key: str, index: VectorIndex, partition: keys.Partition, context_id: str, listed: int
    ) -> None:
        """Starts ``_drop_rows_gone`` for ``index`` unless one runs for its
        key; forgets ``index`` at once when Redis lists nothing (another
        replica's Invalidate), where the walk would check every row, 1,024 a
        round trip (a thousand at 1M rows), to drop them all. The next
        lookup loads the sub-partition afresh: whatever was stored since."""
        if listed == 0:
            self._indexes.drop(index_key, index)
        elif self._row_checks.flight(index_key) is None:
            self._row_checks.start(
                (index_key,), self._drop_rows_gone(index_key, index, partition, context_id)
            )

    async def _drop_rows_gone(
        self, index_key: str, index: VectorIndex, partition: keys.Partition, context_id: str
    ) -> None:
        """Drops the rows of ``index`` whose version its sub-partition in
        Redis no longer lists. A top-up applies what was stored since, and
        this replica's own Stores, reports and Invalidates what they remove,
        but another replica's report or Invalidate (or a Store undone there)
        removes entries that no top-up reads: their rows stayed resident,
        counted in resident_entries and against cache.max_resident_rows,
        until they expired (a day), though never served (a hit's answer is
        read from Redis, and one found gone drops its row). A top-up that
        finds its index holding more live rows than Redis lists, where it
        lists some, starts this (_check_rows): SYNC_BATCH rows a round trip,
        off the lookups' path; a version stored meanwhile is kept (each removal names the
        version checked)."""
        entry_ids, seqs = index.versions()
        try:
            for start in range(0, len(entry_ids), SYNC_BATCH):
                checked = entry_ids[start : start + SYNC_BATCH]
                held = await self._store.versions_held(partition, context_id, checked)
                if not self._indexes.holds(index_key, index):
                    return
                for entry_id, seq, held_seq in zip(checked, seqs[start : start + SYNC_BATCH].tolist(), held):
                    if held_seq != seq:
                        index.remove(entry_id, seq)
                # Its postings shrank; its place among the indexes is its last lookup's.
                self._indexes.settle(index_key, used=False)
        except MeshgateError as error:
            # The next top-up that finds the index over Redis's count tries again.
            log.warning("cache's check of an index's rows against Redis failed", error=error.message)
