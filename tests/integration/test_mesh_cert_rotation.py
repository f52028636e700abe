"""A service's certificate renewed on disk (cert-manager renews every 75
days) is the one its next TLS handshake presents, without a restart: the
real context service over real Redis, its files replaced under it, seen by
a client's handshake. Its open connections keep working, and files that
fail the checks of its start keep the certificate it serves.

The same holds for the service as a client: the real router, its files
renewed under it (``meshgate certs``), presents its renewed certificate and
trusts a new CA file on the connections it makes afterwards, while a call
open on a connection made before finishes there."""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import datetime
import pathlib
import shutil
import ssl
import uuid

import grpc
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate import mesh_auth, serving
from meshgate.config import Settings
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.errors import error_info
from meshgate.local import certs
from meshgate.local.stack import free_port
from meshgate.router.v1 import router_service_pb2 as router_pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.context import app as context_app
from services.router import app as router_app
from tests.integration.conftest import running
from tests.mesh import authority, bounded_channel, certs_dir, mesh_settings, renew, router_channel

# The tests whose certificate or token overlap lasts seconds are marked serial
# (make test runs them alone); the others wait only at least so long, and
# share the machine.
pytestmark = pytest.mark.integration

SERVICE = "context"
ROUTER_KEY = "cert-rotation-test-key"


@pytest.fixture
def served_certs(tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of the test mesh's certificates (the same CA), whose context
    files the tests replace."""
    directory = tmp_path / "certs"
    shutil.copytree(certs_dir(), directory)
    return directory


@pytest.fixture
async def context_service(served_certs: pathlib.Path, redis_url: str):
    """The context service serving with ``served_certs``; yields its address."""
    settings = Settings(mesh=mesh_settings(served_certs))
    settings.redis.url = redis_url
    async with running(context_app, SERVICE, settings) as address:
        yield address


def certificate_in(directory: pathlib.Path, service: str = SERVICE) -> x509.Certificate:
    return x509.load_pem_x509_certificate(certs.cert_path(directory, service).read_bytes())


async def presented(address: str, directory: pathlib.Path, verified: bool = True) -> x509.Certificate:
    """The certificate the server presents to a new connection, as the
    router would open one (its certificate, verifying the server's name;
    with ``verified`` false, not checking it at all)."""
    context = ssl.create_default_context(cafile=certs.ca_path(directory))
    if not verified:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(certs.cert_path(directory, "router"), certs.key_path(directory, "router"))
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    _, writer = await asyncio.open_connection(
        host, int(port), ssl=context, server_hostname=mesh_auth.identity(SERVICE)
    )
    try:
        return x509.load_der_x509_certificate(
            writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        )
    finally:
        writer.close()


async def answers(address: str, directory: pathlib.Path, tenant: str) -> None:
    """A grpc client's new connection, as the router's, is served."""
    async with router_channel(address, SERVICE, mesh_settings(directory)) as channel:
        created = await context_service_pb2_grpc.ContextServiceStub(channel).CreateSession(
            context_pb.CreateSessionRequest(tenant_id=tenant)
        )
        assert created.session.session_id


async def keeps_the_one_in_use(
    address: str, directory: pathlib.Path, tenant: str, in_use: x509.Certificate, refusal: str
) -> None:
    """Files on disk that fail the start's checks: new connections (three)
    are still presented ``in_use`` and served, and the service says why it
    refused the files once (one error log containing ``refusal``), not at
    each look."""
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            assert (await presented(address, directory)).serial_number == in_use.serial_number
            await answers(address, directory, tenant)
    refused = [entry for entry in logs if entry["log_level"] == "error"]
    assert len(refused) == 1, logs
    assert refusal in refused[0]["error"]


async def test_a_renewed_certificate_is_presented_to_new_connections_and_open_ones_stay(
    context_service, served_certs, tenant
):
    started_with = certificate_in(served_certs)
    assert (await presented(context_service, served_certs)).serial_number == started_with.serial_number
    async with router_channel(context_service, SERVICE, mesh_settings(served_certs)) as channel:
        # An open stream on the connection made before the renewal: it would
        # end UNAVAILABLE if the server dropped its connections.
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stub = context_service_pb2_grpc.ContextServiceStub(channel)
        session = (await stub.CreateSession(context_pb.CreateSessionRequest(tenant_id=tenant))).session

        renew(served_certs, SERVICE)
        renewed = certificate_in(served_certs)
        assert renewed.serial_number != started_with.serial_number
        assert (await presented(context_service, served_certs)).serial_number == renewed.serial_number
        await answers(context_service, served_certs, tenant)

        got = await stub.GetSession(
            context_pb.GetSessionRequest(tenant_id=tenant, session_id=session.session_id)
        )
        assert got.session.session_id == session.session_id
        assert not watch.done()
        watch.cancel()


async def test_a_key_that_is_not_the_renewed_certificates_keeps_the_one_in_use(
    context_service, served_certs, tenant
):
    started_with = certificate_in(served_certs)
    # The renewal's certificate beside the key in use: half of a renewal.
    scratch = served_certs.parent / "scratch"
    shutil.copytree(served_certs, scratch)
    renew(scratch, SERVICE)
    certs.replace_file(
        certs.cert_path(served_certs, SERVICE), certs.cert_path(scratch, SERVICE).read_bytes(), 0o644
    )
    await keeps_the_one_in_use(
        context_service, served_certs, tenant, started_with, "is not the key of mesh.cert_file"
    )

    # Its key arrives: the pair is taken.
    certs.replace_file(
        certs.key_path(served_certs, SERVICE), certs.key_path(scratch, SERVICE).read_bytes(), 0o600
    )
    assert (await presented(context_service, served_certs)).serial_number == certificate_in(
        scratch
    ).serial_number
    await answers(context_service, served_certs, tenant)


async def test_another_cas_certificate_followed_by_one_of_the_mesh_keeps_the_one_in_use(
    context_service, served_certs, tenant, tmp_path
):
    """A certificate file passed the CA check when any certificate in it
    came from the CA: another CA's pair, with the mesh's certificate in use
    after it in the file, was taken, and every call failed its handshake
    (3 of 3 UNAVAILABLE, "unable to get local issuer certificate")."""
    started_with = certificate_in(served_certs)
    in_use = certs.cert_path(served_certs, SERVICE).read_bytes()
    other = tmp_path / "other"
    certs.ensure(other)
    certs.replace_file(
        certs.cert_path(served_certs, SERVICE), certs.cert_path(other, SERVICE).read_bytes() + in_use, 0o644
    )
    certs.replace_file(
        certs.key_path(served_certs, SERVICE), certs.key_path(other, SERVICE).read_bytes(), 0o600
    )
    await keeps_the_one_in_use(
        context_service, served_certs, tenant, started_with, "is not issued by mesh.ca_file"
    )


def issued_through_intermediates(directory: pathlib.Path, *expiries: datetime.timedelta) -> x509.Certificate:
    """A new pair for the context service in ``directory``, its certificate
    issued through a chain of intermediates, one expiring each of
    ``expiries`` from now (the root's first), which the certificate file
    carries after it, nearest first; their root (one that allows
    intermediates, as the mesh's own CA does not) joins the CA file.
    Returns the new certificate."""
    now = datetime.datetime.now(datetime.UTC)
    issuer_key, issuer = authority("root", None, None, now + datetime.timedelta(days=365))
    root = issuer
    intermediates = []
    for number, expiry in enumerate(expiries, 1):
        issuer_key, issuer = authority(f"intermediate {number}", issuer, issuer_key, now + expiry)
        intermediates.insert(0, issuer)
    key, leaf = certs._issue(issuer_key, issuer, SERVICE)
    pem = serialization.Encoding.PEM
    ca_file = certs.ca_path(directory)
    certs.replace_file(ca_file, ca_file.read_bytes() + root.public_bytes(pem), 0o644)
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    certs.replace_file(certs.key_path(directory, SERVICE), key_pem, 0o600)
    chain = b"".join(certificate.public_bytes(pem) for certificate in [leaf, *intermediates])
    certs.replace_file(certs.cert_path(directory, SERVICE), chain, 0o644)
    return leaf


async def test_a_renewal_from_an_expired_intermediate_keeps_the_one_in_use(
    context_service, served_certs, tenant
):
    """Peers refuse a chain whose intermediate expired ("certificate has
    expired") as they refuse an expired certificate: taken, such a renewal
    failed every call (3 of 3 UNAVAILABLE)."""
    started_with = certificate_in(served_certs)
    issued_through_intermediates(served_certs, -datetime.timedelta(days=1))
    await keeps_the_one_in_use(
        context_service, served_certs, tenant, started_with, "the chain that issued it"
    )


async def test_a_renewal_issued_through_two_intermediates_is_presented_and_served(
    context_service, served_certs, tenant
):
    """root -> int1 -> int2 -> leaf, the root without a path length: openssl
    verify takes it, and so do the service's peers; a renewal of that shape
    was refused "is not issued by mesh.ca_file" (and kept the certificate
    in use), as only intermediates the CA file's issued could issue."""
    year = datetime.timedelta(days=365)
    renewed = issued_through_intermediates(served_certs, year, year)
    assert (await presented(context_service, served_certs)).serial_number == renewed.serial_number
    await answers(context_service, served_certs, tenant)


async def test_a_renewal_not_valid_yet_is_served_once_it_is_valid_not_before(
    context_service, served_certs, tenant, monkeypatch
):
    """Peers refuse a certificate before its notBefore as they refuse an
    expired one: taken at once, a renewal issued an hour ahead (staged
    early, or by a host whose clock runs ahead) failed every new connection
    to the service (5 of 5 calls UNAVAILABLE, "Tls handshake failed")."""
    started_with = certificate_in(served_certs)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    with monkeypatch.context() as issuing:
        issuing.setattr(certs, "_now", lambda: later)
        renew(served_certs, SERVICE)
    renewed = certificate_in(served_certs)
    assert renewed.not_valid_before_utc > datetime.datetime.now(datetime.UTC)
    await keeps_the_one_in_use(context_service, served_certs, tenant, started_with, "is not valid before")

    # Once valid (on the service's clock, moved: grpc's handshakes keep the
    # real one, so the client below does not check it), the same files are
    # taken, unchanged.
    monkeypatch.setattr(mesh_auth, "certificate_clock", lambda: later)
    served = await presented(context_service, served_certs, verified=False)
    assert served.serial_number == renewed.serial_number


def context_settings(directory: pathlib.Path, redis_url: str) -> Settings:
    settings = Settings(mesh=mesh_settings(directory))
    settings.redis.url = redis_url
    return settings


def router_settings(directory: pathlib.Path, redis_url: str, context_address: str) -> Settings:
    """A router whose sessions are the context service's at ``context_address``
    (its cache service and models are not called here)."""
    settings = context_settings(directory, redis_url)
    settings.router.dev_api_key = ROUTER_KEY
    settings.router.context_address = context_address
    settings.router.cache_address = f"127.0.0.1:{free_port()}"
    return settings


async def session_through(router: str) -> str:
    """A session created through the router: a call of the router's to the
    context service."""
    async with bounded_channel(router) as channel:
        created = await router_service_pb2_grpc.RouterServiceStub(channel).CreateSession(
            router_pb.CreateSessionRequest(), metadata=[("authorization", f"Bearer {ROUTER_KEY}")], timeout=20
        )
    return created.session_id


def reissue_router_certificate(directory: pathlib.Path, lasting: datetime.timedelta, monkeypatch) -> None:
    """The router's certificate issued again by ``meshgate certs``, its key
    kept (the context service verifies tenant tokens with it), ending
    ``lasting`` from now."""
    issued_at = certs._now() - datetime.timedelta(days=certs.SERVICE_DAYS) + lasting
    certs.cert_path(directory, "router").unlink()
    with monkeypatch.context() as earlier:
        earlier.setattr(certs, "_now", lambda: issued_at)
        certs.ensure(directory, ("router",))


async def sessions_across_a_context_restart(
    directory: pathlib.Path, redis_url: str, change: collections.abc.Callable[[], float]
) -> None:
    """A router's session call served by a context service on ``directory``'s
    files; then ``change()`` (the files changed; it says how long to wait
    before the restart), and the context service restarted on the files as
    they are now, at the same address, serves the same router (not
    restarted) once it has looked at its files."""
    context_address = f"127.0.0.1:{free_port()}"
    async with contextlib.AsyncExitStack() as first_context:
        await first_context.enter_async_context(
            running(context_app, SERVICE, context_settings(directory, redis_url), context_address)
        )
        settings = router_settings(directory, redis_url, context_address)
        async with running(router_app, "router", settings) as router:
            assert await session_through(router)
            wait_s = change()
            await first_context.aclose()
            await asyncio.sleep(wait_s)
            async with running(context_app, SERVICE, context_settings(directory, redis_url), context_address):
                await asyncio.sleep(mesh_auth.CERTIFICATE_LOOK_S)
                assert await session_through(router)


# Timing-sensitive: a certificate that lasts 5 s must outlast two starts.
@pytest.mark.serial  # make test runs it alone
async def test_the_router_presents_its_renewed_certificate_to_a_restarted_service(
    served_certs, redis_url, monkeypatch
):
    """The router's certificate is renewed on disk before it expires; once it
    has expired, a context service restarted (or any new connection: grpc's
    max_connection_age closes each after ~5 minutes) gets the renewed one.
    A router presenting the certificate it started with was refused at the
    handshake: every session call failed until the router was restarted."""
    # Long enough for both services to start and serve a first session with it.
    reissue_router_certificate(served_certs, datetime.timedelta(seconds=5), monkeypatch)
    started_with = certificate_in(served_certs, "router")

    def renewed() -> float:
        # `meshgate certs` renews what expires within 30 days, keeping the key.
        assert certs.ensure(served_certs) == [certs.cert_path(served_certs, "router")]
        expired_in = started_with.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
        return expired_in.total_seconds() + 1

    await sessions_across_a_context_restart(served_certs, redis_url, renewed)


def new_ca(directory: pathlib.Path) -> float:
    """`meshgate certs` once the old CA's files are deleted: every
    certificate issued again from a new CA, keys kept."""
    certs.ca_path(directory).unlink()
    certs.key_path(directory, "ca").unlink()
    certs.ensure(directory)
    return 0.0


async def test_the_router_follows_its_files_to_a_new_ca(served_certs, redis_url):
    """The mesh moves to a new CA: a context service started on the new
    files refuses the old CA's certificates, and the router, which trusted
    only the old CA, reaches it with its new files without a restart."""
    await sessions_across_a_context_restart(served_certs, redis_url, lambda: new_ca(served_certs))


async def test_a_call_open_when_the_files_change_finishes_on_the_channel_it_started_on(
    context_service, served_certs
):
    """A call opened before the files changed goes on over its connection
    (good until it ends, whatever the files say now) while new calls go on
    a new channel, with the new files: the context service, on a new CA,
    refuses the old CA's certificates at new handshakes. (The replaced
    channel is closed once its last call ends: tests/unit/test_serving_channels.py.)"""
    health = health_pb2.HealthCheckRequest()
    serving_status = health_pb2.HealthCheckResponse.SERVING
    mesh = mesh_auth.Mesh(mesh_settings(served_certs), "router")
    async with serving.client_channel(context_service, mesh.to(SERVICE)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health, timeout=60)
        assert (await watch.read()).status == serving_status

        new_ca(served_certs)
        await asyncio.sleep(mesh_auth.CERTIFICATE_LOOK_S)
        for _ in range(3):
            assert (await stub.Check(health, timeout=10)).status == serving_status
        assert not watch.done()
        watch.cancel()


async def test_a_context_service_restarted_after_the_routers_key_changed_takes_its_tokens(
    served_certs, redis_url
):
    """The router's certificate renewed with a new key pair (cert-manager's
    rotationPolicy Always; ``meshgate certs`` after its key was deleted),
    and the context service restarted on the new files: the router, not
    restarted, signs with its new key at once. It signed with the key of
    its start until restarted, which the restarted service refused: every
    turn was UNAUTHENTICATED TENANT_TOKEN_INVALID."""

    def rekeyed() -> float:
        renew(served_certs, "router")
        return 0.0

    await sessions_across_a_context_restart(served_certs, redis_url, rekeyed)


# Timing-sensitive: the old key's tokens must come within the overlap.
@pytest.mark.serial  # make test runs it alone
async def test_services_that_kept_running_follow_the_routers_new_key_and_retire_the_old(
    served_certs, redis_url
):
    """The router's key renewed and the router restarted on it: the context
    service, not restarted, verifies its tokens with the key of the renewed
    certificate (it read the router's certificate once, at start, and
    refused every token of the restarted router), and accepts tokens of the
    previous key only for the overlap of a rotation (it accepted them for
    as long as it ran)."""
    context = context_settings(served_certs, redis_url)
    context.mesh.tenant_token_ttl_s = 1.0
    async with running(context_app, SERVICE, context) as context_address:
        settings = router_settings(served_certs, redis_url, context_address)
        async with running(router_app, "router", settings) as router:
            assert await session_through(router)
        retired = served_certs.parent / "retired"
        shutil.copytree(served_certs, retired)

        renew(served_certs, "router")
        await asyncio.sleep(mesh_auth.CERTIFICATE_LOOK_S)
        async with running(router_app, "router", settings) as router:
            assert await session_through(router)

        # Tokens signed with the previous key: taken during the overlap, refused after it.
        tenant = f"tenant-{uuid.uuid4().hex[:8]}"
        await answers(context_address, retired, tenant)
        overlap_s = context.mesh.tenant_token_ttl_s + mesh_auth.CLOCK_LEEWAY_S + mesh_auth.CERTIFICATE_LOOK_S
        await asyncio.sleep(overlap_s)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await answers(context_address, retired, tenant)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(refused.value).reason == "TENANT_TOKEN_INVALID"
