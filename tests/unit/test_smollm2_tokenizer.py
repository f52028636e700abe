"""SmolLM2's tokenizer.json as build_tokenizer.py writes it from the GGUF."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate import tokenization
from meshgate.config import SMOLLM2_CHAT_TEMPLATE, SMOLLM2_TOKENIZER
from meshgate.local.stack import REPO_ROOT

# The GGUF's 17 control tokens, at the ids its vocabulary gives them.
CONTROL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<repo_name>",
    "<reponame>",
    "<file_sep>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
]


def build_smollm2_files() -> None:
    """Runs build_tokenizer.py's build(), which skips files that exist."""
    path = REPO_ROOT / "model_repository" / "smollm2" / "build_tokenizer.py"
    spec = importlib.util.spec_from_file_location("smollm2_build_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(pathlib.Path(SMOLLM2_TOKENIZER), pathlib.Path(SMOLLM2_CHAT_TEMPLATE))


@pytest.fixture(scope="module")
def tokenizer():
    build_smollm2_files()
    return tokenization.load(SMOLLM2_TOKENIZER)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize(
    "text",
    [
        "What is the capital of France?",
        "  two leading spaces, a tab\there,\r\n and trailing   ",
        "\n\n\n",
        "Pi is 3.14159 and 2024 is a year; 1,000,000!",
        "Café, naïve, Ångström, façade, Zürich",
        "北京是中国的首都。東京は日本の首都です。",
        "emoji 🎉👍🏽 and a family 👨‍👩‍👧 and a flag 🇫🇷",
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi 👋<|im_end|>\n"
        "<|im_start|>assistant\n",
    ],
    ids=["ascii", "whitespace", "newlines", "digits", "accents", "cjk", "emoji", "chat-prompt"],
)
def test_round_trip(tokenizer, text: str) -> None:
    encoded = ids(tokenizer, text)
    assert tokenizer.decode(encoded, skip_special_tokens=False) == text


# SmolLM2's vocabulary has no token for these six control characters, nor for
# the UTF-8 lead bytes F1 and F2 (code points U+40000 to U+BFFFF, Unicode's
# unassigned planes 4 to 11); byte-level BPE without byte fallback drops them,
# as the Hugging Face tokenizer of the model does.
UNREPRESENTABLE = "\x04\x06\x13\x14\x16\x1d"
LAST_REPRESENTED_PLANE_END = 0x3FFFF


def test_only_six_control_characters_have_no_token(tokenizer) -> None:
    ascii_lost = [c for c in map(chr, range(128)) if tokenizer.decode(ids(tokenizer, c)) != c]
    assert "".join(ascii_lost) == UNREPRESENTABLE
    assert tokenizer.decode(ids(tokenizer, "a\x16b")) == "ab"


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        st.characters(
            codec="utf-8", max_codepoint=LAST_REPRESENTED_PLANE_END, exclude_characters=UNREPRESENTABLE
        ),
        max_size=200,
    )
)
def test_any_text_round_trips(tokenizer, text: str) -> None:
    assert tokenizer.decode(ids(tokenizer, text), skip_special_tokens=False) == text


def test_control_tokens_are_single_special_ids(tokenizer) -> None:
    for index, token in enumerate(CONTROL_TOKENS):
        assert ids(tokenizer, token) == [index], token
    added = tokenizer.get_added_tokens_decoder()
    assert sorted(i for i, t in added.items() if t.special) == list(range(len(CONTROL_TOKENS)))
    # Inside text too, and never split into their characters.
    encoded = ids(tokenizer, "<|im_start|>user\nHi<|im_end|>\n")
    assert encoded[0] == 1 and encoded.count(2) == 1
    # Decoding for display drops them.
    assert tokenizer.decode(encoded) == "user\nHi\n"


def test_merges_apply_and_there_is_no_prefix_space(tokenizer) -> None:
    encoding = tokenizer.encode("What is the capital of France?", add_special_tokens=False)
    # Byte-level symbols ("Ġ" is a space): whole words, so the merges were read.
    assert encoding.tokens == ["What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]
    assert tokenizer.get_vocab_size() == 49152


def test_digits_are_split_one_by_one(tokenizer) -> None:
    encoding = tokenizer.encode("in 2024, 31415", add_special_tokens=False)
    assert encoding.tokens == ["in", "Ġ", "2", "0", "2", "4", ",", "Ġ", "3", "1", "4", "1", "5"]


def test_encoding_with_special_tokens_adds_nothing(tokenizer) -> None:
    # The GGUF has add_bos_token = false: the model's prompt is the template alone.
    text = "<|im_start|>user\nHi<|im_end|>\n"
    assert tokenizer.encode(text, add_special_tokens=True).ids == ids(tokenizer, text)


def test_chat_template_is_chatml_with_a_default_system_prompt(tokenizer) -> None:
    template = tokenization.load_chat_template(SMOLLM2_CHAT_TEMPLATE)
    assert template.render([("user", "Hi")]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert template.render([("system", "Be terse."), ("user", "Hi")], add_generation_prompt=False) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
