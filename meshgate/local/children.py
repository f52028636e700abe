"""How the local stack starts each of its children: Redis, Triton, a service.

Each leads its own session, so that a Ctrl-C meant for the stack's process
reaches only its ordered stop (router first, Redis last). That also put them
out of reach of anything that ends the stack's process outright: a `meshgate
up` or a test run killed with SIGKILL (the OOM killer, a CI job's timeout)
left Redis, Triton and the four services running, unowned, on the ports the
next start then refused as taken. So on Linux each child asks the kernel for
SIGTERM when the stack's process dies (PR_SET_PDEATHSIG), and stops as it
would on the stack's own stop (Redis writes its append-only file, a service
drains, Triton ends its model stubs), though all at once, not in order.

No preexec_fn asks for it: one makes subprocess fork() and run Python in the
child of a process that has grpc's threads, and twice children so started
died of SIGABRT or SIGSEGV before exec. The child is a fresh interpreter
instead (_LAUNCHER) that asks and then execs the program in its own place:
the same pid, so the stack's signals, waits and exit statuses are the
program's own.

The kernel's parent is the *thread* that started the child: the signal comes
when that thread ends, though the process lives on. A child the supervisor's
thread restarted would be stopped when supervision stops, ahead of the
ordered stop, and one a test started through asyncio.to_thread when its
event loop closes. So every child is started from one thread that lives as
long as the process (_Spawner).

A service is started with SIGHUP ignored (``ignore_hangup``): its default
action killed a service that got one (an operator's "HUP to reload") while
it still imported its modules, a second or more, before serving.main
installs the service's own handler. An ignored disposition survives exec;
the reload it asked for is not lost, as the settings are read after the
imports. The spawner's thread blocks SIGHUP, and its children start so, so
that one sent before the launcher has ignored it waits instead of killing
it; the launcher unblocks it before the exec (for a program that does not
ignore it, a SIGHUP that waited then ends it, as it would have).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading

# Run as `python -I -S -c _LAUNCHER <stack pid> <ignore|default> <program>
# <arguments...>` (the second: SIGHUP's disposition for the program): without
# site and PYTHON* variables it starts in about 20 ms. Before the exec it
# undoes what the interpreter's own start changed: it ignores
# SIGPIPE and SIGXFSZ (subprocess had reset both for the program, and an
# ignored signal stays ignored across exec), and under the C locale it sets
# LC_CTYPE (PEP 538); the environment as subprocess gave it is still in /proc.
_LAUNCHER = """
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
if os.getppid() != int(sys.argv[1]):
    sys.exit("the stack exited before this child started")  # so no signal will come
for signum in (signal.SIGPIPE, signal.SIGXFSZ):
    signal.signal(signum, signal.SIG_DFL)
if sys.argv[2] == "ignore":
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # and one waiting is discarded
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
with open("/proc/self/environ", "rb") as given:
    environ = dict(entry.split(b"=", 1) for entry in given.read().split(b"\\0") if entry)
try:
    os.execvpe(sys.argv[3], sys.argv[3:], environ)
except OSError as error:  # start() checked the program; its format, say, it could not
    sys.exit(f"cannot run {sys.argv[3]}: {error}")
"""


def start(command: list[str], ignore_hangup: bool = False, **options) -> subprocess.Popen:
    """subprocess.Popen(command, **options) for a child of the stack: in a
    session of its own and, on Linux, sent SIGTERM when this process dies
    and with SIGHUP ignored if ``ignore_hangup`` (a service, which installs
    its own handler)."""
    options["start_new_session"] = True
    if sys.platform != "linux":
        return subprocess.Popen(command, **options)
    _check_runnable(str(command[0]), options)
    hangup = "ignore" if ignore_hangup else "default"
    launched = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), hangup, *command]
    return _spawner().popen(launched, options)


def last_lines(path, count: int) -> str:
    """The end of a child's log, for the error that says it died: in CI the
    log directory is gone by the time anyone reads the failure."""
    try:
        with open(path, "rb") as log:
            return "\n".join(log.read().decode(errors="replace").splitlines()[-count:])
    except OSError as error:
        return f"(unreadable: {error})"


def terminate(process: subprocess.Popen) -> None:
    """Asks a child of the stack to stop in order: SIGTERM, and SIGCONT to
    its process group, as systemd sends after it. A stopped child (SIGSTOP,
    a debugger's pause) takes a SIGTERM only once continued: without the
    SIGCONT every stop of one (Ctrl-C's, the supervisor's) waited out its
    grace and then killed it, Redis with its last writes, Triton with its
    models' stubs."""
    process.send_signal(signal.SIGTERM)
    if process.poll() is None:  # once reaped, its pid and group may be another's
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGCONT)


def _check_runnable(program: str, options: dict) -> None:
    """Raises, as subprocess.Popen would for a direct start, if ``program``
    is no executable file (on the child's PATH when it names no directory):
    the launcher's exec failing showed only as the child's traceback and
    exit status 1, once the stack looked for it to serve."""
    environ = options["env"] if options.get("env") is not None else os.environ
    if os.sep not in program:
        search_path = environ.get("PATH", os.defpath)
        if shutil.which(program, path=search_path) is None:
            raise FileNotFoundError(
                f"cannot start {program}: no executable of that name on PATH ({search_path})"
            )
        return
    path = os.path.join(options.get("cwd") or "", program)
    if not os.path.exists(path):
        raise FileNotFoundError(f"cannot start {program}: no such file")
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise PermissionError(f"cannot start {program}: not an executable file")


class _Spawner:
    """A thread that starts children and never ends (see the module's docstring)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="meshgate-children", daemon=True).start()

    def _serve(self) -> None:
        # Children start with this thread's signal mask (see the module's
        # docstring); the process's own SIGHUP goes to its other threads.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        while True:
            started, command, options = self._requests.get()
            try:
                started.set_result(subprocess.Popen(command, **options))
            except BaseException as error:  # noqa: BLE001 - raised in the caller's thread
                started.set_exception(error)

    def popen(self, command: list[str], options: dict) -> subprocess.Popen:
        started: concurrent.futures.Future[subprocess.Popen] = concurrent.futures.Future()
        self._requests.put((started, command, options))
        try:
            return started.result()
        except BaseException:
            # Either Popen failed, or the caller was interrupted (Ctrl-C, a
            # test's timeout) while the child starts: then no one will ever
            # own that child, so it is killed as soon as it exists.
            started.add_done_callback(_end_unowned)
            raise


def _end_unowned(started: concurrent.futures.Future[subprocess.Popen]) -> None:
    """Kills the child a start left to no caller, and whatever it started in
    its process group (it leads one), if the start made a child at all."""
    if started.exception() is None:
        process = started.result()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


_the_spawner: _Spawner | None = None
_the_spawner_lock = threading.Lock()


def _spawner() -> _Spawner:
    global _the_spawner
    with _the_spawner_lock:
        # Made on first use; again in a forked child, which has none of its
        # parent's threads.
        if _the_spawner is None or _the_spawner.pid != os.getpid():
            _the_spawner = _Spawner()
        return _the_spawner
