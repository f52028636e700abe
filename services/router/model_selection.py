"""Which model answers a turn, for a model alias that selects among models.

An alias with a ``selection`` section (``models.<alias>.selection`` in
``meshgate/config.py``) names a fast and a strong model alias; each turn sent
to it goes to one of them, by these rules, in order:

1. the tenant's tier: a tier listed in ``strong_tiers`` always gets the
   strong model, one in ``fast_tiers`` the fast one (reason "tier");
2. cost: when the turn's worst-case cost on the strong model (prompt UTF-8
   bytes plus max_tokens at its prices, the bound admission reserves) is
   above ``max_strong_cost_usd``, the fast one (reason "cost_cap");
3. complexity: a logistic classifier over cheap features of the new user
   message and its all-MiniLM-L6-v2 embedding gives the probability that
   the prompt needs the strong model; at or above ``threshold`` the strong
   one, else the fast one (reason "complexity"). Without an embedding (the
   inference service did not answer in time) a second classifier over the
   features alone decides (reason "complexity_features_only"): a turn never
   fails because its model could not be chosen well. So does the second
   classifier for an embedding of another embedder (model and revision)
   than the first was trained on (``model_selector.json``'s ``embedder``):
   the first one's weights read that vector's coordinates as noise.

Both classifiers are trained by ``bench/train_model_selector.py``, which
writes ``model_selector.json`` beside this file; the features below are the
ones it trains on, so change them only together with a retraining.

Nothing here knows gRPC: the embedding arrives through a plain async
callable (``services/router/app.py`` wires it to the Embed of the
inference service that serves the choices).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import json
import math
import pathlib
import re

import numpy as np
import structlog

from meshgate.common.v1 import common_pb2
from meshgate.config import PriceSettings, SelectionSettings
from meshgate.embedding import Embedding, head_embedder
from services.router.admission import estimate_prompt_tokens

MODEL_PATH = pathlib.Path(__file__).with_name("model_selector.json")

log = structlog.get_logger(__name__)


class SelectionReason(enum.StrEnum):
    TIER = "tier"
    COST_CAP = "cost_cap"
    COMPLEXITY = "complexity"
    COMPLEXITY_FEATURES_ONLY = "complexity_features_only"


@dataclasses.dataclass(frozen=True)
class Selection:
    model: str
    reason: SelectionReason
    # The classifier's probability that the prompt needs the strong model;
    # 0 when a rule decided before the classifier was consulted.
    score: float = 0.0


# --- cheap features ------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z0-9_']+")
# A sentence ends at a run of . ! ? before a space or the end. The
# lookbehind starts the pattern only at a run's first mark: tried from
# every mark, a run before a letter was scanned again from each of its
# marks, quadratic (8k dots and a letter held the event loop 0.6 s).
_SENTENCE_END = re.compile(r"(?<![.!?])[.!?]+(?:\s|$)")
# Opening words of a question that usually has a short factual answer, and
# of requests that usually need reasoning or a long answer.
_FACTOID_OPENERS = frozenset(
    ["what", "who", "when", "where", "which", "is", "are", "was", "were", "does", "do", "did", "can"]
)
_TASK_VERBS = frozenset(
    [
        "write", "implement", "design", "explain", "compare", "analyze", "analyse", "debug",
        "optimize", "optimise", "prove", "derive", "plan", "refactor", "evaluate", "justify",
        "summarize", "summarise", "outline", "develop", "build", "create", "calculate", "solve",
        "estimate", "critique", "translate",
    ]
)  # fmt: skip
_WHY_HOW = frozenset({"why", "how"})
# Every pattern here runs on the router's event loop over text a caller
# sent (up to router.max_message_bytes), so each must take time linear in
# it: "\w+\.\w+\(" tried from every letter of a long word (2.2 s for 32k
# letters), and "^\s*" from every line start of a run of blank lines across
# all the lines after it (16.6 s for 32k newlines), freezing every tenant's
# calls. Hence the leading \b and the "^[ \t]*", which match what they did.
_CODE = re.compile(
    r"```|\bdef |\bclass |\bimport |\breturn\b|[{};]\s*$|\bfunction\b|\bSELECT\b|=>|\(\)|\b\w+\.\w+\(",
    re.MULTILINE,
)
_MATH = re.compile(
    r"[=^√∑∫≤≥]|\d\s*[-+*/]\s*\d|\b(?:prove|theorem|integral|derivative|equation|probability|"
    r"matrix|eigen\w*|polynomial|complexity|O\(n)\b",
    re.IGNORECASE,
)
_MULTI_STEP = re.compile(
    r"\b(?:step[- ]by[- ]step|steps?|first(?:ly)?|then|next|finally|afterwards|after that|"
    r"and also|as well as|in addition|followed by)\b|^[ \t]*(?:\d+[.)]|[-*•])\s",
    re.IGNORECASE | re.MULTILINE,
)
_CONSTRAINT = re.compile(
    r"\b(?:must|should|without|at least|at most|no more than|only|ensure|make sure|exactly|"
    r"within|under \d|limit(?:ed)? to|avoid|don't|do not|required?|constraints?)\b",
    re.IGNORECASE,
)

FEATURE_NAMES = (
    "log_chars",
    "log_words",
    "sentences",
    "question_marks",
    "lines",
    "mean_word_length",
    "digit_share",
    "factoid_opener",
    "why_how_opener",
    "task_verbs",
    "code_markers",
    "math_markers",
    "multi_step_markers",
    "constraints",
)


def prompt_text(messages: collections.abc.Sequence) -> str:
    """What is classified: the newest user message (the request itself;
    earlier turns say little about how hard this one is)."""
    for message in reversed(messages):
        if message.role == common_pb2.ROLE_USER:
            return message.content
    return ""


# The prompt's patterns are counted in its first this many characters: the
# scan is linear but still ~1 ms per 1,000 characters of the event loop,
# and a prompt that long is long enough for the length features to speak.
FEATURE_SCAN_CHARS = 8192


def features(text: str) -> np.ndarray:
    """The classifier's features of ``text``: lengths over all of it, the
    patterns over its first FEATURE_SCAN_CHARS characters."""
    length = len(text)
    text = text[:FEATURE_SCAN_CHARS]
    words = _WORD.findall(text)
    lowered = [w.lower() for w in words]
    first = lowered[0] if lowered else ""
    characters = max(1, len(text))
    return np.array(
        [
            math.log1p(length),
            math.log1p(len(words)),
            math.log1p(len(_SENTENCE_END.findall(text))),
            math.log1p(text.count("?")),
            math.log1p(text.count("\n")),
            sum(len(w) for w in words) / max(1, len(words)),
            sum(c.isdigit() for c in text) / characters,
            float(first in _FACTOID_OPENERS),
            float(first in _WHY_HOW),
            math.log1p(sum(w in _TASK_VERBS for w in lowered)),
            math.log1p(len(_CODE.findall(text))),
            math.log1p(len(_MATH.findall(text))),
            math.log1p(len(_MULTI_STEP.findall(text))),
            math.log1p(len(_CONSTRAINT.findall(text))),
        ],
        dtype=np.float64,
    )


# --- the classifier -------------------------------------------------------------


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


@dataclasses.dataclass(frozen=True)
class _Logistic:
    """p(hard) = sigmoid(w · standardized(x) + b)."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float

    @classmethod
    def from_json(cls, data: dict) -> _Logistic:
        return cls(
            np.array(data["mean"], dtype=np.float64),
            np.array(data["scale"], dtype=np.float64),
            np.array(data["weights"], dtype=np.float64),
            float(data["bias"]),
        )

    def probability(self, x: np.ndarray) -> float:
        return _sigmoid(float(((x - self.mean) / self.scale) @ self.weights) + self.bias)


class Classifier:
    """The trained pair: features with the embedding, and features alone.
    ``embedder`` (meshgate.embedding.embedder_name): whose vectors the first
    was trained on, the only ones it reads."""

    def __init__(
        self, with_embedding: _Logistic, features_only: _Logistic, dimensions: int, embedder: str
    ) -> None:
        self._with_embedding = with_embedding
        self._features_only = features_only
        self.dimensions = dimensions
        self.embedder = embedder
        # Embedders of vectors it was given and did not read, each warned
        # of once: a handful (a revision or two around an upgrade).
        self._other_embedders_seen: set[str] = set()

    @classmethod
    def load(cls, path: pathlib.Path = MODEL_PATH) -> Classifier:
        data = json.loads(path.read_text())
        if tuple(data["feature_names"]) != FEATURE_NAMES:
            raise ValueError(f"{path} was trained on other features; rerun bench/train_model_selector.py")
        return cls(
            _Logistic.from_json(data["with_embedding"]),
            _Logistic.from_json(data["features_only"]),
            int(data["embedding_dimensions"]),
            head_embedder(data),
        )

    def score(self, text: str, embedding: Embedding | None) -> tuple[float, bool]:
        """p(the prompt needs the strong model), and whether the embedding was used."""
        x = features(text)
        if embedding is not None and self._reads(embedding):
            return self._with_embedding.probability(np.concatenate([x, embedding.vector])), True
        return self._features_only.probability(x), False

    def _reads(self, embedding: Embedding) -> bool:
        """Whether the classifier with the embedding reads ``embedding``:
        one of its training embedder, of its size."""
        if embedding.embedder != self.embedder:
            if embedding.embedder not in self._other_embedders_seen:
                self._other_embedders_seen.add(embedding.embedder)
                log.warning(
                    "the model selector was trained on another embedder's vectors: choosing by text "
                    "features alone until it is retrained on them (bench/train_model_selector.py)",
                    selector_embedder=self.embedder,
                    vector_embedder=embedding.embedder,
                )
            return False
        return len(embedding.vector) == self.dimensions


# --- the rules --------------------------------------------------------------------

# (text, the model aliases whose inference services to ask, timeout) -> the
# text's vector and the embedder that made it, or None when none came in time.
Embed = collections.abc.Callable[[str, tuple[str, ...], float], collections.abc.Awaitable[Embedding | None]]


def strong_cost_bound_usd(prompt_bytes: int, max_tokens: int, price: PriceSettings | None) -> float:
    """The most a turn can cost on a model: the bound admission reserves
    (prompt UTF-8 bytes, at least its tokens, plus max_tokens)."""
    if price is None:
        return 0.0
    return (prompt_bytes * price.prompt_usd_per_million + max_tokens * price.completion_usd_per_million) / 1e6


class Selector:
    def __init__(self, embed: Embed, classifier: Classifier | None = None) -> None:
        self._embed = embed
        self._classifier = classifier or Classifier.load()

    async def select(
        self,
        rules: SelectionSettings,
        tier: str,
        messages: collections.abc.Sequence,
        max_tokens: int,
        strong_price: PriceSettings | None,
        timeout_s: float,
        strong_template_bytes: int = 0,
    ) -> Selection:
        """The model for the turn, by the first rule that decides.
        ``strong_template_bytes``: what the strong model's chat template adds
        to the prompt (prompt_bound.PromptBound.template_bytes), so the cost
        cap judges the bound admission reserves for a stateless turn (a
        session turn's history is not known before the model is chosen)."""
        if tier and tier in rules.strong_tiers:
            return Selection(rules.strong, SelectionReason.TIER)
        if tier and tier in rules.fast_tiers:
            return Selection(rules.fast, SelectionReason.TIER)
        if rules.max_strong_cost_usd is not None:
            # Admission's own prompt bound, so the cap judges what it reserves.
            prompt_bytes = estimate_prompt_tokens(messages) + strong_template_bytes
            if strong_cost_bound_usd(prompt_bytes, max_tokens, strong_price) > rules.max_strong_cost_usd:
                return Selection(rules.fast, SelectionReason.COST_CAP)
        text = prompt_text(messages)
        try:
            timeout_s = min(timeout_s, rules.embedding_timeout_s)
            embedding = await self._embed(text, (rules.strong, rules.fast), timeout_s)
        except Exception:  # noqa: BLE001 - a better choice is not worth failing the turn
            log.exception("embedding for model selection failed; choosing on features alone")
            embedding = None
        score, used_embedding = self._classifier.score(text, embedding)
        reason = SelectionReason.COMPLEXITY if used_embedding else SelectionReason.COMPLEXITY_FEATURES_ONLY
        return Selection(rules.strong if score >= rules.threshold else rules.fast, reason, score)
