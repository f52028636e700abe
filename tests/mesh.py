"""The mesh identities of the tests: one CA and a certificate per service,
made once per test session, and channels that act as one of the services.

Services under test get :func:`mesh_settings`; a test that calls the context,
cache or inference service directly does it as the router would, through
:func:`router_channel`.
"""

from __future__ import annotations

import atexit
import functools
import pathlib
import shutil
import tempfile

import grpc

from meshgate import mesh_auth, serving
from meshgate.config import MeshSettings
from meshgate.local import certs


@functools.cache
def certs_dir() -> pathlib.Path:
    directory = pathlib.Path(tempfile.mkdtemp(prefix="meshgate-test-mesh-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    certs.ensure(directory)
    return directory


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
    interceptors = [_AsRouter(mesh.tenant_tokens(), service)]
    if security is None:
        return grpc.aio.insecure_channel(address, interceptors=interceptors)
    return grpc.aio.secure_channel(
        address,
        security.credentials,
        options=[*serving.CHANNEL_OPTIONS, *security.channel_options],
        interceptors=interceptors,
    )
