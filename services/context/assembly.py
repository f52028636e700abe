"""Which messages make the prompt, given their token counts and a budget.

Pure and synchronous, so the policy can be tested without Redis or gRPC and
changed (summaries, say) without touching storage.
"""

from __future__ import annotations

import collections.abc
import dataclasses

from meshgate.common.v1 import common_pb2
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.errors import invalid_argument
from meshgate.reasons import Reason


@dataclasses.dataclass(frozen=True, slots=True)
class TemplateTokens:
    """Tokens the chat template adds to a prompt outside any message."""

    # Before the first message, always: a begin-of-sequence token such as
    # tiny-gpt's [CLS].
    prompt_prefix: int = 0
    # The assistant's cue after the last message.
    generation_prompt: int = 0
    # Added by templates like SmolLM2's when no message is a system message.
    default_system: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """A message that may enter the prompt, with what it would cost there."""

    message: common_pb2.Message
    # Its tokens as the chat template renders it (role marker and separators included).
    tokens: int


def assemble(
    session: collections.abc.Sequence[Candidate],
    new: collections.abc.Sequence[Candidate],
    budget: int,
    template: TemplateTokens = TemplateTokens(),
) -> pb.AssembleContextResponse:
    """Keeps every system message and every new message, then the newest
    session turns that fit, stopping at the first that does not: a gap in the
    middle of a conversation would mislead the model more than a shorter past.

    The prompt's cost is exactly what the model will see: the kept messages
    plus ``template``'s tokens outside them (the default system prompt only
    when no system message is kept; every system message is).

    Fails with CONTEXT_WINDOW_EXCEEDED when the messages that must be kept
    (new ones and the session's system messages) exceed the budget.
    """
    is_system = [c.message.role == common_pb2.ROLE_SYSTEM for c in session]
    any_system = any(is_system) or any(c.message.role == common_pb2.ROLE_SYSTEM for c in new)
    required = (
        template.prompt_prefix
        + template.generation_prompt
        + (0 if any_system else template.default_system)
        + sum(c.tokens for c in new)
        + sum(c.tokens for c, system in zip(session, is_system, strict=True) if system)
    )
    if required > budget:
        raise invalid_argument(
            Reason.CONTEXT_WINDOW_EXCEEDED,
            f"the new messages and the session's system messages, as the chat template renders them,"
            f" need {required} tokens, more than the budget of {budget}",
            tokens=str(required),
            budget=str(budget),
        )
    remaining = budget - required
    kept = list(is_system)
    for index in range(len(session) - 1, -1, -1):
        if kept[index]:
            continue
        if session[index].tokens > remaining:
            break
        kept[index] = True
        remaining -= session[index].tokens

    response = pb.AssembleContextResponse()
    response.messages.extend(c.message for c, system in zip(session, is_system, strict=True) if system)
    response.messages.extend(c.message for c in new if c.message.role == common_pb2.ROLE_SYSTEM)
    response.messages.extend(
        c.message for c, keep, system in zip(session, kept, is_system, strict=True) if keep and not system
    )
    response.messages.extend(c.message for c in new if c.message.role != common_pb2.ROLE_SYSTEM)

    manifest = response.manifest
    for index, (c, keep) in enumerate(zip(session, kept, strict=True)):
        manifest.entries.add(
            source=pb.SOURCE_SESSION,
            index=index,
            role=c.message.role,
            tokens=c.tokens,
            disposition=pb.DISPOSITION_INCLUDED if keep else pb.DISPOSITION_DROPPED,
        )
    for index, c in enumerate(new):
        manifest.entries.add(
            source=pb.SOURCE_REQUEST,
            index=index,
            role=c.message.role,
            tokens=c.tokens,
            disposition=pb.DISPOSITION_INCLUDED,
        )
    manifest.prompt_tokens = budget - remaining
    manifest.budget_tokens = budget
    return response
