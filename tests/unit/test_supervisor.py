"""The supervisor's restart policy, and its bookkeeping over real child processes."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import threading
import time

import pytest
import structlog

from meshgate.local.supervisor import Backoff, RestartPolicy, Supervisor, describe_exit, read_status
from tests.inline_executor import InlineExecutor


def test_delays_double_up_to_the_cap() -> None:
    backoff = Backoff(initial_s=0.5, factor=2.0, max_s=5.0)
    assert [backoff.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_failures_in_a_row_back_off_and_a_healthy_run_starts_over() -> None:
    policy = RestartPolicy(Backoff(initial_s=1.0, factor=2.0, max_s=60.0, reset_after_s=30.0))
    # Dies at once, three times in a row.
    assert policy.next_delay(exited_at=1.0) == 1.0
    policy.started()
    assert policy.next_delay(exited_at=3.0) == 2.0
    policy.started()
    assert policy.next_delay(exited_at=6.0) == 4.0
    assert policy.attempt == 3
    # Then is up for longer than reset_after_s: the next failure is a first one.
    policy.started()
    policy.up(11.0)
    assert policy.next_delay(exited_at=41.0) == 1.0
    assert policy.attempt == 1


def test_a_run_that_was_never_up_that_long_is_no_healthy_one() -> None:
    """A child was healthy once it had run reset_after_s, ready or not: one
    that never got ready (a Triton whose model load failed after minutes)
    was restarted as soon each time, as though it had been serving."""
    policy = RestartPolicy(Backoff(initial_s=1.0, factor=2.0, max_s=60.0, reset_after_s=30.0))
    assert policy.next_delay(exited_at=1.0) == 1.0
    # Runs for minutes, never ready.
    policy.started()
    assert policy.next_delay(exited_at=200.0) == 2.0
    # Up at times, never for reset_after_s at a stretch.
    policy.started()
    policy.up(210.0)
    policy.not_up(230.0)
    policy.up(235.0)
    assert policy.next_delay(exited_at=255.0) == 4.0
    # Up that long, then unready before it exits: that run was healthy.
    policy.started()
    policy.up(260.0)
    policy.not_up(300.0)
    assert policy.next_delay(exited_at=400.0) == 1.0


def test_exit_codes_and_signals_are_told_apart() -> None:
    assert describe_exit(3) == {"exit_code": 3}
    assert describe_exit(-signal.SIGKILL) == {"signal": "SIGKILL"}


class _Stack:
    """Just what the supervisor uses of a Stack, over real processes, and a
    launch that fails while ``broken`` (as a port still taken, or a log
    folder removed, made Stack.launch raise)."""

    def __init__(self, state_dir: pathlib.Path) -> None:
        self.processes: dict[str, subprocess.Popen] = {}
        self.launched: list[str] = []
        self.broken = False
        self.status_path = state_dir / "status.json"
        # The children that are ready for work.
        self.ready_children: set[str] = set()

    def launch(self, name: str) -> None:
        if self.broken:
            raise FileNotFoundError("logs/redis.log")
        self.launched.append(name)
        self.processes[name] = subprocess.Popen(["sleep", "60"], start_new_session=True)

    def log_path(self, name: str) -> pathlib.Path:
        return pathlib.Path("logs") / f"{name}.log"

    def ready(self, name: str) -> bool:
        return name in self.ready_children

    def ready_depends_on(self, name: str) -> tuple[str, ...]:
        return ("triton",) if name == "inference" else ()

    def stop_grace_s(self, name: str) -> float:
        return 5.0

    def stop(self) -> None:
        for process in self.processes.values():
            process.kill()
            process.wait()


@pytest.fixture
def stack(tmp_path):
    stack = _Stack(tmp_path)
    yield stack
    stack.stop()


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_a_killed_child_is_restarted_after_its_delay(stack) -> None:
    stack.launch("cache")
    stack.launch("router")
    supervisor = Supervisor(stack, Backoff(initial_s=1.0, factor=2.0), asker=InlineExecutor())
    first = stack.processes["cache"]
    _kill(first)

    with structlog.testing.capture_logs() as logs:
        supervisor.check(now=10.0)  # notices the exit, schedules the restart
    assert stack.launched == ["cache", "router"]
    # The line points at what the child said as it ended.
    assert [(entry["event"], entry["log"]) for entry in logs] == [
        ("child exited, restarting", str(pathlib.Path("logs") / "cache.log"))
    ]
    supervisor.check(now=10.5)  # delay not over yet
    assert stack.launched == ["cache", "router"]
    supervisor.check(now=11.0)
    assert stack.launched == ["cache", "router", "cache"]
    assert stack.processes["cache"] is not first and stack.processes["cache"].poll() is None
    assert supervisor.restarts == {"cache": 1}

    # Killed again right away: the second delay is twice the first.
    _kill(stack.processes["cache"])
    supervisor.check(now=11.5)
    supervisor.check(now=12.5)
    assert stack.launched.count("cache") == 2
    supervisor.check(now=13.5)
    assert stack.launched.count("cache") == 3


def test_a_child_that_stopped_in_order_on_its_own_signal_is_restarted_as_a_crashed_one(
    stack, tmp_path
) -> None:
    """`kill -INT` (or -TERM) sent to one service alone, not to `meshgate
    up`: the service drains and exits 0. That is no stop of the stack's: it
    is restarted, and the status says how it ended, rather than left down
    while the rest of the stack runs (driven live: a router's 8 streams
    finished within its drain, the router up again 6 s after the SIGINT)."""
    stack.launch("router")
    # Its thread would pass on its own clock: the passes here are the test's.
    supervisor = Supervisor(stack, Backoff(initial_s=1.0), poll_interval_s=3600, asker=InlineExecutor())
    supervisor.start()
    try:
        _kill(stack.processes["router"])
        # In its place, one that ended as a drained service ends: exit status 0.
        stack.processes["router"] = subprocess.Popen(["true"])
        stack.processes["router"].wait()

        with structlog.testing.capture_logs() as logs:
            supervisor.check(now=10.0)
        said = [(entry["event"], entry.get("exit_code")) for entry in logs]
        assert said == [("child exited, restarting", 0)]
        down = read_status(tmp_path)["children"]["router"]
        assert (down["state"], down["last_exit"]) == ("down", {"exit_code": 0})
        supervisor.check(now=11.0)
        assert stack.launched == ["router", "router"]
        assert read_status(tmp_path)["children"]["router"]["state"] == "starting"
    finally:
        supervisor.stop()


def test_nothing_is_restarted_once_stopped(stack) -> None:
    stack.launch("triton")
    supervisor = Supervisor(stack, Backoff(initial_s=0.1), asker=InlineExecutor())
    _kill(stack.processes["triton"])
    supervisor.check(now=1.0)
    supervisor.stop()
    supervisor.check(now=100.0)
    assert stack.launched == ["triton"]


def test_failed_relaunches_after_a_healthy_run_keep_backing_off(stack) -> None:
    """Measured from the healthy child's start, every failed try after it
    counted as the first of a new run: retried every 0.5 s for good."""
    supervisor = Supervisor(
        stack, Backoff(initial_s=0.5, factor=2.0, max_s=30.0, reset_after_s=60.0), asker=InlineExecutor()
    )
    stack.launch("redis")
    # Dies at once after its first start, and is restarted at t = 1.5 s.
    _kill(stack.processes["redis"])
    supervisor.check(now=1.0)
    supervisor.check(now=1.5)
    assert supervisor.restarts == {"redis": 1}
    stack.ready_children = {"redis"}
    supervisor.check(now=2.0)

    # Up for minutes, dies, and now cannot be started again.
    _kill(stack.processes["redis"])
    stack.broken = True
    now = 200.0
    supervisor.check(now)
    delays = []
    for _ in range(5):
        due = supervisor._due["redis"]
        delays.append(due - now)
        now = due
        supervisor.check(now)
    # A first failure after a healthy run, then failures in a row.
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]

    # Once it can start again, it does, at its due time.
    stack.broken = False
    supervisor.check(supervisor._due["redis"])
    assert supervisor.restarts == {"redis": 2}
    assert stack.processes["redis"].poll() is None


def test_a_child_failing_for_hours_is_still_retried_at_the_capped_delay(stack) -> None:
    """The 1025th failure in a row (some 8.5 hours of tries 30 s apart) made
    the delay's power overflow a float: OverflowError out of every pass, and
    the child was never tried again once it could start."""
    supervisor = Supervisor(stack, Backoff(initial_s=0.5, factor=2.0, max_s=30.0), asker=InlineExecutor())
    stack.launch("redis")
    _kill(stack.processes["redis"])
    stack.broken = True
    now = 0.0
    supervisor.check(now)
    for _ in range(1100):
        now = supervisor._due["redis"]
        supervisor.check(now)
    assert supervisor._due["redis"] - now == 30.0

    stack.broken = False
    supervisor.check(supervisor._due["redis"])
    assert supervisor.restarts == {"redis": 1}
    assert stack.processes["redis"].poll() is None


def test_the_status_file_says_whether_each_child_is_up_starting_unready_or_down(stack, tmp_path) -> None:
    """A child down or in its restart's backoff was told of in a log line
    alone: nothing an operator or a script could ask."""
    stack.launch("redis")
    stack.launch("router")
    # Its thread would pass on its own clock: the passes here are the test's.
    supervisor = Supervisor(stack, Backoff(initial_s=1.0), poll_interval_s=3600, asker=InlineExecutor())
    supervisor.start()
    try:

        def children() -> dict:
            status = read_status(tmp_path)
            assert status["pid"] == os.getpid()
            return status["children"]

        assert {name: child["state"] for name, child in children().items()} == {
            "redis": "starting",
            "router": "starting",
        }
        stack.ready_children = {"redis", "router"}
        supervisor.check(now=1.0)
        first_pid = stack.processes["router"].pid
        assert children()["router"] == {
            "state": "up",
            "since": pytest.approx(time.time(), abs=5),
            "pid": first_pid,
            "restarts": 0,
            "last_exit": None,
            "restart_at": None,
            "error": None,
            "stopped_for": None,
            "log": "logs/router.log",
        }

        # Running, no longer ready (draining, say): not up, once asked again
        # (an up child is asked once a second, a starting one on every pass).
        stack.ready_children = {"redis"}
        supervisor.check(now=1.5)
        assert children()["router"]["state"] == "up"
        supervisor.check(now=5.0)
        router = children()["router"]
        assert (router["state"], router["pid"]) == ("unready", first_pid)
        assert router["since"] == pytest.approx(time.time(), abs=5)
        stack.ready_children = {"redis", "router"}
        supervisor.check(now=6.0)
        assert children()["router"]["state"] == "up"

        stack.ready_children = {"redis"}
        _kill(stack.processes["router"])
        supervisor.check(now=10.0)
        router = children()["router"]
        assert (router["state"], router["pid"], router["last_exit"]) == ("down", None, {"signal": "SIGKILL"})
        assert router["restart_at"] == pytest.approx(time.time() + 1.0, abs=5)
        assert children()["redis"]["state"] == "up"

        supervisor.check(now=11.0)  # restarted, not ready yet
        router = children()["router"]
        assert (router["state"], router["restarts"]) == ("starting", 1)
        assert router["last_exit"] == {"signal": "SIGKILL"}
        assert router["pid"] == stack.processes["router"].pid != first_pid
        stack.ready_children = {"redis", "router"}
        supervisor.check(now=11.2)
        assert children()["router"]["state"] == "up"

        # Exits, and its restart starts nothing: down, with why.
        _kill(stack.processes["redis"])
        stack.broken = True
        supervisor.check(now=20.0)
        supervisor.check(now=21.0)
        redis = children()["redis"]
        assert (redis["state"], redis["error"]) == ("down", "logs/redis.log")
    finally:
        supervisor.stop()


def test_a_child_that_does_not_answer_holds_up_no_other_childs_restart(stack, tmp_path) -> None:
    """Each readiness ask waits up to a second for its answer (a stalled
    child: SIGSTOP, a hung event loop), and a pass asked each child in turn:
    every stalled child delayed every other's restart, and the status
    file, by that much on every pass (measured on a real stack, Redis and
    the context service stopped: an exit was noticed after 2.2 s, not 0.2)."""
    stack.launch("redis")
    stack.launch("router")
    stack.ready_children = {"redis", "router"}
    released = threading.Event()
    answered: list[str] = []
    asked = stack.ready

    def ready(name: str) -> bool:
        if name == "router":
            # Stalled: it answers once the test lets it, or after a while
            # (so that a pass that waits for it fails rather than hangs).
            released.wait(10)
            answered.append(name)
        return asked(name)

    stack.ready = ready
    supervisor = Supervisor(stack, Backoff(initial_s=1.0), poll_interval_s=3600)
    supervisor.start()
    try:
        supervisor.check(now=1.0)
        _kill(stack.processes["redis"])
        supervisor.check(now=2.0)
        assert not answered, "a pass waited for the stalled child's answer"
        assert read_status(tmp_path)["children"]["redis"]["state"] == "down"
        supervisor.check(now=3.0)
        assert stack.launched == ["redis", "router", "redis"]
        assert read_status(tmp_path)["children"]["router"]["state"] == "starting"

        # Its answer, once it comes, is taken on a pass after.
        released.set()
        deadline = time.monotonic() + 30
        while read_status(tmp_path)["children"]["router"]["state"] != "up":
            assert time.monotonic() < deadline, "the stalled child's answer was never taken"
            time.sleep(0.01)
            supervisor.check(now=3.2)
    finally:
        released.set()
        supervisor.stop()


def _supervised(stack, **options) -> Supervisor:
    """A supervisor whose passes are the test's, with a grace of 10 s and a
    start timeout of 100 s unless ``options`` say otherwise."""
    options = {"unready_grace_s": 10.0, "start_timeout_s": 100.0, **options}
    supervisor = Supervisor(
        stack, Backoff(initial_s=1.0), poll_interval_s=3600, asker=InlineExecutor(), **options
    )
    supervisor.start()
    return supervisor


def test_a_child_unready_past_the_grace_is_stopped_and_started_again(stack, tmp_path) -> None:
    """A child that was up and stayed unready (a Redis that never answers
    PING, a SIGSTOPped service) was never restarted: only an exit was."""
    stack.launch("router")
    supervisor = _supervised(stack)
    try:
        stack.ready_children = {"router"}
        supervisor.check(now=1.0)
        stack.ready_children = set()
        supervisor.check(now=3.0)  # unready from here
        first = stack.processes["router"]
        with structlog.testing.capture_logs() as logs:
            supervisor.check(now=13.0)
            assert first.poll() is None, "stopped within the grace"
            supervisor.check(now=13.5)
        assert first.wait(5) == -signal.SIGTERM
        reason = "unready for 10.5 s, longer than 10 s"
        assert [(entry["event"], entry["reason"]) for entry in logs] == [
            ("child not ready, stopping it to restart it", reason)
        ]
        assert read_status(tmp_path)["children"]["router"]["stopped_for"] == reason

        supervisor.check(now=14.0)  # its exit, and the backoff's delay
        router = read_status(tmp_path)["children"]["router"]
        assert (router["state"], router["last_exit"], router["stopped_for"]) == (
            "down",
            {"signal": "SIGTERM"},
            reason,
        )
        supervisor.check(now=15.0)
        assert stack.launched == ["router", "router"]
        router = read_status(tmp_path)["children"]["router"]
        assert (router["state"], router["restarts"], router["stopped_for"]) == ("starting", 1, reason)
    finally:
        supervisor.stop()


def test_a_starting_child_has_its_start_timeout_and_not_the_grace_besides(stack, tmp_path) -> None:
    stack.launch("triton")
    supervisor = _supervised(stack)
    try:
        supervisor.check(now=0.0)
        supervisor.check(now=50.0)  # starting past the grace: still its own time
        assert stack.processes["triton"].poll() is None
        supervisor.check(now=100.0)
        assert stack.processes["triton"].poll() is None
        supervisor.check(now=100.5)
        assert stack.processes["triton"].wait(5) == -signal.SIGTERM
        supervisor.check(now=101.0)
        triton = read_status(tmp_path)["children"]["triton"]
        assert (triton["state"], triton["stopped_for"]) == (
            "down",
            "not ready 100.5 s after its start, longer than 100 s",
        )

        # Its replacement's time counts from its restart, not its first ask.
        supervisor.check(now=102.0)
        assert stack.launched == ["triton", "triton"]
        supervisor.check(now=150.0)
        supervisor.check(now=202.5)
        assert stack.processes["triton"].wait(5) == -signal.SIGTERM
    finally:
        supervisor.stop()


def test_a_child_unready_because_what_it_depends_on_is_not_is_left_to_it(stack, tmp_path) -> None:
    """The inference service is unready while Triton is: Triton is
    restarted, and the inference service, which a restart would not make
    serve sooner, is given the whole grace once Triton is up again."""
    stack.launch("triton")
    stack.launch("inference")
    supervisor = _supervised(stack)
    try:
        stack.ready_children = {"triton", "inference"}
        supervisor.check(now=1.0)
        stack.ready_children = set()  # Triton stalls, and so the inference service
        supervisor.check(now=3.0)
        inference, triton = stack.processes["inference"], stack.processes["triton"]
        supervisor.check(now=13.5)  # Triton past the grace: stopped
        # Its exit is real, not on the test's clock: waited for, or under load
        # the next checks came before it (seen in CI).
        assert triton.wait(5) == -signal.SIGTERM
        supervisor.check(now=14.0)
        supervisor.check(now=15.0)  # restarted
        assert stack.launched == ["triton", "inference", "triton"]
        stack.ready_children = {"triton"}
        supervisor.check(now=20.0)  # Triton up: the inference service's grace begins
        assert read_status(tmp_path)["children"]["triton"]["state"] == "up"
        supervisor.check(now=30.0)
        assert inference.poll() is None and stack.launched.count("inference") == 1
        supervisor.check(now=30.5)
        assert inference.wait(5) == -signal.SIGTERM
        assert (
            read_status(tmp_path)["children"]["inference"]["stopped_for"]
            == "unready for 10.5 s, longer than 10 s"
        )
    finally:
        supervisor.stop()


def test_a_child_that_does_not_stop_is_killed_after_the_stop_grace(stack, tmp_path) -> None:
    stack.processes["redis"] = subprocess.Popen(
        ["sh", "-c", "trap '' TERM; echo ignoring; exec sleep 60"],
        start_new_session=True,
        stdout=subprocess.PIPE,
    )
    # A SIGTERM before the trap is set would end it: it says when it is.
    assert stack.processes["redis"].stdout.readline() == b"ignoring\n"
    supervisor = _supervised(stack)
    try:
        stack.ready_children = {"redis"}
        supervisor.check(now=1.0)
        stack.ready_children = set()
        supervisor.check(now=2.0)
        supervisor.check(now=12.5)  # SIGTERM, which it ignores
        redis = stack.processes["redis"]
        supervisor.check(now=17.0)  # within the fake stack's stop grace of 5 s
        with pytest.raises(subprocess.TimeoutExpired):
            redis.wait(0.2)
        supervisor.check(now=17.5)
        assert redis.wait(5) == -signal.SIGKILL
        supervisor.check(now=18.0)
        status = read_status(tmp_path)["children"]["redis"]
        assert (status["state"], status["last_exit"], status["stopped_for"]) == (
            "down",
            {"signal": "SIGKILL"},
            "unready for 10.5 s, longer than 10 s",
        )
    finally:
        supervisor.stop()
