"""Prompt templates as named endpoints: a ChatRequest that invokes a
template becomes the plain request it stands for, before validation.

Variables are filled by :class:`string.Template` (``$name``, ``${name}``),
not Jinja: a template needs substitution only, and string.Template evaluates
nothing, neither in the template nor in a value (a value containing
``$other`` or ``{{ ... }}`` stays that text), and names its variables up
front, so a missing or unknown variable is refused by name before any
rendering. A message that would be larger than router.max_message_bytes
once filled is refused, naming the variable, before it is filled; the
rendered messages then pass the same checks as any turn.
"""

from __future__ import annotations

import collections
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
class _Size:
    """A template message's size once filled: its own text's, plus each
    variable's value as many times as it is used."""

    text_chars: int
    text_bytes: int
    uses: dict[str, int]


@dataclasses.dataclass(frozen=True)
class _Template:
    name: str
    version: int
    messages: tuple[tuple[int, string.Template], ...]
    sizes: tuple[_Size, ...]
    variables: frozenset[str]
    defaults: common_pb2.GenerationParameters
    models: tuple[str, ...]
    # Who may invoke it; empty: everyone.
    tenants: frozenset[str]


def _compile(settings: TemplateSettings) -> _Template:
    messages = tuple(
        (_ROLES[message.role], string.Template(message.content)) for message in settings.messages
    )
    return _Template(
        name=settings.name,
        version=settings.version,
        messages=messages,
        sizes=tuple(_size(template) for _, template in messages),
        variables=frozenset(name for _, template in messages for name in template.get_identifiers()),
        # Checked when the settings were made (TemplateSettings): never raises here.
        defaults=settings.parameters.generation_parameters(f"template {settings.name!r}"),
        models=tuple(settings.models),
        tenants=frozenset(settings.tenants),
    )


def _size(template: string.Template) -> _Size:
    uses = collections.Counter(
        match["named"] or match["braced"]
        for match in template.pattern.finditer(template.template)
        if match["named"] or match["braced"]
    )
    # Every variable filled with nothing: the text the template itself adds ($$ as $).
    text = template.substitute(dict.fromkeys(uses, ""))
    return _Size(len(text), len(text.encode()), dict(uses))


def invokes_template(request) -> bool:
    """Whether ``request`` names a template (only ChatRequest can)."""
    return "template" in request.DESCRIPTOR.fields_by_name and request.HasField("template")


class Templates:
    """The configured templates, by name and version (router.templates)."""

    def __init__(self, settings: list[TemplateSettings], max_message_bytes: int) -> None:
        # router.max_message_bytes, which each filled message must be within.
        self._max_message_bytes = max_message_bytes
        self._versions: dict[str, dict[int, _Template]] = {}
        for template in map(_compile, settings):
            self._versions.setdefault(template.name, {})[template.version] = template

    def expand(self, request: router_pb.ChatRequest, tenant_id: str) -> router_pb.ChatRequest:
        """The plain request ``request``'s template invocation stands for:
        the template's messages, filled, then the request's own; its default
        parameters under the request's; its first model unless the request
        names one of its models. A template ``tenant_id`` may not invoke is
        not found, as one that does not exist."""
        invocation = request.template
        template = self._find(invocation, tenant_id)
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
        self._check_sizes(template, variables)
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

    def _check_sizes(self, template: _Template, variables: dict[str, str]) -> None:
        """Refuses, naming the variable that makes most of it, a message
        that would be larger than router.max_message_bytes once filled:
        from the values' lengths, before filling anything. Filled first, an
        8 MiB value used 8 times built a 64 MiB message on the event loop
        (0.35 s, 164 MiB at peak) to be refused as MESSAGE_TOO_LARGE naming
        messages[0], a message its caller never sent."""
        limit = self._max_message_bytes
        for index, size in enumerate(template.sizes):
            chars = size.text_chars + sum(n * len(variables[name]) for name, n in size.uses.items())
            # As validation counts a message: a character is 1 to 4 UTF-8
            # bytes, so values are encoded only where that leaves the answer
            # open (and then each is at most the limit in characters).
            if not (chars > limit or (4 * chars > limit and self._bytes(size, variables) > limit)):
                continue
            if not size.uses:
                continue  # The template's own text alone: validation's MESSAGE_TOO_LARGE.
            name = max(sorted(size.uses), key=lambda name: size.uses[name] * len(variables[name]))
            raise invalid_argument(
                Reason.TEMPLATE_RENDER_TOO_LARGE,
                f"template {template.name!r}: the variable {name!r} ({len(variables[name])} characters, "
                f"used {size.uses[name]} times) makes its messages[{index}] larger than {limit} bytes",
                template=template.name,
                variable=name,
                limit=str(limit),
            )

    @staticmethod
    def _bytes(size: _Size, variables: dict[str, str]) -> int:
        return size.text_bytes + sum(n * len(variables[name].encode()) for name, n in size.uses.items())

    def _find(self, invocation: router_pb.TemplateInvocation, tenant_id: str) -> _Template:
        versions = {
            version: template
            for version, template in self._versions.get(invocation.name, {}).items()
            if not template.tenants or tenant_id in template.tenants
        }
        if versions:
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
