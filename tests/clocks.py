"""A clock the test moves: for the code here that takes a ``clock``
(a callable answering seconds, ``time.monotonic`` or ``time.time`` in
production), so that what happens at a time is decided by the test, not by
how fast a shared machine runs it."""

from __future__ import annotations


class Clock:
    """Answers ``now`` (seconds) until the test sets or moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
