"""Sessions in Redis, so they outlive any one process of the service.

Each session has two keys, both under ``mg:context:{tenant}:{session_id}``
so that another tenant's session id is simply absent:

- ``...:meta``, a hash: ``version``, ``create_time_ms`` and ``update_time_ms``
  (Redis's clock, so every replica of the service agrees), and one field
  ``tokens:<counter id>`` per tokenizer and chat template: each turn's tokens
  in the model's prompt (see services/context/token_counts.py) as
  little-endian uint32, counted once when the turns were appended.
- ``...:turns``, a list of serialized ``common.v1.Message``, oldest first.
- ``...:turn_ids``, a hash: the idempotency key of every append that gave
  one -> the version that append made, so a retried append is answered
  instead of applied twice.

Token counts always cover a prefix of the turns: all of them, unless the
tokenizer or template was configured after some turns were stored; a reader
then counts the rest and stores the completed counts, once.

Every change is a Lua script, so a version check and the write it guards are
atomic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import struct

import grpc
import redis.asyncio as redis
import structlog

from meshgate import redis_access
from meshgate.common.v1 import common_pb2
from meshgate.errors import MeshgateError, not_found, unavailable
from meshgate.reasons import Reason

log = structlog.get_logger(__name__)

# KEYS: meta, turns, turn_ids. ARGV: ttl_s. Returns the creation time, or nil if taken.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
-- Turns left by an expired session of the same id must not leak into this one.
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'version', 0, 'create_time_ms', now, 'update_time_ms', now)
local ttl = tonumber(ARGV[1])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return now
"""

# KEYS: meta, turns, turn_ids. ARGV: expected version ("" = append at the
# end whatever the version), turn id ("" = none), ttl_s, turn count n, n
# turns, then pairs of (counts field, packed counts of the n turns).
# Returns {1, new version}, {0} if there is no session, {-1, current
# version} on a version mismatch, {2, version} if the turn id was applied
# before (nothing is appended again).
_APPEND = """
local version = redis.call('HGET', KEYS[1], 'version')
if not version then return {0} end
if ARGV[2] ~= '' then
  local applied = redis.call('HGET', KEYS[3], ARGV[2])
  if applied then return {2, tonumber(applied)} end
end
if ARGV[1] ~= '' and version ~= ARGV[1] then return {-1, tonumber(version)} end
local n = tonumber(ARGV[4])
local stored = redis.call('LLEN', KEYS[2])
-- One RPUSH: the turn's messages stay adjacent whatever else is appended.
redis.call('RPUSH', KEYS[2], unpack(ARGV, 5, 4 + n))
for i = 5 + n, #ARGV, 2 do
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
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ttl) end
end
return {1, new_version}
"""

# KEYS: meta. ARGV: version the counts were made at, counts field, packed counts.
_FILL_COUNTS = """
if redis.call('HGET', KEYS[1], 'version') == ARGV[1] then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
end
return 0
"""

_META_FIELDS = ("version", "create_time_ms", "update_time_ms")


@dataclasses.dataclass(slots=True)
class StoredSession:
    version: int
    create_time_ms: int
    update_time_ms: int
    turns: list[common_pb2.Message]
    # Content token counts of the first len(token_counts) turns, for the
    # tokenizer the read asked for.
    token_counts: list[int]


def _keys(tenant_id: str, session_id: str) -> list[str]:
    prefix = f"mg:context:{tenant_id}:{session_id}"
    return [f"{prefix}:meta", f"{prefix}:turns", f"{prefix}:turn_ids"]


def _counts_field(tokenizer_id: str) -> str:
    return f"tokens:{tokenizer_id}"


def _pack(counts: list[int]) -> bytes:
    return struct.pack(f"<{len(counts)}I", *counts)


def _unpack(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 4}I", data))


def _session_not_found(session_id: str) -> MeshgateError:
    return not_found(Reason.SESSION_NOT_FOUND, f"no session {session_id!r}", session_id=session_id)


@contextlib.contextmanager
def _redis_reachable():
    """Reports a Redis outage as UNAVAILABLE for this call only; the pool
    reconnects on a later call once Redis is back."""
    try:
        yield
    except redis_access.CONNECTION_ERRORS as error:
        log.warning("redis unavailable", error=str(error))
        raise unavailable(Reason.REDIS_UNAVAILABLE, f"session store unavailable: {error}") from error


class SessionStore:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._create = client.register_script(_CREATE)
        self._append = client.register_script(_APPEND)
        self._fill_counts = client.register_script(_FILL_COUNTS)

    async def create(self, tenant_id: str, session_id: str) -> int:
        """Creates an empty session at version 0; returns its creation time."""
        with _redis_reachable():
            now = await self._create(keys=_keys(tenant_id, session_id), args=[self._ttl_s])
        if now is None:
            raise MeshgateError(
                grpc.StatusCode.ALREADY_EXISTS,
                Reason.SESSION_EXISTS,
                f"session {session_id!r} already exists",
                {"session_id": session_id},
            )
        return int(now)

    async def read(self, tenant_id: str, session_id: str, tokenizer_id: str | None = None) -> StoredSession:
        """The session's state and turns as of one instant (MULTI), with the
        stored counts of ``tokenizer_id`` if given."""
        meta, turns, _ = _keys(tenant_id, session_id)
        fields = [*_META_FIELDS, _counts_field(tokenizer_id)] if tokenizer_id else _META_FIELDS
        with _redis_reachable():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hmget(meta, fields)
                pipe.lrange(turns, 0, -1)
                values, raw_turns = await pipe.execute()
        if values[0] is None:
            raise _session_not_found(session_id)
        counts = values[3] if tokenizer_id and values[3] else b""
        return StoredSession(
            version=int(values[0]),
            create_time_ms=int(values[1]),
            update_time_ms=int(values[2]),
            turns=[common_pb2.Message.FromString(raw) for raw in raw_turns],
            token_counts=_unpack(counts),
        )

    async def append(
        self,
        tenant_id: str,
        session_id: str,
        expected_version: int | None,
        turns: list[common_pb2.Message],
        token_counts: dict[str, list[int]],
        turn_id: str = "",
    ) -> tuple[int, bool]:
        """Appends if the session is at ``expected_version``, or at the end
        whatever its version when it is None. Returns the new version and
        whether ``turn_id`` had been applied before (then nothing is
        appended now). ``token_counts`` maps tokenizer id to the turns' counts."""
        expected = "" if expected_version is None else str(expected_version)
        args: list[object] = [expected, turn_id, self._ttl_s, len(turns)]
        args.extend(turn.SerializeToString() for turn in turns)
        for tokenizer_id, counts in token_counts.items():
            args.extend((_counts_field(tokenizer_id), _pack(counts)))
        with _redis_reachable():
            outcome = await self._append(keys=_keys(tenant_id, session_id), args=args)
        if outcome[0] == 0:
            raise _session_not_found(session_id)
        if outcome[0] == -1:
            current = str(outcome[1])
            raise MeshgateError(
                grpc.StatusCode.ABORTED,
                Reason.VERSION_CONFLICT,
                f"session {session_id!r} is at version {current}, not {expected_version}",
                {"current_version": current},
            )
        return int(outcome[1]), outcome[0] == 2

    async def fill_token_counts(
        self, tenant_id: str, session_id: str, version: int, tokenizer_id: str, counts: list[int]
    ) -> None:
        """Stores the counts of every turn of ``version``, unless the session
        moved on meanwhile (a later read then fills them)."""
        meta = _keys(tenant_id, session_id)[0]
        with _redis_reachable():
            await self._fill_counts(keys=[meta], args=[version, _counts_field(tokenizer_id), _pack(counts)])

    async def delete(self, tenant_id: str, session_id: str) -> None:
        with _redis_reachable():
            deleted = await self._client.delete(*_keys(tenant_id, session_id))
        if not deleted:
            raise _session_not_found(session_id)
