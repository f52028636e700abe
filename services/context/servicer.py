"""The ContextService RPCs: validation, token counting, and the glue between
the session store and the assembly policy."""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import contextlib
import dataclasses
import hashlib
import re
import time
import uuid

import grpc
import numpy as np
import structlog

from meshgate import metrics, paging, redis_access, request_ids, serving
from meshgate.common.v1 import common_pb2
from meshgate.config import ContextSettings, ModelSettings
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.embedding import (
    EMBED_TIMEOUT_S,
    Embedding,
    Embeddings,
    EmbedsText,
    VectorMemo,
    newest_embedder,
    older_embedder,
)
from meshgate.errors import MeshgateError, invalid_argument, not_found
from meshgate.reasons import Reason
from meshgate.tasks import cancel_and_wait
from services.context import assembly, relevance
from services.context import summaries as summaries_lib
from services.context.hot_cache import DELETED, HotCache
from services.context.store import (
    DEFAULT_LIST_PAGE_SIZE,
    MAX_LIST_PAGE_SIZE,
    NO_COUNTS,
    PIN_OVERHEAD_BYTES,
    RequestIdSend,
    SessionStore,
    StoredSession,
    SummarySpend,
    listing_cursor,
    listing_token,
    session_key,
)
from services.context.token_counts import PromptCounter
from services.context.turn_index import (
    IndexedTurns,
    TurnFeatures,
    TurnIndex,
    VectorGaps,
    features,
    leaves_gaps,
    term_counts,
)

log = structlog.get_logger(__name__)

# Bounds checked before any token counting, so a request cannot make the
# service tokenize without limit.
MAX_CONTENT_BYTES = 1024 * 1024
MAX_MESSAGES_PER_CALL = 1024
# A turn id is a key in the session's hash of applied appends; a take id
# (TakeSummaryUsage) is kept in its meta hash: as long.
MAX_TURN_ID_BYTES = 128
# What ClaimOwedSummaryUsage names at most, and for a max_sessions of 0.
MAX_CLAIMED_SESSIONS = 1000
DEFAULT_CLAIMED_SESSIONS = 100
# Question vectors kept from assembly for the append of the same user turn
# right after it (the router appends the question it assembled for), per
# tenant (a remembered text answers faster). With context.embedder =
# "local" nothing else remembers them (the inference service's memo does
# for "inference"); 1.5 KiB each.
QUESTION_MEMO_ENTRIES = 1024
# What an append keeps of its caller's deadline for the Redis write after
# its turns' embedding (one script call: milliseconds; generous for a
# loaded machine).
APPEND_WRITE_MARGIN_S = 0.25
# What an append's turns may take to embed on top of the embedder's default
# for one text (EMBED_TIMEOUT_S), per turn: ~7 ms a turn went through the
# inference service on a busy 2-core machine (an ad hoc timing of 1,024
# turns, ~7 s, not a kept bench), so 10 ms leaves room, while a router
# turn's append of two turns waits no longer than before (3.02 s) when the
# embedder stalls: its caller's answer is held until the append returns.
APPEND_EMBED_S_PER_TURN = 0.010

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# An API key's id, as the router writes it: the first 16 hex digits of its
# SHA-256 (config.hash_api_key), never the whole.
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_ROLES = frozenset((common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT))


_STRATEGIES = {"adaptive": pb.ASSEMBLY_STRATEGY_ADAPTIVE, "newest": pb.ASSEMBLY_STRATEGY_NEWEST}
_STRATEGY_NAMES = {value: name for name, value in _STRATEGIES.items()}


def tokens_by_disposition(
    manifest: pb.ContextManifest,
    turns: assembly.SessionCosts,
    chosen: assembly.Plan,
    summarized: list[summaries_lib.Summary],
) -> dict[str, int]:
    """The manifest's tokens per disposition, from the plan's arrays rather
    than from every entry: a session of thousands of turns is then a few
    array sums."""
    kept = np.asarray(chosen.reasons, dtype=np.int64) > 0
    # Packed turns cost their transcript lines (their frame is its own entry, among the others).
    packed_saving = (
        int(turns.tokens[chosen.packed].sum() - turns.lines[chosen.packed].sum()) if chosen.packed else 0
    )
    # A compacted span's summary may stand beside its system or pinned turns, kept too.
    summarized_tokens = sum(
        int(turns.tokens[s.first_turn : s.end_turn][~kept[s.first_turn : s.end_turn]].sum())
        for s in summarized
    )
    # After the session's turns (render lists them first): pinned facts, the
    # request's messages and summaries, all included.
    others = sum(e.tokens for e in manifest.entries[len(turns) :] if e.disposition == pb.DISPOSITION_INCLUDED)
    return {
        "included": int(turns.tokens[kept].sum()) - packed_saving + others,
        "summarized": summarized_tokens,
        "dropped": int(turns.tokens[~kept].sum()) - summarized_tokens,
    }


def _pin_of(request: pb.PinToSessionRequest | pb.UnpinFromSessionRequest) -> str:
    """The pin as the turn index stores it: ``t:<index>`` or ``f:<fact>``."""
    kind = request.WhichOneof("pin")
    if kind is None:
        raise invalid_argument(Reason.INVALID_PIN, "name a message_index or a fact")
    if kind == "message_index":
        if request.message_index < 0:
            # Positions count from 0 (the oldest); no negative one is a turn
            # of any session, so it is the request that is wrong (AIP-193),
            # not a turn this session lacks (PIN_TARGET_NOT_FOUND).
            raise invalid_argument(
                Reason.INVALID_PIN,
                f"message_index must not be negative (0 is the oldest turn), got {request.message_index}",
                field="message_index",
            )
        return f"t:{request.message_index}"
    fact = request.fact
    if not fact.strip() or len(fact) > MAX_FACT_BYTES or len(fact.encode()) > MAX_FACT_BYTES:
        raise invalid_argument(
            Reason.INVALID_PIN,
            f"a pinned fact must be 1 to {MAX_FACT_BYTES} bytes of text",
            limit=str(MAX_FACT_BYTES),
        )
    return "f:" + fact


def _pins_digest(pinned_turns: list[int], pinned_facts: list[str]) -> str:
    """AssemblyInputs.pins_sha256: each part length-prefixed, so no two
    lists of pins read as the same bytes."""
    digest = hashlib.sha256()
    for index in pinned_turns:
        digest.update(b"t" + int(index).to_bytes(8, "little", signed=True))
    for fact in pinned_facts:
        encoded = fact.encode()
        digest.update(b"f" + len(encoded).to_bytes(8, "little") + encoded)
    return digest.hexdigest()


def _record_assembly(strategy: str, started: float, tokens: dict[str, int]) -> None:
    assembly_metrics = metrics.context()
    assembly_metrics.assembly.labels(strategy).observe(time.perf_counter() - started)
    for name, count in tokens.items():
        if count:
            assembly_metrics.assembly_tokens.labels(name).inc(count)


# Event-loop turns a unary gRPC call through client interceptors takes to
# be sent: the calling task's, the interceptors' task's, the call's own.
_TURNS_TO_SEND = 3

# Sessions refused as full whose refusal started a compaction run, by the cap
# that refused them, with what they held then (_compacting_when_full); and
# for how long such a note stands. The servicer hears nothing of the run:
# one that failed (Redis away) or was dropped from the summarizer's waiting
# queue compacted nothing, and noted for good the session stayed full for
# good. Past this a refusal at the same amount asks again: a run that can
# free nothing reads the session once a minute while it is being refused,
# not once per refused turn.
_COMPACTIONS_ASKED_KEPT = 10_000
COMPACTION_ASKED_FOR_S = 60.0

# GetSession's answer beside its turns: ids, version, times (GetSession).
_SESSION_FIELDS_BYTES = 64 * 1024

# A pinned fact is a system message in every later prompt: kept short.
MAX_FACT_BYTES = 4096

# Prefetches in flight at most. Each reads a whole session, and
# PrefetchSession answers before it: without a bound, a burst of those calls
# held as many sessions in memory at once. A prefetch only warms the hot
# cache, so one past the bound is skipped (the next assembly reads what it
# needs either way), and one for a session already being prefetched makes
# that one read once more when done, if what it read is no longer current.
MAX_PREFETCHES = 64

# Turn-index repairs (_repair_index) in flight at most, and the most turns
# one indexes again: a lost write is one append's worth; a session stored
# before the index existed is indexed that many turns per repair, each
# asked for by a read that finds it not covered.
MAX_INDEX_REPAIRS = 4
INDEX_REPAIR_TURNS = 512
# Pauses between a repair's tries while Redis is unreachable; after the last
# one it waits for the next read of the session to ask again.
INDEX_REPAIR_DELAYS_S = (0.5, 2.0, 8.0)
# Sessions whose repair a read asked for, with the turns they held then, so
# that a session no repair can cover (a lost write of turns compacted since,
# a session stored before version history) is not read again by every
# assembly of it, only after it changes.
_INDEX_REPAIRS_ASKED_KEPT = 10_000

# Vector backfills (_backfill_vectors) in flight at most: one session at a
# time per replica, so that an upgrade of the embedding model re-embeds the
# sessions in use one after another, not all of them at once. Each embeds
# BACKFILL_CHUNK_TURNS turns per call to the embedder (and writes them in
# one script), at most BACKFILL_TURNS_PER_S a second: ~7 ms a turn went
# through the inference service on a busy 2-core machine (see
# APPEND_EMBED_S_PER_TURN), so a backfill takes at most a sixth of the
# embedder's time, which questions and appends share. It looks again at
# what is missing at most BACKFILL_PASSES times, when the session changed
# under it (an append moves its version); then the next read asks again.
MAX_VECTOR_BACKFILLS = 1
BACKFILL_CHUNK_TURNS = 64
BACKFILL_TURNS_PER_S = 24.0
BACKFILL_PASSES = 3
# Sessions whose backfill a read (or an append) asked for, with the turns
# they held then: a session whose turns the embedder gives no vectors is
# asked once per count and BACKFILL_ASKED_FOR_S, not embedded again by
# every assembly of it; after that a read asks again (the embedder may be
# back: a turn an append stored without a vector is then embedded, where
# a note for good left it so until the session's next append).
_BACKFILLS_ASKED_KEPT = 10_000
BACKFILL_ASKED_FOR_S = 30.0


class _AskedOnce:
    """Work asked for once per key and value (a session and what it held):
    a key asked again at the value it was noted with is not asked again
    for ``noted_for_s`` seconds. The oldest keys are forgotten past
    ``kept``."""

    def __init__(self, kept: int, noted_for_s: float = float("inf")) -> None:
        # key -> (value, time.monotonic() until which the note stands)
        self._asked: collections.OrderedDict[object, tuple[int, float]] = collections.OrderedDict()
        self._kept = kept
        self._noted_for_s = noted_for_s

    def first(self, key: object, value: int) -> bool:
        """Whether ``key`` is asked at ``value`` for the first time (or its
        note expired); notes it."""
        now = time.monotonic()
        noted_value, noted_until = self._asked.get(key, (None, now))
        if noted_value == value and now < noted_until:
            return False
        self._asked[key] = (value, now + self._noted_for_s)
        self._asked.move_to_end(key)
        if len(self._asked) > self._kept:
            self._asked.popitem(last=False)
        return True

    def forget(self, key: object) -> None:
        self._asked.pop(key, None)


class _SessionWork:
    """Background work on sessions (index repairs, vector backfills): one
    task a session at a time, at most ``limit`` at once, each asked once
    per session and count (_AskedOnce). One asked while its session's is
    running, or past the limit, is dropped unnoted: a later read asks
    again, as the session still says it is needed. A task that did not
    settle (failed, or left work) forgets its note, so the next read at
    that count asks again."""

    def __init__(self, name: str, limit: int, asked: _AskedOnce) -> None:
        self._name = name
        self._limit = limit
        self._asked = asked
        # Tasks in flight by session key.
        self.tasks: dict[str, asyncio.Task] = {}

    def start(
        self,
        key: str,
        turns_read: int | None,
        work: collections.abc.Callable[[], collections.abc.Awaitable[bool]],
    ) -> None:
        """Runs ``work`` (returning whether it settled) for the session at
        ``key``; ``turns_read`` None: not a read's request, never noted."""
        if key in self.tasks or len(self.tasks) >= self._limit:
            return
        if turns_read is not None and not self._asked.first(key, turns_read):
            return

        async def run() -> None:
            settled = False
            try:
                settled = await work()
            finally:
                self.tasks.pop(key, None)
                if not settled:
                    self._asked.forget(key)

        self.tasks[key] = asyncio.create_task(run(), name=f"{self._name} {key}")


@dataclasses.dataclass(frozen=True, slots=True)
class _SessionView:
    """A session as assembly plans from it."""

    version: int
    counts: np.ndarray
    roles: np.ndarray
    # Every turn's text when at hand (the session's own list, not copied);
    # None: read the chosen ones after planning.
    texts: list[common_pb2.Message] | None
    postings: dict[str, np.ndarray]
    term_counts: np.ndarray
    unit_vectors: np.ndarray | None
    pinned_turns: list[int]
    pinned_facts: list[str]
    # Leading turns compacted into summaries: never kept unless system or
    # pinned, and scored by nothing (postings and vectors cover the rest).
    compacted: int = 0
    # Every turn's tokens as a transcript line; None: not asked for (no packing).
    line_counts: np.ndarray | None = None
    # Meta's count of the bytes the turns hold (store.StoredSession.held_bytes).
    held_bytes: int | None = None
    # Which life of the session id this is (store.StoredSession.create_time_ms).
    create_time_ms: int = 0
    # What made unit_vectors (turn_index.IndexedTurns.embedder): a question
    # vector of another is not scored against them.
    embedder: str = ""
    # Whether some live turn may lack a vector (turn_index.IndexedTurns.vector_gaps).
    vector_gaps: bool = False


def _live_scores(
    query: str,
    terms: list[str],
    view: _SessionView,
    query_vector: np.ndarray | None,
    nameless: relevance.NamelessQuery | None,
    inputs: pb.AssemblyInputs,
) -> np.ndarray:
    """relevance.hybrid_scores over the live turns (BM25's statistics are
    theirs alone), zero for the compacted ones before them; ``inputs``
    gets the ranking's name and whether the vectors were part of it.
    ``query`` is the new user messages' text, ``terms`` its index terms."""
    compacted = view.compacted
    postings, term_counts = view.postings, view.term_counts
    if compacted:
        shift = np.uint32(compacted << relevance.TF_BITS)
        postings = {t: p[p >= shift] - shift for t, p in postings.items()}
        term_counts = term_counts[compacted:]
    roles = np.asarray(view.roles)[compacted:]
    found = relevance.hybrid_scores(
        terms,
        postings,
        term_counts,
        view.unit_vectors,
        query_vector,
        roles=roles,
        nameless=nameless,
        question=query,
    )
    # What the scoring used, not whether the question got a vector: turns
    # without vectors (embedded by none, or a rebuild the index does not
    # cover) are scored by words alone either way.
    inputs.dense_scored = found.dense
    inputs.ranking = found.ranking
    return np.concatenate([np.zeros(compacted), found.scores]) if compacted else found.scores


def _lacks_vectors(view: _SessionView, embedder: str) -> bool:
    """Whether the live turns of ``view`` lack vectors of ``embedder``: its
    rows are another's (or of none named), a write left some turn without
    one (the embedder gave it none at its append: the index counts such
    writes), or the first live one is all zero (an append of ``embedder``
    dropped another's rows, which start there, and which a backfill writes
    last). Asked at every assembly, so a count and one row are read, not
    every row (0.12 ms for 1,548 turns)."""
    if len(view.roles) <= view.compacted:
        return False
    if view.vector_gaps or view.embedder != embedder:
        return True
    if view.unit_vectors is None or not len(view.unit_vectors):
        return True
    return not view.unit_vectors[0].any()


def _postings_of(
    turns: list[common_pb2.Message], query_terms: list[str]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The query terms' postings and every turn's term count, from texts:
    for sessions whose index does not cover them."""
    wanted = set(query_terms)
    postings: dict[str, list[int]] = {}
    turn_features = features(turns)
    for index, turn in enumerate(turn_features):
        for term in wanted.intersection(turn.terms):
            postings.setdefault(term, []).append(relevance.pack_posting(index, turn.terms[term]))
    counts = term_counts(turn_features).astype(np.float64)
    return {t: np.array(p, dtype=np.uint32) for t, p in postings.items()}, counts


def _query_text(messages: collections.abc.Iterable[common_pb2.Message]) -> str:
    """What relevance is measured against: the new user messages' text."""
    return "\n".join(m.content for m in messages if m.role == common_pb2.ROLE_USER)


# A tenant id keys the hot sessions, change notices and summaries kept in
# memory (bounded by count): none the router sends is longer than 128
# characters (services/router/keys.py); the same room as the cache service's
# scopes (its MAX_SCOPE_NAME_CHARS).
MAX_TENANT_ID_CHARS = 512


def _check_tenant(tenant_id: str) -> None:
    if not tenant_id:
        raise invalid_argument(Reason.TENANT_REQUIRED, "tenant_id is required")
    if len(tenant_id) > MAX_TENANT_ID_CHARS:
        raise invalid_argument(
            Reason.SCOPE_TOO_LARGE, f"tenant_id must be at most {MAX_TENANT_ID_CHARS} characters"
        )


def _check_session_id(session_id: str, field: str = "session_id") -> None:
    """``field``: the request's field it came in, named in the refusal, as
    ForkSession takes two (its source's and new_session_id, whose bad id
    was reported as a bad session_id, the source's that was fine)."""
    if not _SESSION_ID.fullmatch(session_id):
        raise invalid_argument(
            Reason.INVALID_SESSION_ID,
            f"{field} must be 1 to 128 characters of [A-Za-z0-9_-]",
            field=field,
        )


def _check_request_id(value: str, field: str, reason: Reason) -> None:
    """A turn id or take id: at most MAX_TURN_ID_BYTES, no whitespace (the
    take that records a take id as "<take id> <usage>" for its retry to
    find would, with a space in ids, answer a retry of "t" with the record
    of "t x": its usage, or JSON that does not parse, INTERNAL; turn ids
    were recorded so by appends before, and keep the rule they were given)."""
    if len(value.encode()) > MAX_TURN_ID_BYTES:
        raise invalid_argument(reason, f"{field} is longer than {MAX_TURN_ID_BYTES} bytes")
    if any(character.isspace() for character in value):
        raise invalid_argument(reason, f"{field} must not contain whitespace")


def _summary_usage(spends: tuple[SummarySpend, ...]) -> list[pb.SummaryUsage]:
    return [pb.SummaryUsage(**spend._asdict()) for spend in spends]


def _drawn_from(label: bytes, request_id: str) -> str:
    """32 hex digits, as a fresh id, hashed from ``request_id`` under
    ``label``: so a session a client named by its request id's digits is
    not its session."""
    return hashlib.sha256(label + request_id.encode()).hexdigest()[:32]


def _drawn_session_id(request_id: str) -> str:
    """The id of the session that a CreateSession or a ForkSession under
    ``request_id`` makes: one id for both methods, so that every send under
    the request id, of either method, meets in one slot, where the one
    script making the session finds the request that made it there (meta's
    ``request_digest``, store.py) and answers a resend or refuses another
    request, atomically. Under the label that replicas of before drew a
    create's id with: a session such a replica created is the one a resend
    of its create here finds (and a fork of theirs: _fork_id_of_before)."""
    return _drawn_from(b"meshgate CreateSession request id\0", request_id)


def _fork_id_of_before(request_id: str) -> str:
    """The id that replicas of before, which drew each method's session
    apart, gave a ForkSession's fork under ``request_id``; the store looks
    for such a fork's record there (RequestIdSend)."""
    return _drawn_from(b"meshgate ForkSession request id\0", request_id)


def _new_session_id(request_id: str | None, named: str, field: str) -> str:
    """The id of the session a CreateSession or ForkSession makes: the one
    its caller named (``named``, its ``field``), else one drawn from its
    request id (_drawn_session_id), else a fresh one. A request id beside a
    named id is refused: its sends would not meet in one slot."""
    if request_id is None:
        return named or uuid.uuid4().hex
    if named:
        raise invalid_argument(
            Reason.INVALID_REQUEST_ID,
            f"request_id is for a session whose id the service draws: leave {field} empty "
            f"(a session named by {field} is made once already: a resend is ALREADY_EXISTS)",
        )
    return _drawn_session_id(request_id)


def _send_of(
    request: pb.CreateSessionRequest | pb.ForkSessionRequest, request_id: str | None
) -> RequestIdSend | None:
    """What the store needs to tell a resend of ``request`` under its
    (canonical) ``request_id`` from another request; None without one."""
    if request_id is None:
        return None
    return RequestIdSend(
        digest=request_ids.digest(request),
        is_create=isinstance(request, pb.CreateSessionRequest),
        fork_id_of_before=_fork_id_of_before(request_id),
    )


def _check_version(version: int, field: str) -> None:
    if version < 0:
        raise invalid_argument(Reason.INVALID_VERSION, f"{field} must not be negative", field=field)


def _check_reservation(reservation: pb.AppendReservation, session_id: str, at_version: int | None) -> None:
    """An append reservation is checked against the session as it is now,
    where the append will land: a stateless assembly or a rebuild at an
    older version has none to check it against."""
    if reservation.turn_count < 0 or reservation.size_bytes < 0:
        raise invalid_argument(
            Reason.INVALID_APPEND_RESERVATION,
            "append_reservation's turn_count and size_bytes must not be negative",
        )
    if not session_id:
        raise invalid_argument(
            Reason.INVALID_APPEND_RESERVATION,
            "append_reservation needs a session_id: without a session nothing is appended",
        )
    if at_version is not None:
        raise invalid_argument(
            Reason.INVALID_APPEND_RESERVATION,
            "append_reservation cannot come with at_version: a rebuild at a past version appends nothing",
        )
    if reservation.HasField("expected_version"):
        _check_version(reservation.expected_version, "append_reservation.expected_version")
    if reservation.hold_for_ms < 0:
        raise invalid_argument(
            Reason.INVALID_APPEND_RESERVATION, "append_reservation's hold_for_ms must not be negative"
        )
    # The append's turn id, as AppendTurns takes it.
    _check_request_id(reservation.hold_id, "append_reservation.hold_id", Reason.INVALID_TURN_ID)


def _check_messages(messages: list[common_pb2.Message], field: str) -> None:
    if len(messages) > MAX_MESSAGES_PER_CALL:
        raise invalid_argument(
            Reason.TOO_MANY_MESSAGES,
            f"{field} has {len(messages)} messages, more than {MAX_MESSAGES_PER_CALL}",
            limit=str(MAX_MESSAGES_PER_CALL),
        )
    for index, message in enumerate(messages):
        if message.role not in _ROLES:
            raise invalid_argument(
                Reason.INVALID_ROLE, f"{field}[{index}] has no valid role", index=str(index)
            )
        # A character is at least one UTF-8 byte: long text fails without encoding.
        content = message.content
        if len(content) > MAX_CONTENT_BYTES or len(content.encode()) > MAX_CONTENT_BYTES:
            raise invalid_argument(
                Reason.MESSAGE_TOO_LARGE,
                f"{field}[{index}] is larger than {MAX_CONTENT_BYTES} bytes",
                index=str(index),
                limit=str(MAX_CONTENT_BYTES),
            )


class ContextServicer(context_service_pb2_grpc.ContextServiceServicer):
    def __init__(
        self,
        store: SessionStore,
        models: dict[str, ModelSettings],
        counters: dict[str, PromptCounter],
        hot: HotCache | None = None,
        index: TurnIndex | None = None,
        embedder: EmbedsText | None = None,
        recency_floor_turns: int = 2,
        summarizer: summaries_lib.Summarizer | None = None,
        *,
        pack_older_turns: bool = True,
        embed_nameless_question: bool = False,
        append_embed_timeout_s: float = ContextSettings.append_embed_timeout_s,
    ) -> None:
        self._store = store
        # Without an index (unit tests), every strategy reads whole sessions.
        self._index = index
        # Without an embedder, relevance is lexical only.
        self._embedder = embedder
        # The most an append's turns may take to embed (context.append_embed_timeout_s).
        self._append_embed_timeout_s = append_embed_timeout_s
        self._question_vectors: VectorMemo[Embedding] = VectorMemo("question", QUESTION_MEMO_ENTRIES)
        # Whether the question's nameless form (relevance.nameless_text) is
        # embedded with it and joins its scoring (context.embed_nameless_question).
        self._embed_nameless_question = embed_nameless_question
        self._recency_floor_turns = recency_floor_turns
        self._pack_older_turns = pack_older_turns
        # Never live without a change listener, so always safe to consult.
        self._hot = hot if hot is not None else HotCache(0)
        # Prefetches in flight by session key, held so they are not collected mid-way.
        self._prefetches: dict[str, asyncio.Task] = {}
        # Sessions asked to be prefetched again while theirs was in flight.
        self._prefetch_again: set[str] = set()
        self._index_repairs = _SessionWork(
            "turn index repair", MAX_INDEX_REPAIRS, _AskedOnce(_INDEX_REPAIRS_ASKED_KEPT)
        )
        self._backfills = _SessionWork(
            "turn vector backfill",
            MAX_VECTOR_BACKFILLS,
            _AskedOnce(_BACKFILLS_ASKED_KEPT, BACKFILL_ASKED_FOR_S),
        )
        # Without one (unit tests), nothing is summarized.
        self._summarizer = summarizer
        self._compaction_asked = _AskedOnce(_COMPACTIONS_ASKED_KEPT, COMPACTION_ASKED_FOR_S)
        self.reconfigure_models(models, counters)

    def reconfigure_models(
        self, models: dict[str, ModelSettings], counters: dict[str, PromptCounter]
    ) -> None:
        """Model aliases and their counters (a reload's, token_counts.for_models),
        from the next call on. Three references swapped with no await between:
        a call takes an alias's settings and counter together when it starts
        (AssembleContext), so one under way finishes with what it took."""
        self._models = models
        self._counters = counters
        # Every turn is counted for every configured tokenizer and template
        # when appended, so assembly for any model finds its counts stored;
        # turns appended before a counter was configured are counted at their
        # first assembly with it (_complete_counts).
        self._distinct_counters = list({c.id: c for c in counters.values()}.values())

    @property
    def counters(self) -> dict[str, PromptCounter]:
        """The counter of each model alias in use."""
        return self._counters

    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.CreateSessionResponse:
        _check_tenant(request.tenant_id)
        request_id = request_ids.canonical(request.request_id)
        session_id = _new_session_id(request_id, request.session_id, "session_id")
        _check_session_id(session_id)
        now = await self._store.create(request.tenant_id, session_id, _send_of(request, request_id))
        session = pb.Session(
            session_id=session_id,
            tenant_id=request.tenant_id,
            version=0,
            create_time_ms=now,
            update_time_ms=now,
        )
        return pb.CreateSessionResponse(session=session)

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.GetSessionResponse:
        _check_tenant(request.tenant_id)
        _check_session_id(request.session_id)
        stored, pinned_turns, pinned_facts = await self._with_pins(request.tenant_id, request.session_id)
        session = pb.Session(
            session_id=request.session_id,
            tenant_id=request.tenant_id,
            version=stored.version,
            messages=stored.turns,
            create_time_ms=stored.create_time_ms,
            update_time_ms=stored.update_time_ms,
            compacted_turns=stored.compacted,
            pinned_turns=pinned_turns,
            pinned_facts=pinned_facts,
        )
        answer = pb.GetSessionResponse(session=session)
        # Within context.max_session_bytes it fits (config.py); past it (no
        # cap, or many tiny turns' framing) a clear refusal, where gRPC
        # would end the call RESOURCE_EXHAUSTED without ErrorInfo. Measured
        # only where meta's count leaves a doubt: ByteSize walks every turn
        # (~0.1 s for 24 MB, on the event loop); a turn's or a pin's framing
        # is at most 6 bytes beside its encoding, and the session's own
        # fields are small.
        pins_bytes = sum(map(len, map(str.encode, pinned_facts))) + 6 * (
            len(pinned_facts) + len(pinned_turns)
        )
        roomy = (
            stored.held_bytes is not None
            and stored.held_bytes + 6 * len(stored.turns) + pins_bytes + _SESSION_FIELDS_BYTES
            <= serving.MAX_MESSAGE_BYTES
        )
        if not roomy and (size := answer.ByteSize()) > serving.MAX_MESSAGE_BYTES:
            raise MeshgateError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                Reason.RESPONSE_TOO_LARGE,
                f"the session's {size} bytes are more than one answer may carry "
                f"({serving.MAX_MESSAGE_BYTES}): it cannot be read whole",
                {"bytes": str(size), "limit": str(serving.MAX_MESSAGE_BYTES)},
            )
        return answer

    async def DeleteSession(self, request: pb.DeleteSessionRequest, context) -> pb.DeleteSessionResponse:
        _check_tenant(request.tenant_id)
        _check_session_id(request.session_id)
        # Every key of the session (its pins, turn index and summaries
        # included) goes in this one script, so a failure after it leaves
        # nothing for a new session of this id to inherit; the content keys
        # of its summaries (other slots) go after it.
        await self._store.delete(request.tenant_id, request.session_id)
        self._changed_here(request.tenant_id, request.session_id, DELETED)
        if self._summarizer is not None:
            self._summarizer.forget(request.tenant_id, request.session_id)
        return pb.DeleteSessionResponse()

    async def ListSessions(self, request: pb.ListSessionsRequest, context) -> pb.ListSessionsResponse:
        _check_tenant(request.tenant_id)
        size = paging.page_size(request.page_size, DEFAULT_LIST_PAGE_SIZE, MAX_LIST_PAGE_SIZE)
        after = listing_cursor(request.tenant_id, request.page_token) if request.page_token else None
        page = await self._store.listing.page(request.tenant_id, size, after)
        return pb.ListSessionsResponse(
            sessions=[pb.SessionSummary(**listed._asdict()) for listed in page.sessions],
            next_page_token=listing_token(request.tenant_id, page.following) if page.following else "",
        )

    async def ReleaseAppendHold(
        self, request: pb.ReleaseAppendHoldRequest, context
    ) -> pb.ReleaseAppendHoldResponse:
        _check_tenant(request.tenant_id)
        _check_session_id(request.session_id)
        if not request.hold_id:
            raise invalid_argument(Reason.INVALID_TURN_ID, "hold_id must not be empty")
        _check_request_id(request.hold_id, "hold_id", Reason.INVALID_TURN_ID)
        await self._store.release_hold(request.tenant_id, request.session_id, request.hold_id)
        return pb.ReleaseAppendHoldResponse()

    async def AppendTurns(self, request: pb.AppendTurnsRequest, context) -> pb.AppendTurnsResponse:
        _check_tenant(request.tenant_id)
        _check_session_id(request.session_id)
        if request.expected_version < 0:
            raise invalid_argument(Reason.INVALID_VERSION, "expected_version must not be negative")
        _check_request_id(request.turn_id, "turn_id", Reason.INVALID_TURN_ID)
        if request.key_id and not _KEY_ID.fullmatch(request.key_id):
            raise invalid_argument(Reason.INVALID_KEY_ID, "key_id must be empty or 16 lower-case hex digits")
        if not request.messages:
            raise invalid_argument(Reason.EMPTY_MESSAGES, "messages must not be empty")
        turns = list(request.messages)
        _check_messages(turns, "messages")
        # The turns' embedding round trip overlaps the counting and the
        # Redis write; a replayed or refused append wastes it, which is rare.
        embedding = (
            asyncio.create_task(
                self._embed(
                    turns,
                    request.tenant_id,
                    append_embed_timeout(len(turns), context.time_remaining(), self._append_embed_timeout_s),
                )
            )
            if self._index is not None
            else None
        )
        try:
            # One set of counters for both counts, whatever a reload swaps in
            # between the awaits.
            counters = self._distinct_counters
            token_counts = {c.id: await c.count(turns) for c in counters}
            # Also as transcript lines, for adaptive assembly's packing (only
            # when it may pack: turned on later, assembly counts what is
            # missing once, _complete_counts).
            for c in counters:
                if self._pack_older_turns and c.transcript_tokens is not None:
                    token_counts[c.line_id] = await c.count_lines(turns)
            ticket = self._hot.ticket()
            with self._compacting_when_full(request.tenant_id, request.session_id):
                appended = await self._store.append(
                    request.tenant_id,
                    request.session_id,
                    None if request.any_version else request.expected_version,
                    turns,
                    token_counts,
                    turn_id=request.turn_id,
                    key_id=request.key_id,
                )
        except BaseException as error:
            if embedding is not None:
                embedding.cancel()
            if isinstance(error, MeshgateError) and error.reason == Reason.SESSION_NOT_FOUND:
                # Gone in Redis (expired, or deleted on a replica whose notice
                # has not come): a copy here would assemble the next turn, to
                # be generated and billed, then refused here again.
                self._changed_here(request.tenant_id, request.session_id, DELETED)
            raise
        version, replayed, created_ms = appended.version, appended.replayed, appended.create_time_ms
        held_bytes = appended.held_bytes
        log.debug("turns appended", session_id=request.session_id, version=version, replayed=replayed)
        if replayed and embedding is not None:
            # The first try may have stored the turns and then failed to
            # index them: indexed here unless they are already.
            await self._write_index(
                request.tenant_id,
                request.session_id,
                version,
                created_ms,
                features(turns),
                embedding,
                only_unwritten=True,
            )
        if not replayed:
            indexed = None
            if embedding is not None:
                turn_features = features(turns)
                written = await self._write_index(
                    request.tenant_id, request.session_id, version, created_ms, turn_features, embedding
                )
                if written is not None:
                    indexed = (*written, turn_features)
            self._warm(
                request.tenant_id,
                request.session_id,
                version,
                created_ms,
                turns,
                token_counts,
                held_bytes,
                ticket,
                indexed,
            )
            if self._summarizer is not None:
                self._summarizer.schedule(request.tenant_id, request.session_id)
        return pb.AppendTurnsResponse(version=version, replayed=replayed)

    async def _write_index(
        self,
        tenant_id: str,
        session_id: str,
        version: int,
        created_ms: int,
        turn_features: list[TurnFeatures],
        embedding: asyncio.Task,
        only_unwritten: bool = False,
    ) -> tuple[int, Embeddings | None] | None:
        """Indexes an append's stored turns (in the session created at
        ``created_ms``: never a later one of its id); returns where they landed and
        their vectors, or None when Redis failed meanwhile. The turns are
        stored by then, so the append is answered OK either way: answered
        UNAVAILABLE, a caller's retry without a turn id would store them
        twice. A lost write leaves positions reading unwritten (assembly
        reads the turns' texts meanwhile) and is retried in the background."""
        vectors = await embedding
        try:
            first = await self._index.write(
                tenant_id,
                session_id,
                version,
                turn_features,
                vectors,
                created_ms=created_ms,
                only_unwritten=only_unwritten,
            )
        except MeshgateError as error:
            if error.code != grpc.StatusCode.UNAVAILABLE:
                raise
            log.warning("turn index write failed; retrying in the background", session_id=session_id)
            self._repair_index(tenant_id, session_id)
            return None
        if first >= 0 and leaves_gaps(vectors):
            # Stored without some vectors (the embedder unavailable or late):
            # embedded again now, off the append's path, rather than found by
            # their words for the rest of the session. Of the rows' embedder:
            # the write made these vectors' theirs, or kept a newer
            # revision's rows (then none of these is written, and the count
            # of gap writes has the next read ask for them).
            self._backfill_vectors(tenant_id, session_id, first + len(turn_features), None)
        return first, vectors

    def _repair_index(self, tenant_id: str, session_id: str, turns_read: int | None = None) -> None:
        """Indexes again, in the background, the appends whose index write
        was lost (turn_index.unwritten_appends), as they are stored now.

        ``turns_read``: asked by a read that found the session's index not
        covering its turns, which held that many. That read may have come
        between an append's store and its index write (the turns' embedding
        runs until then, for up to context.append_embed_timeout_s): so the
        repair waits that long, and looks at those turns only, never at an
        append that began after the read. Asked once per count, as a
        session no repair can cover would otherwise be read again by every
        assembly of it. At most MAX_INDEX_REPAIRS at once, one per session."""

        async def repair() -> bool:
            if turns_read is not None:
                await asyncio.sleep(self._append_embed_timeout_s + APPEND_WRITE_MARGIN_S)
            pauses = iter(INDEX_REPAIR_DELAYS_S)
            while True:
                try:
                    return await self._index_again(tenant_id, session_id, turns_read)
                except MeshgateError as error:
                    pause_s = next(pauses, None)
                    if error.code != grpc.StatusCode.UNAVAILABLE or pause_s is None:
                        log.warning("turn index repair failed", session_id=session_id, reason=error.reason)
                        return False
                await asyncio.sleep(pause_s)

        self._index_repairs.start(session_key(tenant_id, session_id), turns_read, repair)

    async def _index_again(self, tenant_id: str, session_id: str, below: int | None) -> bool:
        """Writes the index of the appends unwritten_appends names; returns
        whether nothing is left that this repair could write (False: the
        session changed meanwhile, or INDEX_REPAIR_TURNS left some)."""
        version, created_ms, appends = await self._index.unwritten(
            tenant_id, session_id, INDEX_REPAIR_TURNS, below
        )
        for append in appends:
            indices = list(range(append.first, append.first + append.count))
            stored = await self._index.read_turns(tenant_id, session_id, indices, version, created_ms)
            if stored is None:
                return False  # reverted, compacted or deleted meanwhile
            turns = [stored[i] for i in indices]
            # As long as the append itself would have had (no caller's deadline here).
            timeout_s = append_embed_timeout(len(turns), None, self._append_embed_timeout_s)
            vectors = await self._embed(turns, tenant_id, timeout_s)
            first = await self._index.write(
                tenant_id,
                session_id,
                append.version,
                features(turns),
                vectors,
                created_ms=created_ms,
                only_unwritten=True,
            )
            if first < 0:
                return False
        if not appends:
            return True
        log.info("turn index repaired", session_id=session_id, appends=len(appends))
        await self._attach_index(tenant_id, session_id)
        # INDEX_REPAIR_TURNS may have left some: the next read asks again.
        return False

    def _backfill_vectors(
        self, tenant_id: str, session_id: str, turns_read: int, embedder: str | None
    ) -> None:
        """Gives the session's live turns vectors of ``embedder`` (None: of
        the rows' own), in the background, where they have none of it:
        after an upgrade of the embedding model (their rows are another
        revision's, or of none named: stored before the name was), after an
        append of the new revision dropped the old rows, or after the
        embedder gave some turn none at its append. Else they would rank by
        their words only for the rest of the session's life. Asked by an
        assembly that found them so in a session of ``turns_read`` turns,
        or by the append that left them so, once per count and
        BACKFILL_ASKED_FOR_S; at most MAX_VECTOR_BACKFILLS at once, one per
        session (one asked meanwhile is not noted as asked: a later read
        asks again, as the index still says)."""

        async def backfill() -> bool:
            try:
                return await self._embed_again(tenant_id, session_id, embedder)
            except MeshgateError as error:
                # Gone (nothing to do) or unreachable (the next read asks again).
                log.info("turn vector backfill stopped", session_id=session_id, reason=error.reason)
                return False

        self._backfills.start(session_key(tenant_id, session_id), turns_read, backfill)

    async def _embed_again(self, tenant_id: str, session_id: str, embedder: str | None) -> bool:
        """Embeds the turns TurnIndex.vector_gaps names and stores their rows
        (TurnIndex.backfill: never over a vector of the same embedder, nor
        in a session deleted, reverted or compacted meanwhile), a chunk at
        a time at BACKFILL_TURNS_PER_S, and once every one has a vector,
        marks the index's count of gap writes settled (TurnIndex.settle); returns
        whether it is settled: no gap left, or the embedder gave none or
        not all (False: the session changed under it, a newer revision
        answered, or an older one's answers left gaps, its chunks only: the
        rest are written). ``embedder`` None: the rows' own, or with none
        named, the newest that answers."""
        loop = asyncio.get_running_loop()
        for _ in range(BACKFILL_PASSES):
            gaps = await self._index.vector_gaps(tenant_id, session_id, embedder)
            wanted = embedder or gaps.embedder
            if not gaps.positions:
                return await self._settle_gaps(tenant_id, session_id, gaps)
            changed = False
            # The last chunk first, and the first gap's row (after an
            # upgrade, the first live turn's, by which assemblies tell the
            # session lacks vectors: _lacks_vectors) only once every other
            # gap has one: a backfill stopped midway (the embedder
            # unavailable, a restart, the session changed under it) leaves
            # that row zero, so a later read asks again. Written first, it
            # hid the rest for good. (Gaps an append left are told by the
            # index's count, which only a complete pass clears.)
            complete = True
            left_to_another_revision = False
            for start in reversed(range(0, len(gaps.positions), BACKFILL_CHUNK_TURNS)):
                began = loop.time()
                positions = gaps.positions[start : start + BACKFILL_CHUNK_TURNS]
                stored = await self._index.read_turns(
                    tenant_id, session_id, positions, gaps.version, gaps.create_time_ms
                )
                if stored is None:
                    changed = True
                    break
                timeout_s = append_embed_timeout(len(positions), None, self._append_embed_timeout_s)
                embedded = await self._embedder.embed_each_or_none(
                    [stored[i].content for i in positions], timeout_s
                )
                made = [v for v in embedded if v is not None]
                if not made:
                    return True  # the embedder gives none now: asked again later (BACKFILL_ASKED_FOR_S)
                wanted = wanted or newest_embedder(v.embedder for v in made)
                # Servers of two revisions side by side (an upgrade under
                # way) answer a chunk each: an older revision's vectors are
                # left gaps, for the next read to ask for again, and the
                # chunks of ``wanted`` written. Giving the pass up at the
                # first older chunk left the chunks after it to later reads
                # (40 turns in chunks of 4, the two answering in turn: 10-11
                # reads until every turn had a vector, 5 now).
                older = any(older_embedder(v.embedder, wanted) for v in made)
                upgraded = any(v.embedder != wanted and not older_embedder(v.embedder, wanted) for v in made)
                embedded = [v if v is not None and v.embedder == wanted else None for v in embedded]
                left_to_another_revision = left_to_another_revision or older
                if start == 0 and not (complete and all(v is not None for v in embedded[1:])):
                    embedded[0] = None
                complete = complete and all(v is not None for v in embedded)
                if kept := [v for v in embedded if v is not None]:
                    none = np.zeros_like(kept[0].vector)
                    rows = np.stack([none if v is None else v.vector for v in embedded])
                    written = await self._index.backfill(
                        tenant_id, session_id, gaps, positions, Embeddings(rows, wanted)
                    )
                    if written < 0:
                        changed = True
                        break
                    if written:
                        metrics.context().turns_reembedded.inc(written)
                        # The hot copy holds the rows as they were (the script's
                        # notice tells the other replicas the same).
                        self._changed_here(tenant_id, session_id, DELETED)
                if upgraded:
                    return False  # upgraded again meanwhile: the next question names the newer one
                await asyncio.sleep(max(0.0, len(positions) / BACKFILL_TURNS_PER_S - (loop.time() - began)))
            if not changed:
                log.info("turn vectors backfilled", session_id=session_id, turns=len(gaps.positions))
                if complete:
                    return await self._settle_gaps(tenant_id, session_id, gaps)
                # The gaps left are asked for again later: at the next read
                # where an older revision's answers left them (the newer
                # serves), else after BACKFILL_ASKED_FOR_S (the embedder gave none).
                return not left_to_another_revision
        return False

    async def _settle_gaps(self, tenant_id: str, session_id: str, gaps: VectorGaps) -> bool:
        """Clears the index's count of gap writes now that the turns
        ``gaps`` named have vectors; returns False when a write left
        another gap meanwhile (or the session is another life), for a later
        read to ask again."""
        settled = await self._index.settle(tenant_id, session_id, gaps)
        if settled > 0:
            # The hot copy holds the count (the script's notice tells the other replicas).
            self._changed_here(tenant_id, session_id, DELETED)
        return settled >= 0

    @contextlib.contextmanager
    def _compacting_when_full(self, tenant_id: str, session_id: str):
        """A session refused as full gets a summarizer run, which compacts
        what its soft caps allow. Runs are otherwise started only by appends
        that succeed, so a full session whose run after its last append never
        came to compact it took no append and stayed full for good: one
        stored under a larger cap (context.max_session_bytes went from 64 to
        24 MiB), or one whose run a restart of the service cut short (at its
        cap, not past it). Once per amount held: a run reads the whole
        session, and one that could free nothing (the hot window fills the
        cap) must not be repeated for every refused turn. Noted per cap:
        requests refused on turns and on bytes in turn would otherwise replace
        each other's note and each ask again; and for COMPACTION_ASKED_FOR_S,
        as a run asked for may fail or be dropped unheard."""
        try:
            yield
        except MeshgateError as error:
            if error.reason == Reason.SESSION_FULL and self._summarizer is not None:
                unit = error.metadata.get("unit", "")
                held = int(error.metadata.get(unit, "0"))
                if self._compaction_asked.first((tenant_id, session_id, unit), held):
                    self._summarizer.schedule(tenant_id, session_id)
            raise

    async def ForkSession(self, request: pb.ForkSessionRequest, context) -> pb.ForkSessionResponse:
        _check_tenant(request.tenant_id)
        _check_session_id(request.session_id)
        request_id = request_ids.canonical(request.request_id)
        new_session_id = _new_session_id(request_id, request.new_session_id, "new_session_id")
        _check_session_id(new_session_id, "new_session_id")
        _check_version(request.version, "version")
        # Not always new_session_id: a resend of a fork a replica of before
        # made is answered with that fork, under the id it drew.
        new_session_id, now = await self._store.fork(
            request.tenant_id,
            request.session_id,
            request.version,
            new_session_id,
            _send_of(request, request_id),
        )
        if self._summarizer is not None:
            # Runs are otherwise started by appends: a fork left alone had
            # no summary of its old turns (the source's are the source's),
            # and its prompts left them out with nothing in their place.
            # The run reuses the source's texts (the same turns at the same
            # place), so this costs no model call.
            self._summarizer.schedule(request.tenant_id, new_session_id)
        session = pb.Session(
            session_id=new_session_id,
            tenant_id=request.tenant_id,
            version=request.version,
            create_time_ms=now,
            update_time_ms=now,
        )
        return pb.ForkSessionResponse(session=session)

    async def RevertSession(self, request: pb.RevertSessionRequest, context) -> pb.RevertSessionResponse:
        _check_tenant(request.tenant_id)
        _check_session_id(request.session_id)
        _check_version(request.version, "version")
        _check_version(request.expected_version, "expected_version")
        version = await self._store.revert(
            request.tenant_id,
            request.session_id,
            request.version,
            None if request.any_version else request.expected_version,
        )
        self._changed_here(request.tenant_id, request.session_id, version)
        if self._summarizer is not None:
            # As after an append: the summarizer's view of the session (its
            # summaries and history in memory) follows its new version.
            self._summarizer.schedule(request.tenant_id, request.session_id)
        return pb.RevertSessionResponse(version=version)

    def _changed_here(self, tenant_id: str, session_id: str, version: int) -> None:
        """What this replica's own write changed, told to its hot cache at
        once: the notice through Redis may come after this caller's next read
        (on a Redis Cluster it crosses the cluster bus from another node)."""
        self._hot.announce(session_key(tenant_id, session_id), version)

    async def AssembleContext(
        self, request: pb.AssembleContextRequest, context
    ) -> pb.AssembleContextResponse:
        started = time.perf_counter()
        _check_tenant(request.tenant_id)
        if request.session_id:
            _check_session_id(request.session_id)
        model = self._models.get(request.model)
        if model is None:
            raise not_found(Reason.MODEL_NOT_FOUND, f"no model {request.model!r}", model=request.model)
        # Taken with its settings: a reload (reconfigure_models) between the
        # awaits below must not leave this call a model without a counter.
        counter = self._counters[request.model]
        if request.max_prompt_tokens <= 0:
            raise invalid_argument(Reason.INVALID_TOKEN_BUDGET, "max_prompt_tokens must be positive")
        new_messages = list(request.new_messages)
        if not new_messages and not request.session_id:
            raise invalid_argument(Reason.EMPTY_MESSAGES, "nothing to assemble: no session, no messages")
        _check_messages(new_messages, "new_messages")
        at_version = request.at_version if request.HasField("at_version") else None
        if at_version is not None:
            _check_version(at_version, "at_version")
            if not request.session_id and at_version != 0:
                # A stateless assembly is at version 0, the one its inputs
                # name (a rebuild from them sends at_version 0). Any other
                # asks for turns there are none of; ignored, the answer was
                # the new messages alone, as if that version had been read.
                raise invalid_argument(
                    Reason.INVALID_VERSION,
                    f"at_version {at_version} without a session_id: an assembly without a session"
                    " is at version 0",
                    field="at_version",
                )
        if request.HasField("append_reservation"):
            _check_reservation(request.append_reservation, request.session_id, at_version)
        strategy = self._strategy(request, model)
        # The question's embedding is the longest wait of an assembly: it is
        # asked for first, and everything that does not need it (counting
        # the new messages, reading the session, the pinned items' counts)
        # is done while it is on its way.
        query_vector = self._embed_query(request, new_messages, strategy)
        try:
            if query_vector is not None:
                # A hot session's work below never waits, so the embedding's
                # request would only leave at the first await after it: the
                # client interceptors and the call take a few turns of the
                # loop to put it on the wire (otherwise the 0.2-0.3 ms of work
                # below came first: an ad hoc probe, bench/README.md, "Assembly
                # latency over gRPC: where a call's time goes").
                for _ in range(_TURNS_TO_SEND):
                    await asyncio.sleep(0)
            return await self._assemble(
                request, started, model, counter, new_messages, at_version, strategy, query_vector
            )
        finally:
            if query_vector is not None and not query_vector.done():
                query_vector.cancel()
            elif query_vector is not None and not query_vector.cancelled():
                # A failed assembly never awaited it: an embedding that
                # raised is retrieved here, not logged as never retrieved.
                query_vector.exception()

    def _embed_query(
        self, request: pb.AssembleContextRequest, new_messages: list[common_pb2.Message], strategy: int
    ) -> asyncio.Task | None:
        """The new user messages' embedding, started, when adaptive
        assembly of a session will score turns by it."""
        adaptive = strategy == pb.ASSEMBLY_STRATEGY_ADAPTIVE
        if not (request.session_id and adaptive and self._embedder is not None):
            return None
        query = _query_text(new_messages)
        if not query:
            return None
        return asyncio.create_task(self._query_vectors(query, request.tenant_id))

    async def _query_vectors(
        self, query: str, tenant_id: str
    ) -> tuple[Embedding | None, relevance.NamelessQuery | None]:
        """The query's vector and, when asked for (context.embed_nameless_question)
        and it has names to leave out, its nameless form with its vector
        (relevance.nameless_text), in one Embed call: whether the names are
        unknown to the session is only known once it is read, after the
        call has left."""
        nameless = relevance.nameless_text(query) if self._embed_nameless_question else None
        if nameless is None:
            vector = await self._embedder.embed_or_none(query)
        else:
            embedded = await self._embedder.embed_all_or_none([query, nameless.text])
            if embedded is None:
                return None, None
            vector = Embedding(embedded.rows[0], embedded.embedder)
            nameless = dataclasses.replace(nameless, vector=embedded.rows[1])
        if vector is not None:
            self._question_vectors.put(self._question_vectors.key(query, tenant_id), vector)
        return vector, nameless

    async def _assemble(
        self,
        request: pb.AssembleContextRequest,
        started: float,
        model: ModelSettings,
        counter: PromptCounter,
        new_messages: list[common_pb2.Message],
        at_version: int | None,
        strategy: int,
        query_vector: asyncio.Task | None,
    ) -> pb.AssembleContextResponse:
        budget = min(request.max_prompt_tokens, model.context_window_tokens)
        # Whatever else the prompt keeps, it has the template's own tokens
        # and the new messages: past the budget with those, it is refused
        # without counting the rest (each message up to 256 KiB).
        fixed = counter.template_tokens.prompt_prefix + counter.template_tokens.generation_prompt
        new_counts = await counter.count_until(new_messages, budget - fixed)
        if len(new_counts) < len(new_messages):
            raise assembly.window_exceeded(fixed + sum(new_counts), budget, counted_all=False)
        new = [assembly.Candidate(m, n) for m, n in zip(new_messages, new_counts, strict=True)]
        packs = self._packs(strategy, counter)
        if request.session_id:
            response, view, turns, chosen = await self._assemble_session(
                request, new, budget, counter, at_version, strategy, packs, query_vector
            )
            version = view.version
        else:
            required = [assembly.TurnCost(c.message.role, c.tokens) for c in new]
            turns = assembly.SessionCosts.of([])
            chosen = assembly.plan(turns, required, budget, counter.template_tokens)
            response, view, version = assembly.render(chosen, turns, {}, new), None, 0
        summarized: list[summaries_lib.Summary] = []
        if self._summarizer is not None and view is not None:
            summarized = await self._add_summaries(request, response, chosen, view, budget, counter)
        response.manifest.tokenizer = counter.spec
        response.session_version = version
        inputs = response.inputs
        inputs.tenant_id = request.tenant_id
        inputs.session_id = request.session_id
        inputs.session_version = version
        inputs.model = request.model
        inputs.max_prompt_tokens = request.max_prompt_tokens
        inputs.tokenizer = counter.spec
        inputs.context_window_tokens = model.context_window_tokens
        inputs.counter_id = counter.id
        inputs.strategy = _STRATEGY_NAMES[strategy]
        inputs.packs_older_turns = packs
        digest = hashlib.sha256()
        for message in new_messages:
            serialized = message.SerializeToString(deterministic=True)
            digest.update(len(serialized).to_bytes(8, "little") + serialized)
        inputs.new_messages_sha256 = digest.hexdigest()
        if view is not None and (view.pinned_turns or view.pinned_facts):
            inputs.pins_sha256 = _pins_digest(view.pinned_turns, view.pinned_facts)
        if view is not None:
            inputs.compacted_turns = view.compacted
            inputs.session_create_time_ms = view.create_time_ms
        response.assembly_id = hashlib.sha256(inputs.SerializeToString(deterministic=True)).hexdigest()
        tokens = tokens_by_disposition(response.manifest, turns, chosen, summarized)
        _record_assembly(inputs.strategy, started, tokens)
        return response

    async def PinToSession(self, request: pb.PinToSessionRequest, context) -> pb.PinToSessionResponse:
        index, pin = self._pin_request(request)
        message_index = request.message_index if request.WhichOneof("pin") == "message_index" else None
        expected_version = None
        if request.HasField("expected_version"):
            expected_version = request.expected_version
            _check_version(expected_version, "expected_version")
        size = len(pin.encode()) + PIN_OVERHEAD_BYTES
        try:
            await self._store.holdings.fits(request.tenant_id, request.session_id, size)
        except MeshgateError as refusal:
            # A pin the session holds already adds nothing: answered as the
            # pin script answers it, whatever the tenant's room (a resend
            # after a lost reply, which the router makes itself, as for an
            # append under its turn id: SessionStore.append).
            if refusal.reason != Reason.SESSION_QUOTA_EXCEEDED:
                raise
            held = await index.pin(
                request.tenant_id, request.session_id, pin, message_index, expected_version, held_only=True
            )
            if held is None:
                raise
            return pb.PinToSessionResponse(pin_count=held)
        pin_count = await index.pin(
            request.tenant_id, request.session_id, pin, message_index, expected_version
        )
        await self._store.recount(request.tenant_id, request.session_id)
        # Pins are part of what the hot entry holds: drop it, as the notice does.
        self._changed_here(request.tenant_id, request.session_id, DELETED)
        return pb.PinToSessionResponse(pin_count=pin_count)

    async def UnpinFromSession(
        self, request: pb.UnpinFromSessionRequest, context
    ) -> pb.UnpinFromSessionResponse:
        index, pin = self._pin_request(request)
        pin_count = await index.unpin(request.tenant_id, request.session_id, pin)
        # The pin's bytes are the tenant's again (and a compacted turn's it kept).
        await self._store.recount(request.tenant_id, request.session_id)
        self._changed_here(request.tenant_id, request.session_id, DELETED)
        return pb.UnpinFromSessionResponse(pin_count=pin_count)

    def _pin_request(
        self, request: pb.PinToSessionRequest | pb.UnpinFromSessionRequest
    ) -> tuple[TurnIndex, str]:
        """The turn index pins live in, and the pin as it stores it; raises
        for a request or a service that cannot pin."""
        _check_tenant(request.tenant_id)
        _check_session_id(request.session_id)
        if self._index is None:
            raise MeshgateError(
                grpc.StatusCode.UNIMPLEMENTED, Reason.PIN_UNAVAILABLE, "this service keeps no turn index"
            )
        return self._index, _pin_of(request)

    async def PrefetchSession(
        self, request: pb.PrefetchSessionRequest, context
    ) -> pb.PrefetchSessionResponse:
        _check_tenant(request.tenant_id)
        _check_session_id(request.session_id)
        hot = self._hot.get(session_key(request.tenant_id, request.session_id))
        already_hot = hot is not None and (
            self._index is None or (hot.index is not None and hot.index.version == hot.version)
        )
        if not already_hot:
            # In the background: the caller (a stream being opened) waits for nothing.
            self.prefetch(request.tenant_id, request.session_id)
        return pb.PrefetchSessionResponse(already_hot=already_hot)

    async def TakeSummaryUsage(
        self, request: pb.TakeSummaryUsageRequest, context
    ) -> pb.TakeSummaryUsageResponse:
        _check_tenant(request.tenant_id)
        _check_session_id(request.session_id)
        _check_request_id(request.take_id, "take_id", Reason.INVALID_TAKE_ID)
        if not request.hold_until_acknowledged:
            taken = await self._store.take_unbilled(request.tenant_id, request.session_id, request.take_id)
            return pb.TakeSummaryUsageResponse(summary_usage=_summary_usage(taken), take_id=request.take_id)
        if not request.take_id:
            # Its acknowledgement names it.
            raise invalid_argument(Reason.INVALID_TAKE_ID, "a take held until acknowledged needs a take_id")
        take_id, taken = await self._store.take_held(request.tenant_id, request.session_id, request.take_id)
        return pb.TakeSummaryUsageResponse(summary_usage=_summary_usage(taken), take_id=take_id)

    async def AcknowledgeSummaryUsage(
        self, request: pb.AcknowledgeSummaryUsageRequest, context
    ) -> pb.AcknowledgeSummaryUsageResponse:
        _check_tenant(request.tenant_id)
        _check_session_id(request.session_id)
        _check_request_id(request.take_id, "take_id", Reason.INVALID_TAKE_ID)
        await self._store.acknowledge_take(request.tenant_id, request.session_id, request.take_id)
        return pb.AcknowledgeSummaryUsageResponse()

    async def ClaimOwedSummaryUsage(
        self, request: pb.ClaimOwedSummaryUsageRequest, context
    ) -> pb.ClaimOwedSummaryUsageResponse:
        most = min(request.max_sessions or DEFAULT_CLAIMED_SESSIONS, MAX_CLAIMED_SESSIONS)
        owed = await self._store.owed.claim(request.owed_for_ms, most)
        return pb.ClaimOwedSummaryUsageResponse(
            sessions=[pb.OwedSummaryUsage(**session._asdict()) for session in owed]
        )

    def _strategy(self, request: pb.AssembleContextRequest, model: ModelSettings) -> int:
        if request.strategy == pb.ASSEMBLY_STRATEGY_UNSPECIFIED:
            return _STRATEGIES[model.assembly_strategy]
        if request.strategy not in _STRATEGY_NAMES:
            raise invalid_argument(
                Reason.UNKNOWN_STRATEGY,
                f"unknown assembly strategy {request.strategy}",
                strategy=str(request.strategy),
            )
        return request.strategy

    def _packs(self, strategy: int, counter: PromptCounter) -> bool:
        """Whether assembly may pack older turns into a transcript message."""
        return (
            strategy == pb.ASSEMBLY_STRATEGY_ADAPTIVE
            and self._pack_older_turns
            and counter.transcript_tokens is not None
        )

    async def _embed(
        self, messages: list[common_pb2.Message], tenant_id: str, timeout_s: float | None = None
    ) -> Embeddings | None:
        """One vector per message (a question's from assembly, remembered),
        all of one embedder, or None when the embedder gives none: the turns
        are then found by their words only, until a backfill embeds them. A message the embedder gave no
        vector (the local one fails, refuses or times out text by text), or
        one of another embedder than the newest (newest_embedder: a question
        remembered from before an upgrade, a call answered by an older
        revision's server beside the newer's), gets a zero row, as the index
        reads a turn stored without one, rather than costing the others
        theirs. Not the last text's embedder: an older one's vectors the
        turn index of the newer refuses whole (turn_index._WRITE), and the
        newer's vectors were all thrown away. ``timeout_s`` bounds the
        whole call (None: the embedder's own, EMBED_TIMEOUT_S)."""
        if self._embedder is None:
            return None
        texts = [m.content for m in messages]
        # Only user texts are remembered (assembly's questions): an assistant
        # turn, up to 1 MB, is not hashed for a lookup that cannot hit.
        known = [
            self._question_vectors.get(self._question_vectors.key(m.content, tenant_id))
            if m.role == common_pb2.ROLE_USER
            else None
            for m in messages
        ]
        missing = [t for t, vector in zip(texts, known, strict=True) if vector is None]
        # Among embedders not known older, the answer now before a remembered one.
        came = [vector.embedder for vector in known if vector is not None]
        if missing:
            fetched = await self._embedder.embed_each_or_none(missing, timeout_s)
            came += [vector.embedder for vector in fetched if vector is not None]
            remaining = iter(fetched)
            known = [vector if vector is not None else next(remaining) for vector in known]
        newest = newest_embedder(came)
        if newest is None:
            return None
        none = np.zeros_like(next(v.vector for v in known if v is not None and v.embedder == newest))
        rows = [none if v is None or v.embedder != newest else v.vector for v in known]
        return Embeddings(np.stack(rows), newest)

    async def _assemble_session(
        self,
        request: pb.AssembleContextRequest,
        new: list[assembly.Candidate],
        budget: int,
        counter: PromptCounter,
        at_version: int | None,
        strategy: int,
        packs: bool,
        query_vector: asyncio.Task | None,
    ) -> tuple[pb.AssembleContextResponse, _SessionView, assembly.SessionCosts, assembly.Plan]:
        """Plans from the turns' index (roles, counts, vectors, the query's
        postings) and reads only the chosen turns' texts; a session whose
        index is incomplete (stored before it, a write lost, or an older version
        asked for) is read whole and scored from its texts. ``query_vector``
        is the new messages' embedding on its way (_embed_query), awaited
        only once nothing else is left before scoring; ``packs``, whether it
        may pack older turns (_packs, decided once per assembly, as its
        inputs name it). Adaptive assembly names its ranking in the
        response's inputs (_live_scores)."""
        tenant_id, session_id = request.tenant_id, request.session_id
        adaptive = strategy == pb.ASSEMBLY_STRATEGY_ADAPTIVE
        query = _query_text(c.message for c in new)
        terms = list(relevance.index_terms(query)) if adaptive else []
        view = await self._session_view(request, terms, counter, at_version, packs)
        if request.HasField("append_reservation"):
            # Before any scoring or reading of texts: a turn its session
            # cannot store, or its tenant's bound as this replica last found
            # it, is refused before its caller generates for it.
            reservation = request.append_reservation
            live_turns = len(view.roles) - view.compacted
            with self._compacting_when_full(tenant_id, session_id):
                self._store.check_room(
                    tenant_id,
                    session_id,
                    live_turns,
                    view.held_bytes,
                    reservation.turn_count,
                    reservation.size_bytes,
                    version=view.version,
                    expected_version=(
                        reservation.expected_version if reservation.HasField("expected_version") else None
                    ),
                )
        pinned_facts = [common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=f) for f in view.pinned_facts]
        facts = [
            assembly.Candidate(m, n)
            for m, n in zip(pinned_facts, await counter.count(pinned_facts), strict=True)
        ]
        costs = assembly.SessionCosts(view.roles, view.counts, view.line_counts)
        required = [assembly.TurnCost(c.message.role, c.tokens) for c in (*facts, *new)]
        embedded, nameless = await query_vector if query_vector is not None else (None, None)
        vector = None
        if embedded is not None and embedded.embedder == view.embedder:
            vector = embedded.vector
        # Else the turns' vectors are another embedder's (another revision,
        # or none named: stored before they were), whose cosines with this
        # one mean nothing: the turns are ranked as turns without vectors,
        # until the backfill gives them this embedder's. Not an older
        # revision's than the rows' (servers of both side by side): the
        # index follows the newer, and went back and forth, every live turn
        # embedded again at each change; only the rows' own gaps are filled.
        if embedded is not None and at_version is None:
            wanted = newest_embedder([view.embedder, embedded.embedder])
            if _lacks_vectors(view, wanted):
                self._backfill_vectors(tenant_id, session_id, len(view.roles), wanted)
        scoring = pb.AssemblyInputs()  # the ranking's name, dense_scored and the floor, for the response
        scores = _live_scores(query, terms, view, vector, nameless, scoring) if adaptive else None
        if adaptive:
            scoring.recency_floor_turns = self._recency_floor_turns
        chosen = assembly.plan(
            costs,
            required,
            budget,
            counter.template_tokens,
            pinned_turns=view.pinned_turns,
            relevance=scores,
            recency_floor=self._recency_floor_turns,
            compacted=view.compacted,
            transcript_tokens=counter.transcript_tokens if packs else None,
        )
        texts = view.texts
        if texts is None:
            texts = await self._index.read_turns(
                tenant_id, session_id, chosen.kept(), view.version, view.create_time_ms
            )
            if texts is None:
                # A revert, a compaction or a new life of the id changed the
                # session between the two reads: plan again.
                return await self._assemble_session(
                    request, new, budget, counter, at_version, strategy, packs, query_vector
                )
        rendered = assembly.render(chosen, costs, texts, new, facts, scores)
        rendered.inputs.MergeFrom(scoring)
        if request.HasField("append_reservation"):
            await self._hold_room(request, len(view.roles) - view.compacted, view.held_bytes)
        return rendered, view, costs, chosen

    async def _hold_room(
        self, request: pb.AssembleContextRequest, live_turns: int, held_bytes: int | None
    ) -> None:
        """Holds the room the reservation asks for until its append, where
        it names a hold (AppendReservation.hold_id) and the session, with
        it, is past half of a cap (SessionStore.needs_hold): checked in
        Redis against what the session stores and every other turn's hold,
        so that turns assembled at once on a nearly full session are
        refused here, not after they are generated. Last, once nothing else
        can fail: an assembly refused or failed holds nothing. A lone turn
        meets the check check_room made already, on the counts Redis holds
        (a concurrent append may have filled it since). No compaction is
        asked for on a refusal: check_room found room for this turn alone,
        so it is the turns in flight that fill the session, not its
        turns."""
        reservation = request.append_reservation
        if not (reservation.hold_id and reservation.hold_for_ms):
            return
        if not self._store.needs_hold(live_turns, held_bytes, reservation.turn_count, reservation.size_bytes):
            return
        await self._store.hold_room(
            request.tenant_id,
            request.session_id,
            reservation.hold_id,
            reservation.hold_for_ms,
            reservation.turn_count,
            reservation.size_bytes,
        )

    async def _session_view(
        self,
        request: pb.AssembleContextRequest,
        terms: list[str],
        counter: PromptCounter,
        at_version: int | None,
        packs: bool = False,
    ) -> _SessionView:
        """What planning needs, from the cheapest place that has it: a hot
        session's memory; else the turn index in Redis (texts read later,
        for the chosen turns only); else, for a session the index does not
        cover (stored before it, a write lost, or an older version asked for), the
        whole session, scored from its texts. With ``packs``, also the turns'
        transcript-line counts (a session stored before they existed is read
        whole once, to count and store them)."""
        tenant_id, session_id = request.tenant_id, request.session_id
        hot = self._hot.get(session_key(tenant_id, session_id)) if at_version is None else None
        if hot is not None and hot.index is not None and hot.index.version == hot.version:
            indexed: IndexedTurns = hot.index
            counts = await self._complete_counts(request, hot, counter.id, counter.count)
            lines = await self._line_counts(request, hot, counter) if packs else None
            return _SessionView(
                hot.version,
                counts,
                indexed.roles,
                hot.turns,
                indexed.postings_of(terms),
                indexed.term_counts,
                indexed.unit_vectors,
                indexed.pinned_turns,
                indexed.pinned_facts,
                indexed.first_live,
                lines,
                hot.held_bytes,
                hot.create_time_ms,
                embedder=indexed.embedder,
                vector_gaps=indexed.vector_gaps,
            )
        indexed = None
        if self._index is not None:
            indexed = await self._index.read(
                tenant_id, session_id, terms, counter.id, counter.line_id if packs else ""
            )
        if indexed is not None and len(indexed.roles) < indexed.count:
            # A lost write, or turns stored before the index existed.
            self._repair_index(tenant_id, session_id, indexed.count)
        # Not hot, or hot without its index yet: next time it will be.
        warm = indexed is not None and at_version is None and self._hot.live
        if indexed is not None and indexed.usable(at_version) and (not packs or indexed.lines_usable()):
            if warm:
                self.prefetch(tenant_id, session_id)
            return _SessionView(
                indexed.version,
                indexed.token_counts,
                indexed.roles,
                None,
                indexed.postings,
                indexed.term_counts,
                indexed.unit_vectors,
                indexed.pinned_turns,
                indexed.pinned_facts,
                indexed.first_live,
                indexed.line_counts if packs else None,
                indexed.held_bytes,
                indexed.create_time_ms,
                embedder=indexed.embedder,
                vector_gaps=indexed.vector_gaps,
            )
        stored = await self._read(tenant_id, session_id, at_version)
        if indexed is not None and indexed.create_time_ms != stored.create_time_ms:
            # Deleted and created again between the two reads, perhaps at the
            # same version: the index's pins (and vectors) are another
            # life's, and would go into this one's prompt. Read both again.
            return await self._session_view(request, terms, counter, at_version, packs)
        if warm:
            # Only now: _read has just cached the session, so the prefetch
            # attaches its index rather than read the whole session again.
            self.prefetch(tenant_id, session_id)
        postings, term_counts = _postings_of(stored.turns, terms)
        covered = (
            indexed is not None
            and indexed.first_live == stored.compacted
            and indexed.covers(stored.version, len(stored.turns))
        )
        return _SessionView(
            stored.version,
            await self._complete_counts(request, stored, counter.id, counter.count),
            np.array([m.role for m in stored.turns], dtype=np.uint8),
            stored.turns,
            postings,
            term_counts,
            indexed.unit_vectors[: len(stored.turns) - stored.compacted] if covered else None,
            [i for i in indexed.pinned_turns if i < len(stored.turns)] if indexed else [],
            indexed.pinned_facts if indexed else [],
            stored.compacted,
            await self._line_counts(request, stored, counter) if packs else None,
            stored.held_bytes,
            stored.create_time_ms,
            embedder=indexed.embedder if covered else "",
            vector_gaps=covered and indexed.vector_gaps,
        )

    async def _add_summaries(
        self,
        request: pb.AssembleContextRequest,
        response: pb.AssembleContextResponse,
        chosen: assembly.Plan,
        view: _SessionView,
        budget: int,
        counter: PromptCounter,
    ) -> list[summaries_lib.Summary]:
        """Adds summaries of the spans the assembly left out, while budget
        remains; returns those added."""
        reasons = chosen.reasons
        compacted = view.compacted
        if compacted:
            # System and pinned turns keep their texts when their span is
            # compacted: its summary stands for the others beside them.
            reasons = [0] * compacted + reasons[compacted:]
        excluded = summaries_lib.excluded_ranges(reasons)
        named = None
        if request.HasField("rebuild_summaries"):
            named = frozenset(request.rebuild_summaries.summary_ids)
        try:
            found = await self._summarizer.summaries_for(
                request.tenant_id, request.session_id, view.version, view.create_time_ms, excluded, named
            )
        except redis_access.CONNECTION_ERRORS as error:
            # The prompt stands without them; the turns it holds were read.
            log.warning("summaries unavailable", error=str(error))
            return []
        if not found:
            return []
        # Counted when written; a summary stored before its counter was configured is counted here.
        tokens = [
            summary.token_counts.get(counter.id) or (await counter.count([summary.message()]))[0]
            for summary in found
        ]
        default_system = counter.template_tokens.default_system
        return summaries_lib.add_summaries(response, found, tokens, budget, default_system)

    async def _with_pins(self, tenant_id: str, session_id: str) -> tuple[StoredSession, list[int], list[str]]:
        """The session (_read) and its pins as they are now (pins have no
        versions): its pinned turns' positions, of the turns it holds, and
        its pinned facts; none without a turn index. A hot session's come
        with it, from memory (a pin drops the hot entry, as a new version
        does), so its read stays without a Redis call."""
        stored = await self._read(tenant_id, session_id)
        if self._index is None:
            return stored, [], []
        if stored.index is not None and stored.index.version == stored.version:
            created_ms, pinned_turns, pinned_facts = (
                stored.create_time_ms,
                stored.index.pinned_turns,
                stored.index.pinned_facts,
            )
        else:
            created_ms, pinned_turns, pinned_facts = await self._index.pins(tenant_id, session_id)
        if created_ms != stored.create_time_ms:
            # Deleted and created again between the two reads: the pins are
            # another life's. Read both again.
            return await self._with_pins(tenant_id, session_id)
        return stored, [i for i in pinned_turns if i < len(stored.turns)], list(pinned_facts)

    async def _read(self, tenant_id: str, session_id: str, at_version: int | None = None) -> StoredSession:
        """The session from the hot cache when it holds the current version,
        else from Redis (then cached)."""
        key = session_key(tenant_id, session_id)
        if at_version is None:
            cached = self._hot.get(key)
            if cached is not None:
                return cached
        ticket = self._hot.ticket()
        stored = await self._store.read(tenant_id, session_id, at_version)
        # Only the current version is cached: a past one would shadow it.
        if at_version is None:
            self._hot.put(key, stored, ticket)
        return stored

    def _warm(
        self,
        tenant_id: str,
        session_id: str,
        version: int,
        created_ms: int,
        turns: list[common_pb2.Message],
        token_counts: dict[str, list[int]],
        held_bytes: int | None,
        ticket: int,
        indexed: tuple[int, Embeddings | None, list[TurnFeatures]] | None = None,
    ) -> None:
        """Readies the session for its next assembly: extends the cached
        entry with what was just appended (``held_bytes``: the session's byte
        count the append left, SessionStore.append's) when it holds the
        version before in the life the append landed in (``created_ms``),
        else reads the session in the background (never on the request
        path). ``indexed``: where the append's turns were indexed, their
        vectors (_write_index's) and features, to extend the entry's index
        alike."""
        key = session_key(tenant_id, session_id)
        cached = self._hot.get(key)
        if cached is not None and cached.create_time_ms != created_ms:
            # An older life of the id: deleted (and created again) on another
            # replica, whose notices have not come yet. Its versions say
            # nothing of this life's: extended, the entry held the deleted
            # turns before the appended ones; kept, it was read as the version
            # this append made. Dropped as the deletion's notice drops it.
            self._changed_here(tenant_id, session_id, DELETED)
            cached = None
        if cached is not None and cached.version == version - 1:
            # The index of this very entry, never one taken before the index
            # write's wait: the entry cached then may have been dropped
            # meanwhile (a compaction changes no version) and the session
            # cached again as it became, which that index no longer described.
            index = None
            if indexed is not None and cached.index is not None:
                first, vectors, turn_features = indexed
                index = cached.index.extended(version, first, turn_features, vectors)
            extended = StoredSession(
                version=version,
                create_time_ms=cached.create_time_ms,
                # The append's time in Redis, near enough (it only bounds the entry's life).
                update_time_ms=int(time.time() * 1000),
                turns=cached.turns + turns,
                compacted=cached.compacted,
                # The append script's own count, not the cached one extended:
                # no serializing here, and a count a compaction changed since
                # the entry was read is not carried on.
                held_bytes=held_bytes,
                token_counts={
                    tokenizer: np.concatenate((cached.token_counts.get(tokenizer, NO_COUNTS), counts))
                    for tokenizer, counts in token_counts.items()
                    # Counts stay a prefix: extend only those covering every turn.
                    if len(cached.token_counts.get(tokenizer, NO_COUNTS)) == len(cached.turns)
                },
                # Under the ticket, as the turns are: any change since the
                # append began (compaction, pin, deletion) refuses both.
                index=index,
            )
            if self._hot.put(key, extended, ticket):
                return
        # Told at once, not when the notice comes: a prefetch in flight that
        # read the version before must not cache it in the meantime, or it
        # would take its hot entry for current and not read this one.
        self._changed_here(tenant_id, session_id, version)
        self.prefetch(tenant_id, session_id)

    async def close(self) -> None:
        """Ends the background work (prefetches, turn-index repairs, vector
        backfills) before the Redis client and the embedder it uses are
        closed. A repair or backfill left undone is asked for again by the
        next read that finds it."""
        await cancel_and_wait(
            *self._prefetches.values(), *self._index_repairs.tasks.values(), *self._backfills.tasks.values()
        )

    def prefetch(self, tenant_id: str, session_id: str) -> None:
        """Reads the session into the hot cache in the background, unless
        MAX_PREFETCHES are being read. One session is read by one task at a
        time: asked again meanwhile (an append since its read began), the
        task reads once more when done if the hot cache lacks the session,
        as it does when a newer version was announced than the one read."""
        key = session_key(tenant_id, session_id)
        if key in self._prefetches:
            self._prefetch_again.add(key)
            return
        if len(self._prefetches) >= MAX_PREFETCHES:
            return

        async def read() -> None:
            try:
                while True:
                    self._prefetch_again.discard(key)
                    await self._read(tenant_id, session_id)
                    await self._attach_index(tenant_id, session_id)
                    # Not live: nothing is cached, so reading again warms nothing.
                    if (
                        key not in self._prefetch_again
                        or not self._hot.live
                        or self._hot.get(key) is not None
                    ):
                        return
            except MeshgateError as error:
                # Gone or unreachable: the next assembly reads it and reports that.
                log.debug("prefetch failed", session_id=session_id, reason=error.reason)
            finally:
                # Here, not in a done callback: a call between the task's end
                # and its callback would mark a task that no longer reads.
                self._prefetches.pop(key, None)
                self._prefetch_again.discard(key)

        self._prefetches[key] = asyncio.create_task(read())

    async def _attach_index(self, tenant_id: str, session_id: str) -> None:
        """Keeps the whole turn index with the hot session, if it is hot."""
        if self._index is None:
            return
        key = session_key(tenant_id, session_id)
        hot = self._hot.get(key)
        if hot is None or (hot.index is not None and hot.index.version == hot.version):
            return
        # Before the read: a change announced during it (a compaction or a
        # pin, which make no version) refuses the attach (HotCache.attach_index).
        ticket = self._hot.ticket()
        indexed = await self._index.read(tenant_id, session_id, None)
        hot = self._hot.get(key)
        if hot is not None and len(indexed.roles) == indexed.count:
            self._hot.attach_index(key, hot, indexed, ticket)

    async def _line_counts(
        self, request: pb.AssembleContextRequest, stored: StoredSession, counter: PromptCounter
    ) -> np.ndarray:
        return await self._complete_counts(request, stored, counter.line_id, counter.count_lines)

    async def _complete_counts(
        self,
        request: pb.AssembleContextRequest,
        stored: StoredSession,
        counts_id: str,
        count: collections.abc.Callable[[list[common_pb2.Message]], collections.abc.Awaitable[list[int]]],
    ) -> np.ndarray:
        """Stored counts (``counts_id``: a counter's id, or its line_id), plus
        those of turns stored before this tokenizer and template were
        configured (or before transcript lines were counted): counted here
        with ``count``, then stored so that happens once."""
        counts = stored.token_counts.get(counts_id, NO_COUNTS)
        if len(counts) == len(stored.turns):
            return counts
        missing = stored.turns[len(counts) :]
        counts = np.concatenate((counts, await count(missing)))
        # The same version's entry in the hot cache, if that is where it came from.
        stored.token_counts[counts_id] = counts
        await self._store.fill_token_counts(
            request.tenant_id, request.session_id, stored.version, stored.create_time_ms, counts_id, counts
        )
        return counts


def append_embed_timeout(turns: int, time_left_s: float | None, cap_s: float) -> float:
    """How long an append of ``turns`` turns may take to embed them: the
    embedder's default for one text plus APPEND_EMBED_S_PER_TURN a turn,
    within the call's own time left less APPEND_WRITE_MARGIN_S for the
    write after it, and never more than ``cap_s``. Not the 3 s default
    alone: an append of up to MAX_MESSAGES_PER_CALL turns needs longer,
    and every turn past it was stored without a vector, found by its words
    only until a backfill gives it one (which the append asks for, off its
    path). A deadline too short for the turns still ends in a stored append
    rather than a failed one."""
    wanted_s = min(cap_s, EMBED_TIMEOUT_S + APPEND_EMBED_S_PER_TURN * turns)
    if time_left_s is None:
        return wanted_s
    return max(0.0, min(wanted_s, time_left_s - APPEND_WRITE_MARGIN_S))
