"""AIP-155 request ids (services/router/request_ids.py): which ids are taken,
what tells two requests apart, and that a sealed answer opens only with its
own request id (the store's use of them: tests/integration/test_router_key_request_ids.py)."""

import uuid

import grpc
import pytest
from cryptography.exceptions import InvalidTag

from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from meshgate.router.v1 import admin_service_pb2 as admin_pb
from services.router.request_ids import RequestId


def test_no_request_id_is_none_and_one_id_in_either_case_is_one():
    assert RequestId.of(admin_pb.CreateKeyRequest(tenant_id="acme")) is None
    request_id = str(uuid.uuid4())
    lower = RequestId.of(admin_pb.CreateKeyRequest(tenant_id="acme", request_id=request_id))
    upper = RequestId.of(admin_pb.CreateKeyRequest(tenant_id="acme", request_id=request_id.upper()))
    assert lower == upper


def test_the_digest_tells_bodies_and_methods_apart_but_not_the_id():
    request_id = str(uuid.uuid4())
    create = RequestId.of(admin_pb.CreateKeyRequest(tenant_id="acme", label="a", request_id=request_id))
    relabelled = RequestId.of(admin_pb.CreateKeyRequest(tenant_id="acme", label="b", request_id=request_id))
    rotate = RequestId.of(admin_pb.RotateKeyRequest(key_id="acme", request_id=request_id))
    other_id = RequestId.of(
        admin_pb.CreateKeyRequest(tenant_id="acme", label="a", request_id=str(uuid.uuid4()))
    )
    assert len({create.request_digest, relabelled.request_digest, rotate.request_digest}) == 3
    assert create.request_digest == other_id.request_digest and create.name != other_id.name


def test_sets_listed_in_another_order_are_the_same_request_but_other_members_are_not():
    """models and fail_closed are sets: a client rebuilding its resend from a
    set may list them in another order and is still answered."""
    request_id = str(uuid.uuid4())

    def digest(models, fail_closed):
        limits = admin_pb.KeyLimits(fail_closed=fail_closed)
        request = admin_pb.CreateKeyRequest(
            tenant_id="acme", models=models, limits=limits, request_id=request_id
        )
        return RequestId.of(request).request_digest

    first = digest(["tiny-gpt", "smollm2"], ["tokens_per_minute", "daily_budget_usd"])
    assert digest(["smollm2", "tiny-gpt"], ["daily_budget_usd", "tokens_per_minute"]) == first
    assert digest(["smollm2"], ["daily_budget_usd", "tokens_per_minute"]) != first
    assert digest(["smollm2", "tiny-gpt"], ["daily_budget_usd"]) != first


def test_a_sealed_answer_opens_with_its_request_id_only_and_for_its_request_only():
    request_id = str(uuid.uuid4())
    create = RequestId.of(admin_pb.CreateKeyRequest(tenant_id="acme", request_id=request_id))
    sealed = create.seal(["mgk-secret", "{}"])
    assert b"mgk-secret" not in sealed and create.sealing_key.hex() != create.name
    assert create.open(sealed) == ["mgk-secret", "{}"]
    relabelled = RequestId.of(admin_pb.CreateKeyRequest(tenant_id="acme", label="b", request_id=request_id))
    with pytest.raises(MeshgateError) as refused:
        relabelled.open(sealed)
    assert (refused.value.code, refused.value.reason) == (
        grpc.StatusCode.ALREADY_EXISTS,
        Reason.REQUEST_ID_REUSED,
    )
    stranger = RequestId.of(admin_pb.CreateKeyRequest(tenant_id="acme", request_id=str(uuid.uuid4())))
    with pytest.raises(InvalidTag):
        stranger.open(sealed)


@pytest.mark.parametrize(
    "request_id",
    [
        "x",
        str(uuid.uuid1()),
        str(uuid.UUID(int=0)),
        uuid.uuid4().hex,
        f"{{{uuid.uuid4()}}}",
        f"urn:uuid:{uuid.uuid4()}",
    ],
    # Named by what each is, not by its random value: parallel workers
    # (pytest-xdist) must collect the same tests.
    ids=["not-a-uuid", "uuid1", "nil", "hex", "braced", "urn"],
)
def test_only_a_uuid4_in_its_36_character_form_is_taken(request_id):
    with pytest.raises(MeshgateError) as refused:
        RequestId.of(admin_pb.RotateKeyRequest(key_id="k", request_id=request_id))
    assert (refused.value.code, refused.value.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_REQUEST_ID,
    )
