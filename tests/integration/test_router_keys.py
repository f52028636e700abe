"""API keys as data through real routers and a real Redis: created on one
replica, used on another, revoked on every replica within a second; bad
requests are refused whole."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import grpc
import pytest

from meshgate import redis_access
from meshgate.config import Settings, hash_api_key
from meshgate.errors import error_info
from meshgate.reasons import Reason
from meshgate.router.v1 import admin_service_pb2 as admin_pb
from meshgate.router.v1 import admin_service_pb2_grpc, router_service_pb2_grpc
from meshgate.router.v1 import router_service_pb2 as pb
from services.router import app as router_app
from tests.integration.conftest import running
from tests.mesh import bounded_channel, mesh_settings

pytestmark = pytest.mark.integration

ADMIN = (("authorization", "Bearer keys-admin"),)


@pytest.fixture(scope="module")
async def replicas(redis_url):
    """Two router replicas sharing one Redis: [(router stub, admin stub), ...].
    Listing models and managing keys needs no other service."""
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.router.admin_api_key_sha256 = [hash_api_key("keys-admin")]
    async with contextlib.AsyncExitStack() as stack:
        stubs = []
        for _ in range(2):
            address = await stack.enter_async_context(running(router_app, "router", settings))
            channel = await stack.enter_async_context(bounded_channel(address))
            stubs.append(
                (
                    router_service_pb2_grpc.RouterServiceStub(channel),
                    admin_service_pb2_grpc.AdminServiceStub(channel),
                )
            )
        yield stubs


def bearer(secret: str):
    return (("authorization", f"Bearer {secret}"),)


async def refusal(awaitable) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    return caught.value.code(), error_info(caught.value).reason


async def test_a_key_created_on_one_replica_works_on_the_other_until_revoked(replicas, redis_url):
    (router_a, admin_a), (router_b, admin_b) = replicas
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    created = await admin_a.CreateKey(
        admin_pb.CreateKeyRequest(
            tenant_id=tenant,
            models=["tiny-gpt"],
            limits=admin_pb.KeyLimits(requests_per_minute=10, fail_closed=["requests_per_minute"]),
            label="ci",
        ),
        metadata=ADMIN,
        timeout=10,
    )
    assert created.api_key and created.key.key_id == hash_api_key(created.api_key)[:16]
    assert created.key.limits.requests_per_minute == 10
    assert not created.key.limits.HasField("tokens_per_minute")  # unset stays unset
    # Used on the other replica: its own models only.
    listed = await router_b.ListModels(pb.ListModelsRequest(), metadata=bearer(created.api_key), timeout=10)
    assert [model.alias for model in listed.models] == ["tiny-gpt"]
    keys = await admin_b.ListKeys(admin_pb.ListKeysRequest(tenant_id=tenant), metadata=ADMIN, timeout=10)
    assert [(k.key_id, k.label) for k in keys.keys] == [(created.key.key_id, "ci")]
    # Only the secret's hash is stored.
    client = redis_access.connect(redis_url)
    try:
        record = await client.get(f"mg:router:{{apikeys}}:key:{hash_api_key(created.api_key)}")
    finally:
        await client.aclose()
    assert record is not None and created.api_key.encode() not in record

    # Both replicas have just seen the key; revoked on A, B refuses it within a second.
    revoked = await admin_a.RevokeKey(
        admin_pb.RevokeKeyRequest(key_id=created.key.key_id), metadata=ADMIN, timeout=10
    )
    assert revoked.key.HasField("revoked_at")
    started = time.monotonic()
    while True:
        try:
            await router_b.ListModels(pb.ListModelsRequest(), metadata=bearer(created.api_key), timeout=10)
        except grpc.aio.AioRpcError as error:
            assert (error.code(), error_info(error).reason) == (
                grpc.StatusCode.UNAUTHENTICATED,
                Reason.API_KEY_REVOKED,
            )
            break
        assert time.monotonic() - started < 1.0, "replica B still took the revoked key after a second"
        await asyncio.sleep(0.02)
    assert time.monotonic() - started < 1.0
    assert await refusal(
        router_a.ListModels(pb.ListModelsRequest(), metadata=bearer(created.api_key), timeout=10)
    ) == (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_REVOKED)
    # Revoking again changes nothing; rotating a revoked key is refused.
    again = await admin_b.RevokeKey(admin_pb.RevokeKeyRequest(key_id=created.key.key_id), metadata=ADMIN)
    assert again.key.revoked_at == revoked.key.revoked_at
    assert await refusal(
        admin_b.RotateKey(admin_pb.RotateKeyRequest(key_id=created.key.key_id), metadata=ADMIN)
    ) == (grpc.StatusCode.FAILED_PRECONDITION, Reason.API_KEY_REVOKED)


async def test_rotation_issues_a_new_secret_and_retires_the_old_one(replicas):
    (router_a, admin_a), (router_b, _) = replicas
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    created = await admin_a.CreateKey(admin_pb.CreateKeyRequest(tenant_id=tenant), metadata=ADMIN)
    assert list(created.key.models) == ["*"]
    rotated = await admin_a.RotateKey(admin_pb.RotateKeyRequest(key_id=created.key.key_id), metadata=ADMIN)
    assert rotated.api_key != created.api_key and rotated.previous.key_id == created.key.key_id
    assert rotated.key.tenant_id == tenant and rotated.previous.HasField("revoked_at")
    await router_b.ListModels(pb.ListModelsRequest(), metadata=bearer(rotated.api_key), timeout=10)
    assert await refusal(
        router_b.ListModels(pb.ListModelsRequest(), metadata=bearer(created.api_key), timeout=10)
    ) == (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_REVOKED)
    keys = await admin_a.ListKeys(admin_pb.ListKeysRequest(tenant_id=tenant), metadata=ADMIN)
    assert {k.key_id for k in keys.keys} == {created.key.key_id, rotated.key.key_id}


async def test_an_expired_key_is_refused(replicas, redis_url):
    (router_a, admin_a), _ = replicas
    soon = admin_pb.CreateKeyRequest(tenant_id="expiring")
    soon.expires_at.FromNanoseconds(int((time.time() + 1.0) * 1e9))
    created = await admin_a.CreateKey(soon, metadata=ADMIN)
    await router_a.ListModels(pb.ListModelsRequest(), metadata=bearer(created.api_key), timeout=10)
    await asyncio.sleep(1.2)
    assert await refusal(
        router_a.ListModels(pb.ListModelsRequest(), metadata=bearer(created.api_key), timeout=10)
    ) == (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_EXPIRED)


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (admin_pb.CreateKeyRequest(), (grpc.StatusCode.INVALID_ARGUMENT, Reason.TENANT_REQUIRED)),
        (
            admin_pb.CreateKeyRequest(tenant_id="x", models=["tiny-gpt", "no-such-model"]),
            (grpc.StatusCode.NOT_FOUND, Reason.MODEL_NOT_FOUND),
        ),
        (
            admin_pb.CreateKeyRequest(tenant_id="x", limits=admin_pb.KeyLimits(requests_per_minute=0)),
            (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_LIMIT),
        ),
        (
            admin_pb.CreateKeyRequest(
                tenant_id="x", limits=admin_pb.KeyLimits(cost_usd_per_day=float("nan"))
            ),
            (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_LIMIT),
        ),
        (
            admin_pb.CreateKeyRequest(tenant_id="x", limits=admin_pb.KeyLimits(fail_closed=["nonsense"])),
            (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_LIMIT),
        ),
        (
            admin_pb.CreateKeyRequest(tenant_id="x", expires_at={"seconds": 1}),
            (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_KEY_SPEC),
        ),
        # Found by the fuzz suite: a Timestamp protobuf cannot convert was INTERNAL.
        (
            admin_pb.CreateKeyRequest(tenant_id="x", expires_at={"seconds": -(2**63)}),
            (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_KEY_SPEC),
        ),
    ],
)
async def test_a_bad_key_request_is_refused_and_writes_nothing(replicas, redis_url, request_, expected):
    _, admin = replicas[0]
    before = await admin.ListKeys(admin_pb.ListKeysRequest(tenant_id="x"), metadata=ADMIN)
    assert await refusal(admin.CreateKey(request_, metadata=ADMIN, timeout=10)) == expected
    after = await admin.ListKeys(admin_pb.ListKeysRequest(tenant_id="x"), metadata=ADMIN)
    assert len(after.keys) == len(before.keys)


async def test_admin_calls_need_the_admin_credential(replicas):
    router, admin = replicas[0]
    created = await admin.CreateKey(admin_pb.CreateKeyRequest(tenant_id="t"), metadata=ADMIN)
    # A tenant's key, stored or not, is no admin credential.
    assert await refusal(
        admin.CreateKey(admin_pb.CreateKeyRequest(tenant_id="t"), metadata=bearer(created.api_key))
    ) == (grpc.StatusCode.PERMISSION_DENIED, Reason.ADMIN_REQUIRED)
    listing = admin_pb.ListKeysRequest(tenant_id="t")
    assert await refusal(admin.ListKeys(listing, metadata=bearer("nope"))) == (
        grpc.StatusCode.UNAUTHENTICATED,
        Reason.API_KEY_INVALID,
    )
    assert await refusal(admin.RevokeKey(admin_pb.RevokeKeyRequest(key_id="0" * 16), metadata=ADMIN)) == (
        grpc.StatusCode.NOT_FOUND,
        Reason.API_KEY_NOT_FOUND,
    )
    # The admin credential does not chat.
    assert await refusal(router.ListModels(pb.ListModelsRequest(), metadata=ADMIN)) == (
        grpc.StatusCode.UNAUTHENTICATED,
        Reason.API_KEY_INVALID,
    )
