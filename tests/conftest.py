"""Fixtures shared by every test: free ports and a real Redis; and the
bound on an async test's own run (async_test_timeout)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import pathlib
import signal
import subprocess
import traceback
from collections.abc import Iterator

import pytest

from meshgate.local import redis_server
from meshgate.local.stack import free_port

# Run as a background job of a shell without job control (`make test &` in
# a script, some CI runners), the suite inherits SIGINT and SIGQUIT ignored,
# and so would every process it starts: a test that sends one (Ctrl-C to
# `meshgate chat`, the stack's signals to its children) then failed for the
# runner's reason, not the code's. The dispositions a terminal gives, in
# every process that loads this (each pytest-xdist worker too). Not SIGHUP's:
# ignored, it is `nohup make test` asking the run to outlive its terminal; a
# test whose children need it at its default sets it for their start.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGQUIT) is signal.SIG_IGN:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """A real Redis: REDIS_URL if set, else a redis-server started for the session."""
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    with own_redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@contextlib.contextmanager
def own_redis_server(data_dir: pathlib.Path) -> Iterator[str]:
    """A redis-server of its own (a test that fills it, splits the mesh
    across two, or reconfigures it), on a free port; its URL."""
    port = free_port()
    process = redis_server.launch(port, data_dir)
    try:
        redis_server.wait_ready(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "async_test_timeout",
        "seconds after which a coroutine test is cancelled and fails with TimeoutError (0: never)",
        type="float",
        default=0.0,
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Bounds each coroutine test by async_test_timeout. pytest-timeout fails
    a hung async test too, but from a signal handler: its traceback is the
    event loop waiting in select, and the test's task is left pending on the
    session's loop. Cancelled by asyncio.timeout instead, the test fails
    with the traceback of the await it was stuck in, and the loop is free
    for the next test. A test that swallows that cancellation where it is
    stuck, and goes on to return, fails too, with where it was stuck. (A
    Hypothesis test's examples are run by Hypothesis' own synchronous
    wrapper, not bounded here: the fuzz suite's calls carry deadlines.)"""
    bound_s = config.getini("async_test_timeout")
    if not bound_s:
        return
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            item.obj = _bounded(item.obj, bound_s)


def _bounded(test, bound_s: float):
    @functools.wraps(test)
    async def bounded(*args, **kwargs):
        bound = asyncio.timeout(bound_s)
        task = asyncio.current_task()
        stuck_in: list[str] = []
        try:
            async with bound:
                # Where the test is when the bound fires: run in the same
                # pass of the loop as the bound's cancel, before the test's
                # task resumes with it. A cancellation swallowed there leaves
                # no traceback; this says where it was.
                look = asyncio.get_running_loop().call_at(bound.when(), lambda: stuck_in.append(_stack(task)))
                try:
                    result = await test(*args, **kwargs)
                finally:
                    look.cancel()
        except TimeoutError as error:
            if bound.expired():
                error.add_note(f"cancelled: the test ran past async_test_timeout ({bound_s:g} s)")
            raise
        if bound.expired():
            # The cancellation was swallowed where the test was stuck (a
            # `suppress(CancelledError)` around an await that outlived it,
            # as a stop step's await of a task it cancelled): the test went
            # on and returned, and would pass however long it was stuck.
            error = TimeoutError(
                f"the test ran past async_test_timeout ({bound_s:g} s), and its cancellation"
                " was swallowed where it was stuck; it went on and returned"
            )
            error.add_note("stuck in:\n" + "".join(stuck_in))
            raise error
        return result

    return bounded


def _stack(task: asyncio.Task) -> str:
    """Where ``task`` waits: the frames of the coroutines each awaits, from
    its own down (Task.get_stack gives its own only), then the future it
    waits for (a task's repr says where that one is: the task a stop step
    cancelled and awaits, still running)."""
    frames = []
    awaiting = task.get_coro()
    while (frame := getattr(awaiting, "cr_frame", None) or getattr(awaiting, "gi_frame", None)) is not None:
        frames.append((frame, frame.f_lineno))
        awaiting = getattr(awaiting, "cr_await", None) or getattr(awaiting, "gi_yieldfrom", None)
    # CPython's Task keeps the future it waits for there.
    waiting_for = getattr(task, "_fut_waiter", None)
    return "".join(traceback.StackSummary.extract(frames).format()) + f"waiting for {waiting_for!r}\n"
