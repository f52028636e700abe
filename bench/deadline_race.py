"""Chat turns whose caller's deadline passes midway through generation, against
a running `meshgate up` (`make run`): how many end with the router's status
(ErrorInfo, delivered_*) and how many with gRPC's bare local DEADLINE_EXCEEDED
(the caller's own timer won the race: no ErrorInfo).

    .venv/bin/python bench/deadline_race.py [--model smollm2] [--turns 20] [--deadline-s 4] [--max-tokens 200]

One turn at a time, cache bypassed, each a different prompt. A turn that
completes within its deadline counts as completed. The router's setting is
router.deadline_margin_s (docs/configuration.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import grpc
from google.rpc import error_details_pb2, status_pb2

from meshgate import serving
from meshgate.common.v1 import common_pb2
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            info = error_details_pb2.ErrorInfo()
            status_pb2.Status.FromString(value).details[0].Unpack(info)
            return info
    return None


async def main(options: argparse.Namespace) -> None:
    auth = (("authorization", f"Bearer {os.environ.get('MESHGATE_DEV_API_KEY', 'mg-dev-local-key')}"),)
    counts = {"completed": 0, "router_status": 0, "bare_local": 0}
    async with serving.client_channel(options.router, traced=False) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        for index in range(options.turns):
            request = pb.ChatRequest(
                model=options.model,
                cache_policy=pb.CACHE_POLICY_BYPASS,
                messages=[
                    common_pb2.Message(
                        role=common_pb2.ROLE_USER,
                        content=f"Tell me a long story about a lighthouse keeper, number {index}.",
                    )
                ],
                parameters=common_pb2.GenerationParameters(max_tokens=options.max_tokens),
            )
            started, deltas = time.monotonic(), 0
            try:
                async for response in stub.Chat(request, metadata=auth, timeout=options.deadline_s):
                    deltas += response.HasField("delta")
                outcome, said = "completed", {}
            except grpc.aio.AioRpcError as error:
                info = error_info(error)
                outcome = "router_status" if info is not None else "bare_local"
                said = dict(info.metadata) if info is not None else {}
            counts[outcome] += 1
            elapsed = time.monotonic() - started
            print(f"{outcome:14} {elapsed:7.3f} s {deltas:4} deltas {said}")
    print(json.dumps({**vars(options), **counts}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--router", default="127.0.0.1:50051")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--deadline-s", type=float, default=4.0)
    parser.add_argument("--max-tokens", type=int, default=200)
    asyncio.run(main(parser.parse_args()))
