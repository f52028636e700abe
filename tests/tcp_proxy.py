"""A TCP proxy on loopback, run in the test's own event loop, that holds
traffic back the ways a network or a peer does: a Redis replica behind a
slow replication link, a client connection that stalls while the others
flow."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib


class TcpProxy:
    """Forwards each connection to ``port`` on loopback.

    ``hold()`` keeps the server's bytes from every client until
    ``release()`` (the clients' own bytes still go through);
    ``hold_when_sent(marker)`` does so for the first connection whose
    client sends a read holding ``marker`` alone, from that read on (the
    server has it: a call run, its reply late); ``stall_when_sent(marker)``
    stops the first connection whose client sends a read holding ``marker``
    (checked per read: a marker split across two reads is missed), for good
    or until ``unstall()`` lets that read go on, late (after what other
    connections sent meanwhile); ``watch(marker)`` notes, from then on,
    each connection whose client sends a read holding ``marker``, and
    ``hold_watched()`` holds the server's bytes to those connections alone
    until ``release()`` (a subscription whose notices come late while the
    client's other connections flow); ``stall_at_half_close()`` is
    ``stall_when_sent`` at the first read that half-closes a streaming call
    (an empty HTTP/2 DATA frame ending its stream: what ``done_writing()``
    sends; a unary request ends its stream on its message); ``close()``
    closes every connection, dropping what was held, as a server that died
    before sending it."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._server: asyncio.Server | None = None
        self._released = asyncio.Event()
        self._released.set()
        self._stall_marker: bytes | None = None
        self._stall_at_half_close = False
        self._hold_marker: bytes | None = None
        # Per connection: set while its server's bytes may go to its client.
        self._connection_gates: list[asyncio.Event] = []
        self._watch_marker: bytes | None = None
        self._watched_gates: list[asyncio.Event] = []
        self._unstalled = asyncio.Event()
        self.stalled = 0
        # Connections accepted so far: a client that has begun to connect.
        self.accepted = 0
        self._writers: list[asyncio.StreamWriter] = []
        # Per connection: its gate, and its client's and server's writers.
        self._connections: list[tuple[asyncio.Event, asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._pumps: set[asyncio.Task] = set()

    async def start(self, port: int = 0) -> int:
        """Starts listening (on ``port``: a proxy closed before listens on its
        port again, as a server back after its connections dropped); returns
        the proxy's port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        return self._server.sockets[0].getsockname()[1]

    def hold(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()
        for gate in self._connection_gates:
            gate.set()

    def hold_when_sent(self, marker: bytes) -> None:
        self._hold_marker = marker

    def stall_when_sent(self, marker: bytes) -> None:
        self._stall_marker = marker

    def stall_at_half_close(self) -> None:
        self._stall_at_half_close = True

    def watch(self, marker: bytes) -> None:
        self._watch_marker = marker

    def hold_watched(self) -> int:
        """Returns how many connections it holds."""
        for gate in self._watched_gates:
            gate.clear()
        return len(self._watched_gates)

    def unstall(self) -> None:
        self._unstalled.set()

    def drop_held(self) -> int:
        """Returns how many connections it closed."""
        held = [connection for connection in self._connections if not connection[0].is_set()]
        for gate, client_writer, server_writer in held:
            client_writer.close()
            server_writer.close()
            # What was held goes nowhere now: the closed writer drops it.
            gate.set()
        return len(held)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_reader, client_writer) -> None:
        self.accepted += 1
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self._port)
        self._writers += [client_writer, server_writer]
        gate = asyncio.Event()
        gate.set()
        self._connection_gates.append(gate)
        self._connections.append((gate, client_writer, server_writer))
        for pump in (
            self._sent(client_reader, server_writer, gate),
            self._replied(server_reader, client_writer, gate),
        ):
            task = asyncio.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _sent(self, reader, writer, gate: asyncio.Event) -> None:
        frames = _ClientFrames()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                half_closes = frames.half_closes(data)
                watched = self._watch_marker is not None and self._watch_marker in data
                if watched and gate not in self._watched_gates:
                    self._watched_gates.append(gate)
                if self._hold_marker is not None and self._hold_marker in data:
                    self._hold_marker = None
                    gate.clear()
                marked = self._stall_marker is not None and self._stall_marker in data
                if marked or (self._stall_at_half_close and half_closes):
                    self._stall_marker = None
                    self._stall_at_half_close = False
                    self.stalled += 1
                    await self._unstalled.wait()
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _replied(self, reader, writer, gate: asyncio.Event) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                await self._released.wait()
                await gate.wait()
                writer.write(data)
                await writer.drain()
        writer.close()


_PREFACE_BYTES = len(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
_FRAME_HEADER_BYTES = 9
_DATA, _END_STREAM = 0x0, 0x1


class _ClientFrames:
    """The HTTP/2 frame headers in what one client sends, read by read."""

    def __init__(self) -> None:
        self._header = b""  # a frame header split across reads
        self._skip = _PREFACE_BYTES  # bytes before the next frame header

    def half_closes(self, data: bytes) -> bool:
        """Whether ``data`` holds an empty DATA frame that ends its stream."""
        found = False
        position = 0
        while position < len(data):
            if self._skip:
                taken = min(self._skip, len(data) - position)
                self._skip -= taken
                position += taken
                continue
            wanted = _FRAME_HEADER_BYTES - len(self._header)
            self._header += data[position : position + wanted]
            position += wanted
            if len(self._header) < _FRAME_HEADER_BYTES:
                break
            length = int.from_bytes(self._header[:3], "big")
            kind, flags = self._header[3], self._header[4]
            found = found or (kind == _DATA and bool(flags & _END_STREAM) and length == 0)
            self._header = b""
            self._skip = length
        return found


def evalsha_marker(script: str) -> bytes:
    """What a call of a Lua ``script`` sends (its SHA-1, in EVALSHA), for a
    proxy to stall or hold the call by."""
    return hashlib.sha1(script.encode()).hexdigest().encode()


async def evalsha_calls(client) -> int:
    """How many EVALSHA calls Redis has run, from any client: that a call a
    proxy stalled reached Redis once let go."""
    return (await client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)


async def unstalled_and_run(proxy: TcpProxy, client) -> None:
    """Lets the call ``proxy`` stalls go, and waits (at most 5 s) until
    Redis has run it (``client``: a connection to Redis not through the
    proxy), so that what it would write twice is there to see."""
    calls = await evalsha_calls(client)
    proxy.unstall()
    for _ in range(100):
        if await evalsha_calls(client) > calls:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the stalled call never reached Redis")
