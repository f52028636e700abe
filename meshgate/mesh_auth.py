"""Who may call whom inside the mesh, and for which tenant.

The internal ports (context, cache, inference) speak mutual TLS. Each
service has a certificate from the mesh's CA naming its identity,
``meshgate-<service>`` (a DNS subject alternative name); a server admits
only the identities allowed to call it (:class:`MeshGuard`), and a caller
asks for the identity of the service it means to reach, so neither end
depends on host names or addresses. A process without a certificate from
the mesh's CA does not get past the handshake. A service reads its files
again when they change (:class:`CertificateFiles`): its server for its next
handshakes (:class:`ServerCertificates`), its channels to other services for
their next calls (``meshgate.serving.MeshChannel``).

The tenant a call acts for is asserted by the router, the one service that
authenticates callers (by API key, on its public port): per downstream call
it sends a short-lived token in metadata (a JWT: tenant, the service it is
for, expiry, and the id of the key that signed it) signed with its
certificate's key, which the context, cache and inference services verify
with the router's certificate and compare with the tenant the request names
(the inference service's generations may act for no tenant:
OptionalTenant). So a mesh certificate alone does not make anyone a tenant,
and no other service can assert one. Both ends follow their files: the
router signs with the key it reads now, and the others verify with the
router's certificates they read now (:class:`RouterCertificates`), and with
a key gone from them for the overlap of a rotation (:class:`TenantVerifier`).

``mesh.tls = false`` turns all of this off, for development only.
"""

from __future__ import annotations

import asyncio
import base64
import collections.abc
import dataclasses
import datetime
import hashlib
import os
import pathlib
import threading
import time
from typing import Any, Generic, TypeVar

import grpc
import jwt
import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from meshgate.config import ConfigError, MeshSettings
from meshgate.errors import MeshgateError, invalid_argument
from meshgate.reasons import Reason

log = structlog.get_logger(__name__)

MESH_SERVICES = ("router", "context", "cache", "inference")
ROUTER = "router"
TENANT_TOKEN_METADATA = "x-meshgate-tenant-token"
# Tolerated difference between the clocks of the router's host and a verifier's.
CLOCK_LEEWAY_S = 5.0
# Verified tokens remembered per process, and tokens the router keeps for
# reuse; the router reuses a token per (tenant, service), so this is about
# the number of active tenants.
VERIFIED_TOKENS_KEPT = 4096


@dataclasses.dataclass(frozen=True)
class OptionalTenant:
    """The tenant field of a method that may act for a tenant or for none
    (the inference service's Generate: a tenant's turn, or the mesh's own
    background work): a request naming a tenant must carry the router's
    token for it; one naming none is admitted without a token, as acting
    for nobody, which the handler must rank below every tenant (Generate
    queues it as background work, whatever else it says): any mesh peer
    may send one, so naming none must gain it nothing."""

    field: collections.abc.Callable[[Any], str]


# Extracts the tenant a request acts for; None for a method that acts for no tenant.
TenantField = collections.abc.Callable[[Any], str] | OptionalTenant | None
# The auth context property holding a peer certificate's DNS subject
# alternative names (grpc core's GRPC_PEER_DNS_PROPERTY_NAME), the names the
# mesh's identities are.
_DNS_NAMES = "peer_dns"
# A method missing from a service's tenant fields: refused, so that a method
# added later cannot slip past the check.
_UNDECLARED = object()


def identity(service: str) -> str:
    """The name a service's certificate carries."""
    return f"meshgate-{service}"


@dataclasses.dataclass(frozen=True)
class ChannelSecurity:
    """What a channel to one mesh service needs: our certificate files, and
    the identity the server must prove."""

    files: CertificateFiles
    server_identity: str

    @property
    def credentials(self) -> grpc.ChannelCredentials:
        """Credentials of the files as last read: for a channel that lives
        as long as a check (a probe); the services' own channels follow the
        files (``meshgate.serving.MeshChannel``)."""
        return self.files.current.channel_credentials()

    @property
    def channel_options(self) -> list[tuple[str, str]]:
        # Verify the server's certificate against its mesh identity instead of
        # the address dialled (an IP or a host name no certificate needs to name).
        # grpc-core matches it against every subject alternative name of the
        # certificate, whatever its type, or its common name where it has
        # none: unlike MeshGuard's check of callers, a CA-signed certificate
        # naming the identity only as its common name, or as a URI or e-mail
        # name, passes. grpc's Python client offers no hook to refuse that
        # (no verify callback, no auth context on a call, none in a metadata
        # plugin's context); docs/mesh-trust.md says so.
        return [("grpc.ssl_target_name_override", self.server_identity)]


class NotYetValid(ConfigError):
    """A certificate refused only until ``valid_from``: the same files pass
    the checks then, without a change that would make anyone look again."""

    def __init__(self, message: str, valid_from: datetime.datetime) -> None:
        super().__init__(message)
        self.valid_from = valid_from


def certificate_clock() -> datetime.datetime:
    """Now, as a certificate's validity is checked against it: a name of
    this module's own, so that a test can move it alone (grpc's handshakes
    keep the real clock)."""
    return datetime.datetime.now(datetime.UTC)


def _read(path: str, setting: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(
            f"{setting} = {path!r} cannot be read ({error.strerror}); `meshgate certs --out DIR` "
            "creates a CA and service certificates, and mesh.tls = false turns the mesh's TLS off "
            "for development"
        ) from error


def _certificate(pem: bytes, where: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as error:
        raise ConfigError(f"{where}: not a PEM certificate ({error})") from error


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _names(certificate: x509.Certificate) -> list[str]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return san.value.get_values_for_type(x509.DNSName)


def _algorithm(key: Any) -> str:
    """The JWT algorithm of a key, chosen by the key, never by a token."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        if key.curve.name in by_curve:
            return by_curve[key.curve.name]
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    raise ConfigError(f"the router's key ({type(key).__name__}) cannot sign tenant tokens")


def key_id(public_key: Any) -> str:
    """The id a tenant token names its key by (its ``kid``): the SHA-256 of
    the key's SubjectPublicKeyInfo, so a renewal that keeps the key keeps it."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.urlsafe_b64encode(hashlib.sha256(spki).digest()).rstrip(b"=").decode()


def _authorities(ca: bytes, ca_file: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(ca)
    except ValueError as error:
        raise ConfigError(f"mesh.ca_file {ca_file!r}: not a PEM certificate ({error})") from None


def _checked_files(service: str, ca_file: str, cert_file: str, key_file: str) -> tuple[bytes, bytes, bytes]:
    """The CA, certificate and key files' contents; refuses (ConfigError) a
    certificate that does not name the service, a key that is not the
    certificate's, a CA file without a certificate, and a certificate that
    is expired (or the chain that issued it), not from the CA, or not valid
    yet (NotYetValid).

    A service started with another's certificate would fail every handshake
    with an obscure error; grpc found a wrong key or CA file only when the
    server bound its port, and said "Failed to bind to address" (a
    traceback, and nothing about the files); with the others the service
    started, and every handshake with it failed (its peers trust the same
    CA file)."""
    ca = _read(ca_file, "mesh.ca_file")
    cert = _read(cert_file, "mesh.cert_file")
    key_pem = _read(key_file, "mesh.key_file")
    certificate = _certificate(cert, cert_file)
    if identity(service) not in _names(certificate):
        raise ConfigError(f"mesh.cert_file {cert_file!r} does not name {identity(service)!r}")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise ConfigError(
            f"mesh.key_file {key_file!r}: not an unencrypted PEM private key ({error})"
        ) from None
    if key.public_key() != certificate.public_key():
        raise ConfigError(f"mesh.key_file {key_file!r} is not the key of mesh.cert_file {cert_file!r}")
    if service == ROUTER:
        # It signs tenant tokens: a key that cannot is refused here, at
        # start or at a renewal, not at the next turn.
        _algorithm(key)
    authorities = _authorities(ca, ca_file)
    now = certificate_clock()
    if certificate.not_valid_after_utc < now:
        raise ConfigError(
            f"mesh.cert_file {cert_file!r} expired at {certificate.not_valid_after_utc.isoformat()}"
        )
    # Issued by the CA file's, or by an intermediate the certificate file
    # carries after it that chains up to them (_issuers). Any certificate of
    # the file issued by them passed once: another CA's certificate followed
    # by one of the mesh's was taken, and every peer refused its handshakes
    # ("unable to get local issuer certificate").
    chain = x509.load_pem_x509_certificates(cert)
    vouched = _vouched_until(
        certificate, _issuers(authorities, chain), f"mesh.cert_file {cert_file!r}", ca_file
    )
    if vouched < now:
        # Peers refuse an expired intermediate or CA as an expired
        # certificate ("certificate has expired").
        raise ConfigError(
            f"mesh.cert_file {cert_file!r}: the chain that issued it (its intermediate or mesh.ca_file) "
            f"expired at {vouched.isoformat()}"
        )
    if certificate.not_valid_before_utc > now:
        # Peers refuse it as they refuse an expired one ("certificate is not
        # yet valid"): taken at a renewal, every new connection failed until
        # then (a renewal staged early, or issued on a host whose clock runs
        # ahead). Checked last, so that only time stands in its way:
        # WatchedFiles reads the same files again once it is valid.
        raise NotYetValid(
            f"mesh.cert_file {cert_file!r} is not valid before "
            f"{certificate.not_valid_before_utc.isoformat()}",
            certificate.not_valid_before_utc,
        )
    return ca, cert, key_pem


# How long a channel may go on with the files as it last saw them: a call
# looks at the files again (three stats) once this long after the last look,
# whichever channel of the process makes it.
CERTIFICATE_LOOK_S = 1.0


def look_clock() -> float:
    """The clock that spaces the looks (WatchedFiles.latest): a name of this
    module's own, so that a test can move it alone. Moved through
    ``mesh_auth.time.monotonic`` (the time module's, every reader's), it
    moved asyncio's event loop too: on a machine up for less than the moved
    clock's reading, the loop ran at once the timers it held, a test's
    async_test_timeout among them."""
    return time.monotonic()


@dataclasses.dataclass(frozen=True, eq=False)
class Certificates:
    """One reading of a service's CA, certificate and key files, checked
    (:func:`_checked_files`). A new reading is a new object: whoever holds
    one knows the files changed when :class:`CertificateFiles` hands out
    another."""

    ca: bytes
    cert: bytes
    key: bytes

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def server_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], root_certificates=self.ca)


_Reading = TypeVar("_Reading")


class WatchedFiles(Generic[_Reading]):
    """Files read and checked at start (:meth:`_read`), and again whenever
    they change, so that a renewal (cert-manager's, ``meshgate certs``) is
    taken without a restart.

    The files are read only when one of them changed (inode, size or mtime:
    a Secret volume or a rename replaces the file), and files that fail the
    start's checks leave the reading in use, with one error logged per
    change, not per look: half of a renewal (a new certificate beside the
    old key) is refused until the other half arrives, and a certificate not
    valid yet until it is (the files are read again then, unchanged)."""

    def __init__(self, files: tuple[str, ...]) -> None:
        self._files = files
        # grpc's handshakes may look from several threads at once; one reads the files.
        self._lock = threading.Lock()
        # Taken before reading: a file replaced meanwhile is read again.
        self._seen = self._versions()
        # When the files last refused (NotYetValid) become valid: they are
        # read again then, unchanged.
        self._valid_from: datetime.datetime | None = None
        self.current: _Reading = self._read()
        self._next_look = look_clock() + CERTIFICATE_LOOK_S

    def _read(self) -> _Reading:
        """The files' contents, checked; ConfigError when they fail a check."""
        raise NotImplementedError

    def _taken(self, reading: _Reading) -> None:
        """Says what a new reading brought (it is taken when this is called)."""
        raise NotImplementedError

    def _versions(self) -> tuple[tuple[int, int, int, int] | None, ...]:
        versions = []
        for path in self._files:
            try:
                found = os.stat(path)
            except OSError:
                versions.append(None)
            else:
                versions.append((found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns))
        return tuple(versions)

    def refresh(self) -> _Reading:
        """The files' reading: a new one if they changed and pass the
        checks, else the one in use."""
        with self._lock:
            versions = self._versions()
            if versions == self._seen and not self._now_valid():
                return self.current
            self._seen = versions
            self._valid_from = None
            try:
                self.current = self._read()
            except ConfigError as error:
                if isinstance(error, NotYetValid):
                    self._valid_from = error.valid_from
                log.error(
                    "mesh certificate files changed but are refused; keeping the ones in use",
                    error=str(error),
                )
                return self.current
            self._taken(self.current)
            return self.current

    def _now_valid(self) -> bool:
        """Whether files refused as not yet valid are valid now."""
        return self._valid_from is not None and certificate_clock() >= self._valid_from

    def latest(self) -> _Reading:
        """:meth:`refresh` at most once per CERTIFICATE_LOOK_S, else the
        reading in use: a clock read, for what asks at every call (a
        channel, the router's tokens)."""
        now = look_clock()
        if now < self._next_look:
            return self.current
        self._next_look = now + CERTIFICATE_LOOK_S
        return self.refresh()


class CertificateFiles(WatchedFiles[Certificates]):
    """A service's certificate, key and CA files (:func:`_checked_files`),
    followed as they change: a renewed certificate or a new CA file is used
    without a restart by the service's server (:class:`ServerCertificates`),
    by its channels to the others (``meshgate.serving.MeshChannel``) and,
    in the router, to sign tenant tokens (:class:`TenantTokens`)."""

    def __init__(self, service: str, ca_file: str, cert_file: str, key_file: str) -> None:
        self._service = service
        super().__init__((ca_file, cert_file, key_file))

    def _read(self) -> Certificates:
        return Certificates(*_checked_files(self._service, *self._files))

    def _taken(self, reading: Certificates) -> None:
        certificate = x509.load_pem_x509_certificate(reading.cert)
        log.info(
            "mesh certificate reloaded",
            serial=f"{certificate.serial_number:x}",
            not_after=certificate.not_valid_after_utc.isoformat(),
        )


@dataclasses.dataclass(frozen=True)
class RouterKey:
    """A key of the router's that signs tenant tokens, as a verifier holds it."""

    id: str
    public_key: Any
    algorithm: str
    # When the last certificate naming it stops vouching for it (seconds
    # since the epoch): when it or a certificate of its chain expires, the
    # earliest of them, as in a TLS handshake; a certificate left in a bundle
    # after a rotation stops vouching then.
    not_after: float

    @classmethod
    def of(cls, certificate: x509.Certificate, chain_not_after: datetime.datetime) -> RouterKey:
        public_key = certificate.public_key()
        return cls(key_id(public_key), public_key, _algorithm(public_key), chain_not_after.timestamp())


def _is_authority(certificate: x509.Certificate) -> bool:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _path_length(authority: x509.Certificate) -> int | None:
    """How many intermediates an authority allows below itself (its
    basicConstraints pathLenConstraint; the mesh's own CA: 0); None: any number."""
    try:
        return authority.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
    except x509.ExtensionNotFound:
        return None


# Until when an issuer's chain vouches for what it issues, and how many more
# intermediates that chain allows below it (RFC 5280's max_path_length; None:
# any number). Below 0, the issuer itself is one intermediate too many: it
# vouches for nothing (no valid chain runs through it: openssl's "path
# length constraint exceeded"), and is kept only so that a refusal can say so.
_Standing = tuple[datetime.datetime, int | None]


def _covers(standing: _Standing, other: _Standing) -> bool:
    """Whether ``standing`` vouches as long as ``other``, for as many intermediates below."""
    (until, below), (other_until, other_below) = standing, other
    return until >= other_until and (below is None or (other_below is not None and below >= other_below))


def _standing_of(link: x509.Certificate, standing: _Standing) -> _Standing:
    """An intermediate's standing, issued by an issuer of ``standing``: no
    longer than either, one intermediate fewer below it, and no more than
    its own path length allows. A self-issued one (its issuer's name: a
    CA's new key certified by its old one) takes no place in the count, as
    RFC 5280 and openssl count."""
    until, below = standing
    if below is not None and link.subject != link.issuer:
        below -= 1
    limit = _path_length(link)
    if limit is not None and (below is None or limit < below):
        below = limit
    return min(link.not_valid_after_utc, until), below


def _issuers(
    authorities: list[x509.Certificate], chain: list[x509.Certificate]
) -> list[tuple[x509.Certificate, list[_Standing]]]:
    """What may have issued a certificate of ``chain``: the CA file's
    ``authorities``, and the intermediates of ``chain`` (certificates marked
    as authorities) that they issued, directly or through other
    intermediates of ``chain`` (root -> int1 -> int2 -> leaf, as openssl
    verify -untrusted takes it); each with its standings (_Standing): until
    when its chains vouch for what it issued (an intermediate no longer
    than its issuer's chain vouches for it) and how many intermediates they
    allow below it. :func:`_vouched_until` reads them."""
    links = list(filter(_is_authority, chain))
    candidates = [*authorities, *links]
    # Who may have issued each intermediate, checked once (a signature each).
    issuers_of = {
        index: [
            issuer
            for issuer, candidate in enumerate(candidates)
            if issuer != index and issued_by(candidates[index], candidate)
        ]
        for index in range(len(authorities), len(candidates))
    }
    standings = [[(a.not_valid_after_utc, _path_length(a))] for a in authorities] + [[] for _ in links]
    # Until nothing changes: an intermediate is trusted once any trusted
    # issuer issued it, and another may vouch for it longer or with more
    # room below (a link cross-signed by a longer-lived intermediate, or by
    # one nearer the root). Neither beats the other always, so each keeps
    # every standing no other of its own covers. A standing reached through
    # a link twice is covered by the one reached before, so only paths
    # without a loop add any, and it ends.
    changed = True
    while changed:
        changed = False
        for index, issuers in issuers_of.items():
            for issuer in issuers:
                for standing in standings[issuer]:
                    new = _standing_of(candidates[index], standing)
                    kept = standings[index]
                    if not any(_covers(old, new) for old in kept):
                        standings[index] = [*(old for old in kept if not _covers(new, old)), new]
                        changed = True
    return [(candidates[index], kept) for index, kept in enumerate(standings) if kept]


def _vouched_until(
    certificate: x509.Certificate,
    issuers: list[tuple[x509.Certificate, list[_Standing]]],
    named: str,
    ca_file: str,
) -> datetime.datetime:
    """Until when a chain of ``issuers`` (:func:`_issuers`) vouches for
    ``certificate``, the latest of them; ConfigError when none does
    (``named``: the certificate, as the refusal names it)."""
    standings = [standing for issuer, kept in issuers if issued_by(certificate, issuer) for standing in kept]
    within = [until for until, below in standings if below is None or below >= 0]
    if within:
        return max(within)
    if standings:
        # Not a valid chain (RFC 5280): openssl and Go refuse it. gRPC's
        # handshakes (BoringSSL) refuse one past an intermediate's limit, so
        # a service that took it failed every handshake; they leave the CA
        # file's own limit unchecked, but that limit is the CA's word on
        # what may chain to it, and other clients of the mesh hold to it.
        raise ConfigError(
            f"{named} is issued through more intermediates than mesh.ca_file {ca_file!r} or an "
            "intermediate allows (its basicConstraints path length): not a valid chain "
            '(openssl: "path length constraint exceeded")'
        )
    raise ConfigError(f"{named} is not issued by mesh.ca_file {ca_file!r}")


def _router_keys(ca_file: str, cert_file: str) -> tuple[RouterKey, ...]:
    """The keys of the router's certificates in ``cert_file``, in the file's
    order: every certificate there that names the router (several while a
    rotation is staged), each issued by the CA file's authorities, directly
    or by an intermediate the file carries that chains up to them.
    Certificates naming something else (intermediates) are skipped; a file
    naming the router nowhere, or with a certificate naming it from
    elsewhere, is refused (ConfigError)."""
    setting = "mesh.router_cert_file"
    pem = _read(cert_file, setting)
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as error:
        raise ConfigError(f"{setting} {cert_file!r}: not a PEM certificate ({error})") from None
    routers = [certificate for certificate in chain if identity(ROUTER) in _names(certificate)]
    if not routers:
        raise ConfigError(f"{setting} {cert_file!r} does not name {identity(ROUTER)!r}")
    issuers = _issuers(_authorities(_read(ca_file, "mesh.ca_file"), ca_file), chain)
    keys: dict[str, RouterKey] = {}
    for certificate in routers:
        named = f"{setting} {cert_file!r}: the certificate of serial {certificate.serial_number:x}"
        vouched = _vouched_until(certificate, issuers, named, ca_file)
        key = RouterKey.of(certificate, min(certificate.not_valid_after_utc, vouched))
        # A renewal that kept the key staged beside the certificate it renews.
        if key.id not in keys or keys[key.id].not_after < key.not_after:
            keys[key.id] = key
    return tuple(keys.values())


class RouterCertificates(WatchedFiles[tuple[RouterKey, ...]]):
    """The router's certificates a service verifies tenant tokens with
    (``mesh.router_cert_file``, checked against ``mesh.ca_file``:
    :func:`_router_keys`), followed as they change: the router's key changes
    at a renewal that makes a new key pair (cert-manager's rotationPolicy
    Always, ``meshgate certs`` after its key was deleted)."""

    def __init__(self, ca_file: str, cert_file: str) -> None:
        super().__init__((ca_file, cert_file))

    def _read(self) -> tuple[RouterKey, ...]:
        return _router_keys(*self._files)

    def _taken(self, reading: tuple[RouterKey, ...]) -> None:
        log.info("router certificates reloaded", key_ids=[key.id for key in reading])


class ServerCertificates:
    """What a service's server presents and whom it trusts: its
    :class:`CertificateFiles`, looked at before each new handshake (grpc asks
    :meth:`changed`); connections already made keep theirs."""

    def __init__(self, files: CertificateFiles) -> None:
        self._files = files
        self._served = files.current

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return self._served.server_configuration()

    def changed(self) -> grpc.ServerCertificateConfiguration | None:
        """The files' new configuration, or None to keep the one in use
        (unchanged, or refused). Two handshakes asking at once may both get
        the new one: grpc takes the same configuration twice."""
        certificates = self._files.refresh()
        if certificates is self._served:
            return None
        self._served = certificates
        return certificates.server_configuration()


class Mesh:
    """One process's place in the mesh: its certificate and whom it trusts,
    from the ``[mesh]`` settings and its service name."""

    def __init__(self, settings: MeshSettings, service: str) -> None:
        self.service = service
        self.tls = settings.tls
        self._settings = settings
        if not self.tls:
            log.warning("mesh.tls is off: internal ports trust whoever reaches them (development only)")
            return
        self.files = CertificateFiles(
            service,
            settings.ca_file,
            self._for_service(settings.cert_file, service),
            self._for_service(settings.key_file, service),
        )

    @staticmethod
    def _for_service(template: str, service: str) -> str:
        return template.replace("{service}", service)

    def to(self, service: str) -> ChannelSecurity | None:
        """How to reach another mesh service; None with TLS off."""
        if not self.tls:
            return None
        return ChannelSecurity(self.files, identity(service))

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        certificates = ServerCertificates(self.files)
        return grpc.dynamic_ssl_server_credentials(
            certificates.configuration(), certificates.changed, require_client_authentication=True
        )

    def tenant_tokens(self) -> TenantTokens:
        """The router's token signer (it signs nothing with TLS off)."""
        if not self.tls:
            return TenantTokens(None, self._settings.tenant_token_ttl_s)
        if self.service != ROUTER:
            raise ConfigError("only the router asserts tenants")
        return TenantTokens(self.files, self._settings.tenant_token_ttl_s)

    def tenant_verifier(self) -> TenantVerifier:
        path = self._settings.router_cert_file or self._for_service(self._settings.cert_file, ROUTER)
        router = RouterCertificates(self._settings.ca_file, path)
        return TenantVerifier(router, self.service, self._settings.tenant_token_ttl_s)


class TenantTokens:
    """The router's side: tokens saying which tenant a downstream call acts for.

    A token names the tenant, the service it is for (one seen by the cache is
    no good at the context service), an expiry, and in its header the id of
    the key that signed it. One token per (tenant, service) is reused while
    at least half its life is left: a signature per call would cost the hot
    path an ECDSA signature here and a verification there, and a token is
    worth nothing without a mesh certificate anyway.

    The key is the one of the router's files as last read (``files``, None:
    TLS is off, nothing is signed): after a renewal with a new key pair the
    next calls carry tokens signed with the new key, since a service started
    on the new files knows no other.
    """

    def __init__(self, files: CertificateFiles | None, ttl_s: float, clock=time.time) -> None:
        self._files = files
        self._ttl_s = ttl_s
        self._clock = clock
        self._current: dict[tuple[str, str], tuple[tuple[tuple[str, str], ...], float]] = {}
        self._signing_with: Certificates | None = None
        self._key: Any = None
        self._algorithm = self._key_id = ""
        if files is not None:
            self._sign_with(files.current)

    def _sign_with(self, certificates: Certificates) -> None:
        """Signs with the key of ``certificates`` from now on (checked by
        _checked_files: it is the certificate's, and it can sign)."""
        self._signing_with = certificates
        key = serialization.load_pem_private_key(certificates.key, password=None)
        signer = key_id(key.public_key())
        if signer == self._key_id:
            return  # a renewal that kept the key
        self._key, self._algorithm, self._key_id = key, _algorithm(key), signer
        # The tokens kept were signed with the key replaced.
        self._current.clear()

    def metadata(self, tenant_id: str, service: str) -> tuple[tuple[str, str], ...]:
        """Metadata for one call to ``service`` acting for ``tenant_id``."""
        if self._files is None:
            return ()
        certificates = self._files.latest()
        if certificates is not self._signing_with:
            self._sign_with(certificates)
        now = self._clock()
        current = self._current.get((tenant_id, service))
        if current is None or current[1] - now < self._ttl_s / 2:
            current = (((TENANT_TOKEN_METADATA, self.mint(tenant_id, service, now)),), now + self._ttl_s)
            if len(self._current) >= VERIFIED_TOKENS_KEPT:
                # Every tenant ever served would otherwise keep its tokens
                # (~0.6 KB each) for the router's life: the expired go, and
                # all of them if that is not enough (each is minted again).
                self._current = {k: v for k, v in self._current.items() if now < v[1]}
                if len(self._current) >= VERIFIED_TOKENS_KEPT:
                    self._current.clear()
            self._current[(tenant_id, service)] = current
        return current[0]

    def mint(self, tenant_id: str, service: str, now: float) -> str:
        claims = {
            "iss": identity(ROUTER),
            "sub": tenant_id,
            "aud": identity(service),
            "iat": int(now),
            "exp": int(now + self._ttl_s),
        }
        return jwt.encode(claims, self._key, algorithm=self._algorithm, headers={"kid": self._key_id})


class TenantVerifier:
    """A service's side: the tenant a call's token asserts, verified once per
    token and remembered until it expires (cache hits are a hot path: they
    look at no file and at no key).

    A token is verified with the key it names (its ``kid``) among the
    router's certificates as last read (``router``: each of them while a
    rotation is staged), or among those that left them less than the
    rotation's overlap ago, while a certificate of it (and its chain) has not
    expired; a token naming no key (a router from before key ids) with the
    current keys first. Remembered no longer than the router's tokens live,
    nor than the key that verified it is taken."""

    def __init__(
        self,
        router: RouterCertificates,
        service: str,
        ttl_s: float,
        leeway_s: float = CLOCK_LEEWAY_S,
        clock=time.time,
    ) -> None:
        self._router = router
        self._audience = identity(service)
        self._ttl_s = ttl_s
        self._leeway_s = leeway_s
        # How long a key gone from the router's certificates is still taken,
        # from when this service sees it gone: the router signs with its new
        # key within CERTIFICATE_LOOK_S of its files changing (when both read
        # one file), and a token signed just before is good for ttl_s and
        # the leeway more. A router whose files change later than ours needs
        # the new certificate staged beside the old here first (docs/mesh-trust.md).
        self._overlap_s = ttl_s + leeway_s + CERTIFICATE_LOOK_S
        self._clock = clock
        self._reading = router.current
        self._keys = {key.id: key for key in self._reading}
        # Keys gone from the router's certificates, and until when they are taken.
        self._retired: dict[str, tuple[RouterKey, float]] = {}
        self._verified: dict[str, tuple[str, float]] = {}

    def tenant(self, metadata: collections.abc.Iterable[tuple[str, Any]] | None) -> str:
        token = next((value for key, value in metadata or () if key == TENANT_TOKEN_METADATA), None)
        if not token or not isinstance(token, str):
            raise MeshgateError(
                grpc.StatusCode.UNAUTHENTICATED,
                Reason.TENANT_TOKEN_MISSING,
                f"a call to {self._audience} needs the router's {TENANT_TOKEN_METADATA} metadata",
            )
        now = self._clock()
        known = self._verified.get(token)
        if known is not None and now < known[1]:
            return known[0]
        tenant, expires = self._verify(token, now)
        if len(self._verified) >= VERIFIED_TOKENS_KEPT:
            self._verified = {t: v for t, v in self._verified.items() if now < v[1]}
            if len(self._verified) >= VERIFIED_TOKENS_KEPT:
                self._verified.clear()
        self._verified[token] = (tenant, expires)
        return tenant

    def _follow(self, reading: tuple[RouterKey, ...], now: float) -> None:
        """Verifies with the keys of ``reading`` from now on, and with those
        it dropped for the overlap of a rotation."""
        if reading is self._reading:
            return
        keys = {key.id: key for key in reading}
        retired = {kid: kept for kid, kept in self._retired.items() if now < kept[1] and kid not in keys}
        for kid, key in self._keys.items():
            if kid not in keys:
                retired[kid] = (key, now + self._overlap_s)
                log.info("a router key left mesh.router_cert_file", key_id=kid, taken_for_s=self._overlap_s)
        self._reading, self._keys, self._retired = reading, keys, retired

    def _taken_until(self, key: RouterKey) -> float:
        """Until when tokens of ``key`` are taken: while a certificate of it
        and its chain have not expired (by the leeway: clocks differ), and
        once it left the router's certificates, for the overlap only."""
        until = key.not_after + self._leeway_s
        if key.id not in self._keys:
            until = min(until, self._retired[key.id][1])
        return until

    def _key(self, kid: str, now: float) -> RouterKey | None:
        key = self._keys.get(kid)
        if key is None and kid in self._retired:
            key = self._retired[kid][0]
        return key if key is not None and now < self._taken_until(key) else None

    def _candidates(self, token: str, now: float) -> list[RouterKey]:
        """The keys that may have signed ``token``, the likeliest first."""
        try:
            # PyJWT refuses a key id that is not a string.
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as error:
            raise _invalid_token(f"the tenant token is not valid: {error}") from error
        kid = header.get("kid")
        if kid is None:
            held = [*self._keys.values(), *(key for key, _ in self._retired.values())]
            keys = [
                key for key in held if now < self._taken_until(key) and key.algorithm == header.get("alg")
            ]
            if not keys:
                raise _invalid_token("the tenant token is not signed with the algorithm of a router key")
            return keys
        key = self._key(kid, now)
        if key is None:
            # The router may have taken a new key an instant before we look
            # at the files (once a second at most, else): look now.
            self._follow(self._router.refresh(), now)
            key = self._key(kid, now)
        if key is None:
            raise _invalid_token(
                "the tenant token is signed with the key of no unexpired router certificate in "
                "mesh.router_cert_file, nor of one that left it within a rotation's overlap"
            )
        return [key]

    def _decode(self, token: str, key: RouterKey) -> dict[str, Any]:
        # Expiry is checked by _verify against our clock, which tests can
        # set; iat is informational.
        return jwt.decode(
            token,
            key.public_key,
            algorithms=[key.algorithm],
            audience=self._audience,
            issuer=identity(ROUTER),
            options={"require": ["iss", "sub", "aud", "exp"], "verify_exp": False, "verify_iat": False},
        )

    def _verify(self, token: str, now: float) -> tuple[str, float]:
        self._follow(self._router.latest(), now)
        *others, signer = self._candidates(token, now)
        try:
            for key in others:
                try:
                    claims = self._decode(token, key)
                    signer = key
                    break
                except jwt.InvalidSignatureError:
                    continue  # another key may have signed it
            else:
                claims = self._decode(token, signer)
        except jwt.InvalidTokenError as error:
            raise _invalid_token(f"the tenant token is not valid: {error}") from error
        expires = claims["exp"]
        if not isinstance(expires, int | float) or isinstance(expires, bool):
            raise _invalid_token("the tenant token's expiry is not a number")
        expires = expires + self._leeway_s
        if now >= expires:
            raise _invalid_token("the tenant token has expired")
        tenant = claims["sub"]
        if not isinstance(tenant, str) or not tenant:
            raise _invalid_token("the tenant token names no tenant")
        # Taken unverified (tenant()) no longer than the router's tokens live,
        # nor than its key is: the expiry is the signer's word, and a token
        # of a key that left the router's certificates or whose certificate
        # expired, minted to expire much later, outlived the key otherwise.
        return tenant, min(expires, now + self._ttl_s + self._leeway_s, self._taken_until(signer))


async def _the_request(
    requests: collections.abc.AsyncIterator[Any], context: grpc.aio.ServicerContext
) -> Any:
    """The one message of a unary request's call served request-streaming
    (MeshGuard._wrap); gRPC reads one for a unary handler too, and no more.

    The requests end too when the call does before its message came
    (cancelled, or its deadline passed): such a call is observed as what
    ended it, not as a malformed request (5 of 5 cancelled and 5 of 5
    timed out were counted INVALID_ARGUMENT MALFORMED_REQUEST). gRPC's
    cancellation of this task lands once it yields; a deadline is read
    from the call (the error interceptor observes a cancellation past it as
    DEADLINE_EXCEEDED)."""
    request = await anext(requests, None)
    if request is None:
        await asyncio.sleep(0)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise asyncio.CancelledError
        raise invalid_argument(Reason.MALFORMED_REQUEST, "the call ended without its request message")
    return request


def _invalid_token(message: str) -> MeshgateError:
    return MeshgateError(grpc.StatusCode.UNAUTHENTICATED, Reason.TENANT_TOKEN_INVALID, message)


class MeshGuard(grpc.aio.ServerInterceptor):
    """Admits to a service's own methods only the mesh identities allowed to
    call it and, where a method acts for a tenant, only a call carrying the
    router's token for the tenant its request names.

    Open until :meth:`restrict` is called: the router's port is public, and
    its callers are checked by API key. Health and reflection stay open to
    every peer that passed the TLS handshake (a certificate of the mesh).
    Runs inside :class:`meshgate.errors.ErrorInterceptor`, so its refusals
    leave as statuses with ErrorInfo.
    """

    def __init__(self) -> None:
        self._callers: frozenset[bytes] | None = None
        self._service = ""
        self._verifier: TenantVerifier | None = None
        self._tenant_of: collections.abc.Mapping[str, TenantField] = {}
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def restrict(
        self,
        service: str,
        callers: collections.abc.Iterable[str],
        verifier: TenantVerifier | None = None,
        tenant_of: collections.abc.Mapping[str, TenantField] | None = None,
    ) -> None:
        """``tenant_of`` maps each method name to the tenant field of its
        request (None: acts for no tenant); a method missing from it is refused."""
        if (verifier is None) != (tenant_of is None):
            raise ValueError("a tenant check needs both a verifier and the requests' tenant fields")
        self._service = service
        self._callers = frozenset(identity(c).encode() for c in callers)
        self._verifier = verifier
        self._tenant_of = tenant_of or {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if self._callers is None or not method.startswith("/meshgate."):
            return await continuation(handler_call_details)
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = self._wrap(handler, method.rsplit("/", 1)[-1])
        return wrapped

    def _admit_peer(self, context: grpc.aio.ServicerContext) -> None:
        # The mesh's identities are DNS subject alternative names (checked at
        # load, written so by ``meshgate certs``). gRPC's peer identities are
        # the common name of a certificate without alternative names, and
        # every alternative name of any type otherwise: a certificate the CA
        # signed for something else, naming the identity as its common name
        # or as a URI or e-mail name, is not the service it names.
        peer = context.auth_context().get(_DNS_NAMES, ())
        if self._callers.isdisjoint(peer):
            name = b",".join(peer).decode(errors="replace") or "unknown"
            raise MeshgateError(
                grpc.StatusCode.PERMISSION_DENIED,
                Reason.PEER_NOT_ALLOWED,
                f"{name} may not call the {self._service} service",
                {"peer": name},
            )

    def _admit(self, field, request, context: grpc.aio.ServicerContext) -> None:
        """A call whose peer _admit_peer let in, for the tenant ``request``
        names where its method acts for one (``field``)."""
        if self._verifier is None or field is None:
            return
        if field is _UNDECLARED:
            raise MeshgateError(
                grpc.StatusCode.PERMISSION_DENIED,
                Reason.METHOD_NOT_ALLOWED,
                "this method does not say which tenant it acts for",
            )
        if isinstance(field, OptionalTenant):
            named = field.field(request)
            if not named:
                return
        else:
            named = field(request)
        if not named:
            # Acts for nobody: refused here, as every handler would refuse it,
            # so that no handler's own check is what keeps it out.
            raise invalid_argument(Reason.TENANT_REQUIRED, "the request names no tenant (tenant_id)")
        if self._verifier.tenant(context.invocation_metadata()) != named:
            raise MeshgateError(
                grpc.StatusCode.PERMISSION_DENIED,
                Reason.TENANT_MISMATCH,
                "the request names another tenant than the router asserted",
            )

    def _wrap(self, handler: grpc.RpcMethodHandler, name: str) -> grpc.RpcMethodHandler:
        field = self._tenant_of.get(name, _UNDECLARED) if self._verifier is not None else None
        if handler.request_streaming and field not in (None, _UNDECLARED):
            raise TypeError(f"{name}: tenants are checked on unary requests only")
        deserializer, serializer = handler.request_deserializer, handler.response_serializer
        # A unary request's method is served request-streaming (the same call
        # on the wire): gRPC then runs the handler before it reads the
        # request, so a peer not allowed is refused before its message (up
        # to serving.MAX_MESSAGE_BYTES) is read. Served unary, the check
        # came after the read: such a peer holding two requests back held a
        # context service's two places under max_concurrent_rpcs = 2 (the
        # router was refused SERVICE_BUSY), and its 30 MiB GetSession was
        # read whole before its refusal (0.15 s against 0.005 s).
        if handler.unary_unary:
            behavior = handler.unary_unary

            async def unary_unary(requests, context):
                self._admit_peer(context)
                request = await _the_request(requests, context)
                self._admit(field, request, context)
                return await behavior(request, context)

            return grpc.stream_unary_rpc_method_handler(unary_unary, deserializer, serializer)
        if handler.unary_stream:
            behavior = handler.unary_stream

            async def unary_stream(requests, context):
                self._admit_peer(context)
                request = await _the_request(requests, context)
                self._admit(field, request, context)
                async for response in behavior(request, context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(unary_stream, deserializer, serializer)
        if handler.stream_stream:
            behavior = handler.stream_stream

            async def stream_stream(requests, context):
                self._admit_peer(context)
                self._admit(field, None, context)
                async for response in behavior(requests, context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, serializer)
        behavior = handler.stream_unary

        async def stream_unary(requests, context):
            self._admit_peer(context)
            self._admit(field, None, context)
            return await behavior(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, serializer)
