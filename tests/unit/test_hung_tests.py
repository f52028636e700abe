"""A hung test fails, names itself in the last lines of the run, and lets
the run go on: pytest-timeout with this project's method (pyproject.toml),
and tests/conftest.py's async_test_timeout for a coroutine test. Each is
checked on a small module run by pytester with a bound of half a second."""

from __future__ import annotations

pytest_plugins = ["pytester"]

# What CI shows of a run's output.
LOG_TAIL_LINES = 24

STUCK_COROUTINE = """
import asyncio

LOOPS = []


async def test_stuck_past_the_bound():
    LOOPS.append(asyncio.get_running_loop())
    await asyncio.sleep(30)


async def test_the_next_one_runs_on_the_same_loop():
    await asyncio.sleep(0)
    assert asyncio.get_running_loop() is LOOPS[0]
"""

# Stuck in an await whose CancelledError a suppress swallows (as a stop
# step's `task.cancel()` then `with suppress(CancelledError): await task`
# does when the task outlives its own cancel): the bound's cancellation ends
# the await, and the test goes on and returns.
SWALLOWS_ITS_CANCELLATION = """
import asyncio
import contextlib


async def test_stuck_past_the_bound_then_returns():
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(30)
"""

STUCK_FUNCTION = """
import time


def test_stuck_past_the_bound():
    time.sleep(30)


def test_the_next_one_runs():
    pass
"""


def run_bounded(pytester):
    """The module pytester made, run with async_test_timeout at 0.5 s."""
    return pytester.runpytest_inprocess(
        "-p",
        "tests.conftest",
        "-o",
        "async_test_timeout=0.5",
        "-o",
        "asyncio_mode=auto",
        "-o",
        "asyncio_default_fixture_loop_scope=session",
        "-o",
        "asyncio_default_test_loop_scope=session",
    )


def test_a_coroutine_test_past_the_bound_fails_and_the_loop_serves_the_next(pytester) -> None:
    pytester.makepyfile(test_stuck=STUCK_COROUTINE)
    result = run_bounded(pytester)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*await asyncio.sleep(30)*",
            "*TimeoutError*",
            "*cancelled: the test ran past async_test_timeout (0.5 s)*",
            "FAILED test_stuck.py::test_stuck_past_the_bound*",
        ]
    )


def test_a_coroutine_test_that_swallows_the_bounds_cancellation_and_returns_fails(pytester) -> None:
    """A run of the real-process tier had a test pass after 300.21 s, the
    bound: its cancellation was swallowed where it was stuck, and it went
    on to pass."""
    pytester.makepyfile(test_swallows=SWALLOWS_ITS_CANCELLATION)
    result = run_bounded(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*TimeoutError*",
            "*the test ran past async_test_timeout (0.5 s), and its cancellation was swallowed*",
            "*stuck in:*",
            "*await asyncio.sleep(30)*",
            "FAILED test_swallows.py::test_stuck_past_the_bound_then_returns*",
        ]
    )


def test_a_test_past_pytest_timeout_fails_named_at_the_end_and_the_run_goes_on(
    pytester, pytestconfig
) -> None:
    pytester.makepyfile(test_stuck=STUCK_FUNCTION)
    # In a process of its own: pytest-timeout's alarm is the process's.
    result = pytester.runpytest_subprocess(
        "-o", "timeout=0.5", "-o", f"timeout_method={pytestconfig.getini('timeout_method')}"
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*time.sleep(30)*", "*Timeout (>0.5s) from pytest-timeout*"])
    tail = "\n".join(result.outlines[-LOG_TAIL_LINES:])
    assert "FAILED test_stuck.py::test_stuck_past_the_bound" in tail, tail
