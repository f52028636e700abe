"""What the last question of a conversation is matched on: the question
together with what it refers to.

Hashing the earlier messages into the key (as the exact tier does) makes a
follow-up reusable only in the very same conversation. Most of a
conversation does not bear on its last question, though: greetings and
thanks, and history before the topic the question continues. What a
follow-up such as "cancel it" or "what landmark can you find there?" refers
to is, nearly always, the topic of the latest user turn that says something
(entities, numbers, content words): the *topic turn*. So a multi-turn prompt
is resolved to ``question`` + ``CONTEXT_SEPARATOR`` + ``topic turn``; that
text is what is embedded, stored and verified (``verifier.decide`` compares
the topic turns and the questions separately with its structural checks,
so a changed product, number or entity in the topic vetoes the hit), and
entries of multi-turn prompts share one candidate set per partition
(``keys.context_id``) instead of one per exact history.

Small talk before or between the turns, and unrelated earlier history, thus
drop out; a conversation of only small talk is no context at all, and its
question is matched as a single-turn one. The question comes first in the
text because the embedding model reads only its first 256 tokens: a long
topic turn is cut, never the question.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshgate.common.v1 import common_pb2
from services.cache.keys import normalize_text
from services.cache.verifier import CONTEXT_SEPARATOR, NUMBER_WORDS, STOPWORDS, analyze, readable, singular


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Words of turns that carry no topic: a user turn made only of these (and
# stopwords), with no number or name, is small talk.
SMALL_TALK = _words(
    """hi hello hey hiya thanks thank thx cheers great ok okay cool nice awesome sure yes yeah yep no nope
    good morning evening afternoon night bye goodbye welcome please appreciate appreciated perfect wonderful
    lovely fine well glad happy doing going how day today weather sunny rainy help helpful question
    quick another let ask know see understand got it alright right interesting amazing wow lol haha
    sorry excuse oh ah hmm great job again much lot hope i'm you're we're that's it's you've i've"""
)


# Small talk is short ("Hi there, thanks so much, that was really helpful!"):
# a longer turn says something, without analysing it. A long turn is thus
# read in no lookup (a 256 KiB one took 110-180 ms, three times a miss: the
# analysis memo keeps short texts only), and its resolved text is past the
# cache's bound for matching by meaning anyway (servicer.MAX_SEMANTIC_TEXT_BYTES).
SMALL_TALK_MAX_CHARS = 256


# The longest reply to a topic turn, and the longest topic turn, that are
# analysed (matched_exactly): an analysis grows with its text (a 256 KiB turn
# took 110-180 ms, above), and this one runs on every conversational lookup
# and store. A longer reply is bound by its whole text without analysis; a
# longer topic turn is not read for the words a reply shares with it.
REPLY_ANALYSIS_MAX_CHARS = 1024


# Words that acknowledge rather than answer: a reply's words among these
# (besides SMALL_TALK and stopwords) are never a referent ("Of course." and
# "Sure, I can help with that." bind the same nothing).
ACKNOWLEDGEMENTS = _words(
    """course certainly absolutely definitely noted understood gladly indeed done happy assist
    sounds good let me tell more anything else"""
)


# Answers in a word that SMALL_TALK would drop: "Is it open on Sunday?" /
# "No." is another conversation than with "Yes.".
POLARITY = _words("yes yeah yep no nope not never")

# What a reply's words are matched against, as analyze() gives them
# (singular: "sounds" is "sound", "cheers" is "cheer").
_REPLY_FILLER = frozenset(singular(w) for w in (SMALL_TALK | ACKNOWLEDGEMENTS) - POLARITY)


# A reply whose words new to the topic turn are at most this many is an
# acknowledgement or an answer in a word or a phrase ("Paris.", "Blue,
# definitely.", "The red one."): its new words are what a follow-up ("What
# is its population?") refers to, names or not, so they are bound, and the
# rest of its wording may differ. A reply with more to say of its own (a
# poem, a slogan, code, a summary) may itself be what the follow-up is about
# ("Make it shorter", "Translate that into French"): it is bound whole, so
# only a conversation with the same reply is served.
SHORT_REPLY_WORDS = 4


def is_small_talk(text: str) -> bool:
    # A turn the analysis cannot read (verifier.readable) says what it says:
    # "Я живу в Москве." read as no word, was small talk, and the question
    # after it was served the answer given after "... в Берлине." (a review).
    if len(text) > SMALL_TALK_MAX_CHARS or not readable(text):
        return False
    analysis = analyze(text)
    if analysis.numbers or analysis.names:
        return False
    return not (analysis.content - SMALL_TALK - STOPWORDS)


def _topic_at(earlier: Sequence[common_pb2.Message]) -> tuple[int, str] | None:
    """Where the latest earlier user turn that is not small talk is, and its
    normalized text; None when there is none."""
    for at in range(len(earlier) - 1, -1, -1):
        message = earlier[at]
        if message.role == common_pb2.ROLE_USER:
            text = normalize_text(message.content)
            if text and not is_small_talk(text):
                return at, text
    return None


def topic_turn(earlier: Sequence[common_pb2.Message]) -> str | None:
    """The latest earlier user turn that is not small talk, normalized; None
    when there is none."""
    found = _topic_at(earlier)
    return None if found is None else found[1]


def matched_exactly(messages: Sequence[common_pb2.Message]) -> list[common_pb2.Message]:
    """What of a prompt's earlier messages its question is only matched
    among the same of (keys.context_id), not by meaning: every system
    message, and what the assistant said that a follow-up may refer to.

    A system message says how to answer ("Answer only in French", a
    persona, a format): the same question under another one has another
    answer, whatever the words. The assistant's replies since the topic
    turn are often what a follow-up refers to, and the verifier reads only
    the user's turns. A short reply (SHORT_REPLY_WORDS) binds its numbers
    and names and the words the topic turn does not already say ("Pick a
    number." / "7" / "What is it doubled?"; "Name a city." / "Paris."); an
    acknowledgement ("Noted, you are on the premium plan." / "Of course.")
    binds nothing, so a reworded one still matches. A longer reply binds its
    whole text: two poems answered to "Write a poem about cats" make "Make
    it shorter" two questions (one was served the other's answer).

    Every reply since the topic turn binds, not only the first: the user's
    turns after it are small talk, whose replies ("Anything else?") bind
    nothing, but one may still correct or add to the answer ("Oops, I meant
    9."), and a bug hunt served "What is it doubled?" the answer given
    after another correction, at similarity 1.0. With no topic turn (a
    question after small talk only, or after a prompt's opening assistant
    message), every assistant message binds so: they are all the question
    can refer to ("When will it arrive?" after "Your order 4521 has
    shipped" was served the answer given after "Your order 7788 was
    cancelled", and so was the bare question). A greeting ("Hello! How can
    I help you today?") binds nothing, so conversations opening with one
    still share."""
    exact = [m for m in messages[:-1] if m.role not in (common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT)]
    found = _topic_at(messages[:-1])
    at, topic = (-1, "") if found is None else found
    exact += _bound_before_topic(messages[: max(at, 0)], topic)
    for reply in messages[at + 1 : -1]:
        if reply.role == common_pb2.ROLE_ASSISTANT:
            bound = _bound_by_reply(normalize_text(reply.content), topic)
            if bound is not None:
                exact.append(bound)
    return exact


def _asks(text: str) -> bool:
    return text.rstrip().endswith("?")


# Words that point back at what an earlier turn asked for: a topic turn
# with one ("Make it vegan.", "Keep that formal.") is a piece of that request.
REFERS_BACK = _words("it its that this these those them they one ones same there")

# A topic turn saying this many content words or fewer (besides small talk)
# is a fragment of an earlier request ("Vegan, please.", "Just me and my
# wife.", "For next Friday."), not one of its own.
FRAGMENT_WORDS = 2

# What a user's earlier turn says that binds no referent, as analyze() gives
# its words (singular).
_USER_FILLER = frozenset(singular(w) for w in SMALL_TALK)


def _continues(earlier: Sequence[common_pb2.Message], topic: str) -> bool:
    """Whether a topic turn that asks nothing is a piece of an earlier
    request rather than one of its own: it answers the assistant's question
    right before it ("Any restrictions?" / "Make it vegan."), points back at
    it, or is a fragment (REFERS_BACK, FRAGMENT_WORDS). "Describe the
    process of photosynthesis." is none of these: history before it on
    other things binds only its names and numbers."""
    before = next(
        (m for m in reversed(earlier) if m.role in (common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT)), None
    )
    if (
        before is not None
        and before.role == common_pb2.ROLE_ASSISTANT
        and _asks(normalize_text(before.content))
    ):
        return True
    if len(topic) > REPLY_ANALYSIS_MAX_CHARS or not readable(topic):
        # Not analysed: the stricter side.
        return True
    analysis = analyze(topic)
    return bool(analysis.token_set & REFERS_BACK) or len(analysis.content - _USER_FILLER) <= FRAGMENT_WORDS


def _bound_before_topic(earlier: Sequence[common_pb2.Message], topic: str) -> list[common_pb2.Message]:
    """What the user's turns before the topic turn bind. No verifier reads
    them, yet where the topic turn is no question of its own but a piece of
    one ("For next Friday.", "Write it in Python.", "I'm cooking for 4.")
    they say what the conversation is about: a review served "How much will
    it cost?" after "I want to book a flight to Paris." / "For next Friday."
    the answer given after "... to Tokyo." (likewise Rome and Oslo, order
    4521 and 7788, Python and Java). So back from a topic turn that asks
    nothing, each user turn binds its names and numbers (_bound_by_earlier_turn),
    up to and including the first that asks a question. A topic turn that
    asks one ("What is the capital of France?") stands alone: history before
    it on other things binds nothing. One that asks without a question mark
    ("Describe the process of ...") binds the history before it all the
    same: bench/README.md's conversations with unrelated history were served
    22 of 27 with this (27 before earlier turns bound, 13 when every earlier
    turn bound).

    Where the topic turn continues an earlier request (_continues), that
    request's words bind too, not only its names and numbers: "Suggest a
    recipe for dinner." / "Any restrictions?" / "Make it vegan." / "How long
    will it take?" was served the answer given after "Suggest a dessert
    recipe." (likewise a cover letter for a nursing or a teaching job, a
    trip to the beach or the mountains), the topic turns and questions the
    same. The request reworded with other words is then another
    conversation: a miss, never a wrong answer."""
    if not topic or _asks(topic):
        return []
    with_words = None  # worked out at the first turn that says something
    bound = []
    for message in reversed(earlier):
        if message.role != common_pb2.ROLE_USER:
            continue
        text = normalize_text(message.content)
        if not text or is_small_talk(text):
            continue
        if with_words is None:
            with_words = _continues(earlier, topic)
        referents = _bound_by_earlier_turn(text, with_words)
        if referents is not None:
            bound.append(referents)
        if _asks(text):
            break
    return bound[::-1]


def _bound_by_earlier_turn(text: str, with_words: bool = False) -> common_pb2.Message | None:
    """What a user's turn (normalized) before the topic turn binds: its names
    and numbers, and with ``with_words`` its other words but small talk
    (None: it has none); its whole text where it is too long to analyse or
    written in letters the analysis cannot read."""
    if len(text) > REPLY_ANALYSIS_MAX_CHARS or not readable(text):
        return common_pb2.Message(role=common_pb2.ROLE_USER, content=text)
    analysis = analyze(text)
    words = set(analysis.names)
    if with_words:
        # Names as the content words spell them (singular), as replies bind them.
        words = {singular(name) for name in analysis.names} | (analysis.content - _USER_FILLER)
    words -= analysis.numbers.keys() | NUMBER_WORDS.keys()
    referents = sorted(words) + sorted(analysis.numbers.elements())
    if not referents:
        return None
    return common_pb2.Message(role=common_pb2.ROLE_USER, content=" ".join(referents))


def _bound_by_reply(text: str, topic: str) -> common_pb2.Message | None:
    """What an assistant's reply (normalized) to ``topic`` (normalized; ""
    for none) binds: its whole text, its referents, or nothing (an
    acknowledgement)."""
    whole = common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=text)
    if len(text) > REPLY_ANALYSIS_MAX_CHARS or not text.isascii():
        # Bound whole: not analysed on every lookup and store, nor read by
        # an analysis that sees ASCII letters only ("東京" and "大阪" had no
        # words, "Zürich" was "z rich").
        return whole
    analysis = analyze(text)
    # A topic turn too long to analyse shares no word: the reply's are all new (the stricter side).
    said = analyze(topic).content if len(topic) <= REPLY_ANALYSIS_MAX_CHARS else frozenset()
    new_words = analysis.content - said - _REPLY_FILLER
    if len(new_words) > SHORT_REPLY_WORDS:
        return whole
    # Names as the content words spell them, so "Paris." (no name: it opens
    # the sentence) and "It's Paris." bind the same; numbers as the analysis
    # writes them ("7", "seven" -> "7").
    words = {singular(name) for name in analysis.names} | new_words
    words -= analysis.numbers.keys() | NUMBER_WORDS.keys()
    referents = sorted(words) + sorted(analysis.numbers.elements())
    if not referents:
        return None
    return common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=" ".join(referents))


def resolve(messages: Sequence[common_pb2.Message]) -> tuple[str, bool]:
    """The text a prompt's last question is embedded, stored and verified
    as, and whether it carries a topic turn (else it is the bare question).

    The question's own line breaks read as spaces: the verifier takes the
    first line break for CONTEXT_SEPARATOR, so a question of several lines
    was split into a question and a made-up topic turn, and refused its
    duplicates of one line (and they it) as of another context. The
    embedding and the verifier's analysis read a line break as a space
    anyway; the exact tier keeps them (keys.py)."""
    question = normalize_text(messages[-1].content).replace(CONTEXT_SEPARATOR, " ")
    topic = topic_turn(messages[:-1])
    if topic is None:
        return question, False
    return f"{question}{CONTEXT_SEPARATOR}{topic}", True
