"""Four ranking ideas of another kind for context assembly (issue 8): an offline experiment.

Every idea in bench/README.md's context sections re-weighs signals the
service already has (one pooled minilm vector a turn, BM25, neighbours,
stretches). These four look at the text at another grain, or at the
conversation's structure:

1. **Late interaction** (ColBERT's MaxSim): minilm's token states before
   pooling; a turn scores the mean over the question's tokens of each one's
   best cosine with the turn's tokens. Alone, and as one more signal of the
   hybrid (scaled as the others are, before the stretches).
2. **Sentence vectors**: each sentence of a turn of two or more sentences
   embedded alone (pooled, as the service embeds turns); a turn scores the
   best of its sentences' cosines (its own where it has one sentence). Alone,
   and as one more signal of the hybrid.
3. **Two stages by day**: the conversation's days (the data's sessions; the
   service's ``Message`` carries no time, so it would need one at append)
   ranked by their best turns under the service's score; the turns of the
   top days gain a lift on top of it.
4. **Multi-hop decomposition without a model**: the question split at
   "and" / commas / "both" / "also" into sub-queries (two ways, below), each
   scored by the service's hybrid, the lists interleaved round-robin so that
   each hop gets its best turns in.

Scores with the service's pure policy (``relevance.hybrid_scores``,
``assembly.plan``, packed, the recency floor) over the vectors that
``context_bench.py --offline`` caches, as ``context_misses.py --ideas`` does,
plus what this script computes in process with ``meshgate.minilm`` (the code
Triton's minilm runs) and caches under bench/.cache/ by the texts' digest.
Prints, per idea and setting, the share of questions whose evidence is all
kept at 1k / 2k / 4k / 8k on the first six conversations (the tuning split)
and the other four (held out), and the differences from the service, then
the memory and scoring time late interaction and sentence vectors would cost.

    flock /tmp/bench.lock .venv/bin/python bench/context_token_ideas.py   # embeds once (110 s), then cached

Development data only; nothing here is in the service (bench/README.md,
"Token, sentence, day and sub-query rankings").
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import statistics
import time

import context_bench as bench  # first: sets the BLAS thread count before numpy loads
import context_misses as misses
import numpy as np

from meshgate import minilm
from meshgate.minilm import DIMENSIONS, MiniLM
from services.context import relevance

BATCH = 32
# Turns of the 1,000+-turn sessions timed for scoring (a session of this size).
TIMED_TURNS = 1000


@functools.cache
def load_tokenizer():
    """minilm's tokenizer, read once (offsets and special-token marks per token)."""
    return minilm.load_tokenizer()


# --- texts embedded in process ------------------------------------------------


def _digest(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:16]


def _by_length(model_tokens, texts: list[str]) -> list[int]:
    # Batches of like lengths pad little.
    return sorted(range(len(texts)), key=lambda i: len(model_tokens.encode(texts[i]).ids))


def token_rows(model: MiniLM, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every text's unit token states ([CLS] and [SEP] included, padding
    not), float16, one after another, and where each text's rows start
    (``len(texts) + 1`` offsets)."""
    tokenizer = load_tokenizer()
    order = _by_length(tokenizer, texts)
    per_text: list[np.ndarray] = [np.zeros((0, DIMENSIONS), np.float16)] * len(texts)
    for start in range(0, len(order), BATCH):
        batch = order[start : start + BATCH]
        hidden, mask = model.token_states([texts[i] for i in batch])
        for row, i in enumerate(batch):
            states = hidden[row][mask[row] > 0]
            states /= np.maximum(np.linalg.norm(states, axis=1, keepdims=True), 1e-12)
            per_text[i] = states.astype(np.float16)
    offsets = np.concatenate(([0], np.cumsum([len(p) for p in per_text])))
    return np.concatenate(per_text), offsets


def cached(name: str, texts: list[str], make) -> dict[str, np.ndarray]:
    path = bench.CACHE / f"{name}-{_digest(texts)}.npz"
    if path.exists():
        return dict(np.load(path))
    made = make(texts)
    bench.CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **made)
    return made


# --- 1. late interaction -------------------------------------------------------


_WORDPIECE_WORD = re.compile(r"[a-z0-9]")


def query_token_mask(question: str, keep: str) -> np.ndarray:
    """Which of the question's token rows take part in MaxSim: ``all`` (the
    specials too, as ColBERT), ``words`` (no [CLS], [SEP] or punctuation) or
    ``content`` (words, less stop words and the capitalized words after the
    first, which are mostly the people's names the service already drops)."""
    encoding = load_tokenizer().encode(question)
    words = re.finditer(r"\S+", question)
    spans = [(m.start(), m.end(), m.group()) for m in words]
    mask = []
    for token, special, (start, _) in zip(
        encoding.tokens, encoding.special_tokens_mask, encoding.offsets, strict=True
    ):
        if keep == "all":
            mask.append(True)
            continue
        if special or not _WORDPIECE_WORD.search(token):
            mask.append(False)
            continue
        if keep == "words":
            mask.append(True)
            continue
        at = next((k for k, (s, e, _) in enumerate(spans) if s <= start < e), None)
        word = spans[at][2] if at is not None else ""
        bare = re.sub(r"[^\w']", "", word)
        first = at == 0
        stop = (
            bare.lower() in relevance.STOP_WORDS
            or re.sub(r"['’]s$", "", bare.lower()) in relevance.STOP_WORDS
        )
        name = bare[:1].isupper() and not first
        mask.append(not stop and not name)
    mask = np.array(mask, dtype=bool)
    # A question of names and stop words only keeps its words.
    return mask if mask.any() else query_token_mask(question, "words")


def maxsim(query_rows: np.ndarray, turn_rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per turn: the mean over the query's rows of each one's best cosine
    with the turn's rows (every turn has [CLS] and [SEP], so none is empty)."""
    similarity = query_rows @ turn_rows.T
    return np.maximum.reduceat(similarity, offsets[:-1], axis=1).mean(axis=0)


def int8_rows(rows: np.ndarray) -> np.ndarray:
    """The rows as the index would store them in int8 (one byte a
    dimension, each row scaled to 127), read back as unit float32."""
    return relevance.unit_rows(relevance.quantize(rows.astype(np.float32)))


# --- 2. sentence vectors -----------------------------------------------------------


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    """A turn's sentences with a word in them; one (the turn) when it has fewer than two."""
    found = [s for s in _SENTENCE_END.split(text.strip()) if re.search(r"\w", s)]
    return found if len(found) >= 2 else []


def best_sentence(query: np.ndarray, own: np.ndarray, rows: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """Per turn: the best cosine of its sentences, or its own where it has none."""
    best = own.copy()
    if len(rows):
        cosines = rows @ query
        best[:] = -np.inf
        np.maximum.at(best, owners, cosines)
        best = np.where(np.isfinite(best), best, own)
    return best


# --- 4. sub-queries -------------------------------------------------------------------


_SPLIT = re.compile(r",|\band\b|\bboth\b|\balso\b", re.IGNORECASE)
# "A and B", "A, B and C", "A, B, and C": single words joined.
_COORDINATION = re.compile(r"\b(\w+(?:, \w+)*),? and (\w+)\b")


def split_at_joins(question: str) -> list[str]:
    """The question cut at "and", commas, "both", "also"; pieces with no
    index term (no content word) are dropped. Fewer than two: none."""
    pieces = [p.strip(" ?") for p in _SPLIT.split(question)]
    pieces = [p for p in pieces if relevance.index_terms(p)]
    return pieces if len(pieces) >= 2 else []


def distributed(question: str) -> list[str]:
    """The question once per conjunct of its first "A and B" (or "A, B and
    C"), "both" dropped: "What ailments did Nicolas and Nebraas have?" ->
    "What ailments did Nicolas have?", "What ailments did Nebraas have?"."""
    match = _COORDINATION.search(question)
    if not match:
        return []
    conjuncts = [w.strip() for w in match.group(1).split(",")] + [match.group(2)]
    before, after = question[: match.start()], question[match.end() :]
    before = re.sub(r"\bboth\s+$", "", before, flags=re.IGNORECASE)
    return [re.sub(r"\s+", " ", f"{before}{c}{after}").strip() for c in conjuncts if c]


def round_robin(rankings: list[np.ndarray]) -> np.ndarray:
    """Scores (higher first) of the lists' turns interleaved: each list's
    best turn not yet taken, list after list."""
    count = len(rankings[0])
    orders = [np.lexsort((-np.arange(count), -r)) for r in rankings]
    taken = np.zeros(count, dtype=bool)
    score = np.zeros(count)
    place = 0
    cursors = [0] * len(orders)
    while place < count:
        for k, order in enumerate(orders):
            while cursors[k] < count and taken[order[cursors[k]]]:
                cursors[k] += 1
            if cursors[k] < count:
                turn = order[cursors[k]]
                taken[turn] = True
                score[turn] = count - place
                place += 1
    return score


# --- the experiment --------------------------------------------------------------------


@dataclasses.dataclass
class Extra:
    """What this script computes per conversation, beside misses.Conversation."""

    turn_rows: np.ndarray  # unit token rows, float32
    offsets: np.ndarray
    question_rows: list[np.ndarray]  # per question, unit token rows (all tokens)
    sentence_rows: np.ndarray  # unit pooled rows of the sentences of turns with 2+
    sentence_owner: np.ndarray  # the turn of each sentence row
    days: np.ndarray  # the data's session of each turn
    subqueries: dict[str, list[tuple[list[str], np.ndarray]]]  # per splitter, per question


def prepare(data: dict[str, misses.Conversation]) -> dict[str, Extra]:
    model = MiniLM(threads=2)
    raw = {p.stem: bench.load_conversation(p) for p in sorted(bench.DATA.glob("*.json"))}
    extras = {}
    for name, (turns, ids, questions) in raw.items():
        texts = [m.content for m in turns]
        asked = [q["question"] for q in questions]
        started = time.perf_counter()

        def tokens(t):
            rows, offsets = token_rows(model, t)
            return {"rows": rows, "offsets": offsets}

        turn_tokens = cached(f"realtalk_token_rows_{name}", texts, tokens)
        question_tokens = cached(f"realtalk_question_token_rows_{name}", asked, tokens)
        owner, split = [], []
        for i, text in enumerate(texts):
            for sentence in sentences(text):
                owner.append(i)
                split.append(sentence)
        sentence_vectors = cached(
            f"realtalk_sentence_vectors_{name}", split, lambda t: {"rows": _embed(model, t)}
        )["rows"]
        subqueries = {}
        for splitter in (split_at_joins, distributed):
            pieces = [splitter(q) for q in asked]
            flat = [p for ps in pieces for p in ps]
            vectors = cached(f"realtalk_subquery_vectors_{name}", flat, lambda t: {"rows": _embed(model, t)})[
                "rows"
            ]
            per_question, at = [], 0
            for ps in pieces:
                per_question.append((ps, vectors[at : at + len(ps)]))
                at += len(ps)
            subqueries[splitter.__name__] = per_question
        q_offsets = question_tokens["offsets"]
        extras[name] = Extra(
            turn_tokens["rows"].astype(np.float32),
            turn_tokens["offsets"],
            [
                question_tokens["rows"][q_offsets[i] : q_offsets[i + 1]].astype(np.float32)
                for i in range(len(asked))
            ],
            sentence_vectors.astype(np.float32),
            np.array(owner, dtype=np.int64),
            np.array([int(i.split(":")[0][1:]) for i in ids]),
            subqueries,
        )
        print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)
    return extras


def _embed(model: MiniLM, texts: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros((0, DIMENSIONS), np.float32)
    return np.vstack([model.embed(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)])


class Ideas:
    """Rankings of (conversation, question), as misses.kept_by_conversation takes them."""

    def __init__(self, data: dict[str, misses.Conversation], extras: dict[str, Extra]) -> None:
        self.extras = {id(data[n]): e for n, e in extras.items()}
        self.index = {id(c): {id(q): i for i, q in enumerate(c.questions)} for c in data.values()}
        self._maxsim: dict[tuple, np.ndarray] = {}
        self._int8: dict[int, np.ndarray] = {}

    def _of(self, c, q) -> tuple[Extra, int]:
        return self.extras[id(c)], self.index[id(c)][id(q)]

    def late(self, c, q, keep: str, int8: bool = False) -> np.ndarray:
        key = (id(c), id(q), keep, int8)
        if key not in self._maxsim:
            extra, i = self._of(c, q)
            rows = extra.turn_rows
            if int8:
                rows = self._int8.setdefault(id(c), int8_rows(rows))
            query = extra.question_rows[i][query_token_mask(q.text, keep)]
            self._maxsim[key] = maxsim(query, rows, extra.offsets)
        return self._maxsim[key]

    def sentence(self, c, q) -> np.ndarray:
        extra, _ = self._of(c, q)
        return best_sentence(q.vector, c.rows @ q.vector, extra.sentence_rows, extra.sentence_owner)

    def top_days(self, c, score: np.ndarray, days: int, by: str) -> np.ndarray:
        day_of = self.extras[id(c)].days
        values = {}
        for day in np.unique(day_of):
            mine = np.sort(score[day_of == day])[::-1]
            values[day] = mine[0] if by == "best" else mine[:3].mean()
        top = sorted(values, key=values.get, reverse=True)[:days]
        return np.isin(day_of, top)

    def subqueries(self, c, q, splitter: str) -> list[np.ndarray]:
        extra, i = self._of(c, q)
        pieces, vectors = extra.subqueries[splitter][i]
        return [
            relevance.hybrid_scores(
                list(relevance.index_terms(p)),
                c.postings,
                c.lengths,
                c.rows,
                v,
                relevance.DEFAULT_WEIGHTS,
                c.costs.roles,
                None,
                p,
            ).scores
            for p, v in zip(pieces, vectors, strict=True)
        ]


def idea_rankings(ideas: Ideas) -> list[tuple[str, str, object]]:
    service = misses.service_scores
    rows: list[tuple[str, str, object]] = [
        ("reference", "plain cosine alone (turn vector)", lambda c, q: c.rows @ q.vector),
    ]
    for keep in ("all", "words", "content"):
        rows.append(("1 late interaction", f"MaxSim alone, query tokens: {keep}", _bind(ideas.late, keep)))
    for keep in ("words", "content"):
        for weight in (0.3, 0.6, 1.0):
            rows.append(
                (
                    "1 late interaction",
                    f"hybrid + {weight} x MaxSim ({keep}) before stretches",
                    misses.spans_after(
                        lambda c, q, s, k=keep, w=weight: w * relevance.scaled(ideas.late(c, q, k))
                    ),
                )
            )
    rows.append(
        (
            "1 late interaction",
            "hybrid + 0.6 x MaxSim (content), int8 token rows",
            misses.spans_after(lambda c, q, s: 0.6 * relevance.scaled(ideas.late(c, q, "content", True))),
        )
    )
    rows.append(("2 sentence vectors", "best sentence alone (own where one sentence)", ideas.sentence))
    for weight in (0.3, 0.6, 1.0):
        rows.append(
            (
                "2 sentence vectors",
                f"hybrid + {weight} x best sentence before stretches",
                misses.spans_after(lambda c, q, s, w=weight: w * relevance.scaled(ideas.sentence(c, q))),
            )
        )
    for by in ("best", "top-3 mean"):
        for days in (1, 2, 3):
            for lift in (0.3, 1.0):
                rows.append(
                    (
                        "3 two stages by day",
                        f"top {days} day(s) by {by} turn(s), +{lift}",
                        lambda c, q, d=days, b=by, lift=lift: _lifted(ideas, c, q, service(c, q), d, b, lift),
                    )
                )
    for splitter in ("split_at_joins", "distributed"):
        for with_question in (True, False):
            label = "question + sub-queries" if with_question else "sub-queries only"
            rows.append(
                (
                    "4 decomposition",
                    f"{splitter}: round-robin, {label}",
                    lambda c, q, sp=splitter, wq=with_question: _interleaved(ideas, c, q, sp, wq),
                )
            )
    return rows


def _bind(method, keep):
    return lambda c, q: method(c, q, keep)


def _lifted(ideas: Ideas, c, q, score: np.ndarray, days: int, by: str, lift: float) -> np.ndarray:
    return score + lift * ideas.top_days(c, score, days, by)


def _interleaved(ideas: Ideas, c, q, splitter: str, with_question: bool) -> np.ndarray:
    parts = ideas.subqueries(c, q, splitter)
    score = misses.service_scores(c, q)
    if not parts:
        return score
    return round_robin(([score] if with_question else []) + parts)


def shares(kept, names) -> list[float]:
    return misses.shares(kept, names)


def table(data, rankings) -> None:
    """Prints each idea's row as it is scored (a run takes minutes)."""
    names = sorted(data)
    six, four = names[: misses.TUNING], names[misses.TUNING :]
    base = misses.kept_by_conversation(data, misses.service_scores)
    fmt = lambda values: " / ".join(f"{v:.1f}" for v in values)  # noqa: E731
    diff = lambda a, b: " / ".join(f"{x - y:+.1f}" for x, y in zip(a, b, strict=True))  # noqa: E731
    print("| idea | setting | six 1k / 2k / 4k / 8k | four | six, change | four, change |")
    print("|---|---|---|---|---|---|")
    print(
        f"| service | hybrid-spans (the default) | {fmt(shares(base, six))}"
        f" | {fmt(shares(base, four))} | | |",
        flush=True,
    )
    for idea, setting, rank in rankings:
        kept = misses.kept_by_conversation(data, rank)
        s, f = shares(kept, six), shares(kept, four)
        print(
            f"| {idea} | {setting} | {fmt(s)} | {fmt(f)}"
            f" | {diff(s, shares(base, six))} | {diff(f, shares(base, four))} |",
            flush=True,
        )


def costs(data, extras) -> list[str]:
    """Memory a stored turn would need, and scoring time over the first
    TIMED_TURNS turns of the 1,000+-turn sessions, beside the hybrid's."""
    tokens = np.concatenate([np.diff(e.offsets) for e in extras.values()])
    sentence_count = sum(len(e.sentence_owner) for e in extras.values())
    turn_count = len(tokens)
    hybrid, late, late_int8, sentence = [], [], [], []
    for name, c in data.items():
        extra = extras[name]
        if len(c.costs.roles) < TIMED_TURNS:
            continue
        end = extra.offsets[TIMED_TURNS]
        rows = extra.turn_rows[:end]
        rows8 = int8_rows(rows)
        offsets = extra.offsets[: TIMED_TURNS + 1]
        postings = {
            t: p[(p >> relevance.TF_BITS) < TIMED_TURNS]
            for t, p in c.postings.items()
            if ((p >> relevance.TF_BITS) < TIMED_TURNS).any()
        }
        unit = c.rows[:TIMED_TURNS]
        in_first = extra.sentence_owner < TIMED_TURNS
        s_rows, s_owner = extra.sentence_rows[in_first], extra.sentence_owner[in_first]
        for i, q in enumerate(c.questions):
            query = extra.question_rows[i][query_token_mask(q.text, "content")]
            t0 = time.perf_counter()
            relevance.hybrid_scores(
                q.terms, postings, c.lengths[:TIMED_TURNS], unit, q.vector, roles=c.costs.roles[:TIMED_TURNS]
            )
            t1 = time.perf_counter()
            maxsim(query, rows, offsets)
            t2 = time.perf_counter()
            maxsim(query, rows8, offsets)
            t3 = time.perf_counter()
            best_sentence(q.vector, unit @ q.vector, s_rows, s_owner)
            t4 = time.perf_counter()
            hybrid.append(t1 - t0)
            late.append(t2 - t1)
            late_int8.append(t3 - t2)
            sentence.append(t4 - t3)

    def ms(values):
        return (
            f"p50 {1000 * statistics.median(values):.2f} ms / p99 {1000 * np.percentile(values, 99):.2f} ms"
        )

    return [
        f"Token rows a turn: mean {tokens.mean():.1f} ([CLS] and [SEP] included), median"
        f" {np.median(tokens):.0f}, p99 {np.percentile(tokens, 99):.0f}: late interaction would store"
        f" {tokens.mean() * DIMENSIONS:.0f} B a turn in int8, {2 * tokens.mean() * DIMENSIONS:.0f} B in fp16"
        f" (today's one pooled row: {DIMENSIONS} B); a 1,000-turn session's rows as float32 in the hot"
        f" cache: {tokens.mean() * 1000 * DIMENSIONS * 4 / 2**20:.0f} MiB.",
        f"Sentence rows: {sentence_count} for {turn_count} turns"
        f" ({sentence_count / turn_count:.2f} a turn, turns of 2+ sentences only):"
        f" {sentence_count / turn_count * DIMENSIONS:.0f} B a turn more in int8.",
        f"Scoring one question over {TIMED_TURNS} turns ({len(hybrid)} questions of the 1,000+-turn"
        f" sessions, interleaved, one BLAS thread, a shared 2-core machine): hybrid {ms(hybrid)};"
        f" MaxSim float32 {ms(late)} ({statistics.median(late) / statistics.median(hybrid):.1f}x the"
        f" hybrid at p50); MaxSim over int8-read rows {ms(late_int8)}; best sentence {ms(sentence)}"
        f" ({statistics.median(sentence) / statistics.median(hybrid):.2f}x).",
    ]


def main() -> None:
    data = misses.prepared()
    extras = prepare(data)
    ideas = Ideas(data, extras)
    split_counts = {
        s: sum(bool(e.subqueries[s][i][0]) for e in extras.values() for i in range(len(e.question_rows)))
        for s in ("split_at_joins", "distributed")
    }
    questions = sum(len(c.questions) for c in data.values())
    print(
        f"{questions} questions; split into sub-queries: "
        + ", ".join(f"{s} {n}" for s, n in split_counts.items())
        + "\n",
        flush=True,
    )
    table(data, idea_rankings(ideas))
    print()
    print("\n".join(costs(data, extras)))


if __name__ == "__main__":
    main()
