"""`meshgate certs` on a folder of its own, and where it cannot write."""

from __future__ import annotations

import os
import pathlib
import stat

import pytest

from meshgate import cli


@pytest.fixture
def no_umask():
    """umask 0, as some service managers and containers run with."""
    before = os.umask(0)
    try:
        yield
    finally:
        os.umask(before)


def mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_folder_and_private_keys_are_never_writable_or_readable_by_others(tmp_path, no_umask, capsys):
    """Under umask 0 the folder was made 0777: anyone could rename their
    own CA over ca.pem (the keys themselves were 0600)."""
    out = tmp_path / "new" / "certs"
    assert cli.main(["certs", "--out", str(out)]) == 0
    assert mode(out) == 0o755
    keys, certificates = sorted(out.glob("*.key")), sorted(out.glob("*.pem"))
    assert len(keys) == len(certificates) == 5
    assert {key.name: mode(key) for key in keys} == {key.name: 0o600 for key in keys}
    assert {cert.name: mode(cert) for cert in certificates} == {cert.name: 0o644 for cert in certificates}
    # Run twice: everything is reused, nothing written.
    capsys.readouterr()
    assert cli.main(["certs", "--out", str(out)]) == 0
    assert "are there and valid" in capsys.readouterr().out


@pytest.mark.parametrize("below", ["", "sub"], ids=["the folder", "a parent"])
def test_a_folder_it_cannot_make_is_one_line_and_exit_1(tmp_path, capsys, below):
    """A file where the folder (or a parent) goes ended in a traceback
    (FileExistsError, NotADirectoryError), as no permission did."""
    in_the_way = tmp_path / "certs"
    in_the_way.write_text("not a folder")
    assert cli.main(["certs", "--out", str(in_the_way / below)]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("meshgate certs: [Errno ") and str(in_the_way) in err
    assert err.count("\n") == 1 and err.endswith("\n") and out == ""
