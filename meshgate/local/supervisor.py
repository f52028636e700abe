"""Keeps a local mesh running: a child of the stack (Redis, Triton, a
service) that exits is started again, after a delay that grows with each
failure in a row, so a child that cannot start does not spin.

A child that runs but is not ready for too long is stopped, and so started
again: one that was up and has been unready (or has not answered) for
longer than ``unready_grace_s``, or one still starting ``start_timeout_s``
after its start, as a Kubernetes liveness or startup probe and systemd's
WatchdogSec end a unit that hangs: SIGTERM (and SIGCONT, for a stopped
one), then SIGKILL if it has not exited within the stack's stop grace
(Stack.stop_grace_s). Not while a child it depends on is not up
(Stack.ready_depends_on): the inference service is unready because Triton
is, and a restart of it would serve nothing sooner; Triton is restarted,
and the inference service's time counts from when Triton is up again.

The supervisor watches from a thread and restarts under a lock that
:meth:`Supervisor.stop` takes too: once stop() returns no restart is under
way or will begin, and the stack can be stopped in order.

It keeps each child's state in the stack's status file (Stack.status_path),
rewritten on every change, for `meshgate status` and scripts: up,
starting, unready or down since when, its restarts and how it last ended,
as `systemctl status` tells of a unit. Up means ready for work, as the
stack's start waits for it (Stack.ready), not merely accepting connections:
each pass asks every child that is starting or unready, and one that is up
once a second (UP_RECHECK_S). A pass waits for no answer: each ask runs on
a thread of its own, and its answer is taken on the pass that finds it, so
a child that stalls (SIGSTOP, a hung event loop: an ask waits
READY_TIMEOUT_S) delays no other child's restart, nor the status file.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import threading
import time

import structlog

from meshgate.local import certs, children, triton
from meshgate.local.stack import START_TIMEOUT_S, STATUS_FILE, Stack

log = structlog.get_logger(__name__)

# How often a child that is up is asked again whether it is still ready (one
# starting or unready is asked on every pass, so it is up as soon as it is
# ready): each ask is an RPC or three, and an idle mesh asked on every pass
# of 0.2 s cost some 4% of a core, the supervisor's and the children's
# together.
UP_RECHECK_S = 1.0

# How long a child that was up may be unready, or not answer (a stalled
# one's ask fails after READY_TIMEOUT_S), before it is stopped and started
# again: Kubernetes' default liveness probe (every 10 s, 3 failures in a
# row), so that a busy machine's slow answers, or a GC pause, restart
# nothing; longer than a service's drain (10 s), which ends in its exit
# anyway.
UNREADY_GRACE_S = 30.0


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Delay before restart number ``attempt`` (1, 2, ...) of a failing child."""

    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 30.0
    # A child that was up (ready) this long was healthy: its next exit starts
    # over at initial_s. Running alone is not enough: one that never got ready
    # (a Triton whose model load fails after minutes) keeps backing off.
    reset_after_s: float = 60.0

    def delay(self, attempt: int) -> float:
        try:
            grown = self.initial_s * self.factor ** (attempt - 1)
        except OverflowError:
            # Past a float's range (attempt 1025 at factor 2: some 8.5 hours
            # of failures 30 s apart) the delay is long since at its cap; the
            # error instead ended every restart of that child for good.
            return self.max_s
        return min(self.max_s, grown)


class RestartPolicy:
    """How many times in a row one child failed, and so how long to wait."""

    def __init__(self, backoff: Backoff) -> None:
        self._backoff = backoff
        self.attempt = 0
        # Since when the child has been up, if it is.
        self._up_since: float | None = None
        # Whether the child was up for reset_after_s at a stretch.
        self._healthy = False

    def started(self) -> None:
        """A new child runs: not up yet, nor healthy."""
        self._up_since = None
        self._healthy = False

    def up(self, now: float) -> None:
        self._up_since = now

    def not_up(self, now: float) -> None:
        """The child is no longer up (unready, or exited)."""
        if self._up_since is not None and now - self._up_since >= self._backoff.reset_after_s:
            self._healthy = True
        self._up_since = None

    def next_delay(self, exited_at: float) -> float:
        """Counts the exit of a child as one more failure (or the first of a
        new run, after a healthy period) and returns the delay before the
        restart."""
        self.not_up(exited_at)
        if self._healthy:
            self.attempt = 0
        self.attempt += 1
        return self._backoff.delay(self.attempt)

    def launch_failed(self) -> float:
        """Counts a restart that started no child as one more failure and
        returns the delay before the next try. Never a new run: the healthy
        period was the last child's: counted for each try after it, every one
        would be the first again, and come as soon."""
        self.attempt += 1
        return self._backoff.delay(self.attempt)


def describe_exit(returncode: int) -> dict[str, object]:
    """Popen's return code as a log field: a negative one is the signal."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return {"signal": signal.Signals(-returncode).name}
        return {"signal": -returncode}
    return {"exit_code": returncode}


def _kill_leftovers(process: subprocess.Popen) -> None:
    """Kills what the dead child left in its process group (every child of
    the stack leads one): Triton's Python-backend stub processes outlive a
    killed tritonserver and must not meet the one that replaces it. The
    group id cannot belong to anyone else: Linux does not reuse a pid as
    long as a group of that id exists."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    # A killed Triton's shared memory (nothing for other children).
    triton.remove_shared_memory(process)


@dataclasses.dataclass
class ChildStatus:
    """One child as the status file tells it. ``state``: "up" (running and
    ready for work: Stack.ready), "starting" (running, not ready yet since
    its start), "unready" (running, was up, is not ready now: a service
    draining after SIGTERM, the inference service without a ready Triton),
    "stopping" (the stack stops: supervision has ended) or "down" (exited;
    ``restart_at`` says when it is tried again, ``error``
    why the last try started nothing). ``stopped_for``: why the supervisor
    stopped the child, from the SIGTERM on and kept for the one started in
    its place (unready past the grace, or not ready past the start
    timeout); None when the last one exited on its own. ``log``: where the
    child writes, and so says why it exited (exit code 1 alone tells a
    child that crash-loops nothing). Times are Unix times."""

    state: str
    since: float
    pid: int | None
    restarts: int = 0
    last_exit: dict[str, object] | None = None
    restart_at: float | None = None
    error: str | None = None
    stopped_for: str | None = None
    log: str | None = None


def read_status(state_dir: pathlib.Path) -> dict | None:
    """The status file of the stack in ``state_dir`` as its supervisor last
    wrote it ({"pid", "children": {name: ChildStatus's fields}}), or None."""
    try:
        return json.loads((state_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


class Supervisor:
    def __init__(
        self,
        stack: Stack,
        backoff: Backoff | None = None,
        poll_interval_s: float = 0.2,
        asker: concurrent.futures.Executor | None = None,
        unready_grace_s: float = UNREADY_GRACE_S,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        """``asker`` runs the readiness asks (Stack.ready); by default a
        thread per child. A child that was up and is unready for longer
        than ``unready_grace_s``, or is not ready ``start_timeout_s`` after
        its start, is stopped and started again (see the module's docstring)."""
        self._stack = stack
        self._backoff = backoff or Backoff()
        self._poll_interval_s = poll_interval_s
        self._unready_grace_s = unready_grace_s
        self._start_timeout_s = start_timeout_s
        self._policies: dict[str, RestartPolicy] = {}
        # Child name -> when its restart is due.
        self._due: dict[str, float] = {}
        # Child name -> when it was last asked whether it is ready.
        self._asked_at: dict[str, float] = {}
        # Child name -> the ask not yet taken: the child asked of, and its answer.
        self._asks: dict[str, tuple[subprocess.Popen, concurrent.futures.Future[bool]]] = {}
        # Child name -> since when it has been not ready (starting, or
        # unready) while every child it depends on was up.
        self._not_ready_since: dict[str, float] = {}
        # Child name -> when the child the supervisor sent SIGTERM, as not
        # ready too long, is killed if it has not exited by then.
        self._kill_at: dict[str, float] = {}
        self._asker = asker
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts: dict[str, int] = {}
        self.status: dict[str, ChildStatus] = {}

    def start(self) -> None:
        if self._asker is None:
            # A thread per child: one that stalls holds up no other's ask.
            self._asker = concurrent.futures.ThreadPoolExecutor(
                max(1, len(self._stack.processes)), thread_name_prefix="meshgate-ready"
            )
        for name, process in self._stack.processes.items():
            self._policies[name] = RestartPolicy(self._backoff)
            self.status[name] = ChildStatus("starting", time.time(), process.pid, log=self._log(name))
        self._write_status()
        self._thread = threading.Thread(target=self._watch, name="meshgate-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends supervision; returns once no restart is in progress. Every
        child is then written "stopping": the stack stops them in order
        after this, and the file said "up" for each until the stack's lock
        went, its services draining or exited (a review: `meshgate status`
        read "6 of 6 up", exit code 0, for 13 s of a stop)."""
        with self._lock:
            self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        if self._asker is not None:
            # The asks under way end within seconds (READY_TIMEOUT_S a call),
            # before the stack closes the channels they use.
            self._asker.shutdown()
        if self.status:
            now = time.time()
            self.status = {
                name: dataclasses.replace(child, state="stopping", since=now)
                for name, child in self.status.items()
            }
            self._write_status()

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _watch(self) -> None:
        while not self._stopping.wait(self._poll_interval_s):
            try:
                self.check(time.monotonic())
            except Exception:
                # A watcher that died would leave the mesh unsupervised for good.
                log.exception("supervision pass failed")

    def check(self, now: float) -> None:
        """One pass: notices exits, restarts the children whose delay is
        over, and asks the others whether they are ready."""
        with self._lock:
            if self._stopping.is_set():
                return
            before = {name: dataclasses.replace(status) for name, status in self.status.items()}
            for name, process in list(self._stack.processes.items()):
                due = self._due.get(name)
                if due is None and process.poll() is not None:
                    self._schedule(name, process, now)
                elif due is not None and now >= due:
                    self._restart(name, now)
                elif name in self._kill_at:
                    self._kill_if_overdue(name, process, now)
                elif due is None:
                    self._check_ready(name, process, now)
                    self._stop_if_not_ready_too_long(name, process, now)
            if self.status != before:
                self._write_status()

    def _check_ready(self, name: str, process: subprocess.Popen, now: float) -> None:
        """A running child is up while it is ready; one that was up and is
        not ready now is unready. Its answer is taken on the first pass
        that finds it, never waited for."""
        status = self.status.get(name)
        if status is None:
            return
        if name not in self._asks:
            if status.state == "up" and now - self._asked_at[name] < UP_RECHECK_S:
                return
            self._asked_at[name] = now
            self._asks[name] = (process, self._asker.submit(self._stack.ready, name))
        asked, answer = self._asks[name]
        if not answer.done():
            return
        del self._asks[name]
        if asked is not process:
            return  # of a child that exited since, not of its replacement
        ready = answer.result()
        if ready and status.state != "up":
            self._policies[name].up(now)
            self.status[name] = dataclasses.replace(status, state="up", since=time.time())
        elif not ready and status.state == "up":
            self._policies[name].not_up(now)
            self.status[name] = dataclasses.replace(status, state="unready", since=time.time())

    def _stop_if_not_ready_too_long(self, name: str, process: subprocess.Popen, now: float) -> None:
        """Stops a child that has been unready for longer than the grace,
        or starting for longer than the start timeout (each alone: the
        grace counts from when a child that was up stopped being so), its
        time counted only while every child it depends on is up. Its exit
        is then noticed and restarted as any other."""
        status = self.status.get(name)
        if status is None or status.state == "up" or not self._dependencies_up(name):
            self._not_ready_since.pop(name, None)
            return
        since = self._not_ready_since.setdefault(name, now)
        if status.state == "starting":
            limit, reason = self._start_timeout_s, f"not ready {now - since:.1f} s after its start"
        else:
            limit, reason = self._unready_grace_s, f"unready for {now - since:.1f} s"
        if now - since <= limit:
            return
        reason += f", longer than {limit:g} s"
        del self._not_ready_since[name]
        grace = self._stack.stop_grace_s(name)
        self._kill_at[name] = now + grace
        children.terminate(process)
        self.status[name] = dataclasses.replace(status, stopped_for=reason)
        log.warning(
            "child not ready, stopping it to restart it",
            child=name,
            pid=process.pid,
            state=status.state,
            reason=reason,
            kill_in_s=grace,
            log=self._log(name),
        )

    def _dependencies_up(self, name: str) -> bool:
        return all(
            self.status[dependency].state == "up"
            for dependency in self._stack.ready_depends_on(name)
            if dependency in self.status
        )

    def _kill_if_overdue(self, name: str, process: subprocess.Popen, now: float) -> None:
        """Kills a child stopped as not ready once its stop grace is over."""
        if now < self._kill_at[name]:
            return
        log.warning("child did not stop in time, killing it", child=name, pid=process.pid)
        with contextlib.suppress(ProcessLookupError):
            process.kill()

    def _log(self, name: str) -> str:
        return str(self._stack.log_path(name))

    def _write_status(self) -> None:
        status = {
            "pid": os.getpid(),
            "children": {name: dataclasses.asdict(child) for name, child in self.status.items()},
        }
        try:
            certs.replace_file(self._stack.status_path, json.dumps(status, indent=1).encode(), 0o644)
        except OSError as error:  # a removed state folder, a full disk: supervision goes on
            log.warning("cannot write the status file", error=str(error))

    def _schedule(self, name: str, process: subprocess.Popen, now: float) -> None:
        _kill_leftovers(process)
        self._not_ready_since.pop(name, None)
        stopped_for = self.status[name].stopped_for if self._kill_at.pop(name, None) is not None else None
        policy = self._policies.setdefault(name, RestartPolicy(self._backoff))
        delay = policy.next_delay(now)
        self._due[name] = now + delay
        self.status[name] = ChildStatus(
            "down",
            time.time(),
            None,
            self.restarts.get(name, 0),
            last_exit=describe_exit(process.returncode),
            restart_at=time.time() + delay,
            stopped_for=stopped_for,
            log=self._log(name),
        )
        log.warning(
            "child exited, restarting",
            child=name,
            pid=process.pid,
            **describe_exit(process.returncode),
            stopped_for=stopped_for,
            attempt=policy.attempt,
            restart_in_s=delay,
            # What it said as it ended: the line alone tells nothing of why.
            log=self._log(name),
        )

    def _restart(self, name: str, now: float) -> None:
        del self._due[name]
        policy = self._policies[name]
        try:
            self._stack.launch(name)
        except Exception as error:  # noqa: BLE001 - e.g. a port still taken; try again later
            delay = policy.launch_failed()
            self._due[name] = now + delay
            down = self.status[name]
            self.status[name] = dataclasses.replace(down, restart_at=time.time() + delay, error=str(error))
            log.warning(
                "restart failed",
                child=name,
                error=str(error),
                attempt=policy.attempt,
                restart_in_s=delay,
                log=self._log(name),
            )
            return
        policy.started()
        # Its start timeout counts from now, not from the first pass that asks it.
        self._not_ready_since[name] = now
        self.restarts[name] = self.restarts.get(name, 0) + 1
        pid, down = self._stack.processes[name].pid, self.status[name]
        self.status[name] = ChildStatus(
            "starting",
            time.time(),
            pid,
            self.restarts[name],
            down.last_exit,
            stopped_for=down.stopped_for,
            log=self._log(name),
        )
        log.info("child restarted", child=name, pid=self._stack.processes[name].pid, attempt=policy.attempt)
