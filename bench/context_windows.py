"""Windowed turn embeddings for context assembly (issue 8): an offline experiment.

Many turns are short replies ("Yes, I love it!") whose meaning lives in the
turn before, so a turn's own embedding says little about what it answers.
This embeds each turn together with its neighbours as one text, through the
same minilm (the inference service's ``Embed``, which keeps the first 256
tokens), and re-scores the REALTALK questions with the service's pure policy
(``relevance.hybrid_scores`` + ``assembly.plan``, as ``context_bench.py
--offline`` does) with the dense signal taken from

* ``prev+cur``: the previous turn, a newline, the turn (known at append);
* ``cur+next``: the turn, a newline, the next one (known when the next arrives);
* ``prev+cur+next``: both neighbours;

alone or mixed with the turn's own vector. Mixed as vectors, each turn's
one stored row is ``(1 - mix) * own + mix * window`` (both unit), quantized
as the index stores a vector, so a mix costs no memory beyond today's 384 bytes a turn
(pseudo-relevance feedback then moves the question toward the same rows);
mixed as scores (two stored vectors a turn, :class:`TwoCosines`), the max of
the two cosines or a weighted sum.

    flock /tmp/bench.lock .venv/bin/python bench/context_windows.py   # embeds once (7 min), then 15 s

Prints, per configuration, the share of questions with every evidence turn
kept at each budget, on all ten conversations, the first six (by name, where
a choice is made) and the other four (held out), as differences from the
committed ranking (mix 0), and where the evidence turns rank by each
cosine alone. Development data only. Nothing here gained on both splits
(bench/README.md, "Windowed turn embeddings"): the service does not use it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys

import context_bench as bench
import numpy as np
import uvloop

from meshgate.common.v1 import common_pb2
from meshgate.config import Settings
from services.context import assembly, relevance

WINDOWS = ("prev+cur", "cur+next", "prev+cur+next")
MIXES = (0.0, 0.3, 0.5, 0.7, 1.0)
TUNING = 6  # the first six conversations by name, as context_bench --offline splits them


def window_texts(turns: list[common_pb2.Message], questions: list[dict]) -> list[str]:
    """Every turn's three windows, window by window (the questions are
    embedded by context_bench's own cache)."""
    contents = [m.content for m in turns]
    last = len(contents) - 1
    texts = []
    for window in WINDOWS:
        for i, content in enumerate(contents):
            parts = [content]
            if "prev" in window and i > 0:
                parts.insert(0, contents[i - 1])
            if "next" in window and i < last:
                parts.append(contents[i + 1])
            texts.append("\n".join(parts))
    return texts


def prepared(conversations, vectors, windows) -> dict[str, dict]:
    """Per conversation: costs, index, own and window unit rows, and per
    question its terms, vector, new-message cost, evidence and text (the
    service reads from it whether it is in the first person)."""
    counter = bench.token_counts.for_models(Settings().models)[bench.MODEL]
    out = {}
    for name, (turns, _, questions) in conversations.items():
        counts = asyncio.run(counter.count(turns))
        lines = asyncio.run(counter.count_lines(turns))
        costs = assembly.SessionCosts.of(
            [assembly.TurnCost(m.role, n, line) for m, n, line in zip(turns, counts, lines, strict=True)]
        )
        packed, lengths, turn_rows = bench.offline_index(turns, vectors[name])
        n = len(turns)
        by_window = {
            w: relevance.unit_rows(windows[name][k * n : (k + 1) * n]) for k, w in enumerate(WINDOWS)
        }
        items = []
        for q, vector in zip(questions, vectors[name][n:], strict=True):
            message = common_pb2.Message(role=common_pb2.ROLE_USER, content=q["question"])
            items.append(
                (
                    list(relevance.index_terms(q["question"])),
                    vector,
                    [assembly.TurnCost(message.role, asyncio.run(counter.count([message]))[0])],
                    q["evidence"],
                    q["question"],
                )
            )
        out[name] = {
            "costs": costs,
            "packed": packed,
            "lengths": lengths,
            "own": relevance.unit_rows(vectors[name][:n]),
            "turn rows": turn_rows,
            "windows": by_window,
            "questions": items,
            "template": counter.template_tokens,
            "transcript": counter.transcript_tokens,
        }
    return out


@dataclasses.dataclass(frozen=True)
class TwoCosines:
    """Stands in for the unit rows ``hybrid_scores`` takes when a turn keeps
    two vectors (its own and its window's: twice the memory) and its cosine
    is their max, or ``(1 - mix) * own + mix * window`` of the two cosines;
    pseudo-relevance feedback moves the question toward the own rows."""

    own: np.ndarray
    window: np.ndarray
    mix: float | None  # None: the max

    def __len__(self) -> int:
        return len(self.own)

    def __matmul__(self, query: np.ndarray) -> np.ndarray:
        own, window = self.own @ query, self.window @ query
        return np.maximum(own, window) if self.mix is None else (1 - self.mix) * own + self.mix * window

    def __getitem__(self, turns) -> np.ndarray:
        return self.own[turns]


def kept(
    conversation: dict, rows: np.ndarray, floor: int, weights: relevance.Weights = relevance.DEFAULT_WEIGHTS
) -> dict[int, tuple[int, int]]:
    """Per budget: (questions with all evidence kept, questions)."""
    result = {b: [0, 0] for b in bench.BUDGETS}
    for terms, vector, new, evidence, text in conversation["questions"]:
        ranked = relevance.hybrid_scores(
            terms,
            conversation["packed"],
            conversation["lengths"],
            rows,
            vector,
            weights,
            roles=conversation["costs"].roles,
            question=text,
        ).scores
        for budget in bench.BUDGETS:
            chosen = assembly.plan(
                conversation["costs"],
                new,
                budget,
                conversation["template"],
                relevance=ranked,
                recency_floor=floor,
                transcript_tokens=conversation["transcript"],
            )
            result[budget][0] += all(chosen.reasons[i] for i in evidence)
            result[budget][1] += 1
    return {b: (k, n) for b, (k, n) in result.items()}


def dense_ranks(data: dict[str, dict]) -> list[str]:
    """Where the evidence turns rank by the dense cosine alone (no BM25, no
    feedback, no neighbours, no stretches), as a share of their session:
    the median, and how many rank in the best 5%; apart for turns of at
    most 3 terms (the short replies windows are for) and the others."""
    places: dict[str, dict[str, list[float]]] = {}
    for conversation in data.values():
        n = len(conversation["own"])
        short = conversation["lengths"] <= 3
        for label, rows in (("own", conversation["turn rows"]), *conversation["windows"].items()):
            for _, vector, _, evidence, _ in conversation["questions"]:
                order = np.argsort(-(rows @ relevance.unit_rows(vector[None, :])[0]))
                rank = np.empty(n, np.int64)
                rank[order] = np.arange(n)
                for turn in evidence:
                    kind = "short" if short[turn] else "longer"
                    places.setdefault(label, {"short": [], "longer": []})[kind].append(rank[turn] / n)
    lines = []
    for label, kinds in places.items():
        cells = ", ".join(
            f"{kind} ({len(p)}): median {100 * float(np.median(p)):.1f}%,"
            f" best 5% {100 * float(np.mean(np.array(p) < 0.05)):.1f}%"
            for kind, p in kinds.items()
        )
        lines.append(f"evidence turns by the {label} cosine alone: {cells}")
    return lines


def main() -> None:
    paths = sorted(bench.DATA.glob("*.json"))
    conversations = {p.stem: bench.load_conversation(p) for p in paths}
    vectors = uvloop.run(bench.cached_vectors(conversations))
    windows = uvloop.run(bench.cached_vectors(conversations, "realtalk_window_vectors.npz", window_texts))
    data = prepared(conversations, vectors, windows)
    names = sorted(data)
    floor = Settings().context.recency_floor_turns
    splits = {"all ten": names, "six": names[:TUNING], "four": names[TUNING:]}
    baseline = {n: kept(data[n], data[n]["turn rows"], floor) for n in names}

    def shares(per_name) -> dict[str, list[float]]:
        return {
            split: [
                100 * sum(per_name[n][b][0] for n in part) / sum(per_name[n][b][1] for n in part)
                for b in bench.BUDGETS
            ]
            for split, part in splits.items()
        }

    print("\n".join(dense_ranks(data)))
    base = shares(baseline)
    print("budgets " + " / ".join(str(b) for b in bench.BUDGETS))
    for split, values in base.items():
        print(f"committed ranking, {split}: " + " / ".join(f"{v:.1f}" for v in values))

    def stored(n: str, window: str, mix: float, short: int | None = None) -> np.ndarray:
        """The rows the index would hold: the mix for every turn, or only
        for turns of at most ``short`` terms (the others their own)."""
        share = np.full(len(data[n]["own"]), mix, np.float32)
        if short is not None:
            share[data[n]["lengths"] > short] = 0.0
        mixed = (1 - share[:, None]) * data[n]["own"] + share[:, None] * data[n]["windows"][window]
        return relevance.unit_rows(relevance.quantize(mixed))

    configurations = [
        (f"{window} mix {mix}", lambda n, w=window, m=mix: stored(n, w, m), relevance.DEFAULT_WEIGHTS)
        for window in WINDOWS
        for mix in MIXES[1:]
    ]
    # The premise is short replies: only turns of few terms take the window.
    configurations += [
        (
            f"{window} mix {mix}, turns of <= {short} terms",
            lambda n, w=window, m=mix, t=short: stored(n, w, m, t),
            relevance.DEFAULT_WEIGHTS,
        )
        for window in ("prev+cur", "prev+cur+next")
        for short in (3, 6)
        for mix in (0.5, 1.0)
    ]
    # The window may stand in for the neighbour share (a turn inheriting its neighbour's score).
    configurations += [
        (
            f"prev+cur+next mix {mix}, no neighbour share",
            lambda n, m=mix: stored(n, "prev+cur+next", m),
            dataclasses.replace(relevance.DEFAULT_WEIGHTS, neighbour=0.0),
        )
        for mix in (0.3, 0.5)
    ]
    # Two vectors a turn, the cosines combined.
    configurations += [
        (
            f"{window} {'max' if mix is None else f'cosines mixed {mix}'}",
            lambda n, w=window, m=mix: TwoCosines(data[n]["turn rows"], data[n]["windows"][w], m),
            relevance.DEFAULT_WEIGHTS,
        )
        for window in WINDOWS
        for mix in (None, *MIXES[1:-1])
    ]
    for label, rows_of, weights in configurations:
        per_name = {n: kept(data[n], rows_of(n), floor, weights) for n in names}
        got = shares(per_name)
        cells = "; ".join(
            f"{split} " + " / ".join(f"{g - b:+.1f}" for g, b in zip(got[split], base[split], strict=True))
            for split in splits
        )
        print(f"{label}: {cells}", flush=True)
    print(f"{len(configurations)} configurations", file=sys.stderr)


if __name__ == "__main__":
    main()
