"""meshgate-probe's arguments: an address or a timeout it cannot use is a
usage error (exit 2, naming it), checked before anything is dialled."""

from __future__ import annotations

import pytest

from meshgate import probe


@pytest.mark.parametrize(
    ("args", "named"),
    [
        # grpc dialled 127.0.0.1:99999 as port 34463 (modulo 65536), which
        # another process may answer SERVING; "localhost" as port 443.
        (["--address", "127.0.0.1:99999"], "port 99999 is not 1-65535"),
        (["--address", "localhost"], "names no port"),
        (["--address", "unix:"], "names no socket path"),
        (["--timeout", "nan"], "--timeout must be a positive number"),
        (["--timeout", "-1"], "--timeout must be a positive number"),
    ],
)
def test_an_address_or_timeout_it_cannot_use_is_a_usage_error(args, named, capsys):
    with pytest.raises(SystemExit) as exited:
        probe.main(["router", *args])
    assert exited.value.code == 2
    assert named in capsys.readouterr().err
