"""Prompt templates invoked by name through the pipeline, with fakes behind
its stages; and their checks at configuration load."""

from __future__ import annotations

import string

import grpc
import pytest

from meshgate.common.v1 import common_pb2
from meshgate.config import (
    ConfigError,
    ModelSettings,
    RouterSettings,
    TemplateMessageSettings,
    TemplateParameterSettings,
    TemplateSettings,
    load_settings,
)
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from services.router.auth import Tenant
from services.router.pipeline import Budget, Completion, Failure, Pipeline
from services.router.templates import Templates
from tests.unit.test_router_pipeline import TENANT, FakeCache, FakeContexts, FakeGenerator, user

MODELS = {
    "m": ModelSettings(context_window_tokens=512, max_output_tokens=64, default_max_tokens=8),
    "big": ModelSettings(context_window_tokens=512, max_output_tokens=64, default_max_tokens=8),
    "other": ModelSettings(),
}


def summarize(version: int = 1, system: str = "You summarize $style.") -> TemplateSettings:
    return TemplateSettings(
        name="summarize",
        version=version,
        messages=[
            TemplateMessageSettings(role="system", content=system),
            TemplateMessageSettings(role="user", content="Summarize for ${audience}: $text"),
        ],
        parameters=TemplateParameterSettings(max_tokens=5, temperature=0.0, stop=["\n\n"]),
        models=["m", "big"],
    )


class RecordingGenerator(FakeGenerator):
    def __init__(self) -> None:
        super().__init__()
        self.parameters: list[common_pb2.GenerationParameters] = []
        self.aliases: list[str] = []

    async def generate(
        self, alias, prompt, parameters, budget, answer, session_id="", read_ahead=True, tenant_id=""
    ):
        self.parameters.append(parameters)
        self.aliases.append(alias)
        async for piece in super().generate(alias, prompt, parameters, budget, answer):
            yield piece


def pipeline(*templates: TemplateSettings, **settings) -> tuple[Pipeline, RecordingGenerator]:
    generator = RecordingGenerator()
    settings = RouterSettings(templates=list(templates), **settings)
    return Pipeline(settings, MODELS, FakeContexts(), FakeCache(), generator), generator


def invoke(name="summarize", version=None, model="", messages=(), parameters=None, **variables):
    invocation = pb.TemplateInvocation(name=name, variables=variables)
    if version is not None:
        invocation.version = version
    return pb.ChatRequest(
        model=model,
        template=invocation,
        messages=list(messages),
        parameters=parameters,
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )


async def run(turns: Pipeline, request, tenant=TENANT) -> list:
    return [event async for event in turns.run(request, tenant, "", Budget())]


async def failure_of(turns: Pipeline, request, tenant=TENANT):
    events = await run(turns, request, tenant)
    assert len(events) == 1 and isinstance(events[0], Failure)
    return events[0].error


async def test_a_template_is_filled_and_runs_on_its_first_model_with_its_defaults():
    turns, generator = pipeline(summarize())
    events = await run(turns, invoke(style="briefly", audience="children", text="The $5 {{ price }} rose."))
    assert isinstance(events[-1], Completion)
    assert generator.prompts == [
        # Values are text: a "$5" or "{{ ... }}" in a value is not expanded again.
        ["You summarize briefly.", "Summarize for children: The $5 {{ price }} rose."]
    ]
    assert generator.aliases == ["m"]
    (parameters,) = generator.parameters
    assert parameters.max_tokens == 5 and parameters.temperature == 0.0 and list(parameters.stop) == ["\n\n"]


async def test_the_request_may_add_messages_override_parameters_and_pick_an_allowed_model():
    turns, generator = pipeline(summarize())
    request = invoke(
        model="big",
        messages=[common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="Ready."), user("Go.")],
        parameters=common_pb2.GenerationParameters(max_tokens=3, stop=["."]),
        style="s",
        audience="a",
        text="t",
    )
    events = await run(turns, request)
    assert isinstance(events[-1], Completion)
    assert generator.prompts[0][2:] == ["Ready.", "Go."]
    assert generator.aliases == ["big"]
    (parameters,) = generator.parameters
    # Its own max_tokens and stop; the template's temperature where it set none.
    assert parameters.max_tokens == 3 and list(parameters.stop) == ["."]
    assert parameters.HasField("temperature") and parameters.temperature == 0.0


async def test_the_highest_version_unless_one_is_named():
    turns, generator = pipeline(summarize(1, "Old $style."), summarize(2, "New $style."))
    await run(turns, invoke(style="s", audience="a", text="t"))
    await run(turns, invoke(version=1, style="s", audience="a", text="t"))
    assert [prompt[0] for prompt in generator.prompts] == ["New s.", "Old s."]


@pytest.mark.parametrize(
    ("request_", "code", "reason", "metadata"),
    [
        (invoke(name="nope"), grpc.StatusCode.NOT_FOUND, Reason.TEMPLATE_NOT_FOUND, {"template": "nope"}),
        (
            invoke(version=7, style="s", audience="a", text="t"),
            grpc.StatusCode.NOT_FOUND,
            Reason.TEMPLATE_NOT_FOUND,
            {"template": "summarize"},
        ),
        (
            invoke(style="s", text="t"),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.TEMPLATE_VARIABLE_MISSING,
            {"variable": "audience"},
        ),
        (
            invoke(style="s", audience="a", text="t", tone="x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.TEMPLATE_VARIABLE_UNKNOWN,
            {"variable": "tone"},
        ),
        (
            invoke(model="other", style="s", audience="a", text="t"),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.TEMPLATE_MODEL_NOT_ALLOWED,
            {"model": "other"},
        ),
    ],
)
async def test_bad_invocations_are_refused_before_any_work(request_, code, reason, metadata):
    turns, generator = pipeline(summarize())
    error = await failure_of(turns, request_)
    assert (error.code, error.reason) == (code, reason)
    assert metadata.items() <= error.metadata.items()
    assert generator.prompts == []


async def test_the_rendered_turn_passes_the_usual_checks_and_permissions():
    turns, _ = pipeline(summarize())
    # The template's first model, which this tenant may not use.
    only_big = Tenant("t2", frozenset({"big"}))
    error = await failure_of(turns, invoke(style="s", audience="a", text="t"), only_big)
    assert error.reason == Reason.MODEL_NOT_ALLOWED
    huge = "x" * (RouterSettings().max_message_bytes + 1)
    error = await failure_of(turns, invoke(messages=[user(huge)], style="s", audience="a", text="t"))
    assert error.reason == Reason.MESSAGE_TOO_LARGE
    ends_with_assistant = invoke(
        messages=[common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="Done.")],
        style="s",
        audience="a",
        text="t",
    )
    assert (await failure_of(turns, ends_with_assistant)).reason == Reason.LAST_MESSAGE_NOT_USER


def repeats(times: int) -> TemplateSettings:
    return TemplateSettings(
        name="repeat",
        messages=[
            TemplateMessageSettings(role="system", content="Be $tone."),
            TemplateMessageSettings(content=" ".join(["$x"] * times) + " ${tone}$$"),
        ],
        models=["m"],
    )


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        # messages[1] is 4 copies of x, 4 spaces, "calm" and "$": 9 bytes beside them.
        ("x" * 22, False),  # 97 bytes
        ("x" * 23, True),  # 101 bytes
        ("é" * 11, False),  # 97 bytes in 53 characters
        ("é" * 12, True),  # 105 bytes in 57 characters: counted in bytes, as validation does
    ],
)
async def test_a_filled_message_over_the_size_limit_is_refused_naming_the_variable(value, refused):
    turns, generator = pipeline(repeats(4), max_message_bytes=100)
    events = await run(turns, invoke(name="repeat", tone="calm", x=value))
    if not refused:
        assert isinstance(events[-1], Completion)
        assert len(generator.prompts[0][1].encode()) == 97
        return
    (failure,) = events
    error = failure.error
    # Filled first, this was MESSAGE_TOO_LARGE naming messages[1], which the caller never sent.
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.TEMPLATE_RENDER_TOO_LARGE)
    assert error.metadata == {"template": "repeat", "variable": "x", "limit": "100"}
    assert "'x'" in error.message and "used 4 times" in error.message and "messages[1]" in error.message
    assert generator.prompts == []


def test_a_filled_message_is_measured_before_it_is_filled(monkeypatch):
    # An 8 MiB value used 8 times built a 64 MiB message before it was refused.
    templates = Templates([repeats(8)], max_message_bytes=RouterSettings().max_message_bytes)
    filled = []
    monkeypatch.setattr(string.Template, "substitute", lambda *a, **k: filled.append(a) or "")
    with pytest.raises(MeshgateError) as refused:
        templates.expand(invoke(name="repeat", tone="calm", x="é" * (4 << 20)), TENANT.id)
    assert refused.value.reason == Reason.TEMPLATE_RENDER_TOO_LARGE
    assert filled == []


async def test_a_template_kept_for_some_tenants_is_not_found_by_the_others():
    """A template may hold one tenant's system prompt: any tenant could run
    it (and ask the model to repeat it)."""
    own = summarize(2, "Acme's own $style.")
    own.tenants = ["acme"]
    turns, generator = pipeline(summarize(1, "Shared $style."), own)
    acme, other = Tenant("acme", frozenset({"*"})), Tenant("globex", frozenset({"*"}))
    await run(turns, invoke(style="s", audience="a", text="t"), acme)
    await run(turns, invoke(style="s", audience="a", text="t"), other)  # the highest it may use
    assert [prompt[0] for prompt in generator.prompts] == ["Acme's own s.", "Shared s."]
    refused = await failure_of(turns, invoke(version=2, style="s", audience="a", text="t"), other)
    assert (refused.code, refused.reason) == (grpc.StatusCode.NOT_FOUND, Reason.TEMPLATE_NOT_FOUND)
    with pytest.raises(ConfigError, match="tenants"):
        TemplateSettings(name="t", messages=own.messages, models=["m"], tenants=["a b"])


async def test_templates_reload_with_the_router_settings():
    turns, generator = pipeline(summarize())
    turns.reconfigure(RouterSettings(templates=[summarize(3, "Reloaded $style.")]), MODELS)
    await run(turns, invoke(style="s", audience="a", text="t"))
    assert generator.prompts[0][0] == "Reloaded s."
    turns.reconfigure(RouterSettings(), MODELS)
    assert (await failure_of(turns, invoke())).reason == Reason.TEMPLATE_NOT_FOUND


def test_templates_are_checked_when_the_configuration_loads(tmp_path):
    with pytest.raises(ConfigError, match="malformed"):
        summarize(system="Costs $ 5")
    with pytest.raises(ConfigError, match="role"):
        TemplateSettings(name="t", messages=[TemplateMessageSettings(role="tool")], models=["m"])
    with pytest.raises(ConfigError, match="one model"):
        TemplateSettings(name="t", messages=[TemplateMessageSettings()])
    with pytest.raises(ConfigError, match="twice"):
        RouterSettings(templates=[summarize(), summarize()])
    config = tmp_path / "meshgate.toml"
    config.write_text(
        '[[router.templates]]\nname = "ask"\nmodels = ["no-such-model"]\n'
        '[[router.templates.messages]]\ncontent = "$question"\n'
    )
    with pytest.raises(ConfigError, match="no-such-model"):
        load_settings(config, environ={})
    config.write_text(config.read_text().replace("no-such-model", "tiny-gpt"))
    (template,) = load_settings(config, environ={}).router.templates
    assert template.name == "ask" and template.messages[0].role == "user"


@pytest.mark.parametrize(
    ("parameters", "complaint"),
    [
        ({"top_p": 7.0}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"seed": -1}, "seed"),
        ({"max_tokens": 0}, "max_tokens must be positive"),
        ({"stop": ["."] * 9}, "stop strings"),
        # Outside the API's int32 and int64: Templates() raised a bare ValueError at the router's start.
        ({"max_tokens": 3_000_000_000}, r"max_tokens = 3000000000 is out of range .*int32"),
        ({"seed": 99999999999999999999}, r"seed = 99999999999999999999 is out of range .*int64"),
    ],
)
def test_a_templates_default_parameters_are_checked_as_a_requests_are(parameters, complaint):
    # Unchecked, these loaded, then every invocation leaving them unset failed
    # INVALID_ARGUMENT for a parameter its caller never sent.
    with pytest.raises(ConfigError, match=f"template 'summarize' version 1: parameters.*{complaint}"):
        TemplateSettings(
            name="summarize",
            messages=[TemplateMessageSettings(content="$text")],
            parameters=TemplateParameterSettings(**parameters),
            models=["m"],
        )


def test_a_templates_default_max_tokens_must_fit_every_model_it_lists(tmp_path):
    config = tmp_path / "meshgate.toml"
    text = """
[models.small]
max_output_tokens = 64
default_max_tokens = 8
[models.large]
max_output_tokens = 1024
context_window_tokens = 2048
[[router.templates]]
name = "t"
models = ["large", "small"]
[router.templates.parameters]
max_tokens = 1000
[[router.templates.messages]]
content = "Say $x"
"""
    config.write_text(text)
    with pytest.raises(
        ConfigError, match=r"'t' version 1: parameters.max_tokens \(1000\) exceeds .*\['small'\]"
    ):
        load_settings(config, environ={})
    config.write_text(text.replace("max_tokens = 1000", "max_tokens = 64"))
    (template,) = load_settings(config, environ={}).router.templates
    assert template.parameters.max_tokens == 64


def test_a_templates_default_max_tokens_must_leave_the_prompt_room_in_the_window(tmp_path):
    """A final read's finding: an alias with a window of 256 (its
    max_output_tokens the default 256) took a template whose max_tokens was
    256, and every invocation leaving max_tokens unset was refused
    MAX_TOKENS_TOO_LARGE (255 at most), blaming what the caller never sent."""
    config = tmp_path / "meshgate.toml"
    text = """
[models.small]
context_window_tokens = 256
default_max_tokens = 8
[[router.templates]]
name = "t"
models = ["small"]
[router.templates.parameters]
max_tokens = 256
[[router.templates.messages]]
content = "Say $x"
"""
    config.write_text(text)
    with pytest.raises(ConfigError, match=r"parameters.max_tokens \(256\) exceeds .*\['small'\]"):
        load_settings(config, environ={})
    config.write_text(text.replace("max_tokens = 256", "max_tokens = 255"))
    settings = load_settings(config, environ={})
    assert settings.models["small"].most_output_tokens == 255
