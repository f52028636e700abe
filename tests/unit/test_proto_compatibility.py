"""`buf breaking` (run by `make test` against main) must be able to fail:
shown on a copy of the protos with a field removed."""

import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUF = pathlib.Path(sys.executable).parent / "buf"


def buf_breaking(changed: pathlib.Path, original: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BUF), "breaking", str(changed), "--against", str(original)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def copy_module(destination: pathlib.Path) -> pathlib.Path:
    shutil.copytree(ROOT / "protos", destination / "protos")
    shutil.copy(ROOT / "buf.yaml", destination / "buf.yaml")
    return destination


def test_removing_a_field_is_reported_as_breaking(tmp_path):
    original = copy_module(tmp_path / "original")
    changed = copy_module(tmp_path / "changed")
    proto = changed / "protos/meshgate/router/v1/router_service.proto"
    text = proto.read_text()
    assert "  CachePolicy cache_policy = 5;\n" in text
    proto.write_text(text.replace("  CachePolicy cache_policy = 5;\n", "", 1))

    assert buf_breaking(original, original).returncode == 0
    result = buf_breaking(changed, original)
    assert result.returncode != 0
    assert "cache_policy" in result.stdout + result.stderr
