"""The labelled prompts of the router's model selector: easy (the fast model
will do) and hard (the strong model is needed), split into train and test
by a fixed hash, and their embeddings.

How the labels are made (by source, not by reading each prompt):

- easy: Quora questions, ``question1`` of ``qqp_val.csv``
  (``../shared/data/semantic-pairs``): one-line questions people ask a
  search box, most with a short factual or opinion answer. Noisy: a few
  ("How do I learn machine learning?") would deserve the strong model.
- hard: the user messages of the BEAM chats (``../shared/data/long-conversations/beam-100k``,
  every ``chat.json``, the ``->-> n,m`` turn markers stripped): multi-sentence
  requests to plan, build or debug projects, many with code, dates and
  constraints. Noisy too: a few are small talk inside a project.
- by hand, ``bench/data/model_selection_prompts.jsonl`` (committed): 40
  short but hard prompts (proofs, algorithms, debugging, design in one
  line) and 30 long but easy ones (a trivia question wrapped in chat), so
  that length and chattiness alone do not decide.

Both shared sets are for measurement only: they stay in ``../shared/data``
and only the weights learned from them are committed.

Up to ``PER_SOURCE`` prompts of each shared source are taken, in the order of
a hash of their text (no random draw); a prompt is in the test portion when
the same hash puts it in the last ``100 - TRAIN_BUCKETS`` of 100 buckets.
Embeddings are computed offline by ``meshgate.minilm.MiniLM``, the very
model, tokenizer (256 tokens) and pooling of the ``minilm`` Triton model
that the router's Embed call reaches, and kept in ``bench/.cache/``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re

import cache_data
import numpy as np

SHARED = cache_data.REPO_ROOT.parent / "shared" / "data"
QQP_CSV = SHARED / "semantic-pairs" / "qqp_val.csv"
BEAM_DIR = SHARED / "long-conversations" / "beam-100k"
HANDWRITTEN = cache_data.REPO_ROOT / "bench" / "data" / "model_selection_prompts.jsonl"
VECTORS_NPZ = cache_data.CACHE_DIR / "model_selection_vectors.npz"

PER_SOURCE = 1200
TRAIN_BUCKETS = 80
_TURN_MARKER = re.compile(r"\s*->->\s*\d+\s*,\s*\d+\s*$")


@dataclasses.dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    hard: bool
    source: str  # "qqp", "beam" or the hand-written kind
    portion: str  # "train" or "test"


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _portion(text: str) -> str:
    return "train" if _hash(text) % 100 < TRAIN_BUCKETS else "test"


def _first_by_hash(texts, count: int) -> list[str]:
    unique = sorted({t.strip() for t in texts if t.strip()}, key=_hash)
    return unique[:count]


def available() -> bool:
    return QQP_CSV.exists() and BEAM_DIR.exists()


def load() -> list[Prompt]:
    with QQP_CSV.open(newline="", encoding="utf-8") as f:
        quora = [row["question1"] for row in csv.DictReader(f)]
    beam = []
    for chat in sorted(BEAM_DIR.glob("*/chat.json")):
        for batch in json.loads(chat.read_text()):
            for turn in batch["turns"]:
                beam += [_TURN_MARKER.sub("", m["content"]) for m in turn if m["role"] == "user"]
    prompts = [Prompt(t, False, "qqp", _portion(t)) for t in _first_by_hash(quora, PER_SOURCE)]
    prompts += [Prompt(t, True, "beam", _portion(t)) for t in _first_by_hash(beam, PER_SOURCE)]
    for line in HANDWRITTEN.read_text().splitlines():
        row = json.loads(line)
        prompts.append(Prompt(row["text"], row["label"] == "hard", row["kind"], _portion(row["text"])))
    return prompts


def embeddings(texts: list[str], batch: int = 32) -> dict[str, np.ndarray]:
    """Vectors of ``texts`` as sent (the router embeds the message as is),
    computing only those not already cached on disk."""
    return cache_data.cached_embeddings(VECTORS_NPZ, texts, batch, threads=2)


if __name__ == "__main__":
    prompts = load()
    for portion in ("train", "test"):
        chosen = [p for p in prompts if p.portion == portion]
        print(portion, len(chosen), "hard:", sum(p.hard for p in chosen))
    print(len(embeddings([p.text for p in prompts])), "vectors")
