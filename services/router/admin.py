"""The AdminService's gRPC front end: API keys as data, behind the admin
credential (checked before a call's request is read: services/router/auth.py
CallerGate). The keys themselves live in :mod:`services.router.keys`."""

from __future__ import annotations

import fractions

import grpc
from google.protobuf import timestamp_pb2

from meshgate.config import LIMIT_NAMES, LimitSettings
from meshgate.errors import MeshgateError, invalid_argument
from meshgate.reasons import Reason
from meshgate.router.v1 import admin_service_pb2 as pb
from meshgate.router.v1 import admin_service_pb2_grpc
from services.router.auth import Authenticator, admitted_admin
from services.router.downstream import CacheService
from services.router.keys import (
    KeyRecord,
    KeyStore,
    PageCursor,
    check_key_request,
    check_tenant_id,
    page_size,
)
from services.router.request_ids import RequestId
from services.router.servicer import caller_budget


def _limits_request(limits: pb.KeyLimits) -> dict:
    """Only the limits the request sets: an unset one does not apply."""
    fields: dict = {name: getattr(limits, name) for name in LIMIT_NAMES if limits.HasField(name)}
    if limits.fail_closed:
        fields["fail_closed"] = list(limits.fail_closed)
    return fields


def _limits_proto(limits: LimitSettings) -> pb.KeyLimits:
    fields = {name: getattr(limits, name) for name in LIMIT_NAMES if getattr(limits, name) is not None}
    return pb.KeyLimits(fail_closed=limits.fail_closed, **fields)


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    """``seconds`` (a record's Unix time) to the nearest nanosecond, exactly:
    through a float product (``int(seconds * 1e9)``), 94 in 100 whole-second
    expiries past 2100 came back altered (9999-12-31T23:59:59Z as
    23:59:58.999986176)."""
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(round(fractions.Fraction(seconds) * 1_000_000_000))
    return stamp


def key_info(record: KeyRecord) -> pb.KeyInfo:
    return pb.KeyInfo(
        key_id=record.key_id,
        tenant_id=record.tenant_id,
        models=record.models,
        limits=_limits_proto(record.limits),
        created_at=_timestamp(record.created_at),
        expires_at=_timestamp(record.expires_at),
        revoked_at=_timestamp(record.revoked_at),
        label=record.label,
        usage_key_id=record.accounting_id,
    )


def _expiry(request: pb.CreateKeyRequest) -> float | None:
    """The key's expiry in Unix seconds; a Timestamp outside the years
    1-9999 (which protobuf refuses to convert) is the caller's error."""
    if not request.HasField("expires_at"):
        return None
    try:
        # Integers divided (correctly rounded): whole seconds stay whole.
        return request.expires_at.ToNanoseconds() / 1_000_000_000
    except ValueError as error:
        message = f"expires_at is not a valid timestamp: {error}"
        raise invalid_argument(Reason.INVALID_KEY_SPEC, message) from error


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        keys: KeyStore,
        models,
        embedding_model: str,
        cache: CacheService | None = None,
        deadline_margin_s: float = 0.0,
    ) -> None:
        self._keys = keys
        # The cache service, for InvalidateCache (None: a router built without one).
        self._cache = cache
        self.reconfigure(models, embedding_model, deadline_margin_s)

    def reconfigure(self, models, embedding_model: str, deadline_margin_s: float) -> None:
        # router.deadline_margin_s: a call to the cache ends this long before
        # its caller's deadline, with our status (servicer.caller_budget).
        self._deadline_margin_s = deadline_margin_s
        # The configured model aliases (a dict a reload replaces wholesale).
        self._models = models
        # What a key's models may name: the chat aliases and the embedding
        # model (router.embedding_model, POST /v1/embeddings), which a
        # tenant's models name as they name an alias. Aliases alone, a key
        # limited to some models could never embed, and a key for
        # embeddings alone could not be made.
        self._key_models = frozenset(models) | ({embedding_model} if embedding_model else frozenset())

    async def CreateKey(self, request: pb.CreateKeyRequest, context) -> pb.CreateKeyResponse:
        authenticator = admitted_admin()
        request_id = RequestId.of(request)
        # Looked up before the request is checked: a resend gets the first
        # answer even where the request would now be refused (its expires_at
        # passed since, a reload took a model out).
        answered = await self._keys.answered(request_id)
        secret, record = answered or await self._create(request, request_id, authenticator, context)
        return pb.CreateKeyResponse(api_key=secret, key=key_info(record))

    async def _create(
        self,
        request: pb.CreateKeyRequest,
        request_id: RequestId | None,
        authenticator: Authenticator,
        context,
    ) -> tuple[str, KeyRecord]:
        expires_at = _expiry(request)
        models, limits = check_key_request(
            request.tenant_id,
            list(request.models),
            _limits_request(request.limits),
            self._key_models,
            expires_at,
            self._keys.now(),
            # A configured tenant's models bound its keys'.
            authenticator.tenant_models(request.tenant_id),
        )
        return await self._keys.create(
            request.tenant_id, models, limits, expires_at, request.label, request_id, self._deadline(context)
        )

    async def ListKeys(self, request: pb.ListKeysRequest, context) -> pb.ListKeysResponse:
        admitted_admin()
        if not request.tenant_id:
            raise invalid_argument(Reason.TENANT_REQUIRED, "name the tenant_id whose keys to list")
        check_tenant_id(request.tenant_id)
        size = page_size(request.page_size)
        after = PageCursor.of_token(request.page_token, request.tenant_id) if request.page_token else None
        page = await self._keys.list(request.tenant_id, size, after)
        return pb.ListKeysResponse(
            keys=[key_info(record) for record in page.records],
            next_page_token=page.following.token(request.tenant_id) if page.following else "",
        )

    async def RotateKey(self, request: pb.RotateKeyRequest, context) -> pb.RotateKeyResponse:
        admitted_admin()
        # A resend finds the key revoked by its first send; rotate then
        # answers as that send did.
        secret, successor, previous = await self._keys.rotate(
            request.key_id, RequestId.of(request), self._deadline(context)
        )
        return pb.RotateKeyResponse(api_key=secret, key=key_info(successor), previous=key_info(previous))

    async def RevokeKey(self, request: pb.RevokeKeyRequest, context) -> pb.RevokeKeyResponse:
        admitted_admin()
        return pb.RevokeKeyResponse(key=key_info(await self._keys.revoke(request.key_id)))

    def _deadline(self, context) -> float | None:
        """When (monotonic) the caller stops waiting for a key's write (None:
        it set no deadline): one without a request id is not written after
        it (KeyStore._write)."""
        return caller_budget(context, self._deadline_margin_s).deadline

    async def InvalidateCache(
        self, request: pb.InvalidateCacheRequest, context
    ) -> pb.InvalidateCacheResponse:
        admitted_admin()
        if not request.tenant_id:
            raise invalid_argument(Reason.TENANT_REQUIRED, "name the tenant whose cached answers to remove")
        check_tenant_id(request.tenant_id)
        if self._cache is None:
            raise MeshgateError(grpc.StatusCode.UNIMPLEMENTED, Reason.UNKNOWN_ENDPOINT, "no cache here")
        budget = caller_budget(context, self._deadline_margin_s)
        removed = 0
        for model in self._cached_under(request.model):
            removed += await self._cache.invalidate(request.tenant_id, model, budget)
        return pb.InvalidateCacheResponse(entries_removed=removed)

    def _cached_under(self, alias: str) -> list[str]:
        """The models whose partitions hold ``alias``'s answers: an alias that
        selects a model per turn stores each under the model chosen (a bug
        hunt: invalidating it removed nothing, and its answers went on being
        served), so both of its models' go, with those of direct use of
        them (more removed is a miss; less, a stale answer)."""
        selection = getattr(self._models.get(alias), "selection", None) if alias else None
        if selection is None:
            return [alias]
        return list(dict.fromkeys((selection.fast, selection.strong)))
