"""Summaries of older spans of a session, written off the request path.

A session's turns are cut into spans of ``span_turns`` turns, from where
its summaries' coverage ends (``coverage``): span k covers turns
[k * span_turns, (k + 1) * span_turns) while the setting stays the same.
Once a span is complete and older than the hot window (the newest
``hot_window_turns`` turns), a background task per session summarizes it:
with the chat model through the inference service's ``Generate`` when one
is configured and answers, else extractively (the span's highest-scoring
sentences, pure Python).

Redis keys:

- the session's ``summaries`` key (store.key), a hash: ``<first>-<end>`` ->
  the summary of that span, JSON, with this session's versions of its
  turns. In the session's own hash slot, it lives as long as the session
  does (every write of the session renews it) and goes with it: once a
  span's turns are compacted it is all that stands for them.
- ``mg:context:<tenant>:summary:<sha256 of the span's turns>``
  (store.summary_copy_key): the summary's text, JSON, for another session
  (a fork, turns appended again after a revert) holding the same turns at
  the same place to reuse without writing it again; never read for a
  session's own summaries, and never trusted for versions (another
  session's turns came at other versions). It expires after the session
  TTL, and goes sooner with every session that names it: the session's
  hash names its digest (``digest`` in the summary's JSON, which decode()
  leaves out), and a delete of the session deletes the content keys its
  summaries name (store.drop_summary_copies), as they hold what was said
  and, the session gone, are counted toward the tenant's bound by none;
  so does the write of a summary in place of another (of turns a revert
  undid), for the one it replaces, and a write not kept, for its own.
  Summaries written before their JSON named the digest name none: theirs
  expire on their own.

A session stored before its hash held whole summaries names a digest there
instead: read through the content key, and written whole the next time the
span is seen with its turns.

A summary records its id (``summary_id``: of its turns' texts and their
place, as a manifest names it for each turn it stands for), the turns it
covers and the session versions of its first and last turn's appends
(``first_version``, ``end_version``), how it was made (``model:<name>`` or
``extractive``), and its message's tokens for every configured tokenizer
and template.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import collections.abc
import dataclasses
import hashlib
import json
import re
import sys

import grpc
import numpy as np
import redis.asyncio as redis
import structlog

from meshgate import redis_access
from meshgate.common.v1 import common_pb2
from meshgate.config import ContextSettings, summary_usage_ttl_s
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.errors import MeshgateError, from_rpc_error
from meshgate.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from meshgate.reasons import Reason
from meshgate.tasks import cancel_and_wait
from meshgate.tokenization import ROLE_NAMES
from services.context import store as session_store
from services.context.store import SessionStore
from services.context.token_counts import PromptCounter

log = structlog.get_logger(__name__)

_INSTRUCTION = (
    "Summarize the conversation below in at most three sentences. Keep every name, number,"
    " date, place and decision it mentions. Write only the summary."
)
# The model reads the span as one user message; longer spans are cut here
# (the model's window is 8k tokens, and the summary is worth little more).
MAX_TRANSCRIPT_CHARS = 12_000
MAX_SUMMARY_TOKENS = 160
# The most tokens a model's summary may take framed as a message, by any
# configured counter: its answer is capped at MAX_SUMMARY_TOKENS of its own
# tokens, which another tokenizer may count as more. An answer past this
# (a server that ignores max_tokens, one that streams on) is not kept: once
# its span is compacted the summary is all that stands for its turns, and
# one that fits no prompt left them out of every prompt for good.
MAX_SUMMARY_MESSAGE_TOKENS = 2 * MAX_SUMMARY_TOKENS
EXTRACTIVE_SENTENCES = 3
MAX_SENTENCE_CHARS = 300

# Sentences end at . ! ? and a space, or at the full-width 。！？ of Chinese
# and Japanese, which need none. Words are runs of letters and digits of any
# script (a Latin-only pattern found no word in a Russian span, whose names
# and numbers were then lost), but for Chinese characters and kana, each
# a word of its own: those scripts put no space between words.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*|\n+")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}](?:[^\W{_CJK}]|['-])*")
_STOPWORDS = frozenset(
    re.findall(
        r"\S+",
        "a an and are as at be but by do for from has have i if in is it its me my no not of on or so"
        " that the their them then there these they this to up was we were what when which who will"
        " with you your yes ok okay",
    )
)


@dataclasses.dataclass(frozen=True, slots=True)
class Summary:
    summary_id: str
    first_turn: int
    end_turn: int
    first_version: int
    end_version: int
    method: str
    text: str
    # Its message's tokens per counter id (token_counts.PromptCounter), as
    # the chat template renders it: counted once, when written (or loaded,
    # for summaries stored before), so assembly never counts them.
    token_counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def ref(self) -> pb.SummaryRef:
        return pb.SummaryRef(
            summary_id=self.summary_id,
            first_turn=self.first_turn,
            end_turn=self.end_turn,
            first_version=self.first_version,
            end_version=self.end_version,
            method=self.method,
        )

    def message(self) -> common_pb2.Message:
        """How the summary enters a prompt."""
        return common_pb2.Message(
            role=common_pb2.ROLE_SYSTEM,
            content=f"Summary of earlier turns {self.first_turn + 1}-{self.end_turn}: {self.text}",
        )


_FIELDS = frozenset(field.name for field in dataclasses.fields(Summary))


def decode(raw: bytes) -> Summary | None:
    """A stored summary, or None (logged) for one that will not decode.

    Fields this code does not know are left out: a newer replica writes
    them during a rolling upgrade, and refusing them failed every assembly
    of the session that needed summaries and every summarizer run of it
    (no summaries, no compaction). One that will not decode at all stands
    for nothing here: skipped rather than failing the session."""
    try:
        fields = json.loads(raw)
        return Summary(**{name: value for name, value in fields.items() if name in _FIELDS})
    except (ValueError, TypeError, AttributeError) as error:
        log.warning("stored summary skipped: undecodable", error=str(error))
        return None


def span_digest(turns: list[common_pb2.Message]) -> str:
    digest = hashlib.sha256()
    for turn in turns:
        serialized = turn.SerializeToString(deterministic=True)
        digest.update(len(serialized).to_bytes(8, "little") + serialized)
    return digest.hexdigest()


def summary_id(first: int, end: int, digest: str) -> str:
    """The id of the summary of turns [``first``, ``end``) whose span_digest
    is ``digest``: their texts and their place, as a manifest names it for
    each turn it stands for. The digest alone was shared by two spans of
    the same turns (a user who says "ok" and "thanks" twice over), so a
    turn's summary_id did not tell which of the prompt's summaries was its."""
    return hashlib.sha256(f"{first}-{end}:{digest}".encode()).hexdigest()[:32]


def transcript(turns: list[common_pb2.Message]) -> str:
    """The span as the model reads it, at most MAX_TRANSCRIPT_CHARS. Where
    it is longer, every turn keeps a fair share: turns under the share are
    whole, the others keep their beginning, cut to an equal share of what
    is left (marked "…"). Cut at the end instead, a span of long answers
    reached the model only in part (13 of 16 turns of ~900 characters), and
    the summary, which stands for the whole span once it is compacted, was
    of turns it never saw (a review)."""
    lines = [f"{ROLE_NAMES.get(t.role, 'user')}: {t.content}" for t in turns]
    room = MAX_TRANSCRIPT_CHARS - max(len(lines) - 1, 0)  # the newlines between them
    if sum(map(len, lines)) <= room:
        return "\n".join(lines)
    shares = _fair_shares([len(line) for line in lines], room)
    return "\n".join(
        line if len(line) <= share else line[: share - 1] + "…" if share else ""
        for line, share in zip(lines, shares, strict=True)
    )


def _fair_shares(lengths: list[int], room: int) -> list[int]:
    """Each length's share of ``room`` (max-min fair): the shortest ones
    whole while they are under an equal share of what is left, the rest an
    equal share each."""
    shares = [0] * len(lengths)
    left, count = room, len(lengths)
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        share = min(lengths[index], left // count)
        shares[index] = share
        left -= share
        count -= 1
    return shares


def extractive_summary(turns: list[common_pb2.Message], sentences: int = EXTRACTIVE_SENTENCES) -> str:
    """The span's ``sentences`` most informative sentences, in their order.

    A sentence scores by the span-wide frequency of its content words (the
    span's topics), plus a bonus for numbers and capitalized words not at
    its start (names, places, figures: what a later question asks about),
    divided by the square root of its length so that long sentences do not
    win by size alone.
    """
    candidates: list[str] = []
    for turn in turns:
        if turn.role == common_pb2.ROLE_SYSTEM:
            continue
        for sentence in _SENTENCE_END.split(turn.content):
            sentence = sentence.strip()
            if len(_WORD.findall(sentence)) >= 3:
                candidates.append(sentence[:MAX_SENTENCE_CHARS])
    if not candidates:
        return " ".join(t.content.strip() for t in turns if t.content.strip())[:MAX_SENTENCE_CHARS]
    frequency = collections.Counter(
        word.lower()
        for sentence in candidates
        for word in _WORD.findall(sentence)
        if word.lower() not in _STOPWORDS
    )

    def score(sentence: str) -> float:
        words = _WORD.findall(sentence)
        topical = sum(frequency[w.lower()] for w in words if w.lower() not in _STOPWORDS)
        specific = sum(1 for w in words[1:] if w[0].isupper() or w[0].isdigit())
        return (topical + 3 * specific) / len(words) ** 0.5

    # A sentence said again counts toward its words' frequency, but is
    # picked once: three copies of one sentence summarize nothing more.
    first_of = {sentence: i for i, sentence in reversed(list(enumerate(candidates)))}
    ranked = sorted(first_of.values(), key=lambda i: (-score(candidates[i]), i))
    return " ".join(candidates[i] for i in sorted(ranked[:sentences]))


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpend:
    """Tokens a model spent on one summary (the inference service's count,
    from its completion), which the session's tenant is billed for: counted
    with the summary when it is written (SummaryStore.put). ``model`` as the
    inference service names it."""

    model: str
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True, slots=True)
class ModelAnswer:
    """A model's summary of a span, and what it spent."""

    text: str
    spent: ModelSpend


class ModelSummarizer:
    """Summaries written by a chat model through the inference service."""

    def __init__(
        self, stub: inference_service_pb2_grpc.InferenceServiceStub, model: str, timeout_s: float
    ) -> None:
        self._stub = stub
        self.model = model
        self._timeout_s = timeout_s

    async def summarize(self, turns: list[common_pb2.Message]) -> ModelAnswer:
        request = inference_service_pb2.GenerateRequest(
            model=self.model,
            messages=[
                common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=_INSTRUCTION),
                common_pb2.Message(role=common_pb2.ROLE_USER, content=transcript(turns)),
            ],
            # Greedy: the same span gets the same summary.
            parameters=common_pb2.GenerationParameters(max_tokens=MAX_SUMMARY_TOKENS, temperature=0.0),
            completion_may_carry_text=True,
            # No caller waits on a summary: tenants' generations go first.
            background=True,
        )
        pieces: list[str] = []
        completion = None
        try:
            async for response in self._stub.Generate(request, timeout=self._timeout_s):
                if response.HasField("delta"):
                    pieces.append(response.delta.text)
                elif response.HasField("completion"):
                    completion = response.completion
                    pieces.append(completion.text)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, "inference") from error
        text = "".join(pieces).strip()
        if completion is None or not text:
            raise MeshgateError(
                grpc.StatusCode.UNAVAILABLE, Reason.DOWNSTREAM_FAILED, "inference returned no summary"
            )
        usage = completion.usage
        return ModelAnswer(text, ModelSpend(self.model, usage.prompt_tokens, usage.completion_tokens))


# KEYS: the session's meta, its summaries hash, its versions, its usage
# record (store.unbilled_key). ARGV: the create_time_ms of the session the
# summary was made from, the span's field, the summary's JSON, the
# summary's id, then what a model spent on it: the model ("" for nothing),
# its prompt and completion tokens, then the summary's end_version, then the
# usage record's TTL (config.summary_usage_ttl_s). Written only into that same session: one deleted and
# created again under its id while the summary was being made (a model call)
# holds other turns. Nor once a revert has undone its end_version: its turns
# are gone, and the span's field may already hold the summary of the turns
# appended there since, which compaction may have relied on (one of undone
# turns holds at no version, valid_at, so the compacted turns had none, for
# good: no span is summarized again below them). The tokens join the usage
# record's ``unbilled`` (the store module's docstring) in the same step,
# unless the span already holds this very summary (another replica's run
# made it too: its tenant pays for a span's summary once); also when the
# summary is not written, refused by a revert or for a session deleted (or
# deleted and created again) meanwhile, as the model spent them on the
# tenant's session all the same. Returns {1, the digest of the summary it
# replaced in the span's field (store.SUMMARY_DIGEST; false for none)} if
# written, {0} if not.
_PUT = (
    session_store.SUMMARY_DIGEST
    + """
local live = redis.call('HGET', KEYS[1], 'create_time_ms') == ARGV[1]
if ARGV[5] ~= '' then
  local held = redis.call('HGET', KEYS[2], ARGV[2])
  local ok, before = pcall(cjson.decode, held or '')
  if not (ok and type(before) == 'table' and before.summary_id == ARGV[4]) then
    local raw = redis.call('HGET', KEYS[4], 'unbilled')
    local unbilled = raw and cjson.decode(raw) or {}
    local spent = unbilled[ARGV[5]] or {0, 0, 0}
    unbilled[ARGV[5]] = {spent[1] + tonumber(ARGV[6]), spent[2] + tonumber(ARGV[7]), spent[3] + 1}
    redis.call('HSET', KEYS[4], 'unbilled', cjson.encode(unbilled))
    -- Whom it is billed to once the session is gone.
    if live then
      redis.call('HSET', KEYS[4], 'latest_key', redis.call('HGET', KEYS[1], 'latest_key') or '')
    end
    redis.call('EXPIRE', KEYS[4], ARGV[9])
  end
end
if not live then return {0} end
local at = 4 * tonumber(ARGV[8])
local held = redis.call('GETRANGE', KEYS[3], at, at + 3)
-- A session stored before its versions were kept has none to undo.
if #held == 4 and struct.unpack('<I4', held) == 4294967295 then return {0} end
local replaced = summary_digest(redis.call('HGET', KEYS[2], ARGV[2]))
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
-- As long as the session, whose keys carry the TTL of its latest write
-- (store.RENEW), not this process's: a summary written with this one
-- outlived a session its writes had not renewed for a while, and one of a
-- session written under no TTL (kept forever) expired, and with it the
-- summaries of turns compacted for good.
local left = redis.call('PTTL', KEYS[1])
if left > 0 then redis.call('PEXPIRE', KEYS[2], left) else redis.call('PERSIST', KEYS[2]) end
return {1, replaced}
"""
)


class SummaryStore:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._put = client.register_script(_PUT)
        self._owed = session_store.OwedSessions(client)

    @staticmethod
    def _index_key(tenant_id: str, session_id: str) -> str:
        return session_store.key(tenant_id, session_id, "summaries")

    async def spans(
        self, tenant_id: str, session_id: str
    ) -> tuple[dict[tuple[int, int], Summary], dict[tuple[int, int], str]]:
        """The session's summaries by (first, end), and the digests named
        instead by a session stored before summaries were kept whole here."""
        raw = await self._client.hgetall(self._index_key(tenant_id, session_id))
        whole, named = {}, {}
        for field, value in raw.items():
            first, _, end = field.decode().partition("-")
            span = int(first), int(end)
            if not value.startswith(b"{"):
                named[span] = value.decode()
            elif (summary := decode(value)) is not None:
                whole[span] = summary
        return whole, named

    async def all_of(self, tenant_id: str, session_id: str) -> list[Summary]:
        """The session's summaries, oldest span first (those named by digest
        read through their content keys, as far as those still hold)."""
        whole, named = await self.spans(tenant_id, session_id)
        if named:
            spans = list(named)
            for span, summary in zip(spans, await self.get_many(tenant_id, [named[s] for s in spans])):
                if summary is not None:
                    whole[span] = summary
        return [whole[span] for span in sorted(whole)]

    async def get(self, tenant_id: str, digest: str) -> Summary | None:
        raw = await self._client.get(session_store.summary_copy_key(tenant_id, digest))
        return None if raw is None else decode(raw)

    async def get_many(self, tenant_id: str, digests: list[str]) -> list[Summary | None]:
        """One round trip for all: a pipeline rather than MGET, which a
        Redis Cluster refuses when the keys lie in different slots."""
        async with self._client.pipeline(transaction=False) as pipe:
            for digest in digests:
                pipe.get(session_store.summary_copy_key(tenant_id, digest))
            raw = await pipe.execute()
        return [None if r is None else decode(r) for r in raw]

    async def put(
        self,
        tenant_id: str,
        session_id: str,
        digest: str,
        summary: Summary,
        created_ms: int,
        spent: ModelSpend | None = None,
    ) -> bool:
        """Keeps ``summary`` for the session created at ``created_ms`` (not
        for another one of its id, nor once a revert undid its turns: _PUT),
        and what a model ``spent`` on it as the session's unbilled usage,
        with it (also when it is not kept), the session marked owing first
        (the store module's owed set); returns whether it was kept."""
        if spent is not None:
            # Before the write: a claim that reads the session in between
            # finds the mark newer than its own and leaves it listed.
            await self._owed.mark(tenant_id, session_id)
        ttl = self._ttl_s if self._ttl_s > 0 else None
        # The digest names the content key, for the session's delete to remove it.
        encoded = json.dumps({**dataclasses.asdict(summary), "digest": digest})
        # Two slots (the content key is any session's): the session's own
        # copy is what counts, and is written by one script in its slot.
        await self._client.set(session_store.summary_copy_key(tenant_id, digest), encoded, ex=ttl)
        keys = [
            session_store.session_key(tenant_id, session_id),
            self._index_key(tenant_id, session_id),
            session_store.key(tenant_id, session_id, "versions"),
            session_store.unbilled_key(tenant_id, session_id),
        ]
        field = f"{summary.first_turn}-{summary.end_turn}"
        args = [created_ms, field, encoded, summary.summary_id]
        if spent is None:
            args += ["", 0, 0]
        else:
            args += [spent.model, spent.prompt_tokens, spent.completion_tokens]
        args += [summary.end_version, summary_usage_ttl_s(self._ttl_s)]
        outcome = await self._put(keys=keys, args=args)
        # No content key outlives every session that named it, or none
        # would delete it (store.drop_summary_copies): not the one just
        # written for a summary not kept (its session deleted or its turns
        # reverted since it was read: a delete meanwhile found no summary
        # naming it), nor that of the summary this one replaces (of turns a
        # revert undid).
        if not outcome[0]:
            await session_store.drop_summary_copies(self._client, tenant_id, [digest])
            return False
        replaced = outcome[1]
        # A value damaged in Redis is no digest (drop_summary_copies skips
        # it): decoded without raising, as the write before stands.
        if replaced is not None and (old := replaced.decode(errors="replace")) != digest:
            await session_store.drop_summary_copies(self._client, tenant_id, [old])
        return True


@dataclasses.dataclass(frozen=True, slots=True)
class SummaryPolicy:
    span_turns: int = 16
    # The newest turns are never summarized: assembly keeps them verbatim.
    hot_window_turns: int = 32
    # The soft cap (config.ContextSettings.compact_after_turns); 0: none.
    compact_after_turns: int = 0
    # The soft cap in bytes: half of context.max_session_bytes, so a session
    # of big turns is compacted long before its appends are refused
    # (SESSION_FULL), as the turn cap alone would not (24 MiB over 4,096
    # turns is 6 KiB a turn); 0: none.
    compact_after_bytes: int = 0


def compaction_end(
    spans: collections.abc.Sequence[tuple[int, int]],
    turn_count: int,
    compacted: int,
    policy: SummaryPolicy,
    freeable: collections.abc.Sequence[int] = (),
    held_bytes: int = 0,
) -> int:
    """How many leading turns to have compacted: none more while the live
    turns are within the cap; past it, whole spans of ``spans`` (the
    summarized ones older than the hot window, contiguous, oldest first)
    until half the cap is left live, so that compaction (which rewrites the
    session's vectors) runs once per half a cap of appends, not on every one.

    Likewise in bytes: once the session's turns hold more than
    ``compact_after_bytes`` (``held_bytes``), whole summarized spans, oldest
    first, until what they free (``freeable``: each turn's bytes that
    compaction would empty, 0 for a system turn, which keeps its body) brings
    it to half of that, or no summarized span is left. The hot window and the
    incomplete span after the summarized ones are never compacted, so a
    session whose newest turns alone hold more stays above it."""
    end = compacted
    cap = policy.compact_after_turns
    if cap and turn_count - compacted > cap:
        end = max([end, *(e for _, e in spans if e <= turn_count - cap // 2)])
    byte_cap = policy.compact_after_bytes
    if byte_cap and held_bytes > byte_cap:
        left = held_bytes - sum(freeable[compacted:end])
        for first, span_end in spans:
            if left <= byte_cap // 2:
                break
            if span_end > end:
                left -= sum(freeable[max(first, end) : span_end])
                end = span_end
    return end


def due_spans(turn_count: int, policy: SummaryPolicy, start: int = 0) -> list[tuple[int, int]]:
    """Complete spans from turn ``start`` wholly older than the hot window."""
    older = max(0, turn_count - policy.hot_window_turns)
    starts = range(start, older - policy.span_turns + 1, policy.span_turns)
    return [(first, first + policy.span_turns) for first in starts]


def coverage(summaries: collections.abc.Iterable[Summary]) -> list[Summary]:
    """The summaries that stand for the session's turns, no two of one turn,
    oldest first: from turn 0, a run of summaries each starting where the
    one before ends, as far as any such run reaches; after a turn that no
    summary starts at, the same from the next one that does.

    One rule for the summarizer and for assembly, so that what compaction
    empties is what prompts are given summaries of. The summarizer starts
    its new spans where the run from turn 0 ends, and compacts no further:
    a span cut on a grid from turn 0 began inside compacted turns after a
    restart with another summary_span_turns (compacted 4 with spans of 4,
    (0, 6) was summarized from emptied texts), and a prompt choosing the
    spans of one length could hold none of turns compacted on the strength
    of the other's. A span cut from the run's end instead starts at or past
    the compacted turns (they lie inside the run) on turns whose texts are
    all there, and compaction goes on past it as it did; with one setting
    all along the spans are those from turn 0. Summaries of spans of two
    lengths over the same turns (written before, or by two replicas set
    differently at once) are both kept: the run that reaches furthest takes
    one of them, so every turn compacted on the strength of either is still
    covered (compaction stops at an end of a run, and a run's turns never
    lose their summaries: a revert cannot go below compacted turns).

    ``summaries`` are those that hold at the version read (valid_at)."""
    ordered = sorted(summaries, key=lambda s: (s.first_turn, s.end_turn))
    chosen: list[Summary] = []
    at = 0
    while at < len(ordered):
        root = ordered[at].first_turn
        # Each turn a run from ``root`` reaches -> the summary ending there on
        # the run of the most summaries found (None for the root itself), and
        # that count. Ordered by first turn, every summary that ends at a
        # turn comes before those starting there, so how a summary's first
        # turn is reached is settled when it comes. The finer run of two
        # reaching one turn ((0, 4), (4, 8) rather than (0, 8)): assembly
        # gives a summary only to a span it leaves out whole, so a prompt
        # keeping turns 4-7 still gets the summary of compacted 0-3.
        reached: dict[int, tuple[Summary | None, int]] = {root: (None, 0)}
        furthest = root
        while at < len(ordered) and ordered[at].first_turn <= furthest:
            summary = ordered[at]
            if summary.first_turn in reached:
                pieces = reached[summary.first_turn][1] + 1
                if pieces > reached.get(summary.end_turn, (None, 0))[1]:
                    reached[summary.end_turn] = (summary, pieces)
                furthest = max(furthest, summary.end_turn)
            at += 1
        run = []
        turn = furthest
        while (summary := reached[turn][0]) is not None:
            run.append(summary)
            turn = summary.first_turn
        chosen.extend(reversed(run))
    return chosen


def covered_end(chosen: collections.abc.Sequence[Summary]) -> int:
    """Where the run of ``chosen`` (coverage) from turn 0 ends."""
    end = 0
    for summary in chosen:
        if summary.first_turn != end:
            break
        end = summary.end_turn
    return end


def versions_of_span(history: list[int | None], first: int, end: int, current: int) -> tuple[int, int]:
    """The versions whose appends brought turn ``first`` and turn ``end - 1``:
    the first versions, among those not undone, holding more than ``first``
    and at least ``end`` turns. A session without history (stored before it
    was kept) gets its current version for both."""

    def first_holding(count: int) -> int:
        for version, held in enumerate(history[: current + 1]):
            if held is not None and held >= count:
                return version
        return current

    return first_holding(first + 1), first_holding(end)


# Sessions whose summaries are kept in memory for assembly, and the bytes
# those may hold: a session keeps a summary per 16 turns and a version per
# append, with no cap on either (context.max_turns is 0 by default), so a
# count alone let 10,000 sessions of 65,536 turns hold ~64 GB. 64 MiB keeps
# ~400 sessions of 1,548 turns (97 summaries each).
MAX_HOT_SESSIONS = 10_000
MAX_HOT_BYTES = 64 * 1024 * 1024
# A summary's objects besides its text (id, method, token counts, the
# dataclass), and a version's list entry: ~850 B and 35 B by tracemalloc.
_SUMMARY_OVERHEAD_BYTES = 1024
_VERSION_BYTES = 36


# Sessions summarized at once: context.max_concurrent_summaries; more wait
# their turn, at most MAX_WAITING_SUMMARIES of them (one more is dropped:
# the next append to it schedules it again). A run holds its session, read
# whole, for as long as its spans take (model calls of up to
# context.summary_timeout_s each): unbounded, a burst of appends to many
# sessions held all of them at once, and sent all their spans to the
# summary model at once, taking every generation slot it has.
MAX_WAITING_SUMMARIES = 65_536

# A model that timed out or was unavailable is not asked again for the rest
# of that run, nor by any run for this long: spans are summarized one after
# another and compaction waits for them all, so a hung model held each run
# for context.summary_timeout_s (120 s by default) per span, and with
# every run held so no other session was summarized or compacted at
# all. Their spans are summarized extractively meanwhile.
MODEL_REST_S = 30.0
_MODEL_DOWN = frozenset(
    {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


@dataclasses.dataclass(slots=True)
class _Run:
    """What one summarizer run learned on the way."""

    # False once the model timed out or was unavailable (_MODEL_DOWN).
    model: bool = True


def _summaries_bytes(summaries: list[Summary], history: list[int | None]) -> int:
    texts = sum(sys.getsizeof(summary.text) + _SUMMARY_OVERHEAD_BYTES for summary in summaries)
    return texts + _VERSION_BYTES * len(history)


class Summarizer:
    """Keeps every session's due spans summarized: one background task per
    session at a time; an append while it runs makes it run once more.

    After each run the session's summaries and version history stay in
    memory, for the version the run read, so that the next assembly at that
    version adds summaries without a Redis read. A summary another replica
    writes at the same version is seen from the session's next version on.
    """

    def __init__(
        self,
        store: SessionStore,
        summaries: SummaryStore,
        policy: SummaryPolicy,
        model: ModelSummarizer | None,
        counters: collections.abc.Sequence[PromptCounter] = (),
        max_summarizing: int = ContextSettings.max_concurrent_summaries,
    ) -> None:
        self._store = store
        self._max_summarizing = max_summarizing
        self.reconfigure_counters(counters)
        self._summaries = summaries
        self._policy = policy
        self._model = model
        self._running: dict[tuple[str, str], asyncio.Task] = {}
        self._again: set[tuple[str, str]] = set()
        # Sessions scheduled while max_summarizing ran, oldest first.
        self._waiting: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._closed = False
        # The session's meta key (store.session_key) -> ((version,
        # create_time_ms), its summaries, its version history, their
        # _summaries_bytes), least recently used first. Keyed as the change
        # notices name sessions, and served only to the same life of the
        # session: a version number alone does not tell a session deleted
        # on another replica (drop_hot) or expired (no notice at all) and
        # created again from the one it was.
        self._hot: collections.OrderedDict[
            str, tuple[tuple[int, int], list[Summary], list[int | None], int]
        ] = collections.OrderedDict()
        self._hot_bytes = 0
        # Whether the change notices are heard (hot_cache.change_listener):
        # a deletion missed meanwhile would leave a summary of another life
        # of the session in memory, so none is kept while they are not.
        self.notices_live = True
        # Deletions heard (drop_hot, forget): a load under way when one comes
        # may have read the deleted session, and must not be kept.
        self._deletions_heard = 0
        # The event loop's time until which no run asks the model (MODEL_REST_S).
        self._model_rests_until = 0.0

    def schedule(self, tenant_id: str, session_id: str) -> None:
        if self._closed:
            # Shutting down: a run started now would outlive close().
            return
        key = (tenant_id, session_id)
        if key in self._running:
            self._again.add(key)
        elif len(self._running) < self._max_summarizing:
            self._start(key)
        elif key in self._waiting or len(self._waiting) < MAX_WAITING_SUMMARIES:
            self._waiting[key] = None

    def _start(self, key: tuple[str, str]) -> None:
        self._running[key] = asyncio.create_task(self._run(key))

    async def drain(self, grace_s: float) -> None:
        """serving.stop's drain (services/context/app.py): the runs under
        way, and those waiting for a place, go on for at most ``grace_s``,
        beside the calls in flight. Left to close(), a stop with no call in
        flight cancelled them at once: a span due stayed unsummarized until
        its session's next append (on whichever replica took it), the
        prompts meanwhile had nothing for the turns they left out, and the
        model's tokens spent on it went unbilled."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        # A run that ends starts a waiting one (_run): looked at again.
        while self._running and (left := deadline - loop.time()) > 0:
            await asyncio.wait(list(self._running.values()), timeout=left)

    async def close(self) -> None:
        self._closed = True
        if self._running or self._waiting:
            log.warning(
                "summaries cut by the stop; each session's next append runs them again",
                running=len(self._running),
                waiting=len(self._waiting),
            )
        self._waiting.clear()
        await cancel_and_wait(*self._running.values())

    async def _run(self, key: tuple[str, str]) -> None:
        try:
            while True:
                self._again.discard(key)
                try:
                    version, created_ms = await self.summarize_due(*key)
                    await self._load(*key, version, created_ms)
                except MeshgateError as error:
                    # Gone, or Redis away: the next append schedules it again.
                    log.debug("summaries skipped", session_id=key[1], reason=error.reason)
                except redis_access.CONNECTION_ERRORS as error:
                    log.warning("summaries skipped: redis unavailable", error=str(error))
                except Exception:
                    # A bug, or data this code cannot read: logged here, as
                    # nothing awaits the task, and the session's next run
                    # (its next append) tries again rather than the task
                    # dying unseen ("Task exception was never retrieved").
                    log.exception("summaries failed", session_id=key[1])
                if key not in self._again:
                    return
        finally:
            self._running.pop(key, None)
            while self._waiting and not self._closed and len(self._running) < self._max_summarizing:
                self.schedule(*self._waiting.popitem(last=False)[0])

    async def summarize_due(self, tenant_id: str, session_id: str) -> tuple[int, int]:
        """Summarizes the session's due spans that have no summary holding
        at the version it read (valid_at); returns the version and
        create_time_ms of the session it read."""
        stored = await self._store.read(tenant_id, session_id)
        # Spans named by digest only (stored before) are written whole again:
        # left out here, the run from turn 0 stops before them.
        done, _ = await self._summaries.spans(tenant_id, session_id)
        history: list[int | None] | None = None
        standing: list[Summary] = []
        if done:
            history = await self._store.history(tenant_id, session_id)
            standing = coverage(s for s in done.values() if valid_at(s, history, stored.version))
        # The leading turns that compaction may empty: those of the run of
        # summaries from turn 0 (coverage) that hold at the version read, for
        # assembly serves no other (valid_at) and, once compacted, a span's
        # summary is all that stands for its turns. The compacted turns lie
        # inside that run (the max() only guards a session whose summaries of
        # them, named by digest, are gone: no span starts in emptied texts).
        covered = max(covered_end(standing), stored.compacted)
        # The run's summaries older than the hot window, then the spans cut
        # from its end: where compaction may stop.
        older = len(stored.turns) - self._policy.hot_window_turns
        spans = [(s.first_turn, s.end_turn) for s in standing if s.end_turn <= min(covered, older)]
        run = _Run()
        for first, end in due_spans(len(stored.turns), self._policy, start=covered):
            spans.append((first, end))
            span = stored.turns[first:end]
            digest = span_digest(span)
            span_id = summary_id(first, end, digest)
            if history is None:
                history = await self._store.history(tenant_id, session_id)
            own = done.get((first, end))
            if own is not None and own.summary_id == span_id:
                if valid_at(own, history, stored.version):
                    summary = own
                else:
                    # These very turns, summarized before a revert undid the
                    # version of their appends and appended again since: the
                    # text holds (and its tokens), the versions are the new ones.
                    first_version, end_version = versions_of_span(history, first, end, stored.version)
                    summary = dataclasses.replace(own, first_version=first_version, end_version=end_version)
                    if not await self._put(tenant_id, session_id, digest, summary, stored.create_time_ms):
                        # Deleted, or reverted below the span, since it was read: as below.
                        return stored.version, stored.create_time_ms
                if first <= covered and valid_at(summary, history, stored.version):
                    covered = end
                continue
            summary = await self._summaries.get(tenant_id, digest)
            spent = None
            if summary is None or (summary.first_turn, summary.end_turn) != (first, end):
                text, method, spent = await self._write(span, run)
            else:
                # The same turns at the same place (a fork, turns appended
                # again after a revert, or this session's own summary named
                # by digest): the text holds, the versions are this session's,
                # and no model spent anything on it now.
                text, method = summary.text, summary.method
            first_version, end_version = versions_of_span(history, first, end, stored.version)
            summary = Summary(
                summary_id=span_id,
                first_turn=first,
                end_turn=end,
                first_version=first_version,
                end_version=end_version,
                method=method,
                text=text,
            )
            summary = await self._counted(summary)
            if not await self._put(tenant_id, session_id, digest, summary, stored.create_time_ms, spent):
                # Deleted (and perhaps created again), or reverted below the
                # span, since it was read: what is left to do belongs to the
                # next run (the revert's, or the next append's), of the
                # session as it is then.
                return stored.version, stored.create_time_ms
            if first <= covered and valid_at(summary, history, stored.version):
                covered = end
        # Every due span is summarized now: those the soft cap takes are
        # compacted, as far as summaries that hold stand for them (covered).
        # What each turn holds in Redis (its serialized encoding; a compacted
        # one's is empty), and so what compacting it would free: all but a
        # system turn's, whose body stays. A pinned turn's stays too, which
        # this does not know: its span frees less, and a later run goes on.
        sizes = [turn.ByteSize() for turn in stored.turns]
        freeable = [0 if t.role == common_pb2.ROLE_SYSTEM else n for t, n in zip(stored.turns, sizes)]
        upto = min(
            compaction_end(spans, len(stored.turns), stored.compacted, self._policy, freeable, sum(sizes)),
            covered,
        )
        if upto > stored.compacted:
            system = [
                i for i in range(stored.compacted, upto) if stored.turns[i].role == common_pb2.ROLE_SYSTEM
            ]
            compacted = await self._store.compact(
                tenant_id, session_id, stored.version, upto, system, created_ms=stored.create_time_ms
            )
            log.info("session compacted", session_id=session_id, turns=compacted, version=stored.version)
        return stored.version, stored.create_time_ms

    async def _put(
        self,
        tenant_id: str,
        session_id: str,
        digest: str,
        summary: Summary,
        created_ms: int,
        spent: ModelSpend | None = None,
    ) -> bool:
        """SummaryStore.put, then the tenant's count of the session
        (context.max_bytes_per_tenant), which its summaries are part of: a
        summary is never refused for the tenant's bound (store.TenantHoldings)."""
        kept = await self._summaries.put(tenant_id, session_id, digest, summary, created_ms, spent)
        if kept:
            await self._store.recount(tenant_id, session_id)
        return kept

    async def _write(self, span: list[common_pb2.Message], run: _Run) -> tuple[str, str, ModelSpend | None]:
        """The summary's text, how it was made, and what a model spent on it:
        also when its answer was not kept (too long: extractive instead), as
        its tokens were spent all the same. None when no model answered (an
        extractive summary uses none; a call that failed midway reports no
        count)."""
        loop = asyncio.get_running_loop()
        if self._model is not None and run.model and loop.time() >= self._model_rests_until:
            try:
                answer = await self._model.summarize(span)
            except MeshgateError as error:
                if error.code in _MODEL_DOWN:
                    run.model = False
                    self._model_rests_until = loop.time() + MODEL_REST_S
                log.warning(
                    "model summary failed; extractive instead", reason=error.reason, code=error.code.name
                )
            else:
                if await self._sane(answer.text, span):
                    return answer.text, f"model:{self._model.model}", answer.spent
                log.warning("model summary too long; extractive instead", chars=len(answer.text))
                return extractive_summary(span), "extractive", answer.spent
        return extractive_summary(span), "extractive", None

    def reconfigure_counters(self, counters: collections.abc.Iterable[PromptCounter]) -> None:
        """The counters every summary's message is counted with, once each (a
        reload's, from the next summary counted on: a summary counted before
        gets a new counter's count when one is missing, _counted)."""
        self._counters = list({c.id: c for c in counters}.values())

    async def _sane(self, text: str, span: list[common_pb2.Message]) -> bool:
        """Whether a model's answer can stand for ``span``: shorter than the
        span's own text (one that repeats the transcript saves nothing, and
        compaction would keep it in place of the turns), and within
        MAX_SUMMARY_MESSAGE_TOKENS by every counter. Characters first, so
        that a runaway answer is never tokenized."""
        if len(text) >= sum(len(turn.content) for turn in span):
            return False
        message = common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=text)
        for counter in self._counters:
            if (await counter.count([message]))[0] > MAX_SUMMARY_MESSAGE_TOKENS:
                return False
        return True

    async def _counted(self, summary: Summary) -> Summary:
        """``summary`` with its message's tokens for every counter."""
        missing = [c for c in self._counters if c.id not in summary.token_counts]
        if not missing:
            return summary
        message = summary.message()
        counts = dict(summary.token_counts)
        for counter in missing:
            counts[counter.id] = (await counter.count([message]))[0]
        return dataclasses.replace(summary, token_counts=counts)

    def forget(self, tenant_id: str, session_id: str) -> None:
        """Drops what this process keeps of a deleted session's summaries
        (the session's deletion removed its summaries hash in Redis)."""
        self.drop_hot(session_store.session_key(tenant_id, session_id))

    def drop_hot(self, session_key: str | None) -> None:
        """A change notice that the session of ``session_key`` was deleted
        (or may have been: a pin), or, for None, that notices were missed."""
        self._deletions_heard += 1
        if session_key is not None:
            self._drop_hot(session_key)
            return
        self._hot.clear()
        self._hot_bytes = 0

    async def _load(
        self, tenant_id: str, session_id: str, version: int, created_ms: int
    ) -> tuple[list[Summary], list[int | None]]:
        """The session's summaries and history from Redis, kept for
        ``version`` of the session created at ``created_ms``."""
        deletions_heard = self._deletions_heard
        # Independent reads, so one round trip's wait rather than two on the assembly's path.
        stored, history = await asyncio.gather(
            self._summaries.all_of(tenant_id, session_id), self._store.history(tenant_id, session_id)
        )
        found = [await self._counted(summary) for summary in stored]
        key = session_store.session_key(tenant_id, session_id)
        self._drop_hot(key)
        size = _summaries_bytes(found, history)
        if size <= MAX_HOT_BYTES and self.notices_live and deletions_heard == self._deletions_heard:
            self._hot[key] = ((version, created_ms), found, history, size)
            self._hot_bytes += size
            while len(self._hot) > MAX_HOT_SESSIONS or self._hot_bytes > MAX_HOT_BYTES:
                self._drop_hot(next(iter(self._hot)))
        return found, history

    def _drop_hot(self, key: str) -> None:
        entry = self._hot.pop(key, None)
        if entry is not None:
            self._hot_bytes -= entry[3]

    async def summaries_for(
        self,
        tenant_id: str,
        session_id: str,
        version: int,
        created_ms: int,
        excluded: list[tuple[int, int]],
        named: collections.abc.Set[str] | None = None,
    ) -> list[Summary]:
        """Summaries of spans wholly inside the ``excluded`` turn ranges
        ([first, end)) that hold for the session at ``version`` (of its life
        created at ``created_ms``), no two covering the same turn, oldest
        first: what assembly adds while budget remains. With ``named``,
        only those of these ids (a rebuild's: the summaries its assembly
        had, not those written since)."""
        if not excluded or named is not None and not named:
            return []
        key = session_store.session_key(tenant_id, session_id)
        hot = self._hot.get(key)
        if hot is not None and hot[0] == (version, created_ms):
            found, history = hot[1], hot[2]
            self._hot.move_to_end(key)
        else:
            found, history = await self._load(tenant_id, session_id, version, created_ms)
        starts = [first for first, _ in excluded]

        def left_out(summary: Summary) -> bool:
            # The excluded range starting at or before the summary's first turn.
            at = bisect.bisect_right(starts, summary.first_turn) - 1
            return at >= 0 and summary.end_turn <= excluded[at][1]

        # At most one summary per turn (coverage): a session may hold
        # summaries of spans of two lengths over the same turns, and
        # overlapping ones in one prompt told its turns twice, and each
        # turn's manifest entry names one summary (add_summaries), so the
        # manifest no longer said what was sent. The same choice as the
        # summarizer's, so every compacted turn has its summary here.
        standing = coverage(
            summary
            for summary in found
            if valid_at(summary, history, version) and (named is None or summary.summary_id in named)
        )
        return [summary for summary in standing if left_out(summary)]


def excluded_ranges(reasons: collections.abc.Sequence[int]) -> list[tuple[int, int]]:
    """The runs of session turns a plan (assembly.Plan.reasons) left out, as
    [first, end), oldest first."""
    left_out = np.asarray(reasons, dtype=np.int64) == pb.INCLUSION_REASON_UNSPECIFIED
    edges = np.flatnonzero(np.diff(np.concatenate(([0], left_out.astype(np.int8), [0]))))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def add_summaries(
    response: pb.AssembleContextResponse,
    summaries: list[Summary],
    summary_tokens: list[int],
    budget: int,
    default_system_tokens: int,
) -> list[Summary]:
    """Adds, oldest first and while the budget allows, the summaries of
    spans the assembly left out: each as a system message after the
    prompt's leading system messages, so before every kept turn (the order
    AssembleContextResponse.messages documents: what stands for left-out
    history first; a kept turn older than the span, pinned or relevant,
    still comes after it), its turns marked SUMMARIZED with its id, and its
    reference in the response's inputs.

    ``summary_tokens`` are the summaries' messages as the chat template
    renders them; a template that adds a default system prompt when no
    system message is present (``default_system_tokens``) stops adding it
    once a summary is one, which this accounts for (a prompt of no message
    had not paid it: assembly.plan). Returns those added.
    """
    manifest = response.manifest
    # What the plan paid for the template's default system prompt, which the
    # first summary (a system message) takes the place of.
    default_paid = bool(response.messages) and all(
        m.role != common_pb2.ROLE_SYSTEM for m in response.messages
    )
    insert_at = 0
    while insert_at < len(response.messages) and response.messages[insert_at].role == common_pb2.ROLE_SYSTEM:
        insert_at += 1
    entries = manifest.entries
    used = manifest.prompt_tokens
    added: list[common_pb2.Message] = []
    summarized: list[Summary] = []
    for summary, tokens in zip(summaries, summary_tokens, strict=True):
        cost = tokens - (default_system_tokens if default_paid and not added else 0)
        if used + cost > budget:
            break
        used += cost
        added.append(summary.message())
        for index in range(summary.first_turn, summary.end_turn):
            # assembly.render lists session turn i as entry i.
            entry = entries[index]
            assert entry.source == pb.SOURCE_SESSION and entry.index == index
            if entry.disposition == pb.DISPOSITION_INCLUDED:
                # A system or pinned turn of a compacted span: in the prompt itself.
                continue
            entry.disposition = pb.DISPOSITION_SUMMARIZED
            entry.summary_id = summary.summary_id
        manifest.entries.add(
            source=pb.SOURCE_SUMMARY,
            index=len(response.inputs.summaries),
            role=common_pb2.ROLE_SYSTEM,
            tokens=tokens,
            disposition=pb.DISPOSITION_INCLUDED,
            summary_id=summary.summary_id,
            reason=pb.INCLUSION_REASON_SUMMARY,
        )
        response.inputs.summaries.append(summary.ref())
        summarized.append(summary)
    if added:
        kept = list(response.messages)
        del response.messages[:]
        response.messages.extend(kept[:insert_at] + added + kept[insert_at:])
        manifest.prompt_tokens = used
    return summarized


def valid_at(summary: Summary, history: list[int | None], version: int) -> bool:
    """Whether the turns a summary covers are the session's at ``version``:
    its last turn's version is at most that one and no revert undid it
    (a revert undoes every version after the one it restores, so the turns
    up to a version it kept are untouched). A session stored before version
    history was kept has none, and RevertSession refuses it (no version of
    it is known): nothing was undone, so every version up to now stands.
    Without this its summaries were never served, and compaction never
    went past them (its soft caps did nothing)."""
    if not history:
        return summary.end_version <= version
    return (
        summary.end_version <= version
        and summary.end_version < len(history)
        and (history[summary.end_version] is not None)
    )
