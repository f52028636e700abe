"""Does tritonserver survive requests its model refuses, beside concurrent streams?

    .venv/bin/python bench/triton_refusal_probe.py                # as the inference service streams
    .venv/bin/python bench/triton_refusal_probe.py --grpc-error   # in Triton's triton_grpc_error mode

One tritonserver (the bundled tiny_gpt, on CPU), four background workers
each generating 16-token answers one after another, and a foreground that
sends, round after round, a request tiny_gpt refuses (max_tokens 600 over
its 511). By default every request gets a ModelStreamInfer call of its own
(half-closed after its last response), as the inference service streamed
before it reused calls; with ``--reuse``, each background worker keeps one
call and the foreground's refusal follows an answer on its call, as pooled
calls carry requests now. With ``--grpc-error`` the calls carry
``triton_grpc_error: true`` (Triton then ends a stream with the model's
status code); without it the refusal comes back as a response's
``error_message`` and the call stays usable. Prints how many rounds ran and
whether tritonserver was still running: services/inference/backends.py
dropped the mode after this crashed it (bench/README.md, "Triton's
triton_grpc_error mode").
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import tempfile
import uuid

import grpc
from tritonclient.grpc import service_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshgate.local import triton  # noqa: E402
from meshgate.local.stack import build_model_weights, free_port  # noqa: E402
from services.inference import triton_protocol  # noqa: E402

MODEL = "tiny_gpt"


def request(max_tokens: int):
    sampling = f'{{"max_tokens":{max_tokens},"temperature":0.0}}'
    return triton_protocol.generate_request(MODEL, uuid.uuid4().hex, "Hello there", sampling, False)


async def until_last(call) -> str:
    """Reads one request's responses: "answered", "refused" (an error
    response), or raises the call's failure (the refusal, in grpc error mode)."""
    while (message := await call.read()) is not grpc.aio.EOF:
        if message.error_message:
            return "refused"
        if triton_protocol.ends_stream(message):
            return "answered"
    return "ended"


async def probe(rounds: int, grpc_error: bool, reuse: bool) -> None:
    build_model_weights()
    port = free_port()
    url = f"127.0.0.1:{port}"
    metadata = (("triton_grpc_error", "true"),) if grpc_error else ()
    with tempfile.TemporaryDirectory() as state:
        process = triton.launch(
            grpc_port=port,
            state_dir=pathlib.Path(state),
            log_file=pathlib.Path(state) / "triton.log",
            models=(MODEL,),
        )
        triton.wait_ready(url, (MODEL,), timeout=120, process=process)
        refused = 0
        done = 0
        async with grpc.aio.insecure_channel(url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

            async def answering() -> None:
                call = stub.ModelStreamInfer(metadata=metadata) if reuse else None
                while True:
                    if not reuse:
                        call = stub.ModelStreamInfer(metadata=metadata)
                    await call.write(request(16))
                    await until_last(call)
                    if not reuse:
                        await call.done_writing()
                        await until_last(call)

            background = [asyncio.ensure_future(answering()) for _ in range(4)]
            try:
                for done in range(rounds):  # noqa: B007 (printed when a round fails)
                    call = stub.ModelStreamInfer(metadata=metadata)
                    if reuse:
                        await call.write(request(8))
                        await until_last(call)
                    await call.write(request(600))
                    try:
                        if await until_last(call) == "refused":
                            refused += 1
                    except grpc.aio.AioRpcError as error:
                        if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                            raise
                        refused += 1
                    call.cancel()
                done = rounds
            except grpc.aio.AioRpcError as error:
                print(f"round {done}: {error.code().name} {error.details()}")
            finally:
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
        alive = process.poll() is None
        triton.terminate(process)
    mode = "triton_grpc_error" if grpc_error else "error_message"
    print(
        f"{mode}, {'calls reused' if reuse else 'a call per request'}: "
        f"{done} of {rounds} rounds, {refused} refused, tritonserver {'running' if alive else 'DIED'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--grpc-error", action="store_true", help="send triton_grpc_error: true")
    parser.add_argument("--reuse", action="store_true", help="calls carry request after request")
    args = parser.parse_args()
    asyncio.run(probe(args.rounds, args.grpc_error, args.reuse))


if __name__ == "__main__":
    main()
