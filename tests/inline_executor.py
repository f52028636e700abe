"""An executor that runs each call as it is submitted, in the caller's
thread: a test's passes of a Supervisor take each readiness answer at once,
as its own threads would on a later pass."""

from __future__ import annotations

import concurrent.futures


class InlineExecutor(concurrent.futures.Executor):
    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:  # noqa: BLE001 - the future carries it, as a thread's would
            future.set_exception(error)
        return future
