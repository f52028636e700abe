"""What each message costs in the model's prompt, exactly.

The prompt the model sees is its chat template rendered over the assembled
messages, so a message costs its content *as the template frames it* (role
marker and separators included), and a prompt adds a few tokens outside any
message: the generation prompt and, in templates like SmolLM2's, a default
system prompt when the conversation has none.

Each message is counted once, framed alone: ``prefix(role) + content +
suffix(role)``. The frames come from rendering probe conversations through the
template at start-up, so any template that places each message's content
verbatim between fixed strings works, and no setting can drift from the
template. Counting the content alone would not be exact: in ChatML a content
that starts with whitespace merges with the newline after the role
(``"user\\n" + " \\nHi"`` is one token fewer than its parts). A content is
framed as the inference service renders it, any special token it writes
broken into text (tokenization.AsText), so it costs what the model counts.

Framed messages are additive only when the tokenizer cannot merge across a
message boundary: ChatML starts every message with ``<|im_start|>``, a special
token the tokenizer splits at before anything else; the plain template of the
test model ends every line with a newline, where its BERT tokenizer splits.
Start-up checks this on probe conversations and refuses a template where it
fails, rather than serving wrong counts.

Counts are stored per counter id, a digest of the tokenizer file and the
template, so a stored count is only ever reused by the very pair that made
it, even when a model alias is later pointed at other files.

Each turn is also counted as a line of the adaptive strategy's transcript
message (assembly.transcript_line), stored under its own id
(``PromptCounter.line_id``): the packed message then costs exactly its frame
and header plus its lines, which start-up checks on probe turns as it checks
messages, leaving packing off for a tokenizer where that fails.
"""

from __future__ import annotations

import asyncio
import collections.abc
import dataclasses
import hashlib

import tokenizers

from meshgate import tokenization
from meshgate.common.v1 import common_pb2
from meshgate.config import ConfigError, ModelSettings
from services.context import assembly
from services.context.assembly import TemplateTokens

# Up to this many characters are counted on the event loop (well under a
# millisecond); more is counted in a thread so other calls keep flowing.
INLINE_COUNT_CHARS = 32 * 1024

# A request's new messages are counted at most this many characters at a
# time (a message whole), in order, and no further once they need more than
# the budget allows (PromptCounter.count_until): 127 messages of 256 KiB
# counted at once held 1.3 GB and 10.7 s of the context service to refuse a
# prompt of 448 tokens (a review; ~100 bytes a token while counted).
COUNT_GROUP_CHARS = 256 * 1024

# Private-use characters: no template writes them, so they mark where a
# probe's content went.
_PROBE = "\ue000probe-{}\ue001"
# Contents that would break additivity if the tokenizer merged across a
# message boundary: leading and trailing whitespace, digits, punctuation,
# special tokens written as text (the bundled tokenizers'), which are
# counted as the inference service renders them (tokenization.AsText), and
# letters on both sides of a boundary (a review's template with nothing
# between messages passed: "hel" then "lo" counted 2 tokens, "hello" is 1).
_ADDITIVITY_PROBES = (
    "hel",
    "lo",
    "Hello there.",
    " leading space",
    "\n\nnewlines\n",
    "trailing  ",
    "42",
    "",
    "é 日本",
    "<|im_end|>\n<|im_start|>system\n[SEP][CLS]",
)


@dataclasses.dataclass(frozen=True, slots=True)
class Frame:
    """The text a template puts around one message's content."""

    prefix: str
    suffix: str


@dataclasses.dataclass(frozen=True, slots=True)
class PromptCounter:
    # The tokenizer setting, reported in the manifest.
    spec: str
    # Short digest of the tokenizer file and the template: names the stored counts.
    id: str
    tokenizer: tokenizers.Tokenizer
    # What the inference service renders each content as (tokenization.AsText).
    as_text: tokenization.AsText
    frames: dict[int, Frame]
    template_tokens: TemplateTokens
    # The transcript message's frame and header (assembly.TRANSCRIPT_HEADER);
    # None when its lines do not add up exactly with this tokenizer: no packing.
    transcript_tokens: int | None = None
    # The chat template setting it was built with (for_models' reuse on a reload).
    template_spec: str = ""

    @property
    def line_id(self) -> str:
        """Names the stored counts of turns as transcript lines."""
        return self.id + ".line"

    async def count_lines(self, messages: collections.abc.Sequence[common_pb2.Message]) -> list[int]:
        """Tokens of each message as a line of the transcript message."""
        return await self._counted(messages, self.line)

    async def count(self, messages: collections.abc.Sequence[common_pb2.Message]) -> list[int]:
        """Tokens of each message in the prompt, its template frame included."""
        return await self._counted(messages, self.framed)

    async def count_until(
        self, messages: collections.abc.Sequence[common_pb2.Message], most: int
    ) -> list[int]:
        """Tokens of each message, as :meth:`count` gives them, counted
        COUNT_GROUP_CHARS at a time in order, stopping once those counted
        need more than ``most`` together: then fewer counts than messages
        (the rest need more still)."""
        counts: list[int] = []
        while len(counts) < len(messages) and sum(counts) <= most:
            start = end = len(counts)
            chars = 0
            while end < len(messages) and (
                end == start or chars + len(messages[end].content) <= COUNT_GROUP_CHARS
            ):
                chars += len(messages[end].content)
                end += 1
            counts += await self.count(messages[start:end])
        return counts

    async def _counted(self, messages, render) -> list[int]:
        """Tokens of each message as ``render`` writes it: rendered and
        counted on the event loop for a little text, in a thread for more.
        Rendering breaks special tokens (AsText), which costs too: done on
        the loop before a thread's count, 120 messages of 256 KiB of
        special-token text held it 1.4 s (a review)."""

        def counted() -> list[int]:
            return tokenization.count(self.tokenizer, [render(m) for m in messages])

        if sum(len(m.content) for m in messages) <= INLINE_COUNT_CHARS:
            return counted()
        return await asyncio.to_thread(counted)

    def line(self, message: common_pb2.Message) -> str:
        """The message as a line of the transcript message, as rendered. The
        transcript's content is kept text whole: as its lines each, since no
        special token holds a newline (start-up checks the bundled ones')."""
        return self.as_text(assembly.transcript_line(message))

    def framed(self, message: common_pb2.Message) -> str:
        """The message as the template renders it, outside the prompt's own additions."""
        frame = self.frames[message.role]
        return frame.prefix + self.as_text(message.content) + frame.suffix


def derive_frames(template: tokenization.ChatTemplate) -> tuple[dict[str, Frame], str, str, str]:
    """Each role's frame, the prompt's prefix (a begin-of-sequence token;
    empty if none), the default system prompt (empty if none) and the
    generation prompt, read off renderings of probe conversations.

    Raises ConfigError for a template that does not place each message's
    content verbatim between fixed strings.
    """
    first, second = _PROBE.format(1), _PROBE.format(2)
    system_alone = template.render([("system", first)], add_generation_prompt=False)
    frames: dict[str, Frame] = {}
    for role in tokenization.ROLE_NAMES.values():
        rendered = template.render([("system", first), (role, second)], add_generation_prompt=False)
        piece = rendered.removeprefix(system_alone)
        if piece == rendered or piece.count(second) != 1:
            raise ConfigError(f"chat template: a {role} message is not rendered on its own")
        prefix, suffix = piece.split(second)
        frames[role] = Frame(prefix, suffix)
    system = frames["system"]
    framed_system = system.prefix + first + system.suffix
    if not system_alone.endswith(framed_system):
        raise ConfigError("chat template: the first system message is framed unlike the others")
    prompt_prefix = system_alone.removesuffix(framed_system)

    user = frames["user"]
    framed_user = user.prefix + second + user.suffix
    user_alone = template.render([("user", second)], add_generation_prompt=False)
    if not (user_alone.startswith(prompt_prefix) and user_alone.endswith(framed_user)):
        raise ConfigError("chat template: a conversation without a system message is not framed as expected")
    default_system = user_alone.removeprefix(prompt_prefix).removesuffix(framed_user)
    with_cue = template.render([("user", second)], add_generation_prompt=True)
    if not with_cue.startswith(user_alone):
        raise ConfigError("chat template: the generation prompt is not appended at the end")
    return frames, prompt_prefix, default_system, with_cue.removeprefix(user_alone)


def build(spec: str, chat_template_spec: str) -> PromptCounter:
    """A counter for one tokenizer and template; reads files, so call it at start-up."""
    tokenizer = tokenization.load(spec)
    template = tokenization.load_chat_template(chat_template_spec)
    frames, prompt_prefix, default_system, generation_prompt = derive_frames(template)

    def n(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    digest = hashlib.sha256(tokenization.resolve(spec).read_bytes())
    digest.update(b"\0" + template.source.encode())
    # Counts stored before contents were kept text (tokenization.AsText)
    # counted a special token written in one as one token: not reused.
    digest.update(b"\0as text")
    counter = PromptCounter(
        spec,
        digest.hexdigest()[:16],
        tokenizer,
        tokenization.as_text(spec),
        {role: frames[name] for role, name in tokenization.ROLE_NAMES.items()},
        TemplateTokens(
            prompt_prefix=n(prompt_prefix),
            generation_prompt=n(generation_prompt),
            default_system=n(default_system),
        ),
        template_spec=chat_template_spec,
    )
    _check_additive(counter, template, n)
    transcript_tokens = n(counter.framed(assembly.transcript([])))
    if not _lines_add_up(counter, transcript_tokens, n):
        return counter
    return dataclasses.replace(counter, transcript_tokens=transcript_tokens)


def _lines_add_up(counter: PromptCounter, transcript_tokens: int, n) -> bool:
    """Whether a transcript message costs its frame and header plus its lines."""
    roles = list(tokenization.ROLE_NAMES)
    messages = [
        common_pb2.Message(role=roles[i % len(roles)], content=content)
        for i, content in enumerate(_ADDITIVITY_PROBES * 2)
    ]
    whole = n(counter.framed(assembly.transcript(messages)))
    return whole == transcript_tokens + sum(n(counter.line(m)) for m in messages)


def _check_additive(counter: PromptCounter, template: tokenization.ChatTemplate, n) -> None:
    """The whole rendered prompt must cost exactly what the parts add up to."""
    roles = list(tokenization.ROLE_NAMES)
    for start in range(len(roles)):
        messages = [
            common_pb2.Message(role=roles[(start + i) % len(roles)], content=content)
            for i, content in enumerate(_ADDITIVITY_PROBES)
        ]
        whole = n(template.render_messages(messages, as_text=counter.as_text))
        parts = sum(n(counter.framed(m)) for m in messages)
        parts += counter.template_tokens.prompt_prefix + counter.template_tokens.generation_prompt
        if messages[0].role != common_pb2.ROLE_SYSTEM:
            parts += counter.template_tokens.default_system
        if whole != parts:
            raise ConfigError(
                f"chat template and tokenizer {counter.spec!r}: a prompt of {whole} tokens counts as"
                f" {parts} message by message: the template changes contents, or the tokenizer"
                " merges across message boundaries"
            )


def for_models(
    models: dict[str, ModelSettings], reuse: dict[str, PromptCounter] | None = None
) -> dict[str, PromptCounter]:
    """One counter per model alias, built once per distinct tokenizer and template.

    Reads files, so call it at start-up, not on the event loop while serving;
    a reload passes the counters in use as ``reuse``: an alias naming the
    same tokenizer and template settings as one of them gets that counter,
    unread (a file changed in place under the same setting is a restart's,
    as at start), and only new pairs are read.
    """
    by_files: dict[tuple[str, str], PromptCounter] = {}
    if reuse:
        for counter in reuse.values():
            by_files.setdefault((counter.spec, counter.template_spec), counter)
    for model in models.values():
        files = (model.tokenizer, model.chat_template)
        if files not in by_files:
            by_files[files] = build(*files)
    return {alias: by_files[(model.tokenizer, model.chat_template)] for alias, model in models.items()}
