"""Reading a server stream ahead of its consumer.

A relay that writes every message it reads pays a read, a write and the
async-generator hops in between per message. While it writes one, the next
few have often arrived already (under load, several tokens per event-loop
turn): :func:`batches` reads the stream in a task of its own and hands over
everything that arrived since the last hand-over as one list, so the relay
can send it as one message. It never waits for a batch to fill: the first
message is handed over as soon as it arrives.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import contextlib

import grpc


async def batches(
    call: grpc.aio.UnaryStreamCall, read_ahead: bool = True
) -> collections.abc.AsyncIterator[list]:
    """The messages of ``call``, in order, in lists of those that were
    waiting together. A failure of the call is raised after every message
    that arrived before it was handed over; closing this generator stops the
    reading (the caller still cancels the call itself).

    Without ``read_ahead``, one message a list, read as the consumer asks:
    for a consumer that is itself a task reading ahead of whoever writes
    (the router's shared generations), where one more task per message
    would be one more wake-up per token and buy nothing."""
    if not read_ahead:
        while (message := await call.read()) is not grpc.aio.EOF:
            yield [message]
        return
    arrived: collections.deque = collections.deque()
    wake = asyncio.Event()

    async def read_ahead() -> None:
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                arrived.append(message)
                wake.set()
        finally:
            wake.set()

    reader = asyncio.ensure_future(read_ahead())
    try:
        while True:
            if arrived:
                batch = list(arrived)
                arrived.clear()
                yield batch
                continue
            if reader.done():
                reader.result()  # the call's failure, if it failed
                return
            await wake.wait()
            wake.clear()
    finally:
        if not reader.done():
            reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
