"""Labelled data of the cache verifier: the QQP development pairs split
into train, calibration and test portions, the trap set, and their
embeddings.

The split is by connected component of questions (two pairs sharing a
question land in the same portion), decided by a hash of the component, so
it is the same on every machine and no question of the test portion was
ever seen in training or calibration.

Embeddings are computed offline by ``meshgate.minilm.MiniLM``, the code the
``minilm`` Triton model and the cache service's own embedder run, and kept
in ``bench/.cache/`` so that ~24k questions are embedded once.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import pathlib
import sys

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from services.cache.keys import normalize_text  # noqa: E402

DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "semantic-pairs"
QQP_CSV = DATA_DIR / "qqp_val.csv"
TRAPS_JSONL = REPO_ROOT / "bench" / "data" / "cache_traps.jsonl"
NATURAL_JSONL = REPO_ROOT / "bench" / "data" / "cache_natural_pairs.jsonl"
NATURAL_TRAIN_JSONL = REPO_ROOT / "bench" / "data" / "cache_natural_train.jsonl"
CACHE_DIR = REPO_ROOT / "bench" / ".cache"
EMBEDDINGS_NPZ = CACHE_DIR / "minilm_embeddings.npz"

# Out of 100 hash buckets: train, then calibration, then test.
TRAIN_BUCKETS = 60
CALIBRATION_BUCKETS = 80
PORTIONS = ("train", "calibration", "test")
# The portion of the hand-written natural pairs (load_natural).
HELD_OUT = "held_out"


@dataclasses.dataclass(frozen=True, slots=True)
class Pair:
    stored: str
    asked: str
    duplicate: bool
    # "qqp", or the trap category ("negation", "number", ...; "paraphrase"
    # and "repeat" are the pairs that should hit).
    category: str
    portion: str


def _portion(key: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % 100
    if bucket < TRAIN_BUCKETS:
        return "train"
    if bucket < CALIBRATION_BUCKETS:
        return "calibration"
    return "test"


def load_qqp(path: pathlib.Path = QQP_CSV) -> list[Pair]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = [
            (normalize_text(r["question1"]), normalize_text(r["question2"]), r["is_duplicate"].strip() == "1")
            for r in csv.DictReader(f)
        ]
    rows = [(a, b, d) for a, b, d in rows if a and b and a != b]
    # A group of linked questions is assigned to one portion whole.
    group = question_groups((a, b) for a, b, _ in rows)
    return [Pair(a, b, d, "qqp", _portion(group[a])) for a, b, d in rows]


def question_groups(pairs) -> dict[str, str]:
    """Each question of ``pairs`` and the least question linked to it
    through pairs (union-find): one name per group, for one portion, so that
    no question is in two portions."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {question: find(question) for question in parent}


def load_traps(path: pathlib.Path = TRAPS_JSONL) -> list[Pair]:
    return _load_jsonl(path)


def load_natural(path: pathlib.Path = NATURAL_JSONL) -> list[Pair]:
    """Pairs written by hand in everyday phrasing, each labelled by its
    category as the trap set is (bench/README.md, "Natural phrasing, held
    out"). All in the ``held_out`` portion: nothing trains or calibrates on
    them. The trap set's paraphrases are mostly rule-made rewrites of QQP
    questions ("Can you tell me what X is?"), which its train portion taught
    the verifier; these say how it does on paraphrases no rule made."""
    return _load_jsonl(path, HELD_OUT)


def load_natural_train(path: pathlib.Path = NATURAL_TRAIN_JSONL) -> list[Pair]:
    """Pairs written by hand in everyday phrasing for the verifier to learn
    from, by another writer than load_natural's and apart from them (none
    shares a question with them: a unit test checks it), each pair's portion
    chosen by a hash of its two questions: the train and calibration
    portions are read as the trap set's are, and the test portion by
    nothing."""
    return [
        dataclasses.replace(pair, portion=_portion(pair.stored + "\n" + pair.asked))
        for pair in _load_jsonl(path, HELD_OUT)
    ]


def _load_jsonl(path: pathlib.Path, portion: str | None = None) -> list[Pair]:
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            pairs.append(
                Pair(
                    normalize_text(row["stored"]),
                    normalize_text(row["asked"]),
                    bool(row["duplicate"]),
                    row["category"],
                    portion or row["portion"],
                )
            )
    return pairs


# The embedding model the vectors below are made with, as Triton serves it
# (meshgate/minilm.py); its revision is the code's minilm.REVISION.
EMBEDDING_MODEL = "minilm"


def embedder_record() -> dict[str, str]:
    """What a training script records of the embedder its vectors come from
    (meshgate.embedding.head_embedder_record): this code's minilm, which
    :func:`cached_embeddings` runs."""
    from meshgate.embedding import head_embedder_record
    from meshgate.minilm import REVISION

    return head_embedder_record(EMBEDDING_MODEL, REVISION)


def embedder() -> str:
    """The name (meshgate.embedding.embedder_name) of the embedder
    :func:`embedder_record` records."""
    from meshgate.embedding import embedder_name
    from meshgate.minilm import REVISION

    return embedder_name(EMBEDDING_MODEL, REVISION)


def cached_embeddings(
    path: pathlib.Path, texts: list[str], batch: int, threads: int
) -> dict[str, np.ndarray]:
    """Vectors of ``texts`` as given, computing only those not already in
    the on-disk cache ``path``. The cache names the embedder that made it:
    one of another revision (or from before the name was kept) is embedded
    afresh, so a head trained from it never records a revision its vectors
    are not."""
    from meshgate.minilm import MiniLM

    embedder_name = embedder()
    known: dict[str, np.ndarray] = {}
    if path.exists():
        with np.load(path, allow_pickle=False) as stored:
            if "embedder" in stored.files and str(stored["embedder"]) == embedder_name:
                known = dict(zip(stored["texts"].tolist(), stored["vectors"]))
    missing = sorted(dict.fromkeys(t for t in texts if t not in known), key=len)
    if missing:
        model = MiniLM(threads)
        for start in range(0, len(missing), batch):
            chunk = missing[start : start + batch]
            for text, vector in zip(chunk, model.embed(chunk)):
                known[text] = vector
            if (start // batch) % 20 == 0:
                print(f"embedded {start + len(chunk)}/{len(missing)}", file=sys.stderr, flush=True)
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        (CACHE_DIR / ".gitignore").write_text("*\n")
        names = list(known)
        np.savez(
            path,
            texts=np.array(names),
            vectors=np.stack([known[n] for n in names]),
            embedder=np.array(embedder_name),
        )
    return {t: known[t] for t in texts}


def embeddings(texts: list[str], batch: int = 64, threads: int = 1) -> dict[str, np.ndarray]:
    """Vectors of ``texts`` (normalized as the cache normalizes), computing
    only those not already in the on-disk cache."""
    return cached_embeddings(
        EMBEDDINGS_NPZ, list(dict.fromkeys(normalize_text(t) for t in texts)), batch, threads
    )


if __name__ == "__main__":
    pairs = load_qqp()
    for portion in PORTIONS:
        chosen = [p for p in pairs if p.portion == portion]
        print(portion, len(chosen), sum(p.duplicate for p in chosen))
    extra = load_traps() if TRAPS_JSONL.exists() else []
    vectors = embeddings([q for p in pairs + extra for q in (p.stored, p.asked)], threads=2)
    print(len(vectors), "vectors")
