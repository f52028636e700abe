"""Tenant tokens (mint, verify, expiry, audience, tampering), the mesh's
certificates, and the settings that point at them."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pathlib
import re
import shutil
import stat
import time

import grpc
import jwt
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshgate import mesh_auth
from meshgate.cache.v1 import cache_service_pb2
from meshgate.config import ConfigError, MeshSettings
from meshgate.context.v1 import context_service_pb2
from meshgate.errors import MeshgateError
from meshgate.inference.v1 import inference_service_pb2
from meshgate.local import certs
from services.cache import app as cache_app
from services.context import app as context_app
from services.inference import app as inference_app
from tests.clocks import Clock
from tests.mesh import authority, certs_dir, mesh_settings, renew

# Now, whole seconds: a router certificate vouches for its key while it has
# not expired, on the verifier's clock.
NOW = float(int(time.time()))
TTL_S = 30.0


def router_key():
    return serialization.load_pem_private_key(certs.key_path(certs_dir(), "router").read_bytes(), None)


def router_tokens(clock: Clock | None = None) -> mesh_auth.TenantTokens:
    """The router's tokens, as its files sign them."""
    return mesh_auth.TenantTokens(
        mesh_auth.Mesh(mesh_settings(), "router").files, TTL_S, clock=clock or Clock(NOW)
    )


def verifier(service: str = "context", clock: Clock | None = None) -> mesh_auth.TenantVerifier:
    router = mesh_auth.RouterCertificates(
        str(certs.ca_path(certs_dir())), str(certs.cert_path(certs_dir(), "router"))
    )
    return mesh_auth.TenantVerifier(router, service, TTL_S, leeway_s=0, clock=clock or Clock(NOW))


def token_metadata(token: str) -> list[tuple[str, str]]:
    return [("traceparent", "00-abc-def-01"), (mesh_auth.TENANT_TOKEN_METADATA, token)]


def refusal(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(MeshgateError) as caught:
        call()
    return caught.value.code, caught.value.reason


def test_a_minted_token_names_its_tenant_for_its_service_only():
    tokens = router_tokens()
    metadata = tokens.metadata("dev", "context")
    assert verifier("context").tenant(metadata) == "dev"
    # Taken from a call to the context service, it is no good at the cache.
    assert refusal(lambda: verifier("cache").tenant(metadata)) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "TENANT_TOKEN_INVALID",
    )


def test_the_router_reuses_a_token_until_half_its_life_is_gone():
    clock = Clock(NOW)
    tokens = router_tokens(clock)
    first = tokens.metadata("dev", "context")
    clock.now += TTL_S / 2 - 1
    assert tokens.metadata("dev", "context") == first
    assert tokens.metadata("acme", "context") != first
    clock.now += 2
    renewed = tokens.metadata("dev", "context")
    assert renewed != first
    assert verifier(clock=clock).tenant(renewed) == "dev"


def test_the_router_keeps_a_bounded_number_of_tokens(monkeypatch):
    monkeypatch.setattr(mesh_auth, "VERIFIED_TOKENS_KEPT", 4)
    clock = Clock(NOW)
    tokens = router_tokens(clock)
    first = tokens.metadata("tenant-0", "context")
    for n in range(1, 4):
        tokens.metadata(f"tenant-{n}", "context")
    assert tokens.metadata("tenant-0", "context") == first
    # Past the bound the expired go first; then, none being expired, all.
    clock.now += TTL_S
    tokens.metadata("tenant-4", "context")
    assert len(tokens._current) == 1
    for n in range(5, 9):
        tokens.metadata(f"tenant-{n}", "context")
    assert len(tokens._current) <= 4
    assert verifier(clock=clock).tenant(tokens.metadata("tenant-8", "context")) == "tenant-8"


def test_unexpired_tokens_survive_the_purge_of_the_expired(monkeypatch):
    monkeypatch.setattr(mesh_auth, "VERIFIED_TOKENS_KEPT", 4)
    clock = Clock(NOW)
    tokens = router_tokens(clock)
    old = [tokens.metadata(f"old-{n}", "context") for n in range(2)]
    clock.now += TTL_S * 3 / 4
    fresh = [tokens.metadata(f"fresh-{n}", "context") for n in range(2)]
    # The old have expired; the fresh have more than half their life left.
    clock.now = NOW + TTL_S + 1
    tokens.metadata("past-the-bound", "context")
    assert len(tokens._current) == 3
    # Reused: the very tokens minted before, not new ones.
    again = [tokens.metadata(f"fresh-{n}", "context") for n in range(2)]
    assert all(token is before for token, before in zip(again, fresh, strict=True))
    assert [tokens.metadata(f"old-{n}", "context") for n in range(2)] != old


def test_an_expired_token_is_refused_even_after_it_was_verified_once():
    clock = Clock(NOW)
    token = router_tokens().mint("dev", "context", NOW)
    check = verifier(clock=clock)
    assert check.tenant(token_metadata(token)) == "dev"
    clock.now = NOW + TTL_S
    assert refusal(lambda: check.tenant(token_metadata(token))) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "TENANT_TOKEN_INVALID",
    )


def test_a_missing_token_is_unauthenticated():
    assert refusal(lambda: verifier().tenant([("traceparent", "x")])) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "TENANT_TOKEN_MISSING",
    )
    assert refusal(lambda: verifier().tenant(None))[1] == "TENANT_TOKEN_MISSING"


def _with_claims(token: str, **changes) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def test_tampered_forged_and_unsigned_tokens_are_refused():
    token = router_tokens().mint("dev", "context", NOW)
    cache_key = serialization.load_pem_private_key(certs.key_path(certs_dir(), "cache").read_bytes(), None)
    claims = {"iss": "meshgate-router", "sub": "dev", "aud": "meshgate-context", "exp": int(NOW + 60)}
    forged = [
        _with_claims(token, sub="acme"),  # another tenant under the router's signature
        _with_claims(token, exp=int(NOW + 3600)),  # a longer life
        jwt.encode(claims, cache_key, algorithm="ES256"),  # signed by a mesh service that is not the router
        jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"),
        jwt.encode(claims, None, algorithm="none"),
        jwt.encode(claims, "a shared secret known to more than the router", algorithm="HS256"),
        "not-a-token",
    ]
    for bad in forged:
        assert refusal(lambda bad=bad: verifier().tenant(token_metadata(bad))) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "TENANT_TOKEN_INVALID",
        ), bad


def test_a_token_that_names_no_tenant_is_refused():
    claims = {"iss": "meshgate-router", "sub": "", "aud": "meshgate-context", "exp": int(NOW + 60)}
    token = jwt.encode(claims, router_key(), algorithm="ES256")
    assert refusal(lambda: verifier().tenant(token_metadata(token)))[1] == "TENANT_TOKEN_INVALID"


def test_with_tls_off_the_router_sends_no_token():
    mesh = mesh_auth.Mesh(MeshSettings(tls=False), "router")
    assert mesh.tenant_tokens().metadata("dev", "context") == ()
    assert mesh.to("context") is None and mesh.server_credentials() is None


def test_only_the_router_mints_tokens():
    with pytest.raises(ConfigError, match="only the router"):
        mesh_auth.Mesh(mesh_settings(), "cache").tenant_tokens()


def test_missing_certificates_stop_the_start_with_a_hint(tmp_path: pathlib.Path):
    settings = MeshSettings(ca_file=str(tmp_path / "ca.pem"))
    with pytest.raises(ConfigError, match="meshgate certs --out DIR"):
        mesh_auth.Mesh(settings, "context")


def test_a_service_started_with_another_services_certificate_stops_at_once():
    settings = mesh_settings()
    settings.cert_file = str(certs_dir() / "cache.pem")
    settings.key_file = str(certs_dir() / "cache.key")
    with pytest.raises(ConfigError, match="does not name 'meshgate-context'"):
        mesh_auth.Mesh(settings, "context")


def _context_settings_with(directory: pathlib.Path, **files: str) -> MeshSettings:
    settings = mesh_settings(directory)
    for name, path in files.items():
        setattr(settings, name, path)
    return settings


@pytest.mark.parametrize(
    ("files", "refusal"),
    [
        # grpc refused these only when the server bound its port: a
        # traceback of "Failed to bind to address", nothing about the files.
        ({"key_file": "{dir}/cache.key"}, "is not the key of mesh.cert_file"),
        ({"key_file": "{dir}/context.pem"}, "not an unencrypted PEM private key"),
        ({"ca_file": "{dir}/ca.key"}, "mesh.ca_file .* not a PEM certificate"),
        # With this one the service started, and every handshake failed.
        ({"ca_file": "{other}/ca.pem"}, "is not issued by mesh.ca_file"),
    ],
    ids=["another key", "a certificate as the key", "a key as the CA", "another CA"],
)
def test_a_key_or_ca_that_does_not_go_with_the_certificate_stops_the_start(files, refusal, tmp_path):
    directory, other = certs_dir(), tmp_path
    certs.ensure(other)
    paths = {name: path.format(dir=directory, other=other) for name, path in files.items()}
    with pytest.raises(ConfigError, match=refusal):
        mesh_auth.Mesh(_context_settings_with(directory, **paths), "context")


def test_an_expired_certificate_stops_the_start(tmp_path: pathlib.Path, monkeypatch):
    """Every peer would refuse its handshakes: the service served nothing."""
    issued_at = certs._now() - certs.datetime.timedelta(days=certs.SERVICE_DAYS + 1)
    monkeypatch.setattr(certs, "_now", lambda: issued_at)
    certs.ensure(tmp_path)
    with pytest.raises(ConfigError, match="expired at"):
        mesh_auth.Mesh(mesh_settings(tmp_path), "context")


def test_a_certificate_not_valid_yet_stops_the_start(tmp_path: pathlib.Path, monkeypatch):
    """Peers refuse it as they refuse an expired one ("certificate is not yet valid")."""
    issued_at = certs._now() + certs.datetime.timedelta(hours=1)
    monkeypatch.setattr(certs, "_now", lambda: issued_at)
    certs.ensure(tmp_path)
    with pytest.raises(mesh_auth.NotYetValid, match="is not valid before"):
        mesh_auth.Mesh(mesh_settings(tmp_path), "context")


def _root(not_after=None, path_length=None):
    """A root CA and its key, allowing ``path_length`` intermediates below it
    (by default any; the mesh's own CA allows none), valid for a year or
    until ``not_after``."""
    not_after = not_after or certs._now() + certs.datetime.timedelta(days=365)
    return authority("root", None, None, not_after, path_length)


def _intermediate(root_key, root, not_after=None):
    """A CA certificate issued by ``root``, and its key; valid as a service's
    certificate is, or until ``not_after``."""
    not_after = not_after or certs._now() + certs.datetime.timedelta(days=certs.SERVICE_DAYS)
    return authority("intermediate", root, root_key, not_after)


def _write_context_files(directory: pathlib.Path, root, key, leaf, *intermediates) -> None:
    """Files for context in ``directory``: ``root`` as the CA file, and
    ``leaf`` followed by ``intermediates`` as its certificate file."""
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(root.public_bytes(pem))
    (directory / "context.pem").write_bytes(b"".join(c.public_bytes(pem) for c in [leaf, *intermediates]))
    (directory / "context.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def test_a_certificate_file_with_its_intermediate_is_accepted(tmp_path: pathlib.Path):
    """cert-manager's tls.crt may carry the chain after the certificate; the
    CA file need only hold the root that issued the intermediate."""
    root_key, root = _root()
    intermediate_key, intermediate = _intermediate(root_key, root)
    key, leaf = certs._issue(intermediate_key, intermediate, "context")
    _write_context_files(tmp_path, root, key, leaf, intermediate)
    assert mesh_auth.Mesh(mesh_settings(tmp_path), "context").server_credentials() is not None


# Chains as (the root's path length, then the intermediates from the root
# down, each as its name and path length; None: no limit), and whether a
# leaf issued by the last is taken. openssl verify -CAfile root -untrusted
# intermediates agrees with each: "path length constraint exceeded" where
# refused. gRPC's handshakes (BoringSSL, grpcio 1.85) refuse only the one
# past an intermediate's limit: they do not check the root's.
CHAINS = {
    "a root of 0 (the mesh's own CA's), one intermediate": (0, [("int", None)], False),
    "a root of 1, two intermediates": (1, [("int1", None), ("int2", None)], False),
    "a root of 2, an intermediate of 0, another below it": (2, [("int1", 0), ("int2", None)], False),
    "a root of 1, one intermediate": (1, [("int", None)], True),
    "a root of 0, an intermediate of its own name": (0, [("root", None)], True),
}


def _chained(root_limit, links):
    """A root allowing ``root_limit`` intermediates, the intermediates
    ``links`` from it down (:data:`CHAINS`), the nearest first, and the
    key of the last."""
    issuer_key, issuer = _root(path_length=root_limit)
    root, intermediates = issuer, []
    until = certs._now() + certs.datetime.timedelta(days=365)
    for name, limit in links:
        issuer_key, issuer = authority(name, issuer, issuer_key, until, limit)
        intermediates.insert(0, issuer)
    return root, intermediates, issuer_key


@pytest.mark.parametrize(("root_limit", "links", "taken"), CHAINS.values(), ids=CHAINS.keys())
def test_a_certificate_issued_past_a_path_length_limit_stops_the_start(tmp_path, root_limit, links, taken):
    """An authority's path length (basicConstraints) is how many
    intermediates it allows below itself, a self-issued one not counted
    (RFC 5280); no valid chain runs past it. Such a certificate was taken
    at start and at a renewal: past an intermediate's limit, gRPC's
    handshakes refused it and the service failed every one; past the CA
    file's, openssl and Go clients refuse it."""
    root, intermediates, issuer_key = _chained(root_limit, links)
    key, leaf = certs._issue(issuer_key, intermediates[0], "context")
    _write_context_files(tmp_path, root, key, leaf, *intermediates)
    if taken:
        assert mesh_auth.Mesh(mesh_settings(tmp_path), "context").server_credentials() is not None
    else:
        with pytest.raises(ConfigError, match="more intermediates than mesh.ca_file .* allows"):
            mesh_auth.Mesh(mesh_settings(tmp_path), "context")


@pytest.mark.parametrize("order", ["nearest first", "root's first"])
def test_a_certificate_file_with_two_intermediates_is_accepted(tmp_path: pathlib.Path, order):
    """root -> int1 -> int2 -> leaf, the root without a path length: openssl
    verify -CAfile root -untrusted int2+int1 takes it, and so must the
    mesh, whichever order the file carries the intermediates in; it was
    refused "is not issued by mesh.ca_file" when only intermediates the CA
    file's issued could issue. An intermediate vouches no longer than the
    one that issued it: int1 expired, the leaf is refused."""
    now = certs._now()
    root_key, root = _root()

    def chained(int1_until: certs.datetime.datetime) -> None:
        int1_key, int1 = authority("int1", root, root_key, int1_until)
        int2_key, int2 = authority("int2", int1, int1_key, now + certs.datetime.timedelta(days=365))
        key, leaf = certs._issue(int2_key, int2, "context")
        intermediates = [int2, int1] if order == "nearest first" else [int1, int2]
        _write_context_files(tmp_path, root, key, leaf, *intermediates)

    chained(now + certs.datetime.timedelta(days=365))
    assert mesh_auth.Mesh(mesh_settings(tmp_path), "context").server_credentials() is not None
    chained(now - certs.datetime.timedelta(days=1))
    with pytest.raises(ConfigError, match="the chain that issued it"):
        mesh_auth.Mesh(mesh_settings(tmp_path), "context")


def _context_files(directory: pathlib.Path) -> mesh_auth.CertificateFiles:
    return mesh_auth.CertificateFiles(
        "context",
        str(certs.ca_path(directory)),
        str(certs.cert_path(directory, "context")),
        str(certs.key_path(directory, "context")),
    )


def _renewed(directory: pathlib.Path, scratch: pathlib.Path) -> pathlib.Path:
    """``scratch``: a copy of ``directory`` whose context pair is new, from the same CA."""
    shutil.copytree(directory, scratch)
    renew(scratch, "context")
    return scratch


def _another_mesh(directory: pathlib.Path) -> pathlib.Path:
    """``directory``, holding a mesh's certificates from a CA of its own."""
    certs.ensure(directory)
    return directory


def _replace_cert(directory: pathlib.Path, source: pathlib.Path, service: str = "context") -> None:
    """context's certificate in ``directory`` replaced by ``service``'s from ``source``."""
    certs.replace_file(
        certs.cert_path(directory, "context"), certs.cert_path(source, service).read_bytes(), 0o644
    )


def _replace_pair(directory: pathlib.Path, source: pathlib.Path, service: str = "context") -> None:
    _replace_cert(directory, source, service)
    certs.replace_file(
        certs.key_path(directory, "context"), certs.key_path(source, service).read_bytes(), 0o600
    )


def _expired_pair(directory: pathlib.Path, monkeypatch) -> None:
    """An expired certificate and its key for context, from the CA in ``directory``."""
    issued_at = certs._now() - certs.datetime.timedelta(days=certs.SERVICE_DAYS + 1)
    with monkeypatch.context() as earlier:
        earlier.setattr(certs, "_now", lambda: issued_at)
        renew(directory, "context")


def _another_cas_leaf_first(directory: pathlib.Path, scratch: pathlib.Path) -> None:
    """context's pair in ``directory`` replaced by another CA's, with the
    mesh's certificate in use after it in the certificate file."""
    in_use = certs.cert_path(directory, "context").read_bytes()
    _replace_pair(directory, _another_mesh(scratch))
    bundle = certs.cert_path(directory, "context")
    certs.replace_file(bundle, bundle.read_bytes() + in_use, 0o644)


def _future_pair(directory: pathlib.Path, monkeypatch) -> None:
    """A certificate for context valid from an hour on, and its key, from the CA in ``directory``."""
    issued_at = certs._now() + certs.datetime.timedelta(hours=1)
    with monkeypatch.context() as later:
        later.setattr(certs, "_now", lambda: issued_at)
        renew(directory, "context")


@pytest.mark.parametrize(
    ("rotate", "refusal"),
    [
        (lambda served, tmp, _: _replace_pair(served, served, "cache"), "does not name 'meshgate-context'"),
        (
            lambda served, tmp, _: _replace_pair(served, _another_mesh(tmp / "other")),
            "is not issued by mesh.ca_file",
        ),
        (
            lambda served, tmp, _: _another_cas_leaf_first(served, tmp / "other"),
            "is not issued by mesh.ca_file",
        ),
        (
            lambda served, tmp, _: _replace_cert(served, _renewed(served, tmp / "renewed")),
            "is not the key of mesh.cert_file",
        ),
        (lambda served, tmp, patch: _expired_pair(served, patch), "expired at"),
        (lambda served, tmp, patch: _future_pair(served, patch), "is not valid before"),
        (
            lambda served, tmp, _: certs.key_path(served, "context").unlink(),
            "mesh.key_file .* cannot be read",
        ),
    ],
    ids=[
        "another service's",
        "another CA's",
        "another CA's, a mesh certificate after it",
        "a key not the certificate's",
        "expired",
        "not valid yet",
        "no key file",
    ],
)
def test_rotated_files_that_fail_the_starts_checks_keep_the_certificate_in_use(
    rotate, refusal, tmp_path: pathlib.Path, monkeypatch
):
    """What a service refuses to start with, it refuses to switch to: the
    files in use keep serving, and the refusal is logged once, not at every
    handshake (grpc asks before each)."""
    served = tmp_path / "served"
    shutil.copytree(certs_dir(), served)
    files = _context_files(served)
    certificates = mesh_auth.ServerCertificates(files)
    in_use = files.current.cert
    assert certificates.changed() is None

    rotate(served, tmp_path, monkeypatch)
    with structlog.testing.capture_logs() as logs:
        assert [certificates.changed() for _ in range(3)] == [None, None, None]
    assert [entry["log_level"] for entry in logs] == ["error"]
    assert re.search(refusal, logs[0]["error"]), logs[0]["error"]
    assert files.current.cert == in_use

    # A good pair afterwards is taken, once.
    _replace_pair(served, _renewed(certs_dir(), tmp_path / "good"))
    assert isinstance(certificates.changed(), grpc.ServerCertificateConfiguration)
    assert files.current.cert == certs.cert_path(served, "context").read_bytes() != in_use
    assert certificates.changed() is None


def test_channels_look_at_the_files_once_per_look_interval_not_per_call(tmp_path: pathlib.Path, monkeypatch):
    """Every call a mesh channel makes asks CertificateFiles.latest()
    (serving.MeshChannel): a clock read; the files are looked at (a stat
    each) once per CERTIFICATE_LOOK_S, whichever channel asks, and read
    again only when they changed."""
    served = tmp_path / "served"
    shutil.copytree(certs_dir(), served)
    now = 1000.0
    monkeypatch.setattr(mesh_auth, "look_clock", lambda: now)
    files = _context_files(served)
    started_with = files.current
    _replace_pair(served, _renewed(certs_dir(), tmp_path / "renewed"))
    looked_at = []
    stat_file = os.stat

    def counted(path, *args, **kwargs):
        if str(path).startswith(str(served)):
            looked_at.append(path)
        return stat_file(path, *args, **kwargs)

    monkeypatch.setattr(mesh_auth.os, "stat", counted)

    assert all(files.latest() is started_with for _ in range(1000))
    assert looked_at == []
    now += mesh_auth.CERTIFICATE_LOOK_S
    renewed = files.latest()
    assert renewed is not started_with
    assert renewed.cert == certs.cert_path(served, "context").read_bytes()
    assert len(looked_at) == 3
    assert all(files.latest() is renewed for _ in range(1000))
    now += mesh_auth.CERTIFICATE_LOOK_S
    # Unchanged: looked at, not read again.
    assert files.latest() is renewed
    assert len(looked_at) == 6


def test_certificates_are_made_once_then_reused_and_renewed_when_gone(tmp_path: pathlib.Path):
    written = certs.ensure(tmp_path)
    assert {p.name for p in written} == {
        "ca.pem",
        "ca.key",
        *(f"{s}.{ext}" for s in mesh_auth.MESH_SERVICES for ext in ("pem", "key")),
    }
    for key_file in tmp_path.glob("*.key"):
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600, key_file
    assert certs.ensure(tmp_path) == []
    certs.cert_path(tmp_path, "cache").unlink()
    # Issued again for the key it had (c7d0d36: keys are kept).
    assert {p.name for p in certs.ensure(tmp_path)} == {"cache.pem"}
    certs.key_path(tmp_path, "cache").unlink()
    assert {p.name for p in certs.ensure(tmp_path)} == {"cache.pem", "cache.key"}
    # A new CA makes every service certificate from the old one useless.
    certs.ca_path(tmp_path).unlink()
    assert len(certs.ensure(tmp_path)) == 2 + len(mesh_auth.MESH_SERVICES)
    # Each service loads its own, named after it.
    settings = MeshSettings(
        ca_file=str(certs.ca_path(tmp_path)),
        cert_file=str(tmp_path / "{service}.pem"),
        key_file=str(tmp_path / "{service}.key"),
    )
    for service in mesh_auth.MESH_SERVICES:
        assert mesh_auth.Mesh(settings, service).to("context").server_identity == "meshgate-context"


def test_a_renewal_keeps_each_services_key(tmp_path: pathlib.Path, monkeypatch):
    """A bug hunt: a certificate renewed within 30 days of its end got a new
    key, so a router restarted on it signed tokens the services not yet
    restarted refused (TENANT_TOKEN_INVALID): they verify with the router
    key they read at start."""
    certs.ensure(tmp_path)
    before = {s: certs.key_path(tmp_path, s).read_bytes() for s in mesh_auth.MESH_SERVICES}
    old_router = certs.cert_path(tmp_path, "router").read_bytes()
    later = certs._now() + certs.datetime.timedelta(days=certs.SERVICE_DAYS - 10)
    monkeypatch.setattr(certs, "_now", lambda: later)
    renewed = {p.name for p in certs.ensure(tmp_path)}
    assert "router.pem" in renewed
    assert certs.cert_path(tmp_path, "router").read_bytes() != old_router
    for service in mesh_auth.MESH_SERVICES:
        assert certs.key_path(tmp_path, service).read_bytes() == before[service], service
    # A token of the renewed router verifies with the certificate the others started with.
    started_with = tmp_path / "router-at-start.pem"
    started_with.write_bytes(old_router)
    router = mesh_auth.RouterCertificates(str(certs.ca_path(tmp_path)), str(started_with))
    # The router restarted on the renewal, at the renewal's time (not valid before).
    monkeypatch.setattr(mesh_auth, "certificate_clock", lambda: later)
    files = mesh_auth.Mesh(mesh_settings(tmp_path), "router").files
    metadata = mesh_auth.TenantTokens(files, TTL_S, clock=Clock(NOW)).metadata("acme", "context")
    assert (
        mesh_auth.TenantVerifier(router, "context", TTL_S, leeway_s=0, clock=Clock(NOW)).tenant(metadata)
        == "acme"
    )


def test_a_renewal_that_fails_midway_leaves_the_key_and_the_old_certificate(
    tmp_path: pathlib.Path, monkeypatch
):
    """A review: the key file was deleted and written again on every
    renewal, so a full disk midway lost the key the renewal meant to keep."""
    certs.ensure(tmp_path)
    key, cert = (
        certs.key_path(tmp_path, "router").read_bytes(),
        certs.cert_path(tmp_path, "router").read_bytes(),
    )
    later = certs._now() + certs.datetime.timedelta(days=certs.SERVICE_DAYS - 10)
    monkeypatch.setattr(certs, "_now", lambda: later)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(certs.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        certs.ensure(tmp_path)
    assert certs.key_path(tmp_path, "router").read_bytes() == key
    assert certs.cert_path(tmp_path, "router").read_bytes() == cert
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("descriptor", "tenant_of"),
    [
        (context_service_pb2.DESCRIPTOR.services_by_name["ContextService"], context_app.TENANT_OF),
        (cache_service_pb2.DESCRIPTOR.services_by_name["CacheService"], cache_app.TENANT_OF),
        (inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"], inference_app.TENANT_OF),
    ],
)
def test_every_method_of_a_tenant_service_says_where_its_tenant_is(descriptor, tenant_of):
    # A method missing here would be refused at run time; this says which.
    assert set(tenant_of) == {m.name for m in descriptor.methods}


def _router_mesh(
    directory: pathlib.Path, clock: Clock
) -> tuple[mesh_auth.TenantTokens, mesh_auth.TenantVerifier]:
    """The router's tokens from its files in ``directory``, and the context
    service's verifier of them (``router.pem`` there unless the test points
    it elsewhere), both following their files at every look."""
    tokens = mesh_auth.TenantTokens(
        mesh_auth.Mesh(mesh_settings(directory), "router").files, TTL_S, clock=clock
    )
    return tokens, _verifier_of(directory, certs.cert_path(directory, "router"), clock)


def _verifier_of(
    directory: pathlib.Path, router_cert: pathlib.Path, clock: Clock
) -> mesh_auth.TenantVerifier:
    router = mesh_auth.RouterCertificates(str(certs.ca_path(directory)), str(router_cert))
    return mesh_auth.TenantVerifier(router, "context", TTL_S, leeway_s=0, clock=clock)


def _key_id_of(metadata) -> str:
    return jwt.get_unverified_header(dict(metadata)[mesh_auth.TENANT_TOKEN_METADATA])["kid"]


def _router_key_id(directory: pathlib.Path) -> str:
    certificate = certs.x509.load_pem_x509_certificate(certs.cert_path(directory, "router").read_bytes())
    return mesh_auth.key_id(certificate.public_key())


@pytest.fixture
def every_look(monkeypatch) -> None:
    """Files are looked at on every call, not once per CERTIFICATE_LOOK_S."""
    monkeypatch.setattr(mesh_auth, "CERTIFICATE_LOOK_S", 0.0)


def test_the_router_signs_with_its_renewed_key_at_once(tmp_path: pathlib.Path, every_look):
    """A renewal with a new key pair: the router's next calls carry tokens
    signed with it and naming it, not the tokens it kept (a service started
    on the new files knows only the new key); a renewal that keeps the key
    keeps the tokens."""
    served = tmp_path / "served"
    shutil.copytree(certs_dir(), served)
    clock = Clock(NOW)
    tokens, _ = _router_mesh(served, clock)
    before = tokens.metadata("acme", "context")
    assert _key_id_of(before) == _router_key_id(served)

    renew(served, "router")
    renewed = tokens.metadata("acme", "context")
    assert renewed != before
    assert _key_id_of(renewed) == _router_key_id(served) != _key_id_of(before)
    restarted = _verifier_of(served, certs.cert_path(served, "router"), clock)
    assert restarted.tenant(renewed) == "acme"
    assert refusal(lambda: restarted.tenant(before)) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "TENANT_TOKEN_INVALID",
    )

    certs.cert_path(served, "router").unlink()
    certs.ensure(served, ("router",))  # issued again for the same key
    assert tokens.metadata("acme", "context") is renewed


def test_a_router_key_gone_from_its_certificate_is_taken_for_the_overlap_only(
    tmp_path: pathlib.Path, every_look
):
    """The router's certificate renewed with a new key: a service that kept
    running verifies the new key's tokens, and the previous key's for the
    token TTL (and the leeway, and one look at the files) from when it saw
    the change, no longer."""
    served = tmp_path / "served"
    shutil.copytree(certs_dir(), served)
    clock = Clock(NOW)
    tokens, verifier = _router_mesh(served, clock)
    assert verifier.tenant(tokens.metadata("acme", "context")) == "acme"
    previous = router_tokens(clock)  # certs_dir(): the key served had

    renew(served, "router")
    assert verifier.tenant(tokens.metadata("acme", "context")) == "acme"
    seen_at = clock.now
    overlap_s = TTL_S + mesh_auth.CERTIFICATE_LOOK_S
    clock.now = seen_at + overlap_s - 1
    assert verifier.tenant(previous.metadata("dev", "context")) == "dev"
    clock.now = seen_at + overlap_s
    assert refusal(lambda: verifier.tenant(previous.metadata("old", "context"))) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "TENANT_TOKEN_INVALID",
    )
    assert verifier.tenant(tokens.metadata("acme", "context")) == "acme"


def _router_signed(directory: pathlib.Path, tenant: str, expires: float, kid: bool = True) -> list:
    """Metadata of a token for ``tenant`` signed with the router key in
    ``directory``, expiring at ``expires`` (whoever holds a key chooses it)."""
    key = serialization.load_pem_private_key(certs.key_path(directory, "router").read_bytes(), None)
    claims = {"iss": "meshgate-router", "sub": tenant, "aud": "meshgate-context", "exp": int(expires)}
    headers = {"kid": mesh_auth.key_id(key.public_key())} if kid else None
    return token_metadata(jwt.encode(claims, key, algorithm="ES256", headers=headers))


def test_a_token_of_a_key_gone_from_its_certificate_is_not_taken_past_the_overlap(
    tmp_path: pathlib.Path, every_look
):
    """A token verified within the overlap is remembered until it expires,
    but its expiry is the signer's word: one minted by the previous key to
    expire much later (a key rotated out for having leaked) is refused once
    the overlap has passed, as a token verified then would be."""
    served = tmp_path / "served"
    shutil.copytree(certs_dir(), served)
    clock = Clock(NOW)
    tokens, verifier = _router_mesh(served, clock)
    assert verifier.tenant(tokens.metadata("acme", "context")) == "acme"
    previous = tmp_path / "previous"
    shutil.copytree(served, previous)

    renew(served, "router")
    assert verifier.tenant(tokens.metadata("acme", "context")) == "acme"
    lasting = _router_signed(previous, "evil", NOW + 365 * 86400)
    assert verifier.tenant(lasting) == "evil"  # within the overlap
    clock.now += TTL_S + mesh_auth.CERTIFICATE_LOOK_S
    assert refusal(lambda: verifier.tenant(lasting)) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "TENANT_TOKEN_INVALID",
    )
    assert verifier.tenant(tokens.metadata("acme", "context")) == "acme"


def test_an_expired_router_certificate_vouches_for_no_key(tmp_path: pathlib.Path, monkeypatch):
    """An old certificate left in the bundle after a rotation: once it has
    expired its key's tokens are refused (with a key id or without), as its
    TLS handshakes would be; so are a current one's once it expires while
    the file stays as it is, tokens verified before it included."""
    expired = tmp_path / "expired"
    shutil.copytree(certs_dir(), expired)
    issued_at = certs._now() - certs.datetime.timedelta(days=certs.SERVICE_DAYS + 1)
    with monkeypatch.context() as earlier:
        earlier.setattr(certs, "_now", lambda: issued_at)
        renew(expired, "router")
    bundle = tmp_path / "router-bundle.pem"
    current = certs.cert_path(certs_dir(), "router")
    bundle.write_bytes(current.read_bytes() + certs.cert_path(expired, "router").read_bytes())
    clock = Clock(NOW)
    verifier = _verifier_of(certs_dir(), bundle, clock)
    for kid in (True, False):
        assert (
            refusal(lambda k=kid: verifier.tenant(_router_signed(expired, "evil", NOW + 60, k)))[1]
            == "TENANT_TOKEN_INVALID"
        )
    not_after = certs.x509.load_pem_x509_certificate(current.read_bytes()).not_valid_after_utc.timestamp()
    verified = _router_signed(certs_dir(), "dev", not_after + 3600)
    assert verifier.tenant(verified) == "dev"

    clock.now = not_after
    assert refusal(lambda: verifier.tenant(verified))[1] == "TENANT_TOKEN_INVALID"
    assert (
        refusal(lambda: verifier.tenant(_router_signed(certs_dir(), "dev", clock.now + 60)))[1]
        == "TENANT_TOKEN_INVALID"
    )


def test_every_router_certificate_of_a_bundle_is_taken_while_a_rotation_is_staged(
    tmp_path: pathlib.Path, every_look
):
    """docs/mesh-trust.md's order: the new certificate staged beside the old in the
    verifiers' router certificate file, then the router renewed, then the
    old dropped. Tokens of either key verify for as long as both are in the
    file, and the old one's for the overlap once it is dropped."""
    served, staged = tmp_path / "served", tmp_path / "staged"
    shutil.copytree(certs_dir(), served)
    shutil.copytree(served, staged)
    renew(staged, "router")
    bundle = tmp_path / "router-bundle.pem"
    old, new = (certs.cert_path(d, "router").read_bytes() for d in (served, staged))
    certs.replace_file(bundle, old, 0o644)
    clock = Clock(NOW)
    verifier = _verifier_of(served, bundle, clock)
    tokens, _ = _router_mesh(served, clock)
    previous = router_tokens(clock)  # certs_dir(): the key served had
    assert verifier.tenant(tokens.metadata("acme", "context")) == "acme"

    certs.replace_file(bundle, old + new, 0o644)  # staged
    assert verifier.tenant(tokens.metadata("acme", "context")) == "acme"
    for name, mode in (("pem", 0o644), ("key", 0o600)):  # the router renewed with the staged pair
        certs.replace_file(served / f"router.{name}", (staged / f"router.{name}").read_bytes(), mode)
    renewed = tokens.metadata("dev", "context")
    assert _key_id_of(renewed) == _router_key_id(staged)
    assert verifier.tenant(renewed) == "dev"
    clock.now += 10 * TTL_S
    assert verifier.tenant(previous.metadata("late", "context")) == "late"

    certs.replace_file(bundle, new, 0o644)  # the old dropped
    assert verifier.tenant(tokens.metadata("dev", "context")) == "dev"
    assert verifier.tenant(previous.metadata("old", "context")) == "old"
    clock.now += TTL_S + mesh_auth.CERTIFICATE_LOOK_S
    assert (
        refusal(lambda: verifier.tenant(previous.metadata("older", "context")))[1] == "TENANT_TOKEN_INVALID"
    )
    assert verifier.tenant(tokens.metadata("dev", "context")) == "dev"


def test_a_bundle_takes_only_router_certificates_from_the_mesh_ca(tmp_path: pathlib.Path, every_look):
    """Another service's certificate in the file is not the router's (its
    tokens are refused); a router certificate from another CA refuses the
    file: at start, and at a change, which keeps the keys in use."""
    bundle = tmp_path / "router-bundle.pem"
    cache_cert = certs.cert_path(certs_dir(), "cache").read_bytes()
    router_cert = certs.cert_path(certs_dir(), "router").read_bytes()
    certs.replace_file(bundle, cache_cert + router_cert, 0o644)
    clock = Clock(NOW)
    verifier = _verifier_of(certs_dir(), bundle, clock)
    cache_key = serialization.load_pem_private_key(certs.key_path(certs_dir(), "cache").read_bytes(), None)
    claims = {"iss": "meshgate-router", "sub": "dev", "aud": "meshgate-context", "exp": int(NOW + 60)}
    by_cache = jwt.encode(
        claims, cache_key, algorithm="ES256", headers={"kid": mesh_auth.key_id(cache_key.public_key())}
    )
    assert refusal(lambda: verifier.tenant(token_metadata(by_cache)))[1] == "TENANT_TOKEN_INVALID"
    assert verifier.tenant(router_tokens(clock).metadata("dev", "context")) == "dev"

    intruder = _another_mesh(tmp_path / "other")
    forged = router_cert + certs.cert_path(intruder, "router").read_bytes()
    certs.replace_file(bundle, forged, 0o644)
    with structlog.testing.capture_logs() as logs:
        assert verifier.tenant(router_tokens(clock).metadata("acme", "context")) == "acme"
        intruders = mesh_auth.TenantTokens(
            mesh_auth.Mesh(mesh_settings(intruder), "router").files, TTL_S, clock=clock
        )
        for tenant in ("dev", "acme"):
            assert (
                refusal(lambda t=tenant: verifier.tenant(intruders.metadata(t, "context")))[1]
                == "TENANT_TOKEN_INVALID"
            )
    assert [entry["log_level"] for entry in logs] == ["error"]
    assert "is not issued by mesh.ca_file" in logs[0]["error"]
    with pytest.raises(ConfigError, match="is not issued by mesh.ca_file"):
        _verifier_of(certs_dir(), bundle, clock)
    certs.replace_file(bundle, cache_cert, 0o644)
    with pytest.raises(ConfigError, match="does not name 'meshgate-router'"):
        _verifier_of(certs_dir(), bundle, clock)


def test_a_router_certificate_issued_by_an_intermediate_it_carries_is_taken(tmp_path: pathlib.Path):
    """As the router's own file may carry its chain (cert-manager's tls.crt),
    so may a verifier's copy of it; an intermediate the CA did not issue
    does not make its certificates the mesh's."""
    root_key, root = _root()
    intermediate_key, intermediate = _intermediate(root_key, root)
    key, router = certs._issue(intermediate_key, intermediate, "router")
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(root.public_bytes(pem))
    chain = tmp_path / "router.pem"
    chain.write_bytes(router.public_bytes(pem) + intermediate.public_bytes(pem))
    claims = {"iss": "meshgate-router", "sub": "dev", "aud": "meshgate-context", "exp": int(NOW + 60)}
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": mesh_auth.key_id(key.public_key())})
    assert _verifier_of(tmp_path, chain, Clock(NOW)).tenant(token_metadata(token)) == "dev"

    elsewhere_key, elsewhere = _intermediate(*_root())
    _, stray = certs._issue(elsewhere_key, elsewhere, "router")
    chain.write_bytes(stray.public_bytes(pem) + elsewhere.public_bytes(pem))
    with pytest.raises(ConfigError, match="is not issued by mesh.ca_file"):
        _verifier_of(tmp_path, chain, Clock(NOW))


def test_a_router_certificate_issued_past_a_path_length_limit_is_refused(tmp_path: pathlib.Path):
    """As a service's own certificate is: its chain is not valid, so its
    key vouches for no tenant."""
    root, intermediates, issuer_key = _chained(0, [("int", None)])
    _, router = certs._issue(issuer_key, intermediates[0], "router")
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(root.public_bytes(pem))
    chain = tmp_path / "router.pem"
    chain.write_bytes(router.public_bytes(pem) + intermediates[0].public_bytes(pem))
    with pytest.raises(
        ConfigError, match="the certificate of serial .* more intermediates than mesh.ca_file"
    ):
        _verifier_of(tmp_path, chain, Clock(NOW))


@pytest.mark.parametrize("ending", ["intermediate", "CA"])
def test_a_router_certificate_vouches_no_longer_than_its_chain(tmp_path: pathlib.Path, ending):
    """An intermediate or a CA that expires before the router's certificate
    does ends its vouching for the key then, as it would end the key's TLS
    handshakes: its tokens are refused from then on, tokens verified before
    included; an intermediate already expired vouches for nothing."""
    soon = certs._now() + certs.datetime.timedelta(hours=1)
    if ending == "CA":
        root_key, root = _root(soon)
        intermediate_key, intermediate = _intermediate(root_key, root)
    else:
        root_key, root = _root()
        intermediate_key, intermediate = _intermediate(root_key, root, soon)
    key, router = certs._issue(intermediate_key, intermediate, "router")
    ends = min(root.not_valid_after_utc, intermediate.not_valid_after_utc).timestamp()
    assert ends < router.not_valid_after_utc.timestamp()
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(root.public_bytes(pem))
    chain = tmp_path / "router.pem"
    chain.write_bytes(router.public_bytes(pem) + intermediate.public_bytes(pem))

    def signed(tenant: str, expires: float) -> list:
        claims = {"iss": "meshgate-router", "sub": tenant, "aud": "meshgate-context", "exp": int(expires)}
        kid = mesh_auth.key_id(key.public_key())
        return token_metadata(jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid}))

    clock = Clock(NOW)
    verifier = _verifier_of(tmp_path, chain, clock)
    verified = signed("dev", ends + 3600)
    assert verifier.tenant(verified) == "dev"
    clock.now = ends
    assert refusal(lambda: verifier.tenant(verified))[1] == "TENANT_TOKEN_INVALID"
    assert refusal(lambda: verifier.tenant(signed("acme", ends + 60)))[1] == "TENANT_TOKEN_INVALID"
    assert _verifier_of(tmp_path, chain, Clock(ends - 1)).tenant(signed("acme", ends + 60)) == "acme"
    assert (
        refusal(lambda: _verifier_of(tmp_path, chain, Clock(ends)).tenant(signed("acme", ends + 60)))[1]
        == "TENANT_TOKEN_INVALID"
    )


def test_a_token_of_a_key_not_yet_seen_looks_at_the_files_at_once(tmp_path: pathlib.Path, monkeypatch):
    """A verifier looks at the router's certificate at most once per
    CERTIFICATE_LOOK_S, and the router may take its new key (the same file)
    an instant before: a token naming a key it does not know makes it look
    now, rather than refuse the router's first tokens after a rotation."""
    monkeypatch.setattr(mesh_auth, "look_clock", lambda: 1000.0)
    served = tmp_path / "served"
    shutil.copytree(certs_dir(), served)
    tokens, verifier = _router_mesh(served, Clock(NOW))
    assert verifier.tenant(tokens.metadata("acme", "context")) == "acme"
    renew(served, "router")
    renewed = mesh_auth.TenantTokens(
        mesh_auth.Mesh(mesh_settings(served), "router").files, TTL_S, clock=Clock(NOW)
    )
    assert verifier.tenant(renewed.metadata("acme", "context")) == "acme"


def _segment(value: dict) -> bytes:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=")


def _signed(claims: dict, header: dict) -> str:
    """``claims`` signed by the router's key under ``header``, as written
    (jwt.encode refuses some headers a forger may send)."""
    signing_input = _segment(header) + b"." + _segment(claims)
    algorithm = jwt.algorithms.ECAlgorithm(jwt.algorithms.ECAlgorithm.SHA256)
    signature = base64.urlsafe_b64encode(algorithm.sign(signing_input, router_key())).rstrip(b"=")
    return (signing_input + b"." + signature).decode()


def test_a_token_is_verified_with_the_key_it_names(tmp_path: pathlib.Path):
    """With several keys, the one the token names verifies it: a token
    signed by one key naming another is refused, as is one naming a key of
    no router certificate, or naming it by something else than a string; a
    token naming none (a router from before key ids) is tried with each."""
    staged = tmp_path / "staged"
    shutil.copytree(certs_dir(), staged)
    renew(staged, "router")
    bundle = tmp_path / "router-bundle.pem"
    old, new = (certs.cert_path(d, "router").read_bytes() for d in (certs_dir(), staged))
    bundle.write_bytes(new + old)
    verifier = _verifier_of(certs_dir(), bundle, Clock(NOW))
    claims = {"iss": "meshgate-router", "sub": "dev", "aud": "meshgate-context", "exp": int(NOW + 60)}
    old_id, new_id = _router_key_id(certs_dir()), _router_key_id(staged)
    for kid, verified in (
        (old_id, True),
        (new_id, False),
        ("unknown", False),
        (["a", "list"], False),
        (None, True),
    ):
        token = _signed(claims, {"alg": "ES256", "typ": "JWT", **({} if kid is None else {"kid": kid})})
        if verified:
            assert verifier.tenant(token_metadata(token)) == "dev", kid
        else:
            assert refusal(lambda t=token: verifier.tenant(token_metadata(t)))[1] == "TENANT_TOKEN_INVALID", (
                kid
            )


def test_a_verified_token_looks_at_no_file_again(monkeypatch, every_look):
    """Cache hits are the hot path: a token verified once is taken again
    without a look at the router's certificate file, even when every call
    may look at it (every_look); a new token looks (the CA and the
    router's certificate)."""
    looked_at = []
    stat_file = os.stat

    def counted(path, *args, **kwargs):
        looked_at.append(path)
        return stat_file(path, *args, **kwargs)

    clock = Clock(NOW)
    verifier = _verifier_of(certs_dir(), certs.cert_path(certs_dir(), "router"), clock)
    metadata = router_tokens(clock).metadata("dev", "context")
    monkeypatch.setattr(mesh_auth.os, "stat", counted)
    assert verifier.tenant(metadata) == "dev"
    assert len(looked_at) == 2
    assert all(verifier.tenant(metadata) == "dev" for _ in range(1000))
    assert len(looked_at) == 2


async def test_a_call_that_ends_before_its_request_came_is_observed_as_what_ended_it():
    """MeshGuard serves unary methods request-streaming (the peer is checked
    before the request is read); a call cancelled or timed out while its
    request is held back ended the requests too, and was observed as
    INVALID_ARGUMENT MALFORMED_REQUEST. A call whose client sent no message
    and half-closed is malformed."""
    from meshgate.context.v1 import context_service_pb2_grpc
    from meshgate.errors import ErrorInterceptor
    from meshgate.reasons import Reason

    seen: list[tuple[str, str]] = []

    def observe(method, code, reason, started) -> None:
        seen.append((code, reason))

    class Context(context_service_pb2_grpc.ContextServiceServicer):
        async def GetSession(self, request, context):
            return context_service_pb2.GetSessionResponse()

    directory = certs_dir()
    guard = mesh_auth.MeshGuard()
    guard.restrict("context", ["router"])
    server = grpc.aio.server(interceptors=[ErrorInterceptor(observe), guard])
    context_service_pb2_grpc.add_ContextServiceServicer_to_server(Context(), server)
    ca = certs.ca_path(directory).read_bytes()
    pair = (
        certs.key_path(directory, "context").read_bytes(),
        certs.cert_path(directory, "context").read_bytes(),
    )
    port = server.add_secure_port(
        "127.0.0.1:0", grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=True)
    )
    await server.start()
    credentials = grpc.ssl_channel_credentials(
        ca,
        certs.key_path(directory, "router").read_bytes(),
        certs.cert_path(directory, "router").read_bytes(),
    )
    method = "/meshgate.context.v1.ContextService/GetSession"
    never = asyncio.Event()

    async def held_back():
        await never.wait()
        yield context_service_pb2.GetSessionRequest()

    async def observed(count: int) -> list[tuple[str, str]]:
        for _ in range(500):
            if len(seen) >= count:
                break
            await asyncio.sleep(0.01)
        return seen[:count]

    try:
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", "meshgate-context")]
        ) as channel:
            serialize = context_service_pb2.GetSessionRequest.SerializeToString
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.stream_unary(method, request_serializer=serialize)(iter([]), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert await observed(1) == [("INVALID_ARGUMENT", Reason.MALFORMED_REQUEST)]

            call = channel.stream_stream(method, request_serializer=serialize)(held_back())
            await call.wait_for_connection()
            await asyncio.sleep(0.1)  # the handler waits on the request
            call.cancel()
            assert (await observed(2))[1] == ("CANCELLED", "")

            call = channel.stream_stream(method, request_serializer=serialize)(held_back(), timeout=0.3)
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in call:
                    pass
            assert (await observed(3))[2] == ("DEADLINE_EXCEEDED", "")
    finally:
        await server.stop(None)
