"""Each turn's retrieval index in Redis, written once at append (a fork
takes its source's, store._FORK_SOURCE), and pins.

Beside a session's keys (services/context/store.py), under the same prefix:

- ``...:ix:roles``, a string: one byte per turn, its role, at the turn's offset.
- ``...:ix:lengths``, a string: little-endian uint16 per turn, its number of
  terms (BM25's document length).
- ``...:ix:vectors``, a string: the turn's embedding as int8 (relevance.quantize),
  ``dimensions`` bytes at offset (index - compacted) * dimensions, where
  ``compacted`` is the meta field of compacted turns (store.SessionStore.compact
  drops their rows); all zero when the embedder gave it none at its append
  (unavailable, or not in time): the turn is then found by words only until
  a backfill gives it one (below).
- ``...:ix:postings``, a hash: term -> packed uint32 (relevance.pack_posting)
  for every turn holding it; the field ``\\0dim`` holds the vector size,
  ``\\0embedder`` what made the vectors (meshgate.embedding.embedder_name:
  model and revision). Every row is that embedder's: a write of another's
  drops the rows there were (vectors of two revisions are not comparable),
  and a session whose rows name none (stored before the field) scores its
  turns by words only until then, or until a backfill (_BACKFILL, asked by
  an assembly whose question's embedder they are not) gives them rows of
  the new one. ``\\0gaps`` (a uint32, packed as a posting is) counts the
  writes (_WRITE) that left a live turn without a vector of the rows'
  embedder (a zero row, or none), so that
  whether a session holds such a gap is two fields, not a scan of every
  row: an assembly that reads it ahead of ``\\0gaps_settled`` (the count a
  backfill last found all filled, _SETTLE), or the append that moved it,
  asks for the backfill of them (TurnIndex.vector_gaps). The count only
  grows: a settle that reset it let another replica's settle, stale, take
  a newer gap's count (back at 1) for the one it had read, and that turn
  was left without a vector for good. Absent: none (sessions stored before
  the field may hold gaps it does not count).
- ``...:pins``, a list: ``t:<turn index>`` or ``f:<fact text>``; a revert
  drops the pins of the turns it undoes (store._REVERT), and the unpin of a
  turn compaction kept for its pin empties its body then (_UNPIN).

The scripts that write them (_WRITE, _PIN) take every key of the session
(store.session_keys) and renew them all, as the store's do: the index and
pins live as long as the session. _BACKFILL, which no caller's use of the
session runs, renews nothing: the keys it creates take the session's TTL.

Everything is written by turn offset (SETRANGE), so an index written after a
revert overwrites the undone turns' entries, and stale postings of the
positions written are purged first. A position never written reads a role
of 0, which no turn has: its write was lost (the append stored, then Redis
failed), so readers take the index to cover the turns before it only until
it is written again: the append retries it in the background, and a read
that finds such a position asks for the same (unwritten_appends says which
appends' turns to index again). Assembly reads the
roles, lengths, vectors and only the postings of the question's terms: one
round trip whose size grows by a few hundred bytes per turn, never the
turns' texts.
"""

from __future__ import annotations

import collections
import dataclasses
import sys

import grpc
import numpy as np
import redis.asyncio as redis

from meshgate.common.v1 import common_pb2
from meshgate.embedding import Embeddings, older_embedder
from meshgate.errors import MeshgateError, not_found
from meshgate.reasons import Reason
from services.context import relevance
from services.context.store import (
    DIMENSIONS_FIELD,
    DROP_POSTINGS,
    EMBEDDER_FIELD,
    GAPS_FIELD,
    GAPS_SETTLED_FIELD,
    RENEW,
    UNDONE,
    decode_counts,
    key,
    redis_reachable,
    session_keys,
    session_not_found,
    version_conflict,
)

# Shared by the scripts that write rows (_WRITE, _BACKFILL): whether the
# embedder named ``embedder`` is an older revision of ``than``'s model, as
# meshgate.embedding.older_embedder says (the same model, numbered
# revisions, a lower number). Rows of the newer are never replaced by the
# older's: with servers of both side by side, the index went back and forth.
OLDER_EMBEDDER = """
local function older_embedder(embedder, than)
  local model, revision = string.match(embedder, '^(.*)@(%d+)$')
  local than_model, than_revision = string.match(than, '^(.*)@(%d+)$')
  return model ~= nil and model == than_model and tonumber(revision) < tonumber(than_revision)
end
"""

# KEYS: store.session_keys. ARGV: the version the append made, dimensions
# (0 = no vectors), ttl_s, roles bytes, packed lengths, int8 vectors ("" =
# none), "1" to write only if some of these turns' positions were never
# written ("" = always), the create_time_ms of the session the append
# stored them in ("" = unchecked), the vectors' embedder, "1" when some of
# the vectors is all zero (the embedder gave that turn none), then pairs
# (term, packed postings to add). The turns' first position is read from the versions history (turns
# held at that version, less these), so concurrent appends each index their
# own turns. Returns the first position, or -1 when a revert already undid
# that version, that version's append held another number of turns, or the
# session is gone (nothing to index: its keys would outlive it) or is
# another life of its id: an append whose write waited on its embedding
# while the session was deleted and created again, its version history
# matching, overwrote the new session's index with the old one's turns.
# A write that leaves a live turn without a vector (a zero row, no rows
# written, or another embedder's rows dropped before these) counts itself
# in GAPS_FIELD. Vectors of an older revision than the rows' are not
# written (the turns' rows are zeroed, gaps for the backfill to fill with
# the rows' embedder's).
_WRITE = (
    RENEW
    + DROP_POSTINGS
    + OLDER_EMBEDDER
    + """
local created = redis.call('HGET', KEYS[1], 'create_time_ms')
if not created or (ARGV[8] ~= '' and created ~= ARGV[8]) then return -1 end
local n = #ARGV[4]
local first
local raw = redis.call('GETRANGE', KEYS[4], 4 * tonumber(ARGV[1]), 4 * tonumber(ARGV[1]) + 3)
if #raw == 4 then
  local held = struct.unpack('<I4', raw)
  if held == 4294967295 then return -1 end
  first = held - n
  local before = tonumber(ARGV[1]) - 1
  if before >= 0 then
    raw = redis.call('GETRANGE', KEYS[4], 4 * before, 4 * before + 3)
    -- A retried append that does not hold the turns its first try stored.
    if #raw == 4 and struct.unpack('<I4', raw) ~= first then return -1 end
  end
else
  -- A session stored before version histories: its turns are the last n.
  first = redis.call('LLEN', KEYS[2]) - n
end
if ARGV[7] ~= '' then
  -- A retried append: its turns are indexed already unless their first
  -- write was lost, which leaves a position never written, reading 0 (no
  -- role's value; a later write's SETRANGE zero-fills the gap).
  local written = redis.call('GETRANGE', KEYS[6], first, first + n - 1)
  if #written == n and not string.find(written, '\\0', 1, true) then return first end
end
if redis.call('STRLEN', KEYS[6]) > first then
  -- Positions being written now were written before (a later append
  -- indexed first, or this append's retry): drop any postings there.
  -- Positions past these are purged by the append that takes them;
  -- readers ignore them meanwhile.
  drop_postings(KEYS[9], first, first + n)
end
redis.call('SETRANGE', KEYS[6], first, ARGV[4])
redis.call('SETRANGE', KEYS[7], 2 * first, ARGV[5])
local dim = tonumber(ARGV[2])
local compacted = tonumber(redis.call('HGET', KEYS[1], 'compacted') or '0')
local gaps = ARGV[10] ~= ''
local rows_by = redis.call('HGET', KEYS[9], '\\0embedder')
if dim > 0 and ARGV[6] ~= '' and first >= compacted and rows_by and older_embedder(ARGV[9], rows_by) then
  -- An older revision's (servers of both side by side): the rows stay the
  -- newer's, and these turns' (which may hold a reverted turn's) are zero.
  local held_dim = tonumber(redis.call('HGET', KEYS[9], '\\0dim') or '0')
  if held_dim > 0 then
    redis.call('SETRANGE', KEYS[8], held_dim * (first - compacted), string.rep('\\0', held_dim * n))
  end
  gaps = true
elseif dim > 0 and ARGV[6] ~= '' and first >= compacted then
  if rows_by ~= ARGV[9] then
    -- The rows there are another embedder's (or of one never named): not
    -- comparable with these, so the turns they stand for have none now.
    redis.call('DEL', KEYS[8])
    redis.call('HSET', KEYS[9], '\\0embedder', ARGV[9])
    if first > compacted then gaps = true end
  end
  redis.call('HSET', KEYS[9], '\\0dim', dim)
  redis.call('SETRANGE', KEYS[8], dim * (first - compacted), ARGV[6])
elseif first + n > compacted then
  gaps = true
end
if gaps then
  -- Packed as a posting is (4 bytes), not HINCRBY's decimal: a replica from
  -- before the field reads every field it does not know as a term's
  -- postings, and a value whose length is not a multiple of 4 failed its
  -- hot load of the session (a rolling upgrade).
  local held = redis.call('HGET', KEYS[9], '\\0gaps')
  local count = held and struct.unpack('<I4', held) or 0
  redis.call('HSET', KEYS[9], '\\0gaps', struct.pack('<I4', (count + 1) % 4294967296))
end
local shift = first * 16
for i = 11, #ARGV, 2 do
  local shifted = {}
  local value = ARGV[i + 1]
  for at = 1, #value, 4 do
    table.insert(shifted, struct.pack('<I4', struct.unpack('<I4', string.sub(value, at, at + 3)) + shift))
  end
  local current = redis.call('HGET', KEYS[9], ARGV[i]) or ''
  redis.call('HSET', KEYS[9], ARGV[i], current .. table.concat(shifted))
end
renew(tonumber(ARGV[3]))
return first
"""
)


# KEYS: store.session_keys. ARGV: the session's version, create_time_ms and
# compacted turns when the backfilled turns were read (TurnIndex.vector_gaps),
# the embedder of the rows they replace ("" = none named), the vectors'
# embedder, dimensions, the turns' positions (packed little-endian uint32),
# then their int8 vectors (a row each; all zero: the embedder gave none). Returns how
# many rows it wrote, or -1 when nothing may be written: the session is
# gone or another life of its id, compacted since (rows are stored from
# the first live turn), the version read was undone by a revert (those
# positions may hold other turns now), or its rows are a third embedder's
# (a newer revision's append came meanwhile), or the vectors are an older
# revision's than the rows' (OLDER_EMBEDDER). It fills only rows holding
# no vector: an append's write of the same embedder since the read is kept
# as it wrote it. Nothing is renewed (a backfill is no use of the session),
# but keys it creates expire with the session. Rows written change what
# hot copies hold, with no version: they are told to drop it, as for a pin.
_BACKFILL = (
    OLDER_EMBEDDER
    + """
local meta = redis.call('HMGET', KEYS[1], 'version', 'create_time_ms', 'compacted')
if not meta[1] or meta[2] ~= ARGV[2] or tonumber(meta[3] or '0') ~= tonumber(ARGV[3]) then return -1 end
local raw = redis.call('GETRANGE', KEYS[4], 4 * tonumber(ARGV[1]), 4 * tonumber(ARGV[1]) + 3)
if #raw == 4 then
  if struct.unpack('<I4', raw) == 4294967295 then return -1 end
elseif meta[1] ~= ARGV[1] then
  -- A session stored before version histories: unchanged since, or given up.
  return -1
end
local dim = tonumber(ARGV[6])
local current = redis.call('HGET', KEYS[9], '\\0embedder') or ''
if current ~= ARGV[5] then
  if current ~= ARGV[4] or older_embedder(ARGV[5], current) then return -1 end
  -- The rows there are the embedder these replace: all of them go, as an
  -- append's write of another embedder drops them.
  redis.call('DEL', KEYS[8])
  redis.call('HSET', KEYS[9], '\\0embedder', ARGV[5], '\\0dim', dim)
elseif tonumber(redis.call('HGET', KEYS[9], '\\0dim') or '0') ~= dim then
  return -1
end
local zero = string.rep('\\0', dim)
local positions = ARGV[7]
local vectors = ARGV[8]
local written = 0
for row = 0, #positions / 4 - 1 do
  local value = string.sub(vectors, row * dim + 1, (row + 1) * dim)
  local at = dim * (struct.unpack('<I4', string.sub(positions, 4 * row + 1, 4 * row + 4)) - tonumber(ARGV[3]))
  local there = redis.call('GETRANGE', KEYS[8], at, at + dim - 1)
  if value ~= zero and (#there < dim or there == zero) then
    redis.call('SETRANGE', KEYS[8], at, value)
    written = written + 1
  end
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[8], ttl)
  redis.call('PEXPIRE', KEYS[9], ttl)
end
if written > 0 then redis.call('PUBLISH', 'mg:context:changes', KEYS[1] .. ' -1') end
return written
"""
)

# KEYS: store.session_keys. ARGV: the create_time_ms and the count of gap
# writes (GAPS_FIELD, its packed bytes; "" = none) read with gaps a
# backfill has filled since (TurnIndex.vector_gaps), or found none. Marks
# that count settled (GAPS_SETTLED_FIELD), unless the session is gone or
# another life of its id, or a write left another gap since the read (the
# count, which only grows, moved). Returns 1 when settled, 0 when there
# was none, -1 when it may not be. Like _BACKFILL, renews nothing, and
# tells hot copies (which hold whether gaps are left) to drop the session.
_SETTLE = """
if redis.call('HGET', KEYS[1], 'create_time_ms') ~= ARGV[1] then return -1 end
local count = redis.call('HGET', KEYS[9], '\\0gaps')
if not count then return 0 end
if count ~= ARGV[2] then return -1 end
redis.call('HSET', KEYS[9], '\\0gaps_settled', count)
redis.call('PUBLISH', 'mg:context:changes', KEYS[1] .. ' -1')
return 1
"""

# Pins a session may hold. Every assembly reads all of them and puts each
# in the prompt whatever its budget, so without a cap one session's pins
# (facts of up to 4 KiB) grew every read of it, and the memory it takes,
# without end; 256 facts are at most 1 MiB, a turn's own limit.
MAX_PINS = 256

# KEYS: store.session_keys. ARGV: pin, turn index ("" for a fact), ttl_s,
# MAX_PINS, the version the session must be at ("" for any), "1" to answer
# only a pin held already ("" to add it too). Returns {1, pins held}, {0}
# if there is no session, {-4, its version} if that is not the one
# expected, {-1, turns held} if the turn does not exist, {-2, compacted
# version} if its text was compacted, {-3, pins held} if the session holds
# MAX_PINS already, {-5} if the pin is not held and only a held one was to
# be answered (nothing written).
_PIN = (
    RENEW
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
-- Before the pinned-already answer too: what that index holds now may not
-- be what the caller read at its version.
if ARGV[5] ~= '' then
  local version = tonumber(redis.call('HGET', KEYS[1], 'version'))
  if version ~= tonumber(ARGV[5]) then return {-4, version} end
end
if ARGV[2] ~= '' then
  local index = tonumber(ARGV[2])
  local held = redis.call('LLEN', KEYS[2])
  if index < 0 or index >= held then return {-1, held} end
  if redis.call('LINDEX', KEYS[2], index) == '' then
    return {-2, tonumber(redis.call('HGET', KEYS[1], 'compacted_version') or '0')}
  end
end
local pins = redis.call('LLEN', KEYS[5])
-- Pinned already (a retry after a lost reply, or a caller pinning it
-- twice): it stays one pin, else a fact went into every prompt twice, and
-- the one UnpinFromSession left it pinned.
if redis.call('LPOS', KEYS[5], ARGV[1]) then return {1, pins} end
if ARGV[6] == '1' then return {-5} end
if pins >= tonumber(ARGV[4]) then return {-3, pins} end
local count = redis.call('RPUSH', KEYS[5], ARGV[1])
renew(tonumber(ARGV[3]))
-- Pins change no version, so hot caches holding the session (and its pins)
-- are told to drop it as they would a deleted one; the next read refills them.
redis.call('PUBLISH', 'mg:context:changes', KEYS[1] .. ' -1')
return {1, count}
"""
)


# What a system turn's stored encoding starts with: its role, field 1, which
# serialization writes first.
_SYSTEM_PREFIX = common_pb2.Message(role=common_pb2.ROLE_SYSTEM).SerializeToString()

# KEYS: as _PIN. ARGV: the pin, the session TTL, _SYSTEM_PREFIX. Returns {0}
# (no session), {-1, pins} (no such pin) or {1, pins left}; every copy of the
# pin goes (a session pinned before _PIN kept pins single may hold one twice).
# A turn compaction kept only for its pin (store._COMPACT) is compacted now,
# as it would have been unpinned: its body is emptied and its bytes leave
# meta's count (if counted), else it stayed verbatim for good, counted
# against the session's byte cap though no prompt uses it (the summary of
# its span stands for it). Its index rows went with the compaction already.
# No version, as for the compaction and any pin: the turns a version's
# prompt used are the same; the notice drops every replica's hot copy.
_UNPIN = (
    RENEW
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
if redis.call('LREM', KEYS[5], 0, ARGV[1]) == 0 then return {-1, redis.call('LLEN', KEYS[5])} end
if string.sub(ARGV[1], 1, 2) == 't:' then
  local index = tonumber(string.sub(ARGV[1], 3))
  if index < tonumber(redis.call('HGET', KEYS[1], 'compacted') or '0') then
    local body = redis.call('LINDEX', KEYS[2], index)
    -- A system turn keeps its body through compaction, pinned or not.
    if body and body ~= '' and string.sub(body, 1, #ARGV[3]) ~= ARGV[3] then
      redis.call('LSET', KEYS[2], index, '')
      local held_bytes = tonumber(redis.call('HGET', KEYS[1], 'bytes'))
      -- Never below 0: see the compaction script.
      if held_bytes then redis.call('HSET', KEYS[1], 'bytes', math.max(0, held_bytes - #body)) end
    end
  end
end
renew(tonumber(ARGV[2]))
redis.call('PUBLISH', 'mg:context:changes', KEYS[1] .. ' -1')
return {1, redis.call('LLEN', KEYS[5])}
"""
)


# KEYS: meta, turns. ARGV: the turn indices wanted, packed little-endian
# uint32. Returns the session's version (nil: no session) and create_time_ms,
# then each turn's stored body (nil past the list's end): one command and
# one reply, where a pipeline of one LINDEX per chosen turn (a hundred at
# 2k tokens) cost the client a command to pack and a reply to parse each.
_READ_TURNS = """
local out = {redis.call('HGET', KEYS[1], 'version'), redis.call('HGET', KEYS[1], 'create_time_ms')}
local wanted = ARGV[1]
for at = 1, #wanted, 4 do
  local index = struct.unpack('<I4', string.sub(wanted, at, at + 3))
  out[#out + 1] = redis.call('LINDEX', KEYS[2], index)
end
return out
"""


def _pins_of(pins: list[bytes], count: int) -> tuple[list[int], list[str]]:
    """The pinned turns' positions (of the ``count`` turns the session
    holds, each once) and the pinned facts of the stored ``pins``."""
    pinned_turns, pinned_facts = [], []
    for pin in pins:
        kind, _, value = pin.decode().partition(":")
        if kind == "t":
            if int(value) < count and int(value) not in pinned_turns:
                pinned_turns.append(int(value))
        else:
            pinned_facts.append(value)
    return pinned_turns, pinned_facts


def _keys(tenant_id: str, session_id: str) -> list[str]:
    return [key(tenant_id, session_id, f"ix:{part}") for part in ("roles", "lengths", "vectors", "postings")]


@dataclasses.dataclass(frozen=True, slots=True)
class TurnFeatures:
    role: int
    terms: collections.Counter[str]


def features(messages: list[common_pb2.Message]) -> list[TurnFeatures]:
    return [TurnFeatures(m.role, relevance.index_terms(m.content)) for m in messages]


def _packed_postings(turns: list[TurnFeatures]) -> dict[str, bytes]:
    """Each term's postings in ``turns``, positions counted from the first."""
    postings: dict[str, bytearray] = collections.defaultdict(bytearray)
    for offset, turn in enumerate(turns):
        for term, frequency in turn.terms.items():
            postings[term] += relevance.pack_posting(offset, frequency).to_bytes(4, "little")
    return {term: bytes(packed) for term, packed in postings.items()}


def term_counts(turns: list[TurnFeatures]) -> np.ndarray:
    """Each turn's term count as the index stores it (uint16, capped), and
    as the paths that read turns' texts must count it too: BM25's average
    length over the session is part of every score, so a count capped on
    one path and not on another gave the same assembly inputs two rankings
    (a turn of 500,000 terms; a bug hunt)."""
    return np.array([min(sum(t.terms.values()), 0xFFFF) for t in turns], dtype="<u2")


def leaves_gaps(vectors: Embeddings | None) -> bool:
    """Whether an append's ``vectors`` (servicer._embed's: None when the
    embedder gave none, a zero row for each turn it gave none) leave some
    of its turns without one, as the index stores them (quantized)."""
    return vectors is None or not relevance.quantize(vectors.rows).any(axis=1).all()


@dataclasses.dataclass(frozen=True, slots=True)
class UnwrittenAppend:
    """An append whose turns hold a position the index never wrote."""

    version: int
    first: int
    count: int


def unwritten_appends(
    roles: bytes, history: bytes, count: int, compacted: int, max_turns: int
) -> list[UnwrittenAppend]:
    """Which appends to index again so that every position of a session of
    ``count`` turns reads written: those that last stored a turn at a
    position whose role byte is 0 or past ``roles``' end, oldest first,
    while their turns add up to ``max_turns`` (at least one append).

    ``history`` is the session's versions string (store: turns held at each
    version). An append at version v stored positions [held(v-1), held(v));
    a later one that stored some of them again (after a revert) owns them
    now, and a version a revert undid owns nothing. Compacted positions
    are left out (their texts are gone, a summary stands for them), and so
    are positions no recorded append owns (a session stored before version
    history): nothing can tell which write they belonged to."""
    held = np.frombuffer(history[: len(history) // 4 * 4], dtype="<u4").astype(np.int64)
    written = np.zeros(count, bool)
    stored_roles = np.frombuffer(roles, dtype=np.uint8)[:count]
    written[: len(stored_roles)] = stored_roles != 0
    written[:compacted] = True
    unwritten = np.flatnonzero(~written)
    # The appends whose turns the session holds: a revert marks the versions
    # it undoes, so the blocks left follow each other without overlapping,
    # in version order (the append after a revert stores from where the
    # version it restored ended). One searchsorted finds each position's.
    before, after = held[:-1], held[1:]
    kept = (before != UNDONE) & (after != UNDONE) & (after > before)
    versions = np.flatnonzero(kept) + 1
    starts, ends = before[kept], after[kept]
    block = np.searchsorted(starts, unwritten, side="right") - 1
    owned = block >= 0
    owned[owned] = ends[block[owned]] > unwritten[owned]
    appends: list[UnwrittenAppend] = []
    turns = 0
    for version in dict.fromkeys(versions[block[owned]].tolist()):
        first, n = int(held[version - 1]), int(held[version] - held[version - 1])
        if first < compacted or first + n > count:
            continue
        if appends and turns + n > max_turns:
            break
        appends.append(UnwrittenAppend(version, first, n))
        turns += n
    return appends


@dataclasses.dataclass(frozen=True, slots=True)
class VectorGaps:
    """The live turns of a session whose rows hold no vector of an embedder
    (TurnIndex.vector_gaps), and what the backfill of them must check."""

    version: int
    create_time_ms: int
    compacted: int
    # What made the rows there ("" = none named): all of them when it is
    # another embedder than the one asked about.
    embedder: str
    positions: list[int]
    # GAPS_FIELD's bytes as read (b"" = none), for TurnIndex.settle.
    gap_writes: bytes = b""


@dataclasses.dataclass(frozen=True, slots=True)
class IndexedTurns:
    """What assembly reads of a session's turns: never their texts."""

    version: int
    # Turns the session holds.
    count: int
    # The turns' tokens for the counter asked for (may cover a prefix only).
    token_counts: np.ndarray
    roles: np.ndarray
    term_counts: np.ndarray
    # relevance.unit_rows of the stored int8 rows of the live turns (from
    # first_live on: converted once, kept so by a hot session), or None
    # when no turn has a vector.
    unit_vectors: np.ndarray | None
    postings: dict[str, np.ndarray]
    # Turn indices and fact texts pinned, in pinning order.
    pinned_turns: list[int]
    pinned_facts: list[str]
    # Turns before it were compacted (store.SessionStore.compact): no
    # vectors, no postings.
    first_live: int = 0
    # The turns' tokens as transcript lines, when asked for (may cover a prefix only).
    line_counts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    # The session's meta ``bytes`` (store.StoredSession.held_bytes), read in
    # the same transaction; None: never counted. Set and read only on an
    # index fresh from TurnIndex.read: one extended for a hot session leaves
    # it None, as that session's bytes are its hot entry's (StoredSession.held_bytes).
    held_bytes: int | None = None
    # The session's meta ``create_time_ms``, read in the same transaction,
    # which tells one life of a session id from the next; like held_bytes,
    # only on an index fresh from TurnIndex.read (0 on one extended).
    create_time_ms: int = 0
    # The version the first_live turns were compacted at (meta
    # ``compacted_version``); -1 when none was. Kept by one extended: a
    # compaction makes a hot session reload.
    compacted_version: int = -1
    # What made unit_vectors (meshgate.embedding.embedder_name); "" for rows
    # stored before it was recorded, comparable with no vector.
    embedder: str = ""
    # Whether a write left some live turn without a vector since a backfill
    # last found none (GAPS_FIELD): the backfill is asked for.
    vector_gaps: bool = False

    @property
    def nbytes(self) -> int:
        """What it holds in memory, near enough (a hot session keeps it)."""
        vectors = 0 if self.unit_vectors is None else self.unit_vectors.nbytes
        # A posting list's array plus its key and the objects around them.
        postings = sum(p.nbytes + len(t) + 160 for t, p in self.postings.items())
        # Up to MAX_PINS pins of up to 4 KiB each, ~1 MiB: counted, or a hot
        # cache would keep a much-pinned session as if it weighed its turns alone.
        pins = sum(sys.getsizeof(fact) for fact in self.pinned_facts) + 36 * len(self.pinned_turns)
        arrays = self.roles.nbytes + self.term_counts.nbytes + self.line_counts.nbytes
        return vectors + postings + pins + arrays + 8 * len(self.token_counts)

    def usable(self, at_version: int | None) -> bool:
        """Whether assembly can plan from this alone: the current version
        asked for, every turn indexed (turns stored before the index
        existed, or whose write was lost, are not) and counted. A version
        asked for by number that a compaction came at or after (a compaction
        makes no version) is not: its first assembly may have held the
        compacted turns verbatim, so the store refuses it (VERSION_COMPACTED)
        as for any older one, and this path must not answer otherwise."""
        if at_version is not None and self.first_live > 0 and at_version <= self.compacted_version:
            return False
        return (
            (at_version is None or at_version == self.version)
            and len(self.roles) == self.count
            and len(self.token_counts) == self.count
        )

    def lines_usable(self) -> bool:
        """Whether every turn's transcript-line count was read."""
        return len(self.line_counts) == self.count

    def covers(self, version: int, count: int) -> bool:
        """Whether the vectors hold the first ``count`` turns of ``version``,
        this index's or an older one that could be read after it: an older
        version's turns are the first ones of the session's list as it is
        now (store._READ), and a revert that undid it, or a compaction
        since, makes it unreadable. So a rebuild at an older version scores
        as its first assembly did (with the caller checking ``first_live``
        against the read's compacted turns)."""
        return (
            self.unit_vectors is not None
            and version <= self.version
            and len(self.unit_vectors) >= count - self.first_live
        )

    def postings_of(self, terms: list[str]) -> dict[str, np.ndarray]:
        return {t: self.postings[t] for t in terms if t in self.postings}

    def extended(
        self,
        version: int,
        first: int,
        turns: list[TurnFeatures],
        vectors: Embeddings | None,
    ) -> IndexedTurns | None:
        """This index with the turns an append stored at ``first``, as
        :meth:`TurnIndex.write` stored them; None unless they follow on."""
        if first != self.count or len(self.roles) != self.count:
            return None
        count = self.count + len(turns)
        if vectors is not None and older_embedder(vectors.embedder, self.embedder):
            # As the write keeps the newer revision's rows: these turns have none.
            vectors = None
        rows = None
        embedder = self.embedder if vectors is None else vectors.embedder
        if self.unit_vectors is not None or vectors is not None:
            dimensions = (self.unit_vectors if self.unit_vectors is not None else vectors.rows).shape[1]
            old = self.unit_vectors
            if old is None or embedder != self.embedder:
                # As the write drops another embedder's rows.
                old = np.zeros((self.count - self.first_live, dimensions), np.float32)
            # Quantized as stored, so the hot rows score exactly as the cold ones.
            new = (
                relevance.unit_rows(relevance.quantize(vectors.rows))
                if vectors is not None
                else np.zeros((len(turns), dimensions), np.float32)
            )
            rows = np.vstack([old, new])
        postings = dict(self.postings)
        for term, packed in _packed_postings(turns).items():
            shifted = np.frombuffer(packed, dtype="<u4") + np.uint32(first << relevance.TF_BITS)
            postings[term] = np.concatenate([postings[term], shifted]) if term in postings else shifted
        return IndexedTurns(
            version,
            count,
            np.zeros(0, np.int64),
            np.concatenate([self.roles, np.array([t.role for t in turns], np.uint8)]),
            np.concatenate([self.term_counts, term_counts(turns).astype(np.float64)]),
            rows,
            postings,
            self.pinned_turns,
            self.pinned_facts,
            self.first_live,
            compacted_version=self.compacted_version,
            embedder=embedder,
            # As the write counts it (_WRITE).
            vector_gaps=self.vector_gaps
            or leaves_gaps(vectors)
            or (embedder != self.embedder and self.count > self.first_live),
        )


class TurnIndex:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._write = client.register_script(_WRITE)
        self._pin = client.register_script(_PIN)
        self._unpin = client.register_script(_UNPIN)
        self._read_turns = client.register_script(_READ_TURNS)
        self._backfill = client.register_script(_BACKFILL)
        self._settle = client.register_script(_SETTLE)

    async def write(
        self,
        tenant_id: str,
        session_id: str,
        version: int,
        turns: list[TurnFeatures],
        vectors: Embeddings | None,
        *,
        created_ms: int | None,
        only_unwritten: bool = False,
    ) -> int:
        """Indexes ``turns``, the ones the append that made ``version`` stored
        in the session created at ``created_ms`` (None: unchecked, for tools
        and tests); returns the position of the first (-1: a revert already
        undid them, or the session is gone or another life of its id).
        Postings are packed relative to the first; the script, which knows
        where they landed, shifts them. ``only_unwritten``: for a retried
        append, whose turns are indexed already unless its first try's
        write was lost; they are then written, else left as they are."""
        lengths = term_counts(turns).tobytes()
        packed_vectors = b"" if vectors is None else relevance.quantize(vectors.rows).tobytes()
        dimensions = 0 if vectors is None else vectors.rows.shape[1]
        args: list[object] = [
            version,
            dimensions,
            self._ttl_s,
            bytes(t.role for t in turns),
            lengths,
            packed_vectors,
            "1" if only_unwritten else "",
            "" if created_ms is None else created_ms,
            "" if vectors is None else vectors.embedder,
            "1" if vectors is not None and leaves_gaps(vectors) else "",
        ]
        for term, packed in _packed_postings(turns).items():
            args.extend((term, packed))
        with redis_reachable():
            return int(await self._write(keys=session_keys(tenant_id, session_id), args=args))

    async def read(
        self,
        tenant_id: str,
        session_id: str,
        query_terms: list[str] | None,
        counter_id: str = "",
        line_counter_id: str = "",
    ) -> IndexedTurns:
        """The session's index as of one instant (MULTI), with the postings of
        ``query_terms`` only (None: all, to keep in memory), and the counts of
        ``counter_id`` (and of ``line_counter_id`` when given). Raises SESSION_NOT_FOUND."""
        roles_key, lengths_key, vectors_key, postings_key = _keys(tenant_id, session_id)
        fields = [DIMENSIONS_FIELD, EMBEDDER_FIELD, GAPS_FIELD, GAPS_SETTLED_FIELD, *(query_terms or ())]
        with redis_reachable():
            async with self._client.pipeline(transaction=True) as pipe:
                meta_fields = [
                    "version",
                    f"tokens:{counter_id}",
                    "compacted",
                    f"tokens:{line_counter_id}",
                    "bytes",
                    "create_time_ms",
                    "compacted_version",
                ]
                pipe.hmget(key(tenant_id, session_id, "meta"), meta_fields)
                pipe.llen(key(tenant_id, session_id, "turns"))
                pipe.get(roles_key)
                pipe.get(lengths_key)
                pipe.get(vectors_key)
                if query_terms is None:
                    pipe.hgetall(postings_key)
                else:
                    pipe.hmget(postings_key, fields)
                pipe.lrange(key(tenant_id, session_id, "pins"), 0, -1)
                meta, count, roles, lengths, vectors, posting_values, pins = await pipe.execute()
        if meta[0] is None:
            raise session_not_found(session_id)
        # As planning takes them (assembly.SessionCosts), never as lists.
        counts = decode_counts(meta[1] or b"", count)
        line_counts = decode_counts((meta[3] or b"") if line_counter_id else b"", count)
        roles_array = np.frombuffer(roles or b"", dtype=np.uint8)[:count]
        # A position whose write was lost reads 0, no role's value (a later
        # write's SETRANGE zero-filled it): the index covers the turns before
        # it only, so it is not usable and assembly reads the turns instead.
        unwritten = np.flatnonzero(roles_array == 0)
        if len(unwritten):
            roles_array = roles_array[: unwritten[0]]
        # Only when every turn has a row can vectors and turns be told apart.
        term_counts = np.frombuffer(lengths or b"", dtype="<u2")[:count].astype(np.float64)
        if query_terms is None:
            everything = {term.decode(): value for term, value in posting_values.items()}
            query_terms = [t for t in everything if not t.startswith("\0")]
            posting_values = [
                everything.get(DIMENSIONS_FIELD),
                everything.get(EMBEDDER_FIELD),
                everything.get(GAPS_FIELD),
                everything.get(GAPS_SETTLED_FIELD),
                *(everything[t] for t in query_terms),
            ]
        dimensions = int(posting_values[0] or 0)
        embedder = (posting_values[1] or b"").decode()
        vector_gaps = posting_values[2] is not None and posting_values[2] != posting_values[3]
        first_live = min(int(meta[2] or 0), count)
        live = len(roles_array) - first_live
        vector_rows = None
        if dimensions and vectors:
            # The string starts at the first live turn.
            rows = np.frombuffer(vectors, dtype=np.int8)
            rows = rows[: (len(rows) // dimensions) * dimensions].reshape(-1, dimensions)[: max(live, 0)]
            if len(rows) < live:
                # Turns after the last embedded one had no vectors: zero rows.
                rows = np.vstack([rows, np.zeros((live - len(rows), dimensions), np.int8)])
            vector_rows = relevance.unit_rows(rows)
        postings = {
            term: np.frombuffer(value, dtype="<u4")
            for term, value in zip(query_terms, posting_values[4:], strict=True)
            if value
        }
        pinned_turns, pinned_facts = _pins_of(pins, count)
        return IndexedTurns(
            int(meta[0]),
            count,
            counts,
            roles_array,
            term_counts,
            vector_rows,
            postings,
            pinned_turns,
            pinned_facts,
            first_live,
            line_counts,
            None if meta[4] is None else int(meta[4]),
            int(meta[5] or 0),
            -1 if meta[6] is None else int(meta[6]),
            embedder,
            vector_gaps,
        )

    async def pins(self, tenant_id: str, session_id: str) -> tuple[int, list[int], list[str]]:
        """The session's creation time and its pins as of one instant
        (MULTI): its pinned turns' positions and its pinned facts, in the
        order pinned. Raises SESSION_NOT_FOUND."""
        with redis_reachable():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hmget(key(tenant_id, session_id, "meta"), ["version", "create_time_ms"])
                pipe.llen(key(tenant_id, session_id, "turns"))
                pipe.lrange(key(tenant_id, session_id, "pins"), 0, -1)
                meta, count, pins = await pipe.execute()
        if meta[0] is None:
            raise session_not_found(session_id)
        return int(meta[1] or 0), *_pins_of(pins, count)

    async def unwritten(
        self, tenant_id: str, session_id: str, max_turns: int, below: int | None = None
    ) -> tuple[int, int, list[UnwrittenAppend]]:
        """The session's version, its create_time_ms (for the writes, so that
        none lands in a later life of its id) and, as of them, the appends to
        index again (unwritten_appends), of its first ``below`` turns only
        when given. Raises SESSION_NOT_FOUND."""
        with redis_reachable():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hmget(key(tenant_id, session_id, "meta"), ["version", "compacted", "create_time_ms"])
                pipe.llen(key(tenant_id, session_id, "turns"))
                pipe.get(key(tenant_id, session_id, "ix:roles"))
                pipe.get(key(tenant_id, session_id, "versions"))
                (version, compacted, created), count, roles, history = await pipe.execute()
        if version is None:
            raise session_not_found(session_id)
        if below is not None:
            count = min(count, below)
        appends = unwritten_appends(roles or b"", history or b"", count, int(compacted or 0), max_turns)
        return int(version), int(created), appends

    async def vector_gaps(self, tenant_id: str, session_id: str, embedder: str | None) -> VectorGaps:
        """As of one instant (MULTI), the live turns without a vector of
        ``embedder`` (None: of the rows' own): every one when the rows are
        another's (or of none named), else those whose row is all zero (an
        append of ``embedder`` dropped another's rows before it, or the
        embedder gave it none). Raises SESSION_NOT_FOUND."""
        with redis_reachable():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hmget(key(tenant_id, session_id, "meta"), ["version", "create_time_ms", "compacted"])
                pipe.llen(key(tenant_id, session_id, "turns"))
                pipe.hmget(
                    key(tenant_id, session_id, "ix:postings"), [DIMENSIONS_FIELD, EMBEDDER_FIELD, GAPS_FIELD]
                )
                pipe.get(key(tenant_id, session_id, "ix:vectors"))
                pipe.get(key(tenant_id, session_id, "ix:roles"))
                meta, count, (dimensions, stored_by, gap_writes), vectors, roles = await pipe.execute()
        version, created, compacted = meta
        if version is None:
            raise session_not_found(session_id)
        compacted = min(int(compacted or 0), count)
        stored_by = (stored_by or b"").decode()
        if embedder is None:
            embedder = stored_by
        dimensions = int(dimensions or 0)
        # Turns whose index was never written are not: their append is
        # embedding them still, or its write was lost and the repair
        # (unwritten_appends) writes their vectors with the rest.
        indexed = np.zeros(count, bool)
        written = np.frombuffer(roles or b"", np.uint8)[:count] != 0
        indexed[: len(written)] = written
        lacking = indexed[compacted:].copy()
        if stored_by == embedder and embedder and dimensions:
            rows = np.zeros((count - compacted, dimensions), np.int8)
            held = np.frombuffer(vectors or b"", np.int8)[: rows.size]
            rows.reshape(-1)[: len(held)] = held
            lacking &= ~rows.any(axis=1)
        positions = (np.flatnonzero(lacking) + compacted).tolist()
        return VectorGaps(int(version), int(created or 0), compacted, stored_by, positions, gap_writes or b"")

    async def backfill(
        self, tenant_id: str, session_id: str, gaps: VectorGaps, positions: list[int], vectors: Embeddings
    ) -> int:
        """Stores ``vectors``, of the turns at ``positions`` (some of
        ``gaps``'), where no vector is, unless the session changed so that
        they may not be (_BACKFILL); returns the rows written, or -1."""
        args = [
            gaps.version,
            gaps.create_time_ms,
            gaps.compacted,
            gaps.embedder,
            vectors.embedder,
            vectors.rows.shape[1],
            np.asarray(positions, dtype="<u4").tobytes(),
            relevance.quantize(vectors.rows).tobytes(),
        ]
        with redis_reachable():
            return int(await self._backfill(keys=session_keys(tenant_id, session_id), args=args))

    async def settle(self, tenant_id: str, session_id: str, gaps: VectorGaps) -> int:
        """Marks the count of gap writes ``gaps`` read settled once the turns
        it named have vectors (or it named none), unless a write left another
        gap since, or the session is another life (_SETTLE); returns 1 when
        settled, 0 when there was none, -1 when it may not be."""
        args = [gaps.create_time_ms, gaps.gap_writes]
        with redis_reachable():
            return int(await self._settle(keys=session_keys(tenant_id, session_id), args=args))

    async def read_turns(
        self, tenant_id: str, session_id: str, indices: list[int], version: int, created_ms: int
    ) -> dict[int, common_pb2.Message] | None:
        """The texts of the chosen turns only, or None when the session is no
        longer at ``version`` of the life created at ``created_ms`` (appends
        do not move turns, a revert may; a deletion and a new session of the
        id may reach the same version with other turns) or one of them was
        compacted meanwhile."""
        keys = [key(tenant_id, session_id, "meta"), key(tenant_id, session_id, "turns")]
        wanted = np.asarray(indices, dtype="<u4").tobytes()
        with redis_reachable():
            current, created, *raw = await self._read_turns(keys=keys, args=[wanted])
        if current is None:
            raise session_not_found(session_id)
        # An empty body: compacted since the plan was made (store.SessionStore.compact).
        if int(current) != version or int(created) != created_ms or not all(raw):
            return None
        return {i: common_pb2.Message.FromString(r) for i, r in zip(indices, raw, strict=True)}

    async def pin(
        self,
        tenant_id: str,
        session_id: str,
        pin: str,
        message_index: int | None,
        expected_version: int | None = None,
        *,
        held_only: bool = False,
    ) -> int | None:
        """Adds a pin (``t:<index>`` or ``f:<text>``) unless the session
        holds it already; returns how many the session holds. Raises
        SESSION_NOT_FOUND, VERSION_CONFLICT where the session is not at
        ``expected_version`` (None: at any), PIN_TARGET_NOT_FOUND for a turn
        the session does not hold, or TOO_MANY_PINS past MAX_PINS.
        ``held_only``: answers a pin the session holds already, as above,
        and adds none: None where it is not held."""
        index = "" if message_index is None else message_index
        expected = "" if expected_version is None else expected_version
        args = [pin, index, self._ttl_s, MAX_PINS, expected, "1" if held_only else ""]
        with redis_reachable():
            outcome = await self._pin(keys=session_keys(tenant_id, session_id), args=args)
        if outcome[0] == -5:
            return None
        if outcome[0] == 0:
            raise session_not_found(session_id)
        if outcome[0] == -4:
            raise version_conflict(session_id, int(outcome[1]), expected_version)
        if outcome[0] == -1:
            raise not_found(
                Reason.PIN_TARGET_NOT_FOUND,
                f"session {session_id!r} holds {outcome[1]} turns: there is no turn {message_index}",
                turns=str(outcome[1]),
            )
        if outcome[0] == -3:
            raise MeshgateError(
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.TOO_MANY_PINS,
                f"session {session_id!r} holds {outcome[1]} pins, the most it may ({MAX_PINS})",
                {"session_id": session_id, "limit": str(MAX_PINS)},
            )
        if outcome[0] == -2:
            raise MeshgateError(
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.VERSION_COMPACTED,
                f"turn {message_index} of session {session_id!r} was compacted into a summary at"
                f" version {outcome[1]}: its text is gone (pin the fact it held instead)",
                {"session_id": session_id, "compacted_version": str(outcome[1])},
            )
        return int(outcome[1])

    async def unpin(self, tenant_id: str, session_id: str, pin: str) -> int:
        """Removes a pin as :meth:`pin` wrote it (and the body of a turn
        compaction kept only for it, see _UNPIN); returns how many the
        session holds. Raises SESSION_NOT_FOUND, or PIN_NOT_FOUND for a pin
        it does not hold."""
        with redis_reachable():
            outcome = await self._unpin(
                keys=session_keys(tenant_id, session_id), args=[pin, self._ttl_s, _SYSTEM_PREFIX]
            )
        if outcome[0] == 0:
            raise session_not_found(session_id)
        if outcome[0] == -1:
            raise not_found(
                Reason.PIN_NOT_FOUND,
                f"session {session_id!r} holds no such pin ({outcome[1]} pins)",
                pins=str(outcome[1]),
            )
        return int(outcome[1])
