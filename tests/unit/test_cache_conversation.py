"""What a multi-turn question is matched on: the topic turn it refers to, and
the verifier comparing topics and questions separately."""

from __future__ import annotations

import numpy as np
import pytest

from meshgate.common.v1 import common_pb2
from meshgate.config import CacheSettings
from services.cache import conversation
from services.cache.verifier import (
    CONTEXT_SEPARATOR,
    Verifier,
    analyze,
    structural_veto,
    topic_amount_veto,
    topic_condition_veto,
    topic_entity_veto,
    topic_unit_veto,
)

USER, ASSISTANT = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT


def turns(*contents: str) -> list[common_pb2.Message]:
    roles = (USER, ASSISTANT)
    return [common_pb2.Message(role=roles[i % 2], content=c) for i, c in enumerate(contents)]


@pytest.mark.parametrize(
    "text", ["Hi there!", "Thanks, that's helpful.", "Ok cool.", "Good morning, hope you're doing well."]
)
def test_greetings_and_thanks_are_small_talk(text):
    assert conversation.is_small_talk(text)


@pytest.mark.parametrize(
    "text", ["Order 4521 hasn't arrived.", "I bought a Samsung phone.", "I have a gym membership.", "%", "-"]
)
def test_turns_with_numbers_names_or_content_are_not_small_talk(text):
    assert not conversation.is_small_talk(text)


def test_a_long_turn_is_not_analysed_to_tell_it_is_not_small_talk(monkeypatch):
    analysed = []
    monkeypatch.setattr(conversation, "analyze", lambda text: analysed.append(text) or None)
    # Every word small talk, but a turn this long says something (and is never read word by word).
    assert not conversation.is_small_talk("thanks " * 5_000)
    assert analysed == []


def test_the_topic_is_the_latest_user_turn_that_says_something():
    messages = turns(
        "Tell me about the Great Wall of China.",
        "It is a series of fortifications.",
        "I'm subscribed to the premium   streaming plan.",
        "Noted.",
        "Thanks, that's helpful.",
        "You're welcome!",
        "How do I cancel it?",
    )
    text, in_context = conversation.resolve(messages)
    assert in_context
    assert text == f"How do I cancel it?{CONTEXT_SEPARATOR}I'm subscribed to the premium streaming plan."


def test_a_question_of_several_lines_is_one_question_to_the_verifier():
    """Its line breaks are not the separator of a topic turn: the same
    question on one line is served its answer, alone and in context."""
    verifier = Verifier.load(CacheSettings().max_false_hit_rate)
    vector = np.ones(verifier.dimensions, np.float32) / np.sqrt(verifier.dimensions)
    for earlier in ((), ("I'm subscribed to the premium streaming plan.", "Noted.")):
        stored, _ = conversation.resolve(turns(*earlier, "Translate into French:\nHow do I cancel it?"))
        asked, _ = conversation.resolve(turns(*earlier, "Translate into French: How do I cancel it?"))
        assert verifier.decide(asked, vector, stored, vector).accepted


def test_a_single_question_or_one_after_only_small_talk_is_matched_bare():
    assert conversation.resolve(turns("How do I cancel it?")) == ("How do I cancel it?", False)
    after_greetings = turns("Hi!", "Hello!", "How do I cancel it?")
    assert conversation.resolve(after_greetings) == ("How do I cancel it?", False)


def test_assistant_turns_are_never_the_topic():
    messages = [
        common_pb2.Message(role=ASSISTANT, content="Your order 4521 has shipped."),
        common_pb2.Message(role=USER, content="Where is it now?"),
    ]
    assert conversation.resolve(messages) == ("Where is it now?", False)


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    return Verifier.load(CacheSettings().max_false_hit_rate)


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    return vector / np.linalg.norm(vector)


@pytest.mark.parametrize(
    "stored_topic, asked_topic",
    [
        ("My order 4521 hasn't arrived yet.", "My order 4587 hasn't arrived yet."),
        ("I bought a Samsung Galaxy last month.", "I bought a Google Pixel last month."),
        ("Please cancel my streaming subscription.", "Please don't cancel my streaming subscription."),
        ("What is the capital of France?", "What is the capital of Italy?"),
        # Said in other words: the two names stand in no shared place.
        ("My laptop runs Ubuntu.", "I run Windows on my laptop."),
        ("Last month I purchased a Samsung Galaxy.", "I bought a Google Pixel last month."),
        # A flipped intent said in other words (an antonym inflected, an
        # opposite prefix), a number in words.
        ("I'm thinking of buying my neighbour's car.", "I'm thinking of selling my car to my neighbour."),
        ("I want to upgrade my phone plan.", "I'd like to downgrade my phone plan."),
        ("I'm cooking dinner for 4 people.", "I'm cooking dinner for a dozen guests."),
        # A unit one side adds to the same number (a review: served the
        # three-year-old's dose for three months, scored 0.95), or another.
        ("My son is 3.", "My son is three months old."),
        ("My daughter is 2.", "My daughter is 2 weeks old."),
        ("Our flight is at 9am.", "Our flight is at 9pm."),
        # An amount or a size said in words (a review's hunt: how much wine
        # to buy served across them at 0.93).
        ("I'm hosting a couple of guests.", "I'm hosting dozens of guests."),
        ("I'm cooking for a few friends.", "I'm cooking for a lot of friends."),
        ("I'm hosting a small party.", "I'm hosting a huge party."),
        ("I'm hosting a small party.", "I'm hosting a party."),
        # Another day, bound or season (a second hunt: 0.905-0.941).
        ("I'm flying to Denver tonight.", "I'm flying to Denver next week."),
        ("I'm over 65.", "I'm under 65."),
        ("I'm going hiking in the Alps this winter.", "I'm going hiking in the Alps this summer."),
        ("I usually run in the morning.", "I usually run in the evening."),
        ("I arrive in Tokyo on Monday.", "I leave Tokyo on Monday."),
    ],
)
def test_a_changed_referent_in_the_topic_is_vetoed_as_context(verifier, stored_topic, asked_topic):
    vector = unit(1)
    question = "Can you help me with it?"
    decision = verifier.decide(
        f"{question}{CONTEXT_SEPARATOR}{asked_topic}",
        vector,
        f"{question}{CONTEXT_SEPARATOR}{stored_topic}",
        vector,
    )
    assert not decision.accepted and decision.rejected_by == "context"


def test_a_question_in_context_never_matches_a_bare_one(verifier):
    vector = unit(2)
    in_context = f"How do I cancel it?{CONTEXT_SEPARATOR}I have a gym membership."
    for query, candidate in ((in_context, "How do I cancel it?"), ("How do I cancel it?", in_context)):
        decision = verifier.decide(query, vector, candidate, vector)
        assert not decision.accepted and decision.rejected_by == "context"


@pytest.mark.parametrize(
    "stored_topic, asked_topic",
    [
        ("My laptop runs Ubuntu.", "I run Ubuntu on my laptop."),
        # A name added is no other referent.
        ("I run Ubuntu on my laptop.", "I run Ubuntu on my Dell laptop."),
        # The same number with the same unit, said otherwise.
        ("My son is 3 years old.", "My son is three years old."),
        # The same amount in other words (a final read's finding).
        ("My Python script reads a big CSV file.", "My Python script reads a large CSV file."),
        ("I'm hosting a few friends.", "I'm hosting several friends."),
    ],
)
def test_a_topic_naming_the_same_things_in_other_words_is_left_to_the_score(
    verifier, stored_topic, asked_topic
):
    vector = unit(4)
    question = "How do I install Docker?"
    decision = verifier.decide(
        f"{question}{CONTEXT_SEPARATOR}{asked_topic}",
        vector,
        f"{question}{CONTEXT_SEPARATOR}{stored_topic}",
        vector,
    )
    assert decision.rejected_by != "context"


def test_the_same_topic_and_question_is_accepted(verifier):
    vector = unit(3)
    text = f"How do I cancel it?{CONTEXT_SEPARATOR}I'm subscribed to the premium streaming plan."
    assert verifier.decide(text, vector, text, vector).accepted


def test_system_messages_and_the_first_replys_numbers_and_names_are_matched_exactly():
    system = common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Answer in French.")
    chat = turns(
        "Hi!", "Hello!", "Pick a number.", "It is 7, in Lisbon.", "Thanks!", "Anything else?", "Double it?"
    )
    messages = [system, *chat]
    assert [m.content for m in conversation.matched_exactly(messages)] == ["Answer in French.", "lisbon 7"]
    # A reply with neither binds nothing: a reworded acknowledgement still matches.
    acknowledged = turns("I pay for the premium plan.", "Noted, you are on the premium plan.", "Cancel it?")
    assert conversation.matched_exactly(acknowledged) == []
    # A single question binds nothing.
    assert conversation.matched_exactly(turns("Why?")) == []


def test_with_no_topic_turn_every_assistant_message_binds_as_a_reply():
    """After small talk only, or an opening assistant message, what the
    assistant said is all the question can refer to (one was served the
    answer given after another order's news)."""

    def bound(*messages: common_pb2.Message) -> list[str]:
        return [m.content for m in conversation.matched_exactly([*messages, turns("Where is it now?")[0]])]

    def said(text: str) -> common_pb2.Message:
        return common_pb2.Message(role=ASSISTANT, content=text)

    hi = turns("Hi!")[0]
    assert bound(said("Your order 4521 has shipped.")) != bound(said("Your order 7788 has shipped."))
    assert bound(hi, said("Hello 7!")) == ["7"]
    news = bound(hi, said("Hello!"), hi, said("Order 4521 has shipped."))
    assert news == bound(said("Order 4521 shipped."))
    # A greeting binds nothing: conversations opening with one still share.
    assert bound(said("Hello! How can I help you today?")) == bound(hi, said("Hi there!")) == []


def test_every_reply_since_the_topic_turn_binds():
    """A later reply may correct the first ("Oops, I meant 9."): one was
    served the answer given after another correction, at similarity 1.0."""

    def bound(correction: str) -> list[str]:
        chat = turns("Pick a number for me.", "7", "Thanks!", correction, "What is it doubled?")
        return [m.content for m in conversation.matched_exactly(chat)]

    assert bound("Oops, I meant 9.") != bound("Oops, I meant 12.")
    assert bound("You're welcome!") == bound("Anything else?") == ["7"]


def test_a_short_replys_words_are_matched_exactly_names_or_not():
    """The answer in a word is what the follow-up refers to: "Paris." opens
    its sentence and "blue" is no name, yet another city or colour has
    another population or reason."""
    bound = [m.content for m in conversation.matched_exactly(turns("Name a city.", "Paris.", "Its size?"))]
    other = [m.content for m in conversation.matched_exactly(turns("Name a city.", "Lyon.", "Its size?"))]
    assert bound and other and bound != other
    colour = turns("Pick a colour for my room.", "Blue, definitely.", "Why that one?")
    assert [m.content for m in conversation.matched_exactly(colour)] == ["blue"]
    # What the topic turn already says is the verifier's to compare, and an
    # acknowledgement binds nothing, so reworded ones still match.
    for reply in ("Sure, I can help with that.", "Of course, happy to help.", "Noted: the premium plan."):
        assert conversation.matched_exactly(turns("I pay for the premium plan.", reply, "Cancel it?")) == []


def test_a_longer_reply_is_matched_exactly_whole():
    """A reply with more to say of its own may be what the follow-up is
    about: another poem made shorter is another answer (one was served the
    other's, at similarity 1.0)."""
    poems = (
        "Soft paws tread lightly over morning dew, whiskers twitch at sparrows flying past",
        "Curled by the fire the tabby sleeps, dreaming of mice in hidden keeps below",
    )
    bound = [
        conversation.matched_exactly(turns("Write a short poem about cats", poem, "Make it shorter"))
        for poem in poems
    ]
    assert [[m.content for m in b] for b in bound] == [[poem] for poem in poems]
    # A topic turn too long to analyse is not read for shared words: nothing is analysed at length.
    topic = "Summarize this report: " + "quarterly revenue figures " * 100
    assert [m.content for m in conversation.matched_exactly(turns(topic, "Revenue rose.", "Why?"))] == [
        "revenue rose"
    ]


def test_a_reply_too_long_to_analyse_is_bound_by_its_whole_text(monkeypatch):
    analysed, analyze = [], conversation.analyze
    monkeypatch.setattr(conversation, "analyze", lambda text: analysed.append(text) or analyze(text))
    reply = "word " * conversation.REPLY_ANALYSIS_MAX_CHARS
    bound = conversation.matched_exactly(turns("Tell me about Lisbon.", reply, "And its size?"))
    assert [m.content for m in bound] == [reply.strip()]
    assert analysed == ["Tell me about Lisbon."]  # the topic turn's small-talk check alone


def test_yes_no_and_letters_the_analysis_cannot_read_are_bound_too():
    """ "No." after "Is it open on Sunday?" is another conversation than
    "Yes."; "東京" and "大阪" had no words the analysis reads."""

    def bound(topic: str, reply: str) -> list[str]:
        return [m.content for m in conversation.matched_exactly(turns(topic, reply, "When should I go?"))]

    assert bound("Is the shop open on Sunday?", "No.") != bound("Is the shop open on Sunday?", "Yes.")
    assert bound("Name a city in Japan.", "東京") == ["東京"]
    assert bound("Name a city in Japan.", "東京") != bound("Name a city in Japan.", "大阪")


def test_a_short_reply_binds_the_same_whatever_its_wording():
    """Singular forms throughout: 'Paris.' (no name at a sentence's start)
    and "It's Paris." bind alike, 'Seven.' and '7' alike, and 'Sounds
    good!' or 'Cheers!' (plural forms of filler words) nothing."""

    def bound(topic: str, reply: str) -> list[str]:
        return [m.content for m in conversation.matched_exactly(turns(topic, reply, "And then?"))]

    assert bound("Name a city in France.", "Paris.") == bound("Name a city in France.", "It's Paris.")
    assert bound("Pick a number.", "Seven.") == bound("Pick a number.", "7") == ["7"]
    for filler in ("Sounds good!", "Cheers!"):
        assert bound("I pay for the premium plan.", filler) == []


def bound(*contents: str) -> list[str]:
    return [m.content for m in conversation.matched_exactly(turns(*contents))]


def test_the_users_turns_before_a_topic_turn_bind_what_they_say():
    """Reviews' findings: only the latest user turn that says something was
    read, and the turns before it may say what the answer depends on: "How
    much will it cost?" after "... a flight to Tokyo." / "For next
    Friday." was served the answer given after "... to Paris."; "Can I eat
    it?" after "I'm allergic to peanuts." / ... / "What's a popular Thai
    dish?" the answer given after "... to shellfish."; likewise "I don't
    have a car." and "I have a car.", "My son is a toddler." and "... a
    teenager.". Back from the topic turn, a statement binds its words (with
    "no" and a negation), names and numbers; a question or a request ends
    the walk, binding its names and numbers where the topic turn asks
    nothing; a topic turn that asks stands alone there. One in letters the
    analysis cannot read binds whole."""
    flight = ("Sure.", "Departing next Friday evening, economy class.", "Got it.", "How much will it cost?")
    assert bound("I want to book a flight to Paris.", *flight) == ["book flight pari want"]
    assert bound("I want to book a flight to Tokyo.", *flight) == ["book flight tokyo want"]
    assert bound("Where is order 4521?", "Checking.", "Delivery was promised Monday.", "Sure.", "Why?") == [
        "4521"
    ]
    moscow = ("Я живу в Москве.", "Хорошо.", "I want Netflix.", "Sure.", "How much?")
    assert bound(*moscow)[0] == "Я живу в Москве."
    allergy = ("Noted.", "What's a popular Thai dish?", "Pad Thai.", "Can I eat it?")
    assert bound("I'm allergic to peanuts.", *allergy)[0] == "allergic peanut"
    assert bound("I'm allergic to shellfish.", *allergy)[0] == "allergic shellfish"
    car = ("Okay.", "I'm flying out of Logan tomorrow at 6am.", "Got it.", "How should I get to the airport?")
    assert bound("I don't have a car.", *car) != bound("I have a car.", *car)
    assert bound("I have no kids.", *car) != bound("I have kids.", *car)
    # Up to the first turn that asks or requests: what came before it was another question.
    hamlet = ("Is Oslo cold?", "Yes.", "Who wrote Hamlet?", "Shakespeare.", "Specifically the 1600 edition.")
    # (The topic turn, a fragment, continues: the question's words and the reply bind too.)
    assert bound(*hamlet, "Sure.", "Why?") == ["hamlet wrote", "shakespeare"]
    assert (
        bound("Explain relativity.", "It says...", "Describe the Great Barrier Reef.", "It is...", "Why?")
        == []
    )
    # A question saying something of the user binds its words all the same (a second hunt's).
    peanuts = ("Avoid it.", "What's a popular Thai dish?", "Pad Thai.", "Can I eat it?")
    assert bound("Is peanut oil safe if I'm allergic to peanuts?", *peanuts) != bound(
        "Is peanut oil safe if I'm allergic to shellfish?", *peanuts
    )
    # So does the request the last question names, past a later topic (a second hunt's).
    for last in ("How much does the laptop cost?", "How long does the laptop's battery last?"):
        laptop = ("And a monitor?", "The Dell U2723QE.", last)
        assert bound("Recommend a laptop for coding.", "The MacBook Pro 14.", *laptop) != bound(
            "Recommend a laptop for gaming.", "The Razer Blade 16.", *laptop
        )
    # A topic turn that asks stands alone: questions and requests before it bind nothing.
    unrelated = ("Who wrote Romeo and Juliet?", "Shakespeare.", "What is France's capital?", "Paris.", "Why?")
    assert bound(*unrelated) == ["pari"]
    assert bound("Hi!", "Hello!", "I need a hotel.", "Sure.", "Any with a pool?") == []


def test_a_topic_turn_that_continues_an_earlier_request_binds_that_requests_words():
    """A hunt's finding: "Suggest a recipe for dinner." / "Any restrictions?"
    / "Make it vegan." / "How long will it take?" was served the answer
    given after "Suggest a dessert recipe.", the topic turns and questions
    the same and the earlier requests naming nothing (likewise a cover
    letter for a nursing or a teaching job, a trip to the beach or the
    mountains). A topic turn that answers the assistant's question, points
    back, or is a fragment binds the earlier request's words as well, and
    the assistant's replies between (a review's: "Recommend a city." /
    "Lisbon." / "I'll go there in May." was served after "Oslo.")."""
    vegan = ("Any restrictions?", "Make it vegan.", "Sure.", "How long will it take?")
    assert bound("Suggest a recipe for dinner.", *vegan) == ["dinner recipe suggest", "restriction"]
    assert bound("Suggest a dessert recipe.", *vegan) == ["dessert recipe suggest", "restriction"]
    # The same words asked otherwise still share.
    assert bound("Can you suggest a dinner recipe?", *vegan) == ["dinner recipe suggest", "restriction"]
    # Answering no question, pointing back ("Keep it formal.") or a fragment ("Vegan, please.").
    letter = ("Here is a draft.", "Keep it formal.", "Okay.", "How long should it be?")
    assert bound("Write a cover letter for a nursing job.", *letter) != bound(
        "Write a cover letter for a teaching job.", *letter
    )
    fragment = ("Here is one.", "Vegan, please.", "Okay.", "How long will it take?")
    assert bound("Suggest a recipe for dinner.", *fragment)[0] == "dinner recipe suggest"
    # A request of its own binds the names and numbers before it only.
    own = (
        "Here is one.",
        "Describe the process of making sourdough bread.",
        "Okay.",
        "How long will it take?",
    )
    assert bound("Suggest a recipe for dinner.", *own) == []
    assert bound("Suggest a recipe for dinner in Paris.", *own) == ["paris"]
    # The whole flight, the trip and the recipe, through resolve: one text, two conversations.
    trip = ("Who is going?", "Just me and my wife.", "Nice.", "What should we pack?")
    beach, mountains = (
        turns("Plan a trip to the beach.", *trip),
        turns("Plan a trip to the mountains.", *trip),
    )
    assert conversation.resolve(beach) == conversation.resolve(mountains)
    assert conversation.matched_exactly(beach) != conversation.matched_exactly(mountains)
    city = ("I'll go there in May.", "Great choice!", "What should I pack?")
    assert bound("Recommend a city in Europe.", "Lisbon.", *city) != bound(
        "Recommend a city in Europe.", "Oslo.", *city
    )
    # A greeting's reply binds nothing: conversations opening with one still share.
    assert bound("Hey, quick question.", "Sure, ask away!", "Plan a trip to the beach.", *trip) == bound(
        "Plan a trip to the beach.", *trip
    )


def test_answers_bind_their_words_small_talk_or_not():
    """A review's hunt: a user's answer in small talk's words was dropped
    ("Do you already have car insurance?" / "No." served the answer given
    after "Yes."; "Rainy." / "Sunny."), and a short reply to a question lost
    the words the question said ("Paris or Rome?" / "Rome." bound nothing)
    or small talk says ("Rainy." / "Sunny." as the assistant's answer)."""
    insurance = ("I'm buying a used car.", "Do you already have car insurance?")
    assert bound(*insurance, "No.", "Okay.", "What now?") != bound(*insurance, "Yes.", "Okay.", "What now?")
    # Courtesy is not the answer.
    assert bound(*insurance, "No, thanks.", "Okay.", "What now?") == bound(
        *insurance, "No.", "Okay.", "What now?"
    )
    pick = "Should I visit Paris or Rome in spring?"
    assert bound(pick, "Rome.", "What should I see there?") == ["rome"]
    assert bound(pick, "Paris.", "What should I see there?") == ["pari"]
    assert bound("Should I get a cat or a dog? I work long hours.", "A cat.", "What do I need?") == ["cat"]
    weather = "What's the forecast for Seattle tomorrow?"
    assert bound(weather, "Rainy.", "What should I wear?") != bound(weather, "Sunny.", "What should I wear?")
    # A reply repeating the question's other words binds its answer alone (a final read's finding).
    bigger = "Which is bigger, Texas or Alaska?"
    assert bound(bigger, "Alaska is bigger.", "By how much?") == bound(bigger, "Alaska.", "By how much?")
    assert bound(bigger, "Texas.", "By how much?") != bound(bigger, "Alaska.", "By how much?")
    # A request that states something of the user binds it (a final read's finding).
    thai = ("Noted.", "What's a popular Thai dish?", "Pad Thai.", "Can I eat it?")
    assert bound("Make a note that I'm allergic to peanuts.", *thai) != bound(
        "Make a note that I'm allergic to shellfish.", *thai
    )
    # A second hunt's: a list of more than two (each reply bound nothing, or only "milk").
    rice = "Which is healthiest: white rice, brown rice, quinoa or couscous?"
    assert bound(rice, "Brown rice.", "How long do I cook it?") != bound(
        rice, "White rice.", "How long do I cook it?"
    )
    milk = "Should I use whole milk, skim milk or oat milk for a latte?"
    assert bound(milk, "Whole milk.", "How much?") != bound(milk, "Skim milk.", "How much?")
    # A possessive pick (a final read: "Wendy's." bound nothing once the list rule split words otherwise).
    food = "Do you prefer McDonald's or Wendy's?"
    assert bound(food, "Wendy's.", "Why?") != bound(food, "McDonald's.", "Why?")
    pets = "Which pet is best for a small apartment: a cat, a dog, a hamster or a rabbit?"
    assert bound(pets, "A cat.", "What do I need?") != bound(pets, "A dog.", "What do I need?")
    # Small talk that answers nothing still binds nothing.
    thanks = ("Thanks, that's helpful.", "Glad to help.")
    assert bound("What is photosynthesis?", "It is ...", *thanks, "Where?") == []


def test_a_turn_in_letters_the_analysis_cannot_read_is_never_small_talk():
    """ "Я живу в Москве." read as no word, was small talk, and the question
    after it was matched bare (a review: served across Moscow and Berlin)."""
    assert not conversation.is_small_talk("Я живу в Москве.")
    assert not conversation.is_small_talk("我住在北京。")
    assert conversation.resolve(turns("Я живу в Москве.", "Понятно.", "How much is Netflix?")) == (
        "How much is Netflix?\nЯ живу в Москве.",
        True,
    )


def test_each_turn_is_normalized_once_however_many_replies_read_it(monkeypatch):
    """A review's finding: each reply before the topic turn normalized the
    user's turn before it again: a 256 KiB turn and 253 replies held the
    cache's event loop 10-13 s a Lookup (9.6 s for matched_exactly alone)."""
    normalized = []
    normalize = conversation.normalize_text
    monkeypatch.setattr(
        conversation, "normalize_text", lambda text: normalized.append(text) or normalize(text)
    )
    messages = turns("x\n" * 1000, *["Ok."] * 253, "I want to visit Paris.", "What about it?")
    conversation.matched_exactly(messages)
    assert len(normalized) <= len(messages)


def _told_apart(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether two conversations can never share an entry: what is matched
    exactly differs, or their topic parts are vetoed by a structural check."""
    first, second = turns(*a), turns(*b)
    if conversation.matched_exactly(first) != conversation.matched_exactly(second):
        return True
    _, _, topic_a = conversation.resolve(first)[0].partition(CONTEXT_SEPARATOR)
    _, _, topic_b = conversation.resolve(second)[0].partition(CONTEXT_SEPARATOR)
    if not (topic_a and topic_b):
        return False
    a_topic, b_topic = analyze(topic_a), analyze(topic_b)
    # As Verifier.decide reads two topic turns.
    return structural_veto(a_topic, b_topic) is not None or any(
        veto(a_topic, b_topic)
        for veto in (topic_entity_veto, topic_unit_veto, topic_amount_veto, topic_condition_veto)
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # A hunt's wrong hits (scores 0.91-0.999): a turn that says a symbol
        # was small talk, or bound without it.
        (
            ("I have a 🐶.", "Nice!", "How often should I take it to the vet?"),
            ("I have a 🐱.", "Nice!", "How often should I take it to the vet?"),
        ),
        (
            ("My 🐶 weighs 5 kg.", "Got it.", "Which brand of food is best?", "Acana.", "How much per day?"),
            ("My 🐱 weighs 5 kg.", "Got it.", "Which brand of food is best?", "Acana.", "How much per day?"),
        ),
        (
            ("My dog ate some fruit.", "Which fruit?", "🍇", "Okay.", "Is it dangerous?"),
            ("My dog ate some fruit.", "Which fruit?", "🍌", "Okay.", "Is it dangerous?"),
        ),
        # Times of day were filler in statements and in replies with a time.
        (
            (
                "I took 400 mg of ibuprofen at 8 in the morning.",
                "Okay.",
                "Is it safe with coffee?",
                "Yes.",
                "Next dose?",
            ),
            (
                "I took 400 mg of ibuprofen at 8 in the evening.",
                "Okay.",
                "Is it safe with coffee?",
                "Yes.",
                "Next dose?",
            ),
        ),
        (
            (
                "Set an alarm for 7.",
                "Alarm set for 7 in the morning.",
                "If I sleep at 11 pm, how long will I sleep?",
            ),
            (
                "Set an alarm for 7.",
                "Alarm set for 7 in the evening.",
                "If I sleep at 11 pm, how long will I sleep?",
            ),
        ),
        (
            ("I work night shifts.", "Okay.", "Is melatonin safe?", "Yes.", "When should I take it?"),
            ("I work day shifts.", "Okay.", "Is melatonin safe?", "Yes.", "When should I take it?"),
        ),
        # A weekday on one side, a frame on the other (the Louvre is closed on Tuesdays).
        (
            ("I'm visiting the Louvre on Tuesday.", "Fun!", "Is it open then?"),
            ("I'm visiting the Louvre this weekend.", "Fun!", "Is it open then?"),
        ),
    ],
)
def test_conversations_that_differ_in_a_symbol_or_a_time_are_told_apart(a, b):
    assert _told_apart(a, b)


def test_a_greeting_and_the_same_time_said_otherwise_still_share():
    # A greeting's time of day binds nothing; "this coming Friday" is this Friday.
    assert not _told_apart(("Hi! How can I help you today?",), ("Hi! How can I help you this morning?",))
    assert not _told_apart(
        ("Book me a table at Nobu for this Friday.", "Done.", "Is it open then?"),
        ("Book me a table at Nobu for this coming Friday.", "Done.", "Is it open then?"),
    )


_CHAT = ("How do I export my data?", "Go to Settings > Export.")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # A review of the commit above: a face or a hand made an acknowledgement
        # the topic turn, or bound a statement, and true reuse missed.
        ((*_CHAT, "thanks 😊", "You're welcome!", "And how do I delete my account?"),
         (*_CHAT, "thanks", "You're welcome!", "And how do I delete my account?")),
        ((*_CHAT, "ok 👍", "Anything else?", "Is there a size limit?"),
         (*_CHAT, "ok", "Anything else?", "Is there a size limit?")),
        (("Hi 👋", "Hello! How can I help?", "How do I reset my password?"),
         ("Hi", "Hello! How can I help?", "How do I reset my password?")),
        (("I'm on the Pro plan 🙂", "Great, how can I help?", *_CHAT, "Is there a size limit?"),
         ("I'm on the Pro plan.", "Great, how can I help?", *_CHAT, "Is there a size limit?")),
        # A greeting's time of day binds nothing, in a statement either.
        (("Good morning, I'm on the Pro plan.", "Great, how can I help?", *_CHAT, "Is there a size limit?"),
         ("Hello, I'm on the Pro plan.", "Great, how can I help?", *_CHAT, "Is there a size limit?")),
        (("Good evening, my email is sam@example.com.", "Thanks.", *_CHAT, "Is there a size limit?"),
         ("Good morning, my email is sam@example.com.", "Thanks.", *_CHAT, "Is there a size limit?")),
    ],
)  # fmt: skip
def test_a_face_a_hand_or_a_greetings_time_of_day_changes_no_conversation(a, b):
    assert not _told_apart(a, b)
    assert conversation.resolve(turns(*a))[0] == conversation.resolve(turns(*b))[0]


def test_a_topic_turn_saying_another_time_of_day_is_another_conversation():
    # A third hunt's (served at 0.918): the learned stage read the two as one.
    assert _told_apart(
        ("I work nights.", "Okay.", "When should I take melatonin?"),
        ("I work days.", "Okay.", "When should I take melatonin?"),
    )
    # A greeting's time of day says no time.
    assert not _told_apart(
        ("Good morning, I'd like to book a flight to Paris.", "Sure.", "Do I need a visa?"),
        ("Hi, I'd like to book a flight to Paris.", "Sure.", "Do I need a visa?"),
    )
