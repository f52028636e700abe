"""The cache's Redis layout. With ``P`` = ``mg:cache:<tenant hex>:<model hex>:{<partition digest>}:``
(keys.Partition.key_prefix; the braces are a Redis Cluster hash tag):

- ``P x:<entry id>``: string, 8-byte little-endian expiry (ms since the
  epoch) then the CachedAnswer; Redis TTL = the entry's. The exact-match
  entry, and the answer of the semantic entry of the same prompt.
- ``P o:<context id>``: sorted set, entry id -> sequence number, i.e.
  insertion order: eviction takes the lowest, and an index tops itself up
  with the ids above the last one it has.
- ``P v:<context id>``: hash, entry id -> 8-byte expiry, the float32
  question embedding, then the question's UTF-8 text (which the verifier
  reads; entries stored before it was kept end after the vector).
- ``P w:<context id>``: integer, wrong hits reported in the sub-partition:
  each one makes the verifier stricter there. Lives as long as the
  sub-partition's entries (each semantic Store extends it with them).
- ``P r:<context id>``: set of ``<asked entry id> <served entry id>``, the
  wrong hits reported there: that prompt is never served that entry again,
  though the entry comes back (the report deletes it, and the next answer
  to its own prompt is stored under the same id); and the bare id of each
  entry reported, so that a report of it after it is deleted (another prompt
  it was served to) is still taken. Lives as long as ``w:``.
- ``mg:cache:seq:{<partition digest>}``: the partition's sequence counter,
  outside ``P`` so that an Invalidate never restarts it while some index
  still remembers higher numbers.
- ``mg:cache:invalidated:<tenant hex>``: hash, "" (the whole tenant) or a
  model's hex -> when it was last invalidated (Redis's clock in
  microseconds, past the last mark). A Lookup's miss (or a fence-only
  Lookup, for a Store with no lookup before it) returns the marks of its
  scope as a ``store_fence``; the Store of the answer generated after
  it passes the fence back and is undone if the marks moved meanwhile: a
  turn generating across an Invalidate stored its answer after it (a bug
  hunt: the very next ask was an exact hit of the answer from before).
  Invalidate marks before it scans and the Store reads the marks after it
  wrote, so either the Store sees the mark or the SCAN, begun after the
  mark, finds what the Store wrote.
- ``mg:cache:stored:{<tenant hex>}:<window length>:<window>``: integer,
  the bytes the tenant's Stores charged in one window of
  ``cache.max_bytes_per_tenant``'s count (``charge``), less what the
  entries they replaced, or that an Invalidate or a Store's undo removed,
  had been charged (``refund_windows``); lives two windows. An entry is charged
  to the window before the one it expires in (``charge_window``), so an
  Invalidate finds the window of each entry it removes from the entry's
  expiry.

A semantic Store is one Lua script, so the entry, its vector and the
eviction of the oldest entries are applied together or not at all. The
script deletes the evicted entries' exact keys by name (they are not in
KEYS); a Redis Cluster allows it because they share the partition's slot.
Invalidate and GetStats SCAN every master of a cluster (redis-py's cluster
scan_iter walks each in turn). Invalidate removes an entry's answer and its
row each in a script that reads what it was charged as it deletes it
(_INVALIDATE_ANSWERS, _INVALIDATE_ROWS), as a Store's undo does (_UNDO_STORE):
of two Invalidates at once, or an Invalidate and an undo, only the one
that deletes it gives it back.

A key holding another type than this layout says (an operator's or another
program's write: the cache never writes one) holds nothing of the cache's,
and one such key must fail no other work of its tenant, nor any other
tenant's. A script that writes a key deletes it first (_CLEAR_WRONG_TYPE),
an Invalidate deletes it with the tenant's other keys, an entry's key of
another type reads as a miss; a call that cannot go on without the key (a
fence read from broken invalidation marks, a semantic lookup of a broken
sub-partition) is refused FAILED_PRECONDITION CACHE_KEY_WRONG_TYPE, naming
it (``wrong_type``).

Whatever stops an entry's answer from being the one to serve for a prompt
(a reported wrong hit, an Invalidate, any Store) is announced on
``cache_notices.CHANNEL``, for the routers' local copies of hot hits.
Every Store announces its entry, a new one too: a router may hold a
semantic hit of that very prompt, filed under the prompt's entry id, which
the prompt's own answer now supersedes. Writes announce from inside their
script, so a Store costs no extra round trip. In a Redis Cluster a classic
PUBLISH is forwarded to every node over the cluster bus; at Store rates
(one notice per stored answer) that is cheap.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import struct
from collections.abc import AsyncIterator

import grpc
import redis.asyncio as redis
import structlog

from meshgate import cache_notices
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from meshgate.redis_access import CONNECTION_ERRORS, is_wrong_type, outage, run_script_replicated
from services.cache import keys
from services.cache.keys import Partition

log = structlog.get_logger(__name__)

_EXPIRY = struct.Struct("<q")
# Entries per round trip when an index loads: bounds the reply size, the
# rows a load holds outside its index (one batch: ~2.7 MB for rows within
# servicer.MAX_SEMANTIC_TEXT_BYTES; rows stored before that bound may be
# larger), and the time Redis spends on one script.
SYNC_BATCH = 1024
_SCAN_COUNT = 1000
# What names an answer's key and a vectors hash among a partition's keys
# (keys.Partition; tenant and model are hex, the rest after the hash tag).
_ANSWER_MARKER = b"}:x:"
_ROWS_MARKER = b"}:v:"
# How long an Invalidate that failed partway waits for its notice to go out
# (CacheStore.invalidate): Redis answers a publish in well under a
# millisecond when it is up at all.
_NOTICE_AFTER_FAILURE_S = 1.0

# Expired rows a Store looks for among its sub-partition's oldest: more
# than one, so that trimming outpaces expiry wherever entries share a TTL.
_EXPIRED_TRIM = 16

# What a script that writes a key first does with one holding another type
# than the cache keeps there (an operator's or another program's write): it
# holds nothing of the cache's, so it is deleted and the script goes on as
# over a missing key. Left, it failed every write of that key (WRONGTYPE),
# and such a key has no TTL, so for good: a Store of the prompt could never
# replace it, an Invalidate stopped at it (partway, the tenant's other
# partitions still served), a quota count of another type refused every Store
# of the tenant (a review). TYPE costs no more than a GET, on writes only.
_CLEAR_WRONG_TYPE = """
local function clear_wrong_type(key, kind)
  local held = redis.call('TYPE', key)['ok']
  if held ~= kind and held ~= 'none' then redis.call('DEL', key) end
end
"""

# What a Store's entry replaces was charged, and when: the size of its
# answer (its row) with the expiry its value starts with, {0, 0} for none.
# The window its charge went to follows from the expiry (charge_window): a
# refresh gave the bytes back to the window it ran in, so an entry first
# stored in the window before was charged there still, given back here, and
# counted in no window the bound reads once that one passed, while it lived
# (a review: a tenant over cache.max_bytes_per_tenant by the refreshed
# entries' bytes, up to twice the bound). Reads the expiry alone of an
# answer (GETRANGE), as _INVALIDATE_ANSWERS does.
_REPLACED = """
local function answer_charged(key)
  local size = redis.call('STRLEN', key)
  if size < 8 then return {0, 0} end
  -- In parentheses: struct.unpack's second value (the next position)
  -- would be a third element of the table.
  return {size, (struct.unpack('<i8', redis.call('GETRANGE', key, 0, 7)))}
end
local function row_charged(key, field)
  local row = redis.call('HGET', key, field)
  if (not row) or #row < 8 then return {0, 0} end
  return {#row, (struct.unpack('<i8', row))}
end
"""

_STORE_SEMANTIC = (
    _CLEAR_WRONG_TYPE
    + _REPLACED
    + """
-- KEYS: exact key, order zset, vectors hash, sequence counter, wrong-hit counter, reported pairs
-- ARGV: entry value, ttl ms, entry id, vector value, max entries, exact key prefix,
--       notices channel, the entry's notice
local ttl = tonumber(ARGV[2])
for i, kind in ipairs({'string', 'zset', 'hash', 'string', 'string', 'set'}) do
  clear_wrong_type(KEYS[i], kind)
end
-- What the entry replaces, for the tenant's count (CacheStore.replaced_charges):
-- the sizes of its answer and its row, each with its expiry.
local replaced = {answer_charged(KEYS[1]), row_charged(KEYS[3], ARGV[3])}
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
-- Announced even when new: see _STORE_EXACT.
redis.call('PUBLISH', ARGV[7], ARGV[8])
-- The entry's sequence number: Redis's clock in microseconds, past the last
-- one given. It keeps growing after the counter expired with the
-- partition's entries (a resident index only reads numbers above the last
-- it applied), and the counter lives no longer than they do.
local t = redis.call('TIME')
local last = tonumber(redis.call('GET', KEYS[4]) or '0')
local seq = string.format('%.0f', math.max(tonumber(t[1]) * 1000000 + tonumber(t[2]), last + 1))
redis.call('SET', KEYS[4], seq, 'KEEPTTL')
if redis.call('PTTL', KEYS[4]) < ttl then redis.call('PEXPIRE', KEYS[4], ttl) end
redis.call('ZADD', KEYS[2], seq, ARGV[3])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
local evicted = {}
-- Rows whose entry has expired, a few of the oldest each Store: the keys
-- of a sub-partition in use live as long as its newest entry, so without
-- this its dead rows stayed (8 Stores of 2 s entries, a second apart, left
-- 8 rows for 1 live entry) until max entries pushed them out, and every
-- index load read them. A row's value starts with its expiry (ms).
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Each evicted entry goes with its sequence number: a replica removes
-- that version only, never one a later Store (whose reply it may have
-- applied first) put back.
local oldest = redis.call('ZRANGE', KEYS[2], 0, EXPIRED_TRIM - 1, 'WITHSCORES')
if #oldest > 0 then
  local oldest_ids = {}
  for i = 1, #oldest, 2 do oldest_ids[#oldest_ids + 1] = oldest[i] end
  local rows = redis.call('HMGET', KEYS[3], unpack(oldest_ids))
  for i = 1, #oldest_ids do
    local row = rows[i]
    if (not row) or (#row >= 8 and struct.unpack('<i8', row) <= now_ms) then
      redis.call('ZREM', KEYS[2], oldest_ids[i])
      redis.call('HDEL', KEYS[3], oldest_ids[i])
      evicted[#evicted + 1] = oldest_ids[i]
      evicted[#evicted + 1] = oldest[2 * i]
    end
  end
end
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
if excess > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[2], excess)
  for i = 1, #popped, 2 do
    redis.call('HDEL', KEYS[3], popped[i])
    redis.call('DEL', ARGV[6] .. popped[i])
    evicted[#evicted + 1] = popped[i]
    evicted[#evicted + 1] = popped[i + 1]
  end
end
-- A sub-partition lives as long as its longest-lived entry, and so do its
-- reports (a missing key is left missing): the pairs reported expired
-- while the entry they name was stored again, and it was then served to
-- the prompt it had been reported for.
for _, i in ipairs({2, 3, 5, 6}) do
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return {seq, evicted, replaced}
""".replace("EXPIRED_TRIM", str(_EXPIRED_TRIM))
)

# One round trip, as a plain SET was (PUBLISH may not go in a cluster
# pipeline). The notice goes out on every Store, not only one replacing an
# entry: a router's copy of a semantic hit is also filed under the asked
# prompt's id, which has no entry until this Store creates it, and the
# prompt's own answer then supersedes the matched one. The cost is small:
# Stores follow generated answers (misses), far rarer than hits; a PUBLISH
# is a write to each router's subscription; a router drops nothing for an
# id it does not hold, and only a hit fetched while the notice arrived is
# not kept (one more hop, hot_exact.py).
_STORE_EXACT = (
    _CLEAR_WRONG_TYPE
    + _REPLACED
    + """
-- KEYS: exact key; ARGV: entry value, ttl ms, notices channel, the entry's notice
clear_wrong_type(KEYS[1], 'string')
-- What the entry replaces, for the tenant's count (CacheStore.replaced_charges).
local replaced = {answer_charged(KEYS[1]), {0, 0}}
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
redis.call('PUBLISH', ARGV[3], ARGV[4])
return replaced
"""
)

# Also how many entries the sub-partition lists: a replica whose index
# holds more live rows than that holds some Redis no longer does (the
# cache servicer's _drop_rows_gone).
_ENTRIES_SINCE = """
-- KEYS: order zset, vectors hash, wrong-hit counter; ARGV: after this sequence number, at most this many
local strictness = tonumber(redis.call('GET', KEYS[3]) or '0')
local count = redis.call('ZCARD', KEYS[1])
local listed = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, ARGV[2])
if #listed == 0 then return {strictness, {}, {}, count} end
local ids = {}
for i = 1, #listed, 2 do ids[#ids + 1] = listed[i] end
return {strictness, listed, redis.call('HMGET', KEYS[2], unpack(ids)), count}
"""

_REPORT_WRONG = (
    _CLEAR_WRONG_TYPE
    + """
-- KEYS: exact key, order zset, vectors hash, wrong-hit counter, reported pairs
-- ARGV: entry id, ttl ms, notices channel, the notice of the entry's tenant and model,
--       the reported pair (asked entry id, space, entry id),
--       '1' if a new pair of an entry a report deleted may be kept (the tenant had room)
-- Only an entry the sub-partition holds (its answer, or its row: an answer
-- expired before its row was trimmed), or one a report deleted (its bare id
-- is kept with the pairs: another prompt it was served to before that
-- report is kept from it too, once it is stored again under its id), or a
-- pair reported before (a retry, of a report older than the bare ids).
-- Anything else names no entry: a caller's made-up ids each added a pair
-- (and a count) for as long as the sub-partition lived. Nothing is written
-- (but a key of the sub-partition's of another type is deleted first:
-- _CLEAR_WRONG_TYPE; the entry's own key of another type goes as the entry).
for i, kind in ipairs({'zset', 'hash', 'string', 'set'}) do
  clear_wrong_type(KEYS[i + 1], kind)
end
if redis.call('EXISTS', KEYS[1]) == 0 and not redis.call('ZSCORE', KEYS[2], ARGV[1])
    and redis.call('SISMEMBER', KEYS[5], ARGV[5]) == 0 then
  if redis.call('SISMEMBER', KEYS[5], ARGV[1]) == 0 then return false end
  -- Of an entry gone, any prompt's report is taken: each deletes nothing
  -- and adds a pair, which no Store paid for (a bug hunt: one real report,
  -- then 2,000 of made-up prompts, kept 2,001 pairs and counts for a day).
  -- Taken only while the tenant has room for it (CacheStore.charge).
  if ARGV[6] ~= '1' then return 0 end
end
-- The deletes first, unlike the OOM_FIRST rule of the context store's
-- scripts: Redis checks a script for memory at its first write only, and a
-- delete passes a full Redis, so a report is taken when Redis is full (its
-- pair, ~130 bytes, then passes maxmemory by that much). With the SADD
-- first, a full Redis refused the report, and the answer it named as wrong
-- went on being served (a review).
-- As long as the sub-partition's entries, at least (read before this
-- entry's row goes): see _STORE_SEMANTIC.
local keep = math.max(tonumber(ARGV[2]), redis.call('PTTL', KEYS[2]), redis.call('PTTL', KEYS[3]))
local removed = redis.call('DEL', KEYS[1])
-- The version removed, so that a replica drops that one only (as a Store's
-- evictions): false when the entry had no row.
local seq = redis.call('ZSCORE', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
-- Even when the key had gone: a router may still hold a copy of it.
redis.call('PUBLISH', ARGV[3], ARGV[4])
-- 1 if the pair is new: a resent report (its reply lost) keeps nothing more,
-- and its charge goes back (the cache servicer's ReportWrongHit).
local new_pair = redis.call('SADD', KEYS[5], ARGV[5])
redis.call('SADD', KEYS[5], ARGV[1])
if redis.call('PTTL', KEYS[5]) < keep then redis.call('PEXPIRE', KEYS[5], keep) end
-- The count is of distinct reported pairs: a resent report makes the
-- sub-partition no stricter than the one it repeats (retries after lost
-- replies would otherwise ratchet every lookup's bar up).
local strictness
if new_pair == 1 then
  strictness = redis.call('INCR', KEYS[4])
else
  strictness = tonumber(redis.call('GET', KEYS[4]) or '0')
end
if redis.call('PTTL', KEYS[4]) < keep then redis.call('PEXPIRE', KEYS[4], keep) end
return {removed, strictness, new_pair, seq}
"""
)


# What a Store charges to its tenant (``charge``) beyond its values' bytes:
# a semantic Store of a 1,000-byte answer, 384-dimension vector and short
# question took 3,905 bytes of Redis's used_memory, 1,318 more than its
# values (keys, sorted-set and hash members, allocations; redis-server 6.2,
# jemalloc), rounded up.
ENTRY_OVERHEAD_BYTES = 1536

# What a report charges to its tenant (``charge``): the pair it keeps (129
# bytes) as a member of the reported set, Redis's own included, rounded up
# (MEMORY USAGE of a set of 2,000 pairs: 112 bytes each; redis-server 6.2).
REPORTED_PAIR_BYTES = 256


class NoRoomForReport(Exception):
    """A report that would keep a new pair of an entry a report deleted,
    without room for it in the tenant's quota (``CacheStore.report_wrong``)."""


# Charges a Store to its tenant's count of the current window or the one
# before (``charge_window``), unless the two windows' counts with it would
# pass the bound. Both windows' keys carry the tenant's hash tag (one slot),
# apart from the entry's partition: a separate call, before the entry's
# write, so a write that then fails stays charged (the count errs high, for
# two windows).
_CHARGE = (
    _CLEAR_WRONG_TYPE
    + """
-- KEYS: the tenant's count of this window, of the window before
-- ARGV: bytes, the bound, how long a count lives (ms: two windows), which key to charge (1 or 2)
-- A count of another type counts nothing (_CLEAR_WRONG_TYPE).
clear_wrong_type(KEYS[1], 'string')
clear_wrong_type(KEYS[2], 'string')
local held = tonumber(redis.call('GET', KEYS[1]) or '0') + tonumber(redis.call('GET', KEYS[2]) or '0')
if held + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return held end
local charged = KEYS[tonumber(ARGV[4])]
redis.call('INCRBY', charged, ARGV[1])
if redis.call('PTTL', charged) < 0 then redis.call('PEXPIRE', charged, ARGV[3]) end
return -1
"""
)


# Gives back to the tenant's counts of one or two windows what a Store
# replaced, a report's pair it did not keep (none, or one already held), or
# the entries an Invalidate removed, never below nothing (``refund``).
_REFUND = (
    _CLEAR_WRONG_TYPE
    + """
-- KEYS: the tenant's counts of windows; ARGV: the bytes to give back to each
local total = 0
for i, key in ipairs(KEYS) do
  clear_wrong_type(key, 'string')
  local held = tonumber(redis.call('GET', key) or '0')
  local given = math.min(held, tonumber(ARGV[i]))
  if given > 0 then redis.call('DECRBY', key, given) end
  total = total + given
end
return total
"""
)

# What the scripts that delete entries (an Invalidate's, a Store's undo)
# share: an entry's charge added to the window
# it was charged to (the window before the one it expires in, as
# ``charge_window`` says in Python), and their reply: ``first``, then window,
# bytes pairs (_add_charges reads them).
_CHARGES = """
local function charge(charged, expires_ms, window_ms, bytes)
  local window = math.floor(expires_ms / window_ms) - 1
  charged[window] = (charged[window] or 0) + bytes
end
local function charges_reply(first, charged)
  local reply = {first}
  for window, bytes in pairs(charged) do
    reply[#reply + 1] = window
    reply[#reply + 1] = bytes
  end
  return reply
end
"""

# Deletes answers (exact keys) of one partition (one slot: a cluster runs a
# script's keys on one node) and reads, as it deletes each, what its Store
# was charged for it and in which window (``replaced_charge``,
# ``charge_window``): whichever Invalidate deletes an answer gives it back,
# once. An answer expired is gone already and gives back nothing. Reads the
# expiry alone (GETRANGE), not an answer of up to 32 MiB.
_INVALIDATE_ANSWERS = (
    _CHARGES
    + """
-- KEYS: exact keys of one partition; ARGV: a window's length (ms)
-- Returns: answers deleted, then window, bytes pairs
local window_ms = tonumber(ARGV[1])
local charged = {}
local removed = 0
for _, key in ipairs(KEYS) do
  local held = redis.call('TYPE', key)['ok']
  -- A key of another type (_CLEAR_WRONG_TYPE) is no answer, charged
  -- nothing: deleted all the same, uncounted. STRLEN of it failed the
  -- script, and with it the whole Invalidate, after it had deleted other
  -- partitions' answers, and every retry the same way (a review).
  local size = 0
  if held == 'string' then
    size = redis.call('STRLEN', key)
  elseif held ~= 'none' then
    redis.call('UNLINK', key)
  end
  if size >= 8 then
    local expires_ms = struct.unpack('<i8', redis.call('GETRANGE', key, 0, 7))
    charge(charged, expires_ms, window_ms, size - 8 + ENTRY_OVERHEAD_BYTES)
    removed = removed + redis.call('UNLINK', key)
  end
end
return charges_reply(removed, charged)
""".replace("ENTRY_OVERHEAD_BYTES", str(ENTRY_OVERHEAD_BYTES))
)

# Deletes the rows one HSCAN step of a sub-partition's vectors hash finds,
# and reads what each was charged and in which window, as
# _INVALIDATE_ANSWERS does for answers: only live rows give back (an
# expired row, not yet trimmed, belongs to an answer that expired
# unrefunded). A step reads at most about _SCAN_COUNT rows (~1.6 MB at 384
# dimensions), so a partition of a million rows never holds Redis for
# one long script.
_INVALIDATE_ROWS = (
    _CHARGES
    + """
-- KEYS: a vectors hash; ARGV: HSCAN cursor, count, a window's length (ms)
-- Returns: the next cursor, then window, bytes pairs
-- A key of another type holds no rows: deleted (HSCAN of it failed the
-- Invalidate, as in _INVALIDATE_ANSWERS), the walk over.
local held = redis.call('TYPE', KEYS[1])['ok']
if held ~= 'hash' then
  if held ~= 'none' then redis.call('UNLINK', KEYS[1]) end
  return {0}
end
local window_ms = tonumber(ARGV[3])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local step = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local rows = step[2]
local charged = {}
local ids = {}
for i = 1, #rows, 2 do
  local row = rows[i + 1]
  if #row >= 8 then
    local expires_ms = struct.unpack('<i8', row)
    if expires_ms > now_ms then
      charge(charged, expires_ms, window_ms, #row - 8)
    end
  end
  ids[#ids + 1] = rows[i]
  -- HDEL in slices: Lua's unpack takes a few thousand arguments at most.
  if #ids == 500 then
    redis.call('HDEL', KEYS[1], unpack(ids))
    ids = {}
  end
end
if #ids > 0 then redis.call('HDEL', KEYS[1], unpack(ids)) end
return charges_reply(step[1], charged)
"""
)


# Set before an Invalidate scans (see the module docstring); the key lives
# at least a day, far longer than a turn (router.max_generation_s), so a
# fence read before it expired never matches the marks read after.
_MARK_INVALIDATED = (
    _CLEAR_WRONG_TYPE
    + """
-- KEYS: the tenant's invalidation marks; ARGV: field ('' or the model's hex), ttl ms
-- Marks of another type fenced nothing (every read of them failed, so no
-- Store in flight carries a fence of them): replaced by this mark, which
-- is newer than any fence read before they broke, so those Stores are undone.
clear_wrong_type(KEYS[1], 'hash')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.0f', math.max(now, last + 1)))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""
)
_MIN_MARK_TTL_MS = 24 * 3600 * 1000

# Undoes a Store whose fence no longer holds: only what that Store wrote
# (a later Store of the entry, with its own fence, keeps its answer and row),
# and announced, as the Store was: a router may have copied the answer since.
# Reads, as it deletes them, what the Store was charged for its answer and
# row and in which window, as the Invalidate scripts do: the Store charged
# before its write, and an Invalidate whose SCAN passed before the write
# landed gave none of it back (a bug hunt: each such Store stayed charged,
# 1,846 bytes for a short answer and its row, for up to two windows). What
# another Store replaced, or an Invalidate deleted (and gave back), is not
# deleted here, nor given back twice.
_UNDO_STORE = (
    _CHARGES
    + """
-- KEYS: exact key[, order zset, vectors hash]
-- ARGV: a window's length (ms), the entry value stored, notices channel, the entry's notice
--       [, entry id, its sequence number]
-- Returns: 1, then window, bytes pairs
local window_ms = tonumber(ARGV[1])
local expires_ms = struct.unpack('<i8', ARGV[2])
local charged = {}
if redis.call('GET', KEYS[1]) == ARGV[2] then
  redis.call('DEL', KEYS[1])
  charge(charged, expires_ms, window_ms, #ARGV[2] - 8 + ENTRY_OVERHEAD_BYTES)
end
if #KEYS == 3 then
  local seq = redis.call('ZSCORE', KEYS[2], ARGV[5])
  if seq and tonumber(seq) == tonumber(ARGV[6]) then
    local row = redis.call('HGET', KEYS[3], ARGV[5])
    redis.call('ZREM', KEYS[2], ARGV[5])
    redis.call('HDEL', KEYS[3], ARGV[5])
    if row then charge(charged, expires_ms, window_ms, #row - 8) end
  end
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return charges_reply(1, charged)
""".replace("ENTRY_OVERHEAD_BYTES", str(ENTRY_OVERHEAD_BYTES))
)


def _pair(asked_id: str, entry_id: str) -> str:
    return f"{asked_id} {entry_id}"


def _marks_of(tenant_id: str, model: str) -> tuple[str, str, str]:
    """HMGET's arguments for a scope's invalidation marks: the tenant's and the model's."""
    return keys.invalidated_key(tenant_id), "", model.encode().hex()


def _fence(marks: list[bytes | None]) -> str:
    return "/".join((mark or b"0").decode() for mark in marks)


@dataclasses.dataclass(frozen=True, slots=True)
class SemanticRow:
    entry_id: str
    seq: int
    expires_ms: int
    # The float32 vector, then the question's UTF-8 text (see split_payload).
    payload: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class SyncBatch:
    """One round trip's rows of ``CacheStore.batches_since``."""

    rows: list[SemanticRow]
    # Every entry up to this sequence number is in ``rows`` or gone from
    # Redis (an id listed without its vector is not a row).
    through_seq: int
    # The wrong hits reported in the sub-partition, as of this round trip.
    strictness: int
    # The entries the sub-partition lists (its order set), as of this round trip.
    listed: int


@dataclasses.dataclass(frozen=True, slots=True)
class WrongHitReport:
    """What ``CacheStore.report_wrong`` did."""

    # Whether the entry was there, and the sub-partition's count of reports.
    removed: bool
    strictness: int
    # Whether the reported pair is new to the sub-partition: False for a
    # resent report, whose pair Redis already held (nothing more kept).
    kept_new_pair: bool
    # The version of the entry's row removed; None: it had none.
    seq: int | None
    # Replicas the report was waited for on, and how many had it in time.
    replicas_wanted: int
    replicas_acknowledged: int


@dataclasses.dataclass(frozen=True, slots=True)
class Replaced:
    """What a Store's entry replaced: the bytes its answer's value and its
    row held (0: none), each with the expiry it carried (ms)."""

    value_bytes: int = 0
    value_expires_ms: int = 0
    row_bytes: int = 0
    row_expires_ms: int = 0

    def charges(self, window_s: int) -> collections.Counter[int]:
        """What its Store was charged (the cache servicer's ``_charge``), by
        the window charged (``charge_window``): each part less its expiry,
        the overhead with the answer."""
        charged: collections.Counter[int] = collections.Counter()
        if self.value_bytes:
            window = charge_window(self.value_expires_ms, window_s)
            charged[window] += self.value_bytes - _EXPIRY.size + ENTRY_OVERHEAD_BYTES
        if self.row_bytes:
            charged[charge_window(self.row_expires_ms, window_s)] += self.row_bytes - _EXPIRY.size
        return charged


def _replaced(reply) -> Replaced:
    """A store script's reply of what its entry replaced (_REPLACED)."""
    (value_bytes, value_expires_ms), (row_bytes, row_expires_ms) = reply
    return Replaced(int(value_bytes), int(value_expires_ms), int(row_bytes), int(row_expires_ms))


def charge_window(expires_ms: int, window_s: int) -> int:
    """The window of ``window_s`` seconds (cache.ttl_s) whose count an entry
    expiring at ``expires_ms`` is charged to: the one before the window it
    expires in. An entry of the full TTL is charged in the window it is
    stored in; a shorter-lived one perhaps in the window before, which the
    bound reads as long as the entry lives. So the window follows from the
    expiry the entry carries, and an Invalidate gives each entry back to
    the count it was charged to (another count would err low a window
    later, or high)."""
    return expires_ms // (window_s * 1000) - 1


def split_payload(payload: bytes, dimensions: int) -> tuple[bytes, str] | None:
    """The vector bytes and question of a stored row, or None when the row
    holds a vector of another size."""
    size = dimensions * 4
    if len(payload) < size:
        return None
    return payload[:size], payload[size:].decode("utf-8", "replace")


def _unavailable(error: Exception) -> MeshgateError:
    return outage("cache store unavailable", error)


def wrong_type(kind: str, key: str | bytes, held: str, remedy: str) -> MeshgateError:
    """FAILED_PRECONDITION ``CACHE_KEY_WRONG_TYPE`` for a cache key (``kind``
    says which of the layout's keys: the module docstring) that holds
    ``held``, another type than the cache keeps there: written by an
    operator or another program, not by a cache replica. Logged with the
    key in full (a status clips a metadata value to 128 characters).
    ``remedy``: what makes the call work again."""
    name = key.decode() if isinstance(key, bytes) else key
    log.warning("a cache key holds another type than the cache's", kind=kind, key=name, held=held)
    return MeshgateError(
        grpc.StatusCode.FAILED_PRECONDITION,
        Reason.CACHE_KEY_WRONG_TYPE,
        f"a cache key ({kind}) holds a {held} in Redis, not what the cache keeps there; {remedy}",
        {"key_kind": kind, "key": name, "held_type": held},
    )


# What makes a call refused for a key of the tenant's of another type work
# again (_STORE_SEMANTIC deletes such keys of its sub-partition; an Invalidate
# every key of the tenant's, the marks included).
_INVALIDATE_REPAIRS = "an Invalidate of the tenant deletes it"


def live_answer(value: bytes | None, now_ms: int) -> tuple[bytes, int] | None:
    """The serialized CachedAnswer of a stored entry and the milliseconds it
    has left to live, unless it has expired.

    Redis expires the key itself; the check here also holds while a replica
    has not yet applied the expiry.
    """
    if value is None:
        return None
    expires_in_ms = _EXPIRY.unpack_from(value)[0] - now_ms
    if expires_in_ms <= 0:
        return None
    return value[_EXPIRY.size :], expires_in_ms


@dataclasses.dataclass(slots=True)
class Invalidated:
    """What ``CacheStore.invalidate`` removed."""

    entries: int
    # What the live answers and rows removed were charged to the tenant's
    # count (cache.max_bytes_per_tenant), by the window charged.
    charged: collections.Counter[int]


def _add_charges(into: collections.Counter[int], pairs: list) -> None:
    """Adds a script's window, bytes pairs (_CHARGES' ``charges_reply``) to ``into``."""
    for window, size in zip(pairs[::2], pairs[1::2], strict=True):
        into[int(window)] += int(size)


class CacheStore:
    def __init__(self, client: redis.Redis, max_entries_per_partition: int) -> None:
        self._client = client
        self._max_entries = max(1, max_entries_per_partition)
        self._store_exact = client.register_script(_STORE_EXACT)
        self._store_semantic = client.register_script(_STORE_SEMANTIC)
        self._entries_since = client.register_script(_ENTRIES_SINCE)
        self._report_wrong = client.register_script(_REPORT_WRONG)
        self._mark_invalidated = client.register_script(_MARK_INVALIDATED)
        self._undo_store = client.register_script(_UNDO_STORE)
        self._charge = client.register_script(_CHARGE)
        self._refund = client.register_script(_REFUND)
        self._invalidate_answers = client.register_script(_INVALIDATE_ANSWERS)
        self._invalidate_rows = client.register_script(_INVALIDATE_ROWS)

    async def get(self, partition: Partition, entry_id: str) -> bytes | None:
        """An entry's stored value; None when it has none, or when its key
        holds another type (no answer of the cache's: a miss, which the
        next Store of the prompt replaces; raised, every Lookup of the
        prompt answered INTERNAL, a review)."""
        key = partition.exact_key(entry_id)
        try:
            return await self._client.get(key)
        except CONNECTION_ERRORS as error:
            raise _unavailable(error) from error
        except redis.ResponseError as error:
            if not is_wrong_type(error):
                raise
            log.warning("a cache entry's key holds another type: read as a miss", key=key)
            return None

    async def _wrong_type_among(
        self, error: redis.ResponseError, expected: dict[str, tuple[str | bytes, str]], remedy: str
    ) -> BaseException:
        """What to raise for ``error``, a command's or script's refusal of the
        keys ``expected`` names (kind -> key, the type the cache keeps
        there): for WRONGTYPE, ``wrong_type`` of the first that holds
        another type, read now (Redis's reply does not say which key);
        anything else is raised as it came."""
        if not is_wrong_type(error):
            return error
        named = list(expected.items())
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for _, (key, _) in named:
                    pipe.type(key)
                held = await pipe.execute()
        except CONNECTION_ERRORS as lost:
            return _unavailable(lost)
        for (kind, (key, kept)), found in zip(named, held, strict=True):
            found = found.decode() if isinstance(found, bytes) else found
            if found not in (kept, "none"):
                return wrong_type(kind, key, found, remedy)
        # Put right since (a Store or an Invalidate, in the moment between).
        return error

    async def store_fence(self, partition: Partition) -> str:
        """The scope's invalidation marks. Read apart from the entry, and only
        by an exact lookup that missed or a fence-only one (those whose fence
        a Store carries): hits never pay for it, and on a cluster a tenant's
        marks key (one slot) is not read by every one of its lookups.
        Marks of another type fence nothing: refused (CACHE_KEY_WRONG_TYPE)
        until an Invalidate of the tenant replaces them (_MARK_INVALIDATED);
        a fence made up here would let a Store in flight across an
        Invalidate keep its stale answer."""
        marks_key, *fields = _marks_of(partition.tenant_id, partition.model)
        try:
            return _fence(await self._client.hmget(marks_key, *fields))
        except CONNECTION_ERRORS as error:
            raise _unavailable(error) from error
        except redis.ResponseError as error:
            expected = {"invalidation marks": (marks_key, "hash")}
            raise await self._wrong_type_among(error, expected, _INVALIDATE_REPAIRS) from error

    async def undo_store(
        self,
        partition: Partition,
        entry_id: str,
        answer: bytes,
        expires_ms: int,
        window_ms: int,
        context_id: str = "",
        seq: int = 0,
    ) -> collections.Counter[int]:
        """Removes what one Store wrote (``answer`` expiring at ``expires_ms``
        under ``entry_id``, and for a semantic one its row of sequence number
        ``seq`` in ``context_id``'s sub-partition), if nothing replaced it
        since; returns what the Store was charged for what this removed, by
        window (windows of ``window_ms``, cache.ttl_s: for ``refund_windows``)."""
        keys_ = [partition.exact_key(entry_id)]
        args: list[bytes | str | int] = [
            window_ms,
            _EXPIRY.pack(expires_ms) + answer,
            cache_notices.CHANNEL,
            cache_notices.entry_notice(entry_id),
        ]
        if context_id:
            keys_ += [partition.order_key(context_id), partition.vectors_key(context_id)]
            args += [entry_id, seq]
        try:
            _, *charged = await self._undo_store(keys=keys_, args=args)
        except CONNECTION_ERRORS as error:
            raise _unavailable(error) from error
        removed: collections.Counter[int] = collections.Counter()
        _add_charges(removed, charged)
        return removed

    async def get_unless_reported(
        self, partition: Partition, context_id: str, entry_id: str, asked_id: str
    ) -> tuple[bytes | None, bool]:
        """The entry, and whether it was reported as a wrong answer to the
        prompt of ``asked_id``, in one round trip (keys of one slot). An
        entry's key of another type reads as no entry (``get``), a reported
        set of another type as the pair reported: what it held is unknown,
        and a miss is the safe answer."""
        entry_key = partition.exact_key(entry_id)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(entry_key)
                pipe.sismember(partition.reported_key(context_id), _pair(asked_id, entry_id))
                value, reported = await pipe.execute(raise_on_error=False)
        except CONNECTION_ERRORS as error:
            raise _unavailable(error) from error
        for answer in (value, reported):
            if isinstance(answer, BaseException) and not is_wrong_type(answer):
                raise answer
        if isinstance(value, BaseException):
            log.warning("a cache entry's key holds another type: read as a miss", key=entry_key)
            value = None
        if isinstance(reported, BaseException):
            log.warning("a cache sub-partition's reported pairs hold another type: not served")
            reported = True
        return value, bool(reported)

    async def charge(
        self, tenant_id: str, size: int, most: int, window_s: int, now_ms: int, expires_ms: int | None = None
    ) -> int | None:
        """Charges ``size`` bytes to the tenant unless what it stored in this
        window of ``window_s`` seconds and the one before, with them, passes
        ``most``; returns None when charged, else what those windows hold.
        An entry expiring at ``expires_ms`` is charged to its
        ``charge_window`` (one of the two), anything else (a report's pair)
        to this window. An entry lives at most ``window_s`` (cache.ttl_s),
        so the tenant's live entries were all charged in these two windows;
        but for those charged under another ttl_s (windows of another
        length, not read here), gone within that ttl_s of the change
        (docs/configuration.md, cache.max_bytes_per_tenant, says by how much the tenant may
        pass the bound meanwhile)."""
        window = now_ms // (window_s * 1000)
        charged = window if expires_ms is None else charge_window(expires_ms, window_s)
        try:
            held = await self._charge(
                keys=[
                    keys.stored_bytes_key(tenant_id, window_s, window),
                    keys.stored_bytes_key(tenant_id, window_s, window - 1),
                ],
                args=[size, most, 2 * window_s * 1000, 2 if charged < window else 1],
            )
        except CONNECTION_ERRORS as error:
            raise _unavailable(error) from error
        return None if held < 0 else int(held)

    async def refund(self, tenant_id: str, size: int, window_s: int, now_ms: int) -> None:
        """Gives ``size`` bytes back to the tenant's count of the window
        ``charge`` charged at ``now_ms``, as far as it holds them: a
        report's pair that it did not keep (it named no entry, or Redis held
        the pair already), charged at ``now_ms``. (What an entry replaced,
        invalidated or undone gives back goes to the window it was charged
        in, from its expiry: ``refund_windows``.)"""
        await self.refund_windows(tenant_id, {now_ms // (window_s * 1000): size}, window_s, now_ms)

    async def refund_windows(self, tenant_id: str, sizes: dict[int, int], window_s: int, now_ms: int) -> None:
        """Gives back ``sizes`` (bytes by the window they were charged in),
        each to its window's count as far as it holds them; only to the
        windows the bound reads at ``now_ms`` (this one and the one before):
        an older window's count no longer counts, nor holds its key long."""
        window = now_ms // (window_s * 1000)
        read = [
            (charged, size) for charged, size in sizes.items() if size and window - 1 <= charged <= window
        ]
        if not read:
            return
        try:
            await self._refund(
                keys=[keys.stored_bytes_key(tenant_id, window_s, charged) for charged, _ in read],
                args=[size for _, size in read],
            )
        except CONNECTION_ERRORS as error:
            raise _unavailable(error) from error

    async def put_exact(
        self, partition: Partition, entry_id: str, answer: bytes, now_ms: int, ttl_ms: int
    ) -> Replaced:
        """Stores an exact entry; returns what the entry it replaced held."""
        value = _EXPIRY.pack(now_ms + ttl_ms) + answer
        try:
            replaced = await self._store_exact(
                keys=[partition.exact_key(entry_id)],
                args=[value, ttl_ms, cache_notices.CHANNEL, cache_notices.entry_notice(entry_id)],
            )
        except CONNECTION_ERRORS as error:
            raise _unavailable(error) from error
        return _replaced(replaced)

    async def put_semantic(
        self,
        partition: Partition,
        context_id: str,
        entry_id: str,
        answer: bytes,
        vector: bytes,
        question: str,
        now_ms: int,
        ttl_ms: int,
    ) -> tuple[int, list[tuple[str, int]], Replaced]:
        """Stores an entry with its question vector and text; returns its
        sequence number, the entries evicted to make room or found
        expired, each as (id, sequence number), and what the version of the
        entry it replaced held."""
        expiry = _EXPIRY.pack(now_ms + ttl_ms)
        try:
            seq, evicted, replaced = await self._store_semantic(
                keys=[
                    partition.exact_key(entry_id),
                    partition.order_key(context_id),
                    partition.vectors_key(context_id),
                    partition.sequence_key,
                    partition.strictness_key(context_id),
                    partition.reported_key(context_id),
                ],
                args=[
                    expiry + answer,
                    ttl_ms,
                    entry_id,
                    expiry + vector + question.encode(),
                    self._max_entries,
                    partition.exact_key(""),
                    cache_notices.CHANNEL,
                    cache_notices.entry_notice(entry_id),
                ],
            )
        except CONNECTION_ERRORS as error:
            raise _unavailable(error) from error
        # Scores come back as strings of doubles; a sequence number (µs) is exact in one.
        pairs = zip(evicted[::2], evicted[1::2], strict=True)
        evicted_rows = [(entry_id.decode(), int(float(score))) for entry_id, score in pairs]
        return int(seq), evicted_rows, _replaced(replaced)

    async def batches_since(
        self, partition: Partition, context_id: str, after_seq: int
    ) -> AsyncIterator[SyncBatch]:
        """The semantic entries of a sub-partition stored after ``after_seq``,
        oldest first, one round trip at a time: the caller applies each batch
        before the next is read, so a partition of a million rows is never
        held whole outside its index. At least one batch, perhaps empty."""
        order_key = partition.order_key(context_id)
        vectors_key = partition.vectors_key(context_id)
        strictness_key = partition.strictness_key(context_id)
        while True:
            try:
                strictness, listed, values, count = await self._entries_since(
                    keys=[order_key, vectors_key, strictness_key], args=[after_seq, SYNC_BATCH]
                )
            except CONNECTION_ERRORS as error:
                raise _unavailable(error) from error
            except redis.ResponseError as error:
                # The sub-partition's semantic lookups are refused, naming the
                # key, until its next semantic Store (_STORE_SEMANTIC) or an
                # Invalidate deletes it; other sub-partitions are not touched.
                raise await self._wrong_type_among(
                    error,
                    {
                        "sub-partition's order set": (order_key, "zset"),
                        "sub-partition's vectors hash": (vectors_key, "hash"),
                        "sub-partition's wrong-hit count": (strictness_key, "string"),
                    },
                    "the sub-partition's next semantic Store or an Invalidate of the tenant deletes it",
                ) from error
            rows: list[SemanticRow] = []
            for i, value in enumerate(values):
                after_seq = int(listed[2 * i + 1])
                # The set and the hash share a TTL but Redis expires them
                # one by one: an id may briefly outlive its vector.
                if value is not None:
                    (expires_ms,) = _EXPIRY.unpack_from(value)
                    rows.append(
                        SemanticRow(listed[2 * i].decode(), after_seq, expires_ms, value[_EXPIRY.size :])
                    )
            last = len(values) < SYNC_BATCH
            # Only the rows stay alive while the caller applies them.
            del listed, values
            yield SyncBatch(rows, after_seq, int(strictness), int(count))
            if last:
                return

    async def versions_held(
        self, partition: Partition, context_id: str, entry_ids: list[str]
    ) -> list[int | None]:
        """The sequence number of the version of each entry the sub-partition
        lists (None: none), in one round trip."""
        order_key = partition.order_key(context_id)
        try:
            scores = await self._client.zmscore(order_key, entry_ids)
        except CONNECTION_ERRORS as error:
            raise _unavailable(error) from error
        except redis.ResponseError as error:
            expected = {"sub-partition's order set": (order_key, "zset")}
            raise await self._wrong_type_among(error, expected, _INVALIDATE_REPAIRS) from error
        # Scores come back as doubles; a sequence number (µs) is exact in one.
        return [None if score is None else int(score) for score in scores]

    async def report_wrong(
        self,
        partition: Partition,
        context_id: str,
        entry_id: str,
        asked_id: str,
        ttl_ms: int,
        replicas: int,
        replication_timeout_s: float,
        room_for_a_pair: bool = True,
    ) -> WrongHitReport | None:
        """Deletes an entry served as a wrong answer to the prompt of
        ``asked_id``, remembers the pair, and counts the report in its
        sub-partition, then waits until that is on ``replicas`` replicas of
        the master (at most ``replication_timeout_s``): a report lost in a
        failover would serve the wrong answer again. None, with nothing
        written, when ``entry_id`` names no entry of the sub-partition,
        none a report deleted, and the pair was never reported
        (_REPORT_WRONG). A pair reported before (a resent report) is kept
        once: ``kept_new_pair`` says whether this report added it. Raises
        NoRoomForReport, with nothing written, for a new pair of an entry a
        report deleted unless ``room_for_a_pair`` (the tenant's quota had
        room for it): such a report deletes nothing, and only the bound
        keeps its pairs from growing.

        The notice names the whole tenant and model, not the entry alone:
        the count makes the verifier stricter in the sub-partition, so the
        routers' copies of other semantic hits there may no longer be
        verdicts the cache would give (hot_exact.py). Reports are rare next
        to hits: the copies of that model are fetched again, one hop each."""
        try:
            replicated = await run_script_replicated(
                self._client,
                self._report_wrong,
                keys=[
                    partition.exact_key(entry_id),
                    partition.order_key(context_id),
                    partition.vectors_key(context_id),
                    partition.strictness_key(context_id),
                    partition.reported_key(context_id),
                ],
                args=[
                    entry_id,
                    ttl_ms,
                    cache_notices.CHANNEL,
                    cache_notices.scope_notice(partition.tenant_id, partition.model),
                    _pair(asked_id, entry_id),
                    "1" if room_for_a_pair else "0",
                ],
                replicas=replicas,
                timeout_s=replication_timeout_s,
            )
        except CONNECTION_ERRORS as error:
            raise _unavailable(error) from error
        if replicated.reply is None:
            return None
        if replicated.reply == 0:
            raise NoRoomForReport
        removed, strictness, new_pair, *row = replicated.reply
        # Lua's false comes back as nil, which ends the reply early.
        seq = int(float(row[0])) if row and row[0] is not None else None
        return WrongHitReport(
            bool(removed), int(strictness), bool(new_pair), seq, replicated.wanted, replicated.acknowledged
        )

    async def invalidate(
        self, tenant_id: str, model: str, ttl_ms: int, *, read_row_charges: bool = True
    ) -> Invalidated:
        """Deletes every key of a tenant, or of one of its models (``model``
        set), and announces it; returns how many were entries, and what the
        live answers and rows it deleted were charged, by window (for
        ``refund_windows``). Without ``read_row_charges`` (no quota kept,
        cache.max_bytes_per_tenant = 0) a vectors hash is unlinked whole,
        not walked for its rows' charges: an Invalidate of 10,000 entries
        took 0.58-0.67 of the time, 0.52-0.65 of Redis's CPU
        (bench/cache_invalidate_bench.py), and no step of a script holds
        Redis for 1,000 rows at a time.
        ``ttl_ms``: the longest an entry lives, and the
        length of a window of the tenant's count (cache.ttl_s); the marks key
        is kept at least that long and at least a day (_MIN_MARK_TTL_MS),
        though what the fence needs is only that a mark outlive the turns
        under way when it was set.

        SCAN walks the keyspace in slices, so Redis keeps serving meanwhile;
        entries stored while it runs may survive, but only answers whose
        lookup came after the mark (a Store with an older ``store_fence`` is
        undone). The notice goes out after
        the deletion: a router that drops its copies on hearing it finds
        nothing left to fetch again. It goes out too when the deletion
        fails or is cancelled partway, and the call still fails: what was
        deleted by then is gone, and the routers' copies of it would
        otherwise be served for up to router.hot_exact_max_age_s.

        A Redis too full for the mark (maxmemory, noeviction) still has the
        keys deleted: then the mark, and a second pass after it; or, still
        too full, UNAVAILABLE, so that the caller's retry fences (inline).
        """
        removed = Invalidated(0, collections.Counter())
        notice = cache_notices.scope_notice(tenant_id, model)

        async def mark() -> None:
            await self._mark_invalidated(
                keys=[keys.invalidated_key(tenant_id)],
                args=[model.encode().hex(), max(ttl_ms, _MIN_MARK_TTL_MS)],
            )

        try:
            try:
                try:
                    # Before the SCAN: see the module docstring.
                    await mark()
                except redis.OutOfMemoryError as full:
                    # Redis is full (noeviction) and the mark is the
                    # Invalidate's first write: refused, nothing was deleted
                    # and the tenant's entries went on being served (a
                    # review). Deletes pass a full Redis, so the keys go
                    # first, unfenced, which frees memory; then the mark, and
                    # a second pass after it, which the fence covers as
                    # usual (a Store in flight that wrote behind the first
                    # pass's SCAN is found by the second, or sees the mark
                    # and undoes itself). While Redis stays too full for the
                    # mark, the call fails UNAVAILABLE, its deletes done:
                    # the caller's retry writes the fence and passes again.
                    await self._remove_all(tenant_id, model, ttl_ms, removed, read_row_charges)
                    try:
                        await mark()
                    except redis.OutOfMemoryError:
                        raise full from None
                await self._remove_all(tenant_id, model, ttl_ms, removed, read_row_charges)
            except BaseException:
                # The notice still goes out (the docstring), on another
                # connection than a failed one (the pool drops that), but
                # the failure (or cancellation) is what the call tells, and a
                # Redis that is down does not hold the caller a connect
                # timeout more for a notice no one would hear.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(_NOTICE_AFTER_FAILURE_S):
                        await self._client.publish(cache_notices.CHANNEL, notice)
                raise
            await self._client.publish(cache_notices.CHANNEL, notice)
        except CONNECTION_ERRORS as error:
            raise _unavailable(error) from error
        return removed

    async def _remove_all(
        self, tenant_id: str, model: str, window_ms: int, removed: Invalidated, read_row_charges: bool
    ) -> None:
        """One pass of an Invalidate: SCANs the tenant's keys (of ``model``
        only, where set) and deletes them (``_remove``)."""
        batch: list[bytes] = []
        prefix = keys.tenant_prefix(tenant_id, model)
        async for key in self._client.scan_iter(match=f"{prefix}*", count=_SCAN_COUNT):
            batch.append(key)
            if len(batch) >= _SCAN_COUNT:
                await self._remove(batch, window_ms, removed, read_row_charges)
                batch = []
        if batch:
            await self._remove(batch, window_ms, removed, read_row_charges)

    async def _remove(
        self, batch: list[bytes], window_ms: int, removed: Invalidated, read_row_charges: bool
    ) -> None:
        """Deletes one SCAN batch of an Invalidate's keys, adding to
        ``removed`` the answers deleted and what they and the rows deleted
        were charged. Answers go in one script per partition (a slot each,
        keys.py's hash tag), a vectors hash one HSCAN step per script where
        ``read_row_charges``; the rest by the client's own UNLINK, which
        splits its keys by slot on a cluster."""
        answers: dict[bytes, list[bytes]] = collections.defaultdict(list)
        others = []
        for key in batch:
            if _ANSWER_MARKER in key:
                answers[key.split(b"}", 1)[0]].append(key)
                continue
            if read_row_charges and _ROWS_MARKER in key:
                await self._give_back_rows(key, window_ms, removed)
            others.append(key)
        for partition_keys in answers.values():
            deleted, *charged = await self._invalidate_answers(keys=partition_keys, args=[window_ms])
            removed.entries += int(deleted)
            _add_charges(removed.charged, charged)
        if others:
            await self._client.unlink(*others)

    async def _give_back_rows(self, key: bytes, window_ms: int, removed: Invalidated) -> None:
        """Deletes a vectors hash's rows one HSCAN step a script, adding what
        the live ones were charged to ``removed``. A row a Store adds during
        the walk is deleted and given back if a later step returns it (HSCAN
        returns what lands ahead of its cursor: 1,913 of 2,000 added after
        the first step of 22). One that lands behind the cursor, or after the
        last step (a small hash is one step), is deleted by _remove's UNLINK
        and gives nothing back: its bytes stay counted for two windows at
        most, as a failed write's do."""
        cursor = b"0"
        while True:
            cursor, *charged = await self._invalidate_rows(keys=[key], args=[cursor, _SCAN_COUNT, window_ms])
            _add_charges(removed.charged, charged)
            if cursor in (0, b"0"):
                return

    async def count_entries(self) -> int:
        """Entries of all tenants: a full SCAN, for an operator's GetStats,
        not for anything on the request path."""
        count = 0
        try:
            async for _ in self._client.scan_iter(match=keys.ENTRY_PATTERN, count=_SCAN_COUNT):
                count += 1
        except CONNECTION_ERRORS as error:
            raise _unavailable(error) from error
        return count
