"""API keys to tenants. Keys are configured as SHA-256 digests only, or
stored hashed in Redis (services/router/keys.py)."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses

import grpc
import structlog

from meshgate import telemetry
from meshgate.config import DEV_TENANT_ID, LimitSettings, RouterSettings, hash_api_key
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from meshgate.router.v1 import admin_service_pb2, router_service_pb2
from services.router.admission import TenantCalls
from services.router.keys import KeyRecord, KeyStore, could_be_stored, key_refusal, usable_models

_BEARER = "bearer"

log = structlog.get_logger(__name__)
# Once a minute per key: each call with it is refused.
_dev_tenant_keys = telemetry.ThrottledLog(log, interval_s=60.0)


@dataclasses.dataclass(frozen=True)
class Tenant:
    id: str
    models: frozenset[str]
    # The caller's key (first 16 hex digits of its SHA-256), for per-key
    # limits and usage; for a stored key, its accounting id (a rotated key
    # keeps the first key's: services/router/keys.py KeyRecord).
    key_id: str = ""
    limits: LimitSettings = dataclasses.field(default_factory=LimitSettings)
    key_limits: LimitSettings = dataclasses.field(default_factory=LimitSettings)
    # For model selection rules (router.tenants[].tier).
    tier: str = ""
    # The id of the caller's key itself (key_id, but for a rotated key its
    # own, not its first key's): a session keeps its latest turn's, whom its
    # summaries' usage is billed to (Authenticator.billed_tenant).
    own_key_id: str = ""

    def may_use(self, alias: str) -> bool:
        return "*" in self.models or alias in self.models


def _unauthenticated(reason: str, message: str) -> MeshgateError:
    return MeshgateError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


def _invalid_key() -> MeshgateError:
    return _unauthenticated(Reason.API_KEY_INVALID, "the API key is not valid")


@dataclasses.dataclass(frozen=True)
class CallerKey:
    """A caller's key as the router keeps it past the gate, a tenant's or
    the admin credential: its SHA-256, and whether its secret has the shape
    of a stored key (only such a key is looked up in Redis)."""

    key_hash: str
    may_be_stored: bool


@dataclasses.dataclass(frozen=True)
class _Configured:
    """What the configuration file says about callers, swapped as one value
    on a reload."""

    tenants_by_key_hash: dict[str, Tenant]
    # The same tenants by key id (the hash's first 16 hex digits), for
    # billed_tenant.
    tenants_by_key_id: dict[str, Tenant]
    tenant_limits: dict[str, LimitSettings]
    tenant_tiers: dict[str, str]
    tenant_models: dict[str, frozenset[str]]
    admin_key_hashes: frozenset[str]
    # router.dev_tenant: its id is then the public dev key's alone.
    dev_tenant: bool = False


class Authenticator:
    """Bearer keys to tenants: the configuration file's keys first (no
    Redis needed), then the stored keys of the AdminService (``keys``)."""

    def __init__(self, settings: RouterSettings, keys: KeyStore | None = None) -> None:
        self._keys = keys
        self.reconfigure(settings)

    def reconfigure(self, settings: RouterSettings) -> None:
        """Takes the tenants, keys and admin credential of new settings; a
        call already authenticated keeps the tenant it got, but for a
        ChatSession's next turn, which resolves its key again
        (:func:`current_tenant`)."""
        tenants_by_key_hash: dict[str, Tenant] = {}
        for tenant in settings.tenants:
            for digest in tenant.api_key_sha256:
                tenants_by_key_hash[digest.lower()] = Tenant(
                    tenant.id,
                    frozenset(tenant.models),
                    digest.lower()[:16],
                    tenant.limits,
                    tenant.key_limits,
                    tenant.tier,
                    digest.lower()[:16],
                )
        if settings.dev_tenant:
            dev_key = hash_api_key(settings.dev_api_key)
            tenants_by_key_hash[dev_key] = Tenant(DEV_TENANT_ID, frozenset({"*"}), own_key_id=dev_key[:16])
        # Two configured keys sharing an id (16 hex digits: beyond chance
        # unless made so) bill under the lower hash's, on every replica alike.
        tenants_by_key_id: dict[str, Tenant] = {}
        for key_hash in sorted(tenants_by_key_hash):
            tenants_by_key_id.setdefault(key_hash[:16], tenants_by_key_hash[key_hash])
        self._configured = _Configured(
            tenants_by_key_hash,
            tenants_by_key_id,
            {tenant.id: tenant.limits for tenant in settings.tenants},
            {tenant.id: tenant.tier for tenant in settings.tenants},
            {tenant.id: frozenset(tenant.models) for tenant in settings.tenants},
            frozenset(digest.lower() for digest in settings.admin_api_key_sha256),
            bool(settings.dev_tenant),
        )

    def tenant_models(self, tenant_id: str) -> frozenset[str] | None:
        """The models of ``tenant_id`` as configured, which bound its stored
        keys'; None for a tenant not configured."""
        return self._configured.tenant_models.get(tenant_id)

    async def authenticate(self, metadata) -> Tenant:
        tenant = await self.authenticate_caller(metadata)
        if tenant is None:  # the admin credential is no tenant's key
            raise _invalid_key()
        return tenant

    async def authenticate_caller(self, metadata) -> Tenant | None:
        """The caller's tenant, or None for the admin credential."""
        return (await self.identify(metadata))[0]

    async def identify(self, metadata) -> tuple[Tenant | None, CallerKey]:
        """The caller's tenant (None for the admin credential), and its key
        as :meth:`tenant_of` and :meth:`check_admin` take it, for a long
        call to resolve again later (:func:`current_tenant`)."""
        secret = _bearer_key(metadata)
        key = CallerKey(hash_api_key(secret), could_be_stored(secret))
        if key.key_hash in self._configured.admin_key_hashes:
            return None, key
        return await self.tenant_of(key), key

    def check_admin(self, key: CallerKey) -> None:
        """Refuses ``key``, the admin credential when its call was let in,
        where the configuration in use no longer has it (a reload took it
        out: a leaked one), as a new call with it is refused."""
        if key.key_hash not in self._configured.admin_key_hashes:
            raise _unauthenticated(
                Reason.API_KEY_INVALID,
                "the admin credential is no longer configured (router.admin_api_key_sha256)",
            )

    async def tenant_of(self, key: CallerKey) -> Tenant:
        """The tenant ``key`` names now: in the configuration in use, else
        as a stored key (not unknown, revoked or expired; from the
        KeyStore's cache, a record at most 0.5 s old), with its tenant's
        configured limits, models and tier; else the key's refusal."""
        configured = self._configured
        tenant = configured.tenants_by_key_hash.get(key.key_hash)
        if tenant is not None:
            return tenant
        if self._keys is None or not key.may_be_stored:
            raise _invalid_key()
        record = await self.check_stored_key(key.key_hash)
        if record.tenant_id == DEV_TENANT_ID and configured.dev_tenant:
            # Made before CreateKey refused the dev tenant's id (keys.py), or
            # with the dev tenant off: its holder would share the public dev
            # key's sessions, cached answers and usage (a final read).
            _dev_tenant_keys.warning(
                "a stored key of the dev tenant's id is refused while router.dev_tenant is on: revoke it",
                per=record.key_id,
                key_id=record.key_id,
            )
            raise _invalid_key()
        return self._stored_tenant(record)

    def _stored_tenant(self, record: KeyRecord) -> Tenant:
        """A stored key's tenant: the key's record, with its tenant's
        configured limits, models and tier."""
        configured = self._configured
        return Tenant(
            record.tenant_id,
            usable_models(record.models, configured.tenant_models.get(record.tenant_id)),
            record.accounting_id,
            configured.tenant_limits.get(record.tenant_id, LimitSettings()),
            record.limits,
            configured.tenant_tiers.get(record.tenant_id, ""),
            record.key_id,
        )

    async def billed_tenant(self, tenant_id: str, key_id: str) -> Tenant:
        """Whom usage of ``tenant_id`` that no request of it carries (a
        session's summaries', services/router/summary_usage.py) is billed
        to: the key of ``key_id`` (the session's latest turn's) as
        :meth:`tenant_of` resolves it now (a configured key first, then a
        stored key by the KeyStore's ids), but a stored key that has been
        revoked or has expired since is billed all the same (the usage is
        from its time); else, a key no longer known or now another tenant's,
        or none, the tenant with no key (its configured limits). UNAVAILABLE
        where Redis cannot tell a stored key."""
        configured = self._configured
        tenant = configured.tenants_by_key_id.get(key_id)
        if tenant is not None and tenant.id == tenant_id:
            return tenant
        if self._keys is not None and key_id:
            record = await self._keys.lookup_id(key_id)
            if record is not None and record.tenant_id == tenant_id:
                return self._stored_tenant(record)
        return Tenant(
            tenant_id,
            configured.tenant_models.get(tenant_id, frozenset()),
            limits=configured.tenant_limits.get(tenant_id, LimitSettings()),
            tier=configured.tenant_tiers.get(tenant_id, ""),
        )

    async def check_stored_key(self, key_hash: str) -> KeyRecord:
        """The stored key's record, or the refusal of a key that is unknown,
        revoked or expired (UNAUTHENTICATED); UNAVAILABLE where Redis cannot
        tell. From the KeyStore's cache: a record at most 0.5 s old."""
        record = await self._keys.lookup(key_hash)
        if record is None:
            raise _invalid_key()
        refusal = key_refusal(record, self._keys.now())
        if refusal is not None:
            raise refusal
        return record

    async def authenticate_admin(self, metadata) -> CallerKey:
        """The admin credential of ``metadata``, for the call to check again
        (:meth:`check_admin`); PERMISSION_DENIED for a tenant's key."""
        tenant, key = await self.identify(metadata)
        if tenant is not None:
            raise MeshgateError(
                grpc.StatusCode.PERMISSION_DENIED,
                Reason.ADMIN_REQUIRED,
                "this call needs the admin credential (router.admin_api_key_sha256)",
            )
        return key


# The caller of the gRPC call under way, as CallerGate let it in: its
# tenant, or None for the admin credential. Set in the call's own task, so
# no other call sees it.
_CALLER: contextvars.ContextVar[Tenant | None] = contextvars.ContextVar("router_caller")
# The authenticator that let that caller in, and the caller's key (a
# tenant's or the admin credential), for current_tenant and admitted_admin.
_CALLER_KEY: contextvars.ContextVar[tuple[Authenticator, CallerKey]] = contextvars.ContextVar(
    "router_caller_key"
)

_ADMIN_METHODS = "/{}/".format(admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name)
# The one RouterService method the admin credential may call (for any tenant).
_TENANT_OR_ADMIN_METHODS = frozenset(
    {"/{}/GetUsage".format(router_service_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name)}
)


class CallerGate:
    """Authenticates each call of the router's gRPC services from its
    metadata before its request is read (meshgate/errors.py
    ErrorInterceptor.gate), so that a caller without a valid key makes the
    router read none of the up to 32 MiB it sends, and holds no place under
    router.max_concurrent_rpcs. AdminService calls need the admin
    credential, GetUsage a tenant's key or it, every other call a tenant's
    key. A tenant's call is then counted in ``calls`` (its tenant's cap,
    router.max_concurrent_rpcs_per_tenant) until it ends, still before its
    request is read; the admin credential's never are. The handler reads
    the caller with :func:`current_caller`; a call that lasts resolves its
    key again with :func:`current_tenant`."""

    def __init__(self, authenticator: Authenticator, calls: TenantCalls) -> None:
        self._auth = authenticator
        self._calls = calls

    async def __call__(self, method: str, metadata) -> None:
        """Lets the caller of ``method`` (a full method name) in, or raises its refusal."""
        if method.startswith(_ADMIN_METHODS):
            caller, key = None, await self._auth.authenticate_admin(metadata)
        else:
            caller, key = await self._auth.identify(metadata)
            if caller is None and method not in _TENANT_OR_ADMIN_METHODS:
                raise _invalid_key()  # the admin credential is no tenant's key
        if caller is not None:
            # gRPC runs the whole call, this gate included, in one task, done
            # however the call ends: counted out then.
            self._calls.open(caller.id, asyncio.current_task())
        _CALLER.set(caller)
        _CALLER_KEY.set((self._auth, key))


def admitted_admin() -> Authenticator:
    """Checks that CallerGate let the admin credential in to the AdminService
    call under way, and that the configuration in use still has it (its
    caller may send the request long after the gate let the call in, past a
    reload that took the credential out), and returns the authenticator
    that did (the configured tenants as it knows them). LookupError where
    no gate ran, as :func:`current_caller`: an AdminService served without
    its gate fails closed (INTERNAL) instead of serving every caller."""
    if _CALLER.get() is not None:
        raise AssertionError("an AdminService call was let in with a tenant's key")
    authenticator, key = _CALLER_KEY.get()
    authenticator.check_admin(key)
    return authenticator


async def current_tenant() -> Tenant | None:
    """The tenant of the call under way as its key names it now, for a call
    that outlives the gate's check: a ChatSession stream, turn after turn,
    and a unary call once its request is in (its caller may send it long
    after the gate let the call in, past a revocation of its key): the
    configuration in use (a reload's tenants, keys, limits and models
    apply from the next turn, as they do to new calls) or the key's stored
    record. Raises the refusal a new call with the key would get
    (UNAUTHENTICATED) where the key has left the configuration, or is a
    stored key revoked or expired since; UNAVAILABLE where Redis cannot
    tell. A key that now names another tenant is refused too: the call's
    session and its place under its tenant's caps are the first tenant's.
    A stored key's record comes from the KeyStore's cache, so at most one
    GET per key and half second however many turns; a configured key's
    costs no Redis call. None for the admin credential (on the methods that
    take it), where the configuration in use still has it: one a reload
    took out is refused (UNAUTHENTICATED), as a tenant's key would be."""
    authenticator, key = _CALLER_KEY.get()
    caller = _CALLER.get()
    if caller is None:
        authenticator.check_admin(key)
        return None
    return same_tenant(caller, await authenticator.tenant_of(key))


def same_tenant(first: Tenant, now: Tenant) -> Tenant:
    """``now``, what a call's key names when resolved again, where it is
    still ``first``'s tenant: a key a reload moved to another tenant is
    refused, as the call's place under its tenant's caps (and a stream's
    session) are the first tenant's."""
    if now.id != first.id:
        raise _unauthenticated(Reason.API_KEY_INVALID, "the API key now names another tenant; call again")
    return now


def current_caller() -> Tenant | None:
    """The caller CallerGate let in to the gRPC call under way: its tenant,
    or None for the admin credential (only on the methods that take it).
    LookupError where no gate ran: a router served without its gate fails
    closed, with INTERNAL."""
    return _CALLER.get()


def _bearer_key(metadata) -> str:
    """The caller's Bearer key, from its one authorization header. Two are
    refused, whatever they hold (RFC 9110 §5.3: the field is no list): the
    first was read here, a proxy in front may read the last, so one key
    could be checked, logged or billed while another is served, as with a
    JSON key sent twice (http_edge._unique_keys)."""
    headers = [value for key, value in metadata or () if key == "authorization"]
    if len(headers) > 1:
        raise _unauthenticated(Reason.API_KEY_INVALID, f"send one authorization header, not {len(headers)}")
    header = headers[0] if headers else None
    if not header:
        raise _unauthenticated(Reason.API_KEY_MISSING, "send 'authorization: Bearer <api key>'")
    scheme, _, key = header.strip().partition(" ")
    if scheme.lower() != _BEARER:
        raise _unauthenticated(Reason.UNSUPPORTED_AUTH_SCHEME, "the authorization scheme must be Bearer")
    key = key.strip()
    if not key:
        # "Bearer" alone names the right scheme and leaves out the key.
        raise _unauthenticated(Reason.API_KEY_MISSING, "send 'authorization: Bearer <api key>'")
    return key
