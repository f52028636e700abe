"""A service's stop runs every step though one fails: a cleanup that raises
skipped the metrics endpoint's shutdown after it (its port stayed open, its
thread ran on), a drain that raised skipped the cleanup. Each failure is
logged, the rest still run, and the stop then fails with StopFailed, which
a service process ends on with STOP_FAILED. A real gRPC server (on a unix
socket); the metrics endpoint, a TCP port, is a recorder of its shutdown."""

from __future__ import annotations

import asyncio
import functools

import pytest
import structlog

from meshgate import serving
from meshgate.tasks import cancel_and_wait


class MetricsServer:
    """What serve_metrics keeps: prometheus_client's HTTP server."""

    def __init__(self) -> None:
        self.shut_down = self.closed = False

    def shutdown(self) -> None:
        self.shut_down = True

    def server_close(self) -> None:
        self.closed = True


async def started(tmp_path, cleanup: serving.Cleanup) -> tuple[serving.Service, MetricsServer]:
    """A service serving on a unix socket, with a metrics endpoint."""
    service = serving.Service("cache", ["meshgate.cache.v1.CacheService"])
    service.metrics_server = metrics = MetricsServer()
    await serving.start(service, f"unix:{tmp_path / 'cache.sock'}", cleanup)
    return service, metrics


async def test_a_cleanup_that_raises_still_lets_the_metrics_endpoint_shut_down(tmp_path):
    async def failing_cleanup() -> None:
        raise RuntimeError("redis client would not close")

    service, metrics = await started(tmp_path, failing_cleanup)
    with structlog.testing.capture_logs() as logs, pytest.raises(serving.StopFailed):
        await serving.stop(service, grace_s=0)
    assert metrics.shut_down and metrics.closed
    failures = [entry for entry in logs if entry["log_level"] == "error"]
    assert [(entry["event"], entry["step"]) for entry in failures] == [("stop step failed", "cleanup")]
    assert logs[-1]["event"] == "stopped"


async def test_a_drain_that_raises_still_lets_the_cleanup_and_the_rest_run(tmp_path):
    cleaned = []

    async def cleanup() -> None:
        cleaned.append(True)

    async def failing_drain(grace_s: float) -> None:
        raise OSError("the HTTP edge's socket was already gone")

    service, metrics = await started(tmp_path, cleanup)
    service.drains.append(failing_drain)
    with pytest.raises(serving.StopFailed):
        await serving.stop(service, grace_s=0)
    assert cleaned == [True]
    assert metrics.shut_down and metrics.closed


async def test_a_clean_stop_raises_nothing(tmp_path):
    service, metrics = await started(tmp_path, serving._nothing)
    await serving.stop(service, grace_s=0)
    assert metrics.shut_down and metrics.closed


async def test_a_cleanup_step_that_raises_leaves_the_later_steps_to_run():
    """The router's cleanup closed its channels and summary collector before
    admission's drain, in one coroutine: a close that raised lost the
    settlements and usage records still in flight."""
    ran = []

    async def summary_usage_close() -> None:
        ran.append("summary usage")
        raise RuntimeError("the context channel was already closed")

    def cancel_checks() -> None:  # a step may be a plain function
        ran.append("checks")

    async def admission_drain() -> None:
        ran.append("admission")

    cleanup = serving.cleanup_steps(
        ("checks", cancel_checks),
        ("http edge", None),  # a part this service runs without
        ("summary usage", summary_usage_close),
        ("admission", admission_drain),
    )
    with structlog.testing.capture_logs() as logs, pytest.raises(serving.StopFailed, match="summary usage"):
        await cleanup()
    assert ran == ["checks", "summary usage", "admission"]
    failures = [(entry["event"], entry["step"]) for entry in logs if entry["log_level"] == "error"]
    assert failures == [("cleanup step failed", "summary usage")]


async def test_a_cleanup_of_steps_that_all_succeed_raises_nothing():
    ran = []

    async def close() -> None:
        ran.append("closed")

    await serving.cleanup_steps(("one", close), ("two", close))()
    assert ran == ["closed", "closed"]


async def test_a_failed_cleanup_step_is_logged_with_its_traceback_once(tmp_path):
    async def failing_close() -> None:
        raise RuntimeError("the channel would not close")

    service, _ = await started(tmp_path, serving.cleanup_steps(("channel", failing_close)))
    with structlog.testing.capture_logs() as logs, pytest.raises(serving.StopFailed):
        await serving.stop(service, grace_s=0)
    failures = [entry for entry in logs if entry["log_level"] == "error"]
    assert [(entry["event"], entry["step"]) for entry in failures] == [
        ("cleanup step failed", "channel"),
        ("stop step failed", "cleanup"),
    ]
    # The traceback with the step that raised; the stop's line names it.
    assert [bool(entry.get("exc_info")) for entry in failures] == [True, False]
    assert "channel" in failures[1]["error"]


async def test_a_cleanup_cancelled_in_a_step_still_runs_the_later_steps_then_is_cancelled():
    """A cancellation (a test's timeout, a stop task cancelled) in one step
    skipped every step after it: the Redis client and the channels stayed
    open. The step it came in is interrupted; the rest run; then the
    cleanup ends cancelled, as asked."""
    ran = []
    in_step = asyncio.Event()

    async def slow_close() -> None:
        ran.append("slow")
        in_step.set()
        await asyncio.sleep(60)
        ran.append("slow finished")

    async def close() -> None:
        await asyncio.sleep(0)  # it awaits, and is not cancelled again
        ran.append("later")

    cleaning = asyncio.create_task(serving.cleanup_steps(("slow", slow_close), ("later", close))())
    await in_step.wait()
    cleaning.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cleaning
    assert ran == ["slow", "later"]


async def test_a_cleanup_cancelled_while_a_step_waits_for_a_task_that_outlived_its_cancel_is_cancelled():
    """A step that ends a background task (cancel_and_wait) waits for it;
    a task that outlives its own cancel holds the step until the cleanup's
    cancellation comes and reaches it. That cancellation is the cleanup's:
    it ends cancelled, the later steps run. Swallowed with the task's
    (`suppress(CancelledError)` around `await task`), the cleanup returned
    as if never cancelled, and a test stuck in a stop passed at its bound."""
    ran = []
    cancelled_once = asyncio.Event()

    async def watch() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled_once.set()  # taken for a failure of what it awaited: on it goes
        await asyncio.sleep(60)

    async def close() -> None:
        ran.append("later")

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0)
    steps = (("watcher", functools.partial(cancel_and_wait, watcher)), ("later", close))
    cleaning = asyncio.create_task(serving.cleanup_steps(*steps)())
    await cancelled_once.wait()
    cleaning.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cleaning
    assert ran == ["later"] and watcher.cancelled()


async def test_a_stop_cancelled_in_its_cleanup_still_shuts_the_metrics_endpoint_down(tmp_path):
    in_cleanup = asyncio.Event()

    async def slow_cleanup() -> None:
        in_cleanup.set()
        await asyncio.sleep(60)

    service, metrics = await started(tmp_path, slow_cleanup)
    stopping = asyncio.create_task(serving.stop(service, grace_s=0))
    await in_cleanup.wait()
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert metrics.shut_down and metrics.closed


async def test_a_stop_cancelled_while_it_drains_still_cleans_up(tmp_path):
    cleaned = []
    draining = asyncio.Event()

    async def cleanup() -> None:
        cleaned.append(True)

    async def slow_drain(grace_s: float) -> None:
        draining.set()
        await asyncio.sleep(60)

    service, metrics = await started(tmp_path, cleanup)
    service.drains.append(slow_drain)
    stopping = asyncio.create_task(serving.stop(service, grace_s=30))
    await draining.wait()
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert cleaned == [True]
    assert metrics.shut_down and metrics.closed
