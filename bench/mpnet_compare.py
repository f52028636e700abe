"""Would all-mpnet-base-v2 embed better than all-MiniLM-L6-v2 for context
retention and for the semantic cache? A measurement, not a service change.

Needs a second virtual environment beside the project's, with torch and
transformers (never installed into the project's venv):

    python3 -m venv /tmp/mpnetvenv
    /tmp/mpnetvenv/bin/pip install torch==2.13.0 transformers safetensors tokenizers numpy

and the model's files (sentence-transformers layout: model.safetensors,
tokenizer.json, config.json; mean pooling, then L2 normalization) in a
folder, by default /tmp/mpnet/model/all-mpnet-base-v2 (``MPNET_MODEL``;
``MPNET_PYTHON`` names the second venv's python).

Run with the project's venv; it starts the second venv's python for
everything mpnet (``--embed`` and ``--latency``, which import nothing of
meshgate):

    flock /tmp/bench.lock nice -n 19 .venv/bin/python bench/mpnet_compare.py

(first run: about 25 minutes of mpnet embeddings on 2 shared cores, then
cached; no test imports this script.)

1. Context: the offline retention of bench/context_bench.py (the service's
   pure policy over cached vectors, adaptive strategy), MiniLM's vectors
   (Triton's minilm, as context_bench caches them; that part starts Triton,
   hence the lock) beside mpnet's; and the share of questions whose
   evidence turns all rank among the K best by dense cosine alone.
2. Cache: cosine as a duplicate score on QQP's calibration portion
   (bench/cache_data.py's; never the test portion; the train portion is
   three times as many texts, too many for mpnet on a shared 2-core
   machine): ROC AUC and precision at recall 0.40.
3. Latency: one text per run on one thread, p50 of 200: MiniLM's int8
   ONNX (meshgate.minilm) against mpnet fp32 in torch and mpnet with
   torch's dynamic int8 quantization of its linear layers.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
MPNET_PYTHON = os.environ.get("MPNET_PYTHON", "/tmp/mpnetvenv/bin/python")
MPNET_MODEL = os.environ.get("MPNET_MODEL", "/tmp/mpnet/model/all-mpnet-base-v2")
MAX_TOKENS = 384  # sentence_bert_config.json's max_seq_length
QQP_CSV = pathlib.Path("/work/shared/data/semantic-pairs/qqp_val.csv")
TOP_K = (20, 50, 100)
RECALL = 0.40
RUNS = 200
QUESTION = "What did you tell me about your sister's new job in Berlin?"
TURN = (
    "Honestly the move went better than I expected, we packed everything in two days, the movers were "
    "late but friendly, and the new flat gets sun all afternoon so the plants finally look happy again."
)


# --- the mpnet side (runs in the second venv: torch, transformers, numpy only) --


def _load_mpnet(threads: int):
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(MPNET_MODEL)
    model = AutoModel.from_pretrained(MPNET_MODEL).eval()
    return torch, tokenizer, model


def _mpnet_embed(torch, tokenizer, model, texts: list[str]) -> np.ndarray:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    # Mean over real tokens, then unit length: the model's sentence-transformers modules.
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=1).numpy().astype(np.float32)


def embed_file(source: str, target: str) -> None:
    """``source``: a JSON list of texts; ``target``: an npz of their vectors, in order."""
    texts = json.loads(pathlib.Path(source).read_text())
    torch, tokenizer, model = _load_mpnet(threads=2)
    # Batches of similar length: less padding to compute.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    vectors = np.zeros((len(texts), model.config.hidden_size), np.float32)
    for start in range(0, len(order), 32):
        chosen = order[start : start + 32]
        vectors[chosen] = _mpnet_embed(torch, tokenizer, model, [texts[i] for i in chosen])
        if (start // 32) % 50 == 0:
            print(f"mpnet: {start + len(chosen)}/{len(texts)}", file=sys.stderr, flush=True)
    np.savez(target, vectors=vectors)


def mpnet_latency() -> None:
    """p50 ms of one text per run, one thread: fp32, then dynamic int8, as JSON."""
    torch, tokenizer, model = _load_mpnet(threads=1)
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    result = {}
    for label, each in (("fp32", model), ("dynamic int8", quantized)):
        for text_label, text in (("question", QUESTION), ("turn", TURN)):
            call = functools.partial(_mpnet_embed, torch, tokenizer, each, [text])
            result[f"{label}, {text_label}"] = _p50(call)
    # How far the quantized model's vectors drift from fp32's (cosine).
    texts = [QUESTION, TURN]
    full, small = (_mpnet_embed(torch, tokenizer, m, texts) for m in (model, quantized))
    result["int8 vs fp32 cosine"] = [float(x) for x in (full * small).sum(1)]
    result["tokens"] = [len(tokenizer(t)["input_ids"]) for t in texts]
    print(json.dumps(result))


def _p50(call) -> float:
    for _ in range(10):
        call()
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - started))
    return float(np.percentile(times, 50))


# --- the project side (the project's venv) -----------------------------------


def mpnet_vectors(texts: list[str], file_name: str) -> np.ndarray:
    """mpnet's vectors of ``texts``, computed once by the second venv and
    kept under bench/.cache/``file_name`` (recomputed when the texts change)."""
    path = CACHE / file_name
    digest = str(hash_texts(texts))
    if path.exists():
        with np.load(path) as stored:
            if str(stored["digest"]) == digest:
                return stored["vectors"]
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mpnet-") as scratch:
        source, target = pathlib.Path(scratch) / "texts.json", pathlib.Path(scratch) / "vectors.npz"
        source.write_text(json.dumps(texts))
        subprocess.run([MPNET_PYTHON, __file__, "--embed", str(source), str(target)], check=True)
        with np.load(target) as made:
            vectors = made["vectors"]
    np.savez(path, vectors=vectors, digest=np.array(digest))
    return vectors


def hash_texts(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:16]


def per_conversation(conversations, texts_of, file_name: str) -> dict[str, np.ndarray]:
    """mpnet's vectors of ``texts_of(turns, questions)`` per conversation (one embedding run for all)."""
    names = sorted(conversations)
    texts = {n: texts_of(conversations[n][0], conversations[n][2]) for n in names}
    flat = mpnet_vectors([t for n in names for t in texts[n]], file_name)
    out, start = {}, 0
    for name in names:
        out[name] = flat[start : start + len(texts[name])]
        start += len(texts[name])
    return out


def top_k_shares(conversations, vectors) -> dict[int, float]:
    """Share of questions whose evidence turns all rank among the K best
    turns by cosine alone (turn vectors int8-quantized as the index stores them)."""
    import context_bench as cb

    hits = {k: 0 for k in TOP_K}
    total = 0
    for name, (turns, _, questions) in conversations.items():
        _, _, turn_vectors = cb.offline_index(turns, vectors[name])
        for q, vector in zip(questions, vectors[name][len(turns) :], strict=True):
            cosine = turn_vectors @ (vector / np.linalg.norm(vector))
            # Rank of each evidence turn: turns scoring strictly higher, plus one.
            worst = max(int((cosine > cosine[i]).sum()) + 1 for i in q["evidence"])
            for k in TOP_K:
                hits[k] += worst <= k
            total += 1
    return {k: 100 * hits[k] / total for k in TOP_K}


def context_part() -> list[str]:
    import context_bench as cb
    import uvloop

    from services.context import relevance

    conversations = {p.stem: cb.load_conversation(p) for p in sorted(cb.DATA.glob("*.json"))}
    names = sorted(conversations)
    embedders = {
        "MiniLM": (uvloop.run(cb.cached_vectors(conversations)), cb.nameless_vectors(conversations)),
        "mpnet": (
            per_conversation(conversations, cb.turns_and_questions, "realtalk_vectors_plain_mpnet.npz"),
            per_conversation(conversations, cb.nameless_texts, "realtalk_nameless_vectors_mpnet.npz"),
        ),
    }
    tallies, shares = {}, {}
    floor = cb.Settings().context.recency_floor_turns
    for label, (vectors, nameless) in embedders.items():
        each = {
            n: cb.offline({n: conversations[n]}, vectors, relevance.DEFAULT_WEIGHTS, floor, None, nameless)
            for n in names
        }
        tallies[label] = {
            "all": cb.Tally.merged(each.values()),
            "held-out four": cb.Tally.merged(each[n] for n in names[6:]),
        }
        shares[label] = top_k_shares(conversations, vectors)
        print(f"scored {label}", file=sys.stderr, flush=True)
    categories = sorted({c for (_, _, c) in tallies["MiniLM"]["all"].kept if c})
    columns = [("all", 0), *((cb.CATEGORIES[c], c) for c in categories)]
    out = [
        "### Context retention, adaptive (offline, pure policy): MiniLM / mpnet",
        "",
        "| budget | " + " | ".join(title for title, _ in columns) + " | held-out four, all |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for budget in cb.BUDGETS:
        cells = [
            f"{tallies['MiniLM']['all'].share('adaptive', budget, c).strip()}"
            f" / {tallies['mpnet']['all'].share('adaptive', budget, c).strip()}"
            for _, c in columns
        ]
        held = " / ".join(tallies[e]["held-out four"].share("adaptive", budget, 0).strip() for e in tallies)
        out.append(f"| {budget} | " + " | ".join(cells) + f" | {held} |")
    newest = " / ".join(tallies["MiniLM"]["all"].share("newest", b, 0).strip() for b in cb.BUDGETS)
    out += [
        "",
        f"(newest turns that fit, for scale, no embedder involved: {newest} at 1k / 2k / 4k / 8k)",
        "",
        "### Every evidence turn among the K best by dense cosine alone",
        "",
        "| embedder | " + " | ".join(f"K={k}" for k in TOP_K) + " |",
        "|---|" + "---|" * len(TOP_K),
    ]
    for label, by_k in shares.items():
        out.append(f"| {label} | " + " | ".join(f"{by_k[k]:.1f}%" for k in TOP_K) + " |")
    questions = sum(len(q) for _, _, q in conversations.values())
    out.append(f"\n{questions} questions over {len(conversations)} conversations")
    return out


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney: the chance that a random duplicate outscores a random non-duplicate (ties half)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties.
    start = 0
    while start < len(scores):
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_recall(scores: np.ndarray, positive: np.ndarray, recall: float) -> tuple[float, float]:
    """Precision and threshold at the highest threshold whose recall reaches ``recall``."""
    order = np.argsort(-scores, kind="mergesort")
    found = np.cumsum(positive[order])
    at = int(np.argmax(found >= recall * positive.sum()))
    return float(found[at] / (at + 1)), float(scores[order][at])


def cache_part() -> list[str]:
    import cache_data

    pairs = [p for p in cache_data.load_qqp(QQP_CSV) if p.portion == "calibration"]
    texts = sorted({t for p in pairs for t in (p.stored, p.asked)})
    minilm = cache_data.embeddings(texts)
    mpnet = dict(zip(texts, mpnet_vectors(texts, "qqp_calibration_mpnet.npz"), strict=True))
    positive = np.array([p.duplicate for p in pairs])
    out = [
        f"### Cosine as a duplicate score, QQP calibration portion ({len(pairs)} pairs,"
        f" {int(positive.sum())} duplicates; test portion not used)",
        "",
        "| embedder | ROC AUC | precision at recall 0.40 | cosine threshold there |",
        "|---|---|---|---|",
    ]
    for label, vectors in (("MiniLM", minilm), ("mpnet", mpnet)):
        scores = np.array([float(vectors[p.stored] @ vectors[p.asked]) for p in pairs])
        precision, threshold = precision_at_recall(scores, positive, RECALL)
        auc = roc_auc(scores, positive)
        out.append(f"| {label} | {auc:.4f} | {100 * precision:.1f}% | {threshold:.3f} |")
    return out


def latency_part() -> list[str]:
    from meshgate.minilm import MiniLM, load_tokenizer

    minilm = MiniLM(threads=1)
    tokenizer = load_tokenizer()
    tokens = [len(tokenizer.encode(t).ids) for t in (QUESTION, TURN)]  # one at a time: no padding
    rows = {
        "MiniLM int8 ONNX": {
            "question": _p50(lambda: minilm.embed([QUESTION])),
            "turn": _p50(lambda: minilm.embed([TURN])),
        }
    }
    measured = subprocess.run(
        [MPNET_PYTHON, __file__, "--latency"], check=True, capture_output=True, text=True
    )
    mpnet = json.loads(measured.stdout.strip().splitlines()[-1])
    for label in ("fp32", "dynamic int8"):
        rows[f"mpnet {label} (torch)"] = {t: mpnet[f"{label}, {t}"] for t in ("question", "turn")}
    base = rows["MiniLM int8 ONNX"]
    out = [
        f"### One text per run, one thread, p50 of {RUNS} (ms)",
        "",
        f"question {len(QUESTION.split())} words ({tokens[0]} MiniLM tokens, {mpnet['tokens'][0]} mpnet),"
        f" turn {len(TURN.split())} words ({tokens[1]} / {mpnet['tokens'][1]})",
        "",
        "| embedder | question | turn | x MiniLM (question / turn) |",
        "|---|---|---|---|",
    ]
    for label, row in rows.items():
        ratio = f"{row['question'] / base['question']:.1f} / {row['turn'] / base['turn']:.1f}"
        out.append(f"| {label} | {row['question']:.2f} | {row['turn']:.2f} | {ratio} |")
    drift = ", ".join(f"{c:.4f}" for c in mpnet["int8 vs fp32 cosine"])
    out.append(f"\nmpnet dynamic int8 against fp32, cosine of the two vectors: {drift} (question, turn)")
    out.append(f"Load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embed", nargs=2, metavar=("TEXTS_JSON", "VECTORS_NPZ"), help=argparse.SUPPRESS)
    parser.add_argument("--latency", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=("context", "cache", "latency"), help="one part only")
    args = parser.parse_args()
    if args.embed:
        embed_file(*args.embed)
        return
    if args.latency:
        mpnet_latency()
        return
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    parts = {"context": context_part, "cache": cache_part, "latency": latency_part}
    for name, part in parts.items():
        if args.only in (None, name):
            print("\n".join(part()) + "\n", flush=True)


if __name__ == "__main__":
    main()
