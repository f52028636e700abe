"""Stored keys past the gate (services/router/auth.py): checked again on
every ChatSession turn from the KeyStore's cache, and bounded by their
configured tenant's models. Redis is a fake that answers each GET in turn
(tests/integration/test_router_keys.py covers a real Redis)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading

import grpc
import grpc_testing
import pytest
import redis.exceptions
from google.rpc import status_pb2

from meshgate.config import DEV_TENANT_ID, LimitSettings, RouterSettings, TenantSettings, hash_api_key
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from services.router import keys as keys_module
from services.router.admission import TenantCalls
from services.router.auth import Authenticator, CallerGate, CallerKey, current_tenant
from services.router.keys import KeyRecord, KeyStore, new_secret, usable_models
from tests.unit.test_router_pipeline import user

# The servicer's grpcio-testing harness: a ChatSession as the router serves
# it, after its gate.
from tests.unit.test_router_servicer import (
    SERVICE,
    _AsyncBridge,
    _reason,
    drain,
    reason_of,
    router_servicer,
    router_settings,
)

CHAT_SESSION = f"/{SERVICE.full_name}/ChatSession"


@pytest.fixture(scope="module")
def loop():
    """The event loop the harness runs the servicer on, in a thread of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


class ScriptedRedis:
    """A KeyStore's GETs, each answered by the next of ``answers``: a
    record, None (no such key) or DOWN; the last answer repeats. The ids
    hash (KeyStore.lookup_id) holds the records of ``answers``."""

    DOWN = object()

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.gets = 0
        self.ids = {a.key_id: a.key_hash.encode() for a in answers if isinstance(a, KeyRecord)}

    async def hget(self, name: str, key: str):
        assert name == keys_module._IDS
        return self.ids.get(key)

    async def get(self, name: str):
        answer = self.answers[min(self.gets, len(self.answers) - 1)]
        self.gets += 1
        if answer is self.DOWN:
            raise redis.exceptions.ConnectionError("connection refused")
        return answer.to_json() if answer is not None else None


def stored(secret: str, tenant_id: str = "acme", models=("*",)) -> KeyRecord:
    return KeyRecord(hash_api_key(secret), tenant_id, tuple(models), LimitSettings(), created_at=1.0)


def turn_failure(response: pb.ChatSessionResponse) -> tuple[grpc.StatusCode, str]:
    status = status_pb2.Status.FromString(response.failure)
    code = next(code for code in grpc.StatusCode if code.value[0] == status.code)
    return code, _reason(status)


def bearer(secret: str):
    return (("authorization", f"Bearer {secret}"),)


async def test_a_stored_keys_check_per_turn_costs_no_redis_call_while_its_record_is_cached():
    secret = new_secret()
    live = stored(secret)
    fake = ScriptedRedis(live, dataclasses.replace(live, revoked_at=2.0))
    auth = Authenticator(RouterSettings(dev_api_key="file-key"), KeyStore(fake))
    gate = CallerGate(auth, TenantCalls(0))

    async def call(metadata, turns: int) -> None:
        await gate(CHAT_SESSION, metadata)
        for _ in range(turns):
            await current_tenant()

    # One GET at the gate; the turns right after it read the cache.
    await asyncio.create_task(call(bearer(secret), 5))
    assert fake.gets == 1
    # A key of the configuration file is not looked up at all.
    await asyncio.create_task(call(bearer("file-key"), 5))
    assert fake.gets == 1


def test_a_chat_session_turn_fails_closed_while_redis_cannot_check_its_key_and_ends_once_it_is_revoked(
    loop, monkeypatch
):
    # Every turn reads Redis (no cache), so that each of its answers reaches a turn.
    monkeypatch.setattr(keys_module, "_CACHE_TTL_S", 0.0)
    secret = new_secret()
    live = stored(secret)
    fake = ScriptedRedis(live, ScriptedRedis.DOWN, live, dataclasses.replace(live, revoked_at=2.0))
    settings = router_settings().router
    gate = CallerGate(Authenticator(settings, KeyStore(fake)), TenantCalls(settings.tenant_call_cap()))
    server = grpc_testing.server_from_dictionary(
        {SERVICE: _AsyncBridge(router_servicer(), gate, loop)}, grpc_testing.strict_real_time()
    )
    rpc = server.invoke_stream_stream(SERVICE.methods_by_name["ChatSession"], bearer(secret), 10)
    for text in ("Redis is down", "Redis is back", "the key is revoked", "never served"):
        rpc.send_request(pb.ChatSessionRequest(model="m", messages=[user(text)]))
    rpc.requests_closed()
    trailing_metadata, code, _ = rpc.termination()
    responses = drain(rpc)
    # Redis cannot tell: that turn fails closed, in the stream, which goes on.
    assert turn_failure(responses[0]) == (grpc.StatusCode.UNAVAILABLE, Reason.REDIS_UNAVAILABLE)
    assert responses[-2].HasField("completion")
    # Revoked: the turn fails as a new call would, and so does the call.
    assert turn_failure(responses[-1]) == (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_REVOKED)
    assert (code, reason_of(trailing_metadata)) == (grpc.StatusCode.UNAUTHENTICATED, Reason.API_KEY_REVOKED)
    assert fake.gets == 4  # the turn after the refusal was never read


@pytest.mark.parametrize(
    ("key_models", "tenant_models", "usable"),
    [
        (("*",), None, {"*"}),  # a tenant not configured bounds nothing
        (("a", "b"), None, {"a", "b"}),
        (("*",), {"*"}, {"*"}),
        (("a",), {"*"}, {"a"}),
        (("*",), {"a", "b"}, {"a", "b"}),  # "*" on the key: its tenant's models
        (("a", "c"), {"a", "b"}, {"a"}),  # both must allow it
        (("c",), {"a", "b"}, set()),  # the tenant's list shrank since: nothing
    ],
)
def test_a_stored_key_may_use_the_models_both_it_and_its_tenant_allow(key_models, tenant_models, usable):
    bound = frozenset(tenant_models) if tenant_models is not None else None
    assert usable_models(key_models, bound) == frozenset(usable)


async def test_a_reload_that_narrows_a_tenants_models_narrows_its_stored_keys():
    secret = new_secret()
    fake = ScriptedRedis(stored(secret, models=("a", "b")))
    auth = Authenticator(
        RouterSettings(dev_tenant=False, tenants=[TenantSettings(id="acme")]), KeyStore(fake)
    )
    assert (await auth.authenticate(bearer(secret))).models == {"a", "b"}
    auth.reconfigure(RouterSettings(dev_tenant=False, tenants=[TenantSettings(id="acme", models=["b"])]))
    tenant = await auth.authenticate(bearer(secret))
    assert tenant.may_use("b") and not tenant.may_use("a")


async def test_a_long_calls_key_is_resolved_again_in_the_settings_a_reload_made():
    # ChatSession turns (current_tenant): a reload's limits reach the next
    # turn; a key moved to another tenant is refused, since the stream's
    # session and its place under the caps are its first tenant's.
    def settings(tenant_id: str, rpm: int) -> RouterSettings:
        tenant = TenantSettings(
            id=tenant_id,
            api_key_sha256=[hash_api_key("file-key")],
            limits=LimitSettings(requests_per_minute=rpm),
        )
        return RouterSettings(dev_tenant=False, tenants=[tenant])

    auth = Authenticator(settings("acme", 10))
    gate = CallerGate(auth, TenantCalls(0))

    async def call() -> None:
        await gate(CHAT_SESSION, bearer("file-key"))
        assert (await current_tenant()).limits.requests_per_minute == 10
        auth.reconfigure(settings("acme", 1))
        assert (await current_tenant()).limits.requests_per_minute == 1
        auth.reconfigure(settings("globex", 1))
        with pytest.raises(MeshgateError) as refused:
            await current_tenant()
        assert (refused.value.code, refused.value.reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            Reason.API_KEY_INVALID,
        )

    await asyncio.create_task(call())


def test_a_key_stored_with_a_cost_limit_under_one_nano_usd_still_reads():
    """CreateKey refuses such a limit now (LimitSettings); a key created
    before keeps its record readable (its calls, its tenant's ListKeys),
    with the limit it was given."""
    record = stored(new_secret())
    fields = json.loads(record.to_json())
    fields["limits"]["cost_usd_per_day"] = 5e-10
    read = KeyRecord.from_json(json.dumps(fields))
    assert read.limits.cost_usd_per_day == 5e-10 and read.key_hash == record.key_hash


def test_a_key_never_rotated_is_stored_as_before_and_a_successor_carries_its_accounting_id():
    # A replica from before accounting ids reads every record it could: only
    # a rotated key's record says more than it did.
    record = stored(new_secret())
    assert "accounting_id" not in record.to_json()
    assert KeyRecord.from_json(record.to_json()) == record
    assert record.accounting_id == record.key_id
    successor = dataclasses.replace(record, key_hash=hash_api_key(new_secret()))
    assert successor.accounting_id == record.key_id != successor.key_id
    assert KeyRecord.from_json(successor.to_json()).accounting_id == record.key_id


def test_check_key_request_refuses_a_model_outside_the_configured_tenants():
    known = {"a": None, "b": None}
    with pytest.raises(MeshgateError) as refused:
        keys_module.check_key_request("acme", ["a", "b"], {}, known, None, 0.0, frozenset({"a"}))
    assert (refused.value.code, refused.value.reason, refused.value.metadata) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.MODEL_NOT_ALLOWED,
        {"model": "b"},
    )
    # "*" (or none) on the key means the tenant's models: accepted as stored.
    assert keys_module.check_key_request("acme", [], {}, known, None, 0.0, frozenset({"a"}))[0] == ("*",)


def test_a_key_names_each_model_once_however_often_the_request_repeats_it():
    known = {"a": None, "b": None}
    models = keys_module.check_key_request(
        "acme", ["*"] * 100_000 + ["a", "b", "a"], {}, known, None, 0.0, None
    )[0]
    assert models == ("*", "a", "b")


@pytest.mark.parametrize("tenant_id", ["x" * 129, "a b", "a}b{c", "bell\x07", "x" * 512 * 1024])
def test_an_admin_call_naming_a_tenant_id_no_tenant_can_have_is_refused(tenant_id):
    with pytest.raises(MeshgateError) as refused:
        keys_module.check_tenant_id(tenant_id)
    assert (refused.value.code, refused.value.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_TENANT_ID,
    )
    assert keys_module.check_tenant_id("acme-1") == "acme-1"


async def test_summaries_usage_is_billed_to_the_sessions_latest_key_while_it_names_the_tenant() -> None:
    """Authenticator.billed_tenant: a configured key; a stored key, revoked
    since (its usage is from its time) and with a rotated key's accounting
    id; else (a key unknown now, another tenant's, or none) the tenant with
    no key, and its configured limits."""
    limits = LimitSettings(tokens_per_day=1000)
    key_limits = LimitSettings(tokens_per_day=10)
    settings = RouterSettings(
        dev_tenant=False,
        tenants=[
            TenantSettings(
                id="acme", api_key_sha256=[hash_api_key("file-key")], limits=limits, key_limits=key_limits
            ),
            TenantSettings(id="other", api_key_sha256=[hash_api_key("other-key")]),
        ],
    )
    secret = new_secret()
    revoked = dataclasses.replace(
        stored(secret), revoked_at=2.0, accounting_id="first-key-id", limits=key_limits
    )
    fake = ScriptedRedis(revoked)
    auth = Authenticator(settings, KeyStore(fake))

    # A session names its latest key by id (a turn's Tenant.own_key_id).
    file_key = await auth.tenant_of(CallerKey(hash_api_key("file-key"), False))
    assert file_key.own_key_id == file_key.key_id == hash_api_key("file-key")[:16]
    configured = await auth.billed_tenant("acme", file_key.own_key_id)
    assert (configured.key_id, configured.limits, configured.key_limits) == (
        hash_api_key("file-key")[:16],
        limits,
        key_limits,
    )
    billed = await auth.billed_tenant("acme", revoked.key_id)
    assert (billed.id, billed.key_id, billed.own_key_id, billed.limits, billed.key_limits) == (
        "acme",
        "first-key-id",
        revoked.key_id,
        limits,
        key_limits,
    )
    # Redis knows no other key (the secret's record is in the KeyStore's cache).
    fake.answers = [None]
    for tenant_id, key_id in (
        ("acme", hash_api_key("other-key")[:16]),
        ("acme", ""),
        ("other", revoked.key_id),
        # A key's whole hash is no id.
        ("acme", hash_api_key("file-key")),
    ):
        keyless = await auth.billed_tenant(tenant_id, key_id)
        assert (keyless.id, keyless.key_id, keyless.key_limits) == (tenant_id, "", LimitSettings())
    assert (await auth.billed_tenant("acme", "")).limits == limits
    assert (await auth.billed_tenant("acme", hash_api_key(new_secret())[:16])).key_id == ""


@pytest.mark.parametrize("lower_first", [True, False])
async def test_configured_keys_sharing_an_id_bill_the_lower_hashs_tenant_in_any_order(lower_first) -> None:
    """Two configured digests alike in their first 16 hex digits (made so:
    beyond chance otherwise): every replica bills a session of that id to
    the same key, whichever order the file lists them in."""
    shared = "ab" * 8
    lower = TenantSettings(id="acme", api_key_sha256=[shared + "0" * 48])
    higher = TenantSettings(id="other", api_key_sha256=[shared + "f" * 48])
    tenants = [lower, higher] if lower_first else [higher, lower]
    auth = Authenticator(RouterSettings(dev_tenant=False, tenants=tenants))
    assert (await auth.billed_tenant("acme", shared)).key_id == shared
    assert (await auth.billed_tenant("other", shared)).key_id == ""


async def test_the_dev_keys_sessions_bill_the_dev_tenant() -> None:
    auth = Authenticator(RouterSettings(dev_api_key="dev-secret"))
    dev = await auth.tenant_of(CallerKey(hash_api_key("dev-secret"), False))
    assert dev.own_key_id == hash_api_key("dev-secret")[:16]
    assert await auth.billed_tenant(DEV_TENANT_ID, dev.own_key_id) == dev


def test_check_key_request_refuses_the_dev_tenants_id():
    """The dev tenant's key is public: a stored key of its id shared the
    holder's sessions, cached answers and usage with anyone holding it (a
    review: CreateKey(tenant_id="dev") was OK while the dev tenant was on)."""
    with pytest.raises(MeshgateError) as refused:
        keys_module.check_key_request("dev", [], {}, frozenset({"a"}), None, 0.0)
    assert (refused.value.code, refused.value.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_KEY_SPEC",
    )
    assert "dev tenant" in refused.value.message


async def test_a_stored_key_of_the_dev_tenants_id_is_refused_while_the_dev_tenant_is_on():
    """One made before CreateKey refused the id (or with the dev tenant off)
    would share the public dev key's sessions, cached answers and usage."""
    secret = new_secret()
    fake = ScriptedRedis(stored(secret, tenant_id="dev"))
    key = CallerKey(hash_api_key(secret), True)
    with pytest.raises(MeshgateError) as refused:
        await Authenticator(RouterSettings(dev_tenant=True), KeyStore(fake)).tenant_of(key)
    assert refused.value.reason == Reason.API_KEY_INVALID
    # With the dev tenant off, "dev" is a tenant like any.
    tenant = await Authenticator(RouterSettings(dev_tenant=False), KeyStore(fake)).tenant_of(key)
    assert tenant.id == "dev"
