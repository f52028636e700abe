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

Small talk before or between the turns, and earlier questions and requests
on other things, thus drop out; a conversation of only small talk is no
context at all, and its question is matched as a single-turn one. What else
the answer may depend on is matched exactly, not by meaning
(matched_exactly): the user's statements before the topic turn ("I'm
allergic to peanuts."), answers to the assistant's questions, what the
assistant's replies name. The question comes first in the
text because the embedding model reads only its first 256 tokens: a long
topic turn is cut, never the question.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence

from meshgate.common.v1 import common_pb2
from services.cache.keys import normalize_text
from services.cache.verifier import (
    CONTEXT_SEPARATOR,
    NUMBER_WORDS,
    SIGNS,
    STOPWORDS,
    TIMES_OF_DAY,
    analyze,
    emotive,
    greeting_times,
    readable,
    singular,
)


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
# (singular: "sounds" is "sound", "cheers" is "cheer"). Times of day
# (TIMES_OF_DAY) small talk says ("Good morning!", "Have a nice day"), but a
# user's statement, or a reply with a time in it, says them as a fact ("I
# took it at 8 in the morning." / "... in the evening.", "I work night
# shifts." / "day shifts.", "Alarm set for 7 in the morning." / "...
# evening.": each served the other's answer while read as filler, a hunt):
# with a number in the reply they are no filler (_bound_by_reply), and a
# greeting's never binds (greeting_times).
_REPLY_FILLER = frozenset(singular(w) for w in (SMALL_TALK | ACKNOWLEDGEMENTS) - POLARITY)
_TIMED_REPLY_FILLER = _REPLY_FILLER - TIMES_OF_DAY

# Words of courtesy alone. A reply to a question, or a user's answer to the
# assistant's, is the answer: its words bind but for these. SMALL_TALK holds
# answers too ("Rainy." / "Sunny.", "Morning." / "Evening.", "Yes, please." /
# "No, thanks."), each served the other's answer when read as small talk
# (a review's hunt).
COURTESY = _words(
    """hi hello hey hiya thanks thank thx cheers please appreciate appreciated welcome sorry excuse
    oh ah hmm wow lol haha great sure course certainly happy glad"""
)
_COURTESY = frozenset(singular(w) for w in COURTESY)


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
    # A symbol may be what the turn says ("I have a 🐶." was small talk, and
    # the question after it served the answer given after "... a 🐱.": a hunt);
    # a face or a hand is small talk's own ("thanks 😊", "ok 👍", "Hi 👋").
    # A dash or a unit sign is said too, though no content word (verifier.SIGNS).
    if analysis.numbers or analysis.names or _things(analysis.glyphs) or analysis.token_set & SIGNS:
        return False
    return not (analysis.content - SMALL_TALK - STOPWORDS)


_TURN_ROLES = (common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT)


class _Texts:
    """A prompt's messages' normalized texts, each worked out once, by index
    (a slice from the start keeps its messages' indexes). The rules read a
    turn's text from several places; normalized again each time, a 256 KiB
    user turn read by each of 253 replies after it held the cache's event
    loop for 10-13 s, every other tenant's lookups waiting (a review)."""

    def __init__(self, messages: Sequence[common_pb2.Message]) -> None:
        self._messages = messages
        self._texts: dict[int, str] = {}
        self._user_before: list[int] | None = None

    def user_before(self, at: int) -> int:
        """The index of the user's turn before ``at`` (-1 for none): found in
        one pass for all, not walked back again from each reply."""
        if self._user_before is None:
            self._user_before, last = [], -1
            for index, message in enumerate(self._messages):
                self._user_before.append(last)
                if message.role == common_pb2.ROLE_USER:
                    last = index
        return self._user_before[at]

    def __getitem__(self, at: int) -> str:
        text = self._texts.get(at)
        if text is None:
            text = self._texts[at] = normalize_text(self._messages[at].content)
        return text


def _topic_at(earlier: Sequence[common_pb2.Message], texts: _Texts) -> tuple[int, str] | None:
    """Where the latest earlier user turn that is not small talk is, and its
    normalized text; None when there is none."""
    for at in range(len(earlier) - 1, -1, -1):
        if earlier[at].role == common_pb2.ROLE_USER:
            text = texts[at]
            if text and not is_small_talk(text):
                return at, text
    return None


def topic_turn(earlier: Sequence[common_pb2.Message]) -> str | None:
    """The latest earlier user turn that is not small talk, normalized; None
    when there is none."""
    found = _topic_at(earlier, _Texts(earlier))
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
    texts = _Texts(messages)
    found = _topic_at(messages[:-1], texts)
    at, topic = (-1, "") if found is None else found
    exact += _bound_before_topic(messages[: max(at, 0)], topic, texts[len(messages) - 1], texts)
    for index in range(at + 1, len(messages) - 1):
        message = messages[index]
        if message.role == common_pb2.ROLE_ASSISTANT:
            # Read against the user's turn it answers: the topic turn, or
            # small talk after it ("Ok cool." / "Anything else?").
            bound = _bound_by_reply(texts[index], _user_turn_before(messages, index, texts))
        elif message.role == common_pb2.ROLE_USER and _answers_the_assistant(messages, index, texts):
            # Small talk (else it were the topic turn) that answers the
            # assistant's question: "Do you already have car insurance?" /
            # "No." was served the answer given after "Yes." (a review).
            bound = _bound_by_answer(texts[index])
        else:
            continue
        if bound is not None:
            exact.append(bound)
    return exact


def _turn_before(messages: Sequence[common_pb2.Message], at: int) -> int:
    """The index of the user's or assistant's turn before ``at`` (-1 for none)."""
    before = at - 1
    while before >= 0 and messages[before].role not in _TURN_ROLES:
        before -= 1
    return before


def _answers_the_assistant(messages: Sequence[common_pb2.Message], at: int, texts: _Texts) -> bool:
    """Whether the user's turn at ``at`` follows an assistant's question."""
    before = _turn_before(messages, at)
    return before >= 0 and _assistant_asks(messages[before], texts[before])


def _assistant_asks(message: common_pb2.Message, text: str) -> bool:
    """Whether ``message`` (normalized: ``text``) is the assistant's asking
    something: not a greeting's "How can I help you today?", which asks for
    the request."""
    return message.role == common_pb2.ROLE_ASSISTANT and _asks(text) and not is_small_talk(text)


def _bound_by_answer(text: str) -> common_pb2.Message | None:
    """What a user's answer in small talk's words binds: its words but
    courtesy ("Yes, please." and "Yes." bind "yes"; "Rainy." "rainy")."""
    if len(text) > REPLY_ANALYSIS_MAX_CHARS or not readable(text):
        return common_pb2.Message(role=common_pb2.ROLE_USER, content=text)
    analysis = analyze(text)
    words = (analysis.content | (analysis.token_set & POLARITY)) - _COURTESY
    things = _things(analysis.glyphs)
    if not (words or things):
        return None
    return common_pb2.Message(role=common_pb2.ROLE_USER, content=" ".join([*sorted(words), *things]))


def _things(glyphs: tuple[str, ...]) -> list[str]:
    """The symbols that name something ("🐶", "🍇"), not a feeling (verifier.emotive)."""
    return [glyph for glyph in glyphs if not emotive(glyph)]


# Verbs a request opens with ("Explain the theory of relativity.", "Please
# write a poem."): such a turn asks for something as a question does, and
# history before it was about another thing (_bound_before_topic).
REQUEST_VERBS = _words(
    """explain describe tell write list give show suggest recommend compare summarize summarise
    translate define name calculate plan create draft make find help teach outline generate
    convert pick choose book provide share design build analyze analyse evaluate
    review rewrite fix check"""
)
_LEADING_COURTESY = frozenset({"please", "kindly", "now", "so", "ok", "okay", "hey", "hi", "hello"})


# Words of a turn about the user's own situation: a request holding one
# states something too ("Make a note that I'm allergic to peanuts.",
# "Recommend a laptop for my daughter.").
FIRST_PERSON = _words("i i'm i've i'd i'll my me mine we we're we've our us")


def _requests(text: str) -> bool:
    """Whether a user's turn asks for something: a question, or a request
    opening with one of REQUEST_VERBS that says nothing of the user
    (FIRST_PERSON): "Make a note that I'm allergic to peanuts." read as a
    request bound nothing, and "Can I eat it?" was served the answer given
    after "... shellfish." (a review)."""
    if _asks(text):
        return True
    words = _leading_words(text)
    for word in words:
        if word not in _LEADING_COURTESY:
            return word in REQUEST_VERBS and FIRST_PERSON.isdisjoint(words)
    return False


def _leading_words(text: str) -> list[str]:
    """The words of a turn's first kilobyte, lower case, apostrophes kept
    ("i'm"): enough to tell a request and what it says of the user, for a
    turn of any length."""
    return re.findall(r"[a-z']+", text[:1024].lower())


_QUESTION_MARK = re.compile(r"\?(?:\s|$)")


def _asks(text: str) -> bool:
    """Whether ``text`` asks a question: a sentence of it ends with "?" (not
    only the last: "Should I get a cat or a dog? I work long hours.")."""
    return _QUESTION_MARK.search(text) is not None


# Words that point back at what an earlier turn asked for: a topic turn
# with one ("Make it vegan.", "Keep that formal.") is a piece of that request.
REFERS_BACK = _words("it its that this these those them they one ones same there")

# A topic turn saying this many content words or fewer (besides small talk)
# is a fragment of an earlier request ("Vegan, please.", "Just me and my
# wife.", "For next Friday."), not one of its own.
FRAGMENT_WORDS = 2

# What a user's earlier turn says that binds no referent, as analyze() gives
# its words (singular).
_USER_FILLER = frozenset(singular(w) for w in SMALL_TALK - POLARITY - TIMES_OF_DAY)


def _continues(earlier: Sequence[common_pb2.Message], topic: str, texts: _Texts) -> bool:
    """Whether a topic turn that asks nothing is a piece of an earlier
    request rather than one of its own: it answers the assistant's question
    right before it ("Any restrictions?" / "Make it vegan."), points back at
    it, or is a fragment (REFERS_BACK, FRAGMENT_WORDS). "Describe the
    process of photosynthesis." is none of these: history before it on
    other things binds only its names and numbers."""
    before = _turn_before(earlier, len(earlier))
    if before >= 0 and _assistant_asks(earlier[before], texts[before]):
        return True
    if len(topic) > REPLY_ANALYSIS_MAX_CHARS or not readable(topic):
        # Not analysed: the stricter side.
        return True
    analysis = analyze(topic)
    if analysis.token_set & REFERS_BACK:
        return True
    # A short question is a question of its own ("What is photosynthesis?").
    return not _asks(topic) and len(analysis.content - _USER_FILLER) <= FRAGMENT_WORDS


def _bound_before_topic(
    earlier: Sequence[common_pb2.Message], topic: str, question: str, texts: _Texts
) -> list[common_pb2.Message]:
    """What the turns before the topic turn bind. No verifier reads them,
    yet they may say what the question's answer depends on. Walking back
    from the topic turn:

    - A user's statement binds its words, names, numbers and negation
      (_bound_by_earlier_turn): "I'm allergic to peanuts." / "Noted." /
      "What's a popular Thai dish?" / "Pad Thai." / "Can I eat it?" was
      served the answer given after "... to shellfish." (likewise "I don't
      have a car." / "I have a car.", "My son is a toddler." / "... a
      teenager.": a review's hunt). Such history said in other words is
      then another conversation: a miss, never a wrong answer.
    - A user's question ends the walk: history before it was about another
      thing. A topic turn that asks a question of its own ("What is the
      capital of France?") stands alone there, the question binding
      nothing. One that asks nothing is a piece of that question ("For
      next Friday." after "I want to book a flight to Paris."): it binds
      its names and numbers, and where the topic turn continues it
      (_continues: "Make it vegan." after "Suggest a recipe for dinner." /
      "Any restrictions?") its words too.
    - Where the topic turn continues what came before, the assistant's
      replies bind as replies after it do (_bound_by_reply): "Recommend a
      city in Europe." / "Lisbon." / "I'll go there in May." was served the
      answer given after "Oslo.".
    - A user's small talk binds nothing, but where it answers the
      assistant's question (_bound_by_answer: "Do you have a yard?" /
      "No.").
    - The question or request that ends the walk binds its words all the
      same where it says something of the user ("Is peanut oil safe if I'm
      allergic to peanuts?": _says_of_the_user) or is what the last
      question names ("How much does the laptop cost?" after "Recommend a
      laptop for coding." / ... / "And a monitor?": _named_by): a second
      hunt's, served across peanuts and shellfish, coding and gaming.

    bench/README.md's conversations after unrelated history are served
    less so (statements before the topic bind), a miss for a wrong answer."""
    if not topic:
        return []
    asking = _asks(topic)
    continues: bool | None = None  # worked out at the first turn that needs it

    def continued() -> bool:
        nonlocal continues
        if continues is None:
            continues = _continues(earlier, topic, texts)
        return continues

    bound = []
    for at in range(len(earlier) - 1, -1, -1):
        message = earlier[at]
        text = texts[at]
        if not text:
            continue
        referents = None
        if message.role == common_pb2.ROLE_ASSISTANT:
            said = _user_turn_before(earlier, at, texts)
            # A reply to small talk ("Hey, quick question." / "Sure, ask
            # away!") binds nothing, unless it asks (its answer may bind).
            if continued() and not (is_small_talk(said) and not _assistant_asks(message, text)):
                referents = _bound_by_reply(text, said)
        elif message.role != common_pb2.ROLE_USER:
            continue
        elif is_small_talk(text):
            if _answers_the_assistant(earlier, at, texts):
                referents = _bound_by_answer(text)
        elif _requests(text):
            said = _says_of_the_user(text) or _named_by(question, text, topic)
            if not asking or continued() or said:
                referents = _bound_by_earlier_turn(text, with_words=continued() or said)
                if referents is not None:
                    bound.append(referents)
            break
        else:
            referents = _bound_by_earlier_turn(text, with_words=True)
        if referents is not None:
            bound.append(referents)
    return bound[::-1]


# FIRST_PERSON but the plural, which questions on general things use too
# ("What's our solar system's largest planet?").
_FIRST_PERSON_SINGULAR = FIRST_PERSON - _words("our us we we're we've")

# Words after which a question names a thing said before ("the laptop").
_DETERMINERS = _words("the that this these those")


def _says_of_the_user(text: str) -> bool:
    """Whether a question or request says something of the user's own
    situation (a first-person singular word)."""
    return not _FIRST_PERSON_SINGULAR.isdisjoint(_leading_words(text))


def _named_by(question: str, text: str, topic: str) -> bool:
    """Whether ``question`` names, after a determiner ("the laptop"), a word
    of ``text`` that ``topic`` does not say: it is about ``text``'s thing,
    not the topic turn's."""
    if len(text) > REPLY_ANALYSIS_MAX_CHARS or len(question) > REPLY_ANALYSIS_MAX_CHARS:
        return False
    # The analysis's own words, as its content spells them ("the laptop's"
    # is "laptop"): read by another split, a possessive named nothing.
    tokens = analyze(question).tokens
    named = {singular(tokens[i + 1]) for i in range(len(tokens) - 1) if tokens[i] in _DETERMINERS} - STOPWORDS
    topic_words = analyze(topic).content if len(topic) <= REPLY_ANALYSIS_MAX_CHARS else frozenset()
    return bool((named & analyze(text).content) - topic_words)


def _user_turn_before(messages: Sequence[common_pb2.Message], at: int, texts: _Texts) -> str:
    """The normalized text of the user's turn before ``at`` ("" for none)."""
    before = texts.user_before(at)
    return texts[before] if before >= 0 else ""


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
        # Names as the content words spell them (singular), as replies bind
        # them; "no" and a negation kept ("I have no kids." / "I have kids.",
        # "I don't have a car." / "I have a car.").
        words = {singular(name) for name in analysis.names} | (
            analysis.content - _USER_FILLER - greeting_times(analysis.tokens)
        )
        words |= analysis.token_set & POLARITY
        if analysis.negations:
            words.add("not")
    words -= analysis.numbers.keys() | NUMBER_WORDS.keys()
    # Symbols that name something too ("My 🐶 weighs 5 kg." / "My 🐱 ...": a
    # hunt), not a feeling ("I'm on the Pro plan 🙂").
    referents = sorted(words) + sorted(analysis.numbers.elements()) + _things(analysis.glyphs)
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
    if _asks(topic) and not _asks(text):
        # An answer to a question: its words are the answer, the question's
        # alternatives too ("Paris or Rome?" / "Rome."), and those small
        # talk also says ("Rainy." / "Sunny."): each was served the other's
        # answer (a review's hunt). Other words the question said are only
        # repeated ("Which is bigger, Texas or Alaska?" / "Alaska is
        # bigger." binds "alaska", as "Alaska." does).
        filler = _COURTESY
        said = _said_but_alternatives(topic)
        new_words = (analysis.content | (analysis.token_set & POLARITY)) - filler - said
    else:
        # A topic turn too long to analyse shares no word: the reply's are all new (the stricter side).
        said = analyze(topic).content if len(topic) <= REPLY_ANALYSIS_MAX_CHARS else frozenset()
        filler = _TIMED_REPLY_FILLER if analysis.numbers else _REPLY_FILLER
        new_words = analysis.content - said - filler - greeting_times(analysis.tokens)
    if len(new_words) > SHORT_REPLY_WORDS:
        return whole
    # Names as the content words spell them, so "Paris." (no name: it opens
    # the sentence) and "It's Paris." bind the same; numbers as the analysis
    # writes them ("7", "seven" -> "7").
    # ("I'm" mid-sentence reads as a name: filler all the same.)
    words = ({singular(name) for name in analysis.names} - filler) | new_words
    words -= analysis.numbers.keys() | NUMBER_WORDS.keys()
    referents = sorted(words) + sorted(analysis.numbers.elements())
    if not referents:
        return None
    return common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=" ".join(referents))


def _said_but_alternatives(question: str) -> frozenset[str]:
    """The content words of ``question`` (normalized) but the alternatives
    it offers: in a sentence with "or", the words on either side of it, the
    first after each comma before it ("white rice, brown rice, quinoa or
    couscous": a second hunt found "Brown rice." and "White rice." binding
    nothing), and the words before a head noun the list repeats ("white",
    "brown"); stopwords skipped."""
    if len(question) > REPLY_ANALYSIS_MAX_CHARS:
        return frozenset()
    alternatives = set()
    for sentence in re.split(r"[?.!;:]", question.lower()):
        # Each comma's piece read by the analysis itself, so words are
        # spelled as its content spells them ("Wendy's" is "wendy"): read
        # by another split, a possessive pick was no alternative, and
        # "McDonald's or Wendy's?" / "Wendy's." bound nothing (a final read).
        tokens: list[str] = []
        for piece in sentence.split(","):
            tokens += [singular(t) for t in analyze(piece).tokens] + [","]
        tokens.pop()
        if "or" not in tokens:
            continue
        last_or = len(tokens) - 1 - tokens[::-1].index("or")
        heads = collections.Counter(t for t in tokens if t not in STOPWORDS and t != ",")
        for at, token in enumerate(tokens):
            content_before = next((t for t in reversed(tokens[:at]) if t not in STOPWORDS), None)
            content_after = next((t for t in tokens[at + 1 :] if t != "," and t not in STOPWORDS), None)
            if token == "or":
                alternatives.update(t for t in (content_before, content_after) if t not in (None, ","))
            elif token == "," and at < last_or and content_after is not None:
                alternatives.add(content_after)
            elif token not in STOPWORDS and heads[token] >= 2 and content_before not in (None, ","):
                alternatives.add(content_before)
    return analyze(question).content - alternatives


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
