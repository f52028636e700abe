"""meshgate.streaming.batches: messages waiting together are handed over as
one list, the first without waiting for company, a failure only after what
arrived before it, and closing stops the reading; with a hold (the
inference service's stream interval), later messages wait for company, but
never past the hold, a message that ends the stream, or the call's end or
failure. The call is a scripted fake (tests/integration runs the router's
relay over real services)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate import streaming


class ScriptedCall:
    """A server stream whose messages the test hands over."""

    def __init__(self) -> None:
        self._pending: asyncio.Queue = asyncio.Queue()
        self.reads_waiting = 0

    def send(self, *items) -> None:
        """Messages, grpc.aio.EOF (the stream ends) or an error to raise."""
        for item in items:
            self._pending.put_nowait(item)

    async def read(self):
        self.reads_waiting += 1
        try:
            item = await self._pending.get()
        finally:
            self.reads_waiting -= 1
        if isinstance(item, BaseException):
            raise item
        return item


async def until(condition) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0)


async def test_messages_waiting_together_come_as_one_list_and_the_first_at_once():
    call = ScriptedCall()
    async with contextlib.aclosing(streaming.batches(call)) as batches:
        call.send("a")
        assert await anext(batches) == ["a"]
        # Three arrive while the consumer is busy elsewhere.
        call.send("b", "c", "d")
        await until(lambda: call.reads_waiting == 1 and call._pending.empty())
        assert await anext(batches) == ["b", "c", "d"]
        call.send("e", grpc.aio.EOF)
        assert [batch async for batch in batches] == [["e"]]


async def test_a_failure_comes_after_every_message_that_arrived_before_it():
    call = ScriptedCall()
    failure = RuntimeError("stream broke")
    call.send("a", "b", failure)
    received = []
    with pytest.raises(RuntimeError) as raised:
        async for batch in streaming.batches(call):
            received.extend(batch)
    assert raised.value is failure
    assert received == ["a", "b"]


async def test_closing_stops_the_reading():
    call = ScriptedCall()
    batches = streaming.batches(call)
    call.send("a")
    assert await anext(batches) == ["a"]
    await until(lambda: call.reads_waiting == 1)
    await batches.aclose()
    # The read under way was cancelled, not left waiting on the stream.
    assert call.reads_waiting == 0


async def test_without_read_ahead_each_message_is_read_when_asked_for():
    call = ScriptedCall()
    async with contextlib.aclosing(streaming.batches(call, read_ahead=False)) as batches:
        call.send("a", "b")
        assert await anext(batches) == ["a"]
        # Nothing reads while the consumer is busy: "b" still waits in the call.
        await asyncio.sleep(0)
        assert call.reads_waiting == 0 and call._pending.qsize() == 1
        assert await anext(batches) == ["b"]
        call.send(grpc.aio.EOF)
        assert [batch async for batch in batches] == []


# A hold far longer than any test: what comes before it was not held.
FOREVER_S = 60.0


def ends(message) -> bool:
    return message == "END"


async def test_the_first_list_is_never_held():
    call = ScriptedCall()
    held = streaming.batches(call, hold_s=lambda: FOREVER_S, urgent=ends)
    async with contextlib.aclosing(held) as batches:
        call.send("a")
        async with asyncio.timeout(1):
            assert await anext(batches) == ["a"]


async def test_later_messages_wait_for_company_until_the_hold_ends():
    call = ScriptedCall()
    hold_s = 0.05
    async with contextlib.aclosing(streaming.batches(call, hold_s=lambda: hold_s, urgent=ends)) as batches:
        call.send("a")
        assert await anext(batches) == ["a"]
        started = time.monotonic()
        call.send("b")

        async def later():
            await asyncio.sleep(hold_s / 5)
            call.send("c")

        sender = asyncio.create_task(later())
        assert await anext(batches) == ["b", "c"]
        # Held from "b"'s arrival until the hold was over, not longer than
        # the hold and some slack for a loaded machine.
        assert hold_s * 0.9 <= time.monotonic() - started < hold_s + 1.0
        await sender


@pytest.mark.parametrize(
    "last",
    [
        pytest.param("END", id="a message that ends the stream"),
        pytest.param(grpc.aio.EOF, id="the call's end"),
    ],
)
async def test_nothing_is_held_past_the_end(last):
    call = ScriptedCall()
    async with contextlib.aclosing(streaming.batches(call, hold_s=lambda: FOREVER_S, urgent=ends)) as batches:
        call.send("a")
        assert await anext(batches) == ["a"]
        call.send("b", last)
        async with asyncio.timeout(1):
            assert await anext(batches) == (["b", "END"] if last == "END" else ["b"])


async def test_a_failure_flushes_what_was_held_then_raises():
    call = ScriptedCall()
    failure = RuntimeError("stream broke")
    received = []
    call.send("a")
    with pytest.raises(RuntimeError) as raised:
        async with asyncio.timeout(1):
            async for batch in streaming.batches(call, hold_s=lambda: FOREVER_S, urgent=ends):
                received.append(batch)
                if batch == ["a"]:
                    call.send("b", "c", failure)
    assert raised.value is failure
    assert received == [["a"], ["b", "c"]]


async def test_a_hold_of_zero_holds_nothing():
    call = ScriptedCall()
    async with contextlib.aclosing(streaming.batches(call, hold_s=lambda: 0.0, urgent=ends)) as batches:
        call.send("a")
        assert await anext(batches) == ["a"]
        call.send("b")
        async with asyncio.timeout(1):
            assert await anext(batches) == ["b"]


async def test_closing_while_holding_stops_the_reading_and_the_timer(monkeypatch):
    loop = asyncio.get_running_loop()
    timers: list[asyncio.TimerHandle] = []
    schedule = loop.call_later

    def recorded(*args, **kwargs):
        timers.append(schedule(*args, **kwargs))
        return timers[-1]

    monkeypatch.setattr(loop, "call_later", recorded)
    call = ScriptedCall()
    batches = streaming.batches(call, hold_s=lambda: FOREVER_S, urgent=ends)
    call.send("a")
    assert await anext(batches) == ["a"]
    call.send("b")
    # "b" is held: read, its timer set, the next read waiting.
    await until(lambda: timers and call.reads_waiting == 1 and call._pending.empty())
    assert len(timers) == 1 and not timers[0].cancelled()
    await batches.aclose()
    assert call.reads_waiting == 0
    assert timers[0].cancelled()


@settings(max_examples=40, deadline=None)
@given(
    messages=st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=12),
    pauses_ms=st.lists(st.sampled_from([0, 0, 1, 3]), min_size=12, max_size=12),
    hold_ms=st.sampled_from([0, 2, 5]),
)
def test_every_message_comes_once_and_in_order_whatever_the_timing(messages, pauses_ms, hold_ms):
    """Joined, the lists are the messages sent, and none is empty."""

    async def scenario() -> list[list[str]]:
        call = ScriptedCall()

        async def send_all():
            for message, pause_ms in zip([*messages, "END"], [*pauses_ms, 0]):
                await asyncio.sleep(pause_ms / 1000)
                call.send(message)

        sender = asyncio.create_task(send_all())
        received = []
        async with asyncio.timeout(5):
            async for batch in streaming.batches(call, hold_s=lambda: hold_ms / 1000, urgent=ends):
                received.append(batch)
                if batch[-1] == "END":
                    break
        await sender
        return received

    received = asyncio.run(scenario())
    assert all(received)
    assert [m for batch in received for m in batch] == [*messages, "END"]


@pytest.mark.parametrize("read_ahead", [True, False])
@pytest.mark.parametrize("hold_s", [None, FOREVER_S])
async def test_with_ends_reading_stops_after_the_last_message_with_no_read_left_pending(read_ahead, hold_s):
    # The inference service's Triton streams carry one request after another:
    # a read left pending would take the next request's first response.
    call = ScriptedCall()
    hold = (lambda: hold_s) if hold_s is not None else None
    call.send("a", "b", "END", "next request")
    received = []
    async with asyncio.timeout(5):
        async for batch in streaming.batches(call, read_ahead, hold_s=hold, urgent=ends, ends=ends):
            received.append(batch)
    assert [m for batch in received for m in batch] == ["a", "b", "END"]
    assert received[-1][-1] == "END"
    assert call.reads_waiting == 0
    assert await call.read() == "next request", "what follows the end is left for the next reader"


async def test_a_stream_slower_than_the_hold_is_not_held():
    call = ScriptedCall()
    hold_s, gap_s = 1.0, 1.5
    async with contextlib.aclosing(streaming.batches(call, hold_s=lambda: hold_s, urgent=ends)) as batches:
        call.send("a")
        assert await anext(batches) == ["a"]
        # "b" comes longer than the hold after "a": its stream would send
        # the next message after the hold anyway, so it goes on at once.
        await asyncio.sleep(gap_s)
        call.send("b")
        sent = time.monotonic()
        assert await anext(batches) == ["b"]
        assert time.monotonic() - sent < hold_s / 2
        # "c" comes right after "b": held for company as before.
        call.send("c")
        sent = time.monotonic()
        assert await anext(batches) == ["c"]
        assert time.monotonic() - sent >= hold_s * 0.9


async def test_a_consumer_cancelled_while_closing_stays_cancelled():
    """The close waits for the reader it cancelled; a cancel of the
    consumer landing in that wait (a stop, a caller gone, in the loop turn
    the stream is closed) is the consumer's, and must reach it, not end
    with the reader's."""
    call = ScriptedCall()
    closed = asyncio.Event()

    async def consume() -> str:
        batches = streaming.batches(call)
        call.send("a")
        assert await anext(batches) == ["a"]
        await batches.aclose()
        # Reached only by a consumer whose cancel was lost.
        closed.set()
        return "went on"

    consumer = asyncio.create_task(consume())
    await until(lambda: call.reads_waiting == 1)
    # The consumer is now in the close, waiting for the reader to end.
    await asyncio.sleep(0)
    assert not closed.is_set()
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert not closed.is_set()
