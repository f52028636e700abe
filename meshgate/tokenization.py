"""Loads the tokenizers that count tokens, once per process."""

from __future__ import annotations

import functools
import importlib.util
import pathlib

import tokenizers


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
