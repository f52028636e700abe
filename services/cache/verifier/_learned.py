"""The learned stage: the pair's features, the two coefficient sets
(``Head``) with their calibrated thresholds, and the ``Verifier`` that runs
the checks, then scores what they let through. Its model file is
``verifier_model.json`` beside the package, written by
``bench/train_cache_verifier.py``."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np

from meshgate.embedding import head_embedder
from services.cache.verifier._checks import (
    _known_words,
    _retyped,
    _unmatched_names,
    structural_veto,
    time_blind_numbers,
    topic_amount_veto,
    topic_condition_veto,
    topic_entity_veto,
    topic_unit_veto,
)
from services.cache.verifier._reading import (
    CONTEXT_SEPARATOR,
    MODEL_PATH,
    NEGATIONS,
    STOPWORDS,
    Analysis,
    _words,
    analyze,
    readable,
    scope_against,
    singular,
)


def _jaccard(x: frozenset, y: frozenset) -> float:
    union = len(x | y)
    return len(x & y) / union if union else 1.0


# The learned stage's features, in order. Counts are capped so that one
# long question cannot dominate a linear score.
FEATURE_NAMES = (
    "cosine",
    "cosine_squared",
    "token_jaccard",
    "content_jaccard",
    "trigram_jaccard",
    "same_content_words",
    "content_words_replaced",
    "content_words_one_side_more",
    "content_words_other_side_more",
    "length_ratio",
    "log_length",
    "same_question_word",
    "names_only_on_one_side",
    "names_replaced",
    "numbers_only_on_one_side",
    "units_only_on_one_side",
    "negation_difference",
    "scope_difference",
    "more_than_one_sentence",
    "function_words_only_on_one_side",
    "person_changed",
    "tense_changed",
    "same_words_up_to_typos",
)
# The question head's further features: content words weighed by rarity.
RARITY_FEATURE_NAMES = (
    "rare_words_shared",
    "rare_words_one_side_more",
    "rare_words_other_side_more",
    "rarest_unshared_word",
)
HEAD_FEATURES = {
    "question": FEATURE_NAMES + RARITY_FEATURE_NAMES,
    "conversation": FEATURE_NAMES,
}
# Who asks and when: "How did you start trading?" is not "How do I start
# trading?" though every content word is the same.
_PERSONS = {
    "i": "1",
    "me": "1",
    "my": "1",
    "mine": "1",
    "we": "1p",
    "us": "1p",
    "our": "1p",
    "you": "2",
    "your": "2",
    "he": "3",
    "him": "3",
    "his": "3",
    "she": "3",
    "her": "3",
    "they": "3p",
    "them": "3p",
    "their": "3p",
}
_PAST = _words("did was were had")


def _persons(a: Analysis) -> frozenset[str]:
    return frozenset(_PERSONS[t] for t in a.token_set if t in _PERSONS)


@dataclasses.dataclass(frozen=True, slots=True)
class WordRarity:
    """How rare each content word is among the training questions (inverse
    document frequency): sharing "sourdough" says more than sharing "best",
    and a rare word only one side has ("... in Kerala?") changes the
    question more than a common one ("... good ..."). Learned from the
    train portion by bench/train_cache_verifier.py; words in fewer than two
    questions are left out and weigh as much as one seen once."""

    questions: int
    counts: dict[str, int]

    def weight(self, word: str) -> float:
        return math.log((self.questions + 1) / (self.counts.get(word, 1) + 1))


def _compounds_met(a: Analysis, b: Analysis) -> tuple[frozenset[str], frozenset[str]]:
    """Each side's content words, where one side writes as one word what the
    other writes as two ("breakup" / "break up", "timezone" / "time zone",
    "post-structuralism"), with the other side's spelling added to each: the
    same words, not one replaced (27 such QQP pairs, 21 of them duplicates;
    2 of the held-out natural paraphrases). Looser than _joined, which
    _retyped reads: a stop word may be a part here ("a theist" / "atheist"
    share their content words), as the model was trained; the score, not
    this, refuses such a pair (0.11-0.55 on a review's 27)."""
    x, y = set(a.content), set(b.content)
    for one, other, one_words, other_words in ((a, b, x, y), (b, a, y, x)):
        for word in one.content - other.content:
            tokens = other.tokens
            for i in range(len(tokens) - 1):
                if singular(tokens[i] + tokens[i + 1]) == word and not {tokens[i], tokens[i + 1]} & NEGATIONS:
                    other_words.add(word)
                    one_words.update(
                        part
                        for part in (singular(tokens[i]), singular(tokens[i + 1]))
                        if part in other.content
                    )
                    break
    return frozenset(x), frozenset(y)


def rarity_features(query: frozenset[str], candidate: frozenset[str], rarity: WordRarity) -> list[float]:
    """``RARITY_FEATURE_NAMES``, in order, of the two sides' content words."""
    weight = rarity.weight
    shared = sum(weight(w) for w in query & candidate)
    only_query = [weight(w) for w in query - candidate]
    only_candidate = [weight(w) for w in candidate - query]
    one, other = sum(only_query), sum(only_candidate)
    total = shared + one + other
    return [
        shared / total if total else 1.0,
        # Capped like the counts: about three rare words' worth.
        min(max(one, other), 30.0),
        min(min(one, other), 30.0),
        max(only_query + only_candidate, default=0.0),
    ]


def features(
    query: Analysis,
    candidate: Analysis,
    query_vector: np.ndarray,
    candidate_vector: np.ndarray,
    rarity: WordRarity | None = None,
) -> np.ndarray:
    """``FEATURE_NAMES``, then ``RARITY_FEATURE_NAMES`` when ``rarity`` is given."""
    cosine = float(query_vector @ candidate_vector)
    lengths = len(query.tokens), len(candidate.tokens)
    query_content, candidate_content = _compounds_met(query, candidate)
    only_query = len(query_content - candidate_content)
    only_candidate = len(candidate_content - query_content)
    names_query, names_candidate = _unmatched_names(query, candidate), _unmatched_names(candidate, query)
    numbers_query, numbers_candidate, units_query, units_candidate = time_blind_numbers(query, candidate)
    return np.array(
        [
            cosine,
            cosine * cosine,
            _jaccard(query.token_set, candidate.token_set),
            _jaccard(query_content, candidate_content),
            _jaccard(query.trigrams, candidate.trigrams),
            float(only_query == only_candidate == 0),
            float(only_query > 0 and only_candidate > 0),
            # Symmetric: which question was stored first says nothing.
            min(max(only_query, only_candidate), 6),
            min(min(only_query, only_candidate), 6),
            min(lengths) / max(max(lengths), 1),
            math.log1p(sum(lengths) / 2),
            float(query.question_word == candidate.question_word),
            min(len(names_query) + len(names_candidate), 4),
            float(bool(names_query) and bool(names_candidate)),
            min(sum(((numbers_query - numbers_candidate) + (numbers_candidate - numbers_query)).values()), 4),
            len(units_query ^ units_candidate),
            min(abs(query.negations - candidate.negations), 2),
            len(scope_against(query, candidate.scope) ^ scope_against(candidate, query.scope)),
            float(max(query.sentences, candidate.sentences) > 1),
            min(len((query.token_set ^ candidate.token_set) & STOPWORDS), 6),
            float(_persons(query) != _persons(candidate)),
            float(bool(query.token_set & _PAST) != bool(candidate.token_set & _PAST)),
            float(_retyped(query, candidate)),
            *(rarity_features(query_content, candidate_content, rarity) if rarity is not None else ()),
        ],
        np.float64,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    accepted: bool
    # Probability-like score of the learned verifier; 0.0 when vetoed.
    score: float
    # The structural check that vetoed ("context" when the topic turns differ
    # or only one side has one), or "score" when the score was too low.
    rejected_by: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class CalibrationRow:
    max_false_hit_rate: float
    threshold: float
    # The false-hit rate the threshold gave on the calibration portion.
    expected_false_hit_rate: float


@dataclasses.dataclass(frozen=True, slots=True)
class Head:
    """One coefficient set of the learned stage and its calibrated thresholds."""

    # Standardization folded into the weights: one dot product per pair.
    weights: np.ndarray
    bias: float
    # Loosest first: each reported wrong hit moves one row down.
    table: tuple[CalibrationRow, ...]
    # The row of the operator's bound.
    start: int
    # Given, the rarity features follow the others.
    rarity: WordRarity | None

    @classmethod
    def build(
        cls,
        mean: np.ndarray,
        scale: np.ndarray,
        weights: np.ndarray,
        bias: float,
        calibration: list[CalibrationRow],
        max_false_hit_rate: float,
        rarity: WordRarity | None,
    ) -> Head:
        expected = len(FEATURE_NAMES) + (len(RARITY_FEATURE_NAMES) if rarity is not None else 0)
        if len(weights) != expected:
            raise ValueError(f"the model has {len(weights)} weights for {expected} features")
        table = tuple(sorted(calibration, key=lambda r: -r.max_false_hit_rate))
        allowed = [i for i, r in enumerate(table) if r.max_false_hit_rate <= max_false_hit_rate]
        if not allowed:
            raise ValueError(
                f"cache.max_false_hit_rate {max_false_hit_rate} is below the strictest calibrated bound "
                f"{table[-1].max_false_hit_rate}"
            )
        return cls(
            np.asarray(weights / scale, np.float64),
            float(bias - (mean / scale) @ weights),
            table,
            allowed[0],
            rarity,
        )

    @property
    def expected_false_hit_rate(self) -> float:
        return self.table[self.start].expected_false_hit_rate

    def threshold(self, strictness: int = 0) -> float:
        row = self.start + max(0, strictness)
        return self.table[row].threshold if row < len(self.table) else math.inf

    def score(self, query: Analysis, candidate: Analysis, query_vector, candidate_vector) -> float:
        x = features(query, candidate, query_vector, candidate_vector, self.rarity)
        z = float(x @ self.weights) + self.bias
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


@dataclasses.dataclass(frozen=True, slots=True)
class Verifier:
    question: Head  # single questions
    conversation: Head  # a question with its topic turn
    # The embedding size the model was trained with: vectors of another
    # model cannot be verified.
    dimensions: int
    # The embedder (meshgate.embedding.embedder_name) whose vectors it was
    # trained on: the cosine of another's (another revision's) is on
    # another scale, so the servicer serves no semantic hit with those.
    embedder: str

    @classmethod
    def load(cls, max_false_hit_rate: float, path: pathlib.Path = MODEL_PATH) -> Verifier:
        model = json.loads(path.read_text(encoding="utf-8"))
        rarity = WordRarity(**model["word_rarity"])
        heads = {}
        for name, feature_names in HEAD_FEATURES.items():
            head = model["heads"][name]
            if head["features"] != list(feature_names):
                raise ValueError(f"{path} was trained on other features; rerun bench/train_cache_verifier.py")
            heads[name] = Head.build(
                np.array(head["mean"], np.float64),
                np.array(head["scale"], np.float64),
                np.array(head["weights"], np.float64),
                head["bias"],
                [CalibrationRow(**row) for row in head["calibration"]],
                max_false_hit_rate,
                rarity if RARITY_FEATURE_NAMES[0] in feature_names else None,
            )
        # Read here, as the service starts, not in its first lookup on the event loop.
        _known_words()
        return cls(
            heads["question"], heads["conversation"], model["embedding_dimensions"], head_embedder(model)
        )

    def trained_on(self, embedder: str) -> bool:
        """Whether its scores mean anything for vectors of ``embedder``."""
        return embedder == self.embedder

    @property
    def expected_false_hit_rate(self) -> float:
        # One number for GetStats: the head that may err more.
        return max(self.question.expected_false_hit_rate, self.conversation.expected_false_hit_rate)

    def threshold(self, strictness: int = 0, *, multi_turn: bool = False) -> float:
        """The score a candidate needs after ``strictness`` reported wrong
        hits in its sub-partition; infinite past the strictest row."""
        return (self.conversation if multi_turn else self.question).threshold(strictness)

    def decide(
        self,
        query: str,
        query_vector: np.ndarray,
        candidate: str,
        candidate_vector: np.ndarray,
        strictness: int = 0,
    ) -> Decision:
        if len(query_vector) != self.dimensions or not candidate:
            # Vectors of another model, or an entry stored before questions
            # were kept: nothing to verify with, so nothing is served.
            return Decision(False, 0.0, "unverifiable")
        if not (readable(query) and readable(candidate)):
            # Words the checks cannot read (readable): the cache service
            # matches such a text exactly only; nothing else may either.
            return Decision(False, 0.0, "unverifiable")
        query_question, _, query_topic = query.partition(CONTEXT_SEPARATOR)
        candidate_question, _, candidate_topic = candidate.partition(CONTEXT_SEPARATOR)
        if bool(query_topic) != bool(candidate_topic):
            return Decision(False, 0.0, "context")
        if query_topic:
            # The checks on the whole texts could pair a name of one topic
            # with one of the other question; each part against its own kind
            # sees a replaced referent as one.
            query_topic_analysis, candidate_topic_analysis = analyze(query_topic), analyze(candidate_topic)
            if (
                structural_veto(query_topic_analysis, candidate_topic_analysis) is not None
                or topic_entity_veto(query_topic_analysis, candidate_topic_analysis)
                or topic_unit_veto(query_topic_analysis, candidate_topic_analysis)
                or topic_amount_veto(query_topic_analysis, candidate_topic_analysis)
                or topic_condition_veto(query_topic_analysis, candidate_topic_analysis)
            ):
                return Decision(False, 0.0, "context")
            veto = structural_veto(analyze(query_question), analyze(candidate_question))
            if veto is not None:
                return Decision(False, 0.0, veto)
        a, b = analyze(query), analyze(candidate)
        veto = structural_veto(a, b, parts_checked=bool(query_topic))
        if veto is not None:
            return Decision(False, 0.0, veto)
        head = self.conversation if query_topic else self.question
        score = head.score(a, b, query_vector, candidate_vector)
        if score >= head.threshold(strictness):
            return Decision(True, score, None)
        return Decision(False, score, "score")
