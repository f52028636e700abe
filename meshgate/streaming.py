"""Reading a server stream ahead of its consumer.

A relay that writes every message it reads pays a read, a write and the
async-generator hops in between per message. While it writes one, the next
few have often arrived already (under load, several tokens per event-loop
turn): :func:`batches` reads the stream in a task of its own and hands over
everything that arrived since the last hand-over as one list, so the relay
can send it as one message. It never waits for a batch to fill: the first
message is handed over as soon as it arrives.

A relay may also ask it to *hold* (``hold_s``): after the first hand-over,
messages are kept until the oldest has waited that long, so that several
go on as one. Each message costs every hop behind the relay a gRPC write
and read whatever it carries (thread wake-ups in grpc's core, most of a
streamed token's CPU: bench/README.md, issue 13), so under load fewer,
larger messages buy CPU and throughput at the price of smoothness; vLLM's
``--stream-interval`` is the same trade.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc

import grpc

from meshgate.tasks import cancel_and_wait


async def batches(
    call: grpc.aio.UnaryStreamCall,
    read_ahead: bool = True,
    hold_s: collections.abc.Callable[[], float] | None = None,
    urgent: collections.abc.Callable[[object], bool] | None = None,
    ends: collections.abc.Callable[[object], bool] | None = None,
) -> collections.abc.AsyncIterator[list]:
    """The messages of ``call``, in order, in lists of those that were
    waiting together. A failure of the call is raised after every message
    that arrived before it was handed over; closing this generator stops the
    reading (the caller still cancels the call itself).

    ``hold_s``, asked when a message arrives to find nothing waiting: how
    long (seconds; 0: not at all) what waits may be held before it is handed
    over. The first list is never held (the first token's latency stays);
    a first message may carry nothing the relay sends on (Triton's first
    response with no text yet), so ``hold_s`` is asked each time and a relay
    answers 0 until something of its own went out (the inference service's
    _TritonStream._hold). Nothing is held past a message that ``urgent``
    says must not wait (the last one, so it is never late; the inference
    service's also one its model held already), nor past the call's end or
    failure. A message that came longer than the hold after the one before
    it is not held at all: its stream is slower than the hold, and its next
    message would come after the hold anyway (the generation engine's own
    stream interval holds by the same rule).

    ``ends``: whether a message is the last this consumer wants (the
    inference service's Triton streams carry one request after another, and
    a request's last response is not the stream's): after it, reading stops
    as at the end of the call, and no ``read()`` is left pending, so that the
    call can carry the next request. It is handed over at once.

    Without ``read_ahead``, one message a list, read as the consumer asks:
    for a consumer that is itself a task reading ahead of whoever writes
    (the router's shared generations), where one more task per message
    would be one more wake-up per token and buy nothing."""
    if not read_ahead:
        while (message := await call.read()) is not grpc.aio.EOF:
            yield [message]
            if ends is not None and ends(message):
                return
        return
    loop = asyncio.get_running_loop()
    arrived: collections.deque = collections.deque()
    # Set when what arrived is to be handed over: at once, or by the timer
    # of a hold.
    wake = asyncio.Event()
    timer: asyncio.TimerHandle | None = None
    holding = False  # after the first hand-over, when hold_s is given

    async def read_ahead() -> None:
        nonlocal timer
        previous = loop.time()
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                now = loop.time()
                gap, previous = now - previous, now
                first_waiting = not arrived
                arrived.append(message)
                if ends is not None and ends(message):
                    break  # the finally below hands it over at once
                if not holding or (urgent is not None and urgent(message)):
                    wake.set()
                elif first_waiting and timer is None:
                    hold = hold_s()
                    # A stream whose last message came longer than the hold
                    # after the one before (a model slower than the hold:
                    # smollm2 on CPU, ~90-110 ms a token at 8 streams)
                    # would send its next one after the hold anyway:
                    # holding it would delay it and join it with nothing.
                    if hold > 0 and gap < hold:
                        timer = loop.call_later(hold, wake.set)
                    else:
                        wake.set()
        finally:
            wake.set()

    reader = asyncio.ensure_future(read_ahead())
    try:
        while True:
            if not (wake.is_set() or reader.done()):
                await wake.wait()
            wake.clear()
            if timer is not None:
                timer.cancel()
                timer = None
            if arrived:
                batch = list(arrived)
                arrived.clear()
                holding = hold_s is not None
                yield batch
                continue
            if reader.done():
                reader.result()  # the call's failure, if it failed
                return
    finally:
        if timer is not None:
            timer.cancel()
        # Its failure is the call's, which a consumer that closes has no use
        # for; a cancel of the consumer while the reader ends is the
        # consumer's (suppressed with the reader's, it was lost).
        await cancel_and_wait(reader, raise_failures=False)
