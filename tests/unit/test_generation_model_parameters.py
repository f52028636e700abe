"""vllm_model.ModelParameters: a generation model's config.pbtxt parameters,
each bad one refused with its name (the model's load then fails saying which)."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest

from tests.unit import model_repository_modules


@pytest.fixture(scope="module")
def vllm_model():
    # triton_python_backend_utils exists only inside Triton's Python stub; the
    # module reads one constant from it at import and nothing else that this
    # test reaches, so a bare stand-in is enough to import it.
    stand_in = ModuleType("triton_python_backend_utils")
    stand_in.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "triton_python_backend_utils", stand_in)
        model_repository_modules.load("generation/engine.py")
        model_repository_modules.load("generation/prefix_cache.py")
        yield model_repository_modules.load("generation/vllm_model.py")


def _parameters(**values: str) -> dict:
    return {key: {"string_value": value} for key, value in values.items()}


def test_the_defaults_hold_when_a_parameter_is_absent(vllm_model):
    parameters = vllm_model.ModelParameters.from_parameters({})
    assert (parameters.max_active_sequences, parameters.prefix_cache_bytes) == (16, 0)
    assert parameters.stream_interval.seconds == 0


def test_the_parameters_are_read_as_triton_gives_them(vllm_model):
    parameters = vllm_model.ModelParameters.from_parameters(
        _parameters(max_active_sequences="4", prefix_cache_bytes="33554432", stream_interval_ms="80")
    )
    assert (parameters.max_active_sequences, parameters.prefix_cache_bytes) == (4, 33554432)
    assert parameters.stream_interval.seconds == pytest.approx(0.08)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("max_active_sequences", "many", "max_active_sequences must be an integer, got 'many'"),
        ("max_active_sequences", "2.5", "max_active_sequences must be an integer, got '2.5'"),
        ("max_active_sequences", "", "max_active_sequences must be an integer, got ''"),
        ("max_active_sequences", "0", "max_active_sequences must be >= 1, got '0'"),
        ("prefix_cache_bytes", "32MiB", "prefix_cache_bytes must be an integer, got '32MiB'"),
        ("prefix_cache_bytes", "-1", "prefix_cache_bytes must be >= 0, got '-1'"),
        ("stream_interval_ms", "-5", "stream_interval_ms must be >= 0 (0: off), got '-5'"),
        ("stream_interval_ms", "fast", "stream_interval_ms must be a number, got 'fast'"),
        ("stream_interval_ms", "nan", "stream_interval_ms must be finite, got 'nan'"),
        ("stream_interval_ms", "", "stream_interval_ms must be a number, got ''"),
        ("stream_interval_min_active", "0", "stream_interval_min_active must be >= 1, got '0'"),
        ("stream_interval_min_active", "2.5", "stream_interval_min_active must be an integer, got '2.5'"),
    ],
)
def test_a_bad_parameter_is_refused_by_name(vllm_model, key, value, message):
    with pytest.raises(ValueError) as refused:
        vllm_model.ModelParameters.from_parameters(_parameters(**{key: value}))
    assert str(refused.value) == message


@pytest.mark.parametrize(
    "parameters, expected",
    [
        ({}, (0.0, 1)),
        ({"stream_interval_ms": {"string_value": "0"}}, (0.0, 1)),
        ({"stream_interval_ms": {"string_value": "80"}}, (0.08, 1)),
        (
            {
                "stream_interval_ms": {"string_value": "40.5"},
                "stream_interval_min_active": {"string_value": "4"},
            },
            (0.0405, 4),
        ),
    ],
)
def test_the_stream_interval_is_read_from_the_model_parameters(vllm_model, parameters, expected):
    interval = vllm_model.ModelParameters.from_parameters(parameters).stream_interval
    assert (interval.seconds, interval.min_active) == pytest.approx(expected)
