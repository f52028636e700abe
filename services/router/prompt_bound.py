"""When a stateless turn's prompt provably fits its model's window.

A stateless turn needs the context service only to fit its prompt to the
window: when it fits, AssembleContext returns the messages as sent. Asking
costs a whole hop on the way to the first token, so the router skips it
when an upper bound on the prompt's tokens, with room for max_tokens, is
within the window; when the bound does not fit (the prompt might not), the
context service still decides, with its exact count, so truncation and
CONTEXT_WINDOW_EXCEEDED stay exact.

Why the bound is safe: the prompt the model sees is its chat template
rendered over the messages, tokenized without added special tokens (the
bundled models, and the context service's count), so it has at most as many
tokens as the rendering has UTF-8 bytes whenever every token stands for at
least one byte. Byte-level BPE (SmolLM2) never emits a token for zero
bytes, and a special token the template writes is one token for several
bytes; one a message's content writes is broken into text
(tokenization.AsText), still fewer tokens, its zero-width space's
included, than the content's bytes for it. WordPiece (tiny-gpt's BERT
tokenizer) emits at most one token per character of the normalized text,
and its normalization (lowercasing, accents stripped, control characters
dropped) never makes more characters than the original had bytes.
tests/unit/test_router_prompt_bound.py
checks both bundled tokenizers on arbitrary text. The rendering's bytes are
bounded from the template: each message adds its content between fixed
strings (the frames the context service also derives), the prompt adds a
fixed prefix, default system prompt and generation cue; both are measured
here by rendering probes, so no setting can drift from the template.

Admission reserves the same bound (content bytes plus template_bytes) for a
turn a token or cost limit charges: inference bills the rendered prompt's
tokens, so the bound keeps what a turn settles to within what its limits
were checked for (services/router/admission.py).
"""

from __future__ import annotations

import collections.abc

import jinja2
import structlog

from meshgate import tokenization
from meshgate.common.v1 import common_pb2
from meshgate.config import ModelSettings

log = structlog.get_logger(__name__)

# A probe's content: a letter every template writes verbatim.
_PROBE = "x"
# A character is at most 4 UTF-8 bytes: most prompts fit without encoding.
_UTF8_MAX_BYTES_PER_CHAR = 4


class PromptBound:
    """At most how many tokens a rendered prompt of given messages has."""

    def __init__(self, fixed_bytes: int, message_bytes: int) -> None:
        # One message's whole prompt (prefix, default system prompt, its
        # frame, the generation cue), the largest over roles.
        self.fixed_bytes = fixed_bytes
        # What each further message adds besides its content, the largest over roles.
        self.message_bytes = message_bytes

    @classmethod
    def of(cls, template: tokenization.ChatTemplate) -> PromptBound:
        """Measured on ``template``; raises jinja2.TemplateError if it
        refuses a probe conversation."""

        def size(messages: list[tuple[str, str]], cue: bool) -> int:
            return len(template.render(messages, add_generation_prompt=cue).encode())

        roles = tokenization.ROLE_NAMES.values()
        alone = max(size([(role, _PROBE)], True) for role in roles) - len(_PROBE)
        system = size([("system", _PROBE)], False)
        added = max(size([("system", _PROBE), (role, _PROBE)], False) - system for role in roles)
        return cls(alone, added - len(_PROBE))

    def template_bytes(self, message_count: int) -> int:
        """At most how many bytes the template's own text (everything but
        the messages' content) adds to a prompt of ``message_count``
        messages: with the content's UTF-8 bytes, a bound on the prompt's
        tokens (admission reserves it, services/router/admission.py)."""
        return self.fixed_bytes + max(message_count - 1, 0) * self.message_bytes

    def fits(self, messages: collections.abc.Sequence[common_pb2.Message], tokens: int) -> bool:
        """Whether the rendered prompt of ``messages`` surely has at most
        ``tokens`` tokens. Content is encoded only when four bytes a
        character would not fit."""
        if not messages:
            return False
        room = tokens - self.template_bytes(len(messages))
        chars = sum(len(message.content) for message in messages)
        if _UTF8_MAX_BYTES_PER_CHAR * chars <= room:
            return True
        if chars > room:
            return False
        return sum(len(message.content.encode()) for message in messages) <= room


def prompt_bounds(models: dict[str, ModelSettings]) -> dict[str, PromptBound]:
    """A bound per alias whose chat template can be measured; an alias
    without one (its template refuses a probe, or its file is missing
    here) always has its prompts fitted by the context service."""
    bounds: dict[str, PromptBound] = {}
    for alias, model in models.items():
        bound = bound_of(model.chat_template, alias)
        if bound is not None:
            bounds[alias] = bound
    return bounds


def bound_of(chat_template: str, alias: str = "") -> PromptBound | None:
    """The bound of the chat template ``chat_template`` (ModelSettings'),
    measured now; None (logged) when it cannot be: its template refuses a
    probe, or its file is missing here."""
    try:
        return PromptBound.of(tokenization.load_chat_template(chat_template))
    except (OSError, jinja2.TemplateError) as error:
        log.warning(
            "no prompt bound; its prompts are always assembled, and admission reserves their content alone",
            model=alias,
            chat_template=chat_template,
            error=str(error),
        )
        return None


def in_assembly_order(messages: collections.abc.Sequence[common_pb2.Message]) -> bool:
    """Whether the context service would keep the order as sent: it puts a
    stateless turn's system messages first (assembly.render)."""
    seen_other = False
    for message in messages:
        if message.role != common_pb2.ROLE_SYSTEM:
            seen_other = True
        elif seen_other:
            return False
    return True
