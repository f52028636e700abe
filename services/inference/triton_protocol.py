"""Triton's gRPC messages for the models we front, built and read directly.

Generation speaks the tensor names of Triton's vLLM backend (``text_input``,
``stream``, ``sampling_parameters`` as JSON -> ``text_output``), so the same
service fronts the bundled model or a real vLLM-on-Triton deployment by
configuration alone. Requests are assembled as protobufs with raw tensor
contents: no numpy round trip per request.
"""

from __future__ import annotations

import json
import struct

import grpc
import jinja2
from tritonclient.grpc import service_pb2

from meshgate import tokenization
from meshgate.common.v1 import common_pb2
from meshgate.errors import invalid_argument
from meshgate.reasons import Reason

_TRUE = b"\x01"
_FINAL_FLAG = "triton_final_response"


def render_chat(messages, chat_template: str = "") -> str:
    """The prompt: the served model's chat template (its setting; empty: the
    plain one of the bundled tiny-gpt) over the messages, with the cue for
    the assistant's turn, as Hugging Face's apply_chat_template renders it.

    Templates are loaded once per process (the service loads them at start).
    A template may refuse a conversation (``raise_exception``): that is the
    caller's INVALID_ARGUMENT, not a failure of the service.
    """
    try:
        return tokenization.load_chat_template(chat_template).render_messages(messages)
    except jinja2.TemplateError as error:
        reason = f"the model's chat template refused the conversation: {error}"
        raise invalid_argument(Reason.CHAT_TEMPLATE_REJECTED, reason) from error


def sampling_parameters(parameters: common_pb2.GenerationParameters, default_max_tokens: int) -> str:
    """vLLM SamplingParams as JSON; unset fields stay unset so the model's defaults apply."""
    values: dict = {
        "max_tokens": parameters.max_tokens if parameters.HasField("max_tokens") else default_max_tokens
    }
    if parameters.HasField("temperature"):
        values["temperature"] = parameters.temperature
    if parameters.HasField("top_p"):
        values["top_p"] = parameters.top_p
    if parameters.stop:
        values["stop"] = list(parameters.stop)
    if parameters.HasField("seed"):
        values["seed"] = parameters.seed
    return json.dumps(values, separators=(",", ":"))


def _bytes_element(data: bytes) -> bytes:
    # Triton's BYTES wire format: each element is a 4-byte little-endian length, then the bytes.
    return struct.pack("<I", len(data)) + data


def _add_input(request, name: str, datatype: str, shape: list[int], raw: bytes) -> None:
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)


# An input of the bundled models only (vLLM's backend has no such input and
# Triton refuses unknown ones), so it is sent to a model that declares it.
CACHED_TOKENS_FLAG = "return_num_cached_tokens"


def generate_request(
    triton_model: str,
    request_id: str,
    prompt: str,
    sampling_json: str,
    batched: bool,
    cached_tokens: bool = False,
) -> service_pb2.ModelInferRequest:
    shape = [1, 1] if batched else [1]
    request = service_pb2.ModelInferRequest(model_name=triton_model, id=request_id)
    _add_input(request, "text_input", "BYTES", shape, _bytes_element(prompt.encode()))
    _add_input(request, "stream", "BOOL", shape, _TRUE)
    _add_input(request, "sampling_parameters", "BYTES", shape, _bytes_element(sampling_json.encode()))
    _add_input(request, "exclude_input_in_output", "BOOL", shape, _TRUE)
    for flag in ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens"):
        _add_input(request, flag, "BOOL", shape, _TRUE)
    if cached_tokens:
        _add_input(request, CACHED_TOKENS_FLAG, "BOOL", shape, _TRUE)
    # Without it, a model that ends with an empty final response leaves the
    # stream silent and the caller could not tell "done" from "slow".
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


def embed_request(triton_model: str, texts: list[str]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=triton_model)
    _add_input(
        request,
        "text",
        "BYTES",
        [len(texts), 1],
        b"".join(_bytes_element(t.encode()) for t in texts),
    )
    return request


class GenerateEvent:
    """What one streamed response of a vLLM-style model carried.

    As in the vLLM backend, ``output_tokens`` counts the tokens since the
    previous response, so a stream's total is their sum.
    """

    __slots__ = ("text", "final", "finish_reason", "input_tokens", "output_tokens", "cached_tokens")

    def __init__(self) -> None:
        self.text = ""
        self.final = False
        self.finish_reason = ""
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        # Prompt tokens the model served from its prefix cache.
        self.cached_tokens: int | None = None


def ends_stream(message: service_pb2.ModelStreamInferResponse) -> bool:
    """Whether a streamed message is the last one (the final response, or a
    failure): read without the rest of the response, for every message."""
    if message.error_message:
        return True
    final = message.infer_response.parameters.get(_FINAL_FLAG)
    return bool(final and final.bool_param)


def stream_error_code(error_message: str, triton_model: str) -> grpc.StatusCode:
    """The status a streamed ``error_message`` stands for. On a stream,
    Triton passes an error on as text alone (its status code would need its
    triton_grpc_error mode, which crashed tritonserver:
    backends.TritonBackend._open_stream), so the wording decides, as the
    bundled generation models and Triton word them: a request the model
    refuses ("<model>: invalid request: ...") is the caller's
    INVALID_ARGUMENT; a model shutting down, or one this server does not
    have (ready) just now, UNAVAILABLE, so the request is tried on another
    server if nothing went out yet; the model's own "request was cancelled",
    CANCELLED; anything else, a failure of the model: INTERNAL."""
    if error_message.startswith(f"{triton_model}: invalid request: "):
        return grpc.StatusCode.INVALID_ARGUMENT
    if error_message == f"{triton_model}: model is shutting down" or error_message.startswith(
        ("Request for unknown model", "Server not ready")
    ):
        return grpc.StatusCode.UNAVAILABLE
    if error_message == "request was cancelled":
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


def needs_no_hold(message: service_pb2.ModelStreamInferResponse) -> bool:
    """Whether a streamed message goes on at once rather than wait in the
    inference service's stream interval: the last one (``ends_stream``), or
    one that carries several tokens. A model that sends those already holds
    its deltas (the bundled models' ``stream_interval_ms``, the generation
    engine's StreamInterval): holding its responses again
    would compound the two intervals (a response every 80 ms, held up to 80
    ms more), while a backend that sends one token a response (vLLM or
    TensorRT-LLM on Triton) is still held here. Read for every message,
    without the text."""
    if ends_stream(message):
        return True
    response = message.infer_response
    for output, raw in zip(response.outputs, response.raw_output_contents):
        if output.name == "num_output_tokens":
            tokens = _first_integer(raw, output.datatype)
            return tokens is not None and tokens > 1
    return False


def read_generate_response(response: service_pb2.ModelInferResponse) -> GenerateEvent:
    event = GenerateEvent()
    final = response.parameters.get(_FINAL_FLAG)
    event.final = bool(final and final.bool_param)
    for output, raw in zip(response.outputs, response.raw_output_contents):
        if output.name == "text_output":
            event.text = _first_bytes_element(raw).decode("utf-8", errors="replace")
        elif output.name == "finish_reason":
            reason = _first_bytes_element(raw).decode()
            # vLLM sends str(None) until the sequence has finished.
            event.finish_reason = "" if reason == "None" else reason
        elif output.name == "num_input_tokens":
            event.input_tokens = _first_integer(raw, output.datatype)
        elif output.name == "num_output_tokens":
            event.output_tokens = _first_integer(raw, output.datatype)
        elif output.name == "num_cached_tokens":
            event.cached_tokens = _first_integer(raw, output.datatype)
    return event


def _first_bytes_element(raw: bytes) -> bytes:
    if len(raw) < 4:
        return b""
    (length,) = struct.unpack_from("<I", raw)
    return raw[4 : 4 + length]


_INTEGER_FORMATS = {"UINT32": "<I", "INT32": "<i", "UINT64": "<Q", "INT64": "<q"}


def _first_integer(raw: bytes, datatype: str) -> int | None:
    fmt = _INTEGER_FORMATS.get(datatype)
    if fmt is None or len(raw) < struct.calcsize(fmt):
        return None
    return struct.unpack_from(fmt, raw)[0]
