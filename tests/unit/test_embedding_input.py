"""The embedding input cut: the model reads the same tokens from the cut text
as from the whole text, for any text (real tokenizer, hypothesis)."""

from __future__ import annotations

import time

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate import minilm, tokenization
from meshgate.config import InferenceSettings
from meshgate.embedding_input import EmbeddingTruncator

TOKENIZER = tokenization.load(InferenceSettings().embedding_tokenizer)
# What the embedding model reads: its own tokenizer, which reads a special
# token's text ("[SEP]") as text, here without its truncation.
MODEL_TOKENIZER = minilm.load_tokenizer()
MODEL_TOKENIZER.no_truncation()
# With an added token that is not special: tokenizers match such a token in
# the raw text, and the cut must neither split nor make one.
WITH_ADDED_TOKEN = tokenizers.Tokenizer.from_str(MODEL_TOKENIZER.to_str())
WITH_ADDED_TOKEN.encode_special_tokens = True
WITH_ADDED_TOKEN.add_tokens([tokenizers.AddedToken("[DOC]", normalized=False)])

# Pieces that stress the cut: words of any length (WordPiece gives up on
# words over 100 characters), CJK and Hangul (one character, several tokens),
# accents the normalizer strips, punctuation, and whitespace runs with no tokens.
PIECES = st.one_of(
    st.sampled_from(["the", "unbelievable", "İstanbul", "naïve", "한국어", "東京", "?!", "..."]),
    st.text(alphabet="abcdefghij", min_size=1, max_size=150),
    st.text(min_size=1, max_size=8),
    st.text(alphabet=" \t\n\u3000", min_size=1, max_size=400),
)
TEXTS = st.lists(PIECES, max_size=120).map(" ".join)

# Runs the cut shortens before it tokenizes: giant words of letters, digits,
# emoji and marks, one character repeated (of any kind: word, space, mark,
# control, punctuation, CJK), whitespace and dropped characters mixed; and
# short runs and mixed scripts between them. (Added tokens: below.)
EMOJI = "".join(map(chr, range(0x1F600, 0x1F650))) + "☀✂🦀"
MARKS = "".join(map(chr, range(0x0300, 0x0370))) + "\U0001d165\U0001d16d"
RUN_PIECES = st.one_of(
    PIECES,
    st.text(alphabet="0123456789abcdefXYZ" + EMOJI + MARKS, min_size=90, max_size=400),
    st.tuples(st.characters(codec="utf-8"), st.integers(1, 700)).map(lambda run: run[0] * run[1]),
    st.text(
        alphabet=" \t\n\r\x0b\x0c\x1c\x00\x85\xa0\u2003\u3000\u200b\u034f\u0301", min_size=1, max_size=400
    ),
    st.sampled_from(["é", "東京", "Ωμέγα", "\u0915\u0941", "a" * 101]),
)
RUN_TEXTS = st.lists(RUN_PIECES, max_size=40).map("".join)


def tokens_read(text: str, max_tokens: int, tokenizer: tokenizers.Tokenizer = MODEL_TOKENIZER) -> list[int]:
    """What the embedding model reads: its tokenizer truncates with special tokens counted."""
    return tokenizer.encode(text, add_special_tokens=False).ids[: max_tokens - 2]


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(TEXTS, min_size=1, max_size=4), max_tokens=st.integers(3, 40))
def test_the_model_reads_the_same_tokens_from_the_cut(texts, max_tokens):
    cut = EmbeddingTruncator(TOKENIZER, max_tokens).truncate(texts)
    for text, kept in zip(texts, cut):
        # A prefix, or where shortened first (whitespace runs here), shorter.
        assert len(kept) <= len(text)
        assert tokens_read(kept, max_tokens) == tokens_read(text, max_tokens)


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(RUN_TEXTS, min_size=1, max_size=4), max_tokens=st.sampled_from([3, 16, 40, 256]))
def test_texts_shortened_before_the_cut_read_as_the_same_tokens(texts, max_tokens):
    truncator = EmbeddingTruncator(TOKENIZER, max_tokens)
    for text, kept in zip(texts, truncator.truncate(texts)):
        assert len(kept) <= len(text)
        assert tokens_read(kept, max_tokens) == tokens_read(text, max_tokens)
    read = sum(min(len(MODEL_TOKENIZER.encode(text).ids), max_tokens) for text in texts)
    assert truncator.count_tokens(texts) == read


@pytest.mark.parametrize(
    "run",
    [
        "a" * 3000,
        "x" + "😀🦀" * 1500,
        " " * 3000,
        " \t\x0b\u3000" * 1000,
        "\u0301" * 3000,
        "\x00" * 3000,
        "[" * 3000,
    ],
)
def test_shortening_makes_and_unmakes_no_added_token(run):
    # [DOC] is matched in the raw text, before the normalizer; [MASK] and
    # [SEP] are special tokens, read as text.
    for tokenizer, reads, token in [
        (TOKENIZER, MODEL_TOKENIZER, "[MASK]"),
        (WITH_ADDED_TOKEN, WITH_ADDED_TOKEN, "[DOC]"),
    ]:
        for text in [token[:-1] + run + "]", "[" + run + token[1:], token + run + "[SEP]", run + token + run]:
            (kept,) = EmbeddingTruncator(tokenizer, 256).truncate([text])
            assert len(kept) < 700
            assert tokens_read(kept, 256, reads) == tokens_read(text, 256, reads)


@pytest.mark.parametrize(
    "text",
    [
        "a" * 1_000_000,
        "".join("0123456789abcdef"[i * 7 % 16] for i in range(1_000_000)),
        "start " + " \t\n\u3000" * 250_000 + " end",
        "😀" * 250_000,
        "".join(map(chr, range(0x1F600, 0x1F650))) * 3_000,
        "a" + "\u0301" * 1_000_000,
        "a" + "".join(map(chr, range(0x0300, 0x034F))) * 10_000,
        "!" * 1_000_000,
    ],
    ids=["giant-word", "hex-dump", "whitespace", "one-emoji", "emoji", "one-mark", "marks", "punctuation"],
)
def test_a_megabyte_of_few_tokens_is_sent_as_a_short_text(text):
    (kept,) = EmbeddingTruncator(TOKENIZER, 256).truncate([text])
    assert len(kept) <= 300
    assert tokens_read(kept, 256) == tokens_read(text, 256)


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(TEXTS, min_size=1, max_size=4), max_tokens=st.integers(3, 40))
def test_the_tokens_counted_are_those_the_model_reads(texts, max_tokens):
    # The model truncates to max_tokens with its [CLS] and [SEP] kept.
    read = sum(min(len(MODEL_TOKENIZER.encode(text).ids), max_tokens) for text in texts)
    assert EmbeddingTruncator(TOKENIZER, max_tokens).count_tokens(texts) == read


def test_long_text_is_cut_to_about_the_budget_and_short_text_is_untouched():
    truncator = EmbeddingTruncator(TOKENIZER, 256)
    huge = "How do transformers work? " * 200_000  # 5.2 MB, 1.2M tokens
    short = "How do transformers work?"
    kept, untouched = truncator.truncate([huge, short])
    assert untouched == short
    assert len(kept) < 2_000
    assert len(MODEL_TOKENIZER.encode(kept, add_special_tokens=False).ids) == 254


def test_whitespace_runs_are_shortened_and_stay_exact():
    text = " " * 100_000 + "tail words here " * 300
    (kept,) = EmbeddingTruncator(TOKENIZER, 16).truncate([text])
    assert tokens_read(kept, 16) == tokens_read(text, 16)
    assert len(kept) < 100


def test_an_added_token_across_the_first_prefix_end_is_read_as_the_model_reads_it():
    # The first prefix (8 characters per token of budget) ends inside [DOC].
    for text, max_tokens in [("   [DOC]", 3), ("a " * 253 + " " * 1523 + "[DOC]" + " b" * 10, 256)]:
        (kept,) = EmbeddingTruncator(WITH_ADDED_TOKEN, max_tokens).truncate([text])
        assert tokens_read(kept, max_tokens, WITH_ADDED_TOKEN) == tokens_read(
            text, max_tokens, WITH_ADDED_TOKEN
        )


def test_a_special_tokens_text_is_counted_and_cut_as_the_model_reads_it():
    # The model reads "[SEP]" as "[", "sep", "]" (meshgate.minilm), not as
    # its separator: three tokens billed, and three towards the cut.
    truncator = EmbeddingTruncator(TOKENIZER, 256)
    texts = ["[SEP]" * 10, "a [CLS] b [PAD] c [MASK] d [UNK]"]
    # a b c d; [cls] and [unk] four tokens each, [pad] and [mask] three; [CLS] and [SEP] around each text.
    assert truncator.count_tokens(texts) == (10 * 3 + 2) + (4 + 4 + 3 + 3 + 4 + 2)
    text = "[SEP] " * 200  # 600 tokens
    (kept,) = truncator.truncate([text])
    assert len(MODEL_TOKENIZER.encode(kept, add_special_tokens=False).ids) == 254
    assert tokens_read(kept, 256) == tokens_read(text, 256)


@pytest.mark.parametrize(
    "text",
    [
        # NFD puts U+1D16D (class 226) before U+0300 (230, stripped): the
        # tokenizer places U+1D16D's [UNK] on U+0300.
        "\u0300\U0001d16d#",
        # A zero-width space, removed before NFD, does not part them.
        "\u0300\u200b\U0001d165-",
        "a " * 253 + "\u0300\u200b\U0001d165-" + " b" * 300,
    ],
)
def test_a_cut_does_not_part_combining_marks_that_nfd_reorders(text):
    for max_tokens in (3, 256):
        (kept,) = EmbeddingTruncator(TOKENIZER, max_tokens).truncate([text])
        assert tokens_read(kept, max_tokens) == tokens_read(text, max_tokens)


def test_the_tokenizer_given_still_reads_special_tokens():
    # The cached tokenizer is tiny_gpt's too: its template's [CLS] must stay special.
    EmbeddingTruncator(TOKENIZER, 256)
    assert TOKENIZER.encode("[CLS]a", add_special_tokens=False).ids[0] == TOKENIZER.token_to_id("[CLS]")


def test_a_budget_without_room_for_text_is_refused():
    with pytest.raises(ValueError, match="no room"):
        EmbeddingTruncator(TOKENIZER, 2)


# --- texts short enough to need no tokenizing --------------------------------------------

BUDGET = 256 - 2  # all-MiniLM's 256 tokens, less [CLS] and [SEP]
# On both sides of the 254-byte bound: 10 to 160 pieces of 1 to 5 UTF-8
# bytes, among them a ligature and a dotted capital the normalizer expands.
PIECES_NEAR_THE_BOUND = ["a", "é", "東", "😀", " ", "?", "İ", "ﬃ", "\u0301", "word ", "한"]
NEAR_THE_BOUND = st.lists(st.sampled_from(PIECES_NEAR_THE_BOUND), min_size=10, max_size=160).map("".join)


def test_the_normalizer_leaves_no_more_characters_than_utf8_bytes_for_every_code_point():
    """The first half of the bound in embedding_input.py's docstring,
    checked exhaustively (1.1M code points, about a second)."""
    normalize = TOKENIZER.normalizer.normalize_str
    over = []
    for code_point in range(0x110000):
        if 0xD800 <= code_point < 0xE000:
            continue  # surrogates: no text holds them
        character = chr(code_point)
        normalized = normalize(character)
        if len(normalized) - normalized.count(" ") > len(character.encode()):
            over.append(hex(code_point))
    assert over == []


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(TEXTS, NEAR_THE_BOUND, st.text(max_size=400)))
def test_no_text_has_more_tokens_than_utf8_bytes(text):
    assert len(MODEL_TOKENIZER.encode(text, add_special_tokens=False).ids) <= len(text.encode())


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(st.one_of(NEAR_THE_BOUND, TEXTS, st.text(max_size=300)), min_size=1, max_size=4))
def test_the_fast_path_answers_as_tokenizing_does(texts):
    truncator = EmbeddingTruncator(TOKENIZER, 256)
    assert truncator.truncate(texts) == truncator.cut_by_tokens(texts)
    for text in texts:
        if not truncator.needs_tokenizing(text):
            assert len(text.encode()) <= BUDGET
            assert truncator.cut_by_tokens([text]) == [text]


def test_short_texts_are_told_apart_without_tokenizing_and_long_ones_are_not():
    truncator = EmbeddingTruncator(TOKENIZER, 256)
    assert not truncator.needs_tokenizing("How do transformers work?")
    assert not truncator.needs_tokenizing("x" * BUDGET)
    assert truncator.needs_tokenizing("x" * (BUDGET + 1))
    assert not truncator.needs_tokenizing("東" * (BUDGET // 3))  # 3 bytes each, within the budget
    assert truncator.needs_tokenizing("東" * (BUDGET // 3 + 1))


def test_a_tokenizer_not_built_as_the_bound_assumes_has_every_text_tokenized():
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    truncator = EmbeddingTruncator(word_level, 256)
    assert truncator.needs_tokenizing("a")
    assert truncator.truncate(["a a"]) == ["a a"]


def test_runs_just_short_of_the_cut_are_shortened_in_time_linear_in_the_text():
    # Runs of one character a little shorter than the run rule's ``keep``
    # (255 here): tried from every character of a run, each was scanned
    # again to its end, ~0.9 s for this megabyte, all of it holding the GIL
    # (the inference service's event loop, every other caller's stream,
    # stood still). Timed against the same length of runs of one character,
    # which no character of the text scans past: a ratio, not a clock.
    shortener = EmbeddingTruncator(TOKENIZER, 256)._shortener
    long_runs = ("a" * 254 + " ") * 4096
    short_runs = "ab" * (len(long_runs) // 2)

    def fastest_of_three(text: str) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            shortener.shorten(text)
            times.append(time.perf_counter() - started)
        return min(times)

    assert fastest_of_three(long_runs) < 4 * fastest_of_three(short_runs)
