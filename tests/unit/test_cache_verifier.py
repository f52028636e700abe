"""The cache verifier's policy: each structural check on hand-written pairs,
and the whole decision on clear cases with the real minilm vectors (the ONNX
model the Triton ``minilm`` model runs, run here directly)."""

from __future__ import annotations

import pathlib
import sys

import pytest

from services.cache import verifier
from services.cache.verifier import Verifier, analyze

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))


def vetoed_by(a: str, b: str) -> str | None:
    return verifier.structural_veto(analyze(a), analyze(b))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What is 2+2?", "What is 2+3?"),
        ("Who won the World Cup in 2014?", "Who won the World Cup in 2018?"),
        ("How many calories are in two eggs?", "How many calories are in three eggs?"),
        ("What happened on 9 November?", "What happened on 9 December?"),
        ("What is the boiling point of water in Celsius?", "What is the boiling point of water in Kelvin?"),
        ("How long is 5 minutes?", "How long is 5 hours?"),
    ],
)
def test_number_date_and_unit_changes_are_vetoed(a, b):
    assert verifier.number_veto(analyze(a), analyze(b))


def test_numbers_spelled_or_repeated_differently_pass():
    assert not verifier.number_veto(analyze("I have 2 cats"), analyze("I have two cats"))
    assert not verifier.number_veto(
        analyze("What is the 14th amendment?"), analyze("Why the 14th amendment?")
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Cancel my subscription", "Don't cancel my subscription"),
        ("Why does my phone charge?", "Why doesn't my phone charge?"),
        ("Is it legal to record a call?", "Is it illegal to record a call?"),
        ("What are the advantages of remote work?", "What are the disadvantages of remote work?"),
        ("How can I increase my credit score?", "How can I decrease my credit score?"),
        ("Which foods contain gluten?", "Which foods contain no gluten?"),
    ],
)
def test_negation_and_polarity_flips_are_vetoed(a, b):
    assert verifier.negation_veto(analyze(a), analyze(b))


def test_double_negation_and_or_not_keep_polarity():
    assert not verifier.negation_veto(analyze("Why can't I sleep?"), analyze("Why am I not able to sleep?"))
    assert not verifier.negation_veto(analyze("Should I buy a car or not?"), analyze("Should I buy a car?"))


def test_a_replaced_name_is_vetoed_an_added_one_is_not():
    assert verifier.entity_veto(
        analyze("What is the capital of France?"), analyze("What is the capital of Germany?")
    )
    assert not verifier.entity_veto(analyze("Will Trump win?"), analyze("Will Donald Trump win?"))
    assert not verifier.entity_veto(
        analyze("What is Hillary Clinton's policy?"), analyze("What is Clinton policy?")
    )


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        ("How far is it from Paris to London?", "How far is it from London to Paris?", True),
        ("How do I convert Celsius to Fahrenheit?", "How do I convert Fahrenheit to Celsius?", True),
        ("Is Python faster than Java?", "Is Java faster than Python?", True),
        (
            "What is the difference between Java and Python?",
            "What is the difference between Python and Java?",
            False,
        ),
        ("How do I get to Paris?", "What is the best way to get to Paris?", False),
    ],
)
def test_reversed_roles_are_vetoed_symmetric_order_is_not(a, b, vetoed):
    assert verifier.role_veto(analyze(a), analyze(b)) is vetoed


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("List all the planets", "List only the rocky planets"),
        ("Who was the first president of the US?", "Who was the last president of the US?"),
        ("Which countries use the euro?", "Which countries except Germany use the euro?"),
    ],
)
def test_scope_changes_are_vetoed(a, b):
    assert verifier.scope_veto(analyze(a), analyze(b))


def test_paraphrases_pass_every_check():
    assert vetoed_by("How do I learn Python quickly?", "What is the fastest way to learn Python?") is None
    assert vetoed_by("What is the capital of France?", "Which city is the capital of France?") is None


def test_thresholds_follow_the_operator_bound_and_reports():
    model = Verifier.load(0.01)
    assert model.expected_false_hit_rate <= 0.01
    stricter = Verifier.load(0.005)
    assert stricter.threshold() >= model.threshold()
    assert model.threshold(1) == stricter.threshold()
    assert model.threshold(100) == float("inf")
    with pytest.raises(ValueError, match="below the strictest"):
        Verifier.load(1e-9)


@pytest.fixture(scope="module")
def embed():
    cache_data = pytest.importorskip("cache_data")
    embedder = cache_data.OfflineEmbedder()
    return lambda text: embedder.embed([text])[0]


@pytest.mark.parametrize(
    ("stored", "asked", "accepted", "rejected_by"),
    [
        ("What is the capital of France?", "what is the capital of france", True, None),
        ("Cancel my subscription", "Don't cancel my subscription", False, "negation"),
        ("What is 2+2?", "What is 2+3?", False, "number"),
        ("How far is it from Paris to London?", "How far is it from London to Paris?", False, "role"),
        ("How do I bake bread?", "How do I fix a flat tire?", False, "score"),
    ],
)
def test_decisions_on_clear_cases(embed, stored, asked, accepted, rejected_by):
    model = Verifier.load(0.01)
    decision = model.decide(asked, embed(asked), stored, embed(stored))
    assert decision.accepted is accepted
    assert decision.rejected_by == rejected_by


def test_an_entry_without_its_question_is_never_served(embed):
    vector = embed("What is the capital of France?")
    assert Verifier.load(0.01).decide("What is the capital of France?", vector, "", vector).rejected_by == (
        "unverifiable"
    )
