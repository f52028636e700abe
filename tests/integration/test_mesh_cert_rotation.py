"""A service's certificate renewed on disk (cert-manager renews every 75
days) is the one its next TLS handshake presents, without a restart: the
real context service over real Redis, its files replaced under it, seen by
a client's handshake. Its open connections keep working, and files that
fail the checks of its start keep the certificate it serves."""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import ssl

import pytest
import structlog
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate import mesh_auth
from meshgate.config import Settings
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.local import certs
from services.context import app as context_app
from tests.integration.conftest import running
from tests.mesh import certs_dir, mesh_settings, renew, router_channel

pytestmark = pytest.mark.integration

SERVICE = "context"


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


def certificate_in(directory: pathlib.Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(certs.cert_path(directory, SERVICE).read_bytes())


async def presented(address: str, directory: pathlib.Path) -> x509.Certificate:
    """The certificate the server presents to a new connection, as the
    router would open one (its certificate, verifying the server's name)."""
    context = ssl.create_default_context(cafile=certs.ca_path(directory))
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
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            assert (
                await presented(context_service, served_certs)
            ).serial_number == started_with.serial_number
            await answers(context_service, served_certs, tenant)
    refused = [entry for entry in logs if entry["log_level"] == "error"]
    assert len(refused) == 1, logs
    assert "is not the key of mesh.cert_file" in refused[0]["error"]

    # Its key arrives: the pair is taken.
    certs.replace_file(
        certs.key_path(served_certs, SERVICE), certs.key_path(scratch, SERVICE).read_bytes(), 0o600
    )
    assert (await presented(context_service, served_certs)).serial_number == certificate_in(
        scratch
    ).serial_number
    await answers(context_service, served_certs, tenant)
