"""Prompt templates as named endpoints: a ChatRequest that invokes a
template becomes the plain request it stands for, before validation.

Variables are filled by :class:`string.Template` (``$name``, ``${name}``),
not Jinja: a template needs substitution only, and string.Template evaluates
nothing, neither in the template nor in a value (a value containing
``$other`` or ``{{ ... }}`` stays that text), and names its variables up
front, so a missing or unknown variable is refused by name before any
rendering. The rendered messages then pass the same checks as any turn.
"""

from __future__ import annotations

import dataclasses
import string

from meshgate.common.v1 import common_pb2
from meshgate.config import TemplateSettings
from meshgate.errors import invalid_argument, not_found
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as router_pb

_ROLES = {
    "system": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
}
# Parameters the request's own value overrides one by one (stop: as a whole).
_SCALAR_PARAMETERS = ("max_tokens", "temperature", "top_p", "seed")


@dataclasses.dataclass(frozen=True)
class _Template:
    name: str
    version: int
    messages: tuple[tuple[int, string.Template], ...]
    variables: frozenset[str]
    defaults: common_pb2.GenerationParameters
    models: tuple[str, ...]


def _compile(settings: TemplateSettings) -> _Template:
    messages = tuple(
        (_ROLES[message.role], string.Template(message.content)) for message in settings.messages
    )
    return _Template(
        name=settings.name,
        version=settings.version,
        messages=messages,
        variables=frozenset(name for _, template in messages for name in template.get_identifiers()),
        # Checked when the settings were made (TemplateSettings): never raises here.
        defaults=settings.parameters.generation_parameters(f"template {settings.name!r}"),
        models=tuple(settings.models),
    )


def invokes_template(request) -> bool:
    """Whether ``request`` names a template (only ChatRequest can)."""
    return "template" in request.DESCRIPTOR.fields_by_name and request.HasField("template")


class Templates:
    """The configured templates, by name and version (router.templates)."""

    def __init__(self, settings: list[TemplateSettings]) -> None:
        self._versions: dict[str, dict[int, _Template]] = {}
        for template in map(_compile, settings):
            self._versions.setdefault(template.name, {})[template.version] = template

    def expand(self, request: router_pb.ChatRequest) -> router_pb.ChatRequest:
        """The plain request ``request``'s template invocation stands for:
        the template's messages, filled, then the request's own; its default
        parameters under the request's; its first model unless the request
        names one of its models."""
        invocation = request.template
        template = self._find(invocation)
        variables = dict(invocation.variables)
        for name in sorted(set(variables) - template.variables):
            raise invalid_argument(
                Reason.TEMPLATE_VARIABLE_UNKNOWN,
                f"template {template.name!r} has no variable {name!r}",
                template=template.name,
                variable=name,
            )
        for name in sorted(template.variables - set(variables)):
            raise invalid_argument(
                Reason.TEMPLATE_VARIABLE_MISSING,
                f"template {template.name!r} needs the variable {name!r}",
                template=template.name,
                variable=name,
            )
        model = request.model or template.models[0]
        if model not in template.models:
            raise invalid_argument(
                Reason.TEMPLATE_MODEL_NOT_ALLOWED,
                f"template {template.name!r} runs on {list(template.models)}, not {model!r}",
                template=template.name,
                model=model,
            )
        expanded = router_pb.ChatRequest()
        expanded.CopyFrom(request)
        expanded.ClearField("template")
        expanded.model = model
        del expanded.messages[:]
        expanded.messages.extend(
            # substitute, never safe_substitute: every variable is known to be given.
            common_pb2.Message(role=role, content=content.substitute(variables))
            for role, content in template.messages
        )
        expanded.messages.extend(request.messages)
        expanded.parameters.CopyFrom(_parameters(template.defaults, request.parameters))
        return expanded

    def _find(self, invocation: router_pb.TemplateInvocation) -> _Template:
        versions = self._versions.get(invocation.name)
        if versions is not None:
            if not invocation.HasField("version"):
                return versions[max(versions)]
            if invocation.version in versions:
                return versions[invocation.version]
        wanted = f" version {invocation.version}" if invocation.HasField("version") else ""
        raise not_found(
            Reason.TEMPLATE_NOT_FOUND,
            f"no template {invocation.name!r}{wanted}",
            template=invocation.name,
        )


def _parameters(
    defaults: common_pb2.GenerationParameters, given: common_pb2.GenerationParameters
) -> common_pb2.GenerationParameters:
    parameters = common_pb2.GenerationParameters()
    parameters.CopyFrom(defaults)
    for name in _SCALAR_PARAMETERS:
        if given.HasField(name):
            setattr(parameters, name, getattr(given, name))
    if given.stop:
        del parameters.stop[:]
        parameters.stop.extend(given.stop)
    return parameters
