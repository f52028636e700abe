"""API keys as data: created, listed, rotated and revoked at run time (the
AdminService), stored hashed in Redis next to the keys of the configuration
file, which keep working without Redis.

Redis keys, all with the hash tag ``{apikeys}``:

- ``mg:router:{apikeys}:key:<sha256>``: the key's record, JSON (tenant,
  models, limits, created, expires and revoked times, label, and for a key
  rotated from another the id it accounts under). Only the SHA-256 of a
  secret is ever stored.
- ``mg:router:{apikeys}:tenant:<tenant>``: a sorted set of the tenant's key
  hashes, scored by creation time, for listing a page at a time (below).
- ``mg:router:{apikeys}:ids``: a hash from key id (the first 16 hex digits
  of the SHA-256) to the full hash, for rotating and revoking by id.
- ``mg:router:{apikeys}:request:<name>``: the answer to a CreateKey or
  RotateKey that carried a request id (AIP-155), sealed, for a resend to
  get again; named and sealed by values derived from the request id
  (:mod:`services.router.request_ids`), for REQUEST_ID_RETENTION_S.

Every write (create, rotate, revoke) is one script (``_WRITE_IF_UNCHANGED``),
so a failed write leaves nothing half-applied, and it writes only if the
record it was decided from is still the one stored: two rotations of one
key at once, on two replicas, end as they would one after the other (the
second is refused, the key being revoked by the first), never with two
live successors. A write for a request id stores its answer in the same
script, and writes nothing where a send of that id has stored one: of
sends of one id at once, on any replicas, the first to write makes the key
and the others answer as it did (with no pending marker to wait on, nor
one left behind by a replica that died between making a key and storing
its answer). On a Redis Cluster a script's keys must stay in one slot,
hence the one tag for every API key: they are few, written rarely, and
each replica reads one at most twice a second (below), so one slot carries
them easily.

A write without a request id (a CreateKey or RotateKey a client cannot
send again safely) is made only while its caller can still hear of it:
the script reads Redis's TIME and writes nothing past a deadline the router
took from a TIME read just before (redis.timeout_s, or the caller's gRPC
deadline if sooner: _not_after). A RevokeKey has none: made late, a
revocation is still what was asked.

A key's limits and usage are counted under its accounting id
(:attr:`KeyRecord.accounting_id`): its own key id, but for a key rotated
from another, the first key's id, carried to every successor, so that
rotating a key keeps what it spent today and this month.

A stored key of a tenant in the configuration file (router.tenants) uses
only the models both allow (:func:`usable_models`): the tenant's list
bounds its keys as it bounds the tenant's own.

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

How ListKeys pages (AIP-158): in the order of the tenant's set (creation
time, then hash), each page after the last key of the one before, which
its page token names by that key's score and id (:class:`PageCursor`): a
place, not a snapshot, so nothing is held in Redis between pages and a
token works on any replica. A key's score never changes (a revocation or
rotation writes its record again with its own creation time), so a key
that exists for the whole listing is listed once, whatever is created or
revoked between pages. What a page of n keys costs Redis, whatever the
tenant's size: a range of n + 1 of the set's members (O(log N + n); a
later page's is two ranges in one round trip, the keys scored at the
cursor's instant, in practice one, and those after) and one MGET of n
records. Returning every key at once, a tenant of 50,000 keys made a 4.8 MB
answer that clients refuse by default (4 MiB), after one MGET of them all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import secrets
import struct
import time
from collections.abc import Callable

import grpc
import structlog

from meshgate import paging, redis_access
from meshgate.config import (
    DEV_TENANT_ID,
    ConfigError,
    LimitSettings,
    RedisSettings,
    hash_api_key,
    tenant_id_problem,
)
from meshgate.errors import MeshgateError, invalid_argument, not_found, unavailable
from meshgate.reasons import Reason
from meshgate.single_flight import SingleFlight
from services.router.request_ids import RequestId

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
_REQUEST = "mg:router:{{apikeys}}:request:{}"
_SECRET_PREFIX = "mgk-"
# new_secret's 32 random bytes are 43 URL-safe base64 characters.
_STORED_SECRET = re.compile(re.escape(_SECRET_PREFIX) + r"[A-Za-z0-9_-]{43}")
# A key's id (KeyRecord.key_id): the first 16 hex digits of its SHA-256, in lower case.
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_MAX_LABEL = 256
# 9999-12-31T23:59:59Z, the last instant a google.protobuf.Timestamp holds.
_LAST_TIMESTAMP_S = 253_402_300_799

# A key's record is kept this long after it was revoked or expired,
# whichever came first, for ListKeys and audits; then
# it goes (each rotation revokes one: kept for good they grew without
# bound, every one listed). Its entries in its tenant's set and the ids hash
# go when a listing or a lookup by id finds the record gone (_FORGET_GONE).
RETIRED_KEY_RETENTION_S = 30 * 24 * 3600

# ListKeys' page sizes: a page of 1000 keys with the longest tenant id and
# label (256 four-byte characters) and every limit set is 1.4 MB, within a
# client's default 4 MiB receive limit.
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# A page token's cursor (meshgate/paging.py): its layout's version, the
# score and the hash (raw) of the last key of the page before.
_PAGE_TOKEN_VERSION = 1
_PAGE_CURSOR = struct.Struct(">Bd8s")
_LISTING = "ListKeys"

# How long a CreateKey's or RotateKey's answer is kept for a resend with
# its request id: a client whose reply was lost sends again within seconds,
# or after its own restart or an operator's look; a day covers both and an
# overnight batch job's retries, while the sealed secret leaves Redis soon.
# Past it, a resend acts anew (a second key; a rotation refused as revoked).
REQUEST_ID_RETENTION_S = 24 * 3600
# What a write without a request id leaves its reply to come back within
# the call's timeout (_not_after): a loopback or LAN round trip is well
# under it.
_REPLY_MARGIN_S = 0.2

# Writes records only if one record is still what the writer read (a
# compare-and-set: Redis runs a script whole, with nothing in between).
# KEYS[1]: the record checked; ARGV[1]: what the writer read there, "" for
# absent (a record is never ""). KEYS[2]: the ids hash. KEYS[3]: the record
# of the call's request id, ARGV[2]: the answer to store there (sealed),
# ARGV[3]: for how long (s); ARGV[2] "" for a call without one (KEYS[3] is
# then not touched: any key of the slot), and ARGV[3] then the time (Redis's
# TIME, in us) after which it writes nothing (_not_after; 0: none). Then per record
# written, KEYS: its record and its tenant's set; ARGV: its JSON, creation
# time, hash, id and when the record goes (unix s; 0: never). Returns 1 when
# written, 0 when the record had changed, -1 when too late, and the answer
# stored for the request id where a send of it came first (nothing
# written: the key is that send's).
_WRITE_IF_UNCHANGED = """
if ARGV[2] ~= '' then
  local answered = redis.call('GET', KEYS[3])
  if answered then return answered end
elseif tonumber(ARGV[3]) > 0 then
  local now = redis.call('TIME')
  if tonumber(now[1]) * 1000000 + tonumber(now[2]) > tonumber(ARGV[3]) then return -1 end
end
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then
  return 0
end
for i = 4, #KEYS, 2 do
  local a = 5 * (i - 4) / 2 + 4
  redis.call('SET', KEYS[i], ARGV[a])
  if tonumber(ARGV[a + 4]) > 0 then redis.call('EXPIREAT', KEYS[i], ARGV[a + 4]) end
  redis.call('ZADD', KEYS[i + 1], ARGV[a + 1], ARGV[a + 2])
  redis.call('HSET', KEYS[2], ARGV[a + 3], ARGV[a + 2])
end
if ARGV[2] ~= '' then redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3]) end
return 1
"""

# Forgets keys whose records are gone (retention passed): KEYS[1] the
# tenant's set, KEYS[2] the ids hash, then each record's key; ARGV: per
# record, its hash and id. Only where the record is still absent, and the
# id still names that hash.
_FORGET_GONE = """
for i = 3, #KEYS do
  local key_hash, key_id = ARGV[2 * i - 5], ARGV[2 * i - 4]
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('ZREM', KEYS[1], key_hash)
    if redis.call('HGET', KEYS[2], key_id) == key_hash then redis.call('HDEL', KEYS[2], key_id) end
  end
end
return 1
"""


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
    # The id the key's limits and usage are counted under: the id of the
    # first key of its rotations, carried to every successor. Given as ""
    # (a new key; a record stored before this field), the key's own id.
    accounting_id: str = ""

    def __post_init__(self) -> None:
        if not self.accounting_id:
            object.__setattr__(self, "accounting_id", self.key_id)

    @property
    def key_id(self) -> str:
        return self.key_hash[:16]

    @property
    def kept_until(self) -> float | None:
        """When its record leaves Redis: RETIRED_KEY_RETENTION_S after it
        was revoked or expires; None for a key live for good."""
        ends = [t for t in (self.revoked_at, self.expires_at) if t is not None]
        return min(ends) + RETIRED_KEY_RETENTION_S if ends else None

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields["models"] = list(self.models)
        if self.accounting_id == self.key_id:
            # Stored only where it says something: a key never rotated
            # keeps the record layout a replica from before this field reads.
            del fields["accounting_id"]
        return json.dumps(fields)

    @classmethod
    def from_json(cls, raw: bytes | str) -> KeyRecord:
        fields = json.loads(raw)
        fields["models"] = tuple(fields["models"])
        fields["limits"] = LimitSettings.as_stored(fields["limits"])
        return cls(**fields)


def page_size(requested: int) -> int:
    """The keys a ListKeys page holds for a request's page_size (AIP-158)."""
    return paging.page_size(requested, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


@dataclasses.dataclass(frozen=True)
class PageCursor:
    """Where a listing of a tenant's keys goes on: after the key scored
    ``created_at`` whose hash begins with ``key_id`` in the tenant's set,
    whether or not that key is still there. The key's id, not its whole
    hash: a token shows no more of a key than ListKeys does (two keys of a
    tenant created at one clock reading whose hashes share their first 64
    bits are beyond chance)."""

    created_at: float
    key_id: str

    def token(self, tenant_id: str) -> str:
        """The page token naming this place in ``tenant_id``'s listing."""
        cursor = _PAGE_CURSOR.pack(_PAGE_TOKEN_VERSION, self.created_at, bytes.fromhex(self.key_id))
        return paging.page_token(_LISTING, tenant_id, cursor)

    @classmethod
    def of_token(cls, token: str, tenant_id: str) -> PageCursor:
        """The place ``token`` names in ``tenant_id``'s listing;
        INVALID_ARGUMENT INVALID_PAGE_TOKEN where it is no token this
        listing gave."""
        cursor = paging.cursor_of(_LISTING, tenant_id, token)
        if len(cursor) != _PAGE_CURSOR.size:
            raise paging.refused(_LISTING)
        version, created_at, key_id = _PAGE_CURSOR.unpack(cursor)
        # Redis refuses a NaN score: that would be an INTERNAL error, not the caller's.
        if version != _PAGE_TOKEN_VERSION or not math.isfinite(created_at):
            raise paging.refused(_LISTING)
        return cls(created_at, key_id.hex())


@dataclasses.dataclass(frozen=True)
class KeyPage:
    records: list[KeyRecord]
    # Where the next page starts; None after the last.
    following: PageCursor | None


def _answer_fields(answer: tuple) -> list[str]:
    """A create's or rotate's answer (a secret, then records) as sealed for its request id."""
    secret, *records = answer
    return [secret, *(record.to_json() for record in records)]


def _opened(request: RequestId, sealed: bytes) -> tuple:
    secret, *records = request.open(sealed)
    return (secret, *(KeyRecord.from_json(record) for record in records))


def new_secret() -> str:
    return _SECRET_PREFIX + secrets.token_urlsafe(32)


def could_be_stored(secret: str) -> bool:
    """Whether ``secret`` has the shape of the secrets :func:`new_secret`
    makes, the only ones the KeyStore holds: anything else is no stored key,
    known without asking Redis. (Keys of the configuration file may have any
    shape; they are checked before, in memory.)"""
    return _STORED_SECRET.fullmatch(secret) is not None


def usable_models(key_models, tenant_models: frozenset[str] | None) -> frozenset[str]:
    """The models a stored key may use: those both its own list and its
    tenant's (router.tenants[].models; None for a tenant not configured,
    which bounds nothing) allow. "*" on either side stands for the other's."""
    key_models = frozenset(key_models)
    if tenant_models is None or "*" in tenant_models:
        return key_models
    if "*" in key_models:
        return tenant_models
    return key_models & tenant_models


def check_tenant_id(tenant_id: str) -> str:
    """``tenant_id`` as an admin call names it, refused when no tenant can
    have it: an unchecked one went into Redis key names as given (GetUsage
    of a 512 KiB id over 400 days held about 1 GB of key names at once)."""
    problem = tenant_id_problem(tenant_id)
    if problem:
        raise invalid_argument(Reason.INVALID_TENANT_ID, f"tenant_id {problem}")
    return tenant_id


def check_key_request(
    tenant_id: str,
    models: list[str],
    limits: dict,
    known_models,
    expires_at: float | None,
    now: float,
    tenant_models: frozenset[str] | None = None,
) -> tuple[tuple[str, ...], LimitSettings]:
    """A key's tenant, models, limits and expiry, checked before anything is
    written. ``tenant_models``: the tenant's own models where it is
    configured, which a key may not go beyond ("*" on the key means them)."""
    if not tenant_id:
        raise invalid_argument(Reason.TENANT_REQUIRED, "name the key's tenant_id")
    problem = tenant_id_problem(tenant_id)
    if problem:
        raise invalid_argument(Reason.INVALID_KEY_SPEC, f"tenant_id {problem}")
    if tenant_id == DEV_TENANT_ID:
        # The dev tenant's key is public (router.dev_api_key): a stored key of
        # its id shared the holder's sessions, cached answers and usage with
        # anyone holding it, where the dev tenant is on or is turned on later
        # (a review; the settings refuse a configured tenant of its id).
        raise invalid_argument(
            Reason.INVALID_KEY_SPEC,
            f"tenant_id {DEV_TENANT_ID!r} is the dev tenant's (router.dev_tenant), whose key is public: "
            "choose another",
        )
    # Once each: every name is then "*" or a configured alias, so a key's
    # record is bounded (3,000,000 copies of "*" made a 15 MB record that
    # every call with the key parsed, and a ListKeys too large to send).
    models = tuple(dict.fromkeys(models)) or ("*",)
    # Malformed, not a name that may or may not be configured: no turn can
    # use an empty alias (validation.resolve_model refuses one), so it is
    # the request's fault, not a lookup's that found nothing.
    if "" in models:
        raise invalid_argument(
            Reason.INVALID_KEY_SPEC, 'models: a model name is empty (no models, or "*", allows all)'
        )
    unknown = sorted({m for m in models if m != "*" and m not in known_models})
    if unknown:
        raise not_found(
            Reason.MODEL_NOT_FOUND, f"no model alias {unknown[0]!r} is configured", model=unknown[0]
        )
    if tenant_models is not None and "*" not in tenant_models:
        # Refused rather than stored and left unusable: a key's models are
        # what its holder was told it may use.
        outside = sorted({m for m in models if m != "*" and m not in tenant_models})
        if outside:
            raise invalid_argument(
                Reason.MODEL_NOT_ALLOWED,
                f"tenant {tenant_id!r} may not use model {outside[0]!r} (router.tenants[].models)",
                model=outside[0],
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
    def __init__(
        self, redis, clock: Callable[[], float] = time.time, timeout_s: float = RedisSettings.timeout_s
    ) -> None:
        self._redis = redis
        self._clock = clock
        # How long a Redis call waits for its reply (redis.timeout_s): a
        # write without a request id is written only within it (_not_after).
        self._timeout_s = timeout_s
        # key hash -> (record, monotonic time it was read)
        self._found: dict[str, tuple[KeyRecord, float]] = {}
        # key hash -> monotonic time it was read and found absent
        self._absent: dict[str, float] = {}
        # key hash -> the GET under way, which callers asking at once share
        self._reading: SingleFlight[str, KeyRecord | None] = SingleFlight(
            "API key GET", cancel_when_abandoned=False
        )
        self._write_script = None  # registered on the first write
        self._forget_script = None

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

    async def lookup_id(self, key_id: str) -> KeyRecord | None:
        """The record of the key of ``key_id`` (the first 16 hex digits of
        its SHA-256) as :meth:`lookup` reads it; None when no stored key
        has that id."""
        key_hash = await self._call(self._redis.hget(_IDS, key_id))
        return await self.lookup(key_hash.decode()) if key_hash is not None else None

    async def _read(self, key_hash: str) -> KeyRecord | None:
        # Aged from when it was asked, not answered: a record is then never
        # served more than _CACHE_TTL_S after Redis could have changed it.
        read_at = time.monotonic()
        try:
            raw = await self._redis.get(_RECORD.format(key_hash))
        except redis_access.CONNECTION_ERRORS as error:
            # Fail closed: a revoked key must not come back during an outage.
            raise redis_access.outage("API keys cannot be checked", error) from error
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

    async def _by_id(self, key_id: str) -> tuple[KeyRecord, bytes]:
        """The key's record, and what Redis held for it (for _write to check)."""
        # An id is hex digits of a digest, the same number in either case;
        # stored and listed in lower case (hexdigest()), so an operator's
        # upper-case copy of one (RevokeKey "9F86D081...") found no key.
        key_id = key_id.lower()
        if not _KEY_ID.fullmatch(key_id):
            # No key can have it: told NOT_FOUND, the caller would look for
            # a key gone instead of at the id it sent (empty, cut short).
            raise invalid_argument(
                Reason.INVALID_KEY_ID, "key_id must be 16 hex digits, as CreateKey and ListKeys give it"
            )
        key_hash = await self._call(self._redis.hget(_IDS, key_id))
        raw = await self._call(self._redis.get(_RECORD.format(key_hash.decode()))) if key_hash else None
        if raw is None:
            if key_hash is not None:
                await self._forget_gone(None, [key_hash.decode()])
            raise not_found(Reason.API_KEY_NOT_FOUND, "no stored API key has this id", key_id=key_id)
        return KeyRecord.from_json(raw), raw

    async def _forget_gone(self, tenant_id: str | None, key_hashes: list[str]) -> None:
        """Drops keys whose records are gone from the tenant's set (when
        known) and the ids hash."""
        if self._forget_script is None:
            self._forget_script = self._redis.register_script(_FORGET_GONE)
        keys = [_TENANT_KEYS.format(tenant_id or ""), _IDS, *(_RECORD.format(h) for h in key_hashes)]
        args = [part for key_hash in key_hashes for part in (key_hash, key_hash[:16])]
        await self._call(self._forget_script(keys=keys, args=args))

    @staticmethod
    async def _call(awaitable):
        try:
            return await awaitable
        except redis_access.CONNECTION_ERRORS as error:
            raise redis_access.outage("API keys cannot be reached", error) from error

    async def _write(
        self,
        checked_hash: str,
        read: bytes | None,
        *records: KeyRecord,
        answer,
        request: RequestId | None = None,
        answer_by: float | None = None,
        bounded: bool = True,
    ):
        """Writes the records (new or changed) at once, if the record of
        ``checked_hash`` is still ``read`` (None: still absent), and returns
        ``answer``, the call's; None, and nothing written, where it has
        changed since. With a ``request`` id, stores ``answer`` (a secret,
        then records) for it in the same write; where a send of that id
        stored its answer first, writes nothing and returns that answer.
        Without one, and ``bounded`` (a revocation is not: made late, it is
        still what was asked), writes nothing (UNAVAILABLE) past the time
        its caller can still hear of it: ``answer_by`` (its deadline, on the
        monotonic clock; None: none), or the Redis call's timeout
        (_not_after)."""
        if self._write_script is None:
            self._write_script = self._redis.register_script(_WRITE_IF_UNCHANGED)
        checked = _RECORD.format(checked_hash)
        if request is None:
            keys = [checked, _IDS, checked]
            args: list = [read or "", "", await self._not_after(answer_by) if bounded else 0]
        else:
            keys = [checked, _IDS, _REQUEST.format(request.name)]
            args = [read or "", request.seal(_answer_fields(answer)), REQUEST_ID_RETENTION_S]
        for record in records:
            keys += [_RECORD.format(record.key_hash), _TENANT_KEYS.format(record.tenant_id)]
            kept_until = record.kept_until
            args += [
                record.to_json(),
                record.created_at,
                record.key_hash,
                record.key_id,
                # At least an hour on: a record written past its retention
                # (a key stored before it, expired long ago, revoked now) is
                # still answered and listed for a while, not deleted at once.
                0 if kept_until is None else math.ceil(max(kept_until, self.now() + 3600)),
            ]
        outcome = await self._call(self._write_script(keys=keys, args=args))
        if isinstance(outcome, bytes):
            return _opened(request, outcome)
        if outcome == -1:
            raise unavailable(
                Reason.REDIS_UNAVAILABLE,
                "API keys: Redis ran the write too late, and wrote nothing; send it again "
                "(with a request_id, a resend is answered as the first send)",
            )
        if not outcome:
            return None
        for record in records:
            self._found.pop(record.key_hash, None)
            self._absent.pop(record.key_hash, None)
            # A GET under way may have read the record before this write:
            # callers from now on start their own (_read keeps none of it).
            self._reading.forget(record.key_hash)
        return answer

    async def _not_after(self, answer_by: float | None) -> int:
        """When, on Redis's clock (TIME, in us), a write without a request id
        sent now must no longer be written: its reply could no longer reach
        its caller before the call gives up (redis.timeout_s) or its caller's
        deadline passes (``answer_by``, monotonic), less a margin for the
        reply's way back (_REPLY_MARGIN_S, a quarter of a shorter window).
        Written once its caller was told UNAVAILABLE (Redis stalled, a
        failover) or DEADLINE_EXCEEDED, such a write would list a key whose
        secret nobody has, or revoke a rotated key whose successor's secret
        was lost (its holder locked out, a resend refused API_KEY_REVOKED):
        so Redis writes it only while its caller can still hear of it. A
        request id's resend is answered as the first send instead, so such
        writes need no bound."""
        seconds, microseconds = await self._call(self._time())
        # The caller's time left measured now, once Redis's clock was read
        # (that reading is older than now: the window errs short), after
        # whatever the call did before (a rotation's reads).
        window_s = self._timeout_s
        if answer_by is not None:
            window_s = max(0.0, min(window_s, answer_by - time.monotonic()))
        window_s -= min(_REPLY_MARGIN_S, window_s / 4)
        return seconds * 1_000_000 + microseconds + round(window_s * 1_000_000)

    def _time(self):
        """Redis's TIME, on a Redis Cluster from the node that runs the
        write (the {apikeys} slot's): another node's clock may differ, and
        its outage would fail key writes its shard never sees."""
        locate = getattr(self._redis, "get_node_from_key", None)
        if locate is None:
            return self._redis.time()
        return self._redis.execute_command("TIME", target_nodes=locate(_IDS))

    async def _change(
        self,
        key_id: str,
        change: Callable[[KeyRecord], tuple[tuple[KeyRecord, ...], object]],
        request: RequestId | None = None,
        answer_by: float | None = None,
        bounded: bool = True,
    ):
        """Applies ``change`` to the key's record as one check-and-write:
        ``change`` is given the record as stored and returns the records to
        write (none: nothing to change) and its answer. Where the record
        changed between the read and the write (another replica rotated or
        revoked the key), nothing is written and ``change`` decides again
        from the new record, as if it had come second. That ends: every
        change revokes the record, and a revoked one is never written again.
        With a ``request`` id, the answer a send of it stored is the answer."""
        while True:
            record, read = await self._by_id(key_id)
            try:
                writes, answer = change(record)
            except MeshgateError:
                # Refused (revoked) where an earlier send of this request
                # id rotated the key, this one a resend or sent at once: that
                # send's answer, stored in the same write, is this one's.
                answered = await self.answered(request)
                if answered is None:
                    raise
                return answered
            if not writes:
                return answer
            answered = await self._write(
                record.key_hash,
                read,
                *writes,
                answer=answer,
                request=request,
                answer_by=answer_by,
                bounded=bounded,
            )
            if answered is not None:
                return answered

    async def answered(self, request: RequestId | None) -> tuple | None:
        """The answer stored for a send of the request id, as create or
        rotate returned it; None where none is (any more), or no id.
        ALREADY_EXISTS REQUEST_ID_REUSED where the id answered another request."""
        if request is None:
            return None
        sealed = await self._call(self._redis.get(_REQUEST.format(request.name)))
        return None if sealed is None else _opened(request, sealed)

    async def create(
        self,
        tenant_id: str,
        models: tuple[str, ...],
        limits: LimitSettings,
        expires_at: float | None,
        label: str,
        request: RequestId | None = None,
        answer_by: float | None = None,
    ) -> tuple[str, KeyRecord]:
        if len(label) > _MAX_LABEL:
            raise invalid_argument(Reason.INVALID_KEY_SPEC, f"label is longer than {_MAX_LABEL} characters")
        # Shown by ListKeys, to operators' terminals: a control character
        # (an escape sequence, a newline) would rewrite what an operator's
        # terminal or a log line shows.
        if not label.isprintable():
            raise invalid_argument(Reason.INVALID_KEY_SPEC, "label must be printable characters")
        while True:
            secret = new_secret()
            record = KeyRecord(
                hash_api_key(secret), tenant_id, models, limits, self.now(), expires_at, None, label
            )
            # Written only where no key has this hash: never taken, in
            # practice (256 random bits), and then drawn again.
            answered = await self._write(
                record.key_hash,
                None,
                record,
                answer=(secret, record),
                request=request,
                answer_by=answer_by,
            )
            if answered is not None:
                return answered

    async def list(
        self, tenant_id: str, size: int = DEFAULT_PAGE_SIZE, after: PageCursor | None = None
    ) -> KeyPage:
        """A page of the tenant's keys (revoked ones included), oldest first:
        the first ``size`` after ``after`` (None: from the first). Fewer
        where keys' records went (their retention passed), which are then
        forgotten."""
        members = await self._members(tenant_id, size + 1, after)
        page = members[:size]
        hashes = [key_hash for key_hash, _ in page]
        raws = await self._call(self._redis.mget([_RECORD.format(h) for h in hashes])) if hashes else []
        gone = [key_hash for key_hash, raw in zip(hashes, raws, strict=True) if raw is None]
        if gone:
            await self._forget_gone(tenant_id, gone)
        # The one member past the page says whether another follows.
        following = PageCursor(page[-1][1], page[-1][0][:16]) if len(members) > size else None
        return KeyPage([KeyRecord.from_json(raw) for raw in raws if raw is not None], following)

    async def _members(self, tenant_id: str, count: int, after: PageCursor | None) -> list[tuple[str, float]]:
        """Up to ``count`` key hashes of the tenant's set, with their scores,
        in its order (score, then hash), after ``after``."""
        name = _TENANT_KEYS.format(tenant_id)
        if after is None:
            found = await self._call(self._redis.zrange(name, 0, count - 1, withscores=True))
        else:
            # Those at the cursor's score but after its hash (keys created at
            # one clock reading: in practice none but the cursor's own), then
            # those scored later. By value, not rank: the cursor's key may have
            # left the set since (forgotten once its retention passed).
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrangebyscore(name, after.created_at, after.created_at, withscores=True)
                pipe.zrangebyscore(name, f"({after.created_at!r}", "+inf", 0, count, withscores=True)
                tied, later = await self._call(pipe.execute())
            found = [(key_hash, score) for key_hash, score in tied if key_hash.decode()[:16] > after.key_id]
            found += later
        return [(key_hash.decode(), score) for key_hash, score in found[:count]]

    async def revoke(self, key_id: str) -> KeyRecord:
        def revoke(record: KeyRecord):
            if record.revoked_at is not None:
                return (), record
            revoked = dataclasses.replace(record, revoked_at=self.now())
            return (revoked,), revoked

        # Not bounded by its caller's time: a revocation made late is still
        # what was asked (a leaked key's), and sending it again changes nothing.
        return await self._change(key_id, revoke, bounded=False)

    async def rotate(
        self, key_id: str, request: RequestId | None = None, answer_by: float | None = None
    ) -> tuple[str, KeyRecord, KeyRecord]:
        def rotate(record: KeyRecord):
            refusal = key_refusal(record, self.now())
            if refusal is not None:
                raise MeshgateError(
                    grpc.StatusCode.FAILED_PRECONDITION, refusal.reason, f"cannot rotate: {refusal.message}"
                )
            secret = new_secret()
            now = self.now()
            # The successor keeps the record's accounting id (replace copies
            # it), so its limits and usage go on where the key's left off.
            successor = dataclasses.replace(record, key_hash=hash_api_key(secret), created_at=now)
            revoked = dataclasses.replace(record, revoked_at=now)
            return (successor, revoked), (secret, successor, revoked)

        return await self._change(key_id, rotate, request, answer_by)
