"""Whether a cached question may answer a new one: the semantic cache's
verification stage. Pure policy, no I/O.

Embedding similarity ranks candidates but cannot decide: all-MiniLM scores
"Paris to London" vs "London to Paris", "2+2" vs "2+3" and "cancel" vs
"don't cancel" above many true paraphrases, so no similarity threshold
separates them. A candidate is therefore served only when

1. no structural check vetoes it. Each check looks for one kind of change
   that keeps almost every word but flips the answer, and vetoes only on
   evidence of that change, never on mere difference (a paraphrase is
   different words): numbers, quantities, dates and units; negation and
   polarity; named entities replaced by others; roles reversed around
   "from/to/than/..."; scope words (only, all, first, except ...).
   A false veto costs one generation; a false hit serves a wrong answer, so
   the checks lean strict.
2. a learned verifier scores the pair at or above a threshold. It is a
   logistic regression over features of both questions and of their match
   (cosine, word and character overlaps, length ratio, words only one side
   has, and the elementwise product and difference of the two embeddings,
   as in siamese sentence classifiers), trained by
   ``bench/train_cache_verifier.py`` on the train portion of the
   development pairs. Its coefficients and the thresholds calibrated per
   false-hit bound are in ``verifier_model.json`` next to this module.

The operator sets ``cache.max_false_hit_rate``; the threshold is the one
calibrated for the largest bound not above it, so the expected false-hit
rate (measured on the calibration portion, all entries in one partition)
never exceeds the setting. A reported wrong hit makes its sub-partition
stricter: each report moves one row further down the table, and past its
end nothing is served semantically there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import re
from collections import Counter

import numpy as np

MODEL_PATH = pathlib.Path(__file__).with_name("verifier_model.json")


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[A-Za-z]+(?:'[A-Za-z]+)?|[$%+*/=<>-]")

# Function words carry no topic: they are left out of "words only one side
# has" and of what counts as the object of a role marker.
STOPWORDS = _words(
    """a an the of in on at for to from by with about as into onto over under than then and or but if
    is are was were be been being am do does did done have has had having can could should would will
    shall may might must i me my mine we us our you your he him his she her it its they them their one
    ones what which who whom whose when where why how that this these those there here so such very
    just also too get got some any much many way ways thing things really"""
)

NUMBER_WORDS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
    "hundred": 100,
    "thousand": 1000,
    "million": 10**6,
    "billion": 10**9,
    "half": 0.5,
    "twice": 2,
    "double": 2,
}
# "one" is mostly a pronoun ("how can one ..."), not a count.
NUMBER_WORDS.pop("one")
# Dates: a changed month or weekday is a changed date.
CALENDAR_WORDS = _words(
    """january february march april june july august september october november december
    monday tuesday wednesday thursday friday saturday sunday"""
)
# Singular forms; a trailing "s" is dropped before the lookup.
UNIT_WORDS = _words(
    """km kilometer kilometre mile meter metre cm mm foot feet inch yard kg kilogram gram pound lb lbs
    ounce oz ton tonne liter litre ml gallon celsius fahrenheit kelvin degree second minute hour day week
    month year decade century dollar usd euro eur rupee rs inr pound yen yuan bitcoin percent % gb mb tb
    kb ghz mhz mph kmph kmh calorie kcal watt kw kwh volt amp mg"""
)

NEGATIONS = _words("not no never none nobody nothing neither nor without cannot")
# Words whose swap for the other reverses the question (antonyms that a
# prefix does not give away).
ANTONYMS = {
    frozenset(p)
    for p in [
        ("good", "bad"),
        ("best", "worst"),
        ("better", "worse"),
        ("increase", "decrease"),
        ("more", "less"),
        ("pros", "cons"),
        ("start", "stop"),
        ("buy", "sell"),
        ("win", "lose"),
        ("safe", "dangerous"),
        ("enable", "disable"),
        ("positive", "negative"),
        ("high", "low"),
        ("higher", "lower"),
        ("cheap", "expensive"),
        ("love", "hate"),
        ("easy", "hard"),
        ("gain", "lose"),
        ("true", "false"),
        ("before", "after"),
        ("open", "close"),
        ("add", "remove"),
        ("accept", "reject"),
        ("allow", "block"),
        ("rich", "poor"),
        ("fast", "slow"),
        ("always", "sometimes"),
    ]
}
_ANTONYM_OF = {w: next(iter(pair - {w})) for pair in ANTONYMS for w in pair}
_NEGATING_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non")

# Words after which the next content word fills a role: swapping the fillers
# of the same markers reverses who does what to whom, where from and to.
ROLE_MARKERS = _words("from to into than vs versus over against beat beats defeat defeated")
# Words that narrow or widen what is asked. "some" and "any" are left out:
# questions use them as filler ("what are some good books").
SCOPE_WORDS = _words(
    """only all every each except excluding first last both either none always sometimes most least
    earliest latest entire whole single sole solely exclusively alone"""
)
# Capitalized words that are not names.
_NOT_NAMES = _words("i what which who whom whose when where why how is are do does can should")

VETOES = ("number", "negation", "entity", "role", "scope")


@dataclasses.dataclass(frozen=True, slots=True)
class Analysis:
    """What the checks and features need of one question, computed once."""

    tokens: tuple[str, ...]  # lowercased
    token_set: frozenset[str]
    content: frozenset[str]  # tokens that are not stopwords, plural "s" dropped
    numbers: frozenset[str]  # with calendar words
    units: frozenset[str]
    negations: int
    names: frozenset[str]  # lowercased capitalized words not starting a sentence
    roles: tuple[tuple[str, str], ...]  # (marker, next content word)
    scope: frozenset[str]
    trigrams: frozenset[str]


def _singular(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


@functools.lru_cache(maxsize=65_536)
def analyze(text: str) -> Analysis:
    raw = _TOKEN.findall(text)
    # "don't" -> "do" + "not", "can't" -> "can" + "not": one negation either way.
    tokens: list[str] = []
    for word in raw:
        lower = word.lower()
        if lower.endswith("'s"):
            lower = lower[:-2]  # "Clinton's policy" names Clinton
        if lower.endswith("n't"):
            tokens.extend((lower[:-3] or "not", "not"))
        elif lower in ("cannot",):
            tokens.extend(("can", "not"))
        else:
            tokens.append(lower)
    numbers = []
    units = set()
    for token in tokens:
        if token[0].isdigit():
            numbers.append(token.replace(",", ""))
        elif token in NUMBER_WORDS:
            numbers.append(f"{NUMBER_WORDS[token]:g}")
        elif token in CALENDAR_WORDS:
            numbers.append(token)
        elif _singular(token) in UNIT_WORDS or token in UNIT_WORDS:
            units.add(_singular(token))
    # "... or not?" asks the same yes/no question as without it.
    negations = sum(1 for t in tokens if t in NEGATIONS) - len(re.findall(r"\bor not\b", text, re.IGNORECASE))
    names = set()
    sentence_start = True
    for word in raw:
        name = word.lower().removesuffix("'s")
        if word[:1].isupper() and not sentence_start and name not in _NOT_NAMES:
            names.add(name)
        elif (word.isupper() and len(word) > 1) and name not in _NOT_NAMES:
            names.add(name)  # acronyms, even first: "CBSE", "USA"
        sentence_start = False
    roles = []
    for i, token in enumerate(tokens):
        if token in ROLE_MARKERS:
            filler = next((t for t in tokens[i + 1 :] if t not in STOPWORDS), "")
            roles.append((token, filler))
    joined = " " + " ".join(tokens) + " "
    return Analysis(
        tokens=tuple(tokens),
        token_set=frozenset(tokens),
        content=frozenset(_singular(t) for t in tokens if t not in STOPWORDS and not t[0].isdigit()),
        numbers=frozenset(numbers),
        units=frozenset(units),
        negations=negations,
        names=frozenset(names),
        roles=tuple(roles),
        scope=frozenset(t for t in tokens if t in SCOPE_WORDS),
        trigrams=frozenset(joined[i : i + 3] for i in range(len(joined) - 2)),
    )


def number_veto(a: Analysis, b: Analysis) -> bool:
    """Different numbers, dates or units: "2+2" vs "2+3", "in 2014" vs "in
    2018", "in Celsius" vs "in Kelvin". Compared as sets, so order, repeats
    ("the 14th amendment ... of the 14th amendment") and spelling ("two" vs
    "2") do not matter."""
    return a.numbers != b.numbers or a.units != b.units


def _has_negated_form(words: frozenset[str], other: frozenset[str]) -> bool:
    for word in words:
        if word in _ANTONYM_OF and _ANTONYM_OF[word] in other and word not in other:
            return True
        for prefix in _NEGATING_PREFIXES:
            if word.startswith(prefix) and word[len(prefix) :] in other and word not in other:
                return True
    return False


def negation_veto(a: Analysis, b: Analysis) -> bool:
    """Opposite polarity: an odd difference in negations ("cancel" vs "don't
    cancel"; "can't" and "not" count once, "never" too), an antonym in place
    of a word ("advantages" vs "disadvantages", "buy" vs "sell"). An even
    difference ("why can't I" vs "why am I not unable") keeps the sense."""
    if (a.negations - b.negations) % 2:
        return True
    return _has_negated_form(a.token_set, b.token_set) or _has_negated_form(b.token_set, a.token_set)


def entity_veto(a: Analysis, b: Analysis) -> bool:
    """A name replaced by another ("capital of France" vs "of Germany"): each
    side names something the other does not mention at all. One side naming
    more ("Trump" vs "Donald Trump") is no evidence of a swap and is left to
    the learned verifier."""
    return bool(a.names - b.token_set) and bool(b.names - a.token_set)


def role_veto(a: Analysis, b: Analysis) -> bool:
    """Reversed roles: the same words fill a role marker's slot in a different
    order ("from Paris to London" vs "from London to Paris", "Python faster
    than Java" vs "Java faster than Python"). Only fillers both questions
    contain count, so a paraphrase with another word after "to" passes."""
    for marker in {m for m, _ in a.roles} & {m for m, _ in b.roles}:
        fillers_a = Counter(f for m, f in a.roles if m == marker)
        fillers_b = Counter(f for m, f in b.roles if m == marker)
        only_a, only_b = set(fillers_a - fillers_b), set(fillers_b - fillers_a)
        # A swap moves a word out of one slot and another in; one side
        # merely filling one more slot ("way to get to Paris") is no swap.
        changed = only_a | only_b
        if only_a and only_b and all(f in a.token_set and f in b.token_set for f in changed):
            return True
    return False


def scope_veto(a: Analysis, b: Analysis) -> bool:
    """A scope word on one side only: "all planets" vs "only the rocky
    planets", "first president" vs "last president"."""
    return a.scope != b.scope


_CHECKS = (
    ("number", number_veto),
    ("negation", negation_veto),
    ("entity", entity_veto),
    ("role", role_veto),
    ("scope", scope_veto),
)


def structural_veto(a: Analysis, b: Analysis) -> str | None:
    """The name of the first check that vetoes the pair, or None."""
    for name, check in _CHECKS:
        if check(a, b):
            return name
    return None


def _jaccard(x: frozenset, y: frozenset) -> float:
    union = len(x | y)
    return len(x & y) / union if union else 1.0


# The handcrafted features, in order; the embedding features follow them.
FEATURE_NAMES = (
    "cosine",
    "cosine_squared",
    "token_jaccard",
    "content_jaccard",
    "trigram_jaccard",
    "length_ratio",
    "content_only_in_query",
    "content_only_in_candidate",
    "same_first_word",
    "names_only_on_one_side",
    "negation_difference",
)


def features(
    query: Analysis, candidate: Analysis, query_vector: np.ndarray, candidate_vector: np.ndarray
) -> np.ndarray:
    cosine = float(query_vector @ candidate_vector)
    lengths = len(query.tokens), len(candidate.tokens)
    handcrafted = np.array(
        [
            cosine,
            cosine * cosine,
            _jaccard(query.token_set, candidate.token_set),
            _jaccard(query.content, candidate.content),
            _jaccard(query.trigrams, candidate.trigrams),
            min(lengths) / max(max(lengths), 1),
            len(query.content - candidate.content),
            len(candidate.content - query.content),
            float(query.tokens[:1] == candidate.tokens[:1]),
            len((query.names - candidate.token_set) | (candidate.names - query.token_set)),
            abs(query.negations - candidate.negations),
        ],
        np.float32,
    )
    return np.concatenate(
        [handcrafted, query_vector * candidate_vector, np.abs(query_vector - candidate_vector)]
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    accepted: bool
    # Probability-like score of the learned verifier; 0.0 when vetoed.
    score: float
    # The structural check that vetoed, or "score" when the score was too low.
    rejected_by: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class CalibrationRow:
    max_false_hit_rate: float
    threshold: float
    # The false-hit rate the threshold gave on the calibration portion.
    expected_false_hit_rate: float


class Verifier:
    def __init__(
        self,
        mean: np.ndarray,
        scale: np.ndarray,
        weights: np.ndarray,
        bias: float,
        calibration: list[CalibrationRow],
        max_false_hit_rate: float,
    ) -> None:
        self._mean = mean.astype(np.float32)
        self._weights = (weights / scale).astype(np.float32)
        # Standardization folded into the weights: one dot product per pair.
        self._bias = float(bias - (mean / scale) @ weights)
        # Loosest first: each reported wrong hit moves one row down.
        self._table = sorted(calibration, key=lambda r: -r.max_false_hit_rate)
        allowed = [i for i, r in enumerate(self._table) if r.max_false_hit_rate <= max_false_hit_rate]
        if not allowed:
            raise ValueError(
                f"cache.max_false_hit_rate {max_false_hit_rate} is below the strictest calibrated bound "
                f"{self._table[-1].max_false_hit_rate}"
            )
        self._start = allowed[0]

    @classmethod
    def load(cls, max_false_hit_rate: float, path: pathlib.Path = MODEL_PATH) -> Verifier:
        model = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            np.array(model["mean"], np.float64),
            np.array(model["scale"], np.float64),
            np.array(model["weights"], np.float64),
            model["bias"],
            [CalibrationRow(**row) for row in model["calibration"]],
            max_false_hit_rate,
        )

    @property
    def dimensions(self) -> int:
        return (len(self._weights) - len(FEATURE_NAMES)) // 2

    @property
    def expected_false_hit_rate(self) -> float:
        return self._table[self._start].expected_false_hit_rate

    def threshold(self, strictness: int = 0) -> float:
        """The score a candidate needs after ``strictness`` reported wrong
        hits in its sub-partition; infinite past the strictest row."""
        row = self._start + max(0, strictness)
        return self._table[row].threshold if row < len(self._table) else math.inf

    def score(self, query: Analysis, candidate: Analysis, query_vector, candidate_vector) -> float:
        z = float(features(query, candidate, query_vector, candidate_vector) @ self._weights) + self._bias
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

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
        a, b = analyze(query), analyze(candidate)
        veto = structural_veto(a, b)
        if veto is not None:
            return Decision(False, 0.0, veto)
        score = self.score(a, b, query_vector, candidate_vector)
        if score >= self.threshold(strictness):
            return Decision(True, score, None)
        return Decision(False, score, "score")
