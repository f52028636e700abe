"""How far a replayed cache hit's delivered_tokens (its stored completion
count shared out by characters, rounded up: pipeline.replayed_tokens) is from
the answer's own tokens within the pieces sent, with smollm2's tokenizer.

    .venv/bin/python bench/replay_token_estimate.py

Every distinct assistant answer in bench/data/cache_conversations.jsonl is
cut after each of its replay pieces but the last (router.replay_piece_chars'
default, 16); the exact count is the answer's tokens (as its whole text
tokenizes) that end within the characters sent. Prints the estimate's error
(estimate - exact) over every cut.
"""

from __future__ import annotations

import json
import pathlib
import statistics

from tokenizers import Tokenizer

from meshgate.config import RouterSettings
from services.router.pipeline import replay_pieces, replayed_tokens

ROOT = pathlib.Path(__file__).resolve().parent.parent


def answers() -> list[str]:
    found: set[str] = set()

    def walk(value) -> None:
        if isinstance(value, dict):
            if value.get("role") == "assistant" and isinstance(value.get("content"), str):
                found.add(value["content"])
            for inner in value.values():
                walk(inner)
        elif isinstance(value, list):
            for inner in value:
                walk(inner)

    for line in (ROOT / "bench/data/cache_conversations.jsonl").read_text().splitlines():
        walk(json.loads(line))
    return sorted(found)


def main() -> None:
    tokenizer = Tokenizer.from_file(str(ROOT / "model_repository/smollm2/1/tokenizer.json"))
    piece_chars = RouterSettings().replay_piece_chars
    errors = []
    texts = answers()
    for text in texts:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        ends = [end for _, end in encoded.offsets]
        sent = 0
        for piece in replay_pieces(text, piece_chars)[:-1]:
            sent += len(piece)
            exact = sum(1 for end in ends if end <= sent)
            errors.append(replayed_tokens(len(encoded.ids), sent, len(text)) - exact)
    errors.sort()
    cuts = len(errors)
    print(
        f"{len(texts)} answers, {cuts} cuts: estimate - exact median {statistics.median(errors):g}, "
        f"5th-95th percentile {errors[cuts // 20]}..{errors[cuts * 19 // 20]}, "
        f"range {errors[0]}..{errors[-1]}, under the exact count {sum(e < 0 for e in errors) / cuts:.0%}"
    )


if __name__ == "__main__":
    main()
