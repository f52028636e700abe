"""API keys as data: created, listed, rotated and revoked at run time (the
AdminService), stored hashed in Redis next to the keys of the configuration
file, which keep working without Redis.

Redis keys, all with the hash tag ``{apikeys}``:

- ``mg:router:{apikeys}:key:<sha256>``: the key's record, JSON (tenant,
  models, limits, created, expires and revoked times, label). Only the
  SHA-256 of a secret is ever stored.
- ``mg:router:{apikeys}:tenant:<tenant>``: a sorted set of the tenant's key
  hashes, scored by creation time, for listing.
- ``mg:router:{apikeys}:ids``: a hash from key id (the first 16 hex digits
  of the SHA-256) to the full hash, for rotating and revoking by id.

Every write (create, rotate, revoke) is one MULTI/EXEC transaction, so a
failed write leaves nothing half-applied. On a Redis Cluster a transaction
must stay in one slot, hence the one tag for every API key: they are few,
written rarely, and each replica reads one at most twice a second (below),
so one slot carries them easily.

How a revocation reaches every replica within a second: each replica caches
a looked-up record (or its absence) for at most ``_CACHE_TTL_S`` (0.5 s)
from when it asked Redis and then reads it again (a GET slower than the
rest of that second stretches it); Redis is the one truth. Chosen over pub/sub
invalidation, which is cheaper per request but loses messages while a
replica reconnects to Redis, leaving a revoked key working until something
else evicts it; here the bound holds whatever happened to connections, and
costs at most two GETs per second per live key per replica.

What a caller sending made-up keys costs (each gRPC call's and HTTP
request's key is checked before its request or body is read, so this is
the whole price of a keyless flood): a
secret not shaped as :func:`new_secret` makes them cannot be stored, and is
refused with no Redis call (:func:`could_be_stored`); a well-shaped one
costs one GET, and its absence is cached apart from the records found, so
however many made-up keys arrive they never push a live key out of the
cache. Calls that ask for the same key at once share one GET.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import secrets
import time
from collections.abc import Callable

import grpc
import structlog

from meshgate import redis_access
from meshgate.config import ConfigError, LimitSettings, hash_api_key
from meshgate.errors import MeshgateError, invalid_argument, not_found, unavailable
from meshgate.reasons import Reason
from meshgate.single_flight import SingleFlight

log = structlog.get_logger(__name__)

_CACHE_TTL_S = 0.5
# Records found, kept per replica; past it they are emptied (live keys are
# far fewer: 869 B a record, docs/capacity.md).
_CACHE_MAX_ENTRIES = 100_000
# Keys looked up and found absent, kept apart from the records so that a
# flood of made-up keys empties only these; enough for the wrong keys of
# misconfigured clients retrying, a few hundred bytes each.
_ABSENT_MAX_ENTRIES = 10_000
_RECORD = "mg:router:{{apikeys}}:key:{}"
_TENANT_KEYS = "mg:router:{{apikeys}}:tenant:{}"
_IDS = "mg:router:{apikeys}:ids"
_SECRET_PREFIX = "mgk-"
# new_secret's 32 random bytes are 43 URL-safe base64 characters.
_STORED_SECRET = re.compile(re.escape(_SECRET_PREFIX) + r"[A-Za-z0-9_-]{43}")
_MAX_TENANT_ID = 128
_MAX_LABEL = 256
# 9999-12-31T23:59:59Z, the last instant a google.protobuf.Timestamp holds.
_LAST_TIMESTAMP_S = 253_402_300_799


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    key_hash: str
    tenant_id: str
    models: tuple[str, ...]
    limits: LimitSettings
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    label: str = ""

    @property
    def key_id(self) -> str:
        return self.key_hash[:16]

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields["models"] = list(self.models)
        return json.dumps(fields)

    @classmethod
    def from_json(cls, raw: bytes | str) -> KeyRecord:
        fields = json.loads(raw)
        fields["models"] = tuple(fields["models"])
        fields["limits"] = LimitSettings(**fields["limits"])
        return cls(**fields)


def new_secret() -> str:
    return _SECRET_PREFIX + secrets.token_urlsafe(32)


def could_be_stored(secret: str) -> bool:
    """Whether ``secret`` has the shape of the secrets :func:`new_secret`
    makes, the only ones the KeyStore holds: anything else is no stored key,
    known without asking Redis. (Keys of the configuration file may have any
    shape; they are checked before, in memory.)"""
    return _STORED_SECRET.fullmatch(secret) is not None


def check_key_request(
    tenant_id: str, models: list[str], limits: dict, known_models, expires_at: float | None, now: float
) -> tuple[tuple[str, ...], LimitSettings]:
    """A key's tenant, models, limits and expiry, checked before anything is written."""
    if not tenant_id:
        raise invalid_argument(Reason.TENANT_REQUIRED, "name the key's tenant_id")
    if len(tenant_id) > _MAX_TENANT_ID or not tenant_id.isprintable() or any(c.isspace() for c in tenant_id):
        raise invalid_argument(
            Reason.INVALID_KEY_SPEC, f"tenant_id must be 1-{_MAX_TENANT_ID} printable characters, no spaces"
        )
    models = tuple(models) or ("*",)
    unknown = sorted({m for m in models if m != "*" and m not in known_models})
    if unknown:
        raise not_found(
            Reason.MODEL_NOT_FOUND, f"no model alias {unknown[0]!r} is configured", model=unknown[0]
        )
    try:
        limit_settings = LimitSettings(**limits)
    except ConfigError as error:
        raise invalid_argument(Reason.INVALID_LIMIT, str(error)) from None
    if expires_at is not None and not now < expires_at <= _LAST_TIMESTAMP_S:
        raise invalid_argument(
            Reason.INVALID_KEY_SPEC, "expires_at must be in the future (and before year 10000)"
        )
    return models, limit_settings


def key_refusal(record: KeyRecord, now: float) -> MeshgateError | None:
    """Why a stored key may not be used now, or None."""
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    if record.revoked_at is not None:
        return MeshgateError(unauthenticated, Reason.API_KEY_REVOKED, "the API key was revoked")
    if record.expires_at is not None and record.expires_at <= now:
        return MeshgateError(unauthenticated, Reason.API_KEY_EXPIRED, "the API key has expired")
    return None


class KeyStore:
    def __init__(self, redis, clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._clock = clock
        # key hash -> (record, monotonic time it was read)
        self._found: dict[str, tuple[KeyRecord, float]] = {}
        # key hash -> monotonic time it was read and found absent
        self._absent: dict[str, float] = {}
        # key hash -> the GET under way, which callers asking at once share
        self._reading: SingleFlight[str, KeyRecord | None] = SingleFlight(
            "API key GET", cancel_when_abandoned=False
        )

    def now(self) -> float:
        return self._clock()

    async def lookup(self, key_hash: str) -> KeyRecord | None:
        """The key's record, at most _CACHE_TTL_S old; None when no such key."""
        now = time.monotonic()
        found = self._found.get(key_hash)
        if found is not None and now - found[1] < _CACHE_TTL_S:
            return found[0]
        absent_at = self._absent.get(key_hash)
        if absent_at is not None and now - absent_at < _CACHE_TTL_S:
            return None
        # Calls asking at once share one GET; one that is cancelled (its
        # client gone) ends neither the GET nor the others' wait, and the GET
        # runs on when all have gone: what it reads is cached for the next.
        return await self._reading.join(key_hash, functools.partial(self._read, key_hash))

    async def _read(self, key_hash: str) -> KeyRecord | None:
        # Aged from when it was asked, not answered: a record is then never
        # served more than _CACHE_TTL_S after Redis could have changed it.
        read_at = time.monotonic()
        try:
            raw = await self._redis.get(_RECORD.format(key_hash))
        except redis_access.CONNECTION_ERRORS as error:
            # Fail closed: a revoked key must not come back during an outage.
            raise unavailable(Reason.REDIS_UNAVAILABLE, f"API keys cannot be checked: {error}") from error
        if not self._reading.is_current(key_hash):
            # This replica wrote the key while the GET was under way (a
            # revocation, say): what it read may predate the write, so it
            # answers only the callers that asked before, and is not kept.
            return KeyRecord.from_json(raw) if raw is not None else None
        if raw is None:
            if len(self._absent) >= _ABSENT_MAX_ENTRIES:
                self._absent.clear()
            self._absent[key_hash] = read_at
            return None
        record = KeyRecord.from_json(raw)
        if len(self._found) >= _CACHE_MAX_ENTRIES:
            self._found.clear()
        self._found[key_hash] = (record, read_at)
        return record

    async def _by_id(self, key_id: str) -> KeyRecord:
        key_hash = await self._call(self._redis.hget(_IDS, key_id)) if key_id else None
        raw = await self._call(self._redis.get(_RECORD.format(key_hash.decode()))) if key_hash else None
        if raw is None:
            raise not_found(Reason.API_KEY_NOT_FOUND, "no stored API key has this id", key_id=key_id)
        return KeyRecord.from_json(raw)

    @staticmethod
    async def _call(awaitable):
        try:
            return await awaitable
        except redis_access.CONNECTION_ERRORS as error:
            raise unavailable(Reason.REDIS_UNAVAILABLE, f"API keys cannot be reached: {error}") from error

    async def _write(self, *records: KeyRecord) -> None:
        """Writes the records (new or changed) in one transaction."""
        pipe = self._redis.pipeline(transaction=True)
        for record in records:
            pipe.set(_RECORD.format(record.key_hash), record.to_json())
            pipe.zadd(_TENANT_KEYS.format(record.tenant_id), {record.key_hash: record.created_at})
            pipe.hset(_IDS, record.key_id, record.key_hash)
        await self._call(pipe.execute())
        for record in records:
            self._found.pop(record.key_hash, None)
            self._absent.pop(record.key_hash, None)
            # A GET under way may have read the record before this write:
            # callers from now on start their own (_read keeps none of it).
            self._reading.forget(record.key_hash)

    async def create(
        self,
        tenant_id: str,
        models: tuple[str, ...],
        limits: LimitSettings,
        expires_at: float | None,
        label: str,
    ) -> tuple[str, KeyRecord]:
        if len(label) > _MAX_LABEL:
            raise invalid_argument(Reason.INVALID_KEY_SPEC, f"label is longer than {_MAX_LABEL} characters")
        secret = new_secret()
        record = KeyRecord(
            hash_api_key(secret), tenant_id, models, limits, self.now(), expires_at, None, label
        )
        await self._write(record)
        return secret, record

    async def list(self, tenant_id: str) -> list[KeyRecord]:
        if not tenant_id:
            raise invalid_argument(Reason.TENANT_REQUIRED, "name the tenant_id whose keys to list")
        hashes = await self._call(self._redis.zrange(_TENANT_KEYS.format(tenant_id), 0, -1))
        if not hashes:
            return []
        raws = await self._call(self._redis.mget([_RECORD.format(h.decode()) for h in hashes]))
        return [KeyRecord.from_json(raw) for raw in raws if raw is not None]

    async def revoke(self, key_id: str) -> KeyRecord:
        record = await self._by_id(key_id)
        if record.revoked_at is not None:
            return record
        revoked = dataclasses.replace(record, revoked_at=self.now())
        await self._write(revoked)
        return revoked

    async def rotate(self, key_id: str) -> tuple[str, KeyRecord, KeyRecord]:
        record = await self._by_id(key_id)
        refusal = key_refusal(record, self.now())
        if refusal is not None:
            raise MeshgateError(
                grpc.StatusCode.FAILED_PRECONDITION, refusal.reason, f"cannot rotate: {refusal.message}"
            )
        secret = new_secret()
        now = self.now()
        successor = dataclasses.replace(record, key_hash=hash_api_key(secret), created_at=now)
        revoked = dataclasses.replace(record, revoked_at=now)
        await self._write(successor, revoked)
        return secret, successor, revoked
