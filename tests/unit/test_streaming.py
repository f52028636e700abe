"""meshgate.streaming.batches: messages waiting together are handed over as
one list, the first without waiting for company, a failure only after what
arrived before it, and closing stops the reading. The call is a scripted
fake (tests/integration runs the router's relay over real services)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

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
