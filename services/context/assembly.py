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

# Tokens a chat template adds around each message (role marker, separators).
# Templates differ by a token or two; one constant keeps budgets predictable.
PER_MESSAGE_OVERHEAD_TOKENS = 4


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """A message that may enter the prompt, with what it would cost there."""

    message: common_pb2.Message
    # Content tokens plus PER_MESSAGE_OVERHEAD_TOKENS.
    tokens: int


def candidate(message: common_pb2.Message, content_tokens: int) -> Candidate:
    return Candidate(message, content_tokens + PER_MESSAGE_OVERHEAD_TOKENS)


def assemble(
    session: collections.abc.Sequence[Candidate],
    new: collections.abc.Sequence[Candidate],
    budget: int,
) -> pb.AssembleContextResponse:
    """Keeps every system message and every new message, then the newest
    session turns that fit, stopping at the first that does not: a gap in the
    middle of a conversation would mislead the model more than a shorter past.

    Fails with CONTEXT_WINDOW_EXCEEDED when the messages that must be kept
    (new ones and the session's system messages) exceed the budget.
    """
    is_system = [c.message.role == common_pb2.ROLE_SYSTEM for c in session]
    required = sum(c.tokens for c in new) + sum(
        c.tokens for c, system in zip(session, is_system, strict=True) if system
    )
    if required > budget:
        raise invalid_argument(
            "CONTEXT_WINDOW_EXCEEDED",
            f"the new messages and the session's system messages need {required} tokens,"
            f" more than the budget of {budget}",
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
