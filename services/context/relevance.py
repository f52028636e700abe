"""How relevant each stored turn is to the new message: pure scoring.

A turn is indexed once, when it is appended (:func:`index_terms`): its
keyword terms (lowercased, lightly stemmed, stop words out) for BM25, and its
entities (names, places, products: capitalized words; numbers; months and
weekdays) as terms of their own, marked ``@``, so that "what did Ana say
about Lisbon?" finds the turn that named them even when the words around
them differ. Assembly then scores every turn from postings and vectors alone
(:func:`hybrid_scores`), never from the turns' texts.

The hybrid is a weighted sum of three signals, each scaled to [0, 1] over the
session so that no one signal's units dominate: embedding cosine similarity
(meaning), BM25 (rare shared words) and entity matches (the names the
question asks about). A turn next to a highly relevant one inherits part of
its score, so a question's answer keeps the line it answers; and a turn in a
stretch of the conversation where many of the best turns sit gains a share,
as people talk about one thing for a while (:func:`with_spans`).

Questions about a conversation name its two people ("What are Kate's
hobbies?"), but the stored turns are by user and assistant, and a person's
name appears in the turns that address them ("Hi Kate!"), not in those that
say what they do: matching it would rank greetings first. So a name that
only one side uses, in many turns and always capitalized, is taken for the
other participant's (:func:`participant_names`) and does not count as a
topic (see :func:`hybrid_scores`).
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import heapq
import math
import re

import numpy as np

from meshgate.common.v1 import common_pb2

# Words and numbers as the index reads them (index_terms); an apostrophe
# inside a word stays with it ("Kate's").
INDEX_WORD = re.compile(r"[A-Za-z][A-Za-z'’]*|\d+(?:[.,:/]\d+)*")
_POSSESSIVE = re.compile(r"['’]s$")

# Function words: frequent in every turn, so they only add noise to BM25.
_STOP_WORD_LIST = """
a about above after again against all also am an and any are aren't as at be because been before
being below between both but by can can't cannot could couldn't did didn't do does doesn't doing
don't down during each few for from further get got had hadn't has hasn't have haven't having he
he'd he'll he's her here here's hers herself him himself his how how's i i'd i'll i'm i've if in
into is isn't it it's its itself just let's like me more most mustn't my myself no nor not now
of off on once only or other ought our ours ourselves out over own really same shan't she she'd
she'll she's should shouldn't so some such than that that's the their theirs them themselves
then there there's these they they'd they'll they're they've this those through to too under
until up very was wasn't we we'd we'll we're we've were weren't what what's when when's where
where's which while who who's whom why why's will with won't would wouldn't you you'd you'll
you're you've your yours yourself yourselves yeah yes oh ok okay hey hi hello lol haha im dont
thats ive youre well oh yea gonna wanna thing things one much many lot also still even
"""
STOP_WORDS = frozenset(_STOP_WORD_LIST.split())
_TIME_WORD_LIST = """
january february march april may june july august september october november december monday
tuesday wednesday thursday friday saturday sunday today yesterday tomorrow tonight weekend
morning evening night week month year
"""
_TIME_WORDS = frozenset(_TIME_WORD_LIST.split())
ENTITY_MARK = "@"


def stem(word: str) -> str:
    """A light suffix stripper: plurals and common verb endings, so that
    "hobbies" meets "hobby" and "skiing" meets "ski". Deliberately crude:
    both sides of a match go through the same function."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 5 and word.endswith("ing"):
        return word[:-3]
    if len(word) > 4 and word.endswith("ed"):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _words(text: str) -> collections.abc.Iterator[tuple[str, str]]:
    """(word as written, without possessive) pairs."""
    for match in INDEX_WORD.finditer(text):
        yield match.group(), _POSSESSIVE.sub("", match.group())


def index_terms(text: str) -> collections.Counter[str]:
    """A turn's (or a question's) terms with their frequencies: stemmed
    keywords, plus each entity once more under ``@``."""
    terms: collections.Counter[str] = collections.Counter()
    # Typographic apostrophes spell the same words as the stop list's.
    for written, word in _words(text.replace("’", "'")):
        lower = word.lower()
        if lower in STOP_WORDS:
            continue
        if word[0].isdigit():
            terms[ENTITY_MARK + lower] += 1
            terms[lower] += 1
            continue
        if len(lower) < 2:
            continue
        terms[stem(lower)] += 1
        if written[0].isupper() or lower in _TIME_WORDS:
            terms[ENTITY_MARK + lower] += 1
    return terms


@dataclasses.dataclass(frozen=True, slots=True)
class Weights:
    """How the signals add up; chosen on the development conversations
    (REALTALK, bench/context_bench.py), nothing else, but for
    first_person_lift, seen first on BEAM-100k (bench/context_beam.py)."""

    dense: float = 1.0
    keyword: float = 1.0
    entity: float = 0.2
    # Share of a neighbour's score a turn inherits.
    neighbour: float = 0.1
    bm25_k1: float = 1.2
    bm25_b: float = 0.75
    # Pseudo-relevance feedback (see hybrid_scores): how many of the best
    # turns move the question's vector, and by how much of their mean.
    feedback_turns: int = 10
    feedback_weight: float = 0.7
    # Topic stretches (see with_spans): the best turns that count, how
    # many turns either side of a turn its stretch reaches, and the most a
    # turn in the densest stretch gains.
    span_turns: int = 50
    span_radius: int = 5
    span: float = 0.5
    # The share of the question's vector taken from its nameless form's
    # (see NamelessQuery), when each name it leaves out is unknown to the
    # session or a participant's (hybrid_scores).
    nameless: float = 0.5
    # The share of the turns using a name that must be one speaker's for it
    # to be a participant's (see participant_names): people seldom say
    # their own name, while a third person both talk about is named by
    # both. Strict, because a wrong call drops a topic from the question: a
    # user who talks about "my manager Sarah" in eleven turns, to an
    # assistant that names her back once or twice, must keep "Sarah" (0.8
    # let 11 of 13 through; 0.95 keeps nearly all of what 0.8 gained on
    # realtalk, -0.5/-0.2 points at 1k/2k, bench/README.md). Above 1, no
    # name is a participant's.
    participant_one_sided: float = 0.95
    # Each signal's top (see scaled) at this percentile of its values
    # rather than their max, so that one outlier turn would not compress
    # every other turn's share: below 100 it kept fewer questions' evidence
    # on both splits (bench/context_misses.py --ideas), so 100, the max.
    top_percentile: float = 100.0
    # What a user's turn gains when the question is asked in the first
    # person (asked_in_first_person, see hybrid_scores); by words alone,
    # scaled down with the signals it joins (_first_person_lift). Seen
    # first on all twenty BEAM-100k chats, 0.5 and 1.0 included, so no
    # half of them is a blind check: bench/context_beam.py --halves shows
    # the effect holds on the odd and the even chats alike (bench/README.md,
    # "Questions asked in the first person"). On the odd, 0 / 0.5 / 1.0 /
    # 2.0 kept 35.8 / 41.3 / 48.0 / 50.8% of the questions' evidence at 1k
    # (50.3 / 58.1 / 64.2 / 75.4% at 8k); 1.0 is the largest that kept as
    # many of the 31 first-person questions with an assistant turn among
    # their evidence over the four budgets (12, as with no lift, though
    # every lift from 0.25 to 1.0 loses one at 2k, 3 -> 2, and gains one at
    # 8k, 5 -> 6; 9 with 1.5, 5 with 2.0): an answer the assistant gave
    # must not be buried under the user's turns. On the even: 35.8 -> 50.6%
    # at 1k, 52.8 -> 63.6% at 8k. REALTALK, whose questions name people
    # instead (one of its 658 says I / me / my), unmoved at every budget.
    first_person_lift: float = 1.0


DEFAULT_WEIGHTS = Weights()

# The scoring's name in an assembly's inputs (AssemblyInputs.ranking), so that
# the same inputs build the same prompt: bump it with any change to how turns
# are scored or to the default weights.
RANKING = "hybrid-spans-8"
# The same, with the question's nameless form (NamelessQuery) embedded and
# scored with it (context.embed_nameless_question).
RANKING_NAMELESS = "hybrid-spans-nameless-9"

# The most distinct query terms a ranking scores: each costs ~15 us of
# postings arithmetic on the event loop, so a "question" of tens of
# thousands of distinct words (a pasted document, within max_message_bytes)
# held the context service half a second or more, every other caller's
# assembly with it. A question has a few dozen; past the bound, the terms
# the fewest turns use are kept (BM25 weighs them most), in a fixed order.
MAX_QUERY_TERMS = 256

# A posting packs a turn index and the term's frequency in it (capped) into one uint32.
TF_BITS = 4
TF_MAX = (1 << TF_BITS) - 1


def pack_posting(turn_index: int, frequency: int) -> int:
    return (turn_index << TF_BITS) | min(frequency, TF_MAX)


def bm25(
    query_terms: collections.abc.Iterable[str],
    postings: collections.abc.Mapping[str, np.ndarray],
    term_counts: np.ndarray,
    weights: Weights = DEFAULT_WEIGHTS,
) -> np.ndarray:
    """BM25 of every turn for the distinct ``query_terms``, from packed
    postings (:func:`pack_posting`) and each turn's number of terms."""
    n = len(term_counts)
    scores = np.zeros(n, dtype=np.float64)
    if n == 0:
        return scores
    average_length = max(float(term_counts.mean()), 1.0)
    for term in set(query_terms):
        packed = postings.get(term)
        if packed is None or len(packed) == 0:
            continue
        turns = (packed >> TF_BITS).astype(np.int64)
        in_range = turns < n
        turns = turns[in_range]
        frequency = (packed[in_range] & TF_MAX).astype(np.float64)
        df = len(turns)
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        length = term_counts[turns] / average_length
        k1, b = weights.bm25_k1, weights.bm25_b
        np.add.at(scores, turns, idf * frequency * (k1 + 1) / (frequency + k1 * (1 - b + b * length)))
    return scores


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 rows of length 1 (all zero for a turn stored without a
    vector): a hot session keeps these, converted once, so that cosine is
    one matrix product per assembly."""
    vectors = np.asarray(vectors)
    if vectors.dtype == np.int8 and vectors.ndim == 2 and vectors.shape[1] * 128 * 128 < 2**24:
        # Stored rows, converted per cold assembly: in place, one float32
        # copy, 2.6 times faster. Bit for bit the general path's: a row's
        # squared int8 components sum to an integer below 2^24 (up to 1,023
        # dimensions), exact in float32 in any order, and each component is
        # divided by the same norm.
        rows = vectors.astype(np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
        norms[norms == 0] = 1  # an all-zero row stays zero
        rows /= norms[:, None]
        return rows
    rows = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def cosine(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine of every stored (quantized) vector with the query; 0 for a
    turn stored without one (an all-zero row)."""
    if len(vectors) == 0:
        return np.zeros(0)
    return unit_rows(vectors) @ unit(query)


def unit(vector: np.ndarray) -> np.ndarray:
    """``vector`` scaled to length 1 (a zero vector stays about zero)."""
    vector = np.asarray(vector, dtype=np.float32)
    return vector / max(float(np.linalg.norm(vector)), 1e-9)


# A participant's name is used by the other speaker again and again (a
# greeting most days), so at least this many turns use it: fewer is a topic
# (a place or a show one of them brought up a few times).
PARTICIPANT_NAME_MIN_TURNS = 10


def participant_names(
    query_terms: collections.abc.Iterable[str],
    postings: collections.abc.Mapping[str, np.ndarray],
    roles: np.ndarray,
    weights: Weights = DEFAULT_WEIGHTS,
) -> set[str]:
    """The query's entity terms (``@kate``) that name a participant of the
    conversation: a proper name (capitalized in every turn that has the
    word, unlike a sentence's first word), used in at least
    :data:`PARTICIPANT_NAME_MIN_TURNS` turns, nearly all
    (``weights.participant_one_sided``) by one speaker: the one
    addressing the other. From postings and roles only."""
    return set(_participant_name_turns(query_terms, postings, roles, weights))


def _participant_name_turns(
    query_terms: collections.abc.Iterable[str],
    postings: collections.abc.Mapping[str, np.ndarray],
    roles: np.ndarray,
    weights: Weights,
) -> dict[str, np.ndarray]:
    """:func:`participant_names`, each with the turns that use it (which
    hybrid_scores keeps from seeding feedback: decoded once, here)."""
    names = {}
    for term in set(query_terms):
        word = term[len(ENTITY_MARK) :]
        if not term.startswith(ENTITY_MARK) or word[:1].isdigit() or word in _TIME_WORDS:
            continue
        packed = postings.get(term)
        if packed is None or len(packed) < PARTICIPANT_NAME_MIN_TURNS:
            continue
        as_keyword = postings.get(stem(word))
        if as_keyword is not None and len(as_keyword) > len(packed):
            continue
        turns = (packed >> TF_BITS).astype(np.int64)
        turns = turns[turns < len(roles)]
        speakers = roles[turns]
        if not len(speakers):
            continue
        _, per_speaker = np.unique(speakers, return_counts=True)
        if per_speaker.max() >= weights.participant_one_sided * len(speakers):
            names[term] = turns
    return names


@dataclasses.dataclass(frozen=True, slots=True)
class NamelessQuery:
    """The question less its capitalized words (:func:`nameless_text`),
    embedded beside it. ``vector`` is None until then."""

    text: str
    # The words left out, as written less a possessive ("Vanessa").
    names: frozenset[str]
    vector: np.ndarray | None = None


# Words in any script for the nameless form: INDEX_WORD's ASCII letters would cut
# "Bolaño" into "Bola" and "o" and keep the "o" as a word of its own.
_ANY_WORD = re.compile(r"[^\W\d_][\w'’]*|\d+(?:[.,:/]\d+)*")


def nameless_text(text: str) -> NamelessQuery | None:
    """The question's words less stop words and less capitalized words
    (names, mostly: "What pets did Vanessa have?" -> "pets"), in order;
    None when it has no capitalized word to leave out, or nothing else.
    Words of scripts without capitals are never left out.

    A name that no turn of the session uses cannot match a turn, yet it
    moves the question's embedding toward whatever the model associates
    with the name; so does a participant's name, which the turns use to
    address them, not to say what they do (see participant_names).
    :func:`hybrid_scores` then mixes this text's vector into the question's."""
    kept, names = [], set()
    # Typographic apostrophes spell the same words as the stop list's (index_terms).
    for match in _ANY_WORD.finditer(text.replace("’", "'")):
        written = match.group()
        word = _POSSESSIVE.sub("", written)
        if word.lower() in STOP_WORDS:
            continue
        if written[0].isupper():
            names.add(word)
        else:
            kept.append(written)
    if not names or not kept:
        return None
    return NamelessQuery(" ".join(kept), frozenset(names))


# The asker speaking of themselves: I, me, my, mine, myself, whole words in
# any case ("I'm", "I’ve" and a typed "i" too: an apostrophe ends a word;
# "Myanmar" and "i.e." not). From the question's own text: index_terms drops
# every one of them as a stop word. Not "we" / "our": said to an assistant,
# "we" is both sides of the chat.
_FIRST_PERSON = re.compile(r"\b(?:i(?!\.\w)|me|my|mine|myself)\b", re.IGNORECASE)
# The same letters that are no pronoun: a numeral after a word that takes
# one ("Type I diabetes", "Phase I trials", "Part I or II"), or after a
# capitalized word that does not start the sentence when the clause ends
# with it ("World War I?", "Louis I."; "On Monday I said" and "Did I" are
# the pronoun), a letter joined by "/" or "-" ("I/O", "I-95", "ME/CFS"), and
# the noun "mine" ("the coal mine").
_NUMBERED_BEFORE = re.compile(
    r"\b(?:war|type|phase|part|stage|class|chapter|level|grade|act|season|volume|book|section"
    r"|article|category|round|episode|unit|step|appendix|table|figure)\s+\Z",
    re.IGNORECASE,
)
_CAPITALIZED_BEFORE = re.compile(r"[^.!?\s]\s+[A-Z][\w']*\s+\Z")
_CLAUSE_ENDS = re.compile(r"\s*(?:[.!?,;:)]|\Z)")
_MINE_THE_NOUN = re.compile(r"\b(?:a|an|the|coal|gold|land)\s+\Z", re.IGNORECASE)


def asked_in_first_person(question: str) -> bool:
    """Whether the question speaks of its asker ("What did I decide about my
    budget?"). Then the asker is the session's user, and what they said
    themselves is the likelier evidence than the assistant's replies, which
    are long and topical enough to outrank it on the question's topic
    alone (see hybrid_scores). A question about someone else ("What are
    Kate's hobbies?") says nothing of whose turns hold the answer. A long
    message is read at its two ends, where the ask is (a paste between
    them says nothing of who asks): every match costs a few regex
    searches, ~5 s on the event loop for a 1 MB message of "I/O"."""
    if len(question) > 2 * _ASK_CHARS:
        question = f"{question[:_ASK_CHARS]}\n{question[-_ASK_CHARS:]}"
    return any(_is_pronoun(question, match) for match in _FIRST_PERSON.finditer(question))


# How much of each end of a long message the first-person check reads.
_ASK_CHARS = 2048


# What _is_pronoun reads before a match: the word or two its patterns look
# at. The whole text before each match made the check quadratic (8 KB of
# "I/O " took 3 s, on the event loop, of a question up to 1 MB).
_LOOK_BEHIND_CHARS = 64


def _is_pronoun(question: str, match: re.Match[str]) -> bool:
    word = match.group()
    before = question[max(0, match.start() - _LOOK_BEHIND_CHARS) : match.start()]
    joined_by = before[-1:] + question[match.end() : match.end() + 1]
    if word == "I":
        numeral = _NUMBERED_BEFORE.search(before) or (
            _CAPITALIZED_BEFORE.search(before) and _CLAUSE_ENDS.match(question, match.end())
        )
        return not ("/" in joined_by or "-" in joined_by or numeral)
    if word == "ME":
        return "/" not in joined_by
    return not (word.lower() == "mine" and _MINE_THE_NOUN.search(before))


def scaled(values: np.ndarray, top_percentile: float = 100.0) -> np.ndarray:
    """Above the session's typical value, as a share of the best (of the
    ``top_percentile``-th percentile, see Weights.top_percentile): what
    makes a turn stand out, not the level every turn shares."""
    if len(values) == 0:
        return values
    floor = float(np.median(values))
    top = float(values.max()) if top_percentile >= 100 else float(np.percentile(values, top_percentile))
    if top <= floor:
        return np.zeros_like(values, dtype=np.float64)
    return np.clip((values - floor) / (top - floor), 0.0, 1.0)


def _scores_dense(unit_vectors: np.ndarray | None, query_vector: np.ndarray | None, turns: int) -> bool:
    """Whether :func:`hybrid_scores` uses the vectors for ``turns`` turns:
    the question's and one row per turn; else it scores by words alone."""
    return unit_vectors is not None and query_vector is not None and len(unit_vectors) == turns


@dataclasses.dataclass(frozen=True, slots=True)
class Scores:
    """What :func:`hybrid_scores` found: each turn's relevance, whether
    it mixed the question's nameless form into the question's vector, and
    whether the vectors were part of it (else the words alone scored)."""

    scores: np.ndarray
    mixed_nameless: bool = False
    dense: bool = False

    @property
    def ranking(self) -> str:
        """The name an assembly ranked by these scores gives its ranking:
        the nameless form's only where it moved the question, so that an
        assembly it left alone keeps its id whether
        context.embed_nameless_question is on or not, and one it changed is
        never passed off as the other's."""
        return RANKING_NAMELESS if self.mixed_nameless else RANKING


def hybrid_scores(
    query_terms: collections.abc.Iterable[str],
    postings: collections.abc.Mapping[str, np.ndarray],
    term_counts: np.ndarray,
    unit_vectors: np.ndarray | None,
    query_vector: np.ndarray | None,
    weights: Weights = DEFAULT_WEIGHTS,
    roles: np.ndarray | None = None,
    nameless: NamelessQuery | None = None,
    question: str = "",
) -> Scores:
    """Each turn's relevance to the query, higher is more relevant, from the
    turns' :func:`unit_rows`. Without a query vector (the inference service
    is down) it is lexical only.

    With ``nameless`` (the question less its capitalized words, embedded),
    when every name it leaves out is unknown to the session (no turn uses
    it) or a participant's, the question's vector is mixed with the
    nameless one's (``weights.nameless``): the names only pull the question
    away from the turns (see :func:`nameless_text`). Names the session
    uses stay: they are what the question is about. On the development
    conversations this kept more questions' evidence at every budget, on
    both splits (bench/README.md, "Names the conversation never uses").

    With the turns' ``roles``, the query's :func:`participant_names` are no
    keywords or entities, and the turns that use them seed no feedback
    (below): they are mostly greetings, close to the question's vector only
    through the name. On the development conversations whose people address
    each other by name this kept more questions' evidence at every budget;
    where they do not, nothing changes (bench/context_bench.py --offline).

    The dense signal is scored twice: the question's vector is then moved
    toward the turns that scored best the first time (pseudo-relevance
    feedback), because the other turns of a multi-hop answer share the
    found turns' topic more than the question's words. On the development
    conversations this kept more questions' evidence at every budget,
    on the held-out ones as well as on those it was tuned on
    (bench/context_bench.py --offline).

    With the turns' ``roles`` and a ``question`` (the new user messages' text)
    :func:`asked_in_first_person`, the user's turns gain
    ``weights.first_person_lift`` (scaled down by words alone, see
    :func:`_first_person_lift`) before the stretches: the asker's own
    words are what "my" asks about, and the stretches then favour the
    stretches of the conversation where they spoke of it.

    Last, turns in stretches dense with the best turns gain a share
    (:func:`with_spans`)."""
    query_terms = _bounded_terms(query_terms, postings)
    names = {}
    if roles is not None:
        # Only the scored turns: a name's turns index the seeds below.
        names = _participant_name_turns(query_terms, postings, roles[: len(term_counts)], weights)
    if names:
        spelled = names.keys() | {stem(name[len(ENTITY_MARK) :]) for name in names}
        query_terms = [t for t in query_terms if t not in spelled]
    keywords = [t for t in query_terms if not t.startswith(ENTITY_MARK)]
    entities = [t for t in query_terms if t.startswith(ENTITY_MARK)]
    top = weights.top_percentile
    lexical = weights.keyword * scaled(bm25(keywords, postings, term_counts, weights), top)
    lexical += weights.entity * scaled(bm25(entities, postings, term_counts, weights), top)
    dense = _scores_dense(unit_vectors, query_vector, len(term_counts))
    asker = _first_person_lift(question, roles, len(term_counts), weights, dense)
    if not dense:
        return Scores(with_spans(_with_neighbours(lexical, weights) + asker, weights))
    query = unit(query_vector)
    mixed_nameless = bool(weights.nameless) and _names_only_pull_away(nameless, postings, names)
    if mixed_nameless:
        query = unit((1 - weights.nameless) * query + weights.nameless * unit(nameless.vector))
    score = _with_neighbours(lexical + weights.dense * scaled(unit_vectors @ query, top), weights)
    feedback = min(weights.feedback_turns, len(score))
    if feedback and weights.feedback_weight:
        seeds = score
        if names:
            seeds = score.copy()
            for turns in names.values():
                seeds[turns] = -np.inf
        best = np.argpartition(-seeds, feedback - 1)[:feedback]
        query = query + weights.feedback_weight * unit_vectors[best].mean(axis=0)
        score = _with_neighbours(lexical + weights.dense * scaled(unit_vectors @ query, top), weights)
    return Scores(with_spans(score + asker, weights), mixed_nameless, dense=True)


def _bounded_terms(
    query_terms: collections.abc.Iterable[str], postings: collections.abc.Mapping[str, np.ndarray]
) -> list[str]:
    """``query_terms``, or past MAX_QUERY_TERMS distinct ones the session
    uses, the rarest of those (ties by the term): terms no turn uses score
    nothing and cost a lookup."""
    query_terms = list(query_terms)
    if len(query_terms) <= MAX_QUERY_TERMS:
        return query_terms
    used = {}
    for term in set(query_terms):
        packed = postings.get(term)
        if packed is not None and len(packed):
            used[term] = len(packed)
    if len(used) <= MAX_QUERY_TERMS:
        return query_terms
    kept = set(heapq.nsmallest(MAX_QUERY_TERMS, used, key=lambda term: (used[term], term)))
    return [term for term in query_terms if term in kept]


def _first_person_lift(
    question: str, roles: np.ndarray | None, turns: int, weights: Weights, dense: bool
) -> np.ndarray | float:
    """What each of the ``turns`` scored turns gains for being the asker's
    own (see hybrid_scores): 0 unless the question is asked in the first
    person and the roles are known.

    Scored by words alone (``dense`` false) a turn's relevance tops out at
    keyword + entity rather than keyword + entity + dense, so the lift
    shrinks by the same share: the same pull against the other signals on
    either path, not twice as strong without the vectors."""
    if roles is None or not weights.first_person_lift or not asked_in_first_person(question):
        return 0.0
    lift = weights.first_person_lift
    if not dense:
        words = weights.keyword + weights.entity
        lift *= words / (words + weights.dense)
    return lift * (np.asarray(roles[:turns]) == common_pb2.ROLE_USER)


def _names_only_pull_away(
    nameless: NamelessQuery | None,
    postings: collections.abc.Mapping[str, np.ndarray],
    participants: collections.abc.Mapping[str, np.ndarray],
) -> bool:
    """Whether every name the nameless question leaves out is unknown to the
    session or a participant's (``participants``). Unknown: no turn has
    any term the index makes of it, in any case, so that a question's
    capitalized first word the turns use ("Pottery: when did Kate start?")
    is what the question is about, not a name."""
    if nameless is None or nameless.vector is None:
        return False
    for name in nameless.names:
        terms = index_terms(name)
        if not participants.keys() & terms and any(len(postings.get(t, ())) for t in terms):
            return False
    return True


def _with_neighbours(score: np.ndarray, weights: Weights) -> np.ndarray:
    """A turn next to a relevant one inherits a share of its score."""
    if not weights.neighbour or len(score) < 2:
        return score
    left = np.concatenate(([0.0], score[:-1]))
    right = np.concatenate((score[1:], [0.0]))
    return score + weights.neighbour * np.maximum(left, right)


def with_spans(score: np.ndarray, weights: Weights) -> np.ndarray:
    """A turn gains up to ``weights.span`` by how much of the best turns'
    score lies within ``span_radius`` turns of it (its own included),
    scaled as the other signals are (:func:`scaled`: above the session's
    median, as a share of the densest stretch).

    People talk about one thing for a while, so a question's evidence
    turns sit close together more often than its best-ranked turns do: a
    plain answer ("Yes, every winter!") next to the turns that name the
    topic outranks a turn elsewhere that merely echoes the question's
    words, and several evidence turns of one stretch get in together.
    Counting only the best turns keeps the long tail of weakly similar
    turns from making every stretch dense. On the development
    conversations (bench/context_bench.py --offline; bench/README.md, "Turns
    in dense stretches") this kept more questions' evidence at every
    budget, on both splits."""
    count = len(score)
    if not weights.span or count < 2:
        return score
    best = min(weights.span_turns, count)
    # Every turn scoring at least the best-th score counts, ties included:
    # picking among equals would favour one end of the session (argpartition
    # takes whichever it meets first).
    threshold = np.partition(score, count - best)[count - best]
    top = np.where(score >= threshold, score, 0.0)
    radius = weights.span_radius
    # "full" rather than "same": "same" returns the kernel's length when
    # the session is shorter than it.
    density = np.convolve(top, np.ones(2 * radius + 1), mode="full")[radius : radius + count]
    return score + weights.span * scaled(density, weights.top_percentile)


def quantize(vectors: np.ndarray) -> np.ndarray:
    """int8 rows, each scaled so its largest component is 127: cosine only
    needs directions, and a 384-dimensional turn then costs 384 bytes."""
    vectors = np.asarray(vectors, dtype=np.float32)
    peak = np.abs(vectors).max(axis=1, keepdims=True)
    scale = np.divide(127.0, peak, out=np.zeros_like(peak), where=peak > 0)
    return np.round(vectors * scale).astype(np.int8)
