"""Cuts embedding input to what the embedding model reads anyway.

all-MiniLM-L6-v2 reads at most 256 tokens, and the model truncates only after
tokenizing the whole text: a 3 MB text costs seconds of CPU and hundreds of MB
inside Triton for the same vector as its first kilobyte. So each text is cut
here, with the model's own tokenizer, at the end of the last token the model
would keep. Cutting by characters alone cannot be exact (a token is one
character of CJK or many of a long word, and whitespace runs have no tokens),
and a cut that changed vectors would change which cache entries match.

Only a prefix of each text is tokenized: the words of a prefix before its
last word tokenize exactly as in the whole text (BERT's normalizer and
pre-tokenizer work character by character and split on whitespace and
punctuation), so once those words hold the model's token budget the cut is
known. A text whose prefix is too short to tell is tried again with a prefix
four times longer; ordinary text is settled in one round.
"""

from __future__ import annotations

import tokenizers

# A first prefix of this many characters per token of budget settles
# ordinary text (about 4-5 characters per token) in one round.
_FIRST_PREFIX_CHARS_PER_TOKEN = 8


class EmbeddingTruncator:
    def __init__(self, tokenizer: tokenizers.Tokenizer, max_tokens: int) -> None:
        """``tokenizer`` must not truncate; ``max_tokens`` counts the special
        tokens the model adds, as the model's own truncation does."""
        self._tokenizer = tokenizer
        self._budget = max_tokens - tokenizer.num_special_tokens_to_add(False)
        if self._budget <= 0:
            raise ValueError(f"embedding_max_tokens {max_tokens} leaves no room for text")

    def truncate(self, texts: list[str]) -> list[str]:
        """Each text, cut after the last token the model would read.

        The model then sees the same first tokens (it may see a few more from
        the cut's last character, which its own truncation drops).
        """
        result = list(texts)
        pending = list(range(len(texts)))
        prefix_chars = self._budget * _FIRST_PREFIX_CHARS_PER_TOKEN
        while pending:
            prefixes = [texts[i][:prefix_chars] for i in pending]
            encodings = self._tokenizer.encode_batch(prefixes, add_special_tokens=False)
            undecided = []
            for index, prefix, encoding in zip(pending, prefixes, encodings):
                if len(prefix) == len(texts[index]):
                    # The whole text: cut only if it holds more than the model reads.
                    if len(encoding.ids) > self._budget:
                        result[index] = prefix[: encoding.offsets[self._budget - 1][1]]
                    continue
                cut = self._cut(encoding)
                if cut is None:
                    undecided.append(index)
                else:
                    result[index] = prefix[:cut]
            pending = undecided
            prefix_chars *= 4
        return result

    def _cut(self, encoding: tokenizers.Encoding) -> int | None:
        """Where the text ends for the model, or None if this prefix cannot tell."""
        # The prefix's last word may go on past it; only earlier words are final.
        word_ids = encoding.word_ids
        final = len(word_ids)
        while final and word_ids[final - 1] == word_ids[-1]:
            final -= 1
        if final >= self._budget:
            return encoding.offsets[self._budget - 1][1]
        return None
