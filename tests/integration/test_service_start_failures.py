"""A service process that cannot start: one JSON log line says why, and it
exits 1, where a traceback of plain text on stderr said it before. The
Redis URL it names shows no password: a deployment's comes from a secret,
and a pod's log is read by more people than the secret."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from meshgate import serving
from meshgate.local.stack import free_port

pytestmark = pytest.mark.integration

PASSWORD = "S3cretRedisPassw0rd"


def started(service: str, listen: str = "127.0.0.1:0", **environ: str) -> tuple[int, list[dict]]:
    """Starts ``service`` as the deployments do, on the environment alone;
    returns its exit status and its log lines, each read as JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_") and k != "REDIS_URL"}
    env |= {"MESHGATE_MESH__TLS": "false", "MESHGATE_TELEMETRY__METRICS": "false", **environ}
    done = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--listen", listen],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout == ""
    return done.returncode, [json.loads(line) for line in done.stderr.splitlines()]


@pytest.mark.parametrize(
    ("service", "environ"),
    [
        ("cache", {"MESHGATE_CACHE__EMBEDDER": "inference"}),
        ("context", {"MESHGATE_CONTEXT__EMBEDDER": "inference"}),
    ],
)
def test_a_service_whose_redis_does_not_answer_says_so_without_its_password(service, environ) -> None:
    port = free_port()  # nobody listens there
    code, lines = started(service, REDIS_URL=f"redis://default:{PASSWORD}@127.0.0.1:{port}/0", **environ)
    assert code == serving.START_FAILED
    assert PASSWORD not in json.dumps(lines)
    last = lines[-1]
    assert (last["event"], last["level"], last["service"]) == (
        "cannot start",
        "critical",
        f"meshgate-{service}",
    )
    assert last["error"].startswith(f"cannot reach Redis at redis://default:***@127.0.0.1:{port}/0: ")


@pytest.mark.parametrize(
    ("credential", "error"),
    [
        # A token given as the user (or a password, to clients that follow
        # the IANA scheme's [[user:]password@]).
        (f"{PASSWORD}@", "cannot reach Redis at redis://***@127.0.0.1:{port}/0: "),
        # An unencoded '/' cuts the password short: the rest reads as a port
        # (refused as the settings load, naming the setting).
        (f":Xq7/{PASSWORD}@", "redis.url: redis URL '<a Redis URL not shown"),
    ],
)
def test_no_form_of_credential_is_named_when_the_service_cannot_start(credential, error) -> None:
    port = free_port()
    code, lines = started(
        "context", REDIS_URL=f"redis://{credential}127.0.0.1:{port}/0", MESHGATE_CONTEXT__EMBEDDER="inference"
    )
    assert code == serving.START_FAILED
    assert PASSWORD not in json.dumps(lines) and "Xq7" not in json.dumps(lines)
    assert lines[-1]["error"].startswith(error.format(port=port))


def test_settings_refused_at_load_are_reported_the_same_way() -> None:
    code, lines = started("context", MESHGATE_CONTEXT__SESSION_TTL_S="-1")
    assert code == serving.START_FAILED
    assert [(line["event"], line["error_type"]) for line in lines] == [("cannot start", "ConfigError")]
    assert "context.session_ttl_s" in lines[0]["error"]


@pytest.mark.parametrize(
    ("service", "port_setting", "port_name"),
    [
        ("router", "--listen", "router"),
        ("inference", "MESHGATE_MESH__HEALTH_LISTEN", "inference (health checks)"),
        ("inference", "MESHGATE_INFERENCE__METRICS_LISTEN", "inference (metrics)"),
        ("router", "MESHGATE_ROUTER__HTTP_LISTEN", "router (HTTP)"),
    ],
    ids=["service port", "health port", "metrics port", "HTTP port"],
)
def test_a_port_in_use_is_said_in_the_one_line_without_a_traceback(service, port_setting, port_name) -> None:
    """grpc refused the port with a RuntimeError naming no reason, and its
    cause on a line of plain text: the start ended in a traceback. The
    metrics and HTTP ports ended in one line naming neither the port nor
    which it was ("[Errno 98] Address already in use"): a second replica on
    one host, given its own --listen alone, could not tell it had met the
    first's metrics_listen."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = f"127.0.0.1:{holder.getsockname()[1]}"
        if port_setting == "--listen":
            code, lines = started(service, listen=held)
        else:
            # Metrics stay off (started) but where their own port is the one held.
            metrics = (
                {"MESHGATE_TELEMETRY__METRICS": "true"} if port_setting.endswith("METRICS_LISTEN") else {}
            )
            code, lines = started(service, **metrics, **{port_setting: held})
    assert code == serving.START_FAILED
    assert [
        (line["event"], line["error_type"]) for line in lines if line["level"] in ("error", "critical")
    ] == [("cannot start", "OSError")]
    assert lines[-1]["error"] == f"{port_name}: cannot listen on {held}: Address already in use"


def test_a_listen_host_that_does_not_resolve_is_said_in_the_one_line() -> None:
    code, lines = started("router", listen="no-such-host.invalid:50051")
    assert code == serving.START_FAILED
    assert lines[-1]["error_type"] == "OSError"
    assert lines[-1]["error"].startswith("router: cannot listen on no-such-host.invalid:50051: ")


@pytest.mark.parametrize(
    ("how", "error_type", "error"),
    [
        ("--listen", "OSError", "router must name a host; ':{port}' names none (0.0.0.0:{port} "),
        (
            "MESHGATE_MESH__HEALTH_LISTEN",
            "ConfigError",
            "mesh.health_listen must name a host; ':{port}' names none",
        ),
    ],
)
def test_a_listen_address_without_a_host_is_refused_in_the_one_line(how, error_type, error) -> None:
    """grpc refused ':port' with "Failed to bind" and a line of plain text
    of its own ("host must not be empty"): no setting named, no JSON."""
    port = free_port()
    if how == "--listen":
        code, lines = started("router", listen=f":{port}")
    else:
        code, lines = started("inference", **{how: f":{port}"})
    assert code == serving.START_FAILED
    assert [(line["event"], line["error_type"]) for line in lines if line["level"] == "critical"] == [
        ("cannot start", error_type)
    ]
    assert lines[-1]["error"].startswith(error.format(port=port))
