"""How every service process starts, serves and stops.

A service supplies a name and an async factory that registers its servicers on
the server and returns a cleanup coroutine; :func:`run` does the rest: uvloop,
telemetry, interceptors, health checking, reflection, SIGTERM/SIGINT with a
graceful drain of in-flight calls, and for a service that registers reload
hooks, its settings file read again on SIGHUP or when it changes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections.abc
import contextlib
import functools
import hashlib
import ipaddress
import json
import os
import pathlib
import re
import signal
import socket
import time
import tomllib
import typing
import urllib.parse
import weakref

import grpc
import structlog
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from meshgate import mesh_auth, metrics, telemetry
from meshgate.config import (
    ConfigError,
    Settings,
    TelemetrySettings,
    check_listen,
    load_settings,
    settings_from_document,
    tcp_listen_address,
)
from meshgate.errors import ErrorInterceptor, MeshgateError, UnknownMethods
from meshgate.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

# Large enough that an oversized message reaches our own validation and gets
# a precise error instead of grpc's generic RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024

# HTTP/2 flow control: a fixed window on every connection and stream we
# receive on, instead of grpc-core's default of 64 KiB grown by BDP probes.
# Each probe is a PING and its acknowledgement, sent after reads: on a
# stream of small messages (a token delta each) they are thread wake-ups
# and syscalls per message, ~15% of the CPU per streamed token at 16
# streams in two mesh A/B pairs (bench/README.md, issue 13, "no BDP probes").
# grpc.http2.lookahead_bytes sets both the streams' initial window and the
# connection's target (chttp2 flow control: the connection's window is that
# target plus what its streams announced, topped up once half is used), so
# no 64 KiB connection window sits under the 1 MiB: about 1 MiB in flight
# per round trip for a connection's streams together (~1 GB/s at 1 ms of
# round trip), and a stream reading a larger message announces what that
# message needs (grpc does, probes or not). What is given up: a window that
# follows the link's bandwidth-delay product, which with the probes grows
# to max(4 MiB, 2 x BDP) when memory is plentiful and shrinks under memory
# pressure; this one stays at 1 MiB. Callers of the router's public port get
# the same window for their requests: plenty for chat-sized messages.
FLOW_CONTROL_OPTIONS = [
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 1024 * 1024),
]

# Keepalive: clients ping every KEEPALIVE_TIME_MS, also on idle connections,
# so a replica that vanished without closing its connections (a node lost, a
# partition) is noticed within KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS and
# taken out of rotation, instead of on the next call's deadline.
#
# What a grpc-core server calls a ping flood (chttp2 ping_abuse_policy): it
# counts every PING it receives, keepalive and BDP probe alike; one that comes
# sooner than min_recv_ping_interval_without_data after the previous one is a
# strike, unless the server has written headers, data or a window update
# since (that clears the strikes and the clock); with permit_without_calls
# off, that interval is two hours while no call is open. The strike after
# max_ping_strikes (default 2) gets GOAWAY ENHANCE_YOUR_CALM "too_many_pings"
# and the connection closed: the calls on it fail UNAVAILABLE.
# Our clients' keepalive pings come at least KEEPALIVE_TIME_MS apart (the
# timer restarts on every read and after each acknowledgement) and they send
# no BDP probes (FLOW_CONTROL_OPTIONS), so our servers
# accept pings at half that interval, idle or not: that leaves room for
# timers that fire late, and a caller of the router's public port that pings
# more often than every 10 s without data is still cut off at its third
# early ping.
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000

# grpc-core's name for GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS:
# no "recv" in it. grpc ignores an option it does not know without a word;
# "grpc.http2.min_recv_ping_interval_without_data_ms", set here before, left
# our servers on the default of 5 minutes, and they closed our own channels
# with too_many_pings after a minute or so of idling or of a silent call, or
# with the first request after it (tests/integration/test_keepalive.py).
MIN_RECV_PING_INTERVAL_ARG = "grpc.http2.min_ping_interval_without_data_ms"

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    (MIN_RECV_PING_INTERVAL_ARG, KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 2),
    # Clients re-resolve a DNS name only when a connection ends: closing each
    # connection after a few minutes (gracefully: calls under way finish;
    # grpc adds +-10% jitter) lets their channels find replicas added since,
    # after a scale-out or a rolling update.
    ("grpc.max_connection_age_ms", 300_000),
    # grpc sets SO_REUSEPORT by default: a second process could then bind our
    # port too and silently take half the connections (a plain-text server
    # answering TLS handshakes, in tests run side by side). Refuse instead.
    ("grpc.so_reuseport", 0),
    *FLOW_CONTROL_OPTIONS,
]

# gRPC waits up to two minutes between attempts to reach a peer that went
# away; a restarted Triton or service must be used as soon as it listens
# again, not seconds later (calls meanwhile fail fast with UNAVAILABLE).
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# What a retry may repeat: only UNAVAILABLE, and gRPC retries only a call
# whose response has not started (gRFC A6: a call is committed once its
# response headers arrive; a grpc server sends them with the first response
# message, so a unary call is retryable until its answer, a server stream
# until its first message; a Trailers-Only status commits nothing). A replica
# killed mid-call, or a call picked for it before the channel saw it go,
# then lands on another replica. Calls that never left the client are
# retried transparently by gRPC anyway (grpc.enable_retries, on below).
_RETRY_POLICY = {
    "maxAttempts": 3,
    "initialBackoff": "0.05s",
    "maxBackoff": "0.5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

# The methods a retry is safe for, by service, and why. Those left out write
# something a second attempt would write again or answer differently:
# AppendTurns is retried by the router itself with one turn id for every
# attempt (services/router/downstream.py), so a retry after a lost reply is
# answered, not applied twice, and gRPC retrying it too would multiply the
# attempts; DeleteSession, ForkSession (but with a request_id:
# RETRYABLE_WITH_REQUEST_ID), RevertSession, UnpinFromSession (the
# context's and the router's), Invalidate,
# ReportWrongHit, the router's ChatSession (a stream of turns) and the admin
# writes are not retried.
RETRYABLE_METHODS = {
    # Chat: the router streams before it writes; the turn is appended to its
    # session only after its answer has streamed, and the router sends the
    # call's headers before it appends (a one-piece answer held for the
    # completion has sent nothing yet), which commits the call: a Chat that
    # got no response wrote nothing to retry over. (A router that died
    # mid-turn leaves its admission reservation unsettled, retried or not:
    # its stream lease expires, its reserved tokens stay charged;
    # services/router/admission.py.)
    # CreateSession: a retry after a lost reply is answered with the session
    # the first attempt made: the router gives every create a request_id
    # (its caller's, or one it draws), from which the session's id is drawn.
    # (A direct caller of ContextService.CreateSession without one may get
    # a second, empty session, unused until context.session_ttl_s.)
    # PinToSession: a pin the session holds already is answered, not added
    # again (TurnIndex.pin). The rest only read.
    "meshgate.router.v1.RouterService": (
        "Chat",
        "CreateSession",
        "GetSession",
        "ListSessions",
        "PinToSession",
        "ListModels",
        "GetUsage",
    ),
    "meshgate.router.v1.AdminService": ("ListKeys",),
    # Reads; CreateSession and PinToSession as the router's; AssembleContext's
    # append hold is replaced by its resend's (the same hold id), and a
    # second ReleaseAppendHold finds nothing to release.
    "meshgate.context.v1.ContextService": (
        "CreateSession",
        "GetSession",
        "ListSessions",
        "PinToSession",
        "AssembleContext",
        "ReleaseAppendHold",
    ),
    # Store writes the same entry under the same key again.
    "meshgate.cache.v1.CacheService": ("Lookup", "Store", "GetStats"),
    # Generate writes nothing: a retry before its first token costs at most
    # a second prompt evaluation (the first one's Triton request is cancelled
    # with its call, or died with its replica).
    "meshgate.inference.v1.InferenceService": ("Generate", "Embed", "ListModels", "GetBackendHealth"),
    "grpc.health.v1.Health": ("Check",),
}

# The methods a retry is safe for only where the request carries a request_id
# (AIP-155): a resend of it is answered as its first send was, not done again.
# Not in the channels' retry policy, which is per method, whatever a request
# holds: those who may resend them ask is_retryable (the router's session
# calls, services/router/downstream.py).
RETRYABLE_WITH_REQUEST_ID = {
    # A second fork holding the tenant's bytes, unseen, without one.
    "meshgate.context.v1.ContextService": ("ForkSession",),
}


def is_retryable(service: str, method: str, request) -> bool:
    """Whether sending ``request`` to ``service``'s ``method`` again, its
    first send's outcome unknown, is safe (RETRYABLE_METHODS, and
    RETRYABLE_WITH_REQUEST_ID for a request carrying a request_id)."""
    if method in RETRYABLE_METHODS.get(service, ()):
        return True
    return method in RETRYABLE_WITH_REQUEST_ID.get(service, ()) and bool(request.request_id)


# round_robin: a target with several addresses (an address list, or a DNS
# name of a headless Service) spreads calls over every ready replica; a
# replica that goes away leaves the rotation at once and rejoins when it
# listens again. The default, pick_first, would send everything to one.
# retryThrottling stops retries while most calls fail (an outage, not a
# replica gone), so they never multiply the load on what is left: each
# failed call takes a token, each success gives back a tenth, and retries
# stop below half the tokens. 100 tokens: the calls a replica lost under
# load was carrying (up to about 50 on one channel) are still retried.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": service, "method": method} for method in methods],
            "retryPolicy": _RETRY_POLICY,
        }
        for service, methods in RETRYABLE_METHODS.items()
    ],
    "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
}

# What every channel of ours shares, whoever it calls.
_COMMON_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    # Ours, not whatever a DNS TXT record says.
    ("grpc.service_config_disable_resolution", 1),
    # A replica restarted elsewhere (a new pod address) is looked up again
    # this soon after a connection fails, not 30 s later.
    ("grpc.dns_min_time_between_resolutions_ms", 2_000),
    *RECONNECT_OPTIONS,
    *FLOW_CONTROL_OPTIONS,
]

# Toward our own servers (and the router's public port): they accept these
# pings (SERVER_OPTIONS).
CHANNEL_OPTIONS = [
    *_COMMON_CHANNEL_OPTIONS,
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
]

# Our own servers accept pings on idle connections (SERVER_OPTIONS), so mesh
# channels keep pinging while idle, without the default limit of two pings
# between two writes of the client's own. Not part of CHANNEL_OPTIONS: those
# also serve callers of the router's public port (meshgate chat, a client
# following docs/operations.md), who may reach it through an ingress or a load
# balancer whose ping policy is not ours.
_MESH_PEER_OPTIONS = [("grpc.http2.max_pings_without_data", 0)]

# Triton is not ours: tritonserver's gRPC endpoint enforces grpc-core's
# server defaults unless it is started with its --grpc-keepalive-* and
# --grpc-http2-* flags, which a deployment's Triton need not be: pings no
# closer than 5 minutes while a call is open, none on an idle connection.
# The mesh keepalive broke that: a channel to Triton pinged its idle
# connection every 20 s (strikes: none is allowed while idle), and the ping
# it then held back went out with the next request: the third strike, so
# Triton closed the connection with GOAWAY too_many_pings and that request
# failed UNAVAILABLE (ModelInfer is not retried; seen against a server with
# Triton's defaults, tests/integration/test_keepalive.py).
# Toward Triton, then: no ping on an idle connection, and while calls are
# open, one after 5 minutes without a read. That is no bound a caller would
# wait for: a Triton that stops answering with its connection up (stopped,
# wedged) leaves the rotation by the inference service's health probes, and
# the calls open on it are ended then, as UNAVAILABLE (retried on another
# server before any response; services/inference/backends.py, OpenCalls):
# a stuck call waits at most PROBES_TO_MARK_DOWN probes, each of the probe
# timeout plus inference.health_interval_s, 3 x (2 + 2) s by default (3 x
# (2 + 0.5) = 7.5 s in tests/integration/test_triton_failover.py), or its
# caller's deadline if shorter. The keepalive is left as the backstop.
# The inference service keeps ModelStreamInfer calls open and idle between
# requests (inference.triton_idle_streams): calls open, so the pings go on,
# every 5 minutes, within that policy; and grpc's default
# grpc.http2.max_pings_without_data (2) sends no more while nothing is
# written (an idle stream outlives 3.5 scaled keepalives: test_keepalive.py).
TRITON_MIN_RECV_PING_INTERVAL_MS = 300_000
TRITON_CHANNEL_OPTIONS = [
    *_COMMON_CHANNEL_OPTIONS,
    ("grpc.keepalive_time_ms", TRITON_MIN_RECV_PING_INTERVAL_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 0),
]


# grpc's name resolvers. A socket path (unix:, unix-abstract:) has no port and
# vsock's is no TCP port: they are passed on as they are. The others name a
# host and port each, which channel_target checks (_checked_host_port).
_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")
_PATH_SCHEMES = ("unix:", "unix-abstract:", "vsock:")


def channel_target(address: str) -> str:
    """A grpc target for an address setting: one ``host:port``, a
    comma-separated list of ``ip:port`` (each a replica: ``ipv4:`` or
    ``ipv6:`` is added), or a target with its own scheme, such as
    ``dns:///meshgate-context.ns.svc.cluster.local:50052`` (every address the
    name resolves to: a headless Service's pods), ``ipv4:ip:port,ip:port``,
    ``ipv6:[ip]:port,...`` or ``unix:path``.

    Every port dialled is checked, a ValueError naming what is wrong: grpc
    dials a port above 65535 modulo 65536 (127.0.0.1:99999 connected to
    34463), and an address without a port on 443 (``localhost`` dialled
    127.0.0.1:443), saying nothing either time."""
    address = address.strip()
    if address.startswith(_PATH_SCHEMES):
        # "unix:" alone loaded, and every call failed UNAVAILABLE.
        if not address.partition(":")[2].strip("/ "):
            raise ValueError(f"{address!r} names no socket path")
        return address
    if address.startswith("dns:"):
        # dns:[//authority/]host:port; the authority is the DNS server asked.
        name = address.removeprefix("dns:")
        if name.startswith("//"):
            name = name[2:].partition("/")[2]
        _checked_host_port(name, address)
        return address
    if address.startswith(("ipv4:", "ipv6:")):
        scheme, _, listed = address.partition(":")
        for entry in listed.split(","):
            _checked_host_port(entry, address, ip_version=4 if scheme == "ipv4" else 6)
        return address
    if "," not in address:
        _checked_host_port(address, address)
        return address
    entries = [entry.strip() for entry in address.split(",")]
    if all(entry.startswith("[") for entry in entries):
        for entry in entries:
            _checked_host_port(entry, address, ip_version=6)
        return "ipv6:" + ",".join(entries)
    for entry in entries:
        host, _, port = entry.rpartition(":")
        if not (port.isdigit() and re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", host)):
            raise ValueError(
                f"address list {address!r}: {entry!r} is not ip:port; for a name with "
                "several addresses use dns:///name:port"
            )
        _checked_host_port(entry, address, ip_version=4)
    return "ipv4:" + ",".join(entries)


def _checked_host_port(entry: str, address: str, ip_version: int | None = None) -> None:
    """Raises a ValueError unless ``entry`` (one of ``address``'s hosts) is
    ``host:port`` with a port from 1 to 65535 (0 is no port to dial) and a
    host grpc reads as written: a name or IPv4 address, or an IPv6 one in
    brackets (unbracketed, ``::1:50052`` is ::1:50052 on port 443); with
    ``ip_version``, an IP address of that version (what ipv4: and ipv6:
    targets take)."""
    where = f"{entry!r}" if entry == address else f"{entry!r} in {address!r}"
    host, colon, port = entry.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if not colon or entry.endswith("]"):
        raise ValueError(f"{where} names no port (host:port; without one grpc dials 443)")
    if ":" in host and not bracketed:
        raise ValueError(
            f"{where} is not host:port: write no scheme such as http://, and an IPv6 host in brackets "
            "([::1]:50052)"
        )
    # ASCII digits: str.isdigit takes "٥٠" and "²", which grpc does not.
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"{where} is not host:port: its port {port!r} is not a number")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port} is not 1-65535 in {where}")
    if not host:
        raise ValueError(f"{where} names no host")
    try:
        if bracketed:
            # A zone is allowed: [fe80::1%eth0]:50052.
            ipaddress.IPv6Address(host[1:-1].partition("%")[0])
            if ip_version == 4:
                raise ValueError
        elif ip_version == 4:
            ipaddress.IPv4Address(host)
        elif ip_version == 6 or any(mark.isspace() or mark in "[]/@?#" for mark in host):
            raise ValueError
    except ValueError:
        kind = {4: "an IPv4 address", 6: "an IPv6 address in brackets"}.get(
            ip_version, "a host name or address (an IPv6 one in brackets)"
        )
        raise ValueError(f"{where} is not host:port with {kind} for its host") from None


Cleanup = collections.abc.Callable[[], collections.abc.Awaitable[None]]
# Takes settings read again from the file; must not fail (they are checked).
ReloadHook = collections.abc.Callable[[Settings], None]
Drain = collections.abc.Callable[[float], collections.abc.Awaitable[None]]
# How often a watched settings file is checked for a change.
CONFIG_POLL_S = 1.0


async def _nothing() -> None:
    pass


def client_channel(
    address: str, security: mesh_auth.ChannelSecurity | None = None, traced: bool = True
) -> grpc.aio.Channel:
    """A traced, balanced channel to a meshgate service at ``address`` (see
    :func:`channel_target`): over mutual TLS with the ``security`` of
    :meth:`meshgate.mesh_auth.Mesh.to` (its identity is checked by name, so
    any replica's address will do), with the certificate files as they are
    at each call (:class:`MeshChannel`), else in plain text (a mesh whose TLS
    is off). For Triton, :func:`triton_channel`. Untraced (``traced=False``)
    for streams whose caller makes the client span per call itself
    (telemetry.start_grpc_client_span): the interceptor would wrap every
    streamed message in two more async generators."""
    target = channel_target(address)
    interceptors = telemetry.client_interceptors() if traced else None
    if security is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=interceptors)
    options = [*CHANNEL_OPTIONS, *_MESH_PEER_OPTIONS, *security.channel_options]

    def secure_channel(credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)

    return MeshChannel(security.files, secure_channel)


# How long a channel replaced by MeshChannel may finish the calls it carries
# before they are cancelled: longer than any call of the mesh lasts (a
# generation's is bounded by router.max_generation_s, 300 s by default). It
# is closed as soon as its last call ends.
REPLACED_CHANNEL_GRACE_S = 3600.0


class MeshChannel(grpc.aio.Channel):
    """A channel to a mesh service that presents the certificate files as
    they are now, not as they were when it was made.

    grpc's channels take their credentials once: every connection a channel
    made, reconnections included, presented the client certificate and
    trusted the CA of the service's start, so after a renewal the service
    kept presenting the old certificate until restarted, and once that
    expired (or the peers' CA file moved to a new CA) each new connection's
    handshake failed, and with it every call to that peer once its open
    connections ended (a restart of the peer, grpc.max_connection_age_ms).

    Each call here first asks the files for their latest reading
    (mesh_auth.CertificateFiles.latest: a clock read; three stats once a
    second per process). After a change, the next calls go to a new channel
    made with the new files, and the one replaced is closed once the calls
    it carries have ended (REPLACED_CHANNEL_GRACE_S at most): its
    connections are good until then. Stubs made on this channel follow it
    (_FollowingMethod).

    The calls a replaced channel waits for are those made on it here
    (``_calls``: a weak set, ~0.5 us a call), not grpc's close(grace): once
    begun, that close cannot be cut short, nor begun again (the channel is
    "closed" from its first step), so close() found the replaced channels
    closed already and left their calls open, a stream for up to the
    whole grace."""

    def __init__(
        self,
        files: mesh_auth.CertificateFiles,
        make: collections.abc.Callable[[grpc.ChannelCredentials], grpc.aio.Channel],
    ) -> None:
        self._files = files
        self._make = make
        self._certificates = files.current
        self._channel = make(self._certificates.channel_credentials())
        # The calls made on self._channel, while anything else holds them.
        self._calls: weakref.WeakSet = weakref.WeakSet()
        # The replaced channels waiting for their calls to end (_retire).
        self._retiring: dict[asyncio.Task, grpc.aio.Channel] = {}
        # Once closed, calls fail on the closed channel, as on any closed
        # channel: none is made again after the service's cleanup.
        self._closed = False

    def current(self) -> grpc.aio.Channel:
        """The channel of the files' latest reading."""
        certificates = self._files.latest()
        if certificates is not self._certificates and not self._closed:
            replaced, calls = self._channel, self._calls
            self._certificates = certificates
            self._channel = self._make(certificates.channel_credentials())
            self._calls = weakref.WeakSet()
            retiring = asyncio.get_running_loop().create_task(_retire(replaced, calls))
            self._retiring[retiring] = replaced
            retiring.add_done_callback(self._retired)
        return self._channel

    def _retired(self, retiring: asyncio.Task) -> None:
        self._retiring.pop(retiring, None)
        if not retiring.cancelled() and retiring.exception() is not None:
            log.warning("a replaced mesh channel failed to close", error=repr(retiring.exception()))

    async def close(self, grace: float | None = None) -> None:
        """Closes this channel and those it replaced that still carry calls,
        all with ``grace``."""
        self._closed = True
        replaced = list(self._retiring.values())
        for retiring in list(self._retiring):
            # Not yet closed (_retire closes only once the calls ended).
            retiring.cancel()
        await asyncio.gather(*(channel.close(grace) for channel in (*replaced, self._channel)))

    async def __aenter__(self) -> MeshChannel:
        return self

    async def __aexit__(self, exc_type, exc_val, exc_tb) -> None:
        await self.close(None)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.current().wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current().channel_ready()

    def unary_unary(self, *args, **kwargs):
        return _FollowingMethod(self, "unary_unary", args, kwargs)

    def unary_stream(self, *args, **kwargs):
        return _FollowingMethod(self, "unary_stream", args, kwargs)

    def stream_unary(self, *args, **kwargs):
        return _FollowingMethod(self, "stream_unary", args, kwargs)

    def stream_stream(self, *args, **kwargs):
        return _FollowingMethod(self, "stream_stream", args, kwargs)


async def _retire(channel: grpc.aio.Channel, calls: weakref.WeakSet) -> None:
    """Closes a channel MeshChannel replaced once ``calls``, those made on
    it, have ended (REPLACED_CHANNEL_GRACE_S at most; then they are
    cancelled). Cancelled (MeshChannel.close), it leaves the channel open
    for that close to close with its own grace."""
    ends = [asyncio.ensure_future(_ended(call)) for call in list(calls) if not call.done()]
    if ends:
        try:
            await asyncio.wait(ends, timeout=REPLACED_CHANNEL_GRACE_S)
        finally:
            for end in ends:
                end.cancel()
    # No grace: nothing to wait for, and no step a cancel could cut.
    await channel.close(None)


async def _ended(call: grpc.aio.Call) -> None:
    # A call's failure is its caller's to hear; here only its end counts.
    with contextlib.suppress(Exception):
        await call.code()


class _FollowingMethod:
    """A stub's method on a MeshChannel: each call goes on the channel in
    use, the method made again there after the channel was replaced."""

    __slots__ = ("_arguments", "_channel", "_kind", "_method", "_on")

    def __init__(self, channel: MeshChannel, kind: str, args: tuple, kwargs: dict) -> None:
        self._channel = channel
        self._kind = kind
        self._arguments = (args, kwargs)
        self._on: grpc.aio.Channel | None = None
        self._method = None

    def __call__(self, *args, **kwargs):
        channel = self._channel.current()
        if channel is not self._on:
            made_with, named = self._arguments
            self._method = getattr(channel, self._kind)(*made_with, **named)
            self._on = channel
        call = self._method(*args, **kwargs)
        # Filed with the channel it went on, which current() just gave.
        self._channel._calls.add(call)
        return call


def triton_channel(address: str, traced: bool = True) -> grpc.aio.Channel:
    """A plain-text, balanced channel to Triton at ``address`` that pings no
    more often than tritonserver's defaults allow (TRITON_CHANNEL_OPTIONS);
    ``traced`` as for :func:`client_channel`."""
    interceptors = telemetry.client_interceptors() if traced else None
    return grpc.aio.insecure_channel(
        channel_target(address), options=TRITON_CHANNEL_OPTIONS, interceptors=interceptors
    )


# The health service name that answers SERVING for as long as the process
# serves, ready or not, draining or not: for a liveness probe (deploy/k8s).
# The other names say whether the service is ready: the inference service's
# are NOT_SERVING while no Triton server is ready, and a liveness probe that
# read them restarted every replica of it during a Triton outage (and at
# its first start, Triton loading its models), which serves nothing sooner.
LIVENESS_SERVICE = "liveness"


class Service:
    """One running gRPC server with health and reflection."""

    def __init__(self, name: str, service_names: collections.abc.Iterable[str]) -> None:
        self.name = name
        self.service_names = list(service_names)
        # Inside the error interceptor, so that its refusals carry ErrorInfo.
        self.guard = mesh_auth.MeshGuard()
        observe = metrics.RpcObserver(name)
        self.errors = ErrorInterceptor(observe)
        self.server_credentials: grpc.ServerCredentials | None = None
        # No maximum_concurrent_rpcs: its refusal carries no ErrorInfo; the
        # error interceptor bounds the calls instead (bound_calls).
        self.server = grpc.aio.server(
            interceptors=[UnknownMethods(observe), *telemetry.server_interceptors(), self.errors, self.guard],
            options=SERVER_OPTIONS,
        )
        self.cleanup: Cleanup = _nothing
        # What else of the service drains with the gRPC server (the router's
        # HTTP edge and ChatSession streams, the context service's
        # summaries), each given the same grace.
        self.drains: list[Drain] = []
        # A service whose readiness depends on others reports it itself,
        # and must stop doing so once the service drains.
        self.serving_when_started = True
        self.draining = False
        # When (time.monotonic()) the stop's grace ends, once stop() began:
        # the cleanup's writes that Redis refuses (the router's usage) are
        # tried again until then. None: no stop began (a failed start's
        # cleanup), or none bounded.
        self.stop_deadline: float | None = None
        # The settings file the service was started from, and what takes its
        # settings when it is read again (a service without hooks never is).
        self.config_path: str | None = None
        self.reload_hooks: list[ReloadHook] = []
        # The settings the hooks last took whole (main's at start, then each
        # reload's): given back to them when a reload fails half-way.
        self.settings_in_use: Settings | None = None
        # The settings file's state (_file_state) when it was last read, by
        # main before the start or by a reload: the file watch reloads once
        # the file differs from it. Taken before main's read, not when the
        # watch begins (after the start): an edit made while the start was
        # under way went unapplied until the next edit.
        self.config_state: tuple[int, int] | None = None
        # The digest of the settings file's content a reload last refused
        # (None once one is taken): the file watch and a SIGHUP for the same
        # edit read the same file, and its refusal is logged once.
        self.refused_config_digest: bytes | None = None
        # The Prometheus endpoint, when one is open (serve_metrics).
        self.metrics_server = None
        # The plain-text health port, when one is open (serve_plain_health).
        self.health_server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )

    def restrict_to_mesh(
        self,
        mesh: mesh_auth.Mesh,
        callers: collections.abc.Iterable[str],
        tenant_of: collections.abc.Mapping[str, mesh_auth.TenantField] | None = None,
    ) -> None:
        """Serves over mutual TLS to ``callers`` only; with ``tenant_of`` (each
        method's tenant field), only for the tenant the router asserted. Does
        nothing with ``mesh.tls`` off."""
        if not mesh.tls:
            return
        self.server_credentials = mesh.server_credentials()
        verifier = mesh.tenant_verifier() if tenant_of is not None else None
        self.guard.restrict(self.name, callers, verifier, tenant_of)

    def bound_calls(self, max_calls: int, uncounted_services: tuple[str, ...] = ()) -> None:
        """Refuses calls past ``max_calls`` in flight with RESOURCE_EXHAUSTED
        / SERVICE_BUSY (``<service>.max_concurrent_rpcs``; 0: no bound);
        the calls of ``uncounted_services`` (full names) are never counted."""
        self.errors.bound(self.name, max_calls, uncounted_services)

    def bind(self, address: str) -> int:
        if self.server_credentials is None:
            return _add_port(self.name, address, self.server.add_insecure_port)
        return _add_port(
            self.name, address, lambda at: self.server.add_secure_port(at, self.server_credentials)
        )

    def serve_metrics(self, address: str) -> int:
        """Opens the process's Prometheus endpoint; returns its port."""
        try:
            self.metrics_server, port = metrics.serve(address)
        except OSError as error:
            raise listen_refusal(f"{self.name} (metrics)", address, error) from None
        log.info("metrics", address=address, port=port)
        return port

    def serve_plain_health(self, address: str) -> int:
        """Opens a second port serving grpc.health.v1 alone, in plain text,
        with the main port's statuses (one servicer): for probes that speak no
        TLS, such as Kubernetes' gRPC probe, when the main port speaks only
        mutual TLS. It tells a status and serves nothing else. Returns its port."""
        self.health_server = grpc.aio.server(options=SERVER_OPTIONS)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        port = _add_port(f"{self.name} (health checks)", address, self.health_server.add_insecure_port)
        log.info("health", address=address, port=port)
        return port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)


def _add_port(name: str, address: str, add: collections.abc.Callable[[str], int]) -> int:
    """Has a grpc server listen on ``address`` (``add``: its add_*_port);
    returns the port, or raises OSError saying why not.

    grpc's own refusal is a RuntimeError that names no reason ("Failed to
    bind", whether the port is in use, the host is not this one's, or the
    TLS credentials are unusable), its cause on a separate line of plain
    text: a service started on a port in use ended with a traceback.
    The address is tried first here, so that the common reasons are said
    in the one line a failed start writes (_refuse_start)."""
    try:
        # The settings were checked at load; --listen and callers in code were not.
        check_listen(name, address)
    except ConfigError as error:
        raise OSError(str(error)) from None
    _refuse_live_unix_socket(name, address)
    _refuse_unbindable_address(name, address)
    try:
        port = add(address)
    except RuntimeError as error:  # grpc's "Failed to bind to address ..."
        raise OSError(f"{name}: cannot listen on {address} ({error})") from None
    if port == 0:  # older grpcio says so instead of raising
        raise OSError(f"{name}: cannot listen on {address}")
    return port


def _refuse_unbindable_address(name: str, address: str) -> None:
    """Raises OSError if ``host:port`` does not resolve, or none of its
    addresses can be bound (in use by another process, or not this host's).

    As grpc-core binds: every address the host resolves to, with
    SO_REUSEADDR; one that binds is enough. Nothing is held: grpc binds
    the address itself right after (a process taking it meanwhile is
    refused by grpc, and reported by _add_port)."""
    if address.startswith(("unix:", "unix-abstract:", "vsock:")):
        return
    host, port = tcp_listen_address(address)  # "[::]:50051" is ("::", 50051)
    if port == 0:
        # Any free port: none is in use. A host that is not this one's is
        # still refused, by grpc (_add_port), in fewer words.
        return
    try:
        resolved = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, ValueError) as error:
        raise OSError(f"{name}: cannot listen on {address}: {error}") from None
    refusal = None
    for family, kind, protocol, _, socket_address in resolved:
        try:
            probe = socket.socket(family, kind, protocol)
        except OSError:
            # A family the kernel lacks ("[::]" with IPv6 disabled, which
            # grpc serves on IPv4): not this check's to refuse.
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(socket_address)
            except OSError as error:
                refusal = refusal or error
                continue
        return
    if refusal is not None:
        raise listen_refusal(name, address, refusal)


def listen_refusal(name: str, address: str, error: OSError) -> OSError:
    """The OSError a start ends with where ``name`` cannot listen on
    ``address``, in the one line _refuse_start writes. The bind's own error
    names neither ("[Errno 98] Address already in use"): with a process's
    several ports (gRPC, health, metrics, HTTP), an operator could not tell
    which one another process holds. Said by its errno alone: the
    HTTP port's (socket.create_server) repeats the address in other words."""
    # A name that does not resolve (getaddrinfo's negative errno) says so
    # in its own words ("Name or service not known"), not "Unknown error -2".
    why = os.strerror(error.errno) if error.errno and error.errno > 0 else (error.strerror or str(error))
    return OSError(f"{name}: cannot listen on {address}: {why}")


def _refuse_live_unix_socket(name: str, address: str) -> None:
    """Raises OSError if ``address`` is a unix socket another process serves.

    grpc-core unlinks the file at a ``unix:`` address before it binds: a
    second replica started on a live one's path would take it over
    silently, and the first would go on serving nobody. (TCP ports are
    guarded by ``grpc.so_reuseport`` 0 in SERVER_OPTIONS.) A file nobody
    accepts on is a dead process's socket, and is taken over."""
    if not address.startswith("unix:"):
        return
    path = address.removeprefix("unix:")
    if path.startswith("//"):  # unix:///absolute/path
        path = path[2:]
    path = urllib.parse.unquote(path)  # as grpc reads it: a%20b.sock is "a b.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return  # no such file, or a dead process's socket
        except BlockingIOError:
            pass  # a live server whose accept queue is full (EAGAIN)
        except OSError:
            return  # not a socket, or not this user's to probe: grpc's own bind decides
    raise OSError(f"{name}: cannot listen on {address}: another process is serving on it")


def parse_args(name: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"meshgate-{name}", description=f"meshgate {name} service")
    parser.add_argument("--config", help="TOML settings file (default: $MESHGATE_CONFIG)")
    parser.add_argument("--listen", help="host:port to serve on (overrides the settings)")
    return parser.parse_args(argv)


async def start(service: Service, listen: str, cleanup: Cleanup) -> int:
    """Starts serving; returns the bound port (useful with port 0 in tests)."""
    port = service.bind(listen)
    # grpc's health servicer starts out saying SERVING for the whole server;
    # a service that is not ready yet must not look ready for a moment.
    await service.set_serving(service.serving_when_started)
    await service.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await service.server.start()
    if service.health_server is not None:
        await service.health_server.start()
    service.cleanup = cleanup
    log.info("serving", address=listen, port=port)
    return port


class StopFailed(Exception):
    """Some of a service's stop steps failed (each is logged); all of them ran."""


StepRun = collections.abc.Callable[[], collections.abc.Awaitable[None] | None]
Step = tuple[str, StepRun | None]


class _Steps:
    """Runs the named steps of a stop (``kind``), each though one before it
    failed: a failure is logged once, with its traceback, and :meth:`finish`
    then raises StopFailed naming the failed steps. A StopFailed from a step
    (a cleanup of steps, :func:`cleanup_steps`) was logged step by step
    already: its line names them, without the traceback again.

    A cancellation (a test's timeout, a stop task cancelled) interrupts the
    step it comes in, and only that one: it skipped every step after it, the
    Redis client, the channels and the metrics endpoint left open. The rest
    run, then :meth:`finish` raises it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.failed: list[str] = []
        self.cancelled = False

    async def run(self, name: str, run: StepRun) -> None:
        try:
            outcome = run()
            if outcome is not None:
                await outcome
        except asyncio.CancelledError:
            log.warning(f"{self.kind} step cancelled", step=name)
            self.cancelled = True
        except StopFailed as failure:
            log.error(f"{self.kind} step failed", step=name, error=str(failure))
            self.failed.append(name)
        except Exception:  # noqa: BLE001 - logged here, reported as StopFailed once every step ran
            log.exception(f"{self.kind} step failed", step=name)
            self.failed.append(name)

    def finish(self, what: str) -> None:
        if self.cancelled:
            # Ahead of StopFailed: it was asked for; failures are logged.
            raise asyncio.CancelledError
        if self.failed:
            raise StopFailed(f"{what}: {', '.join(self.failed)}")


def cleanup_steps(*steps: Step) -> Cleanup:
    """A service's cleanup as named steps, in order, each run though one
    before it raised (each failure logged with its step's name), then
    StopFailed naming the failed ones. A cleanup written as one coroutine
    skipped everything after a step that raised: the router's
    settlements and usage records still in flight (admission's drain) were
    lost to a failing close of a channel before it. A step of None (a part
    the service runs without) is skipped. A cancellation ends the step it
    comes in, and is raised once the rest ran (_Steps)."""

    async def cleanup() -> None:
        ran = _Steps("cleanup")
        for name, run in steps:
            if run is not None:
                await ran.run(name, run)
        ran.finish("cleanup steps failed")

    return cleanup


async def stop(service: Service, grace_s: float = 10.0) -> None:
    """Drains the service and releases what it holds, in order. Every step
    runs though one before it failed: a cleanup that raised skipped the
    metrics endpoint's shutdown, a drain that raised the cleanup. Each
    failure is logged; then StopFailed says there was one (:func:`main`
    exits STOP_FAILED on it). A cancellation ends the step it comes in, and
    is raised once the rest ran (_Steps)."""
    steps = _Steps("stop")
    # Tell balancers first, then let in-flight calls (streams included) finish.
    service.draining = True
    service.stop_deadline = time.monotonic() + grace_s
    await steps.run("not serving", lambda: service.set_serving(False))
    log.info("draining", grace_s=grace_s)
    # At once: a stream on another server gets the whole grace too, not
    # what is left once the gRPC calls are done.
    try:
        await asyncio.gather(
            steps.run("grpc server", lambda: service.server.stop(grace_s)),
            *(steps.run("drain", functools.partial(drain, grace_s)) for drain in service.drains),
        )
    except asyncio.CancelledError:
        # Cancelled, gather cancels each step (they note it, and end) and
        # then raises it again: the rest still run.
        steps.cancelled = True
    if service.health_server is not None:
        # After the drain: until then probes see NOT_SERVING, not a refused port.
        await steps.run("health server", lambda: service.health_server.stop(None))
    await steps.run("cleanup", service.cleanup)
    if service.metrics_server is not None:
        # Last, so a final scrape still sees the drained calls.
        await steps.run("metrics server", lambda: _close_metrics(service.metrics_server))
    log.info("stopped")
    steps.finish(f"{service.name}: stop steps failed")


async def _close_metrics(server) -> None:
    server.shutdown()
    server.server_close()


def reload_configuration(service: Service) -> bool:
    """Reads the settings file again and hands it to the reload hooks; a file
    that does not load (bad TOML, a refused value) is refused with a log
    line, and the settings in use stay, whole. The same content is refused
    once: the file watch and a SIGHUP for one edit both come here, and the
    second says only that it is unchanged. Not so a refusal by a hook,
    which may come of a file the settings name (a tokenizer): a SIGHUP
    tries the same content again.

    settings_from_document checks what the hooks take, but a hook that raises anyway
    must not leave a half-applied reload behind (a router's new call cap in
    force, its new keys not), nor end the file watcher: the hooks it reached
    are given the settings in use again, whole."""
    if not (service.config_path and service.reload_hooks):
        log.info("nothing to reload", path=service.config_path)
        return False
    # Read before the file is loaded: a change made in between differs from
    # them, so the watcher's next look reloads (and judges) that change too.
    service.config_state = _file_state(service.config_path)
    # Read once: the digest, the emptiness check and the settings are all of
    # these bytes. Read three times, a rewrite between the reads (a
    # truncation, then the writes) had the empty file loaded and the full
    # one judged not empty (the defaults applied), or a good edit's digest
    # noted as refused for an empty read (never applied).
    try:
        content = pathlib.Path(service.config_path).read_bytes()
    except OSError as error:
        log.error("configuration refused; keeping the one in use", path=service.config_path, error=str(error))
        return False
    digest = hashlib.sha256(content).digest()
    if digest == service.refused_config_digest:
        log.info(
            "configuration unchanged since it was refused; keeping the one in use", path=service.config_path
        )
        return False
    try:
        document = tomllib.loads(content.decode())
        sets_anything = _holds_a_value(document)  # before the environment's overrides go into it
        settings = settings_from_document(document)
        if settings != service.settings_in_use and not sets_anything:
            # Every setting at its default: no tenant, no key, no limit, no
            # model route of the file, and the dev tenant on with the public
            # key. A bug hunt: a file emptied by a redirection whose command
            # failed (`envsubst < missing > meshgate.toml`) was reloaded so
            # within a second; every tenant's key was refused and
            # mg-dev-local-key admitted. Defaults are a restart's to take.
            raise ConfigError(
                "the settings file holds no settings; restart the service to run on the defaults"
            )
        in_use = service.settings_in_use
        if (
            in_use is not None
            and not in_use.router.dev_tenant
            and settings.router.dev_tenant
            and document.get("router", {}).get("dev_tenant") is not True
        ):
            # The dev tenant is on by default only where no tenant and no
            # admin credential is named (RouterSettings): a review cut the
            # file before its [[router.tenants]] (a generator failing
            # partway) and reloaded it, which refused every tenant's key
            # and admitted the public mg-dev-local-key, with every model and
            # no limit. Only a file that says so turns it on in a reload.
            raise ConfigError(
                "the settings name no tenant and no admin credential, which would turn the dev tenant "
                "on with its public key; set router.dev_tenant = true to mean it, or restart"
            )
    except Exception as error:  # noqa: BLE001 - whatever is wrong with the file, the service stays up
        service.refused_config_digest = digest
        log.error("configuration refused; keeping the one in use", path=service.config_path, error=str(error))
        return False
    reached = []
    try:
        for hook in service.reload_hooks:
            reached.append(hook)
            hook(settings)
    except Exception as error:  # noqa: BLE001 - the service stays up on the settings in use
        # Not noted as refused for its content: a hook may refuse for files
        # the settings name (a context service's tokenizer or chat template
        # not there yet), and a SIGHUP once they are must read them again (a
        # review: the file put in place and a SIGHUP sent, the alias stayed
        # refused until the settings file itself was edited).
        service.refused_config_digest = None
        log.error(
            "configuration refused by the service; keeping the one in use",
            path=service.config_path,
            error=repr(error),
        )
        if service.settings_in_use is None:
            log.error("no settings in use to go back to: the reload may be half-applied")
            return False
        try:
            for hook in reached:
                hook(service.settings_in_use)
        except Exception as again:  # noqa: BLE001 - nothing better to go back to; the watcher lives on
            log.error(
                "the settings in use could not be put back: the reload is half-applied", error=repr(again)
            )
        return False
    service.settings_in_use = settings
    service.refused_config_digest = None
    log.info("configuration reloaded", path=service.config_path)
    return True


def _holds_a_value(table: dict) -> bool:
    """Whether a settings document sets anything: a file empty, blank,
    comments alone or table headers alone (``[router]``, as a generator
    that failed partway may leave) sets nothing, and loads as every default."""
    return any(not isinstance(value, dict) or _holds_a_value(value) for value in table.values())


def _file_state(path: str) -> tuple[int, ...] | None:
    """What tells the file changed: its mtime and size, and its inode and
    ctime, which a replacement keeping the old mtime and size changes
    (`cp -p`, `rsync -t`, `tar x`, an os.replace of a copy: missed by mtime
    and size alone, a review found), and a chmod too."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size


# Looks in a row at a settings file changed on each before the watch
# reloads it unsettled (watch_configuration).
UNSETTLED_LOOKS = 5


async def watch_configuration(
    service: Service,
    poll_s: float = CONFIG_POLL_S,
    sleep: collections.abc.Callable[[float], collections.abc.Awaitable[object]] = asyncio.sleep,
) -> None:
    """Reloads whenever the settings file changes from how it was last read
    (Service.config_state; polled: one stat a second, and no dependency, on
    every platform and file system), once the change has settled: the
    file's state (_file_state) the same on two looks in a row, so a change is
    applied 1-2 s after it. A file caught while an editor or `cat >`
    rewrote it in place could parse (cut before its `[[router.tenants]]`)
    and was applied: for up to a second, tenants vanished. (A SIGHUP
    reloads at once: whoever sends it has finished writing.) A file that
    never settles (rewritten every second by a loop) is reloaded anyway
    after UNSETTLED_LOOKS looks, rather than never."""
    last_look = service.config_state
    unsettled = 0  # looks in a row that found it changed again
    while True:
        await sleep(poll_s)
        current = _file_state(service.config_path)
        changed = current is not None and current != service.config_state
        unsettled = unsettled + 1 if changed and current != last_look else 0
        if changed and (current == last_look or unsettled >= UNSETTLED_LOOKS):
            reload_configuration(service)
            unsettled = 0
        last_look = current


class EarlySignals:
    """Signals that come while a service starts, before
    :func:`serve_until_signalled` handles them. A SIGHUP is noted: its
    default action kills the process, and a start may wait seconds on a
    Redis or a Triton slow to answer (a fleet-wide "HUP to reload" then
    killed the services starting). A SIGTERM ends the start at once, with
    the exit status its default action gives (nothing serves yet, so there
    is nothing to drain): as a container's entry point (PID 1) a service
    ignored it, having no handler yet, and a pod deleted while it waited on
    its Redis was killed only when its whole grace period had passed.
    A SIGINT, which stops a serving service as SIGTERM does, ends a start
    the same way: left to Python's own handler, asyncio cancelled the
    setup and the process died of KeyboardInterrupt, with two tracebacks
    of plain text in a log of JSON lines (a `kill -INT` of a local stack's
    router a second after its restart).
    Made first thing in :func:`main`; its constructor takes the signals."""

    def __init__(self) -> None:
        self.hangup_came = False
        signal.signal(signal.SIGHUP, self._note_hangup)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._end_start)

    def _note_hangup(self, signum: int, frame) -> None:
        self.hangup_came = True

    def _end_start(self, signum: int, frame) -> None:
        log.warning(f"{signal.Signals(signum).name} during the start: exiting without serving")
        raise SystemExit(128 + signum)


async def serve_until_signalled(service: Service, early: EarlySignals | None = None) -> None:
    """Serves a started service until SIGTERM or SIGINT, then drains it. A
    SIGHUP that ``early`` noted during the start is the reload it asked
    for, done now: the file may have changed since it was read."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    # Always handled: a fleet-wide "HUP to reload" must not kill, undrained,
    # the services that have nothing to reload (its default action).
    loop.add_signal_handler(signal.SIGHUP, reload_configuration, service)
    # Read once the loop's handler has taken the signal: a SIGHUP is either
    # noted before this or handled after it, never lost between.
    if early is not None and early.hangup_came:
        log.info("SIGHUP came during the start; handling it now")
        reload_configuration(service)
    watcher = None
    if service.config_path and service.reload_hooks:
        watcher = asyncio.create_task(watch_configuration(service))
    try:
        await stopping.wait()
    finally:
        if watcher is not None:
            await cancel_and_wait(watcher)
        await stop(service)


# What stops a start that its own message says in full: the settings (a
# ConfigError, a TOML or URL that does not parse: ValueError), a port or a
# file (OSError), a store or model the service needs not answering
# (MeshgateError). Anything else is a bug, and keeps its traceback.
_START_REFUSALS = (ValueError, OSError, MeshgateError)

# The exit status of a service that could not start.
START_FAILED = 1
# The exit status of a service some of whose stop steps failed (stop):
# its supervisor sees that the stop was not clean.
STOP_FAILED = 1


def _refuse_start(error: Exception) -> typing.NoReturn:
    """Ends a start that failed: one JSON log line, as every other line the
    service writes (a log pipeline parses it; a traceback on stderr was many
    lines of plain text), and exit status START_FAILED."""
    if isinstance(error, _START_REFUSALS):
        log.critical("cannot start", error=str(error), error_type=type(error).__name__)
    else:
        log.critical("cannot start", exc_info=error)
    raise SystemExit(START_FAILED)


def main(
    name: str,
    service_names: collections.abc.Iterable[str],
    listen_of: collections.abc.Callable[[Settings], str],
    setup: collections.abc.Callable[[Service, Settings], collections.abc.Awaitable[Cleanup]],
    argv: list[str] | None = None,
) -> None:
    """Entry point shared by every service's ``__main__``."""
    # Before anything slow: the settings, telemetry, the service's setup.
    early = EarlySignals()
    args = parse_args(name, argv)
    config_path = args.config or os.environ.get("MESHGATE_CONFIG")
    # Before the read, as a reload's (reload_configuration).
    config_state = _file_state(config_path) if config_path else None
    try:
        settings = load_settings(config_path)
    except Exception as error:  # noqa: BLE001 - reported as every failed start is
        # Logging as the default settings have it: there are no others.
        telemetry.setup(f"meshgate-{name}", TelemetrySettings()).shutdown()
        _refuse_start(error)
    provider = telemetry.setup(f"meshgate-{name}", settings.telemetry)
    # Before any service code asks for its metrics: off, they count nothing.
    metrics.configure(settings.telemetry.metrics)
    metrics_listen = getattr(settings, name).metrics_listen

    async def run() -> None:
        service = Service(name, service_names)
        service.config_path = config_path
        service.config_state = config_state
        service.settings_in_use = settings
        try:
            cleanup = await setup(service, settings)
            if settings.telemetry.metrics and metrics_listen:
                service.serve_metrics(metrics_listen)
            if settings.mesh.health_listen:
                service.serve_plain_health(settings.mesh.health_listen)
            await start(service, args.listen or listen_of(settings), cleanup)
        except Exception as error:  # noqa: BLE001 - every failed start ends the same way
            _refuse_start(error)
        await serve_until_signalled(service, early)

    try:
        uvloop.run(run())
    except StopFailed as failure:
        # Each failed step is logged with its traceback already.
        log.critical("stopped with failures", error=str(failure))
        raise SystemExit(STOP_FAILED) from None
    finally:
        provider.shutdown()
