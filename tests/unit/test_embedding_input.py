"""The embedding input cut: the model reads the same tokens from the cut text
as from the whole text, for any text (real tokenizer, hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate import tokenization
from meshgate.config import InferenceSettings
from services.inference.embedding_input import EmbeddingTruncator

TOKENIZER = tokenization.load(InferenceSettings().embedding_tokenizer)

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


def tokens_read(text: str, max_tokens: int) -> list[int]:
    """What the embedding model reads: its tokenizer truncates with special tokens counted."""
    return TOKENIZER.encode(text, add_special_tokens=False).ids[: max_tokens - 2]


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(TEXTS, min_size=1, max_size=4), max_tokens=st.integers(3, 40))
def test_the_model_reads_the_same_tokens_from_the_cut(texts, max_tokens):
    cut = EmbeddingTruncator(TOKENIZER, max_tokens).truncate(texts)
    for text, kept in zip(texts, cut):
        assert text.startswith(kept)
        assert tokens_read(kept, max_tokens) == tokens_read(text, max_tokens)


def test_long_text_is_cut_to_about_the_budget_and_short_text_is_untouched():
    truncator = EmbeddingTruncator(TOKENIZER, 256)
    huge = "How do transformers work? " * 200_000  # 5.2 MB, 1.2M tokens
    short = "How do transformers work?"
    kept, untouched = truncator.truncate([huge, short])
    assert untouched == short
    assert len(kept) < 2_000
    assert len(TOKENIZER.encode(kept, add_special_tokens=False).ids) == 254


def test_whitespace_runs_take_more_rounds_but_stay_exact():
    text = " " * 100_000 + "tail words here " * 300
    (kept,) = EmbeddingTruncator(TOKENIZER, 16).truncate([text])
    assert tokens_read(kept, 16) == tokens_read(text, 16)
    assert len(kept) < len(text)


def test_a_budget_without_room_for_text_is_refused():
    with pytest.raises(ValueError, match="no room"):
        EmbeddingTruncator(TOKENIZER, 2)
