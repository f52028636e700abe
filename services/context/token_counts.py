"""The tokenizers of the configured models, each with a stable id.

Counts are stored per tokenizer id, derived from the tokenizer file's bytes,
so a stored count is only ever reused by the very tokenizer that made it, even
when a model alias is later pointed at another file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib

import tokenizers

from meshgate import tokenization
from meshgate.config import ModelSettings

# Up to this many characters are counted on the event loop (well under a
# millisecond); more is counted in a thread so other calls keep flowing.
INLINE_COUNT_CHARS = 32 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class CountingTokenizer:
    spec: str
    # Short digest of the tokenizer file: names the stored counts.
    id: str
    tokenizer: tokenizers.Tokenizer

    async def count(self, texts: list[str]) -> list[int]:
        """Content tokens of each text, without special tokens."""
        if sum(map(len, texts)) <= INLINE_COUNT_CHARS:
            return tokenization.count(self.tokenizer, texts)
        return await asyncio.to_thread(tokenization.count, self.tokenizer, texts)


def for_models(models: dict[str, ModelSettings]) -> dict[str, CountingTokenizer]:
    """One tokenizer per model alias, loaded once per distinct file.

    Reads files, so call it at start-up, not on the event loop while serving.
    """
    by_spec: dict[str, CountingTokenizer] = {}
    for model in models.values():
        if model.tokenizer not in by_spec:
            tokenizer = tokenization.load(model.tokenizer)
            digest = hashlib.sha256(tokenization.resolve(model.tokenizer).read_bytes())
            by_spec[model.tokenizer] = CountingTokenizer(model.tokenizer, digest.hexdigest()[:16], tokenizer)
    return {alias: by_spec[model.tokenizer] for alias, model in models.items()}
