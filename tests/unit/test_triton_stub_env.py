"""meshgate/local/triton.py's environment for Triton's Python stub: the
stub's numpy<2 must come before this venv's numpy 2 (the r24.10 stub reads
NumPy 1's layout), and this checkout's meshgate must be importable there
(minilm's model.py imports meshgate.minilm), which takes the venv's own .pth
files, the editable install's among them."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from meshgate.local import triton

# In the stub's environment: where numpy and meshgate.minilm come from. Only
# found, not imported: meshgate.minilm would import onnxruntime and numpy.
PROBE = """
import importlib.util, json, numpy
print(json.dumps({
    "numpy": numpy.__version__,
    "minilm": importlib.util.find_spec("meshgate.minilm").origin,
}))
"""


def test_the_stub_env_puts_its_numpy_first_and_finds_this_checkouts_meshgate(tmp_path: pathlib.Path):
    env_dir = tmp_path / "stub-env"
    python = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_packages = env_dir / "lib" / python / "site-packages"
    # A stand-in for the stub's numpy<2, told apart by its version.
    (site_packages / "numpy").mkdir(parents=True)
    (site_packages / "numpy" / "__init__.py").write_text('__version__ = "1.26.4+stub"\n')
    triton.prepare_stub_environment(env_dir)

    # cwd outside the checkout, so meshgate is found through the venv alone.
    probe = subprocess.run(
        [str(env_dir / "bin" / "python3"), "-c", PROBE],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert found["numpy"] == "1.26.4+stub"
    repo_root = pathlib.Path(__file__).resolve().parents[2]
    assert pathlib.Path(found["minilm"]) == repo_root / "meshgate" / "minilm.py"
