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

STUCK_FUNCTION = """
import time


def test_stuck_past_the_bound():
    time.sleep(30)


def test_the_next_one_runs():
    pass
"""


def test_a_coroutine_test_past_the_bound_fails_and_the_loop_serves_the_next(pytester) -> None:
    pytester.makepyfile(test_stuck=STUCK_COROUTINE)
    result = pytester.runpytest_inprocess(
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
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*await asyncio.sleep(30)*",
            "*TimeoutError*",
            "*cancelled: the test ran past async_test_timeout (0.5 s)*",
            "FAILED test_stuck.py::test_stuck_past_the_bound*",
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
