"""A bare grpc.aio server on 127.0.0.1 answering one method of a probe
service, with the interceptors under test: for tests of what the services'
interceptor chain (telemetry, errors) does to a call, without a service."""

from __future__ import annotations

import contextlib

import grpc

SERVICE = "meshgate.test.v1.Probe"


@contextlib.asynccontextmanager
async def serving(name: str, handler: grpc.RpcMethodHandler, interceptors, options=()):
    """A channel (``options``) to a server answering /SERVICE/``name`` with ``handler``."""
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {name: handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            yield channel
    finally:
        await server.stop(1)
