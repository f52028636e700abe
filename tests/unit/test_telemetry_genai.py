"""The GenAI attributes of a model call's spans: what the request asked
for, never the caller's text."""

from __future__ import annotations

from meshgate import telemetry
from meshgate.common.v1 import common_pb2


def test_stop_sequences_are_counted_not_recorded() -> None:
    stops = ["Patient: Jane Doe", "\n\nSSN"]
    parameters = common_pb2.GenerationParameters(max_tokens=8, stop=stops)
    attributes = telemetry.genai_request_attributes("chat", "m", parameters)
    assert attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": telemetry.GENAI_PROVIDER,
        "gen_ai.request.model": "m",
        "gen_ai.request.max_tokens": 8,
        "meshgate.request.stop_sequence_count": 2,
    }


def test_a_request_without_stop_sequences_has_no_count() -> None:
    attributes = telemetry.genai_request_attributes("chat", "m", common_pb2.GenerationParameters())
    assert "meshgate.request.stop_sequence_count" not in attributes
