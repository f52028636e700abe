"""A certificate authority for the mesh, and one certificate per service.

`make run` (through :class:`meshgate.local.stack.Stack`) and `meshgate certs --out
DIR` call :func:`ensure`: the first time it creates a CA and a certificate
for every service; later it reuses them, and issues again only what is
missing, about to expire, or not from the CA in the folder, keeping the
service's key where its file holds one: the router's key signs the tenant
tokens that the other services verify with the router certificate's key as
they read it at start, so a renewal that changed it would make a restarted
router's calls UNAUTHENTICATED at every service not restarted after it (as
the Kubernetes manifests keep it: `rotationPolicy: Never`). To change keys,
delete the ``.key`` files, then restart every service. Files:
``ca.pem`` / ``ca.key`` and ``<service>.pem`` / ``<service>.key``, the names
the ``[mesh]`` settings expect by default. A production mesh may use its own
PKI instead: any CA works whose certificates name ``meshgate-<service>`` as a
DNS subject alternative name.
"""

from __future__ import annotations

import datetime
import os
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshgate.mesh_auth import MESH_SERVICES, identity, issued_by

CA_NAME = "meshgate local CA"
CA_DAYS = 10 * 365
SERVICE_DAYS = 365
# A certificate this close to its end is issued again rather than reused.
RENEW_BEFORE = datetime.timedelta(days=30)


def ca_path(directory: pathlib.Path) -> pathlib.Path:
    return directory / "ca.pem"


def cert_path(directory: pathlib.Path, service: str) -> pathlib.Path:
    return directory / f"{service}.pem"


def key_path(directory: pathlib.Path, service: str) -> pathlib.Path:
    return directory / f"{service}.key"


def ensure(directory: pathlib.Path, services: tuple[str, ...] = MESH_SERVICES) -> list[pathlib.Path]:
    """The CA and each service's certificate in ``directory``; returns the
    files written now (none when everything was there and valid)."""
    # Never writable by others, whatever the umask (0 made it 0777): whoever
    # can rename files in it can put their own CA in place of ca.pem.
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    written = []
    ca_key_file = key_path(directory, "ca")
    ca = _load_valid(ca_path(directory), ca_key_file)
    if ca is None:
        ca = _new_ca()
        written += _write(ca_path(directory), ca_key_file, *ca)
    ca_key, ca_cert = ca
    for service in services:
        existing = _load_valid(cert_path(directory, service), key_path(directory, service))
        if existing is not None and issued_by(existing[1], ca_cert):
            continue
        kept = _load_key(key_path(directory, service))
        issued = _issue(ca_key, ca_cert, service, kept)
        written += _write(
            cert_path(directory, service), key_path(directory, service), *issued, key_kept=kept is not None
        )
    return written


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: fast handshakes, supported by every TLS stack, and ES256 for
    # the router's tenant tokens, which its certificate's key signs.
    return ec.generate_private_key(ec.SECP256R1())


def _new_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    service: str,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate for ``service``, for ``key`` (a new one if None)."""
    key = key or _new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity(service))]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVICE_DAYS))
        # The name is the identity both ends check: servers admit callers by
        # it, and callers ask for it as the server name (not a host or IP).
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity(service))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # Every service is a server to its callers and a client of others.
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _load_key(key_file: pathlib.Path) -> ec.EllipticCurvePrivateKey | None:
    """The P-256 key in ``key_file``, or None (no file, or another key)."""
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    return None


def _load_valid(
    cert_file: pathlib.Path, key_file: pathlib.Path
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """The pair, if both files exist, parse, match, and stay valid a while."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    if cert.not_valid_after_utc - RENEW_BEFORE < _now():
        return None
    return key, cert


def _write(
    cert_file: pathlib.Path,
    key_file: pathlib.Path,
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    key_kept: bool = False,
) -> list[pathlib.Path]:
    """Writes the pair, each file whole or not at all (a full disk or a
    kill midway leaves the old one); a kept key's file is not written again,
    so a renewal cannot lose it."""
    written = []
    if not key_kept:
        key_bytes = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # Created owner-only, never briefly readable by others.
        written.append(replace_file(key_file, key_bytes, 0o600))
    written.append(replace_file(cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644))
    return written


def replace_file(path: pathlib.Path, data: bytes, mode: int) -> pathlib.Path:
    """``path`` holding ``data``, by a new file of ``mode`` (less the umask)
    renamed over it: a reader never sees it half-written, and an older file's
    mode does not carry over."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
