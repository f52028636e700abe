"""Sessions in Redis, so they outlive any one process of the service.

Each session's keys are ``mg:context:{<session_id>:<tenant>}:<part>``
(key() below), so that another tenant's session id is simply absent, and
the braces make all of them one Redis Cluster hash slot:

- ``...:meta``, a hash: ``version``, ``create_time_ms`` and ``update_time_ms``
  (Redis's clock, so every replica of the service agrees), and one field
  ``tokens:<counter id>`` per tokenizer and chat template: each turn's tokens
  in the model's prompt (see services/context/token_counts.py) as
  little-endian uint32, counted once when the turns were appended; and
  ``tokens:<counter id>.line``, each turn's tokens as a line of adaptive
  assembly's transcript message (``PromptCounter.line_id``), kept alike;
  and ``bytes``, what the session's turns hold in ``...:turns`` (their
  serialized encodings' lengths, summed: what a whole-session read loads),
  kept by every script that changes the turns, inside it, so concurrent
  writers never miscount. A compacted turn's emptied body no longer counts;
  a system or pinned one that keeps its body still does. A session stored
  before this field has none: the first append that checks
  ``context.max_session_bytes`` counts its turns once, in its script, and
  stores the sum (rather than start from 0, which would let such a session
  pass the cap by everything it already held, and a later revert or
  compaction subtract more than was ever counted); until then, scripts that
  remove turns leave the field absent. During a rolling upgrade a replica
  of the older code appends without adding to the field, so a later revert
  or compaction may subtract turns never counted: they clamp it at 0, and
  the count may stay below what the turns hold, by at most what such
  appends added, for as long as the session lives. And ``latest_key``:
  the id of the API key of the session's latest append
  (AppendTurnsRequest.key_id), whom its summaries' usage is billed to.
  And ``request_digest``, for a session whose id is drawn from a request
  id (AIP-155: a CreateSession's or ForkSession's, one id for both,
  servicer._drawn_session_id): the digest of the request that made it
  (request_ids.digest, which names the method), written by the script
  that makes the session, which finds it there first: a send of the same
  request is answered with the session, another request (the other
  method's, or a fork of another source or version) is refused
  REQUEST_ID_REUSED, and of sends at once, whatever their methods, one
  makes it. It lives and goes with the session: a resend once the session
  is deleted or expired makes it again. A session so drawn with no
  ``request_digest`` was created by a replica of before it, which drew
  only a create's session at that id (RequestIdSend.made).
  (``unbilled`` and ``unbilled_take``, as the usage record below holds them,
  are left by versions that kept summaries' usage in meta, where a delete
  or expiry took it: a take takes them with the record's, and a claim and
  an append see them as they do the record's. Such a version's take and
  claim see meta's alone: its claim may unlist a session whose record
  holds usage, which its next append to this version lists again. ``unbilled_taken``, what an
  append took, is left by versions whose appends took ``unbilled``;
  nothing reads it now.)
- ``...:turns``, a list of serialized ``common.v1.Message``, oldest first.
- ``...:turn_ids``, a hash: the idempotency key of every append that gave
  one -> the version that append made, so a retried append is answered
  instead of applied twice; kept until a compaction empties all its turns.
- ``...:versions``, a string: for every version v, at offset 4v, how many
  turns the session held at v (little-endian uint32), so any version can be
  read, forked or reverted to; 0xFFFFFFFF marks a version a revert undid.
  Sessions stored before this key existed have no history: only their
  current version is readable.
- ``...:pins`` and the turn index's ``...:ix:roles``, ``...:ix:lengths``,
  ``...:ix:vectors`` and ``...:ix:postings`` (services/context/turn_index.py),
  and ``...:summaries`` (services/context/summaries.py).

The usage record, ``...:unbilled`` (unbilled_key()), a hash in the
session's slot but not one of its parts: ``unbilled``, what the session's
summaries spent on models that no take has taken yet, JSON
``{"<model>": [prompt tokens, completion tokens, summaries]}``, added to by
the script that writes each summary (services/context/summaries.py), which
marks the session owing first (below), and taken whole by TakeSummaryUsage
(``_TAKE_UNBILLED``) for the router to bill; then ``unbilled_held``,
``<take id> <what it took>``, for a take held until acknowledged (the
router's): every held take answers it, under its take id, and takes
nothing more, until the taker acknowledges it once billed
(``_ACKNOWLEDGE_TAKE``), so that usage a router took and died before
billing is offered to the next router's take, which bills it under the
same id (its ledger writes each take id once: services/router/ledger.py);
then ``unbilled_take``, ``<take id> <what it took>`` of the latest take
acknowledged or not held (a router's before the hold), so that a take sent
again with its take id after a lost reply answers the same and takes
nothing more, until another take comes between; and ``latest_key``, meta's as the latest summary found it,
whom the usage is billed to once meta is gone. It is neither renewed nor
deleted with the session, so that usage owed when the session is deleted
or expires is still taken, and billed to its tenant (a session created
again under its id bills the earlier life's usage with its own): it
expires on its own, SUMMARY_USAGE_GRACE_S after the session could have
(config.summary_usage_ttl_s, from the latest summary's usage or take), by when a sweep
(every ``router.summary_usage_collect_s``) has long taken it.

The append holds, ``...:holds`` (holds_key()), a hash in the session's
slot but not one of its parts: the room assemblies hold for their turns'
appends (AssembleContextRequest.append_reservation's ``hold_id``), field
the hold id (the append's turn id), value ``<until, ms of Redis's clock>
<turns> <bytes> <the session's create_time_ms>``. ``_HOLD`` checks an
assembly's reservation against what the session stores plus every hold in
force, and writes its hold, in one script, so that of turns assembled at
once on a nearly full session (through any replica, for any router) only
those that fit together are granted; the rest are refused SESSION_FULL
before anything is generated for them. Only past half of a cap
(SessionStore.needs_hold): further from both, the assembly writes
nothing. ``_APPEND`` deletes the hold of its turn id, whatever its
script answers; release_hold (an HDEL) one whose turn failed (the router sends
it however far its append got: an append refused before its script ran
deleted nothing); and every ``_HOLD`` the holds not in force: their time
passed (a router killed mid-turn), their turn id applied (an append by a
replica of before the holds, which deletes none), or made in another life
of the session id (deleted, or expired, and made again: the holds are
neither renewed nor deleted with it, and the key expires with its latest
hold, at most MAX_APPEND_HOLD_MS on). An append does not count the holds:
its own was granted within the caps beside the others', and one that
finds its hold expired, or never had one (a direct AppendTurns, a turn
assembled under half the caps), appends where the caps allow, as before
the holds.

A fork's request record, ``...:fork_request`` (fork_request_key()), is
what replicas of before kept of a ForkSession's request id, which they
drew a fork's id from apart from a create's: ``<digest of the request>
<the fork's create_time_ms>``, in that fork's slot, expiring at most 24
hours after the fork. A send of the request id looks for it there too
(RequestIdSend.fork_id_of_before), so that a resend of such a fork is
answered with it, and another request refused, however the upgrade fell;
a delete of the fork deletes it. Nothing writes it now: once every
replica has run this code for 24 hours, none is left.

What each tenant's sessions hold, for ``context.max_bytes_per_tenant``,
lies in a record of the tenant's (TenantHoldings), keys
``mg:context:held:{<tenant hex>}:bytes`` and ``...:expiry`` (one slot per
tenant, apart from every session's: a call of its own beside each
session's script).

The tenant's listing (SessionListing, ContextService.ListSessions), two
sorted sets in the tenant's slot (listing_key(): the tenant's hex as the
hash tag, as its holdings record's), apart from every session's, so written
by a call of its own after each session's script:

- ``mg:context:listed:{<tenant hex>}:newest``: every score 0, so ordered by
  member, ``<create_time_ms, 16 digits>:<session id>`` (listed_member()),
  and read backwards (ZREVRANGEBYLEX), newest first. A member names one
  life of a session: an entry an earlier life of its id left (deleted or
  expired, then created again) is told from the current one's.
- ``...:due``: the same members, scored by when their sessions are to be
  checked (ms of Redis's clock): when each would expire unwritten
  (creation + session_ttl_s; +inf without a TTL), and once a check finds
  it live, when its TTL left says.

A create or a fork lists its session once its script made it (and a
resend of its request id again, where the first send's listing was lost;
one of no request id whose listing fails is answered all the same:
SessionStore._listed); a delete unlists it once its script deleted it. A
live session its tenant's listing lacks (that one, or one made before the
listing existed) is listed by the background sweep within one pass
(services/context/tenant_sweep.py, which finds sessions' metas). An entry whose session is gone (its delete's
unlisting lost, expired, created again since) is pruned by the page that
meets it, which reads every listed session's meta, by
the create that finds it due (at most LISTING_SWEPT_PER_CREATE a create,
oldest due first), and by every replica's background sweep
(services/context/tenant_sweep.py), which checks every tenant's due
entries a pass at a time, so neither a tenant that never lists nor one
that went quiet keeps the entries of its expired sessions beyond a pass
(the sweep's docstring says how long one takes). Neither set has a TTL:
an append renews a live session without touching the tenant's slot.

SESSION_PARTS lists the session's parts, and every script that changes a
session takes all of them (session_keys), so none outlives or predeceases
the others: each that changes a live session renews every one's TTL (pins and
the turn index expired while appends kept the session alive), creating a
session clears all but ``meta`` (so an expired or deleted one's pins or
index never come back under its id), and a deletion removes all at once.
The content-keyed summaries (``mg:context:<tenant>:summary:<digest>``,
summary_copy_key()) lie in other slots and are never among them: they are
shared, and expire; a delete removes those its summaries name, with a call
of its own after its script (drop_summary_copies), as does a summary's
write those it leaves unnamed (services/context/summaries.py).

Sessions owing summaries' usage are listed in ``mg:context:summary_usage:owed``
(OWED_KEY), one sorted set for every session of every tenant, so that one
read finds them all: member ``["<tenant>", "<session id>"]`` (JSON), scored
in ms of Redis's clock. It lies outside every session's slot, so no script
over a session can write it; its writes are ordered against theirs instead:

- A summary's writer marks its session (``_MARK_OWED``: the score becomes
  now, and always changes) before the script that adds to ``unbilled``.
- A claim (``_CLAIM_OWED``, ContextService.ClaimOwedSummaryUsage) names the
  sessions scored at least ``owed_for_ms`` ago and scores them now, so that
  no other claim names them for as long (routers sweeping at once take
  different sessions; one that stops before its take, or before it
  acknowledges a held one, leaves the session to a claim after that), and reads their ``unbilled`` and
  ``unbilled_held``. A session with neither (taken and acknowledged, or its
  record expired) leaves the set (``_DROP_OWED``) if its
  score is still the one the claim gave it: a writer that marked it since
  changed it, so a session whose ``unbilled`` a writer added to after the
  claim read it stays.
- The gap: a writer that stalled for more than ``owed_for_ms`` between its
  mark and its write, while a claim found the session with no ``unbilled``
  and dropped it. An append that finds ``unbilled`` or a held take marks
  its session too (keeping the score of one listed already), which also
  lists what a replica of a version before the set counted, or one whose
  held take a claim of a version before the hold dropped.

Compaction (``compact``, the soft cap): the bodies of a session's oldest
turns, once a summary covers them, are replaced by empty strings in
``...:turns`` (positions stay, so indices, pins and summaries keep their
meaning), their rows leave the turn index's vectors, and ``meta`` records
``compacted`` (how many leading turns) and ``compacted_version`` (the
version it happened at). System and pinned turns keep their bodies; a
pinned one loses its own when it is unpinned (turn_index._UNPIN). What
needed those bodies is refused with FAILED_PRECONDITION / VERSION_COMPACTED,
never answered differently: reading (assembling) at a version not after
``compacted_version`` (a prompt built then may have held them verbatim), a
revert to a version holding fewer than ``compacted`` turns, and a fork of
any version holding a compacted turn. Deleted rather than archived: an
archive would be a second copy of every old turn in Redis, which is what
the cap is there to bound, and the summary already stands for them.

Versions only grow: a revert makes a new version holding an older one's
turns, so a writer that read an older version is refused (ABORTED), never
answered with different turns under a version number it already knew.

Every change publishes ``<meta key> <new version>`` (or ``<meta key> -1``
for a deletion) on ``mg:context:changes``, from inside its script, so the
replicas' hot caches (services/context/hot_cache.py) drop what changed.

Token counts always cover a prefix of the turns: all of them, unless the
tokenizer or template was configured after some turns were stored; a reader
then counts the rest and stores the completed counts, once.

Every change is a Lua script, so a version check and the write it guards are
atomic.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import dataclasses
import json
import re
import time
import typing

import grpc
import numpy as np
import redis.asyncio as redis
import structlog

from meshgate import metrics, paging, redis_access, request_ids
from meshgate.common.v1 import common_pb2
from meshgate.config import summary_usage_ttl_s
from meshgate.errors import MeshgateError, not_found
from meshgate.reasons import Reason
from services.context import relevance

log = structlog.get_logger(__name__)

CHANGES_CHANNEL = "mg:context:changes"

# A span_digest (services/context/summaries.py), as a summaries hash names
# it: anything else there (a value damaged in Redis) names no content key.
_DIGEST = re.compile(r"[0-9a-f]{64}")

# The turn index's postings fields that hold its vectors' size, what
# made them, how many writes left a live turn without a vector, and that
# count as of the last backfill that found them all filled
# (services/context/turn_index.py), not terms: a field that starts with a
# zero byte is none.
DIMENSIONS_FIELD = "\0dim"
EMBEDDER_FIELD = "\0embedder"
GAPS_FIELD = "\0gaps"
GAPS_SETTLED_FIELD = "\0gaps_settled"

# Every part of a session's keys (see the module's docstring), in the
# order each script's KEYS hold them (session_keys): KEYS[1] is meta,
# KEYS[2] turns, KEYS[3] turn_ids, KEYS[4] versions, KEYS[5] pins, KEYS[6]
# to KEYS[9] the turn index's roles, lengths, vectors and postings,
# KEYS[10] summaries.
SESSION_PARTS = (
    "meta",
    "turns",
    "turn_ids",
    "versions",
    "pins",
    "ix:roles",
    "ix:lengths",
    "ix:vectors",
    "ix:postings",
    "summaries",
)

# Shared by every script that changes a live session: all of its parts
# (the first #SESSION_PARTS KEYS; a script may take other keys of its slot
# after them, as the usage record) live as long as it does. EXPIRE on an
# absent key does nothing.
# With no TTL (0: sessions are kept forever) the keys are made persistent:
# a session written while a TTL was configured carries it, and doing
# nothing left it to expire that long after its last write under the old
# setting, mid-conversation, leaving behind (for good) its keys created
# since, as its pins.
RENEW = f"""
local function renew(ttl)
  for i = 1, {len(SESSION_PARTS)} do
    if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) else redis.call('PERSIST', KEYS[i]) end
  end
end
"""

# Shared by the scripts that change which turns the postings may name
# (turn_index.py's write, a revert, a compaction): drops every posting of a
# turn position in [from, to) from the postings hash (its dimension field
# aside), and any term left with none.
DROP_POSTINGS = """
local function drop_postings(postings_key, from, to)
  local fields = redis.call('HGETALL', postings_key)
  for i = 1, #fields, 2 do
    if string.byte(fields[i], 1) ~= 0 then
      local kept = {}
      local value = fields[i + 1]
      for at = 1, #value, 4 do
        local position = math.floor(struct.unpack('<I4', string.sub(value, at, at + 3)) / 16)
        if position < from or position >= to then table.insert(kept, string.sub(value, at, at + 3)) end
      end
      if #kept == 0 then redis.call('HDEL', postings_key, fields[i])
      elseif #kept * 4 < #value then redis.call('HSET', postings_key, fields[i], table.concat(kept)) end
    end
  end
end
"""

# What a session holds in Redis beside its turns, as context.max_bytes_per_tenant
# counts it (BESIDE_TURNS; the turns' own: SESSION_OVERHEAD_BYTES below): a
# pin took 5-111 bytes beyond its text (20-byte to 4 KB facts); a summary
# 366-1,155 beyond its JSON twice, its session's summaries hash's and its
# content key's (services/context/summaries.py), for 0.4-2 KB summaries;
# measured on redis-server 6.2 (jemalloc), rounded up.
PIN_OVERHEAD_BYTES = 128
SUMMARY_OVERHEAD_BYTES = 1024

# Shared by the scripts that report what a session holds for the tenant's
# bound (TenantHoldings): what it holds beside its turns, its pins' texts
# and its summaries' JSON twice (their content keys' copies), with their
# overheads. Read whole: at most turn_index.MAX_PINS pins of 4 KiB, and a
# summary per span of turns.
BESIDE_TURNS = f"""
local function beside_turns(pins_key, summaries_key)
  local total = 0
  for _, pin in ipairs(redis.call('LRANGE', pins_key, 0, -1)) do
    total = total + #pin + {PIN_OVERHEAD_BYTES}
  end
  for _, span in ipairs(redis.call('HKEYS', summaries_key)) do
    total = total + #span + 2 * redis.call('HSTRLEN', summaries_key, span) + {SUMMARY_OVERHEAD_BYTES}
  end
  return total
end
"""

# OOM_FIRST: a script that writes must make its first write one that
# Redis refuses when full (HSET, SET, RPUSH...; under noeviction, past
# maxmemory). Redis checks a script for memory at its first write only (it
# cannot stop one halfway), and a write that may free memory (DEL, EXPIRE)
# passes: _CREATE and _FORK_CREATE cleared an id's leftovers first, so
# neither was ever refused, and one tenant creating sessions took a full
# Redis past its maxmemory without end (tests/integration/test_redis_refusals.py).

# Shared by the scripts that make a session whose id may be drawn from a
# request id (``digest``: its request's, '' for none; the module's
# docstring, ``request_digest``): where one lives at the id, {2, its
# creation time, the digest of the request that made it (false for none)},
# for the caller to answer a resend with it or refuse another request;
# {0} where the id is not a request id's. False where there is none: the
# script makes it.
# A session made under a request id and deleted leaves its request's
# digest (deleted_key(), DELETED_MARK_TTL_S): {3, that digest} for a send of
# a request id whose session is gone that way, for the caller to refuse it,
# which made it again, empty, under the deleted id (a review: every other
# holder of the id wrote into it again, and a resent fork came back).
_MADE_UNDER = """
local function made_under(meta_key, digest, deleted_key)
  if redis.call('EXISTS', meta_key) == 0 then
    if digest ~= '' then
      local gone = redis.call('GET', deleted_key)
      if gone then return {3, gone} end
    end
    return false
  end
  if digest == '' then return {0} end
  return {2, redis.call('HGET', meta_key, 'create_time_ms'), redis.call('HGET', meta_key, 'request_digest')}
end
"""

# KEYS: session_keys, then deleted_key. ARGV: ttl_s, the digest of the
# request whose request id the session's id is drawn from, else ''. Returns
# {1, creation time}, {2, ...} where a session lives at the id, drawn from a
# request id, {3, ...} where it was deleted (_MADE_UNDER; nothing written),
# or {0} if the id is taken.
_CREATE = (
    RENEW
    + _MADE_UNDER
    + """
local made = made_under(KEYS[1], ARGV[2], KEYS[#KEYS])
if made then return made end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
-- Version 0 holds no turns, and so no bytes. Written first: see OOM_FIRST.
redis.call('HSET', KEYS[1], 'version', 0, 'create_time_ms', now, 'update_time_ms', now, 'bytes', 0)
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'request_digest', ARGV[2]) end
-- Whatever an expired or deleted session of the same id left (turns, pins,
-- index, summaries) must not leak into this one.
redis.call('DEL', unpack(KEYS, 2))
redis.call('SET', KEYS[4], struct.pack('<I4', 0))
renew(tonumber(ARGV[1]))
return {1, now}
"""
)

# Shared by the scripts that keep meta's ``bytes``: the bytes turns
# ``first`` to ``last`` (inclusive; -1: the last one) hold. Read in slices
# of 64 turns, so no one reply inside Redis holds more than 64 MiB (a turn's
# content is at most 1 MiB, services/context/servicer.py).
_TURN_BYTES = """
local function turn_bytes(turns_key, first, last)
  if last < 0 then last = redis.call('LLEN', turns_key) + last end
  local total = 0
  for from = first, last, 64 do
    for _, turn in ipairs(redis.call('LRANGE', turns_key, from, math.min(from + 63, last))) do
      total = total + #turn
    end
  end
  return total
end
"""

# KEYS: session_keys, then the usage record, then the append holds. ARGV:
# expected version ("" = append at the end whatever the version), turn id
# ("" = none; also the hold it releases, whatever it answers), ttl_s, turn
# count n, the most turns the session may hold (0 = no cap), the most bytes
# its turns may hold (0 = no cap; -1 = no cap, but count them: for the
# tenant's bound, TenantHoldings), the SHA-256 of the turn's API key ("" =
# none), n turns, then pairs of (counts field, packed counts of the n turns).
# Returns {1, new version, bytes held now (false when the session's bytes
# stay uncounted: stored before the count, no byte cap), create_time_ms,
# 1 if the session's usage record or meta holds ``unbilled``, or the record
# ``unbilled_held`` (else 0), the turns it holds now},
# {0} if there is no session, {-1, current version} on a version mismatch,
# {2, version, create_time_ms} if the turn id was applied before (nothing
# is appended again), {-2, turns held} or {-6, bytes held} if the n turns
# would take the session past its cap of turns or of bytes (nothing is
# appended).
_APPEND = (
    _TURN_BYTES
    + RENEW
    + """
-- The turn's hold (_HOLD) ends with its append, whatever the append
-- answers: the turn is stored, or refused for good. Deleted last on the
-- path that writes (OOM_FIRST: an HDEL first would let the RPUSH pass a
-- full Redis).
local function released(reply)
  if ARGV[2] ~= '' then redis.call('HDEL', KEYS[12], ARGV[2]) end
  return reply
end
local version = redis.call('HGET', KEYS[1], 'version')
if not version then return released({0}) end
if ARGV[2] ~= '' then
  local applied = redis.call('HGET', KEYS[3], ARGV[2])
  if applied then return released({2, tonumber(applied), redis.call('HGET', KEYS[1], 'create_time_ms')}) end
end
if ARGV[1] ~= '' and version ~= ARGV[1] then return released({-1, tonumber(version)}) end
local n = tonumber(ARGV[4])
local stored = redis.call('LLEN', KEYS[2])
local cap = tonumber(ARGV[5])
-- The cap counts live turns: compacted ones no longer weigh on anything.
-- Not the holds (the module's docstring): this append's own was granted
-- beside them, and one that has none appends where the caps allow.
local live = stored - tonumber(redis.call('HGET', KEYS[1], 'compacted') or '0')
if cap > 0 and live + n > cap then return released({-2, live}) end
local max_bytes = tonumber(ARGV[6])
local added = 0
for i = 8, 7 + n do added = added + #ARGV[i] end
local held_bytes = tonumber(redis.call('HGET', KEYS[1], 'bytes'))
if not held_bytes and max_bytes ~= 0 then
  -- Stored before the count (see the module's docstring): counted once, now.
  held_bytes = turn_bytes(KEYS[2], 0, -1)
  redis.call('HSET', KEYS[1], 'bytes', held_bytes)
end
if max_bytes > 0 and held_bytes + added > max_bytes then return released({-6, held_bytes}) end
-- One RPUSH: the turn's messages stay adjacent whatever else is appended.
redis.call('RPUSH', KEYS[2], unpack(ARGV, 8, 7 + n))
-- Uncounted (an old session, no cap) stays uncounted until a cap needs it.
if held_bytes then
  held_bytes = held_bytes + added
  redis.call('HSET', KEYS[1], 'bytes', held_bytes)
end
for i = 8 + n, #ARGV, 2 do
  local counts = redis.call('HGET', KEYS[1], ARGV[i]) or ''
  -- Extend only counts that cover every stored turn, so they stay a prefix.
  if #counts == 4 * stored then
    redis.call('HSET', KEYS[1], ARGV[i], counts .. ARGV[i + 1])
  end
end
local t = redis.call('TIME')
local new_version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'update_time_ms', t[1] * 1000 + math.floor(t[2] / 1000))
if ARGV[2] ~= '' then redis.call('HSET', KEYS[3], ARGV[2], new_version) end
-- Whom the session's summaries' usage is billed to from now on.
redis.call('HSET', KEYS[1], 'latest_key', ARGV[7])
-- Extend the history only where it covers every version (not for sessions
-- stored before it existed), so offset 4v always means version v.
if redis.call('STRLEN', KEYS[4]) == 4 * tonumber(version) + 4 then
  redis.call('APPEND', KEYS[4], struct.pack('<I4', stored + n))
end
redis.call('PUBLISH', 'mg:context:changes', KEYS[1] .. ' ' .. new_version)
renew(tonumber(ARGV[3]))
-- The count as this append left it, so a hot copy takes it rather than
-- add sizes of its own to a count a compaction may have changed since.
-- The life it landed in, for the index write that follows (turn_index._WRITE).
-- Whether summaries' usage waits, for the owed set's backstop (the module's docstring).
return released({
  1, new_version, held_bytes or false, redis.call('HGET', KEYS[1], 'create_time_ms'),
  math.max(
    redis.call('HEXISTS', KEYS[11], 'unbilled'), redis.call('HEXISTS', KEYS[11], 'unbilled_held'),
    redis.call('HEXISTS', KEYS[1], 'unbilled')
  ),
  stored + n
})
"""
)

# The longest an append hold lasts (AppendReservation.hold_for_ms; longer
# is taken as this): an hour, twelve times the longest turn the router
# runs by default (router.max_generation_s, 300 s, then its append's
# tries), so no turn of a router configured sanely loses its hold early,
# and the room of one whose router died comes back within the hour at
# the latest, where its deadline did not bring it back sooner. A hold
# that ends early costs nothing stored: its append lands where the caps
# allow, as before the holds.
MAX_APPEND_HOLD_MS = 3600 * 1000

# KEYS: meta, turns, turn_ids, the append holds. ARGV: hold id, how long it
# holds (ms, at most MAX_APPEND_HOLD_MS), turn count n, size in bytes, the
# most turns the session may hold (0 = no cap), the most bytes its turns may
# hold (0 = no cap). Counts the holds in force but any of this hold id (a
# resend of its assembly replaces it), deletes those that are not (their
# time passed; their turn appended, which an append by a replica of before
# the holds did not release; made in an earlier life of the session id,
# deleted or expired since: a hold keeps its session's create_time_ms),
# and holds n turns of that size for the hold id unless, with the holds,
# they would take the session past a cap: the append's check (_APPEND),
# with the turns and bytes held for appends still to come (refused, it
# deletes any hold of its own id, a resend's first). Returns {1} when
# it holds them, {0} if there is no session, {-2, live turns, turns held}
# or {-6, bytes, bytes held} past the cap of turns or of bytes (nothing
# held). A session whose bytes were never counted is not checked by bytes
# (its append counts them, once: _APPEND).
_HOLD = """
local version = redis.call('HGET', KEYS[1], 'version')
if not version then return {0} end
local life = redis.call('HGET', KEYS[1], 'create_time_ms') or ''
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local held_turns, held_bytes, latest, gone = 0, 0, 0, {}
local holds = redis.call('HGETALL', KEYS[4])
for i = 1, #holds, 2 do
  if holds[i] ~= ARGV[1] then
    local untils, turns, bytes, made_in = string.match(holds[i + 1], '^(%d+) (%d+) (%d+) (%S*)$')
    if untils and tonumber(untils) > now and made_in == life
      and redis.call('HEXISTS', KEYS[3], holds[i]) == 0 then
      held_turns = held_turns + tonumber(turns)
      held_bytes = held_bytes + tonumber(bytes)
      latest = math.max(latest, tonumber(untils))
    else
      table.insert(gone, holds[i])
    end
  end
end
local n, size = tonumber(ARGV[3]), tonumber(ARGV[4])
local max_turns, max_bytes = tonumber(ARGV[5]), tonumber(ARGV[6])
local live = redis.call('LLEN', KEYS[2]) - tonumber(redis.call('HGET', KEYS[1], 'compacted') or '0')
local reply
if max_turns > 0 and live + held_turns + n > max_turns then reply = {-2, live, held_turns} end
local stored_bytes = tonumber(redis.call('HGET', KEYS[1], 'bytes'))
if not reply and max_bytes > 0 and stored_bytes and stored_bytes + held_bytes + size > max_bytes then
  reply = {-6, stored_bytes, held_bytes}
end
if not reply then
  -- Written first (OOM_FIRST); the key lives as long as its latest hold.
  local untils = now + tonumber(ARGV[2])
  redis.call('HSET', KEYS[4], ARGV[1], untils .. ' ' .. n .. ' ' .. size .. ' ' .. life)
  redis.call('PEXPIREAT', KEYS[4], math.max(latest, untils))
  reply = {1}
end
-- Refused, a resend of an assembly whose first hold was written (its reply
-- lost) must not leave that hold behind: the turn is refused for good.
if reply[1] ~= 1 then table.insert(gone, ARGV[1]) end
if #gone > 0 then redis.call('HDEL', KEYS[4], unpack(gone)) end
return reply
"""

# KEYS: the usage record, meta. ARGV: the take id ("" = none), the
# record's TTL (config.summary_usage_ttl_s), "1" to hold what it takes until acknowledged.
# Takes the session's ``unbilled`` (the record's, and meta's that an older
# version left) for the router to bill, and keeps what it took in the
# record (the module's docstring): a held take's as ``unbilled_held``, which
# every held take answers, under its id, until _ACKNOWLEDGE_TAKE moves it to
# ``unbilled_take``; another take's as ``unbilled_take``, for a take of the
# same id, which answers it again and takes nothing more. Returns {1, what
# it took ('' for nothing), the id of the take it answers}, or {0} if there
# is neither record nor session.
_TAKE_UNBILLED = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) == 0 then return {0} end
local hold = ARGV[3] == '1'
if hold then
  local held = redis.call('HGET', KEYS[1], 'unbilled_held')
  if held then
    local space = string.find(held, ' ', 1, true)
    return {1, string.sub(held, space + 1), string.sub(held, 1, space - 1)}
  end
end
if ARGV[1] ~= '' then
  local by = ARGV[1] .. ' '
  for i = 1, 2 do
    local last = redis.call('HGET', KEYS[i], 'unbilled_take') or ''
    if string.sub(last, 1, #by) == by then return {1, string.sub(last, #by + 1), ARGV[1]} end
  end
end
local taken, any = {}, false
for i = 1, 2 do
  local raw = redis.call('HGET', KEYS[i], 'unbilled')
  if raw then
    any = true
    for model, spent in pairs(cjson.decode(raw)) do
      local sum = taken[model] or {0, 0, 0}
      taken[model] = {sum[1] + spent[1], sum[2] + spent[2], sum[3] + spent[3]}
    end
  end
  redis.call('HDEL', KEYS[i], 'unbilled', 'unbilled_take')
end
local unbilled = any and cjson.encode(taken) or ''
local kept
if hold then
  -- A held take that took nothing holds nothing: there is nothing to bill.
  if unbilled ~= '' then kept = 'unbilled_held' end
elseif ARGV[1] ~= '' then
  kept = 'unbilled_take'
end
if kept then
  redis.call('HSET', KEYS[1], kept, ARGV[1] .. ' ' .. unbilled)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return {1, unbilled, ARGV[1]}
"""

# KEYS: the usage record. ARGV: a take id. Ends the hold of that take, if the
# record holds it (_TAKE_UNBILLED): the next held take takes anew, but for a
# retry of this one (its reply lost), which answers it again, billed already.
_ACKNOWLEDGE_TAKE = """
local held = redis.call('HGET', KEYS[1], 'unbilled_held')
if held and string.sub(held, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
  redis.call('HSET', KEYS[1], 'unbilled_take', held)
  redis.call('HDEL', KEYS[1], 'unbilled_held')
end
"""

# The owed set (the module's docstring): its key, and its scripts, each over
# it alone. Their clock is Redis's, in ms, as the sessions' times are.
OWED_KEY = "mg:context:summary_usage:owed"
# The claim scripts one claim runs at most, each in place of the sessions the
# one before found owing nothing (OwedSessions.claim).
CLAIM_ROUNDS = 8

# KEYS: the owed set. ARGV: the session's member, "1" to keep the score of a
# member the set holds (an append's mark) or "" to move it to now, to a
# score other than its last (a summary writer's). Returns nothing.
_MARK_OWED = """
local before = redis.call('ZSCORE', KEYS[1], ARGV[1])
if before and ARGV[2] == '1' then return end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if before then now = math.max(now, tonumber(before) + 1) end
redis.call('ZADD', KEYS[1], now, ARGV[1])
"""

# KEYS: the owed set. ARGV: owed_for_ms, the most members to name. Returns
# {now, the members scored at least owed_for_ms ago, longest owing first},
# each of them scored now (claimed until owed_for_ms from now).
_CLAIM_OWED = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = redis.call(
  'ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2])
)
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], now, member) end
return {now, unpack(due)}
"""

# KEYS: the owed set. ARGV: the score a claim gave, then members it found
# owing nothing. Removes each still scored so (no summary writer marked it
# since the claim).
_DROP_OWED = """
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[1]) then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
"""

# Shared by the scripts that look a version up. Sets `held`, the number of
# turns the session held at version tonumber(target) of current version
# `version`, or nil when that version is unknown or was undone by a revert.
_TURNS_AT = """
local function turns_at(versions_key, version, target)
  if target > tonumber(version) then return nil end
  local raw = redis.call('GETRANGE', versions_key, 4 * target, 4 * target + 3)
  if #raw < 4 then return nil end
  local held = struct.unpack('<I4', raw)
  if held == 4294967295 then return nil end
  return held
end
"""

# Whether reading `target` would meet compacted turns' missing bodies in a
# way the reader could not tell: see the module's docstring.
_COMPACTED = """
local function compacted_at(meta_key)
  return tonumber(redis.call('HGET', meta_key, 'compacted') or '0'),
    tonumber(redis.call('HGET', meta_key, 'compacted_version') or '-1')
end
"""

# KEYS: session_keys. ARGV: version to read ("" = the
# current one). Returns {1, version, meta as HGETALL, turns}, {0} if there
# is no session, {-3, current version} if that version is unknown or undone,
# {-5, compacted_version} if it was compacted since.
# Counts fields come whole; the reader cuts them to the turns returned.
_READ = (
    _TURNS_AT
    + _COMPACTED
    + """
local meta = redis.call('HGETALL', KEYS[1])
if #meta == 0 then return {0} end
local version = redis.call('HGET', KEYS[1], 'version')
local compacted, compacted_version = compacted_at(KEYS[1])
if ARGV[1] ~= '' and compacted > 0 and tonumber(ARGV[1]) <= compacted_version then
  return {-5, compacted_version}
end
-- Its time left (PTTL; -1: kept forever), by which a copy in memory goes.
local left = redis.call('PTTL', KEYS[1])
if ARGV[1] == '' or ARGV[1] == version then
  return {1, tonumber(version), meta, redis.call('LRANGE', KEYS[2], 0, -1), left}
end
local held = turns_at(KEYS[4], version, tonumber(ARGV[1]))
if not held then return {-3, tonumber(version)} end
local turns = {}
if held > 0 then turns = redis.call('LRANGE', KEYS[2], 0, held - 1) end
return {1, tonumber(ARGV[1]), meta, turns, left}
"""
)

# Cuts every per-turn field of a meta hash (packed, 4 bytes a turn) to the
# first `held` turns.
_CUT_COUNTS = """
local function cut_counts(meta_key, target_key, held)
  local fields = redis.call('HGETALL', meta_key)
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 7) == 'tokens:' then
      redis.call('HSET', target_key, fields[i], string.sub(fields[i + 1], 1, 4 * held))
    end
  end
end
"""

# KEYS: session_keys. ARGV: version to restore, expected
# version ("" = whatever the current one), ttl_s. Pins of the turns it
# drops go with them (else the turn appended at that index next would be
# pinned in their place). Returns {1, new version, the bytes its turns hold
# (false when uncounted), the turns it holds, the bytes beside them
# (BESIDE_TURNS)},
# {0} if there is no session, {-1, current version} on a version mismatch,
# {-3, current version} if the version to restore is unknown or undone,
# {-5, compacted version} if it held fewer turns than were compacted since.
_REVERT = (
    _TURNS_AT
    + _TURN_BYTES
    + BESIDE_TURNS
    + _CUT_COUNTS
    + _COMPACTED
    + RENEW
    + DROP_POSTINGS
    + """
local version = redis.call('HGET', KEYS[1], 'version')
if not version then return {0} end
if ARGV[2] ~= '' and version ~= ARGV[2] then return {-1, tonumber(version)} end
local target = tonumber(ARGV[1])
local held = turns_at(KEYS[4], version, target)
if not held then return {-3, tonumber(version)} end
local compacted, compacted_version = compacted_at(KEYS[1])
-- The turns kept stay those the summaries cover: only a revert into them is refused.
if held < compacted then return {-5, compacted_version} end
-- The turns past `held` leave: so do their bytes (if counted; see the module's docstring).
local held_bytes = tonumber(redis.call('HGET', KEYS[1], 'bytes'))
if held_bytes then
  -- Never below 0: see the compaction script.
  held_bytes = math.max(0, held_bytes - turn_bytes(KEYS[2], held, -1))
  redis.call('HSET', KEYS[1], 'bytes', held_bytes)
end
if held == 0 then redis.call('DEL', KEYS[2]) else redis.call('LTRIM', KEYS[2], 0, held - 1) end
for _, pin in ipairs(redis.call('LRANGE', KEYS[5], 0, -1)) do
  if string.sub(pin, 1, 2) == 't:' and tonumber(string.sub(pin, 3)) >= held then
    redis.call('LREM', KEYS[5], 0, pin)
  end
end
-- So does their turn index (roles, term counts, vectors, postings): a
-- later append whose index write is lost must leave its positions reading
-- unwritten, not as the undone turns'.
local function keep_prefix(key, bytes)
  if bytes <= 0 then redis.call('DEL', key)
  elseif redis.call('STRLEN', key) > bytes then
    redis.call('SET', key, redis.call('GETRANGE', key, 0, bytes - 1), 'KEEPTTL')
  end
end
keep_prefix(KEYS[6], held)
keep_prefix(KEYS[7], 2 * held)
local dim = tonumber(redis.call('HGET', KEYS[9], '\\0dim') or '0')
if dim > 0 then keep_prefix(KEYS[8], dim * (held - compacted)) end
drop_postings(KEYS[9], held, math.huge)
cut_counts(KEYS[1], KEYS[1], held)
-- The versions after the target name turns that are gone now.
local undone = tonumber(version) - target
if undone > 0 then
  redis.call('SETRANGE', KEYS[4], 4 * (target + 1), string.rep('\\255\\255\\255\\255', undone))
end
redis.call('APPEND', KEYS[4], struct.pack('<I4', held))
-- An append undone here may be retried, and must then apply again.
local applied = redis.call('HGETALL', KEYS[3])
for i = 1, #applied, 2 do
  if tonumber(applied[i + 1]) > target then redis.call('HDEL', KEYS[3], applied[i]) end
end
local t = redis.call('TIME')
local new_version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'update_time_ms', t[1] * 1000 + math.floor(t[2] / 1000))
redis.call('PUBLISH', 'mg:context:changes', KEYS[1] .. ' ' .. new_version)
renew(tonumber(ARGV[3]))
return {1, new_version, held_bytes or false, held, beside_turns(KEYS[5], KEYS[10])}
"""
)

# A fork is two scripts, one per session: on a Redis Cluster the source's
# and the fork's keys hash to different slots, and a script may only touch
# one. That costs no atomicity a reader can see: the turns of a version never
# change once written (a revert makes a new version), so the source read in
# one instant and written into the fork in another is the same.
#
# The fork takes the source's turn index (services/context/turn_index.py)
# of the turns it copies, so its first assembly plans from the index as the
# source's would, instead of reading and scoring every turn's text on every
# call (a fork's appends index only their own turns). The positions below
# the fork's turn count hold what the source wrote for those turns: a
# version's turns never change, and a revert below them would have undone
# the version forked at. Postings name later positions too; fork() keeps
# only the copied turns' ones, or the fork's own later turns would inherit them.
#
# The fork takes the source's pins as they are now (pins have no versions):
# its facts, and its pins of turns the fork holds; pins of later turns stay
# behind, as a revert drops the pins of the turns it undoes.
#
# KEYS: the source's session_keys. ARGV: version to fork
# at. Returns {1, turns at that version, flat (counts field, counts of those
# turns) pairs, the history up to that version, then the index of those
# turns: roles, lengths, vector dimensions ('' for none), vectors, their
# embedder ('' for none), flat (term, packed postings) pairs, then the pins
# the fork takes}, {0} if there is no source,
# {-3, current version} if the version is unknown or undone, {-5, compacted
# version} if it holds compacted turns (the fork would have neither their
# texts nor the summaries standing for them).
_FORK_SOURCE = (
    _TURNS_AT
    + _COMPACTED
    + """
local version = redis.call('HGET', KEYS[1], 'version')
if not version then return {0} end
local target = tonumber(ARGV[1])
local held = turns_at(KEYS[4], version, target)
if not held then return {-3, tonumber(version)} end
local compacted, compacted_version = compacted_at(KEYS[1])
if compacted > 0 and held > 0 then return {-5, compacted_version} end
local turns = {}
if held > 0 then turns = redis.call('LRANGE', KEYS[2], 0, held - 1) end
local counts = {}
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 7) == 'tokens:' then
    counts[#counts + 1] = fields[i]
    counts[#counts + 1] = string.sub(fields[i + 1], 1, 4 * held)
  end
end
local roles, lengths, vectors, postings = '', '', '', {}
local dim = redis.call('HGET', KEYS[9], '\\0dim') or ''
local embedder = redis.call('HGET', KEYS[9], '\\0embedder') or ''
if held > 0 then
  -- GETRANGE 0 -1 would be the whole string: only with turns to copy.
  roles = redis.call('GETRANGE', KEYS[6], 0, held - 1)
  lengths = redis.call('GETRANGE', KEYS[7], 0, 2 * held - 1)
  if dim ~= '' then vectors = redis.call('GETRANGE', KEYS[8], 0, tonumber(dim) * held - 1) end
  postings = redis.call('HGETALL', KEYS[9])
end
local pins = {}
for _, pin in ipairs(redis.call('LRANGE', KEYS[5], 0, -1)) do
  if string.sub(pin, 1, 2) ~= 't:' or tonumber(string.sub(pin, 3)) < held then pins[#pins + 1] = pin end
end
return {1, turns, counts, redis.call('GETRANGE', KEYS[4], 0, 4 * target + 3),
  roles, lengths, dim, vectors, embedder, postings, pins}
"""
)

# KEYS: the fork's session_keys. ARGV: version it starts at, ttl_s, its
# history, turn count n, its index's roles, lengths, vector dimensions (''
# for none), vectors and their embedder ('' for none), the number c of
# (counts field, counts) pairs, the number p of pins, the digest of the
# request whose request id the fork's id is drawn from ('' for none), n
# turns, c such pairs, p pins, then (term, packed postings) pairs.
# It has no turn ids (those were the source's appends), and its
# ``bytes`` are its turns' (a prefix of the source's: never past the
# source's cap). KEYS: the fork's session_keys, then its deleted_key.
# Returns {1, creation time, the bytes beside its turns (BESIDE_TURNS: the
# pins it took)}, {2, ...} where a session lives at the id, drawn from a
# request id, {3, ...} where it was deleted (_MADE_UNDER; nothing written),
# or {0} if the fork's id is taken.
_FORK_CREATE = (
    RENEW
    + BESIDE_TURNS
    + _MADE_UNDER
    + """
local made = made_under(KEYS[1], ARGV[12], KEYS[#KEYS])
if made then return made end
local n = tonumber(ARGV[4])
local turns_at = 13
local counts_at = turns_at + n
local pins_at = counts_at + 2 * tonumber(ARGV[10])
local postings_at = pins_at + tonumber(ARGV[11])
local held_bytes = 0
for i = turns_at, counts_at - 1 do held_bytes = held_bytes + #ARGV[i] end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
-- Written first: see OOM_FIRST.
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'create_time_ms', now, 'update_time_ms', now,
  'bytes', held_bytes)
if ARGV[12] ~= '' then redis.call('HSET', KEYS[1], 'request_digest', ARGV[12]) end
-- As _CREATE: nothing of an earlier session of this id stays.
redis.call('DEL', unpack(KEYS, 2))
-- In slices: unpack() of a long list would overflow Lua's stack.
for first = turns_at, counts_at - 1, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, first, math.min(first + 999, counts_at - 1)))
end
for i = counts_at, pins_at - 1, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if postings_at > pins_at then redis.call('RPUSH', KEYS[5], unpack(ARGV, pins_at, postings_at - 1)) end
redis.call('SET', KEYS[4], ARGV[3])
-- The index of the copied turns; nothing is written where there is none.
if ARGV[5] ~= '' then redis.call('SET', KEYS[6], ARGV[5]) end
if ARGV[6] ~= '' then redis.call('SET', KEYS[7], ARGV[6]) end
if ARGV[7] ~= '' then redis.call('HSET', KEYS[9], '\\0dim', ARGV[7]) end
if ARGV[8] ~= '' then redis.call('SET', KEYS[8], ARGV[8]) end
-- The fork's rows are its source's, as comparable (or not) as there.
if ARGV[9] ~= '' then redis.call('HSET', KEYS[9], '\\0embedder', ARGV[9]) end
-- In slices, as the turns: one HSET per term cost ~160 ms for 60k terms.
for first = postings_at, #ARGV, 1000 do
  redis.call('HSET', KEYS[9], unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
renew(tonumber(ARGV[2]))
return {1, now, beside_turns(KEYS[5], KEYS[10])}
"""
)

# KEYS: session_keys. ARGV: the version the caller read, how many leading
# turns to compact, ttl_s, the create_time_ms it read ("" = unchecked), how
# many of the newest versions keep their appends' turn ids (TURN_IDS_KEPT),
# then the positions of system turns (their bodies stay, as pinned turns'
# do). Returns how many turns are compacted now, or -1 if those turns may
# have changed since (nothing done).
# The newest appends whose turn ids a compaction keeps, whatever it empties:
# a retry after a lost reply comes within seconds, 64 appends later at the
# most in any session seen.
TURN_IDS_KEPT = 64

_COMPACT = (
    RENEW
    + DROP_POSTINGS
    + """
local version = redis.call('HGET', KEYS[1], 'version')
if not version then return -1 end
-- Another session of the same id (deleted and created again since the
-- read): its turns are not those the caller summarized.
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'create_time_ms') ~= ARGV[4] then return -1 end
local read, upto = tonumber(ARGV[1]), tonumber(ARGV[2])
if tonumber(version) ~= read then
  -- Appends since the read leave the first turns as they were; a revert to
  -- fewer than `upto` turns does not. A session without a history cannot tell.
  if redis.call('STRLEN', KEYS[4]) ~= 4 * tonumber(version) + 4 then return -1 end
  local since = redis.call('GETRANGE', KEYS[4], 4 * (read + 1), -1)
  for at = 1, #since, 4 do
    if struct.unpack('<I4', string.sub(since, at, at + 3)) < upto then return -1 end
  end
end
local from = tonumber(redis.call('HGET', KEYS[1], 'compacted') or '0')
if upto <= from then return from end
local keep = {}
for i = 6, #ARGV do keep[tonumber(ARGV[i])] = true end
for _, pin in ipairs(redis.call('LRANGE', KEYS[5], 0, -1)) do
  if string.sub(pin, 1, 2) == 't:' then keep[tonumber(string.sub(pin, 3))] = true end
end
-- An emptied body's bytes leave the count (if counted; see the module's
-- docstring), read in slices of 64 as turn_bytes does: one LRANGE rather
-- than an LINDEX a turn, each of which walks the list from its end.
local held_bytes = tonumber(redis.call('HGET', KEYS[1], 'bytes'))
for slice = from, upto - 1, 64 do
  local bodies = redis.call('LRANGE', KEYS[2], slice, math.min(slice + 63, upto - 1))
  for offset, body in ipairs(bodies) do
    local i = slice + offset - 1
    if not keep[i] and body ~= '' then
      if held_bytes then held_bytes = held_bytes - #body end
      redis.call('LSET', KEYS[2], i, '')
    end
  end
end
-- Never below 0: turns an old replica appended (during a rolling upgrade)
-- were never counted, yet leave the count here.
if held_bytes then redis.call('HSET', KEYS[1], 'bytes', math.max(0, held_bytes)) end
-- The vectors string starts at the first live turn (turn_index reads and
-- writes it so): drop the compacted turns' rows from its front.
local dim = tonumber(redis.call('HGET', KEYS[9], '\\0dim') or '0')
if dim > 0 and redis.call('EXISTS', KEYS[8]) == 1 then
  redis.call('SET', KEYS[8], redis.call('GETRANGE', KEYS[8], dim * (upto - from), -1), 'KEEPTTL')
end
-- Postings name live turns only, so a question's read is bounded by them.
drop_postings(KEYS[9], 0, upto)
redis.call('HSET', KEYS[1], 'compacted', upto, 'compacted_version', version)
-- An append's turn id goes once all its turns are compacted (the version it
-- made held no more than `upto` turns) and ARGV[5] newer versions followed it:
-- the ids would otherwise grow with the session's age, ~80 bytes an append,
-- for retries that cannot come so late (one would be appended again). The
-- newest appends keep theirs whatever is compacted (a hot window of 0 turns
-- compacts up to the last one, whose reply may have been lost). Ids of
-- undone versions are gone already (a revert drops them); a session without
-- history keeps its ids.
if redis.call('STRLEN', KEYS[4]) == 4 * tonumber(version) + 4 then
  local applied = redis.call('HGETALL', KEYS[3])
  for i = 1, #applied, 2 do
    local made = tonumber(applied[i + 1])
    if made <= tonumber(version) - tonumber(ARGV[5])
        and struct.unpack('<I4', redis.call('GETRANGE', KEYS[4], 4 * made, 4 * made + 3)) <= upto then
      redis.call('HDEL', KEYS[3], applied[i])
    end
  end
end
-- No new version (the turns the session holds are the same), but what a
-- hot copy holds is not: replicas drop it as they would a deleted one.
redis.call('PUBLISH', 'mg:context:changes', KEYS[1] .. ' -1')
renew(tonumber(ARGV[3]))
return upto
"""
)

# Shared by the scripts that read which content key (summary_copy_key) a
# summary of the session's summaries hash was copied to: the digest its
# JSON names (SummaryStore.put), or the value itself where a session stored
# before summaries were kept whole names only that; false for one written
# before its JSON named it, or one that will not decode.
SUMMARY_DIGEST = """
local function summary_digest(held)
  if not held then return false end
  if string.sub(held, 1, 1) ~= '{' then return held end
  local ok, summary = pcall(cjson.decode, held)
  if ok and type(summary) == 'table' and type(summary.digest) == 'string' then return summary.digest end
  return false
end
"""

# KEYS: session_keys, then the request record of a fork a replica of
# before made (fork_request_key), which must not answer a resend with the
# fork once it is deleted.
# Deletes all of them but deleted_key, whether or not the session exists
# (what an earlier session of its id left goes too), and returns {the deleted session's
# create_time_ms (nil where there was none), for its unlisting, the digests
# of its summaries' content keys (SUMMARY_DIGEST), for the caller to delete
# in their own slots}. A script rather than MULTI with PUBLISH: a cluster
# transaction takes keyed commands only.
# Then deleted_key, set (ARGV[1] s) to the digest of the request whose
# request id the session's id was drawn from, where it was (_MADE_UNDER).
_DELETE = (
    SUMMARY_DIGEST
    + """
local created = redis.call('HGET', KEYS[1], 'create_time_ms')
local made_by = redis.call('HGET', KEYS[1], 'request_digest')
local digests = {}
for _, held in ipairs(redis.call('HVALS', KEYS[10])) do
  local digest = summary_digest(held)
  if digest then table.insert(digests, digest) end
end
-- The mark last (KEYS[#KEYS]) is left as it is unless this delete sets it:
-- a second delete (a resend after a lost reply, the router's cleanup
-- retried) found no request digest and deleted the mark the first had
-- set, and a resend of the create then made the deleted session again.
redis.call('DEL', unpack(KEYS, 1, #KEYS - 1))
if made_by then redis.call('SET', KEYS[#KEYS], made_by, 'EX', ARGV[1]) end
redis.call('PUBLISH', 'mg:context:changes', KEYS[1] .. ' -1')
return {created, digests}
"""
)

# KEYS: meta. ARGV: version the counts were made at, counts field, packed
# counts, the create_time_ms of the session they were made for: the version
# alone does not tell a session from the next one of its id (deleted and
# created again meanwhile), whose turns at that version are others.
_FILL_COUNTS = """
if redis.call('HGET', KEYS[1], 'version') == ARGV[1]
    and redis.call('HGET', KEYS[1], 'create_time_ms') == ARGV[4] then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
end
return 0
"""

# KEYS: session_keys. Returns what the session holds as the tenant's bound
# counts it: {meta's ``bytes`` (false when uncounted), the turns it holds,
# the bytes beside them (BESIDE_TURNS)}, or {} if there is no session.
_HELD = (
    BESIDE_TURNS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
return {
  tonumber(redis.call('HGET', KEYS[1], 'bytes')) or false, redis.call('LLEN', KEYS[2]),
  beside_turns(KEYS[5], KEYS[10])
}
"""
)

# What a session holds in Redis beyond its turns' bytes (meta's
# ``bytes``), as context.max_bytes_per_tenant counts it: an empty session
# took 1,003 bytes of Redis's used_memory (its meta and version history
# 432, its fields in the tenant's record ~300, its two entries in the
# tenant's listing ~270, with 32-character ids; 512 counted it before the
# record's and the listing's share were, and a tenant creating sessions
# until refused held twice its bound); a
# turn beyond its encoding 58-100 in the store (its list entry, version
# history, token counts, turn id) and 700-1,560 more in the turn index (an
# int8 vector of 384 bytes, roles, lengths, postings, and the strings'
# growth room), measured on redis-server 6.2 (jemalloc) with short and
# 5 KB turns; rounded up, by a quarter for longer ids. A session drawn
# from a request id holds 92 bytes more (meta's ``request_digest``: 2,000
# creates each way, used_memory), within what the rounding leaves.
SESSION_OVERHEAD_BYTES = 1280
TURN_OVERHEAD_BYTES = 1024
# Expired sessions one call of a tenant's record forgets at most (oldest
# first): bounded work per call, and more than the one session a call adds.
_FORGOTTEN_PER_CALL = 8
# Tenants whose record refused a write on this replica, with what its calls
# here last found they hold (TenantHoldings.check_last_refusal): at most
# this many, the least recently found forgotten first, each believed for
# QUOTA_REFUSAL_KEPT_S after the call that found it. The staleness bound:
# room given back where this replica does not see it (another replica's
# delete, revert or compaction, a session's expiry) is found at most that
# long late, so a tenant that freed room may be refused up front for that
# long; a tenant that stays at its bound has at most one turn per replica
# and period generated before its append refuses it.
QUOTA_REFUSALS_KEPT = 10_000
QUOTA_REFUSAL_KEPT_S = 5.0

# KEYS: the tenant's record: its sessions' bytes (hash: ``s:<session id>``
# what the session's turns hold with their overhead, ``p:<session id>``
# what it holds beside them, its pins and summaries (BESIDE_TURNS), ``total``),
# their expiries (sorted set, ms of Redis's clock). ARGV: session id, what
# to do ('fits': what the tenant holds, nothing written but the forgetting;
# 'forget': the forgetting alone, for a sweep (TenantSweep); 'set': the
# session's ``s:`` is ARGV[3] and its ``p:`` ARGV[6], each left as it is for
# ''; 'drop': it holds nothing), bytes, the session's TTL in ms (0: none),
# the most expired sessions to forget, bytes beside its turns. Returns what
# the tenant holds (after the change); 'forget' how many it forgot, and it
# deletes a record left with no session (every one forgotten), so a tenant
# gone quiet leaves nothing of it. Expired
# sessions are forgotten first, and their deletes are the first writes
# (OOM_FIRST does not apply: the record may pass a full Redis's maxmemory by
# one field, no more).
_HOLDINGS = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '0')
local function forget(id)
  local fields = redis.call('HMGET', KEYS[1], 's:' .. id, 'p:' .. id)
  total = total - tonumber(fields[1] or '0') - tonumber(fields[2] or '0')
  redis.call('HDEL', KEYS[1], 's:' .. id, 'p:' .. id)
  redis.call('ZREM', KEYS[2], id)
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[5]))
for _, id in ipairs(expired) do forget(id) end
-- Never below 0: a count set while another call forgot the session (see
-- TenantHoldings) is added once more and taken once.
total = math.max(0, total)
-- ``total`` alone: no session's fields are left to count, and the record
-- goes (whatever the mode: a drop of the last session left it for good,
-- since TenantSweep finds tenants by their sorted sets, none of which is
-- left then).
local function delete_if_empty()
  if redis.call('ZCARD', KEYS[2]) == 0 and redis.call('HLEN', KEYS[1]) <= 1 then
    redis.call('DEL', KEYS[1])
  end
end
local what = ARGV[2]
if what == 'fits' or what == 'forget' then
  if #expired > 0 then redis.call('HSET', KEYS[1], 'total', total) end
  delete_if_empty()
  if what == 'fits' then return total end
  return #expired
end
if what == 'drop' then
  forget(ARGV[1])
else
  for _, part in ipairs({{'s:', ARGV[3]}, {'p:', ARGV[6]}}) do
    if part[2] ~= '' then
      local field = part[1] .. ARGV[1]
      local held = tonumber(part[2])
      total = total - tonumber(redis.call('HGET', KEYS[1], field) or '0') + held
      redis.call('HSET', KEYS[1], field, held)
    end
  end
  local ttl = tonumber(ARGV[4])
  redis.call('ZADD', KEYS[2], ttl > 0 and now + ttl or '+inf', ARGV[1])
end
total = math.max(0, total)
redis.call('HSET', KEYS[1], 'total', total)
delete_if_empty()
return total
"""

# ListSessions' page sizes (AIP-158): a page of 1,000 summaries with the
# longest session ids is 159 KB (54 KB with 32-character ids).
DEFAULT_LIST_PAGE_SIZE = 50
MAX_LIST_PAGE_SIZE = 1000
# The reads one page makes at most of the tenant's listing, each in place of
# the sessions the one before found gone: a page's work stays bounded by
# its size however many expired sessions' entries it meets (it then holds
# fewer sessions, and a next_page_token past them).
LISTING_ROUNDS = 4
# Due entries a create checks at most (the module's docstring): more than
# the one entry it adds, so those of expired sessions never pile up.
LISTING_SWEPT_PER_CREATE = 8
# A page token's cursor (meshgate/paging.py): this layout's version, then
# the member of the last entry the page before read.
_LISTING = "ListSessions"
_LISTING_CURSOR_VERSION = b"\x01"

# KEYS: the tenant's listing (newest, due). ARGV: a session's member ('':
# none, for a sweep: TenantSweep), when it is due (ms; '+inf': never), the
# most due members to name. Lists the session; returns up to ARGV[3]
# members due now, the oldest due first, for the caller to check
# (_LISTING_CHECKED). ZADD first: see OOM_FIRST.
_LIST = """
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], 0, ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
"""

# KEYS: the tenant's listing (newest, due). ARGV: pairs of a member and what
# its session has left to live (ms, PTTL: -1 kept forever, -2 gone, as
# _SESSION_STATE read it). Unlists each member of a session gone; moves a
# live one's due time to when it would expire now, if it is still listed
# (XX: an unlisting since stands).
_LISTING_CHECKED = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
for i = 1, #ARGV, 2 do
  local left = tonumber(ARGV[i + 1])
  if left == -2 then
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
  else
    redis.call('ZADD', KEYS[2], 'XX', left == -1 and '+inf' or now + left, ARGV[i])
  end
end
"""

# KEYS: the tenant's listing (newest, due). ARGV: members of sessions a
# sweep found live (SessionListing.listed_found). Lists each not listed
# yet, due at once (score 0: checked before any other due entry), so that
# the next check of the tenant's due entries reads its session after this
# ZADD: the script cannot (the session lies in another slot), and one
# deleted since the sweep read it is then unlisted there, rather than
# kept until a page meets it (for good, where no page comes). NX: a
# listed entry keeps its due time. Returns how many it listed. ZADD first:
# see OOM_FIRST.
_LIST_FOUND = """
local listed = 0
for i = 1, #ARGV do
  if redis.call('ZADD', KEYS[1], 'NX', 0, ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[2], 'NX', 0, ARGV[i])
    listed = listed + 1
  end
end
return listed
"""

# KEYS: a session's meta and turns. What a listing shows of it, read in one
# instant: {version, create_time_ms, update_time_ms, turns held, PTTL of
# meta}, or nil where there is no session. EVAL, not EVALSHA: a cluster
# pipeline sends it to the session's node, which may not hold the script.
_SESSION_STATE = """
local meta = redis.call('HMGET', KEYS[1], 'version', 'create_time_ms', 'update_time_ms')
if not meta[1] then return false end
return {meta[1], meta[2], meta[3], redis.call('LLEN', KEYS[2]), redis.call('PTTL', KEYS[1])}
"""

_COUNTS_PREFIX = b"tokens:"
# The turn count ...:versions records for a version a revert undid.
UNDONE = 0xFFFFFFFF


@dataclasses.dataclass(slots=True)
class StoredSession:
    version: int
    create_time_ms: int
    update_time_ms: int
    turns: list[common_pb2.Message]
    # Tokenizer id -> content token counts of the first len(counts) turns,
    # as the int64 array planning takes: converted once, when read, not by
    # every assembly of a hot session (50 us a call at 1,548 turns).
    token_counts: dict[str, np.ndarray]
    # The first ``compacted`` turns' bodies are gone (empty messages) unless
    # they are system or pinned turns: a summary stands for them.
    compacted: int = 0
    # The turns' retrieval index (services/context/turn_index.IndexedTurns),
    # attached by the servicer while the session is hot, so that it is
    # invalidated with the turns it indexes.
    index: typing.Any = None
    # Meta's ``bytes`` as read (the current version's, whatever version was
    # asked for); None for a session stored before the count (see the
    # module's docstring).
    held_bytes: int | None = None
    # When Redis expires it, as read (time.monotonic(); None: kept forever,
    # or not read but extended after this replica's own append, which gave
    # it this replica's TTL): by the TTL it was last written with, which may
    # be shorter than this replica's (services/context/hot_cache.py).
    expires_at: float | None = None


class SummarySpend(typing.NamedTuple):
    """What a session's summaries spent on one model, unbilled until taken."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    summaries: int


def _spends(raw: bytes) -> tuple[SummarySpend, ...]:
    """meta's ``unbilled`` as _TAKE_UNBILLED took it (b"" for nothing)."""
    if not raw:
        return ()
    return tuple(SummarySpend(model, *map(int, counts)) for model, counts in sorted(json.loads(raw).items()))


class Appended(typing.NamedTuple):
    """What SessionStore.append did."""

    version: int
    # The turn id had been applied before: nothing was appended now.
    replayed: bool
    # Meta's ``bytes`` as the append left it; None when the session's bytes
    # stay uncounted (see the module's docstring) or nothing was appended.
    held_bytes: int | None
    # The life of the session id it applied to (StoredSession.create_time_ms),
    # which its turn index write checks (turn_index.TurnIndex.write).
    create_time_ms: int


def _postings_below(flat: list[bytes], turn_count: int) -> list[bytes]:
    """Flat (term, packed postings) pairs of the turns before
    ``turn_count`` (relevance.pack_posting: the turn above the TF_BITS low
    bits), terms left with none dropped; the vector fields (a zero byte
    first: DIMENSIONS_FIELD, EMBEDDER_FIELD, GAPS_FIELD) are the caller's. Done here
    rather than in the script (Redis runs nothing else while a script
    runs), and in one pass over all postings at once: a long
    session holds tens of thousands of terms, and a loop per term held the
    event loop for ~0.2 s (10,000 turns, ~60k terms)."""
    terms = flat[::2]
    values = flat[1::2]
    kept = [i for i, term in enumerate(terms) if not term.startswith(b"\0")]
    if not kept:
        return []
    packed = [values[i] for i in kept]
    everything = np.frombuffer(b"".join(packed), dtype="<u4")
    lengths = np.fromiter((len(value) // 4 for value in packed), dtype=np.int64, count=len(packed))
    below = everything < np.uint32(turn_count << relevance.TF_BITS)
    # Not a prefix of each term's run: after a revert, a position taken
    # again is appended after later, stale ones.
    owners = np.repeat(np.arange(len(packed)), lengths)[below]
    counts = np.bincount(owners, minlength=len(packed))
    joined = everything[below].tobytes()
    offsets = np.concatenate(([0], np.cumsum(counts) * 4)).tolist()
    pairs: list[bytes] = []
    for i, count in enumerate(counts.tolist()):
        if count:
            pairs += [terms[kept[i]], joined[offsets[i] : offsets[i + 1]]]
    return pairs


class Owed(typing.NamedTuple):
    """A session whose summaries' usage no take has taken (OwedSessions.claim)."""

    tenant_id: str
    session_id: str
    # Meta's ``latest_key``, a key id: whom the usage is billed to ("" for no key).
    key_id: str


def key(tenant_id: str, session_id: str, part: str) -> str:
    """One of a session's Redis keys (``meta``, ``turns``, ...): the one place
    their layout is spelled, for this module, the turn index and summaries.

    ``{<session id>:<tenant>}`` is the hash tag: every key of one session
    hashes to one Redis Cluster slot, so each script and transaction over a
    session runs on one node, and sessions spread over the cluster. The
    session id comes first because it cannot hold a brace (servicer's
    _SESSION_ID): the tag is never empty and always the same for a
    session's keys, whatever a tenant id holds."""
    return f"mg:context:{{{session_id}:{tenant_id}}}:{part}"


def session_key(tenant_id: str, session_id: str) -> str:
    """The session's meta key: what change notices name."""
    return key(tenant_id, session_id, "meta")


def unbilled_key(tenant_id: str, session_id: str) -> str:
    """The session's usage record (the module's docstring): in its slot,
    not one of its parts."""
    return key(tenant_id, session_id, "unbilled")


def holds_key(tenant_id: str, session_id: str) -> str:
    """The session's append holds (the module's docstring): in its slot,
    not one of its parts."""
    return key(tenant_id, session_id, "holds")


# How long a session made under a request id and deleted refuses a resend
# of that request id (_MADE_UNDER): the request id's retention, as a
# router's request ids are kept (services/router/keys.py).
DELETED_MARK_TTL_S = 24 * 3600


def deleted_key(tenant_id: str, session_id: str) -> str:
    """The mark a session made under a request id leaves when deleted
    (_MADE_UNDER): in its slot, not one of its parts."""
    return key(tenant_id, session_id, "deleted")


def fork_request_key(tenant_id: str, fork_id: str) -> str:
    """The record of the request id whose fork is ``fork_id``, as replicas
    of before kept it (the module's docstring): in the fork's slot, not one
    of its parts."""
    return key(tenant_id, fork_id, "fork_request")


def summary_copy_key(tenant_id: str, digest: str) -> str:
    """The content key of the summary of turns whose span_digest is
    ``digest`` (services/context/summaries.py): a copy for any of the
    tenant's sessions holding those turns at that place to reuse. No hash
    tag: on a Redis Cluster each lies in a slot of its own."""
    return f"mg:context:{tenant_id}:summary:{digest}"


async def drop_summary_copies(
    client: redis.Redis, tenant_id: str, digests: collections.abc.Iterable[str]
) -> None:
    """Deletes the content keys of ``digests``, which the caller's session
    no longer names (it was deleted, or the summaries were replaced or not
    kept: summaries.SummaryStore.put). Another live session holding the same
    turns at the same place keeps its own summaries whole in its hash: it
    loses nothing but the reuse, a summary made again where it reaches that
    span (one stored before summaries were kept whole, which names only the
    digest, loses that summary a little sooner than the key's expiry would
    have taken it). Never raises: the write before it stands, and what is
    left expires session_ttl_s after it was written (kept, like the
    sessions, where there is no TTL); a failure is logged and counted
    (meshgate_context_summary_copies_left_total)."""
    keys = [
        summary_copy_key(tenant_id, digest) for digest in dict.fromkeys(digests) if _DIGEST.fullmatch(digest)
    ]
    if not keys:
        return
    try:
        # UNLINK of the client's own, not a pipeline: on a cluster it splits
        # the keys by slot.
        await client.unlink(*keys)
    except redis_access.CONNECTION_ERRORS as error:
        metrics.context().summary_copies_left.inc(len(keys))
        log.warning("summary copies not deleted", tenant_id=tenant_id, keys=len(keys), error=str(error))


def holdings_key(tenant_id: str, part: str) -> str:
    """A key of the tenant's record of what its sessions hold
    (TenantHoldings): the tenant's hex as the hash tag, so its parts share
    a slot, and no tenant id's braces or colons can reach another's."""
    return f"mg:context:held:{{{tenant_id.encode().hex()}}}:{part}"


def listing_key(tenant_id: str, part: str) -> str:
    """A key of the tenant's listing (``newest`` or ``due``; the module's
    docstring): in the tenant's slot, as its holdings record."""
    return f"mg:context:listed:{{{tenant_id.encode().hex()}}}:{part}"


def listed_member(session_id: str, create_time_ms: int) -> str:
    """One life of a session as the tenant's listing holds it: ordered by
    creation, then by id (fixed width, so as strings as by number)."""
    return f"{create_time_ms:016d}:{session_id}"


def session_keys(tenant_id: str, session_id: str) -> list[str]:
    """Every key of the session, in SESSION_PARTS' order: what each script
    over a session takes as its KEYS (one hash slot)."""
    return [key(tenant_id, session_id, part) for part in SESSION_PARTS]


def _counts_field(tokenizer_id: str) -> str:
    return f"tokens:{tokenizer_id}"


def _version_not_found(session_id: str, version: int, current: int) -> MeshgateError:
    return not_found(
        Reason.VERSION_NOT_FOUND,
        f"session {session_id!r} has no version {version} (it is at {current}; versions a revert"
        " undid, and those of sessions stored before versions were kept, cannot be read)",
        session_id=session_id,
        version=str(version),
        current_version=str(current),
    )


def _version_compacted(session_id: str, version: int, compacted_version: int, what: str) -> MeshgateError:
    return MeshgateError(
        grpc.StatusCode.FAILED_PRECONDITION,
        Reason.VERSION_COMPACTED,
        f"session {session_id!r} cannot {what} version {version}: its oldest turns were compacted"
        f" into summaries at version {compacted_version}, and it needs their texts",
        {"session_id": session_id, "version": str(version), "compacted_version": str(compacted_version)},
    )


def _pack(counts: collections.abc.Sequence[int] | np.ndarray) -> bytes:
    return np.asarray(counts, "<u4").tobytes()


# No counts yet: what a session's counts extend from (shared: read-only).
NO_COUNTS = np.zeros(0, np.int64)
NO_COUNTS.flags.writeable = False


def decode_counts(data: bytes, count: int) -> np.ndarray:
    """The first ``count`` (or fewer, if that is all there is) of stored
    per-turn counts (packed little-endian uint32, as :func:`_pack` writes
    them), as the int64 array planning takes (assembly.SessionCosts)."""
    return np.frombuffer(data[: 4 * count], dtype="<u4").astype(np.int64)


def session_not_found(session_id: str) -> MeshgateError:
    return not_found(Reason.SESSION_NOT_FOUND, f"no session {session_id!r}", session_id=session_id)


def _made_and_deleted(session_id: str, send: RequestIdSend | None, made_by: bytes) -> MeshgateError:
    """A send of a request id whose session was made and deleted since: the
    deleted session stays deleted (SESSION_NOT_FOUND, naming it), or another
    request reused the request id (REQUEST_ID_REUSED)."""
    if send is None or not send.made(made_by):
        return request_ids.reused()
    return not_found(
        Reason.SESSION_NOT_FOUND,
        f"the session this request_id made, {session_id!r}, was deleted; "
        "draw a new request_id to make another",
        session_id=session_id,
    )


@contextlib.contextmanager
def redis_reachable():
    """Reports a Redis outage as UNAVAILABLE for this call only; the pool
    reconnects on a later call once Redis is back."""
    try:
        yield
    except redis_access.CONNECTION_ERRORS as error:
        raise redis_access.outage("session store unavailable", error) from error


class TenantHoldings:
    """What each tenant's sessions hold in Redis (context.max_bytes_per_tenant):
    every tenant's sessions share one Redis, which, full, refuses every
    tenant's writes. A record per tenant (_HOLDINGS) holds each of its
    sessions' bytes (their turns' bytes, meta's count, plus
    SESSION_OVERHEAD_BYTES and TURN_OVERHEAD_BYTES per turn held; and apart,
    what its pins and summaries hold, BESIDE_TURNS), their sum and each
    one's expiry. A growing write (create, fork, append, pin) asks first
    whether its bytes fit (``fits``), and once written, sets the session's
    count to what the session's script returned (``held``), as an absolute
    value, so a count lost or wrong is right again at the session's next
    write; a delete drops it, a revert, a compaction or an unpin sets it
    lower. A summary is never refused (written in the background, after the
    turns it stands for were counted; compaction needs it to free them), but
    counted once written, so the tenant's next growing writes find room
    taken. The record lies in the tenant's slot, apart
    from every session's (Redis Cluster: a script's keys share one slot), so
    these are calls of their own, and the count may drift from what the
    sessions hold, within bounds:

    - Writes of one tenant at once each ask before any is counted, so the
      tenant may pass the bound by what its writes in flight add (each at
      most a session's max_session_bytes, and a fork the pins it copies
      too, 256 of 4 KiB at most; in practice one turn).
    - A count not set after its write (the service stopped, Redis failed
      in between; logged) leaves that session's count low by that write
      until its next write sets it, or its expiry forgets it.
    - A session expires session_ttl_s after its last write; the record
      forgets it that long after the last count it set (a few per call,
      the oldest first, and in the background sweep, services/context/
      tenant_sweep.py, which deletes a record left with no session).
      Writes that renew a session but count nothing (its turn index's)
      may keep it alive past that, counted 0 until its next write.
    - Summaries go beyond the bound by what the tenant's sessions'
      summaries written after it was reached hold: at most one per span
      of turns counted before then (a few KB for 16 turns counted at 16 KB
      and more). A summary's content key lives session_ttl_s after it was
      written, and is counted only while a session's summaries hash holds
      that summary: a deleted session's goes with it, and one whose span's
      turns a revert undid goes when the span is summarized again, or where
      that fails (logged and counted) expires uncounted.
    - The overheads are measured means; a tenant's turns of other sizes
      hold somewhat more or less per turn.
    - During a rolling upgrade a replica of the version before this count of
      pins and summaries adds each pin's bytes to ``p:`` and gives none
      back; the session's next count here sets it to what it holds.

    A tenant refused is remembered on the replica that refused it, with
    what the record held, and its turns that would pass the bound on that
    are refused before they are generated (``check_last_refusal``), for
    QUOTA_REFUSAL_KEPT_S after the latest call here that found what it
    holds: room given back through other replicas, or by an expiry, is
    seen that late. Nothing ever refuses another tenant's write."""

    def __init__(self, client: redis.Redis, ttl_s: int, most: int) -> None:
        self._ttl_ms = ttl_s * 1000
        # 0: no bound; nothing is counted.
        self.most = most
        self._script = client.register_script(_HOLDINGS)
        # Tenants refused here: tenant -> (what the record's latest call
        # here found it holds, time.monotonic() until which that is
        # believed); QUOTA_REFUSAL_KEPT_S.
        self._refused: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()

    async def fits(self, tenant_id: str, session_id: str, size: int) -> None:
        """Raises SESSION_QUOTA_EXCEEDED unless ``size`` bytes more fit in
        the tenant's bound."""
        if not self.most:
            return
        with redis_reachable():
            held = await self._call(tenant_id, session_id, "fits", size)
        if held + size <= self.most:
            self._learned(tenant_id, held)
            return
        self._refused[tenant_id] = (held, time.monotonic() + QUOTA_REFUSAL_KEPT_S)
        self._refused.move_to_end(tenant_id)
        if len(self._refused) > QUOTA_REFUSALS_KEPT:
            self._refused.popitem(last=False)
        raise self._exceeded(held, size)

    def _learned(self, tenant_id: str, held: int) -> None:
        """What a call of the record found the tenant holds: a tenant
        refused before is then believed to hold that (less after a delete,
        a revert or a compaction; more after a write), from now on."""
        if tenant_id in self._refused:
            self._refused[tenant_id] = (held, time.monotonic() + QUOTA_REFUSAL_KEPT_S)
            self._refused.move_to_end(tenant_id)

    def check_last_refusal(self, tenant_id: str, size: int) -> None:
        """Raises what ``fits`` would, from memory, with no Redis call, for
        a tenant this replica's calls of the record refused: when ``size``
        bytes more would pass the bound on what they last found it holds,
        within QUOTA_REFUSAL_KEPT_S. Made before a turn is generated (an
        assembly's append_reservation), so a tenant at its bound is not
        generated for turn after turn, each refused by its append once its
        answer went out."""
        held, until = self._refused.get(tenant_id, (0, 0.0))
        if time.monotonic() >= until:
            self._refused.pop(tenant_id, None)
            return
        if held + size > self.most:
            raise self._exceeded(held, size)

    def _exceeded(self, held: int, size: int) -> MeshgateError:
        return MeshgateError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.SESSION_QUOTA_EXCEEDED,
            f"the tenant's sessions hold {held} bytes of Redis; {size} more would pass "
            f"context.max_bytes_per_tenant ({self.most}): room comes back as its sessions "
            "expire (context.session_ttl_s after their last write), or are deleted or reverted "
            "(RouterService.DeleteSession, RevertSession)",
            {
                "limit": "max_bytes_per_tenant",
                "scope": "tenant",
                "limit_value": str(self.most),
                "bytes": str(held),
            },
        )

    async def held(
        self, tenant_id: str, session_id: str, turn_bytes: int | None, turns: int, beside: int | None = None
    ) -> None:
        """Sets the session's count: ``turn_bytes`` of ``turns`` turns
        (None: left as it is, for a session whose bytes are uncounted), and
        ``beside`` them (BESIDE_TURNS; None: left as it is)."""
        turns_held = "" if turn_bytes is None else held_by(turn_bytes, turns)
        await self._settle(tenant_id, session_id, "set", turns_held, "" if beside is None else beside)

    async def dropped(self, tenant_id: str, session_id: str) -> None:
        await self._settle(tenant_id, session_id, "drop")

    async def _settle(
        self, tenant_id: str, session_id: str, what: str, turns_held: int | str = "", beside: int | str = ""
    ) -> None:
        """A count after its write: the write stands whatever becomes of
        this, so a failure is logged, not raised (the count is set again by
        the session's next write)."""
        if not self.most:
            return
        try:
            self._learned(tenant_id, await self._call(tenant_id, session_id, what, turns_held, beside))
        except redis_access.CONNECTION_ERRORS as error:
            # What it holds now is not known here: its next write asks.
            self._refused.pop(tenant_id, None)
            log.warning(
                "tenant's session bytes not counted", what=what, session_id=session_id, error=str(error)
            )

    async def forget_expired(self, tenant_id: str, most: int) -> int:
        """Forgets up to ``most`` of the tenant's expired sessions, the
        oldest first, and the record once none is left (TenantSweep);
        returns how many it forgot. Done with no bound configured too: a
        record written while one was is forgotten alike. Raises Redis's
        errors."""
        return await self._call(tenant_id, "", "forget", "", forgotten=most)

    async def _call(
        self,
        tenant_id: str,
        session_id: str,
        what: str,
        size: int | str,
        beside: int | str = "",
        forgotten: int = _FORGOTTEN_PER_CALL,
    ) -> int:
        keys = [holdings_key(tenant_id, "bytes"), holdings_key(tenant_id, "expiry")]
        args = [session_id, what, size, self._ttl_ms, forgotten, beside]
        return int(await self._script(keys=keys, args=args))


def held_by(turn_bytes: int, turns: int) -> int:
    """What a session of ``turns`` turns holding ``turn_bytes`` (meta's
    count) holds in Redis, as the tenant's bound counts it."""
    return SESSION_OVERHEAD_BYTES + turn_bytes + TURN_OVERHEAD_BYTES * turns


class ListedSession(typing.NamedTuple):
    """A session as a page of the tenant's listing shows it (SessionListing.page)."""

    session_id: str
    version: int
    create_time_ms: int
    update_time_ms: int
    turn_count: int


class SessionsPage(typing.NamedTuple):
    sessions: list[ListedSession]
    # The member after which the next page starts (listing_token); None after the last.
    following: bytes | None


def listing_token(tenant_id: str, following: bytes) -> str:
    """The next_page_token naming ``following`` (SessionsPage) in the tenant's listing."""
    return paging.page_token(_LISTING, tenant_id, _LISTING_CURSOR_VERSION + following)


def listing_cursor(tenant_id: str, token: str) -> bytes:
    """The member a page token of the tenant's listing names;
    INVALID_PAGE_TOKEN where it is none a listing of that tenant gave."""
    cursor = paging.cursor_of(_LISTING, tenant_id, token)
    version, member = cursor[:1], cursor[1:]
    created, _, session_id = member.partition(b":")
    if version != _LISTING_CURSOR_VERSION or len(created) != 16 or not created.isdigit() or not session_id:
        raise paging.refused(_LISTING)
    return member


class SessionListing:
    """The tenant's sessions, newest first, a page at a time (the module's
    docstring: its keys, who writes them, how entries of sessions gone are
    pruned). A page token names the member of the last entry a page read:
    a place, not a snapshot, so nothing is held between pages and a token
    works on any replica; a member never changes while its session lives,
    so a session that lives through a whole listing is listed once,
    whatever is created, deleted or expires between pages.

    What a page of n sessions costs, whatever the tenant holds: a range of
    n + 1 members (O(log N + n)), one read of each session's meta and turn
    count (a pipeline: on a cluster, to each session's node), and where it
    met sessions gone, one script that prunes them, then as much again for
    each of at most LISTING_ROUNDS - 1 more reads in their place.

    What it may miss: a session whose listing failed after its script made
    it (SessionStore._listed; one of a request id, whose create or fork
    answered UNAVAILABLE, is listed by a resend of it too), and sessions
    created before the listing existed, or by a replica of a version
    before it during a rolling upgrade: until the background sweep finds
    them (listed_found), within one pass of it (TenantSweep)."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._client = client
        self._ttl_ms = ttl_s * 1000
        self._list = client.register_script(_LIST)
        self._checked = client.register_script(_LISTING_CHECKED)

    async def listed(self, tenant_id: str, session_id: str, create_time_ms: int) -> None:
        """Lists the session's life created at ``create_time_ms`` (again:
        listing it twice changes nothing); then checks the listing's due
        entries (never raises once the session is listed). Raises Redis's
        errors (SessionStore._listed says what becomes of them)."""
        member = listed_member(session_id, create_time_ms)
        due = create_time_ms + self._ttl_ms if self._ttl_ms > 0 else "+inf"
        overdue = await self._list(keys=self._keys(tenant_id), args=[member, due, LISTING_SWEPT_PER_CREATE])
        try:
            await self._check(tenant_id, overdue)
        except (*redis_access.CONNECTION_ERRORS, redis.ResponseError) as error:
            # Another entry's check: the session is made and listed, and a
            # create answered INTERNAL had made one all the same.
            log.warning("tenant's due listing entries not checked", error=str(error))

    async def checked_due(self, tenant_id: str, most: int) -> int:
        """Checks up to ``most`` of the tenant's due entries, the oldest due
        first, as a create does (TenantSweep); returns how many were due.
        Raises Redis's errors."""
        overdue = await self._list(keys=self._keys(tenant_id), args=["", "", most])
        await self._check(tenant_id, overdue)
        return len(overdue)

    async def _check(self, tenant_id: str, overdue: list[bytes]) -> None:
        """Unlists the ``overdue`` members whose sessions are gone; gives the
        others their TTL left."""
        if overdue:
            await self._settle(tenant_id, overdue, await self._states(tenant_id, overdue))

    async def listed_found(self, sessions: collections.abc.Sequence[tuple[str, str]]) -> dict[str, int]:
        """Lists those of ``sessions`` (tenant, session id), found by a
        sweep (TenantSweep), that live and are not listed yet (made before
        the listing existed, or their listing failed after their script:
        SessionStore._listed); returns how many it listed, by tenant. Two
        round trips, whatever the tenants: the sessions' creation times,
        then one _LIST_FOUND in each tenant's slot. Raises Redis's
        connection errors; where Redis answers another error (a key of the
        name that is no session's meta, a full Redis refusing the ZADD),
        those sessions are left for a later pass, logged."""
        created = await self._creation_times(sessions)
        members: dict[str, list[str]] = collections.defaultdict(list)
        for (tenant_id, session_id), created_ms in zip(sessions, created, strict=True):
            if created_ms is not None:
                members[tenant_id].append(listed_member(session_id, created_ms))
        if not members:
            return {}
        async with self._client.pipeline(transaction=False) as pipe:
            for tenant_id, found in members.items():
                # EVAL, not EVALSHA: see _SESSION_STATE.
                pipe.eval(_LIST_FOUND, 2, *self._keys(tenant_id), *found)
            answers = await pipe.execute(raise_on_error=False)
        listed = {}
        for tenant_id, answer in zip(members, answers, strict=True):
            if isinstance(answer, redis.ResponseError):
                log.warning(
                    "sessions found unlisted not listed", sessions=len(members[tenant_id]), error=str(answer)
                )
            elif answer:
                listed[tenant_id] = answer
        return listed

    async def _creation_times(self, sessions: collections.abc.Sequence[tuple[str, str]]) -> list[int | None]:
        """Each session's create_time_ms, None where none lives (or its
        meta key holds no session's meta), in one round trip."""
        if not sessions:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for tenant_id, session_id in sessions:
                pipe.hmget(session_key(tenant_id, session_id), ["version", "create_time_ms"])
            answers = await pipe.execute(raise_on_error=False)
        created: list[int | None] = []
        for (_, session_id), answer in zip(sessions, answers, strict=True):
            # A page lists only a session whose meta holds both (_SESSION_STATE),
            # as numbers: a field that is none (another program's write) raised
            # here, before the sweep's SCAN cursor was saved, so every tick
            # failed at the same keys and no tenant was swept again (a review).
            numbers = _numbers(answer) if isinstance(answer, list) else None
            if isinstance(answer, list) and numbers is None and None not in answer:
                log.warning("a session's meta holds no numbers: not listed", session_id=session_id)
            created.append(numbers[1] if numbers is not None else None)
        return created

    async def unlisted(self, tenant_id: str, session_id: str, create_time_ms: int) -> None:
        """Unlists the session's life created at ``create_time_ms``, after its
        delete. Never raises: the delete stands, and a page that meets the
        entry prunes it."""
        member = listed_member(session_id, create_time_ms).encode()
        try:
            await self._settle(tenant_id, [member], [None])
        except redis_access.CONNECTION_ERRORS as error:
            log.warning("deleted session not unlisted", session_id=session_id, error=str(error))

    async def page(self, tenant_id: str, size: int, after: bytes | None = None) -> SessionsPage:
        """Up to ``size`` of the tenant's sessions, newest first, after the
        member ``after`` (None: from the newest). Fewer where the entries
        it read were of sessions gone (pruned now), with ``following`` set
        where entries are left to read."""
        newest = listing_key(tenant_id, "newest")
        found: list[ListedSession] = []
        with redis_reachable():
            for _ in range(LISTING_ROUNDS):
                wanted = size - len(found)
                start = b"(" + after if after is not None else "+"
                # One past the page says whether another follows.
                members = await self._client.zrevrangebylex(newest, start, "-", 0, wanted + 1)
                read = members[:wanted]
                gone = []
                for member, state in zip(read, await self._states(tenant_id, read), strict=True):
                    if not _same_life(member, state):
                        gone.append(member)
                        continue
                    version, created_ms, updated_ms, turns, _ = state
                    session_id = member.partition(b":")[2].decode()
                    found.append(
                        ListedSession(session_id, int(version), int(created_ms), int(updated_ms), turns)
                    )
                await self._settle(tenant_id, gone, [None] * len(gone))
                if len(members) <= wanted:
                    return SessionsPage(found, None)
                after = read[-1]
                if len(found) == size:
                    break
        return SessionsPage(found, after)

    async def _states(self, tenant_id: str, members: list[bytes]) -> list[list | None]:
        """_SESSION_STATE of each member's session, in one round trip; None
        for one whose keys hold another type than a session's (WRONGTYPE:
        no session lives there, as _creation_times reads it, so the entry
        is unlisted). Raised, that one key failed every create of the
        tenant once its entry was due, its listing, and the sweep of every
        tenant (a review). Other errors are raised."""
        if not members:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for member in members:
                session_id = member.partition(b":")[2].decode()
                meta, turns = key(tenant_id, session_id, "meta"), key(tenant_id, session_id, "turns")
                pipe.eval(_SESSION_STATE, 2, meta, turns)
            answers = await pipe.execute(raise_on_error=False)
        states: list[list | None] = []
        for member, answer in zip(members, answers, strict=True):
            # None also for a session simply gone (expired, deleted), unlisted
            # in silence; only keys that hold no session's are said.
            broken = False
            if isinstance(answer, redis.ResponseError):
                if not redis_access.is_wrong_type(answer):
                    raise answer
                broken = True
            elif answer and _numbers(answer[:3]) is None:
                broken = True  # a meta whose fields are no numbers (another program's write)
            if broken:
                log.warning("a listed session's keys hold no session: unlisted", member=member.decode())
                answer = None
            states.append(answer)
        return states

    async def _settle(self, tenant_id: str, members: list[bytes], states: list[list | None]) -> None:
        """Unlists the members whose sessions are gone (a state of another
        life, or None), and moves the others' due times on (_LISTING_CHECKED)."""
        if not members:
            return
        args: list[bytes | int] = []
        for member, state in zip(members, states, strict=True):
            args += [member, state[4] if _same_life(member, state) else -2]
        await self._checked(keys=self._keys(tenant_id), args=args)

    @staticmethod
    def _keys(tenant_id: str) -> list[str]:
        return [listing_key(tenant_id, "newest"), listing_key(tenant_id, "due")]


def _numbers(values: list) -> list[int] | None:
    """``values`` (a meta's fields) as integers; None where one is missing or
    is no integer."""
    try:
        return [int(value) for value in values]
    except (TypeError, ValueError):
        return None


def _same_life(member: bytes, state: list | None) -> bool:
    """Whether ``state`` (_SESSION_STATE) is of the life ``member`` names."""
    return state is not None and int(state[1]) == int(member.partition(b":")[0])


class RequestIdSend(typing.NamedTuple):
    """A CreateSession or ForkSession sent under a request id (AIP-155),
    which the id of the session it makes is drawn from
    (servicer._drawn_session_id): what tells a resend of it from another
    request (the module's docstring, meta's ``request_digest``)."""

    # request_ids.digest of the request (it names the method).
    digest: str
    is_create: bool
    # The id a replica of before, which drew a fork's id apart from a
    # create's, gave this request id's fork (servicer._fork_id_of_before),
    # where its record may lie (fork_request_key).
    fork_id_of_before: str

    def made(self, made_by: bytes | None) -> bool:
        """Whether the session drawn from the request id, which the request
        of digest ``made_by`` made, is this request's. One with none was
        created by a replica of before, which drew only a create's session
        at that id: a create's resend's, another request for a fork."""
        if made_by is None:
            return self.is_create
        return made_by.decode() == self.digest


class SessionStore:
    def __init__(
        self,
        client: redis.Redis,
        ttl_s: int,
        max_turns: int = 0,
        max_session_bytes: int = 0,
        max_bytes_per_tenant: int = 0,
    ) -> None:
        self._client = client
        self._ttl_s = ttl_s
        # 0: no cap (context.max_turns, context.max_session_bytes).
        self._max_turns = max_turns
        self._max_session_bytes = max_session_bytes
        self._create = client.register_script(_CREATE)
        self._append = client.register_script(_APPEND)
        self._read = client.register_script(_READ)
        self._revert = client.register_script(_REVERT)
        self._fork_source = client.register_script(_FORK_SOURCE)
        self._fork_create = client.register_script(_FORK_CREATE)
        self._fill_counts = client.register_script(_FILL_COUNTS)
        self._delete = client.register_script(_DELETE)
        self._compact = client.register_script(_COMPACT)
        self._take_unbilled = client.register_script(_TAKE_UNBILLED)
        self._acknowledge_take = client.register_script(_ACKNOWLEDGE_TAKE)
        self._held = client.register_script(_HELD)
        self._hold = client.register_script(_HOLD)
        self.owed = OwedSessions(client)
        # context.max_bytes_per_tenant (0: no bound).
        self.holdings = TenantHoldings(client, ttl_s, max_bytes_per_tenant)
        self.listing = SessionListing(client, ttl_s)

    async def create(self, tenant_id: str, session_id: str, send: RequestIdSend | None = None) -> int:
        """Creates an empty session at version 0; returns its creation time.
        Where ``session_id`` is drawn from ``send``'s request id, a session
        a send of it made is answered (its creation time), nothing made, or
        refused REQUEST_ID_REUSED where another request made it
        (_sent_before: asked first, so that a resend is answered whatever
        the tenant's room since, and again in the script)."""
        keys = session_keys(tenant_id, session_id)
        if send is not None:
            # Never another id: a fork of before's is never a create's (RequestIdSend.made).
            made = await self._sent_before(tenant_id, session_id, send)
            if made is not None:
                return made[1]
        await self.holdings.fits(tenant_id, session_id, held_by(0, 0))
        with redis_reachable():
            outcome = await self._create(
                keys=[*keys, deleted_key(tenant_id, session_id)],
                args=[self._ttl_s, "" if send is None else send.digest],
            )
        if outcome[0] == 2:
            return await self._answered(tenant_id, session_id, send, outcome[2], outcome[1])
        if outcome[0] == 3:
            raise _made_and_deleted(session_id, send, outcome[1])
        if outcome[0] == 0:
            raise MeshgateError(
                grpc.StatusCode.ALREADY_EXISTS,
                Reason.SESSION_EXISTS,
                f"session {session_id!r} already exists",
                {"session_id": session_id},
            )
        # Nothing beside its turns either: creating it cleared an earlier life's pins and summaries.
        await self.holdings.held(tenant_id, session_id, 0, 0, beside=0)
        await self._listed(tenant_id, session_id, int(outcome[1]), of_request_id=send is not None)
        return int(outcome[1])

    async def _sent_before(
        self, tenant_id: str, session_id: str, send: RequestIdSend
    ) -> tuple[str, int] | None:
        """The session (its id, its creation time) that a send of ``send``'s
        request id made, ``session_id`` drawn from it, or a replica of
        before's fork of it; REQUEST_ID_REUSED where another request made
        it; None where none lives. One round trip: the fork of before's
        record lies in another slot, read in the same pipeline."""
        with redis_reachable():
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hmget(session_key(tenant_id, session_id), ["create_time_ms", "request_digest"])
                pipe.get(fork_request_key(tenant_id, send.fork_id_of_before))
                (created_ms, made_by), recorded_before = await pipe.execute()
        if created_ms is not None:
            return session_id, await self._answered(tenant_id, session_id, send, made_by, created_ms)
        if recorded_before is not None:
            made_by, created_ms = recorded_before.split(b" ")
            fork_id = send.fork_id_of_before
            return fork_id, await self._answered(tenant_id, fork_id, send, made_by, created_ms)
        return None

    async def _answered(
        self, tenant_id: str, session_id: str, send: RequestIdSend, made_by: bytes | None, created_ms: bytes
    ) -> int:
        """The creation time of ``session_id``, which ``made_by``'s request
        made under ``send``'s request id, where that is ``send``'s request;
        REQUEST_ID_REUSED where it is another."""
        if not send.made(made_by):
            raise request_ids.reused()
        # That send's count and listing of it were written after its
        # script, and may have been lost with its reply.
        await self.recount(tenant_id, session_id)
        await self._listed(tenant_id, session_id, int(created_ms), of_request_id=True)
        return int(created_ms)

    async def _listed(self, tenant_id: str, session_id: str, created_ms: int, of_request_id: bool) -> None:
        """Lists a session a create or fork made (or a resend of its request
        id answered). Where Redis fails, the session stands all the same:
        with a request id, UNAVAILABLE, whose resend (the router's own, for
        a create) is answered with that session and lists it; without one,
        a resend would make a second session, so the call is answered, and
        the session is listed by the background sweep, within one pass of
        it (TenantSweep, which finds sessions' metas); logged and counted
        (meshgate_context_sessions_unlisted_total)."""
        if of_request_id:
            with redis_reachable():
                await self.listing.listed(tenant_id, session_id, created_ms)
            return
        try:
            await self.listing.listed(tenant_id, session_id, created_ms)
        except redis_access.CONNECTION_ERRORS as error:
            metrics.context().sessions_unlisted.inc()
            log.warning("session made but not listed", session_id=session_id, error=str(error))

    async def read(self, tenant_id: str, session_id: str, at_version: int | None = None) -> StoredSession:
        """The session's state, turns and stored token counts as of one
        instant (one script): the current ones, or those of ``at_version``."""
        # Before the call: the TTL Redis reports is counted from no earlier.
        sent_at = time.monotonic()
        with redis_reachable():
            outcome = await self._read(
                keys=session_keys(tenant_id, session_id), args=["" if at_version is None else at_version]
            )
        if outcome[0] == 0:
            raise session_not_found(session_id)
        if outcome[0] == -3:
            raise _version_not_found(session_id, at_version, outcome[1])
        if outcome[0] == -5:
            raise _version_compacted(session_id, at_version, outcome[1], "be read at")
        _, version, flat_meta, raw_turns, left_ms = outcome
        meta = dict(zip(flat_meta[::2], flat_meta[1::2], strict=True))
        held = len(raw_turns)
        return StoredSession(
            version=int(version),
            create_time_ms=int(meta[b"create_time_ms"]),
            update_time_ms=int(meta[b"update_time_ms"]),
            turns=[common_pb2.Message.FromString(raw) for raw in raw_turns],
            compacted=min(int(meta.get(b"compacted", 0)), held),
            held_bytes=int(meta[b"bytes"]) if b"bytes" in meta else None,
            expires_at=sent_at + left_ms / 1000 if left_ms >= 0 else None,
            # Counts cover a prefix of the current turns; a past version holds fewer.
            token_counts={
                field[len(_COUNTS_PREFIX) :].decode(): decode_counts(value, held)
                for field, value in meta.items()
                if field.startswith(_COUNTS_PREFIX)
            },
        )

    async def append(
        self,
        tenant_id: str,
        session_id: str,
        expected_version: int | None,
        turns: list[common_pb2.Message],
        token_counts: dict[str, list[int]],
        turn_id: str = "",
        key_id: str = "",
    ) -> Appended:
        """Appends if the session is at ``expected_version``, or at the end
        whatever its version when it is None. ``token_counts`` maps
        tokenizer id to the turns' counts; ``key_id``, the turn's API key's
        id, is whom the session's summaries' usage is billed to from now on."""
        expected = "" if expected_version is None else str(expected_version)
        # With no cap of its own, a session's bytes are still counted for the tenant's bound.
        max_bytes = self._max_session_bytes or (-1 if self.holdings.most else 0)
        args: list[object] = [expected, turn_id, self._ttl_s, len(turns), self._max_turns, max_bytes, key_id]
        encoded = [turn.SerializeToString() for turn in turns]
        args.extend(encoded)
        for tokenizer_id, counts in token_counts.items():
            args.extend((_counts_field(tokenizer_id), _pack(counts)))
        added = sum(map(len, encoded)) + TURN_OVERHEAD_BYTES * len(turns)
        try:
            await self.holdings.fits(tenant_id, session_id, added)
        except MeshgateError as refusal:
            # A resend of an append applied already adds nothing: answered
            # as the script answers it, whatever the tenant's room since (as
            # a create's resend is, _sent_before). The router sends an append
            # again under its turn id after an UNAVAILABLE, whose first send
            # may have appended it and been counted: refused, its caller was
            # told the turn was not stored, which the session held.
            replay = None
            if refusal.reason == Reason.SESSION_QUOTA_EXCEEDED and turn_id:
                replay = await self._applied_before(tenant_id, session_id, turn_id)
            if replay is None:
                raise
            return replay
        with redis_reachable():
            keys = [
                *session_keys(tenant_id, session_id),
                unbilled_key(tenant_id, session_id),
                holds_key(tenant_id, session_id),
            ]
            outcome = await self._append(keys=keys, args=args)
        full = {-2: ("turns", self._max_turns), -6: ("bytes", self._max_session_bytes)}.get(outcome[0])
        if full is not None:
            raise _session_full(session_id, *full, str(outcome[1]), len(turns))
        _raise_for(outcome, session_id, expected_version)
        if outcome[0] == 2:
            _, version, created_ms = outcome
            return Appended(int(version), True, None, int(created_ms))
        _, version, held_bytes, created_ms, owes, held_turns = outcome
        if owes:
            await self.owed.mark_if_unlisted(tenant_id, session_id)
        held_bytes = None if held_bytes is None else int(held_bytes)
        if held_bytes is not None:
            await self.holdings.held(tenant_id, session_id, held_bytes, int(held_turns))
        return Appended(int(version), False, held_bytes, int(created_ms))

    async def _applied_before(self, tenant_id: str, session_id: str, turn_id: str) -> Appended | None:
        """What _APPEND answers an append of ``turn_id`` with where the
        session applied it already (nothing appended again), read as of one
        instant (MULTI: one slot); None where it did not."""
        with redis_reachable():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hget(key(tenant_id, session_id, "turn_ids"), turn_id)
                pipe.hget(session_key(tenant_id, session_id), "create_time_ms")
                applied, created_ms = await pipe.execute()
        if applied is None or created_ms is None:
            return None
        return Appended(int(applied), True, None, int(created_ms))

    def check_room(
        self,
        tenant_id: str,
        session_id: str,
        live_turns: int,
        held_bytes: int | None,
        turn_count: int,
        size_bytes: int,
        *,
        version: int,
        expected_version: int | None,
    ) -> None:
        """Raises what an append of ``turn_count`` turns of ``size_bytes``
        (their serialized sizes) at ``expected_version`` (None: whatever the
        version) would meet now, to a session at ``version`` holding
        ``live_turns`` live turns and ``held_bytes`` (meta's count): the
        append's decision in its order, SESSION_QUOTA_EXCEEDED first (as this
        replica last found the tenant's record: TenantHoldings.
        check_last_refusal), then _APPEND's, VERSION_CONFLICT, then
        SESSION_FULL on the same caps, turns first; made before the append
        (an assembly's ``append_reservation``), reading nothing from Redis.
        A session whose bytes were never counted (None: stored before the
        count) is not checked by bytes here: its append counts it, once, and
        decides."""
        self.holdings.check_last_refusal(tenant_id, size_bytes + TURN_OVERHEAD_BYTES * turn_count)
        if expected_version is not None and version != expected_version:
            raise version_conflict(session_id, version, expected_version)
        if self._max_turns > 0 and live_turns + turn_count > self._max_turns:
            raise _session_full(session_id, "turns", self._max_turns, str(live_turns), turn_count)
        max_bytes = self._max_session_bytes
        if max_bytes > 0 and held_bytes is not None and held_bytes + size_bytes > max_bytes:
            raise _session_full(session_id, "bytes", max_bytes, str(held_bytes), turn_count)

    def needs_hold(self, live_turns: int, held_bytes: int | None, turn_count: int, size_bytes: int) -> bool:
        """Whether an assembly's reservation of ``turn_count`` turns of
        ``size_bytes`` is held (hold_room), given what this replica read of
        the session (check_room's counts): only where, with it, the session
        is past half of a cap. Further from both, the turns in flight on it
        beside this one would have to ask for more than half a cap together
        to take it past one, and holding would cost every assembly a Redis
        write (the default 24 MiB byte cap is on) to guard a case that
        needs as many turns in flight as the session holds already. Past
        that, a turn that did not hold is refused by its append as before
        the holds."""
        if self._max_turns > 0 and 2 * (live_turns + turn_count) > self._max_turns:
            return True
        max_bytes = self._max_session_bytes
        return max_bytes > 0 and held_bytes is not None and 2 * (held_bytes + size_bytes) > max_bytes

    async def hold_room(
        self,
        tenant_id: str,
        session_id: str,
        hold_id: str,
        hold_for_ms: int,
        turn_count: int,
        size_bytes: int,
    ) -> None:
        """Holds room for an append of ``turn_count`` turns of ``size_bytes``
        under ``hold_id`` (its turn id) for ``hold_for_ms`` (at most
        MAX_APPEND_HOLD_MS), or raises SESSION_FULL where, with the holds in
        force on the session, they would pass a cap (_HOLD): made after
        check_room, which answers a lone turn the same from what this
        replica read, with no Redis call. Raises SESSION_NOT_FOUND for a
        session gone since it was read."""
        hold_for_ms = min(hold_for_ms, MAX_APPEND_HOLD_MS)
        args = [hold_id, hold_for_ms, turn_count, size_bytes, self._max_turns, self._max_session_bytes]
        keys = [
            session_key(tenant_id, session_id),
            key(tenant_id, session_id, "turns"),
            key(tenant_id, session_id, "turn_ids"),
            holds_key(tenant_id, session_id),
        ]
        with redis_reachable():
            outcome = await self._hold(keys=keys, args=args)
        if outcome[0] == 0:
            raise session_not_found(session_id)
        full = {-2: ("turns", self._max_turns), -6: ("bytes", self._max_session_bytes)}.get(outcome[0])
        if full is not None:
            _, stored, in_flight = outcome
            raise _session_full(session_id, *full, str(stored), turn_count, int(in_flight))

    async def release_hold(self, tenant_id: str, session_id: str, hold_id: str) -> None:
        """Ends the append hold ``hold_id`` of the session, if it holds it."""
        with redis_reachable():
            await self._client.hdel(holds_key(tenant_id, session_id), hold_id)

    async def history(self, tenant_id: str, session_id: str) -> list[int | None]:
        """How many turns the session held at each version; None for the
        versions a revert undid. Empty for sessions stored before history."""
        with redis_reachable():
            raw = await self._client.get(key(tenant_id, session_id, "versions")) or b""
        return [None if held == UNDONE else held for held in decode_counts(raw, len(raw) // 4).tolist()]

    async def revert(
        self, tenant_id: str, session_id: str, version: int, expected_version: int | None
    ) -> int:
        """Makes the session hold the turns of ``version`` again, as a new
        version (returned), if it is at ``expected_version`` (None: whatever)."""
        expected = "" if expected_version is None else str(expected_version)
        with redis_reachable():
            outcome = await self._revert(
                keys=session_keys(tenant_id, session_id), args=[version, expected, self._ttl_s]
            )
        if outcome[0] == -3:
            raise _version_not_found(session_id, version, outcome[1])
        if outcome[0] == -5:
            raise _version_compacted(session_id, version, outcome[1], "be reverted to")
        _raise_for(outcome, session_id, expected_version)
        _, new_version, held_bytes, held_turns, beside = outcome
        held_bytes = None if held_bytes is None else int(held_bytes)
        await self.holdings.held(tenant_id, session_id, held_bytes, int(held_turns), int(beside))
        return int(new_version)

    async def fork(
        self,
        tenant_id: str,
        session_id: str,
        version: int,
        new_session_id: str,
        send: RequestIdSend | None = None,
    ) -> tuple[str, int]:
        """Creates ``new_session_id`` with the turns of ``version``, at that
        version, and the source's pins of them and its facts; returns its id
        and creation time. Where ``new_session_id`` is drawn from ``send``'s
        request id, a fork a send of it made is answered rather than made
        again (a replica of before's under the id it drew), or refused
        REQUEST_ID_REUSED where another request made the session there:
        asked first (_sent_before), so that a resend is answered whatever
        became of the source and the tenant's room since, and again in the
        fork's script, which writes the request's digest with the fork, so
        that of sends at once, a create's among them, one makes it."""
        if send is not None:
            made = await self._sent_before(tenant_id, new_session_id, send)
            if made is not None:
                return made
        with redis_reachable():
            source = await self._fork_source(keys=session_keys(tenant_id, session_id), args=[version])
        if source[0] == -3:
            raise _version_not_found(session_id, version, source[1])
        if source[0] == -5:
            raise _version_compacted(session_id, version, source[1], "be forked at")
        _raise_for(source, session_id, None)
        _, turns, counts, history, roles, lengths, dimensions, vectors, embedder, postings, pins = source
        # The fork's rows are its source's: so are their gaps (those of the
        # turns it does not take are none of its own, and its first backfill
        # finds none there and marks the count settled).
        fields = postings[::2]
        gap_writes = [
            value
            for field in (GAPS_FIELD.encode(), GAPS_SETTLED_FIELD.encode())
            if field in fields
            for value in (field, postings[2 * fields.index(field) + 1])
        ]
        turn_bytes = sum(map(len, turns))
        # The fork holds its pins too (every fact of its source, 256 of 4 KiB
        # at most, and the pins of the turns it takes): asked for as a pin
        # is (PinToSession: its text and PIN_OVERHEAD_BYTES), as the fork's
        # script reports them once written (BESIDE_TURNS). Asked for its
        # turns alone, forks at 20 pinned facts took a tenant to 3.4 times its
        # bound. These are the pins the fork's script writes (passed to it),
        # read from the source before: as for every write, the tenant's
        # writes in flight at once may pass the bound by what they add
        # (TenantHoldings).
        pin_bytes = sum(len(pin) + PIN_OVERHEAD_BYTES for pin in pins)
        await self.holdings.fits(tenant_id, new_session_id, held_by(turn_bytes, len(turns)) + pin_bytes)
        with redis_reachable():
            outcome = await self._fork_create(
                keys=[*session_keys(tenant_id, new_session_id), deleted_key(tenant_id, new_session_id)],
                args=[
                    version,
                    self._ttl_s,
                    history,
                    len(turns),
                    roles,
                    lengths,
                    dimensions,
                    vectors,
                    embedder,
                    len(counts) // 2,
                    len(pins),
                    "" if send is None else send.digest,
                    *turns,
                    *counts,
                    *pins,
                    *_postings_below(postings, len(turns)),
                    *gap_writes,
                ],
            )
        if outcome[0] == 0:
            raise MeshgateError(
                grpc.StatusCode.ALREADY_EXISTS,
                Reason.SESSION_EXISTS,
                f"session {new_session_id!r} already exists",
                {"session_id": new_session_id},
            )
        if outcome[0] == 2:
            return new_session_id, await self._answered(
                tenant_id, new_session_id, send, outcome[2], outcome[1]
            )
        if outcome[0] == 3:
            raise _made_and_deleted(new_session_id, send, outcome[1])
        _, created_ms, beside = outcome
        await self.holdings.held(tenant_id, new_session_id, turn_bytes, len(turns), int(beside))
        await self._listed(tenant_id, new_session_id, int(created_ms), of_request_id=send is not None)
        return new_session_id, int(created_ms)

    async def compact(
        self,
        tenant_id: str,
        session_id: str,
        version: int,
        upto: int,
        system: list[int],
        created_ms: int | None = None,
    ) -> int:
        """Compacts the session's first ``upto`` turns (see the module's
        docstring), read at ``version``, unless a revert changed them since
        or (``created_ms``: the read's create_time_ms) the session read was
        deleted and another created under its id; the bodies of the
        ``system`` turns and pinned ones stay. Returns how many turns are
        compacted now, -1 if they may have changed."""
        created = "" if created_ms is None else str(created_ms)
        with redis_reachable():
            keys = session_keys(tenant_id, session_id)
            args = [version, upto, self._ttl_s, created, TURN_IDS_KEPT, *system]
            compacted = int(await self._compact(keys=keys, args=args))
        if compacted >= 0:
            await self.recount(tenant_id, session_id)
        return compacted

    async def recount(self, tenant_id: str, session_id: str) -> None:
        """Sets the tenant's count of the session to what it holds now, read
        after the write that changed it (a compaction, a pin or an unpin, a
        summary's): a write between is counted by its own call, before or
        after this one: either way, right at the next. Never raises: the
        write it follows stands."""
        if not self.holdings.most:
            return
        try:
            held = await self._held(keys=session_keys(tenant_id, session_id))
        except redis_access.CONNECTION_ERRORS as error:
            log.warning("tenant's session bytes not counted", session_id=session_id, error=str(error))
            return
        # Gone meanwhile: its delete dropped its count, or its expiry will.
        if held:
            held_bytes, held_turns, beside = held
            held_bytes = None if held_bytes is None else int(held_bytes)
            await self.holdings.held(tenant_id, session_id, held_bytes, int(held_turns), int(beside))

    async def fill_token_counts(
        self,
        tenant_id: str,
        session_id: str,
        version: int,
        created_ms: int,
        tokenizer_id: str,
        counts: np.ndarray,
    ) -> None:
        """Stores the counts of every turn of ``version`` of the session
        created at ``created_ms``, unless the session moved on meanwhile (a
        later read then fills them)."""
        meta = session_key(tenant_id, session_id)
        args = [version, _counts_field(tokenizer_id), _pack(counts), created_ms]
        with redis_reachable():
            await self._fill_counts(keys=[meta], args=args)

    async def take_unbilled(
        self, tenant_id: str, session_id: str, take_id: str = ""
    ) -> tuple[SummarySpend, ...]:
        """What the session's summaries spent that no take took, taken now
        (_TAKE_UNBILLED), for the caller to bill once; or, for the
        ``take_id`` of the session's latest take, what that take took. Also
        once the session is deleted or expired, while its usage record
        lives."""
        _, spends = await self._take(tenant_id, session_id, take_id, hold=False)
        return spends

    async def take_held(
        self, tenant_id: str, session_id: str, take_id: str
    ) -> tuple[str, tuple[SummarySpend, ...]]:
        """As take_unbilled, but what it takes is held until
        acknowledge_take(take_id); while a take is held, the take it answers
        is that one (its id and what it took), and nothing more is taken."""
        return await self._take(tenant_id, session_id, take_id, hold=True)

    async def _take(
        self, tenant_id: str, session_id: str, take_id: str, hold: bool
    ) -> tuple[str, tuple[SummarySpend, ...]]:
        keys = [unbilled_key(tenant_id, session_id), session_key(tenant_id, session_id)]
        args = [take_id, summary_usage_ttl_s(self._ttl_s), "1" if hold else ""]
        with redis_reachable():
            outcome = await self._take_unbilled(keys=keys, args=args)
        if outcome[0] == 0:
            raise session_not_found(session_id)
        return outcome[2].decode(), _spends(outcome[1])

    async def acknowledge_take(self, tenant_id: str, session_id: str, take_id: str) -> None:
        """Ends the hold of the held take ``take_id`` (billed by its
        caller), if the session holds it."""
        with redis_reachable():
            await self._acknowledge_take(keys=[unbilled_key(tenant_id, session_id)], args=[take_id])

    async def delete(self, tenant_id: str, session_id: str) -> None:
        """Deletes every key of the session, then the content keys of its
        summaries, which hold what was said and are counted toward no
        session once it is gone (drop_summary_copies)."""
        with redis_reachable():
            keys = [
                *session_keys(tenant_id, session_id),
                fork_request_key(tenant_id, session_id),
                deleted_key(tenant_id, session_id),
            ]
            created_ms, digests = await self._delete(keys=keys, args=[DELETED_MARK_TTL_S])
        await self.holdings.dropped(tenant_id, session_id)
        # Decoded without raising: a value damaged in Redis is no digest
        # (drop_summary_copies skips it), and the delete has happened.
        named = [digest.decode(errors="replace") for digest in digests]
        await drop_summary_copies(self._client, tenant_id, named)
        if created_ms is None:
            raise session_not_found(session_id)
        await self.listing.unlisted(tenant_id, session_id, int(created_ms))


class OwedSessions:
    """The owed set: the sessions whose summaries' usage waits for a take
    (the module's docstring)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._mark = client.register_script(_MARK_OWED)
        self._claim = client.register_script(_CLAIM_OWED)
        self._drop = client.register_script(_DROP_OWED)

    async def mark(self, tenant_id: str, session_id: str) -> None:
        """Before a summary's usage is added to the session's ``unbilled``."""
        with redis_reachable():
            await self._mark(keys=[OWED_KEY], args=[_owed_member(tenant_id, session_id), ""])

    async def mark_if_unlisted(self, tenant_id: str, session_id: str) -> None:
        """After an append that found ``unbilled``: lists the session if
        nothing did (the module's docstring), keeping the score of one
        listed. The append is done: a Redis that fails now costs this mark
        alone, logged."""
        try:
            await self._mark(keys=[OWED_KEY], args=[_owed_member(tenant_id, session_id), "1"])
        except redis_access.CONNECTION_ERRORS as error:
            log.warning("session owing summary usage not listed", session_id=session_id, error=str(error))

    async def claim(self, owed_for_ms: int, most: int) -> list[Owed]:
        """Up to ``most`` sessions owing for at least ``owed_for_ms``, the
        longest owing first, claimed for as long. Those found owing nothing
        (each session a take has taken is, at the claim after) leave the set,
        and more are claimed in their place, for up to CLAIM_ROUNDS rounds:
        a claim that names fewer than ``most`` found no more due, or as
        good as none (its caller waits before the next)."""
        owed: list[Owed] = []
        with redis_reachable():
            for _ in range(CLAIM_ROUNDS):
                wanted = most - len(owed)
                named, read = await self._claim_round(owed_for_ms, wanted)
                owed += named
                if read < wanted or len(owed) == most:
                    break
        return owed

    async def _claim_round(self, owed_for_ms: int, most: int) -> tuple[list[Owed], int]:
        """The sessions of one claim script found owing, and how many it named."""
        now, *members = await self._claim(keys=[OWED_KEY], args=[owed_for_ms, most])
        if not members:
            return [], 0
        sessions = [json.loads(member) for member in members]
        # One round trip; a pipeline, as the sessions lie in many slots.
        async with self._client.pipeline(transaction=False) as pipe:
            for tenant_id, session_id in sessions:
                pipe.hmget(unbilled_key(tenant_id, session_id), "unbilled", "latest_key", "unbilled_held")
                pipe.hmget(session_key(tenant_id, session_id), "unbilled", "latest_key", "version")
            states = await pipe.execute()
        owed, settled = [], []
        for member, (tenant_id, session_id), record, meta in zip(
            members, sessions, states[::2], states[1::2], strict=True
        ):
            unbilled, recorded_key, held = record
            # Meta's ``unbilled`` an older version left (the module's docstring).
            older_unbilled, latest_key, version = meta
            if unbilled or older_unbilled or held:
                # The key of the session's latest turn while it lives; the
                # record's once it is deleted or expired.
                key_id = latest_key if version is not None else recorded_key
                owed.append(Owed(tenant_id, session_id, (key_id or b"").decode()))
            else:
                settled.append(member)
        if settled:
            await self._drop(keys=[OWED_KEY], args=[now, *settled])
        return owed, len(members)


def _owed_member(tenant_id: str, session_id: str) -> str:
    return json.dumps([tenant_id, session_id], separators=(",", ":"))


# What an append past each cap is told, by unit: the session's holding, and the refused turns.
_FULL_WORDING = {
    "turns": "holds {held} live turns; {count} more would pass its cap of {limit}",
    "bytes": "holds {held} bytes of turns; these {count} would pass its cap of {limit}",
}


def _session_full(
    session_id: str, unit: str, limit: int, held: str, count: int, in_flight: int = 0
) -> MeshgateError:
    """SESSION_FULL, alike for either cap; its metadata: ``unit`` (``turns``
    or ``bytes``), ``limit`` and what the session holds in that unit; and,
    for the turn cap, ``max_turns``, as callers have read it since before
    the byte cap; and ``in_flight_<unit>``, what turns still to be appended
    hold of it (_HOLD), where they hold any: room that comes back when a
    turn in flight ends without its append."""
    metadata = {"session_id": session_id, "unit": unit, "limit": str(limit), unit: held}
    if unit == "turns":
        metadata["max_turns"] = str(limit)
    wording = _FULL_WORDING[unit].format(held=held, count=count, limit=limit)
    if in_flight:
        metadata[f"in_flight_{unit}"] = str(in_flight)
        wording += f" with the {in_flight} held for turns in flight on it"
    return MeshgateError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.SESSION_FULL,
        f"session {session_id!r} {wording} (fork it at an earlier version, revert it, or start a new one)",
        metadata,
    )


def _raise_for(outcome: list, session_id: str, expected_version: int | None) -> None:
    """The failures every versioned write script reports alike."""
    if outcome[0] == 0:
        raise session_not_found(session_id)
    if outcome[0] == -1:
        raise version_conflict(session_id, int(outcome[1]), expected_version)


def version_conflict(session_id: str, current: int, expected_version: int | None) -> MeshgateError:
    """ABORTED VERSION_CONFLICT: a write that named the version it expected
    (an append's, a revert's, a pin's) found the session at another."""
    return MeshgateError(
        grpc.StatusCode.ABORTED,
        Reason.VERSION_CONFLICT,
        f"session {session_id!r} is at version {current}, not {expected_version}",
        {"current_version": str(current)},
    )
