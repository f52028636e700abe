"""meshgate/minilm.py's tokenizer, the one Triton's minilm and the cache's
in-process embedder both run: a caller's text is read as text."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from meshgate import minilm

TOKENIZER = minilm.load_tokenizer()
SPECIALS = [t.content for t in TOKENIZER.get_added_tokens_decoder().values() if t.special]
CLS, SEP = TOKENIZER.token_to_id("[CLS]"), TOKENIZER.token_to_id("[SEP]")


def test_a_special_tokens_text_is_read_as_its_characters():
    assert sorted(SPECIALS) == ["[CLS]", "[MASK]", "[PAD]", "[SEP]", "[UNK]"]
    special_ids = {TOKENIZER.token_to_id(s) for s in SPECIALS}
    for special in SPECIALS:
        name = special[1:-1]
        encoding = TOKENIZER.encode(f"A cat {special} a dog")
        # As the lowercase and spaced spellings read (the normalizer lowercases).
        assert encoding.ids == TOKENIZER.encode(f"a cat [{name.lower()}] a dog").ids
        assert encoding.ids == TOKENIZER.encode(f"A cat [ {name} ] a dog").ids
        # Only the [CLS] and [SEP] around the text are special; one segment, nothing masked.
        assert encoding.ids[0] == CLS and encoding.ids[-1] == SEP
        assert not special_ids & set(encoding.ids[1:-1])
        assert set(encoding.type_ids) == {0} and set(encoding.attention_mask) == {1}


def file_tokenizer() -> Tokenizer:
    """tokenizer.json as it is, special tokens matched in the text."""
    package, _, file_in_package = minilm.TOKENIZER.partition(":")
    spec = importlib.util.find_spec(package)
    tokenizer = Tokenizer.from_file(str(Path(next(iter(spec.submodule_search_locations))) / file_in_package))
    tokenizer.enable_truncation(minilm.MAX_TOKENS)
    tokenizer.no_padding()  # the file's fixed 128; the model's pads only a batch
    return tokenizer


FILE_TOKENIZER = file_tokenizer()


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300) | st.text(alphabet="[]ASEPCLMKUNsepclmkun ", max_size=40))
def test_a_text_without_a_special_tokens_text_reads_as_tokenizer_json_reads_it(text):
    """Vectors stored before the change stay valid for every such text."""
    if any(special in text for special in SPECIALS):
        return
    assert TOKENIZER.encode(text).ids == FILE_TOKENIZER.encode(text).ids
