"""AIP-155 request ids on CreateKey and RotateKey, through real routers and a
real Redis: a resend after a lost reply gets the first answer (one key, the
same secret), sends at once make one key, and what Redis keeps of an answer
holds neither the secret nor the request id."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from google.protobuf import timestamp_pb2

from meshgate import redis_access
from meshgate.config import hash_api_key
from meshgate.reasons import Reason
from meshgate.router.v1 import admin_service_pb2 as admin_pb
from meshgate.router.v1 import router_service_pb2 as pb
from services.router.keys import REQUEST_ID_RETENTION_S
from tests.integration import test_router_keys
from tests.integration.test_router_keys import ADMIN, bearer, refusal

pytestmark = pytest.mark.integration

# That module's fixture: two router replicas sharing this Redis, started for these tests.
replicas = test_router_keys.replicas


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


async def listed(admin, tenant: str) -> list[admin_pb.KeyInfo]:
    return list((await admin.ListKeys(admin_pb.ListKeysRequest(tenant_id=tenant), metadata=ADMIN)).keys)


async def test_a_resent_create_key_answers_as_the_first_send_and_makes_no_second_key(replicas):
    (router_a, admin_a), (_, admin_b) = replicas
    tenant = new_tenant()
    request_id = str(uuid.uuid4())
    request = admin_pb.CreateKeyRequest(
        tenant_id=tenant, models=["tiny-gpt"], label="ci", request_id=request_id
    )
    first = await admin_a.CreateKey(request, metadata=ADMIN, timeout=10)
    # The reply was lost; the client sends again, reaching the other replica,
    # and once more with the id's hex digits in capitals (the same UUID).
    resent = await admin_b.CreateKey(request, metadata=ADMIN, timeout=10)
    request.request_id = request_id.upper()
    capitals = await admin_a.CreateKey(request, metadata=ADMIN, timeout=10)
    assert resent == first and capitals == first
    assert [key.key_id for key in await listed(admin_b, tenant)] == [first.key.key_id]
    models = await router_a.ListModels(pb.ListModelsRequest(), metadata=bearer(resent.api_key), timeout=10)
    assert [model.alias for model in models.models] == ["tiny-gpt"]


async def test_a_resend_gets_its_answer_where_the_request_would_now_be_refused(replicas):
    """Answered before the request is checked again: its expires_at has passed."""
    (_, admin), _ = replicas
    expires_at = timestamp_pb2.Timestamp()
    expires_at.FromNanoseconds(int((time.time() + 1) * 1e9))
    request = admin_pb.CreateKeyRequest(
        tenant_id=new_tenant(), expires_at=expires_at, request_id=str(uuid.uuid4())
    )
    first = await admin.CreateKey(request, metadata=ADMIN, timeout=10)
    await asyncio.sleep(1.2)
    assert await admin.CreateKey(request, metadata=ADMIN, timeout=10) == first


async def test_a_resent_rotate_key_answers_as_the_first_send_instead_of_refusing_the_revoked_key(replicas):
    (router_a, admin_a), (router_b, admin_b) = replicas
    tenant = new_tenant()
    created = await admin_a.CreateKey(admin_pb.CreateKeyRequest(tenant_id=tenant), metadata=ADMIN)
    request = admin_pb.RotateKeyRequest(key_id=created.key.key_id, request_id=str(uuid.uuid4()))
    first = await admin_a.RotateKey(request, metadata=ADMIN, timeout=10)
    resent = await admin_b.RotateKey(request, metadata=ADMIN, timeout=10)
    assert resent == first and resent.api_key != created.api_key
    await router_b.ListModels(pb.ListModelsRequest(), metadata=bearer(resent.api_key), timeout=10)
    assert await refusal(
        router_a.ListModels(pb.ListModelsRequest(), metadata=bearer(created.api_key), timeout=10)
    ) == (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_REVOKED)
    assert {key.key_id for key in await listed(admin_b, tenant)} == {created.key.key_id, first.key.key_id}
    # A rotation without the request id is refused as before: the key was rotated away.
    assert await refusal(
        admin_b.RotateKey(admin_pb.RotateKeyRequest(key_id=created.key.key_id), metadata=ADMIN)
    ) == (grpc.StatusCode.FAILED_PRECONDITION, Reason.API_KEY_REVOKED)


async def test_a_request_id_sent_with_another_request_is_refused_and_changes_nothing(replicas):
    (router, admin), _ = replicas
    tenant = new_tenant()
    request_id = str(uuid.uuid4())
    created = await admin.CreateKey(
        admin_pb.CreateKeyRequest(tenant_id=tenant, label="a", request_id=request_id), metadata=ADMIN
    )
    other_label = admin_pb.CreateKeyRequest(tenant_id=tenant, label="b", request_id=request_id)
    other_method = admin_pb.RotateKeyRequest(key_id=created.key.key_id, request_id=request_id)
    for call in (admin.CreateKey(other_label, metadata=ADMIN), admin.RotateKey(other_method, metadata=ADMIN)):
        assert await refusal(call) == (grpc.StatusCode.ALREADY_EXISTS, Reason.REQUEST_ID_REUSED)
    assert [(key.key_id, key.HasField("revoked_at")) for key in await listed(admin, tenant)] == [
        (created.key.key_id, False)
    ]
    await router.ListModels(pb.ListModelsRequest(), metadata=bearer(created.api_key), timeout=10)

    # A rotation's id sent again naming another key (a revoked one: the
    # refusal it would meet is not the answer).
    rotation_id = str(uuid.uuid4())
    await admin.RotateKey(
        admin_pb.RotateKeyRequest(key_id=created.key.key_id, request_id=rotation_id), metadata=ADMIN
    )
    second = await admin.CreateKey(admin_pb.CreateKeyRequest(tenant_id=tenant), metadata=ADMIN)
    assert await refusal(
        admin.RotateKey(
            admin_pb.RotateKeyRequest(key_id=second.key.key_id, request_id=rotation_id), metadata=ADMIN
        )
    ) == (grpc.StatusCode.ALREADY_EXISTS, Reason.REQUEST_ID_REUSED)
    assert len(await listed(admin, tenant)) == 3
    await router.ListModels(pb.ListModelsRequest(), metadata=bearer(second.api_key), timeout=10)


async def test_sends_of_one_request_id_at_once_make_one_key_and_all_get_its_answer(replicas):
    admins = [admin for _, admin in replicas]
    tenant = new_tenant()
    request = admin_pb.CreateKeyRequest(tenant_id=tenant, request_id=str(uuid.uuid4()))
    answers = await asyncio.gather(
        *(admins[i % 2].CreateKey(request, metadata=ADMIN, timeout=10) for i in range(8))
    )
    assert all(answer == answers[0] for answer in answers)
    assert [key.key_id for key in await listed(admins[0], tenant)] == [answers[0].key.key_id]

    rotation = admin_pb.RotateKeyRequest(key_id=answers[0].key.key_id, request_id=str(uuid.uuid4()))
    rotated = await asyncio.gather(
        *(admins[i % 2].RotateKey(rotation, metadata=ADMIN, timeout=10) for i in range(8))
    )
    assert all(answer == rotated[0] for answer in rotated)
    keys = await listed(admins[1], tenant)
    assert {key.key_id for key in keys} == {answers[0].key.key_id, rotated[0].key.key_id}
    assert [key.key_id for key in keys if not key.HasField("revoked_at")] == [rotated[0].key.key_id]


@pytest.mark.parametrize(
    "request_id",
    [
        "not-a-uuid",
        str(uuid.uuid1()),  # mostly a clock: guessable
        "00000000-0000-0000-0000-000000000000",
        uuid.uuid4().hex,  # a UUID4 without its hyphens
        "{" + str(uuid.uuid4()) + "}",
        "urn:uuid:" + str(uuid.uuid4()),
        str(uuid.uuid4()) + " ",
    ],
    # Names, not the drawn values: each pytest-xdist worker collects the
    # suite itself, and workers that drew other test ids refuse to start.
    ids=["not-a-uuid", "uuid1", "nil", "uuid4-hex", "uuid4-braced", "uuid4-urn", "uuid4-space"],
)
async def test_a_request_id_that_is_not_a_uuid4_is_refused_and_writes_nothing(replicas, request_id):
    (_, admin), _ = replicas
    tenant = new_tenant()
    assert await refusal(
        admin.CreateKey(admin_pb.CreateKeyRequest(tenant_id=tenant, request_id=request_id), metadata=ADMIN)
    ) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST_ID)
    assert await listed(admin, tenant) == []
    created = await admin.CreateKey(admin_pb.CreateKeyRequest(tenant_id=tenant), metadata=ADMIN)
    rotation = admin_pb.RotateKeyRequest(key_id=created.key.key_id, request_id=request_id)
    assert await refusal(admin.RotateKey(rotation, metadata=ADMIN)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_REQUEST_ID,
    )
    assert [key.HasField("revoked_at") for key in await listed(admin, tenant)] == [False]


async def stored_bytes(client) -> list[bytes]:
    """Every name in the API keys' store and every value under it (records,
    answers, tenants' sets, the ids hash)."""
    found = []
    async for name in client.scan_iter(match="mg:router:{apikeys}:*", count=1000):
        found.append(name)
        kind = (await client.type(name)).decode()
        if kind == "string":
            found.append(await client.get(name))
        elif kind == "hash":
            for field, value in (await client.hgetall(name)).items():
                found += [field, value]
        elif kind == "zset":
            found += await client.zrange(name, 0, -1)
        elif kind != "none":  # "none": gone since the scan named it
            raise AssertionError(f"{name!r} is a {kind}, which this test cannot read")
    return [item for item in found if item is not None]


async def test_redis_keeps_an_answer_without_its_secret_or_its_request_id(replicas, redis_url):
    (_, admin), _ = replicas
    tenant = new_tenant()
    create_id, rotate_id = uuid.uuid4(), uuid.uuid4()
    created = await admin.CreateKey(
        admin_pb.CreateKeyRequest(tenant_id=tenant, request_id=str(create_id)), metadata=ADMIN
    )
    rotated = await admin.RotateKey(
        admin_pb.RotateKeyRequest(key_id=created.key.key_id, request_id=str(rotate_id)), metadata=ADMIN
    )
    secrets = [created.api_key.encode(), rotated.api_key.encode()]
    # The ids as text (either case, with and without hyphens) and as bytes.
    ids = [
        spelling
        for request_id in (create_id, rotate_id)
        for spelling in (
            str(request_id).encode(),
            str(request_id).upper().encode(),
            request_id.hex.encode(),
            request_id.bytes,
        )
    ]
    client = redis_access.connect(redis_url)
    try:
        stored = await stored_bytes(client)
        answers = [name async for name in client.scan_iter(match="mg:router:{apikeys}:request:*")]
        ttls = [await client.ttl(name) for name in answers]
    finally:
        await client.aclose()
    assert len(answers) >= 2  # kept, in the API keys' hash slot
    # The scan read the keys' records and the answers (so finding nothing in them means something).
    assert {hash_api_key(created.api_key).encode(), *answers} <= set(stored)
    assert all(0 < ttl <= REQUEST_ID_RETENTION_S for ttl in ttls)
    leaked = [(needle, item) for needle in secrets + ids for item in stored if needle in item]
    assert leaked == []
