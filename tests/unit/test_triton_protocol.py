import json
import struct

from tritonclient.grpc import service_pb2

from meshgate.common.v1 import common_pb2
from services.inference import triton_protocol


def test_sampling_parameters_leave_unset_fields_to_the_model():
    parameters = common_pb2.GenerationParameters(temperature=0.5, stop=["\n"])
    values = json.loads(triton_protocol.sampling_parameters(parameters, default_max_tokens=7))
    assert values == {"max_tokens": 7, "temperature": 0.5, "stop": ["\n"]}


def test_generate_request_uses_vllm_tensor_names_and_bytes_wire_format():
    request = triton_protocol.generate_request("m", "id1", "héllo", '{"max_tokens":3}', batched=True)
    inputs = {i.name: (i, raw) for i, raw in zip(request.inputs, request.raw_input_contents)}
    text, raw = inputs["text_input"]
    assert text.datatype == "BYTES" and list(text.shape) == [1, 1]
    assert raw == struct.pack("<I", len("héllo".encode())) + "héllo".encode()
    assert inputs["stream"][1] == b"\x01"
    assert request.parameters["triton_enable_empty_final_response"].bool_param
    unbatched = triton_protocol.generate_request("m", "id1", "x", "{}", batched=False)
    assert list(unbatched.inputs[0].shape) == [1]


def test_reads_deltas_counts_and_final_flag():
    response = service_pb2.ModelInferResponse()
    response.parameters["triton_final_response"].bool_param = True
    for name, datatype, raw in [
        ("text_output", "BYTES", struct.pack("<I", 3) + b"abc"),
        ("finish_reason", "BYTES", struct.pack("<I", 6) + b"length"),
        ("num_output_tokens", "UINT32", struct.pack("<I", 42)),
    ]:
        response.outputs.add(name=name, datatype=datatype, shape=[1])
        response.raw_output_contents.append(raw)
    event = triton_protocol.read_generate_response(response)
    assert (event.text, event.final, event.finish_reason, event.output_tokens) == ("abc", True, "length", 42)
    assert event.input_tokens is None


def test_chat_template_ends_with_the_assistant_cue():
    prompt = triton_protocol.render_chat(
        [
            common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="be brief"),
            common_pb2.Message(role=common_pb2.ROLE_USER, content="hi"),
        ]
    )
    assert prompt == "system: be brief\nuser: hi\nassistant:"
