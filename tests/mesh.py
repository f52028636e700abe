"""The mesh identities of the tests: one CA and a certificate per service,
made once per test session, and channels that act as one of the services.

Services under test get :func:`mesh_settings`; a test that calls the context,
cache or inference service directly does it as the router would, through
:func:`router_channel`.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import datetime
import functools
import pathlib
import shutil
import tempfile

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshgate import mesh_auth, metrics, serving
from meshgate.config import MeshSettings
from meshgate.local import certs
from services.router.servicer import ADMITTED_METADATA


@functools.cache
def certs_dir() -> pathlib.Path:
    directory = pathlib.Path(tempfile.mkdtemp(prefix="meshgate-test-mesh-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    certs.ensure(directory)
    return directory


def renew(directory: pathlib.Path, service: str) -> None:
    """A new key and certificate for ``service`` in ``directory``, from the
    CA there, each file renamed into place: ``meshgate certs`` after the
    service's key file was deleted."""
    certs.key_path(directory, service).unlink()
    certs.ensure(directory, (service,))


def authority(
    name: str,
    issuer: x509.Certificate | None,
    issuer_key,
    not_after: datetime.datetime,
    path_length: int | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A CA certificate and its key, issued by ``issuer`` (None: by itself),
    allowing ``path_length`` intermediates below it: by default no limit
    (unlike the mesh's own CA, which allows none), so that it may issue
    intermediates."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        # As real CAs' are: without them, openssl builds the chain of an
        # intermediate named as its issuer (self-issued) by name alone, and
        # picks the issuer.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key((issuer_key or key).public_key()),
            critical=False,
        )
        .sign(issuer_key or key, hashes.SHA256())
    )
    return key, certificate


def mesh_settings(directory: pathlib.Path | None = None) -> MeshSettings:
    directory = directory or certs_dir()
    return MeshSettings(
        ca_file=str(certs.ca_path(directory)),
        cert_file=str(directory / "{service}.pem"),
        key_file=str(directory / "{service}.key"),
    )


def tenant_of(request) -> str | None:
    """The tenant a context or cache request names, if it has such a field
    (raw bytes, as tests of malformed requests send, name none)."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None:
        return None
    fields = descriptor.fields_by_name
    if "tenant_id" in fields:
        return request.tenant_id
    if "scope" in fields:
        return request.scope.tenant_id
    return None


CALL_TIMEOUT_S = 60.0
"""The deadline of a test's call that names none: a stalled server then fails
that test with DEADLINE_EXCEEDED instead of hanging the suite without a word.
Generous, as the machine running the suite is shared and a Generate stream's
deadline covers all of its tokens."""


def _bounded(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    """``details``, with CALL_TIMEOUT_S when the caller gave no timeout."""
    if details.timeout is not None:
        return details
    return grpc.aio.ClientCallDetails(
        details.method, CALL_TIMEOUT_S, details.metadata, details.credentials, details.wait_for_ready
    )


class _UnaryDeadline(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_bounded(client_call_details), request)


class _ServerStreamDeadline(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_bounded(client_call_details), request)


def default_deadlines() -> list[grpc.aio.ClientInterceptor]:
    """A channel's interceptors that give each unary call and server stream
    made without a timeout CALL_TIMEOUT_S. A ChatSession stream names its
    own (``timeout=CALL_TIMEOUT_S`` where the test has no tighter one):
    grpc.aio runs an intercepted stream's writes through a queue, so a
    write would return once queued and a refused stream would end it with
    InvalidStateError instead of the server's status, which tests of
    refusals read. The mesh has no client-streaming unary RPC. One object
    per kind: grpc.aio files an interceptor under the first kind it is an
    instance of and never calls the others."""
    return [_UnaryDeadline(), _ServerStreamDeadline()]


def bounded_channel(address: str) -> grpc.aio.Channel:
    """A plain-text channel to ``address`` (a router's public port, a test
    server) whose calls made without a timeout get CALL_TIMEOUT_S."""
    return grpc.aio.insecure_channel(address, interceptors=default_deadlines())


class _AsRouter(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the router's token for the tenant each request names, as the
    router does after it has authenticated the caller."""

    def __init__(self, tokens: mesh_auth.TenantTokens, service: str) -> None:
        self._tokens = tokens
        self._service = service

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        tenant = tenant_of(request)
        if tenant:
            metadata = [
                *(client_call_details.metadata or ()),
                *self._tokens.metadata(tenant, self._service),
            ]
            client_call_details = grpc.aio.ClientCallDetails(
                client_call_details.method,
                client_call_details.timeout,
                metadata,
                client_call_details.credentials,
                client_call_details.wait_for_ready,
            )
        return await continuation(client_call_details, request)


def router_channel(address: str, service: str, settings: MeshSettings | None = None) -> grpc.aio.Channel:
    """A channel to ``service`` at ``address`` that acts as the router."""
    mesh = mesh_auth.Mesh(settings or mesh_settings(), "router")
    security = mesh.to(service)
    interceptors = [_AsRouter(mesh.tenant_tokens(), service), *default_deadlines()]
    if security is None:
        return grpc.aio.insecure_channel(address, interceptors=interceptors)
    return grpc.aio.secure_channel(
        address,
        security.credentials,
        options=[*serving.CHANNEL_OPTIONS, *security.channel_options],
        interceptors=interceptors,
    )


async def chat_session_admitted(stream: grpc.aio.StreamStreamCall, timeout_s: float = 10.0) -> bool:
    """Whether the router admitted the ChatSession ``stream``, learnt as its
    clients should before their first write (services/router/servicer.py
    ADMITTED_METADATA): False for a stream refused at open, which must then
    not be written to; reading it raises the router's status. Within
    ``timeout_s``, since the router sends an admitted stream's initial
    metadata at once, before any turn."""
    initial = await asyncio.wait_for(stream.initial_metadata(), timeout_s)
    return set(ADMITTED_METADATA) <= set(initial)


async def held_back(release: asyncio.Event, message: bytes = b""):
    """A raw request stream (for a ``channel.stream_stream`` call of any
    method) whose one ``message`` is sent only once ``release`` is set: a
    caller that opened its call and holds its request back (never sends it,
    if ``release`` is never set)."""
    await release.wait()
    yield message


def rpc_outcomes(service: str, method: str) -> collections.Counter:
    """``service``'s finished calls of ``method`` ("RouterService/Chat") so
    far by status code, as the error interceptor recorded them in this
    process's RPC metrics (summed over their reasons)."""
    outcomes = collections.Counter()
    for family in metrics.REGISTRY.collect():
        if family.name == "meshgate_rpc_requests":
            for sample in family.samples:
                labels = sample.labels
                ours = (labels["service"], labels["method"]) == (service, method)
                if ours and sample.name.endswith("_total"):
                    outcomes[labels["code"]] += sample.value
    return outcomes
