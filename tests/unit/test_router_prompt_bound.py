"""The router's upper bound on a stateless prompt's tokens (prompt_bound.py):
it must never be below what the model's tokenizer counts in the rendered
prompt, or the router would skip the context service for a prompt that does
not fit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate import tokenization
from meshgate.common.v1 import common_pb2
from meshgate.config import ModelSettings, Settings
from services.router.admission import estimate_prompt_tokens
from services.router.prompt_bound import PromptBound, in_assembly_order, prompt_bounds

MODELS = Settings().models
# Text that stresses a byte-per-token argument: case that changes length
# when lowered, decomposing accents and Hangul, ligatures, CJK that BERT
# splits per character, emoji sequences, control and zero-width characters,
# special tokens written as text, digits and punctuation.
_TRICKY = (
    "İıßﬁﬃǅ한글日本語é\u0301\u0344\u0f73👩‍👩‍👧🇫🇷\x00\x07\u200b\u200d\ufeff<|im_start|>[CLS][SEP] 42,.!?\n\t"
)
_TEXT = st.text(alphabet=st.one_of(st.sampled_from(_TRICKY), st.characters(exclude_categories=["Cs"])))
_ROLES = (common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT)


def _tokens(model: ModelSettings, messages) -> int:
    template = tokenization.load_chat_template(model.chat_template)
    prompt = template.render_messages(messages, as_text=tokenization.as_text(model.tokenizer))
    return len(tokenization.load(model.tokenizer).encode(prompt, add_special_tokens=False).ids)


@pytest.mark.parametrize("alias", sorted(MODELS))
@settings(max_examples=300, deadline=None)
@given(text=_TEXT)
def test_no_bundled_tokenizer_makes_more_tokens_than_bytes(alias, text):
    tokenizer = tokenization.load(MODELS[alias].tokenizer)
    assert len(tokenizer.encode(text, add_special_tokens=False).ids) <= len(text.encode())


@pytest.mark.parametrize("alias", sorted(MODELS))
@settings(max_examples=150, deadline=None)
@given(turns=st.lists(st.tuples(st.sampled_from(_ROLES), _TEXT), min_size=1, max_size=6))
def test_a_prompt_that_fits_the_bound_has_at_most_that_many_tokens(alias, turns):
    messages = [common_pb2.Message(role=role, content=content) for role, content in turns]
    bound = prompt_bounds(MODELS)[alias]
    tokens = _tokens(MODELS[alias], messages)
    # fits() grows with the budget: refusing one token less than the true
    # count means it never accepts a budget the prompt exceeds.
    assert not bound.fits(messages, tokens - 1)
    content_bytes = sum(len(m.content.encode()) for m in messages)
    assert bound.fits(messages, bound.fixed_bytes + (len(messages) - 1) * bound.message_bytes + content_bytes)


@pytest.mark.parametrize("alias", sorted(MODELS))
@settings(max_examples=150, deadline=None)
@given(turns=st.lists(st.tuples(st.sampled_from(_ROLES), _TEXT), min_size=1, max_size=6))
def test_what_admission_reserves_for_a_prompt_is_never_below_what_inference_bills(alias, turns):
    """Admission reserves a prompt's content bytes and its template's
    (services/router/admission.py); inference bills the rendered prompt's
    tokens: the reservation must cover them, whatever the text and roles."""
    messages = [common_pb2.Message(role=role, content=content) for role, content in turns]
    bound = prompt_bounds(MODELS)[alias]
    reserved = estimate_prompt_tokens(messages) + bound.template_bytes(len(messages))
    assert _tokens(MODELS[alias], messages) <= reserved


def test_the_bound_is_the_rendered_bytes_for_a_single_message():
    bound = PromptBound.of(tokenization.load_chat_template(""))
    message = common_pb2.Message(role=common_pb2.ROLE_USER, content="héllo")
    rendered = tokenization.load_chat_template("").render_messages(
        [message], as_text=tokenization.as_text(ModelSettings().tokenizer)
    )
    assert len(rendered.encode()) <= bound.fixed_bytes + len("héllo".encode())
    assert bound.fits([message], bound.fixed_bytes + 6)  # "héllo" is 6 bytes
    assert not bound.fits([message], bound.fixed_bytes + 5)
    assert not bound.fits([], 1_000)


def test_a_model_whose_template_is_missing_has_no_bound():
    models = {"ok": ModelSettings(), "lost": ModelSettings(chat_template="/nonexistent/template.jinja")}
    assert set(prompt_bounds(models)) == {"ok"}


@pytest.mark.parametrize(
    ("roles", "kept"),
    [
        ((common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER), True),
        ((common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT, common_pb2.ROLE_USER), True),
        ((common_pb2.ROLE_USER, common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER), False),
    ],
)
def test_only_system_messages_first_keep_the_order_assembly_gives(roles, kept):
    assert in_assembly_order([common_pb2.Message(role=role, content="x") for role in roles]) is kept
