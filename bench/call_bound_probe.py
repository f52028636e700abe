"""Whether a call refused by `<service>.max_concurrent_rpcs` is read (docs/capacity.md).

A stand-in ContextService (its GetSession holds a call named "hold" and
answers any other at once) runs in a child process, bounded at 1 call in
flight with that call held, then unbounded as the control. Eight calls,
each carrying a session id of MESSAGE_MIB MiB, are sent at once; the
server's peak RSS (VmHWM) before and after shows whether their requests
were read (the control reads and answers them):

    .venv/bin/python bench/call_bound_probe.py
"""

from __future__ import annotations

import asyncio
import multiprocessing
import pathlib
import sys
import time

import grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshgate import serving  # noqa: E402
from meshgate.context.v1 import context_service_pb2 as pb  # noqa: E402
from meshgate.context.v1 import context_service_pb2_grpc  # noqa: E402

MESSAGE_MIB = 24
CALLS = 8


def peak_rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM"))


class HeldOrAnswered(context_service_pb2_grpc.ContextServiceServicer):
    async def GetSession(self, request, context):
        if request.session_id == "hold":
            await asyncio.sleep(3600)
        return pb.GetSessionResponse()


def serve(max_calls: int, ports: multiprocessing.Queue) -> None:
    async def main() -> None:
        service = serving.Service("context", ["meshgate.context.v1.ContextService"])
        context_service_pb2_grpc.add_ContextServiceServicer_to_server(HeldOrAnswered(), service.server)
        service.bound_calls(max_calls)

        async def nothing() -> None:
            pass

        ports.put(await serving.start(service, "127.0.0.1:0", nothing))
        await asyncio.Event().wait()

    asyncio.run(main())


async def send(port: int) -> set[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=serving.CHANNEL_OPTIONS) as channel:
        stub = context_service_pb2_grpc.ContextServiceStub(channel)
        held = stub.GetSession(pb.GetSessionRequest(tenant_id="t", session_id="hold"))
        await asyncio.sleep(0.5)
        big = pb.GetSessionRequest(tenant_id="t", session_id="x" * (MESSAGE_MIB << 20))
        codes = set()
        for outcome in await asyncio.gather(
            *(stub.GetSession(big, timeout=60) for _ in range(CALLS)), return_exceptions=True
        ):
            codes.add(outcome.code().name if isinstance(outcome, grpc.aio.AioRpcError) else "OK")
        held.cancel()
        return codes


def main() -> None:
    print(f"{CALLS} calls of {MESSAGE_MIB} MiB each, one other call held")
    for max_calls in (1, 0):
        ports: multiprocessing.Queue = multiprocessing.Queue()
        server = multiprocessing.Process(target=serve, args=(max_calls, ports))
        server.start()
        try:
            port = ports.get(timeout=60)
            time.sleep(0.5)
            before = peak_rss_mib(server.pid)
            codes = asyncio.run(send(port))
            time.sleep(0.5)
            after = peak_rss_mib(server.pid)
            print(
                f"max_concurrent_rpcs={max_calls}: {sorted(codes)}; server peak RSS {before} -> {after} MiB"
            )
        finally:
            server.terminate()
            server.join()


if __name__ == "__main__":
    main()
