"""What ships is what runs: the wheel an image installs holds the four
services, the files they read at run time and the probe, and none of the
local stack; installed into a fresh virtual environment, away from the
checkout, every service's entry point starts from the installed copy."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest

from meshgate import mesh_auth

# Loads a real model or builds an artifact: seconds per test, so `make test-unit` leaves it out.
pytestmark = pytest.mark.heavy

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVICES = mesh_auth.MESH_SERVICES
# What the image's build stage copies before `pip install .`.
IMAGE_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "meshgate", "services")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wheel")
    # From what deploy/docker/Dockerfile copies, as it copies it: a build in
    # the checkout itself would reuse its build/ folder, stale modules included.
    source = tmp_path_factory.mktemp("source")
    for name in IMAGE_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    # No build isolation: the build backend comes from this venv, so nothing is downloaded.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "-q", "-w", out],
        check=True,
        cwd=out,
    )
    (built,) = out.glob("meshgate-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> pathlib.Path:
    """A fresh venv holding only the wheel; its dependencies come from this
    venv's site-packages through a plain path entry (so this venv's editable
    install of the checkout, activated by a .pth file of its own, is not)."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
        check=True,
    )
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    dependencies = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    pathlib.Path(site, "meshgate-dependencies.pth").write_text("".join(f"{p}\n" for p in dependencies))
    return venv


def _wheel_files(wheel: pathlib.Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_the_wheel_holds_the_services_their_data_and_the_probe_but_not_the_local_stack(wheel):
    files = _wheel_files(wheel)
    for service in SERVICES:
        assert f"services/{service}/__main__.py" in files
        assert f"services/{service}/app.py" in files
    assert "services/cache/verifier_model.json" in files
    assert "meshgate/probe.py" in files
    assert not [name for name in files if name.startswith("meshgate/local/")]
    assert not [name for name in files if name.startswith(("model_repository/", "tests/", "bench/"))]
    with zipfile.ZipFile(wheel) as archive:
        entry_points = next(n for n in files if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    for service in SERVICES:
        assert f"meshgate-{service} = services.{service}.__main__:main" in scripts
    assert "meshgate-probe = meshgate.probe:main" in scripts


def _imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_runtime_module_reaches_into_a_checkout(wheel):
    """Runtime code neither imports the local stack nor finds files relative
    to a repository root; the CLI alone reaches the local stack, for `up`
    and `certs`, which are run from a checkout."""
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not name.endswith(".py") or name == "meshgate/cli.py":
                continue
            source = archive.read(name).decode()
            assert not {i for i in _imports(source) if i.startswith("meshgate.local")}, name
            assert "REPO_ROOT" not in source, name
            if name != "meshgate/config.py":  # its checkout default yields to MESHGATE_SMOLLM2_FILES
                assert "model_repository" not in source.replace("# ", ""), name


def test_every_service_starts_from_the_installed_copy(installed, tmp_path):
    python = installed / "bin" / "python"
    # Away from the checkout, with nothing of it on the path.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MESHGATE_CONFIG")}
    env["MESHGATE_SMOLLM2_FILES"] = str(tmp_path / "smollm2")
    probe = textwrap.dedent(
        """
        import importlib, json, sys
        loaded = {}
        for service in ("router", "context", "cache", "inference"):
            for module in ("app", "__main__"):
                name = f"services.{service}.{module}"
                loaded[name] = importlib.import_module(name).__file__
        from meshgate import config, probe
        from services.cache import verifier
        verifier.MODEL_PATH.read_text()
        loaded["smollm2"] = config.SMOLLM2_TOKENIZER
        loaded["local"] = sorted(m for m in sys.modules if m.startswith("meshgate.local"))
        print(json.dumps(loaded))
        """
    )
    done = subprocess.run([python, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    site = str(installed)
    for service in SERVICES:
        assert loaded[f"services.{service}.app"].startswith(site)
    assert loaded["smollm2"] == str(tmp_path / "smollm2" / "tokenizer.json")
    assert loaded["local"] == []
    # Each console script resolves to the installed entry point.
    for script in [*(f"meshgate-{s}" for s in SERVICES), "meshgate-probe"]:
        shown = subprocess.run(
            [installed / "bin" / script, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert shown.returncode == 0, (script, shown.stderr)
        assert "usage:" in shown.stdout
    # The local stack's commands say where they run instead of a traceback.
    for command in (["up", "--no-demo"], ["certs", "--out", str(tmp_path / "certs")]):
        refused = subprocess.run(
            [installed / "bin" / "meshgate", *command], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert refused.returncode == 2, (command, refused.stderr)
        assert "runs from a source checkout" in refused.stderr
        assert "Traceback" not in refused.stderr
    assert not (tmp_path / "certs").exists()
