"""Cuts embedding input to what the embedding model reads anyway: in the
inference service before Triton, and in the cache's in-process embedder
(``meshgate.embedding.LocalEmbedder``) before its own run of the model.

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

Most texts (questions, turns) are far shorter than the budget, and one whose
UTF-8 length is within it is read whole without tokenizing it at all: the
tokenizer never makes more tokens than the text has UTF-8 bytes. Why, for
all-MiniLM's BERT tokenizer (tokenizer.json: BertNormalizer with lowercasing,
BertPreTokenizer, WordPiece):

- the normalizer works character by character (control characters dropped,
  whitespace made a space, spaces put around CJK ideographs; NFD, combining
  marks dropped, lowercasing; NFD's canonical reordering moves marks and
  adds none), and leaves at most as many characters other than spaces as
  the character had UTF-8 bytes: tests/unit/test_embedding_input.py checks
  every code point;
- the pre-tokenizer splits at spaces and around punctuation, and WordPiece
  makes of each word pieces of at least one character, or one [UNK]: at
  most one token per character left that is not a space.

So a text of at most ``budget`` bytes has at most ``budget`` tokens, and the
cut would leave it whole. The test also checks the bound itself on
arbitrary text, and that the fast path answers as tokenizing does. Another
tokenizer may break the bound (a SentencePiece word-start marker is a token
of no byte of the text): any tokenizer not built so has every text tokenized.

Some texts have few tokens in many characters: one word of a megabyte (a
word of over ``max_input_chars_per_word`` = 100 characters is one [UNK],
however long), a run of whitespace or of combining marks (none). No prefix
tells their cut, so the search would tokenize all of them, and the model
then again. A text the first prefix leaves undecided is first shortened
where shortening leaves its tokens as they were (:class:`_RunShortener`),
so such a text is sent as a few hundred characters that read as its first
tokens, not as a prefix of it.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata

import tokenizers

from meshgate.errors import invalid_argument
from meshgate.reasons import Reason

# A first prefix of this many characters per token of budget settles
# ordinary text (about 4-5 characters per token) in one round.
_FIRST_PREFIX_CHARS_PER_TOKEN = 8
# A character is at most 4 UTF-8 bytes: most texts are told apart without encoding.
_UTF8_MAX_BYTES_PER_CHAR = 4


class EmbeddingTruncator:
    def __init__(self, tokenizer: tokenizers.Tokenizer, max_tokens: int) -> None:
        """``tokenizer`` must not truncate; ``max_tokens`` counts the special
        tokens the model adds, as the model's own truncation does."""
        self._tokenizer = tokenizer = _reading_text(tokenizer)
        self._special_tokens = tokenizer.num_special_tokens_to_add(False)
        self._budget = max_tokens - self._special_tokens
        if self._budget <= 0:
            raise ValueError(f"embedding_max_tokens {max_tokens} leaves no room for text")
        self._bytes_bound_tokens = _at_most_one_token_per_byte(tokenizer)
        # An added token is matched in the raw text: one begun in a prefix's
        # last characters but ending past it is not in the prefix.
        added = _matched_added_tokens(tokenizer)
        self._added_token_reach = max((len(token) for token in added), default=1) - 1
        self._shortener = (
            _RunShortener.for_tokenizer(tokenizer, self._budget) if self._bytes_bound_tokens else None
        )

    def needs_tokenizing(self, text: str) -> bool:
        """Whether ``text`` might hold more tokens than the model reads; if
        not, it is read whole (at most one token per UTF-8 byte, above)."""
        if not self._bytes_bound_tokens:
            return True
        if _UTF8_MAX_BYTES_PER_CHAR * len(text) <= self._budget:
            return False
        if len(text) > self._budget:
            return True
        return len(text.encode()) > self._budget

    def truncate(self, texts: list[str]) -> list[str]:
        """Each text, cut after the last token the model would read; only
        the texts that might be longer than that are tokenized.

        The model then sees the same first tokens (it may see a few more from
        the cut's last character, which its own truncation drops). A text
        shortened first (module docstring) is not a prefix of the original.
        """
        long = [index for index, text in enumerate(texts) if self.needs_tokenizing(text)]
        result = list(texts)
        if long:
            for index, cut in zip(long, self.cut_by_tokens([texts[i] for i in long])):
                result[index] = cut
        return result

    def count_tokens(self, texts: list[str]) -> int:
        """The tokens the model reads of ``texts``, summed: each text's own
        up to the budget (a cut may keep a few more, which the model drops),
        and the special tokens it adds to each. Tokenizes every text: for a
        caller that bills them (EmbedRequest.count_tokens), not on the
        mesh's own embeddings."""
        encodings = self._tokenizer.encode_batch(self.truncate(texts), add_special_tokens=False)
        return sum(
            min(len(encoding.ids), self._budget) for encoding in encodings
        ) + self._special_tokens * len(texts)

    def cut_by_tokens(self, texts: list[str]) -> list[str]:
        """:meth:`truncate` by tokenizing every text, however short."""
        texts = list(texts)
        result = list(texts)
        pending = list(range(len(texts)))
        prefix_chars = first_prefix_chars = self._budget * _FIRST_PREFIX_CHARS_PER_TOKEN
        while pending:
            prefixes = [texts[i][:prefix_chars] for i in pending]
            encodings = self._tokenizer.encode_batch(prefixes, add_special_tokens=False)
            undecided = []
            for index, prefix, encoding in zip(pending, prefixes, encodings):
                if len(prefix) == len(texts[index]):
                    # The whole text: cut only if it holds more than the model reads.
                    if len(encoding.ids) > self._budget:
                        result[index] = prefix[
                            : self._past_combining_marks(prefix, encoding.offsets[self._budget - 1][1])
                        ]
                    continue
                cut = self._cut(prefix, encoding, len(prefix) - self._added_token_reach)
                if cut is None:
                    undecided.append(index)
                else:
                    result[index] = prefix[:cut]
            if self._shortener is not None and prefix_chars == first_prefix_chars:
                # Ordinary text is settled by now; what is left may be long runs of few tokens.
                for index in undecided:
                    texts[index] = result[index] = self._shortener.shorten(texts[index])
            pending = undecided
            prefix_chars *= 4
        return result

    def _past_combining_marks(self, text: str, cut: int) -> int:
        """``cut`` moved past the combining marks that follow it, and the
        characters the normalizer drops between them. NFD sorts a run of
        marks by combining class, and the tokenizer's offsets follow the
        sorted order: of U+0300 then U+1D16D (classes 230, 226) the kept
        mark U+1D16D is normalized first, so its [UNK] is placed on the
        stripped U+0300 and a cut there would drop it; a zero-width space
        between them is removed before NFD and parts nothing. Marks moved
        into the cut are stripped (no token) or join the cut's last word,
        whose tokens past the budget the model drops."""
        normalizer = self._tokenizer.normalizer
        end = scan = cut
        while scan < len(text):
            character = text[scan]
            if unicodedata.combining(unicodedata.normalize("NFD", character)[0]):
                end = scan + 1
            elif normalizer is None or normalizer.normalize_str(character):
                break
            scan += 1
        return end

    def _cut(self, prefix: str, encoding: tokenizers.Encoding, settled_chars: int) -> int | None:
        """Where the text ends for the model, or None if this prefix cannot tell."""
        # The prefix's last word may go on past it, and so may an added token
        # begun after settled_chars: only words ending before both are final.
        word_ids, offsets = encoding.word_ids, encoding.offsets
        final = len(word_ids)
        while final and (word_ids[final - 1] == word_ids[-1] or offsets[final - 1][1] > settled_chars):
            final -= 1
        while 0 < final < len(word_ids) and word_ids[final - 1] == word_ids[final]:
            final -= 1
        if final >= self._budget:
            return self._past_combining_marks(prefix, encoding.offsets[self._budget - 1][1])
        return None


# Candidates for the shortening's classes, each kept only where the tokenizer
# itself treats the character so (its Unicode tables may be older than Python's):
# Unicode's whitespace (and the separators Python calls space),
_SPACE_CANDIDATES = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + "\u2028\u2029\u202f\u205f\u3000"
)
# control characters, zero-width ones and the combining diacritical marks,
_DROPPED_CANDIDATES = "".join(
    map(chr, [*range(0x00, 0x20), *range(0x7F, 0xA0), *range(0x0300, 0x0370), *range(0x200B, 0x2010), 0xFEFF])
)
# and letters, digits and emoji (hex dumps, keys, emoji runs).
_WORD_CANDIDATES = "".join(
    map(
        chr,
        [
            *range(0x30, 0x3A),
            *range(0x41, 0x5B),
            *range(0x61, 0x7B),
            *range(0x2600, 0x27C0),
            *range(0x1F300, 0x1FA00),
        ],
    )
)
# Two marks the normalizer keeps that NFD's canonical ordering swaps (classes
# 226 then 216) unless a character of class 0 stands between them.
_SWAPPED_MARKS = "\U0001d16d", "\U0001d165"


class _RunShortener:
    """Shortens a text so that BERT's tokenizer makes the same tokens of it,
    the first ``budget`` at least, where the text's characters are few
    kinds repeated:

    - a run of more than ``keep`` = max(budget, max_input_chars_per_word) + 1
      copies of one character is cut to ``keep`` copies. A copy that the
      normalizer drops or makes a space is no token however many there are;
      one that is part of a word keeps the word over 100 characters, one
      [UNK]; one that starts a word or is one (punctuation, CJK) leaves
      ``keep`` - 1 > budget tokens before the run's end;
    - a word of letters, digits and emoji over 100 of them (marks between
      them) keeps its first 101: it is one [UNK] either way;
    - a whitespace run keeps one space (the pre-tokenizer splits on any
      number), and a run of dropped characters its first: the dropped ones
      here are each removed before NFD or a mark of class > 0, so they part
      no two marks that NFD's ordering would otherwise sort together.

    Every run keeps a character, and the tokenizer's added tokens (matched
    in the raw text) have no whitespace or dropped character, begin and end
    with no letter, digit or emoji here, are not one character repeated and
    are shorter than any run kept of those: no added token is made or unmade.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, budget: int, max_word_chars: int) -> None:
        normalize = tokenizer.normalizer.normalize_str
        spaces = "".join(c for c in _SPACE_CANDIDATES if normalize(c) == " ")
        marks_sorted = normalize("".join(_SWAPPED_MARKS))
        dropped = ""
        if marks_sorted != "".join(_SWAPPED_MARKS):
            dropped = "".join(
                c
                for c in _DROPPED_CANDIDATES
                if normalize(c) == "" and normalize(c.join(_SWAPPED_MARKS)) == marks_sorted
            )
        pre_tokenize = tokenizer.pre_tokenizer.pre_tokenize_str
        words = "".join(
            c
            for c in _WORD_CANDIDATES
            if (normalized := normalize(c)) and [word for word, _ in pre_tokenize(normalized)] == [normalized]
        )
        self.run_characters, self.word_characters = spaces + dropped, words
        space, drop, word = map(_any_of, (spaces, dropped, words))
        keep = max(budget, max_word_chars) + 1
        self._rules = [
            # Only from a run's first character (the lookbehind): tried at
            # every character, a run just short of keep was scanned again from
            # each of its characters, quadratic (a megabyte of 254-letter
            # words held the GIL ~0.9 s, stalling every other caller's stream).
            (re.compile(rf"((.)(?<!\2.)\2{{{keep - 1}}})\2+", re.DOTALL), r"\1"),
            (re.compile(rf"{space}(?:{_any_of(spaces + dropped)}*{space})?"), " "),
            (re.compile(rf"({drop}){drop}+"), r"\1"),
            (
                re.compile(
                    rf"(?<!{word})(?<!{drop})((?:{drop}?+{word}){{{max_word_chars + 1}}})"
                    rf"{_any_of(words + dropped)}*+"
                ),
                r"\1",
            ),
        ]

    @staticmethod
    @functools.cache
    def for_tokenizer(tokenizer: tokenizers.Tokenizer, budget: int) -> _RunShortener | None:
        """One per tokenizer (checking its characters takes milliseconds), or
        None if shortening could make or unmake one of its added tokens."""
        max_word_chars = json.loads(tokenizer.to_str())["model"]["max_input_chars_per_word"]
        shortener = _RunShortener(tokenizer, budget, max_word_chars)
        for content in _matched_added_tokens(tokenizer):
            if (
                any(c in shortener.run_characters for c in content)
                or content[0] in shortener.word_characters
                or content[-1] in shortener.word_characters
                or len(set(content)) == 1
                or len(content) > max_word_chars
            ):
                return None
        return shortener

    def shorten(self, text: str) -> str:
        for pattern, replacement in self._rules:
            text = pattern.sub(replacement, text)
        return text


def _any_of(characters: str) -> str:
    """A regular expression for one of ``characters``; none if there are none.
    In ranges: the regex engine reads a list of characters beyond the BMP
    (emoji) one by one."""
    if not characters:
        return "(?!)"
    ranges: list[list[int]] = []
    for code_point in sorted(map(ord, set(characters))):
        if ranges and ranges[-1][1] == code_point - 1:
            ranges[-1][1] = code_point
        else:
            ranges.append([code_point, code_point])
    return "[" + "".join(f"{re.escape(chr(first))}-{re.escape(chr(last))}" for first, last in ranges) + "]"


@functools.cache
def _reading_text(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """``tokenizer`` reading a special token's text ("[SEP]") as text, as the
    embedding model reads caller text (meshgate.minilm): the cut and the
    count follow the model's tokens. A copy: the one given may be a chat
    model's too (tiny_gpt's is all-MiniLM's), whose templates write special
    tokens that must stay special."""
    copy = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    copy.encode_special_tokens = True
    return copy


def _matched_added_tokens(tokenizer: tokenizers.Tokenizer) -> list[str]:
    """The added tokens ``tokenizer`` finds in raw text: not the special
    ones where it reads those as text."""
    return [
        token.content
        for token in tokenizer.get_added_tokens_decoder().values()
        if not (token.special and tokenizer.encode_special_tokens)
    ]


def _at_most_one_token_per_byte(tokenizer: tokenizers.Tokenizer) -> bool:
    """Whether ``tokenizer`` is built as the bound above assumes."""
    parts = json.loads(tokenizer.to_str())
    return (
        (parts.get("normalizer") or {}).get("type") == "BertNormalizer"
        and (parts.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer"
        and parts["model"].get("type") == "WordPiece"
    )


def check_text_count(count: int, max_texts: int) -> None:
    """The count part of :func:`check_texts`, for a caller that has a list
    it has not yet looked into (the HTTP edge, before it checks 2 million
    inputs' types on the event loop)."""
    if not count:
        raise invalid_argument(Reason.EMPTY_TEXTS, "texts must not be empty")
    if count > max_texts:
        raise invalid_argument(
            Reason.TOO_MANY_TEXTS, f"at most {max_texts} texts per call", limit=str(max_texts)
        )


def check_texts(texts, max_texts: int, max_text_bytes: int) -> None:
    """An Embed call's texts as callers must send them (inference.max_embed_texts,
    max_embed_text_bytes): checked by the inference service, and by the
    router before it admits an embedding request against the tenant's limits."""
    check_text_count(len(texts), max_texts)
    for index, text in enumerate(texts):
        if len(text) > max_text_bytes or len(text.encode()) > max_text_bytes:
            raise invalid_argument(
                Reason.TEXT_TOO_LARGE,
                f"texts[{index}] is larger than {max_text_bytes} bytes",
                limit=str(max_text_bytes),
            )
