"""vllm_model.TritonSender: which of the bundled generation models' counts
ride on which streamed response."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest

from tests.unit import model_repository_modules

FINAL = 1


def stand_in_for_pb_utils() -> ModuleType:
    """triton_python_backend_utils exists only inside Triton's Python stub:
    a tensor here is its name and values, a response its tensors."""
    pb_utils = ModuleType("triton_python_backend_utils")
    pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    pb_utils.Tensor = lambda name, values: (name, values.tolist())
    pb_utils.InferenceResponse = lambda output_tensors=(), error=None: dict(output_tensors)
    return pb_utils


@pytest.fixture(scope="module")
def vllm_model():
    pb_utils = stand_in_for_pb_utils()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
        model_repository_modules.load("generation/engine.py")
        model_repository_modules.load("generation/prefix_cache.py")
        module = model_repository_modules.load("generation/vllm_model.py")
        # Loaded before by another test's stand-in, the module keeps that one.
        patch.setattr(module, "pb_utils", pb_utils)
        yield module


class ResponseSender:
    def __init__(self) -> None:
        self.sent: list[tuple[dict, int]] = []

    def send(self, response, flags=0) -> None:
        self.sent.append((response, flags))


def streamed(vllm_model, extra_outputs) -> list[tuple[dict, int]]:
    responses = ResponseSender()
    sender = vllm_model.TritonSender(responses, frozenset(extra_outputs), "tiny_gpt")
    sender.prompt_tokens = 13
    sender.send("Hel", None, 1, False, 0)
    sender.send("lo", None, 2, False, 0)
    sender.send("!", "length", 1, True, 5)
    return responses.sent


def test_the_prompts_count_rides_on_the_first_response_and_the_final_one(vllm_model):
    """A caller cut off before the final response (a client's cancel, its
    deadline) is billed the prompt tokens the model read, not a bound: the
    first response says them, as the final one does; the others, one per
    token, carry no more than they did."""
    first, second, final = streamed(vllm_model, vllm_model.EXTRA_OUTPUTS)
    assert first == ({"text_output": [b"Hel"], "num_output_tokens": [1], "num_input_tokens": [13]}, 0)
    assert second == ({"text_output": [b"lo"], "num_output_tokens": [2]}, 0)
    assert final[0]["num_input_tokens"] == [13] and final[1] == FINAL


def test_a_request_that_asks_for_no_prompt_count_gets_none(vllm_model):
    responses = streamed(vllm_model, ("num_output_tokens",))
    assert all("num_input_tokens" not in response for response, _ in responses)
