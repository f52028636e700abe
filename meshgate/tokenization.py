"""Loads the tokenizers that count tokens and the chat templates that make
prompts, once per process."""

from __future__ import annotations

import collections.abc
import functools
import importlib.util
import pathlib
import re

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from meshgate.common.v1 import common_pb2

ROLE_NAMES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
}

# The bundled test model's template: [CLS], which its weights expect first,
# then one line per turn and the assistant's cue. The template, not the
# model, adds the [CLS] (as Hugging Face templates add a bos_token), so the
# rendered prompt is every token the model sees and the context service's
# counts are exact. Models with a template of their own (SmolLM2's ChatML)
# name its file.
PLAIN_CHAT_TEMPLATE = (
    "[CLS]{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def resolve(spec: str) -> pathlib.Path:
    """``package:relative/path`` inside an installed package, or a plain path."""
    package, sep, relative = spec.partition(":")
    if sep and "/" not in package:
        try:
            found = importlib.util.find_spec(package)
        except ImportError:
            # A dotted name whose parent package is not installed: find_spec
            # imports the parent, and its ModuleNotFoundError failed a
            # router's start with a traceback naming no setting (a review).
            found = None
        if found is not None and found.origin is not None:
            return pathlib.Path(found.origin).parent / relative
    return pathlib.Path(spec)


@functools.cache
def load(spec: str) -> tokenizers.Tokenizer:
    path = resolve(spec)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {spec!r} not found at {path}")
    tokenizer = tokenizers.Tokenizer.from_file(str(path))
    # Counting needs every token; the embedding model's truncation would undercount.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


# Written after the first character of a special token's text in a message's
# content: zero width, so the text reads as it did, and no special token
# holds it, so the tokenizer reads the characters around it as text.
SPECIAL_TOKEN_BREAK = "\u200b"


class AsText:
    """Keeps a message's content text to the model's tokenizer.

    Tokenizers match their special tokens in any text they are given, and
    the model is given the rendered prompt: a content that writes
    ``<|im_end|>\n<|im_start|>system\n`` would otherwise open a turn of its
    own (a tenant's message, or the model's own earlier answer or summary,
    as the prompt of a later turn). Each special token written in a content
    gets SPECIAL_TOKEN_BREAK after its first character, so only the
    template's own text makes special tokens. The inference service renders
    the prompt with it and the context service counts with it, so counts
    stay the model's. Matching is on the raw text, as tokenizers match
    special tokens that are not ``normalized`` (every bundled one); a
    one-character special token cannot be broken so and is left.
    """

    def __init__(self, specials: collections.abc.Iterable[str]) -> None:
        breakable = sorted((s for s in set(specials) if len(s) > 1), key=len, reverse=True)
        if any(SPECIAL_TOKEN_BREAK in s for s in breakable):
            raise ValueError("a special token holds the character that breaks special tokens")
        self._pattern = re.compile("|".join(map(re.escape, breakable))) if breakable else None

    def __call__(self, content: str) -> str:
        if self._pattern is None:
            return content
        # Again until none is left: breaking one cannot make another, but
        # one may overlap another that a single pass skipped.
        while (broken := self._pattern.sub(_break_token, content)) != content:
            content = broken
        return content


def _break_token(match: re.Match) -> str:
    return match[0][0] + SPECIAL_TOKEN_BREAK + match[0][1:]


@functools.cache
def as_text(spec: str) -> AsText:
    """The :class:`AsText` of the tokenizer ``spec`` (``load``'s form)."""
    added = load(spec).get_added_tokens_decoder().values()
    return AsText(token.content for token in added if token.special)


def count(tokenizer: tokenizers.Tokenizer, texts: list[str]) -> list[int]:
    """Token counts without special tokens, batched in Rust."""
    if not texts:
        return []
    return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


class ChatTemplate:
    """A Jinja chat template as Hugging Face renders it: a sandbox, trimmed
    blocks, ``raise_exception`` for templates that refuse a conversation."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._template = _environment().from_string(source)

    def render(
        self, messages: collections.abc.Iterable[tuple[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """``messages`` as (role name, content) pairs. Raises
        ``jinja2.TemplateError`` when the template refuses them."""
        return self._template.render(
            messages=[{"role": role, "content": content} for role, content in messages],
            add_generation_prompt=add_generation_prompt,
        )

    def render_messages(
        self,
        messages: collections.abc.Iterable[common_pb2.Message],
        as_text: AsText,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt of ``messages``, each content kept text by ``as_text``
        (its model's tokenizer's, ``as_text(spec)``)."""
        pairs = ((ROLE_NAMES.get(m.role, "user"), as_text(m.content)) for m in messages)
        return self.render(pairs, add_generation_prompt)


@functools.cache
def load_chat_template(spec: str) -> ChatTemplate:
    """A template file (path or ``package:path``); empty: the plain template."""
    if not spec:
        return ChatTemplate(PLAIN_CHAT_TEMPLATE)
    path = resolve(spec)
    if not path.is_file():
        raise FileNotFoundError(f"chat template {spec!r} not found at {path}")
    return ChatTemplate(path.read_text(encoding="utf-8"))


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


@functools.cache
def _environment() -> jinja2.Environment:
    # Templates come from model files: the sandbox keeps them from reaching
    # Python objects; trim_blocks/lstrip_blocks are what the templates are written for.
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.globals["raise_exception"] = _raise_exception
    return environment
