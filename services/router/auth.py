"""API keys to tenants. Keys are configured as SHA-256 digests only."""

from __future__ import annotations

import dataclasses

import grpc
import structlog

from meshgate.config import LimitSettings, RouterSettings, hash_api_key
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason

_BEARER = "bearer "

log = structlog.get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class Tenant:
    id: str
    models: frozenset[str]
    # The caller's key (first 16 hex digits of its SHA-256), for per-key limits.
    key_id: str = ""
    limits: LimitSettings = dataclasses.field(default_factory=LimitSettings)
    key_limits: LimitSettings = dataclasses.field(default_factory=LimitSettings)

    def may_use(self, alias: str) -> bool:
        return "*" in self.models or alias in self.models


def _unauthenticated(reason: str, message: str) -> MeshgateError:
    return MeshgateError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


class Authenticator:
    def __init__(self, settings: RouterSettings) -> None:
        self._tenants_by_key_hash: dict[str, Tenant] = {}
        for tenant in settings.tenants:
            for digest in tenant.api_key_sha256:
                self._tenants_by_key_hash[digest.lower()] = Tenant(
                    tenant.id, frozenset(tenant.models), digest.lower()[:16], tenant.limits, tenant.key_limits
                )
        if settings.dev_tenant:
            self._tenants_by_key_hash[hash_api_key(settings.dev_api_key)] = Tenant("dev", frozenset({"*"}))
        self._admin_key_hashes = frozenset(digest.lower() for digest in settings.admin_api_key_sha256)

    def authenticate(self, metadata) -> Tenant:
        tenant = self._tenants_by_key_hash.get(_bearer_key_hash(metadata))
        if tenant is None:
            raise _unauthenticated(Reason.API_KEY_INVALID, "the API key is not valid")
        return tenant

    def authenticate_caller(self, metadata) -> Tenant | None:
        """The caller's tenant, or None for the admin credential."""
        key_hash = _bearer_key_hash(metadata)
        if key_hash in self._admin_key_hashes:
            return None
        tenant = self._tenants_by_key_hash.get(key_hash)
        if tenant is None:
            raise _unauthenticated(Reason.API_KEY_INVALID, "the API key is not valid")
        return tenant


def _bearer_key_hash(metadata) -> str:
    """The SHA-256 of the caller's Bearer key."""
    header = None
    for key, value in metadata or ():
        if key == "authorization":
            header = value
            break
    if not header:
        raise _unauthenticated(Reason.API_KEY_MISSING, "send 'authorization: Bearer <api key>'")
    if not header[: len(_BEARER)].lower() == _BEARER:
        raise _unauthenticated(Reason.UNSUPPORTED_AUTH_SCHEME, "the authorization scheme must be Bearer")
    return hash_api_key(header[len(_BEARER) :].strip())
