import grpc
import pytest

from meshgate.common.v1 import common_pb2
from meshgate.config import LimitSettings, ModelSettings, RouterSettings, TenantSettings, hash_api_key
from meshgate.errors import MeshgateError
from meshgate.router.v1 import router_service_pb2 as pb
from services.router.auth import Authenticator, Tenant
from services.router.keys import KeyRecord, new_secret
from services.router.validation import check_turn, resolve_model

MODEL = ModelSettings(max_output_tokens=100, default_max_tokens=10)
SETTINGS = RouterSettings(max_message_bytes=1000)


def user(text):
    return common_pb2.Message(role=common_pb2.ROLE_USER, content=text)


def turn(*messages, **parameters):
    return pb.ChatRequest(model="m", messages=messages, parameters=parameters)


def reason_of(call):
    with pytest.raises(MeshgateError) as caught:
        call()
    return caught.value.code, caught.value.reason


def test_defaults_max_tokens_when_unset():
    assert check_turn(turn(user("hi")), MODEL, SETTINGS) == 10
    assert check_turn(turn(user("hi"), max_tokens=100), MODEL, SETTINGS) == 100


def test_values_at_the_limits_are_accepted():
    # 1000 UTF-8 bytes each: a message exactly at max_message_bytes.
    for content in ("x" * 1000, "é" * 500, "😀" * 250, "x" * 249 + "😀" * 187 + "é" * 1 + "x"):
        assert len(content.encode()) == 1000
        assert check_turn(turn(user(content)), MODEL, SETTINGS) == 10
    edge = turn(user("hi"), temperature=2.0, top_p=1.0, seed=0, stop=["x" * 64] * 8)
    assert check_turn(edge, MODEL, SETTINGS) == 10
    assert check_turn(turn(user("hi"), temperature=0.0, seed=2**63 - 1), MODEL, SETTINGS) == 10


@pytest.mark.parametrize(
    "request_, reason",
    [
        (turn(), "EMPTY_MESSAGES"),
        (turn(user("hi"), max_tokens=0), "INVALID_MAX_TOKENS"),
        (turn(user("hi"), max_tokens=-5), "INVALID_MAX_TOKENS"),
        (turn(user("hi"), max_tokens=101), "MAX_TOKENS_TOO_LARGE"),
        (turn(user("x" * 1001)), "MESSAGE_TOO_LARGE"),
        (turn(user("é" * 600)), "MESSAGE_TOO_LARGE"),  # 1200 UTF-8 bytes
        (turn(user("😀" * 251)), "MESSAGE_TOO_LARGE"),  # 1004 bytes in 251 characters
        (turn(common_pb2.Message(content="no role")), "INVALID_ROLE"),
        (
            turn(user("q"), common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="a")),
            "LAST_MESSAGE_NOT_USER",
        ),
        (turn(user("hi"), temperature=3.0), "INVALID_TEMPERATURE"),
        (turn(user("hi"), top_p=0.0), "INVALID_TOP_P"),
        (turn(user("hi"), temperature=float("nan")), "INVALID_TEMPERATURE"),
        (turn(user("hi"), temperature=float("inf")), "INVALID_TEMPERATURE"),
        (turn(user("hi"), top_p=float("nan")), "INVALID_TOP_P"),
        (turn(user("hi"), top_p=float("-inf")), "INVALID_TOP_P"),
        (turn(user("hi"), seed=-1), "INVALID_SEED"),
        (turn(user("hi"), stop=[""]), "INVALID_STOP"),
        (turn(user("hi"), stop=["s"] * 9), "INVALID_STOP"),
        (turn(user("hi"), stop=["x" * 65]), "INVALID_STOP"),
        (pb.ChatRequest(model="m", messages=[user("hi")], cache_policy=99), "INVALID_CACHE_POLICY"),
    ],
)
def test_bad_turns_are_invalid_arguments(request_, reason):
    assert reason_of(lambda: check_turn(request_, MODEL, SETTINGS)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        reason,
    )


def test_model_resolution_respects_tenant_allow_list():
    models = {"a": MODEL, "b": MODEL}
    tenant = Tenant("t", frozenset({"a"}))
    assert resolve_model("a", tenant, models) is MODEL
    assert reason_of(lambda: resolve_model("b", tenant, models)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "MODEL_NOT_ALLOWED",
    )
    # AIP-211: outside its list, whether an alias exists is not the
    # tenant's to learn (it was NOT_FOUND, so "nope" and "b" told apart).
    assert reason_of(lambda: resolve_model("nope", tenant, models)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "MODEL_NOT_ALLOWED",
    )
    everything = Tenant("t", frozenset({"*"}))
    assert reason_of(lambda: resolve_model("nope", everything, models)) == (
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
    )
    # No name hides no alias: not found for any tenant.
    assert reason_of(lambda: resolve_model("", tenant, models)) == (
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
    )


async def refusal_of(awaitable):
    with pytest.raises(MeshgateError) as caught:
        await awaitable
    return caught.value.code, caught.value.reason


async def test_authentication_by_hashed_key():
    auth = Authenticator(
        RouterSettings(
            dev_tenant=False,
            tenants=[TenantSettings(id="acme", api_key_sha256=[hash_api_key("secret")], models=["a"])],
        )
    )
    assert (await auth.authenticate([("authorization", "Bearer secret")])).id == "acme"
    assert (await auth.authenticate([("authorization", "bearer  secret ")])).id == "acme"
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    assert await refusal_of(auth.authenticate([])) == (unauthenticated, "API_KEY_MISSING")
    assert await refusal_of(auth.authenticate([("authorization", "Basic x")])) == (
        unauthenticated,
        "UNSUPPORTED_AUTH_SCHEME",
    )
    assert await refusal_of(auth.authenticate([("authorization", "Bearer wrong")])) == (
        unauthenticated,
        "API_KEY_INVALID",
    )


class FakeKeys:
    """A KeyStore's lookup over records in memory, at a fixed time."""

    NOW = 1_000_000.0

    def __init__(self, *records: KeyRecord) -> None:
        self.records = {record.key_hash: record for record in records}

    def now(self) -> float:
        return self.NOW

    async def lookup(self, key_hash):
        return self.records.get(key_hash)


def stored(secret: str, **fields) -> KeyRecord:
    base = {"tenant_id": "acme", "models": ("a",), "limits": LimitSettings(concurrent_streams=2)}
    return KeyRecord(hash_api_key(secret), created_at=FakeKeys.NOW - 10, **(base | fields))


async def test_stored_keys_authenticate_after_configured_ones_and_refuse_when_revoked_or_expired():
    tenant_limits = LimitSettings(requests_per_minute=100)
    # Stored keys are only ever the AdminService's secrets, in their shape.
    live, revoked, expired, later = (new_secret() for _ in range(4))
    keys = FakeKeys(
        stored(live),
        stored(revoked, revoked_at=FakeKeys.NOW - 1),
        stored(expired, expires_at=FakeKeys.NOW - 1),
        stored(later, expires_at=FakeKeys.NOW + 60),
    )
    auth = Authenticator(
        RouterSettings(
            dev_tenant=False,
            tenants=[TenantSettings(id="acme", api_key_sha256=[hash_api_key("file")], limits=tenant_limits)],
            admin_api_key_sha256=[hash_api_key("root")],
        ),
        keys,
    )

    def bearer(key):
        return [("authorization", f"Bearer {key}")]

    tenant = await auth.authenticate(bearer(live))
    # The stored key's own models and limits, under its tenant's configured limits.
    assert (tenant.id, tenant.models, tenant.key_id) == ("acme", frozenset({"a"}), hash_api_key(live)[:16])
    assert tenant.limits == tenant_limits and tenant.key_limits.concurrent_streams == 2
    assert (await auth.authenticate(bearer(later))).id == "acme"
    assert (await auth.authenticate(bearer("file"))).id == "acme"
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    assert await refusal_of(auth.authenticate(bearer(revoked))) == (unauthenticated, "API_KEY_REVOKED")
    assert await refusal_of(auth.authenticate(bearer(expired))) == (unauthenticated, "API_KEY_EXPIRED")
    # The admin credential: admin calls only, and no tenant's turns.
    assert await auth.authenticate_caller(bearer("root")) is None
    await auth.authenticate_admin(bearer("root"))
    assert await refusal_of(auth.authenticate(bearer("root"))) == (unauthenticated, "API_KEY_INVALID")
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert await refusal_of(auth.authenticate_admin(bearer(live))) == (denied, "ADMIN_REQUIRED")


async def test_a_key_not_shaped_as_a_stored_secret_is_refused_without_a_lookup():
    """A made-up key costs no Redis call: only well-shaped secrets are looked up."""
    lookups = []

    class CountingKeys(FakeKeys):
        async def lookup(self, key_hash):
            lookups.append(key_hash)
            return await super().lookup(key_hash)

    live = new_secret()
    auth = Authenticator(RouterSettings(dev_tenant=False), CountingKeys(stored(live)))
    not_stored = ["wrong", live[:-1], live + "x", live.replace("mgk-", "mgx-"), "mgk-" + "!" * 43]
    for key in not_stored:
        assert await refusal_of(auth.authenticate([("authorization", f"Bearer {key}")])) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "API_KEY_INVALID",
        ), key
    assert lookups == []
    # A well-shaped one is looked up, found or not.
    assert (await auth.authenticate([("authorization", f"Bearer {live}")])).id == "acme"
    absent = new_secret()
    assert await refusal_of(auth.authenticate([("authorization", f"Bearer {absent}")])) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "API_KEY_INVALID",
    )
    assert lookups == [hash_api_key(live), hash_api_key(absent)]


async def test_a_reload_swaps_the_configured_keys():
    auth = Authenticator(
        RouterSettings(
            dev_tenant=False, tenants=[TenantSettings(id="old", api_key_sha256=[hash_api_key("k1")])]
        )
    )
    assert (await auth.authenticate([("authorization", "Bearer k1")])).id == "old"
    auth.reconfigure(
        RouterSettings(
            dev_tenant=False, tenants=[TenantSettings(id="new", api_key_sha256=[hash_api_key("k2")])]
        )
    )
    assert (await auth.authenticate([("authorization", "Bearer k2")])).id == "new"
    assert await refusal_of(auth.authenticate([("authorization", "Bearer k1")])) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "API_KEY_INVALID",
    )


def test_max_tokens_that_would_fill_the_window_is_too_large_for_the_caller():
    """A configuration review's: an alias whose max_output_tokens (its
    default 256) reaches a small window took a turn asking for that many,
    which the context service then refused as INVALID_TOKEN_BUDGET, blaming
    nothing the caller sent. MAX_TOKENS_TOO_LARGE names the most it may ask."""
    small = ModelSettings(context_window_tokens=64, default_max_tokens=8)
    assert check_turn(turn(user("hi"), max_tokens=63), small, SETTINGS) == 63
    with pytest.raises(MeshgateError) as refused:
        check_turn(turn(user("hi"), max_tokens=64), small, SETTINGS)
    assert refused.value.reason == "MAX_TOKENS_TOO_LARGE" and refused.value.metadata["limit"] == "63"


def test_a_turn_past_max_turn_bytes_is_refused_at_it_and_taken_within():
    """A review's finding: each message at router.max_message_bytes allowed
    a turn of 64 MiB (32 MiB past gRPC's bound); a 30 MiB one cost the
    router's loop ~150 ms of calls to build and serialize. The messages
    together are held to router.max_turn_bytes, in UTF-8 bytes."""
    settings = RouterSettings(max_message_bytes=1000, max_turn_bytes=2000)
    assert check_turn(turn(user("x" * 1000), user("é" * 500)), MODEL, settings) == 10
    for over in (
        turn(user("x" * 1000), user("x" * 1000), user("y")),
        turn(user("x" * 1000), user("é" * 500), user("y")),
    ):
        with pytest.raises(MeshgateError) as caught:
            check_turn(over, MODEL, settings)
        assert (caught.value.reason, caught.value.metadata) == (
            "MESSAGE_TOO_LARGE",
            {"limit": "2000", "scope": "turn"},
        )


def test_max_turn_bytes_below_max_message_bytes_is_refused_at_load():
    from meshgate.config import ConfigError

    with pytest.raises(ConfigError, match="max_turn_bytes"):
        RouterSettings(max_message_bytes=1000, max_turn_bytes=999)
