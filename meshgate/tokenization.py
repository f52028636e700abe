"""Loads the tokenizers that count tokens and the chat templates that make
prompts, once per process."""

from __future__ import annotations

import collections.abc
import functools
import importlib.util
import pathlib

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
    if sep and "/" not in package and importlib.util.find_spec(package) is not None:
        origin = importlib.util.find_spec(package).origin
        return pathlib.Path(origin).parent / relative
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
        self, messages: collections.abc.Iterable[common_pb2.Message], add_generation_prompt: bool = True
    ) -> str:
        pairs = ((ROLE_NAMES.get(m.role, "user"), m.content) for m in messages)
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
