"""Run the tritonserver binary that the nvidia-pytriton wheel ships, on CPU.

The wheel is only a carrier for the binary, its Python backend and its
per-interpreter stubs; pytriton's own Python API is not used because its
proxy process costs a whole core. Hand-written Python-backend models from
`model_repository/` run directly in the binary.

The Python backend runs each model in a "stub" process that embeds Python.
Two facts about the wheel's stub (python_backend r24.10, pybind11 2.10.0)
shape this module:

* It starts Python in isolated mode, so PYTHONPATH is ignored. It finds its
  environment the way a plain `python3` does: the first `python3` on PATH
  and the `pyvenv.cfg` beside it. So the stub is pointed at an environment by
  putting that environment's bin/ first on PATH.
* Its pybind11 predates NumPy 2 and reads NumPy 1's struct layout: under
  NumPy 2 every input arrives as copies of its first element and BYTES
  tensors fail with "unpack_from requires a buffer of at least ... bytes".
  (pytriton 0.7.0 itself requires numpy<2.) The stub environment therefore
  layers numpy<2 over the running venv's site-packages; see
  prepare_stub_environment().

One-time setup (downloads numpy<2 from PyPI), then run in the foreground:

    python -m meshgate.local.triton --prepare-stub-env
    python -m meshgate.local.triton --grpc-port 8001
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import typing
from collections.abc import Sequence
from pathlib import Path

from meshgate.local import children

if typing.TYPE_CHECKING:
    import tritonclient.grpc

# A checkout's model repository (a Triton image brings its own: deploy/docker/triton.Dockerfile).
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"
# What `make run` serves. Triton runs with explicit model control and loads
# exactly the models it is given: a caller that needs only tiny_gpt does not
# pay smollm2's ~5 s load and ~0.8 GB, and model_repository/generation/ (code
# the text models share, not a model) is never taken for a model.
DEFAULT_MODELS = ("tiny_gpt", "minilm", "smollm2")
STUB_NUMPY_REQUIREMENT = "numpy>=1.26,<2"


def _pytriton_root() -> Path:
    # find_spec: locate the wheel's files without importing pytriton itself.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed (pip install 'meshgate[local]')")
    return Path(next(iter(spec.submodule_search_locations)))


def tritonserver_binary() -> Path:
    binary = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise RuntimeError(f"tritonserver binary not found at {binary}")
    return binary


def _link(target: Path, link: Path) -> None:
    """Point `link` at `target`, atomically, so concurrent launches never see it missing."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    temporary = link.with_name(f".{link.name}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    temporary.replace(link)


def _write(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(text)
        temporary.replace(path)


def prepare_backend_dir(state_dir: str | os.PathLike[str]) -> Path:
    """Build a backend directory whose python/ holds the stub for THIS interpreter.

    The wheel's backends/python/ has no stub; libtriton_python.so looks for
    `triton_python_backend_stub` next to itself, and each stub embeds one
    Python version, so the one matching the running interpreter is linked in.
    """
    triton_root = _pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = triton_root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"no Python backend stub for Python {version} in {stub.parent.parent}")
    wheel_backend = triton_root / "backends" / "python"

    python_dir = Path(state_dir) / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in (
        wheel_backend / "libtriton_python.so",
        wheel_backend / "triton_python_backend_utils.py",
        stub,
    ):
        _link(source, python_dir / source.name)
    return python_dir.parent


def default_stub_env_dir() -> Path:
    # Inside the venv: it layers over this venv and goes away with it.
    return Path(sys.prefix) / "triton-stub-env"


def prepare_stub_environment(env_dir: str | os.PathLike[str] | None = None, install: bool = False) -> Path:
    """The environment the stub runs in: numpy<2 first, then this venv's packages.

    A venv-shaped directory (pyvenv.cfg, bin/python3, site-packages) that the
    stub adopts when its bin/ leads PATH. Its site-packages holds numpy<2 and a
    .pth file that appends the running venv's site-packages, so everything
    else (tokenizers, onnxruntime, model packages, meshgate) comes from the venv.
    `install=True` fetches numpy with pip; otherwise it must be there already.
    """
    env_dir = Path(env_dir) if env_dir is not None else default_stub_env_dir()
    site_packages = (
        env_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    )
    site_packages.mkdir(parents=True, exist_ok=True)
    if install:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--upgrade",
                "--no-warn-conflicts",
                "--only-binary=:all:",
                "--target",
                str(site_packages),
                STUB_NUMPY_REQUIREMENT,
            ],
            check=True,
        )
    if not (site_packages / "numpy").is_dir():
        raise RuntimeError(
            f"Triton's Python stub needs {STUB_NUMPY_REQUIREMENT} in {site_packages}; "
            "run `python -m meshgate.local.triton --prepare-stub-env` once (fetches it from PyPI)"
        )
    (env_dir / "bin").mkdir(exist_ok=True)
    _link(Path(sys.executable), env_dir / "bin" / "python3")
    _write(
        env_dir / "pyvenv.cfg",
        f"home = {Path(sys.base_prefix) / 'bin'}\n"
        "include-system-site-packages = false\n"
        f"version = {sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}\n",
    )
    venv_paths = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    # addsitedir, not a bare path: the venv's own .pth files must run too,
    # among them the editable install's finder that makes this checkout's
    # meshgate importable (minilm's model.py imports meshgate.minilm). It
    # appends, so numpy<2 above still comes first.
    _write(
        site_packages / "meshgate-venv.pth",
        "".join(f"import site; site.addsitedir({p!r})\n" for p in venv_paths),
    )
    return env_dir


def triton_environment(
    stub_env_dir: str | os.PathLike[str], base: dict[str, str] | None = None
) -> dict[str, str]:
    """Environment for tritonserver and, through inheritance, its Python stubs."""
    env = dict(os.environ if base is None else base)
    # One BLAS thread per stub: on a busy 2-core machine two OpenBLAS threads
    # made smollm2's decoding slower, not faster, and each model already has
    # its own process. Set before the stub imports numpy, which is too early
    # for the model's own code to do it.
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, "1")
    # The stub's RPATH holds only the wheel's own libraries, so without this it
    # loads the distro's /lib/x86_64-linux-gnu/libpython3.x.so: another build
    # (here 3.11.2) than the interpreter whose stdlib and venv it then uses.
    library_path = [sysconfig.get_config_var("LIBDIR")]
    # The stub finds its environment through the first python3 on PATH.
    path = [str(Path(stub_env_dir) / "bin")]
    for name, entries in (("LD_LIBRARY_PATH", library_path), ("PATH", path)):
        if env.get(name):
            entries.append(env[name])
        env[name] = os.pathsep.join(entries)
    return env


def build_command(
    model_repository: str | os.PathLike[str],
    grpc_port: int,
    http_port: int | None,
    metrics_port: int | None,
    backend_dir: str | os.PathLike[str],
    log_file: str | os.PathLike[str] | None = None,
    models: Sequence[str] = DEFAULT_MODELS,
    shm_prefix: str | None = None,
) -> list[str]:
    """Command line for tritonserver serving `models`; a port of None turns
    that endpoint off; `shm_prefix` names its Python backend's shared-memory
    regions (/dev/shm/<prefix>*; Triton's own default if None)."""
    if not models:
        raise ValueError("tritonserver needs at least one model to load")
    command = [
        str(tritonserver_binary()),
        f"--model-repository={model_repository}",
        f"--backend-directory={backend_dir}",
        "--model-control-mode=explicit",
        *(f"--load-model={model}" for model in models),
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        "--log-verbose=0",
        "--log-info=true",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--exit-timeout-secs=10",
    ]
    if http_port is None:
        command.append("--allow-http=false")
    else:
        command += ["--allow-http=true", "--http-address=127.0.0.1", f"--http-port={http_port}"]
    if metrics_port is None:
        command.append("--allow-metrics=false")
    else:
        command += [
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={metrics_port}",
        ]
    if shm_prefix is not None:
        command.append(f"--backend-config=python,shm-region-prefix-name={shm_prefix}")
    if log_file is not None:
        command.append(f"--log-file={log_file}")
    return command


def launch(
    model_repository: str | os.PathLike[str] = DEFAULT_MODEL_REPOSITORY,
    grpc_port: int = 8001,
    http_port: int | None = None,
    metrics_port: int | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    log_file: str | os.PathLike[str] | None = None,
    stub_env_dir: str | os.PathLike[str] | None = None,
    models: Sequence[str] = DEFAULT_MODELS,
) -> subprocess.Popen[bytes]:
    """Start tritonserver in the background with `models` loaded; pair with
    wait_ready() (given the same models) and terminate()."""
    state_dir = (
        Path(state_dir) if state_dir is not None else Path(tempfile.mkdtemp(prefix="meshgate-triton-"))
    )
    # Its own name for its shared memory, so that what a killed server
    # leaves in /dev/shm can be told from others' and removed (terminate).
    shm_prefix = f"meshgate_triton_{os.getpid()}_{secrets.token_hex(4)}_"
    command = build_command(
        model_repository,
        grpc_port,
        http_port,
        metrics_port,
        prepare_backend_dir(state_dir),
        log_file,
        models,
        shm_prefix,
    )
    environment = triton_environment(prepare_stub_environment(stub_env_dir))
    if log_file is None:
        process = children.start(command, env=environment, stdin=subprocess.DEVNULL)
    else:
        # Its output too, not only its log: tritonserver prints some lines
        # straight to stdout and stderr whatever --log-file says ("Signal
        # (15) received." at every stop, on the terminal of `meshgate up`
        # under the stack's own lines), and so do its models' Python stubs
        # (a model.py's traceback). Appended (O_APPEND, as Triton opens its
        # log file: neither overwrites the other's lines), so the file holds
        # everything the server said, in order.
        with open(log_file, "ab") as output:
            process = children.start(
                command, env=environment, stdin=subprocess.DEVNULL, stdout=output, stderr=output
            )
    process.shm_prefix = shm_prefix
    # Where wait_ready's error sends the reader (the server's own cause is there).
    process.log_file = log_file
    return process


# Where the Python backend's shared-memory regions live.
SHARED_MEMORY_DIR = Path("/dev/shm")


def remove_shared_memory(process: subprocess.Popen[bytes]) -> list[Path]:
    """Removes the shared-memory regions of a launch() that has exited: a
    server killed with SIGKILL leaves them (1 MiB or more a model, in RAM,
    one set more at every restart); one that stopped in order removed its
    own. Returns those removed; nothing for a process launch() did not make."""
    prefix = getattr(process, "shm_prefix", None)
    if not prefix or process.poll() is None:
        return []
    removed = []
    for region in SHARED_MEMORY_DIR.glob(f"{prefix}*"):
        with contextlib.suppress(FileNotFoundError):
            region.unlink()
            removed.append(region)
    return removed


def ready(client: tritonclient.grpc.InferenceServerClient, models: Sequence[str], timeout_s: float) -> bool:
    """Whether the server ``client`` talks to and every model in ``models``
    say they are ready (ServerReady, ModelReady): it accepts connections
    before, while it loads them, and after, while it stops."""
    from tritonclient.utils import InferenceServerException

    try:
        return client.is_server_ready(client_timeout=timeout_s) and all(
            client.is_model_ready(model, client_timeout=timeout_s) for model in models
        )
    except InferenceServerException:
        return False  # not accepting connections, or no answer in time


def wait_ready(
    grpc_url: str,
    models: Sequence[str] = DEFAULT_MODELS,
    timeout: float = 60.0,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Block until the server and every model in `models` report ready.

    Raises TimeoutError after `timeout` seconds, or RuntimeError as soon as
    `process` exits (e.g. a model failed to load under --exit-on-error).
    """
    import tritonclient.grpc as grpcclient

    deadline = time.monotonic() + timeout
    with grpcclient.InferenceServerClient(grpc_url) as client:
        while True:
            if process is not None and process.poll() is not None:
                # The cause is in its log (its own lines and what it printed:
                # launch); its end in the error itself, as for a service
                # (meshgate.local.stack), which `meshgate up` prints.
                log = getattr(process, "log_file", None)
                ended = f"; see {log}; it ended:\n{children.last_lines(log, 20)}" if log is not None else ""
                raise RuntimeError(
                    f"tritonserver exited with code {process.returncode} before it was ready{ended}"
                )
            if ready(client, models, timeout_s=2.0):
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Triton at {grpc_url} not ready within {timeout:.0f} s")
            time.sleep(0.2)


# How long a stop waits for Triton to drain after SIGTERM before SIGKILL.
STOP_GRACE_S = 15.0


def terminate(process: subprocess.Popen[bytes], timeout: float = STOP_GRACE_S) -> int:
    """SIGTERM, then SIGKILL if Triton has not drained within `timeout` seconds."""
    if process.poll() is None:
        children.terminate(process)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    # A server that was killed (SIGKILL) leaves its Python-backend stubs
    # running, each holding a model's memory: they share the server's process
    # group (launch() starts it as a session leader), so end the group too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    remove_shared_memory(process)
    return process.returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run tritonserver in the foreground.")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=None, help="omit to disable HTTP")
    parser.add_argument("--metrics-port", type=int, default=None, help="omit to disable metrics")
    parser.add_argument("--state-dir", type=Path, default=None, help="where the backend directory goes")
    parser.add_argument("--log-file", type=Path, default=None, help="default: stdout")
    parser.add_argument("--stub-env-dir", type=Path, default=None, help=f"default: {default_stub_env_dir()}")
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        default=None,
        help=f"a model to load (repeatable); default: {' '.join(DEFAULT_MODELS)}",
    )
    parser.add_argument(
        "--prepare-stub-env",
        action="store_true",
        help=f"install {STUB_NUMPY_REQUIREMENT} for the Python stub (from PyPI), then exit",
    )
    args = parser.parse_args(argv)

    if args.prepare_stub_env:
        print(f"stub environment ready at {prepare_stub_environment(args.stub_env_dir, install=True)}")
        return 0
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="meshgate-triton-"))
    command = build_command(
        args.model_repository.resolve(),
        args.grpc_port,
        args.http_port,
        args.metrics_port,
        prepare_backend_dir(state_dir),
        args.log_file,
        args.models or DEFAULT_MODELS,
    )
    # exec: signals reach Triton directly and its exit status is ours.
    os.execve(command[0], command, triton_environment(prepare_stub_environment(args.stub_env_dir)))


if __name__ == "__main__":
    sys.exit(main())
