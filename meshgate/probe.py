"""``meshgate-probe``: one gRPC health check of a meshgate service, as a
container health check or an exec probe runs it.

Shipped in the service image instead of the downloaded ``grpc_health_probe``
binary. It reads the service's own settings (``MESHGATE_CONFIG`` or
``--config``), so it dials the address the service listens on and, on an
internal service, speaks the mesh's mutual TLS with the service's own
certificate: health is open to every mesh identity (meshgate/mesh_auth.py),
and a probe that passes also shows the mounted certificate is one the mesh
accepts. Exit status 0 only for SERVING; 1 otherwise, with the reason on stderr.
"""

from __future__ import annotations

import argparse
import math
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate import mesh_auth, serving
from meshgate.config import Settings, load_settings

# Settings attribute that holds each service's listen address.
SERVICES = ("router", "context", "cache", "inference")


def probe_address(listen: str) -> str:
    """Where a probe inside the service's pod dials: a wildcard listen
    address (0.0.0.0, [::]) is reached on loopback."""
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def check(settings: Settings, service: str, timeout_s: float, address: str | None = None) -> str:
    """The service's health status name (SERVING, NOT_SERVING, ...)."""
    target = address or probe_address(getattr(settings, service).listen)
    security = None if service == mesh_auth.ROUTER else mesh_auth.Mesh(settings.mesh, service).to(service)
    if security is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, security.credentials, security.channel_options)
    with channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshgate-probe", description=__doc__.splitlines()[0])
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument("--config", help="TOML settings file (default: $MESHGATE_CONFIG)")
    parser.add_argument("--address", help="host:port to dial (default: from the service's listen setting)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default: 2)")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout!r}")
    if args.address is not None:
        # Checked as every dialled address is at load: grpc dials a port
        # past 65535 modulo 65536 (127.0.0.1:99999 probed port 34463, which
        # another process may answer SERVING) and one left out on 443.
        try:
            serving.channel_target(args.address)
        except ValueError as error:
            parser.error(f"--address: {error}")
    try:
        status = check(load_settings(args.config), args.service, args.timeout, args.address)
    except grpc.RpcError as error:
        print(f"{args.service}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - a probe reports any failure as unhealthy, never a traceback
        print(f"{args.service}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"{args.service}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
