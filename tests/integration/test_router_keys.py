"""API keys as data through real routers and a real Redis: created on one
replica, used on another, revoked on every replica within a second; bad
requests are refused whole."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import time
import uuid

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2

from meshgate import redis_access
from meshgate.common.v1 import common_pb2
from meshgate.config import (
    DEFAULT_DEV_API_KEY,
    LimitSettings,
    RouterSettings,
    Settings,
    TenantSettings,
    hash_api_key,
)
from meshgate.errors import MeshgateError, error_info
from meshgate.local import redis_server
from meshgate.local.stack import free_port
from meshgate.reasons import Reason
from meshgate.router.v1 import admin_service_pb2 as admin_pb
from meshgate.router.v1 import admin_service_pb2_grpc, router_service_pb2_grpc
from meshgate.router.v1 import router_service_pb2 as pb
from services.router import app as router_app
from services.router import keys as keys_module
from services.router.admission import Admission, admission_scopes
from services.router.auth import Authenticator
from services.router.keys import KeyRecord, KeyStore, new_secret
from tests.integration.conftest import running
from tests.integration.test_router_replicas import Replicas
from tests.mesh import bounded_channel, mesh_settings
from tests.tcp_proxy import TcpProxy, evalsha_marker, unstalled_and_run

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


@pytest.mark.serial  # timing-sensitive: make test runs it alone
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


async def test_a_key_id_given_in_upper_case_names_the_same_key(replicas):
    """A key id is the hex digits of a digest, the same in either case; an
    operator's upper-case copy of a listed id was answered NOT_FOUND
    API_KEY_NOT_FOUND, and the key it named went on working."""
    (router, admin), _ = replicas
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    created = await admin.CreateKey(admin_pb.CreateKeyRequest(tenant_id=tenant), metadata=ADMIN)
    # An id of digits alone reads the same in either case (about 1 in 1,800).
    while created.key.key_id.isdigit():
        created = await admin.CreateKey(admin_pb.CreateKeyRequest(tenant_id=tenant), metadata=ADMIN)
    rotated = await admin.RotateKey(
        admin_pb.RotateKeyRequest(key_id=created.key.key_id.upper()), metadata=ADMIN
    )
    assert rotated.previous.key_id == created.key.key_id
    while rotated.key.key_id.isdigit():
        rotated = await admin.RotateKey(admin_pb.RotateKeyRequest(key_id=rotated.key.key_id), metadata=ADMIN)
    revoked = await admin.RevokeKey(
        admin_pb.RevokeKeyRequest(key_id=rotated.key.key_id.upper()), metadata=ADMIN
    )
    assert revoked.key.key_id == rotated.key.key_id and revoked.key.HasField("revoked_at")
    assert await refusal(
        router.ListModels(pb.ListModelsRequest(), metadata=bearer(rotated.api_key), timeout=10)
    ) == (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_REVOKED)


async def test_the_live_key_spending_under_a_usage_rows_key_id_is_found_by_listing(replicas):
    """A bug hunt's finding: usage and limits of a rotated key go on under
    the first key's id, which ListKeys showed only as that first key's,
    revoked: an operator revoking the id a usage row named got OK, and the
    key spending under it went on, with nothing listed to find it by."""
    (_, admin_a), (_, admin_b) = replicas
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    first = await admin_a.CreateKey(admin_pb.CreateKeyRequest(tenant_id=tenant), metadata=ADMIN)
    assert first.key.usage_key_id == first.key.key_id
    second = await admin_a.RotateKey(admin_pb.RotateKeyRequest(key_id=first.key.key_id), metadata=ADMIN)
    third = await admin_b.RotateKey(admin_pb.RotateKeyRequest(key_id=second.key.key_id), metadata=ADMIN)
    assert third.previous.usage_key_id == third.key.usage_key_id == first.key.key_id
    # A usage row of the key names the first id (test_a_rotated_key_keeps_its_daily_budget_and_its_usage_id):
    # the listing leads from it to the one live key.
    listed = await admin_b.ListKeys(admin_pb.ListKeysRequest(tenant_id=tenant), metadata=ADMIN)
    spending = [
        k.key_id for k in listed.keys if k.usage_key_id == first.key.key_id and not k.HasField("revoked_at")
    ]
    assert spending == [third.key.key_id]


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


async def test_a_far_expiry_is_answered_and_listed_as_it_was_asked(replicas):
    """A bug hunt's finding: converted through float products, 94 in 100
    whole-second expiries past 2100 came back altered, the last instant a
    Timestamp holds as the second before and 999,986,176 ns."""
    _, admin = replicas[0]
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    # 2125-04-10T22:54:13Z, 7308-12-11T23:42:40Z, 9999-12-31T23:59:59Z
    asked = [4_899_999_253, 168_480_862_960, 253_402_300_799]
    for seconds in asked:
        created = await admin.CreateKey(
            admin_pb.CreateKeyRequest(tenant_id=tenant, expires_at={"seconds": seconds}), metadata=ADMIN
        )
        assert (created.key.expires_at.seconds, created.key.expires_at.nanos) == (seconds, 0)
    listed = await admin.ListKeys(admin_pb.ListKeysRequest(tenant_id=tenant), metadata=ADMIN)
    assert sorted((k.expires_at.seconds, k.expires_at.nanos) for k in listed.keys) == [(s, 0) for s in asked]


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (admin_pb.CreateKeyRequest(), (grpc.StatusCode.INVALID_ARGUMENT, Reason.TENANT_REQUIRED)),
        (
            admin_pb.CreateKeyRequest(tenant_id="x", models=["tiny-gpt", "no-such-model"]),
            (grpc.StatusCode.NOT_FOUND, Reason.MODEL_NOT_FOUND),
        ),
        # Malformed, not an alias that is not configured (was NOT_FOUND MODEL_NOT_FOUND).
        (
            admin_pb.CreateKeyRequest(tenant_id="x", models=["tiny-gpt", ""]),
            (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_KEY_SPEC),
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
        # A label is shown to operators: no escape sequences or newlines.
        (
            admin_pb.CreateKeyRequest(tenant_id="x", label="ci\x1b[2Jrunner"),
            (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_KEY_SPEC),
        ),
        # A brace would move the hash tag of the tenant's Redis keys.
        (
            admin_pb.CreateKeyRequest(tenant_id="x}:key:k"),
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


async def test_a_key_lists_each_fail_closed_limit_once_however_often_the_request_repeats_it(
    replicas, redis_url
):
    """A bug hunt's finding: the copies were all stored (a million of one
    name: a 23 MB record, which every call with the key read and parsed)."""
    _, admin = replicas[0]
    repeated = ["requests_per_minute", "tokens_per_day"] * 50_000
    created = await admin.CreateKey(
        admin_pb.CreateKeyRequest(
            tenant_id=f"t-{uuid.uuid4().hex[:8]}",
            limits=admin_pb.KeyLimits(requests_per_minute=5, tokens_per_day=100, fail_closed=repeated),
        ),
        metadata=ADMIN,
        timeout=30,
    )
    assert list(created.key.limits.fail_closed) == ["requests_per_minute", "tokens_per_day"]
    client = redis_access.connect(redis_url)
    try:
        record = await client.get(f"mg:router:{{apikeys}}:key:{hash_api_key(created.api_key)}")
    finally:
        await client.aclose()
    assert json.loads(record)["limits"]["fail_closed"] == ["requests_per_minute", "tokens_per_day"]


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


async def test_admin_reads_naming_a_tenant_id_no_tenant_can_have_are_refused(replicas):
    """Unchecked, the id went into Redis key names as given: GetUsage of a
    512 KiB id over 400 days held ~1 GB of key names in the router."""
    router, admin = replicas[0]
    tenant_id = "x" * (512 * 1024)
    invalid = (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_TENANT_ID)
    assert await refusal(router.GetUsage(pb.GetUsageRequest(tenant_id=tenant_id), metadata=ADMIN)) == invalid
    assert await refusal(admin.ListKeys(admin_pb.ListKeysRequest(tenant_id="a}b"), metadata=ADMIN)) == invalid
    invalidate = admin_pb.InvalidateCacheRequest(tenant_id="a b")
    assert await refusal(admin.InvalidateCache(invalidate, metadata=ADMIN)) == invalid


async def test_rotating_or_revoking_by_an_id_no_key_can_have_is_invalid_and_changes_nothing(replicas):
    """A key id is 16 hex digits (upper case taken too); an empty, short,
    long or non-hex one was answered NOT_FOUND API_KEY_NOT_FOUND, as for a
    key gone, not for the id sent wrong."""
    router, admin = replicas[0]
    created = await admin.CreateKey(admin_pb.CreateKeyRequest(tenant_id="t"), metadata=ADMIN)
    key_id = created.key.key_id
    invalid = (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_KEY_ID)
    for malformed in ["", key_id[:15], key_id + "0", key_id[:15] + "g", f" {key_id}", "x" * (512 * 1024)]:
        revoke = admin.RevokeKey(admin_pb.RevokeKeyRequest(key_id=malformed), metadata=ADMIN)
        assert await refusal(revoke) == invalid, malformed[:20]
        rotate = admin.RotateKey(admin_pb.RotateKeyRequest(key_id=malformed), metadata=ADMIN)
        assert await refusal(rotate) == invalid, malformed[:20]
    # The key whose id each was cut from is untouched, and works.
    await router.ListModels(pb.ListModelsRequest(), metadata=bearer(created.api_key))


async def test_a_listing_in_pages_lists_each_key_that_stayed_once_whatever_changes_between_pages(
    replicas, redis_url
):
    """ListKeys returned every key of a tenant in one answer: 50,000 keys
    made 4.8 MB, which a client refuses (4 MiB by default), every time.
    Now pages, here of 7 from either replica in turn, with keys created,
    revoked, rotated and forgotten (retention passed) between them, the
    key the token names among them."""
    (_, admin_a), (_, admin_b) = replicas
    tenant = f"t-{uuid.uuid4().hex[:8]}"

    async def create(label: str) -> admin_pb.KeyInfo:
        request = admin_pb.CreateKeyRequest(tenant_id=tenant, label=label)
        return (await admin_a.CreateKey(request, metadata=ADMIN, timeout=10)).key

    before = [await create(f"before-{i}") for i in range(300)]
    # Unset: 100; above the 300 there are, all.
    first = await admin_b.ListKeys(admin_pb.ListKeysRequest(tenant_id=tenant), metadata=ADMIN)
    assert len(first.keys) == 100 and first.next_page_token
    whole = await admin_b.ListKeys(admin_pb.ListKeysRequest(tenant_id=tenant, page_size=5000), metadata=ADMIN)
    assert [k.key_id for k in whole.keys] == [k.key_id for k in before] and not whole.next_page_token

    client = redis_access.connect(redis_url)
    listed: list[admin_pb.KeyInfo] = []
    forgotten: set[str] = set()
    revoked_ahead: set[str] = set()
    rotated: set[str] = set()
    rng = random.Random(7)

    async def forget(key: admin_pb.KeyInfo, from_listing: bool) -> None:
        # Its retention passed: Redis expired its record. A listing that
        # meets it, or a lookup by id, then takes it out of the tenant's set.
        key_hash = await client.hget("mg:router:{apikeys}:ids", key.key_id)
        await client.delete(f"mg:router:{{apikeys}}:key:{key_hash.decode()}")
        if from_listing:
            await client.zrem(f"mg:router:{{apikeys}}:tenant:{tenant}", key_hash)
        forgotten.add(key.key_id)

    try:
        token, pages, short_pages = "", 0, 0
        while True:
            request = admin_pb.ListKeysRequest(tenant_id=tenant, page_size=7, page_token=token)
            page = await (admin_a, admin_b)[pages % 2].ListKeys(request, metadata=ADMIN, timeout=10)
            assert len(page.keys) <= 7
            listed += page.keys
            pages += 1
            token = page.next_page_token
            if not token:
                break
            short_pages += len(page.keys) < 7
            seen = {k.key_id for k in listed}
            await create(f"during-{pages}")
            ahead = [k for k in before if k.key_id not in seen | forgotten | revoked_ahead]
            if ahead:
                revoke = rng.choice(ahead)
                await admin_b.RevokeKey(admin_pb.RevokeKeyRequest(key_id=revoke.key_id), metadata=ADMIN)
                revoked_ahead.add(revoke.key_id)
            gone_or_rotated = forgotten | rotated
            behind = [k for k in listed if k.key_id not in gone_or_rotated and not k.HasField("revoked_at")]
            rotate = rng.choice(behind)
            await admin_a.RotateKey(admin_pb.RotateKeyRequest(key_id=rotate.key_id), metadata=ADMIN)
            rotated.add(rotate.key_id)
            if pages % 5 == 0 and page.keys:
                # The key the token names, as a rule (not where the page's
                # last was a record found gone).
                await forget(page.keys[-1], from_listing=True)
            not_revoked = [k for k in ahead if k.key_id not in revoked_ahead]
            if pages % 7 == 0 and not_revoked:
                await forget(rng.choice(not_revoked), from_listing=False)
    finally:
        await client.aclose()

    ids = [k.key_id for k in listed]
    assert len(ids) == len(set(ids)), "a key was listed twice"
    stayed = {k.key_id for k in before} - forgotten
    assert stayed <= set(ids), "a key that stayed was skipped"
    assert len(forgotten) > 10 and len(revoked_ahead) > 20 and pages > 40 and short_pages > 0
    # Each page read the records as they were then: those revoked before
    # they were reached are listed revoked.
    assert all(k.HasField("revoked_at") for k in listed if k.key_id in revoked_ahead)
    order = [(k.created_at.ToNanoseconds(), k.key_id) for k in listed]
    assert order == sorted(order)


async def test_a_listing_refuses_a_negative_page_size_and_any_token_it_did_not_give(replicas):
    _, admin = replicas[0]
    tenant, other = (f"t-{uuid.uuid4().hex[:8]}" for _ in range(2))
    for owner in (tenant, other, tenant):
        await admin.CreateKey(admin_pb.CreateKeyRequest(tenant_id=owner), metadata=ADMIN)

    def listing(**fields) -> admin_pb.ListKeysRequest:
        return admin_pb.ListKeysRequest(**{"tenant_id": tenant, **fields})

    assert await refusal(admin.ListKeys(listing(page_size=-1), metadata=ADMIN)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_PAGE_SIZE,
    )
    first = await admin.ListKeys(listing(page_size=1), metadata=ADMIN)
    token = first.next_page_token
    altered = token[:20] + ("B" if token[20] == "A" else "A") + token[21:]
    invalid = (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_PAGE_TOKEN)
    for refused in (
        listing(tenant_id=other, page_token=token),
        listing(page_token=altered),
        listing(page_token=token[:-1]),
        listing(page_token="next"),
    ):
        assert await refusal(admin.ListKeys(refused, metadata=ADMIN)) == invalid
    second = await admin.ListKeys(listing(page_size=5, page_token=token), metadata=ADMIN)
    assert len(second.keys) == 1 and not second.next_page_token
    assert second.keys[0].key_id != first.keys[0].key_id
    # No tenant: TENANT_REQUIRED, whatever the token.
    assert await refusal(admin.ListKeys(listing(tenant_id="", page_token=token), metadata=ADMIN)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.TENANT_REQUIRED,
    )


async def test_keys_created_at_one_instant_are_paged_by_hash_none_skipped_or_repeated(redis_url):
    """A page ends after its last key's score and hash: of keys sharing
    that score, the next page starts after that hash (a clock that reads
    the same twice; here one that stands still)."""
    client = redis_access.connect(redis_url)
    try:
        keys = KeyStore(client, clock=lambda: 1_764_862_706.5)
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        created = [(await keys.create(tenant, ("*",), LimitSettings(), None, ""))[1] for _ in range(20)]
        listed, after = [], None
        while True:
            page = await keys.list(tenant, 3, after)
            listed += [record.key_hash for record in page.records]
            if page.following is None:
                break
            after = page.following
            # One more at that instant, between pages: listed once or not at all.
            created.append((await keys.create(tenant, ("*",), LimitSettings(), None, ""))[1])
        later = {record.key_hash for record in created[20:]}
        assert [h for h in listed if h not in later] == sorted(r.key_hash for r in created[:20])
        assert listed == sorted(set(listed))
    finally:
        await client.aclose()


def turn_failure(response: pb.ChatSessionResponse) -> tuple[grpc.StatusCode, str]:
    """The code and ErrorInfo reason of a ChatSession turn that failed in the stream."""
    status = status_pb2.Status.FromString(response.failure)
    info = error_details_pb2.ErrorInfo()
    next(detail for detail in status.details if detail.Unpack(info))
    code = next(code for code in grpc.StatusCode if code.value[0] == status.code)
    return code, info.reason


@pytest.mark.parametrize("ended_by", ["revocation", "expiry"])
async def test_a_chat_session_open_when_its_key_is_revoked_or_expires_refuses_its_next_turn_and_ends(
    replicas, ended_by
):
    # A stream is authenticated when it opens and may stay open for hours:
    # without a check per turn, it went on being admitted, and charged to
    # the key, after the key was refused to every new call.
    (router_a, admin_a), (router_b, _) = replicas
    create = admin_pb.CreateKeyRequest(tenant_id=f"t-{uuid.uuid4().hex[:8]}")
    if ended_by == "expiry":
        create.expires_at.FromNanoseconds(int((time.time() + 1.0) * 1e9))
    created = await admin_a.CreateKey(create, metadata=ADMIN, timeout=10)
    stream = router_b.ChatSession(metadata=bearer(created.api_key), timeout=30)
    try:
        # The stream is open and answers turns (this one is refused for its
        # own fault, which needs no other service).
        await stream.write(pb.ChatSessionRequest(model="tiny-gpt"))
        assert turn_failure(await stream.read()) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.EMPTY_MESSAGES)
        if ended_by == "revocation":  # on the other replica
            await admin_a.RevokeKey(admin_pb.RevokeKeyRequest(key_id=created.key.key_id), metadata=ADMIN)
            expected = (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_REVOKED)
        else:
            expected = (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_EXPIRED)
        await asyncio.sleep(1.1)  # "within a second", on every replica
        await stream.write(
            pb.ChatSessionRequest(
                model="tiny-gpt", messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="hi")]
            )
        )
        # The turn fails in the stream, as every turn does, with what a new
        # call with the key gets; then the call ends with the same status.
        assert turn_failure(await stream.read()) == expected
        assert await refusal(stream.read()) == expected
    finally:
        stream.cancel()


@pytest.mark.parametrize(
    ("method", "request_", "ended_by"),
    [
        ("Chat", pb.ChatRequest(model="tiny-gpt"), "revocation"),
        ("ListModels", pb.ListModelsRequest(), "expiry"),
    ],
)
async def test_a_call_whose_request_comes_after_its_key_was_revoked_or_expired_is_refused(
    redis_url, method, request_, ended_by
):
    """A bug hunt's finding: a call's key is checked from its metadata,
    before its request is read, and the handler took the tenant of that
    check: a client that opened calls (with no deadline, they stay open)
    and sent their requests after its key was revoked or had expired had
    each served, a Chat turn generated and billed, however long after."""
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.router.admin_api_key_sha256 = [hash_api_key("keys-admin")]
    async with running(router_app, "router", settings) as address, bounded_channel(address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        create = admin_pb.CreateKeyRequest(tenant_id=f"t-{uuid.uuid4().hex[:8]}")
        if ended_by == "expiry":
            create.expires_at.FromNanoseconds(int((time.time() + 1.0) * 1e9))
        created = await admin.CreateKey(create, metadata=ADMIN, timeout=10)
        # Opened as a stream, to hold the request back: the metadata goes now
        # and the key is checked (and found good) while the request is unsent.
        opened = channel.stream_stream(
            f"/meshgate.router.v1.RouterService/{method}",
            request_serializer=type(request_).SerializeToString,
        )(metadata=bearer(created.api_key), timeout=30)
        try:
            await asyncio.sleep(0.3)
            if ended_by == "revocation":
                await admin.RevokeKey(admin_pb.RevokeKeyRequest(key_id=created.key.key_id), metadata=ADMIN)
                expected = (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_REVOKED)
            else:
                expected = (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_EXPIRED)
            await asyncio.sleep(1.1)  # "within a second", past the key cache's half second
            await opened.write(request_)
            await opened.done_writing()
            # Not the request's own answer (a Chat without messages: EMPTY_MESSAGES).
            assert await refusal(opened.read()) == expected
        finally:
            opened.cancel()


def lone_router(tmp_path, redis_url: str, router_lines: str = "", before_router: str = "") -> Replicas:
    """One router process over a settings file that ends in its [router]
    table (``router_lines``, then what Replicas.write adds, which a reload
    rereads); no other service, and none of its listeners but gRPC's."""
    return Replicas(
        tmp_path,
        f"""
[telemetry]
exporter = "none"
[redis]
url = "{redis_url}"
[mesh]
tls = false
{before_router}[router]
metrics_listen = ""
context_address = "127.0.0.1:{free_port()}"
cache_address = "127.0.0.1:{free_port()}"
http_listen = ""
{router_lines}""",
    )


async def refused_once_reloaded(call) -> grpc.aio.AioRpcError:
    """The refusal of ``call()``, a new call tried every 50 ms until a reload
    (sent just before) has taken out what let it in."""
    deadline = time.monotonic() + 15
    while True:
        try:
            await call()
        except grpc.aio.AioRpcError as refused:
            return refused
        assert time.monotonic() < deadline, "the reload never applied"
        await asyncio.sleep(0.05)


async def test_a_chat_session_turn_after_a_reload_meets_the_reloaded_keys_and_limits(redis_url, tmp_path):
    """A bug hunt's finding: a ChatSession kept the tenant it opened with,
    so a key taken out of the settings file (a leaked one) went on being
    served turn after turn, and a limit the reload set never applied to it,
    while every new call with the key was refused: docs/limits-and-usage.md says a
    reload's keys and limits apply from the next turn."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    # One router process with a settings file; no other service: a turn
    # with no messages is refused for its own fault, and one with messages
    # is admitted, then fails on the context service it cannot reach.
    group = lone_router(
        tmp_path,
        redis_url,
        before_router=(
            "[models.tiny-gpt]\n"
            f'deployments = [{{ name = "none", address = "127.0.0.1:{free_port()}", model = "tiny-gpt" }}]\n'
        ),
        router_lines=f'dev_tenant = false\n[[router.tenants]]\nid = "{tenant}"\n',
    )

    def keys_and_limits(keys: list[str], limits: str = "") -> str:
        return f"api_key_sha256 = {[hash_api_key(key) for key in keys]}\n{limits}\n"

    group.write(keys_and_limits(["leaked-key", "kept-key"]))
    group.start(count=1)
    try:
        await group.wait_serving()
        async with bounded_channel(group.addresses[0]) as channel:
            router = router_service_pb2_grpc.RouterServiceStub(channel)
            leaked = router.ChatSession(metadata=bearer("leaked-key"), timeout=60)
            kept = router.ChatSession(metadata=bearer("kept-key"), timeout=60)
            for stream in (leaked, kept):
                await stream.write(pb.ChatSessionRequest(model="tiny-gpt"))
                assert turn_failure(await stream.read()) == (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    Reason.EMPTY_MESSAGES,
                )

            group.write(keys_and_limits(["kept-key"], "limits = { requests_per_minute = 1 }"))
            group.processes[0].send_signal(signal.SIGHUP)
            await refused_once_reloaded(
                lambda: router.ListModels(pb.ListModelsRequest(), metadata=bearer("leaked-key"), timeout=5)
            )

            gone = (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_INVALID)
            await leaked.write(pb.ChatSessionRequest(model="tiny-gpt"))
            assert turn_failure(await leaked.read()) == gone
            assert await refusal(leaked.read()) == gone
            # The kept key's stream: its tenant's new limit admits one turn a
            # minute (admitted, it fails on the context service).
            turn = pb.ChatSessionRequest(
                model="tiny-gpt", messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="hi")]
            )
            outcomes = []
            for _ in range(2):
                await kept.write(turn)
                outcomes.append(turn_failure(await kept.read()))
            assert outcomes == [
                (grpc.StatusCode.UNAVAILABLE, Reason.DOWNSTREAM_FAILED),
                (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED),
            ]
            kept.cancel()
    finally:
        group.stop()


async def test_a_rotated_key_keeps_its_daily_budget_and_its_usage_id(redis_url):
    # Limits and usage were counted under the key's own id, which rotation
    # changes: the successor started the day with a fresh budget.
    client = redis_access.connect(redis_url)
    try:
        keys = KeyStore(client)
        auth = Authenticator(RouterSettings(dev_tenant=False), keys)
        admission = Admission(client, max_generation_s=60)
        secret, record = await keys.create(
            f"t-{uuid.uuid4().hex[:8]}", ("*",), LimitSettings(tokens_per_day=500), None, ""
        )

        async def admit(secret: str):
            tenant = await auth.authenticate(bearer(secret))
            return tenant, await admission.admit(
                admission_scopes(tenant, "tiny-gpt", RouterSettings()), 10, 40
            )

        tenant, spent = await admit(secret)
        await admission.settle(spent, 500, 0)  # the whole day's budget
        new_secret, successor, _ = await keys.rotate(record.key_id)
        with pytest.raises(MeshgateError) as refused:
            await admit(new_secret)
        assert refused.value.reason == Reason.BUDGET_EXHAUSTED
        # Its limits and its usage rows go on under the first key's id.
        successor_tenant = await auth.authenticate(bearer(new_secret))
        assert successor_tenant.key_id == tenant.key_id == record.key_id != successor.key_id
        # ...down every rotation.
        third_secret, _, _ = await keys.rotate(successor.key_id)
        assert (await auth.authenticate(bearer(third_secret))).key_id == record.key_id
    finally:
        await client.aclose()


async def test_a_stored_keys_summaries_are_billed_by_its_id_under_its_accounting_id_revoked_or_not(redis_url):
    # A session records the id of its latest turn's key (Tenant.own_key_id);
    # the sweep resolves it through the ids hash (KeyStore.lookup_id).
    client = redis_access.connect(redis_url)
    try:
        keys = KeyStore(client)
        auth = Authenticator(RouterSettings(dev_tenant=False), keys)
        tenant_id = f"t-{uuid.uuid4().hex[:8]}"
        _, record = await keys.create(tenant_id, ("*",), LimitSettings(tokens_per_day=500), None, "")
        successor_secret, successor, _ = await keys.rotate(record.key_id)
        caller = await auth.authenticate(bearer(successor_secret))
        assert caller.own_key_id == successor.key_id != caller.key_id == record.key_id
        # The successor, and the first key, revoked by the rotation.
        for key_id in (successor.key_id, record.key_id):
            billed = await auth.billed_tenant(tenant_id, key_id)
            assert (billed.id, billed.key_id, billed.key_limits.tokens_per_day) == (
                tenant_id,
                record.key_id,
                500,
            )
        for tenant, key_id in ((f"other-{tenant_id}", successor.key_id), (tenant_id, "0" * 16)):
            assert (await auth.billed_tenant(tenant, key_id)).key_id == ""
    finally:
        await client.aclose()


async def test_a_key_stored_before_rotations_kept_their_id_reads_and_rotates(redis_url):
    # Its record has no accounting id: it counts under its own, and so do
    # its successors.
    client = redis_access.connect(redis_url)
    try:
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        secret = new_secret()
        key_hash = hash_api_key(secret)
        old = {
            "key_hash": key_hash,
            "tenant_id": tenant,
            "models": ["*"],
            "limits": {"tokens_per_day": 500},
            "created_at": time.time() - 60,
            "expires_at": None,
            "revoked_at": None,
            "label": "old",
        }
        await client.set(f"mg:router:{{apikeys}}:key:{key_hash}", json.dumps(old))
        await client.zadd(f"mg:router:{{apikeys}}:tenant:{tenant}", {key_hash: old["created_at"]})
        await client.hset("mg:router:{apikeys}:ids", key_hash[:16], key_hash)
        keys = KeyStore(client)
        auth = Authenticator(RouterSettings(dev_tenant=False), keys)
        assert (await auth.authenticate(bearer(secret))).key_id == key_hash[:16]
        successor_secret, successor, _ = await keys.rotate(key_hash[:16])
        assert (await auth.authenticate(bearer(successor_secret))).key_id == key_hash[:16]
        assert successor.limits.tokens_per_day == 500 and successor.label == "old"
    finally:
        await client.aclose()


async def test_a_stored_key_of_a_configured_tenant_uses_only_the_tenants_models(redis_url):
    # A stored key took its tenant's limits and tier from the settings but
    # not its models: it could use every alias the tenant may not.
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.router.admin_api_key_sha256 = [hash_api_key("keys-admin")]
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    settings.router.tenants = [TenantSettings(id=tenant, models=["tiny-gpt"])]
    assert {"tiny-gpt", "smollm2"} <= set(settings.models)
    async with contextlib.AsyncExitStack() as stack:
        address = await stack.enter_async_context(running(router_app, "router", settings))
        channel = await stack.enter_async_context(bounded_channel(address))
        router = router_service_pb2_grpc.RouterServiceStub(channel)
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)

        async def usable(secret: str) -> list[str]:
            listed = await router.ListModels(pb.ListModelsRequest(), metadata=bearer(secret), timeout=10)
            return [model.alias for model in listed.models]

        # "*" (or no models) on the key means its tenant's models.
        every = await admin.CreateKey(admin_pb.CreateKeyRequest(tenant_id=tenant), metadata=ADMIN)
        assert list(every.key.models) == ["*"] and await usable(every.api_key) == ["tiny-gpt"]
        named = admin_pb.CreateKeyRequest(tenant_id=tenant, models=["tiny-gpt"])
        assert await usable((await admin.CreateKey(named, metadata=ADMIN)).api_key) == ["tiny-gpt"]
        # A model the tenant may not use is refused before anything is written.
        for models in (["smollm2"], ["tiny-gpt", "smollm2"]):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin.CreateKey(
                    admin_pb.CreateKeyRequest(tenant_id=tenant, models=models), metadata=ADMIN
                )
            info = error_info(refused.value)
            assert (refused.value.code(), info.reason, info.metadata["model"]) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                Reason.MODEL_NOT_ALLOWED,
                "smollm2",
            )
        listed = await admin.ListKeys(admin_pb.ListKeysRequest(tenant_id=tenant), metadata=ADMIN)
        assert len(listed.keys) == 2


async def test_two_rotations_of_one_key_at_once_leave_one_successor(redis_url):
    # Each read the record, found it live, and wrote a successor: two live
    # keys where the operator asked for one. Two replicas' stores, each on
    # its own connection, as in production.
    clients = [redis_access.connect(redis_url) for _ in range(2)]
    try:
        first, second = (KeyStore(client) for client in clients)
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        for _ in range(3):  # the race without the check was lost 3 of 3 times
            _, record = await first.create(tenant, ("*",), LimitSettings(), None, "")
            results = await asyncio.gather(
                first.rotate(record.key_id), second.rotate(record.key_id), return_exceptions=True
            )
            refusals = [r for r in results if isinstance(r, Exception)]
            # As one after the other: the second finds the key rotated away.
            assert len(refusals) == 1, results
            assert isinstance(refusals[0], MeshgateError)
            assert (refusals[0].code, refusals[0].reason) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.API_KEY_REVOKED,
            )
        live = [k for k in (await first.list(tenant)).records if k.revoked_at is None]
        assert len(live) == 3
    finally:
        for client in clients:
            await client.aclose()


async def test_a_revocation_racing_a_rotation_ends_as_one_after_the_other(redis_url):
    clients = [redis_access.connect(redis_url) for _ in range(2)]
    try:
        first, second = (KeyStore(client) for client in clients)
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        for _ in range(3):
            _, record = await first.create(tenant, ("*",), LimitSettings(), None, "")
            rotated, revoked = await asyncio.gather(
                first.rotate(record.key_id), second.revoke(record.key_id), return_exceptions=True
            )
            assert isinstance(revoked, KeyRecord), revoked
            if isinstance(rotated, Exception):  # the revocation came first
                assert (rotated.code, rotated.reason) == (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    Reason.API_KEY_REVOKED,
                )
            else:  # the rotation came first: the revocation found it revoked
                assert revoked.revoked_at == rotated[2].revoked_at
            stored = await first.lookup(record.key_hash)
            assert stored.revoked_at == revoked.revoked_at
    finally:
        for client in clients:
            await client.aclose()


async def test_a_write_without_a_request_id_reaching_redis_after_its_caller_gave_up_writes_nothing(redis_url):
    """A CreateKey or RotateKey without a request id whose call timed out
    (Redis stalled, here its script call held on the way) was written once
    it reached Redis: a key listed whose secret nobody had, or a rotation
    whose successor's secret was lost and whose old key was revoked, its
    holder locked out (the retry refused API_KEY_REVOKED); and so was one
    whose caller's deadline passed first (the admin RPC's, shorter than
    redis.timeout_s: the caller told DEADLINE_EXCEEDED), also where the
    rotation's reads had taken some of that time (a review's reproduction:
    the deadline was counted from after them). A revocation is written
    however late: it is still what was asked."""
    timeout_s = 0.5
    direct = redis_access.connect(redis_url)
    reader = KeyStore(direct)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    script = evalsha_marker(keys_module._WRITE_IF_UNCHANGED)
    try:
        # The key to rotate (and the script loaded).
        _, record = await reader.create(tenant, ("*",), LimitSettings(), None, "")
        for late_write in ("create", "rotate", "create by a deadline", "rotate by a deadline, reads slow"):
            proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
            # With a caller's deadline, it is the shorter: Redis waits 10 s.
            redis_timeout_s = 10.0 if "deadline" in late_write else timeout_s
            proxied = redis_access.connect(
                f"redis://127.0.0.1:{await proxy.start()}/0", timeout_s=redis_timeout_s
            )
            store = KeyStore(proxied, timeout_s=redis_timeout_s)
            try:
                proxy.stall_when_sent(script)
                if late_write == "create":
                    with pytest.raises(MeshgateError) as failed:
                        await store.create(tenant, ("*",), LimitSettings(), None, "")
                    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
                elif late_write == "rotate":
                    with pytest.raises(MeshgateError) as failed:
                        await store.rotate(record.key_id)
                    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
                elif late_write == "create by a deadline":
                    answer_by = time.monotonic() + 0.4
                    create = store.create(tenant, ("*",), LimitSettings(), None, "", answer_by=answer_by)
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(create, 0.5)
                else:
                    # The record's read answered 0.4 s late, of a 0.6 s deadline.
                    proxy.hold_when_sent(b"HGET")
                    asyncio.get_running_loop().call_later(0.4, proxy.release)
                    rotate = store.rotate(record.key_id, answer_by=time.monotonic() + 0.6)
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(rotate, 0.65)
                await unstalled_and_run(proxy, direct)
            finally:
                await proxied.aclose()
                await proxy.close()
            listed = (await reader.list(tenant)).records
            # The one key, live: nothing written after its caller gave up.
            assert [(key.key_id, key.revoked_at) for key in listed] == [(record.key_id, None)], late_write
        # A revocation whose caller gave up is written when it reaches Redis.
        proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
        proxied = redis_access.connect(f"redis://127.0.0.1:{await proxy.start()}/0", timeout_s=timeout_s)
        try:
            proxy.stall_when_sent(script)
            with pytest.raises(MeshgateError):
                await KeyStore(proxied, timeout_s=timeout_s).revoke(record.key_id)
            await unstalled_and_run(proxy, direct)
        finally:
            await proxied.aclose()
            await proxy.close()
        assert [key.revoked_at is not None for key in (await reader.list(tenant)).records] == [True]
    finally:
        await direct.aclose()


async def test_retired_key_records_leave_redis_after_their_retention_and_their_listing_with_them(redis_url):
    """A bug hunt's finding: revoked, rotated and expired keys' records were
    kept for good (200 rotations: 201 records listed, one usable). Now a
    record is kept RETIRED_KEY_RETENTION_S past its revocation or expiry;
    once gone, the tenant's listing and the ids hash forget it."""
    client = redis_access.connect(redis_url)
    try:
        keys = KeyStore(client)
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        _, live = await keys.create(tenant, ("*",), LimitSettings(), None, "live")
        expires_at = time.time() + 3600
        _, expiring = await keys.create(tenant, ("*",), LimitSettings(), expires_at, "expiring")
        _, rotated = await keys.create(tenant, ("*",), LimitSettings(), None, "rotated")
        _, successor, retired = await keys.rotate(rotated.key_id)
        revoked = await keys.revoke(
            (await keys.create(tenant, ("*",), LimitSettings(), None, "revoked"))[1].key_id
        )

        def record_key(record: KeyRecord) -> str:
            return f"mg:router:{{apikeys}}:key:{record.key_hash}"

        retention = keys_module.RETIRED_KEY_RETENTION_S
        assert await client.ttl(record_key(live)) == -1
        assert await client.ttl(record_key(successor)) == -1
        assert abs(await client.ttl(record_key(expiring)) - (expires_at - time.time() + retention)) < 5
        for gone_later in (retired, revoked):
            assert retention - 5 < await client.ttl(record_key(gone_later)) <= retention + 1
        assert len((await keys.list(tenant)).records) == 5

        # Their retention passed (as Redis would expire them).
        await client.delete(record_key(retired), record_key(revoked))
        listed = (await keys.list(tenant)).records
        assert {r.label for r in listed} == {"live", "expiring", "rotated"}  # the successor keeps the label
        assert await client.zcard(f"mg:router:{{apikeys}}:tenant:{tenant}") == 3
        ids = "mg:router:{apikeys}:ids"
        assert (
            await client.hget(ids, retired.key_id) is None and await client.hget(ids, revoked.key_id) is None
        )
        assert await client.hget(ids, live.key_id) == live.key_hash.encode()
        # A lookup by id of a gone key is not found, as before.
        with pytest.raises(MeshgateError) as missing:
            await keys.revoke(retired.key_id)
        assert missing.value.reason == Reason.API_KEY_NOT_FOUND
    finally:
        await client.aclose()


async def test_with_redis_stopped_callers_learn_it_is_unavailable_but_not_where_it_runs(tmp_path):
    """Redis's host and port are for the router's logs: neither a caller
    with a made-up key of the stored shape (nobody, unauthenticated) nor a
    tenant reading its usage is told them, over gRPC or the HTTP edge."""
    port = free_port()
    process = redis_server.launch(port, tmp_path)
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = f"redis://127.0.0.1:{port}/0"
    settings.router.dev_api_key = "redis-down-dev-key"
    settings.router.http_listen = f"127.0.0.1:{free_port()}"
    made_up = "mgk-" + "Q" * 43
    try:
        await asyncio.to_thread(redis_server.wait_ready, port)
        async with running(router_app, "router", settings) as address, bounded_channel(address) as channel:
            process.terminate()
            await asyncio.to_thread(process.wait, 10)
            router = router_service_pb2_grpc.RouterServiceStub(channel)
            refused = {}
            for name, call in (
                ("unknown key", router.ListModels(pb.ListModelsRequest(), metadata=bearer(made_up))),
                (
                    "tenant's usage",
                    router.GetUsage(pb.GetUsageRequest(), metadata=bearer("redis-down-dev-key")),
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                refused[name] = (caught.value.code(), error_info(caught.value).reason, caught.value.details())
            async with httpx.AsyncClient(timeout=30) as http:
                answer = await http.post(
                    f"http://{settings.router.http_listen}/v1/chat/completions",
                    json={"model": "tiny-gpt", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"authorization": f"Bearer {made_up}"},
                )
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert refused == {
        "unknown key": (unavailable, Reason.REDIS_UNAVAILABLE, "API keys cannot be checked"),
        "tenant's usage": (unavailable, Reason.REDIS_UNAVAILABLE, "usage cannot be read"),
    }
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == Reason.REDIS_UNAVAILABLE
    assert str(port) not in answer.text and "127.0.0.1" not in answer.text, answer.text


async def test_an_admin_call_whose_request_comes_after_a_reload_took_out_its_credential_is_refused(
    redis_url, tmp_path
):
    """A bug hunt's finding: the admin credential was checked from a call's
    metadata only, before its request was read, and never again (a tenant's
    key is resolved again once the request is in). A client that opened
    AdminService calls with a credential (never counted under
    router.max_concurrent_rpcs, and with no deadline they stay open) and
    sent their requests after a reload had taken that credential out (a
    leaked one) had them served: a CreateKey made a key."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    group = lone_router(tmp_path, redis_url, router_lines="dev_tenant = false\n")

    def admins(*credentials: str) -> str:
        return f"admin_api_key_sha256 = {[hash_api_key(c) for c in credentials]}\n"

    group.write(admins("leaked-admin", "kept-admin"))
    group.start(count=1)
    try:
        await group.wait_serving()
        async with bounded_channel(group.addresses[0]) as channel:
            admin = admin_service_pb2_grpc.AdminServiceStub(channel)
            # Opened as streams, to hold the requests back: the metadata goes
            # now and the credential is checked (and found good) meanwhile.
            held = {
                method: channel.stream_stream(method, request_serializer=type(request_).SerializeToString)(
                    metadata=bearer("leaked-admin"), timeout=60
                )
                for method, request_ in (
                    ("/meshgate.router.v1.AdminService/CreateKey", admin_pb.CreateKeyRequest()),
                    ("/meshgate.router.v1.RouterService/GetUsage", pb.GetUsageRequest()),
                )
            }
            await asyncio.sleep(0.3)

            group.write(admins("kept-admin"))
            group.processes[0].send_signal(signal.SIGHUP)
            listing = admin_pb.ListKeysRequest(tenant_id=tenant)
            await refused_once_reloaded(
                lambda: admin.ListKeys(listing, metadata=bearer("leaked-admin"), timeout=5)
            )

            gone = (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_INVALID)
            requests = {
                "/meshgate.router.v1.AdminService/CreateKey": admin_pb.CreateKeyRequest(tenant_id=tenant),
                "/meshgate.router.v1.RouterService/GetUsage": pb.GetUsageRequest(tenant_id=tenant),
            }
            for method, call in held.items():
                await call.write(requests[method])
                await call.done_writing()
                assert await refusal(call.read()) == gone, method
            listed = await admin.ListKeys(listing, metadata=bearer("kept-admin"), timeout=10)
            assert list(listed.keys) == []
    finally:
        group.stop()


async def test_settings_with_tenants_and_an_admin_credential_refuse_the_public_dev_key(redis_url, tmp_path):
    """A trust gap: the dev tenant was on by default, so a production file
    that configured its tenants and admin credential but had no dev_tenant
    line served the docs' public key, mg-dev-local-key, as tenant "dev" with
    every model and no limits. Now it is refused; set on explicitly beside
    them, it is served, and the router warns at start."""
    group = lone_router(
        tmp_path, redis_url, router_lines=f'admin_api_key_sha256 = ["{hash_api_key("production-admin")}"]\n'
    )
    acme = f'[[router.tenants]]\nid = "acme"\napi_key_sha256 = ["{hash_api_key("acme-key")}"]\n'
    public = bearer(DEFAULT_DEV_API_KEY)
    group.write("dev_tenant = true\n" + acme)
    group.start(count=1)
    try:
        await group.wait_serving()
        async with bounded_channel(group.addresses[0]) as channel:
            router = router_service_pb2_grpc.RouterServiceStub(channel)
            await router.ListModels(pb.ListModelsRequest(), metadata=public, timeout=10)
            assert "the dev tenant is on with the public default key" in group.log(0)

            # The same settings without the dev_tenant line.
            group.write(acme)
            group.processes[0].send_signal(signal.SIGHUP)
            refused = await refused_once_reloaded(
                lambda: router.ListModels(pb.ListModelsRequest(), metadata=public, timeout=5)
            )
            assert (refused.code(), error_info(refused).reason) == (
                grpc.StatusCode.UNAUTHENTICATED,
                Reason.API_KEY_INVALID,
            )
            await router.ListModels(pb.ListModelsRequest(), metadata=bearer("acme-key"), timeout=10)
    finally:
        group.stop()
