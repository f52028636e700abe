"""Whether a cached question may answer a new one: the semantic cache's
verification stage. Pure policy, no I/O.

Embedding similarity ranks candidates but cannot decide: all-MiniLM scores
"Paris to London" vs "London to Paris", "2+2" vs "2+3" and "cancel" vs
"don't cancel" above many true paraphrases, so no similarity threshold
separates them. A candidate is therefore served only when

1. no structural check vetoes it. Each check looks for one kind of change
   that keeps almost every word but flips the answer, and vetoes only on
   evidence of a *replacement*, never on mere difference (a paraphrase is
   different words, and often says a little more or less): a number, date
   or unit replaced by another (an ordinal is no count); negation and
   polarity flipped; a name replaced by another in the same place (a name
   written otherwise, by its initials or a known short form, is the same
   name), or a term by another one letter away where neither is a known word
   (the tokenizer's and an English dictionary's: a typo makes a known word
   unknown); roles reversed around
   "from/to/than/...", or two spans of the same words exchanged ("dogs
   chase cats" vs "cats chase dogs"), a direction turned ("to Spanish" vs
   "from Spanish"), a subject traded with a pronoun ("Does my boss owe
   me" vs "Do I owe my boss"), a passive turned active in place ("Is X
   caused by Y" vs "Does X cause Y"), or whose thing did it to whom ("My
   dog bit someone" vs "Someone's dog bit me"), two events traded around
   "before" / "after", two numbers traded between what they count; a yes/no
   question's "must" against "should", "may" or "can" (a wh-question's
   against "may" or "can"); a scope word (only, all, first, except ...) added,
   dropped or swapped. What one side merely adds (a number, a name, "most")
   is no veto but a feature of the learned stage, which weighs it.
2. a learned verifier scores the pair at or above a threshold. It is a
   logistic regression over a few dozen features of the pair (``FEATURE_NAMES``:
   cosine, word, content-word, word-pair and character overlaps, length,
   what only one side has, what the checks saw without vetoing), trained by
   ``bench/train_cache_verifier.py`` on the train portion of the labelled
   development pairs. Its coefficients and the thresholds calibrated per
   false-hit bound are in ``verifier_model.json`` next to this module.

   There are two coefficient sets (``Head``s). A single question is scored
   by the ``question`` head, whose features add how *rare* the shared and
   one-sided words are (``RARITY_FEATURE_NAMES``): sharing "sourdough" says
   more than sharing "best". A multi-turn text (a question with its topic
   turn, ``conversation.py``) is scored by the ``conversation`` head, without
   them: a topic turn said in other words brings other rare words, and
   weighing them refused reworded conversations (0.69 served instead of 0.89
   on held-out scenarios, bench/README.md). Both are trained and calibrated
   on the same single-question pairs, so the conversation head is the
   verifier as it was before the rarity features.

The operator sets ``cache.max_false_hit_rate``; each head's threshold is the
one calibrated for the largest bound not above it, and ``expected_false_hit_rate``
is the larger of what those thresholds gave on the calibration portion (the share of
labelled non-duplicates reaching the verifier that it accepted; see the
training script for exactly what is counted). A reported wrong hit makes its
sub-partition stricter: each report moves one row further down the table,
and past its end nothing is served semantically there.

The package: ``_reading`` reads a question once into an ``Analysis`` (its
text as typed plainly, tokens, and what the checks look for), ``_checks``
holds the structural checks (``structural_veto`` runs them), ``_learned``
the features, the coefficient sets and the ``Verifier``. What the rest of the
cache service, the benches and the tests use is named here.
"""

from services.cache.verifier._checks import (
    code_veto,
    entity_veto,
    glyph_veto,
    greeting_times,
    modal_veto,
    mood_veto,
    negation_veto,
    number_veto,
    role_veto,
    scope_veto,
    structural_veto,
    subject_veto,
    tense_veto,
    time_frame_veto,
    topic_amount_veto,
    topic_condition_veto,
    topic_entity_veto,
    topic_unit_veto,
    voice_veto,
)
from services.cache.verifier._learned import (
    FEATURE_NAMES,
    HEAD_FEATURES,
    RARITY_FEATURE_NAMES,
    CalibrationRow,
    Decision,
    Head,
    Verifier,
    WordRarity,
    features,
)
from services.cache.verifier._reading import (
    CONTEXT_SEPARATOR,
    MODEL_PATH,
    NUMBER_WORDS,
    SIGNS,
    STOPWORDS,
    TIMES_OF_DAY,
    VETOES,
    Analysis,
    analyze,
    analyze_uncached,
    clear_analysis_memo,
    emotive,
    readable,
    singular,
    stem,
)

__all__ = [
    "Analysis",
    "CONTEXT_SEPARATOR",
    "CalibrationRow",
    "Decision",
    "FEATURE_NAMES",
    "HEAD_FEATURES",
    "Head",
    "MODEL_PATH",
    "NUMBER_WORDS",
    "RARITY_FEATURE_NAMES",
    "SIGNS",
    "STOPWORDS",
    "TIMES_OF_DAY",
    "VETOES",
    "Verifier",
    "WordRarity",
    "analyze",
    "analyze_uncached",
    "clear_analysis_memo",
    "code_veto",
    "emotive",
    "entity_veto",
    "features",
    "glyph_veto",
    "greeting_times",
    "modal_veto",
    "mood_veto",
    "negation_veto",
    "number_veto",
    "readable",
    "role_veto",
    "scope_veto",
    "singular",
    "stem",
    "structural_veto",
    "subject_veto",
    "tense_veto",
    "time_frame_veto",
    "topic_amount_veto",
    "topic_condition_veto",
    "topic_entity_veto",
    "topic_unit_veto",
    "voice_veto",
]
