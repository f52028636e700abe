"""bench/routing_bench.py's sessions workload sends what it says: every
session's turn extends its previous turn's prompt, so a server that holds
a session's earlier turn holds the start of its next one, and the sessions
come in a new order each round."""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))

import routing_bench  # noqa: E402  (bench/, put on the path above)

from meshgate import tokenization  # noqa: E402
from meshgate.config import SMOLLM2_TOKENIZER  # noqa: E402


def test_each_turn_extends_its_sessions_previous_one_in_rounds_of_new_orders():
    args = argparse.Namespace(sessions=6, session_tokens=60, turns=3)
    rounds = routing_bench.session_rounds(1, args)

    assert [len(r) for r in rounds] == [6, 6, 6]
    openings = [[turn[1].content for turn in r] for r in rounds]
    assert sorted(openings[0]) == sorted(openings[1]) == sorted(openings[2])
    assert len(set(openings[0])) == 6, "every session has a history of its own"
    assert openings[0] != openings[1] or openings[1] != openings[2], "the order changes between rounds"
    tokenizer = tokenization.load(SMOLLM2_TOKENIZER)
    assert all(len(tokenizer.encode(o, add_special_tokens=False).ids) >= 60 for o in openings[0])
    for earlier, later in zip(rounds, rounds[1:]):
        by_opening = {turn[1].content: turn for turn in later}
        for turn in earlier:
            following = by_opening[turn[1].content]
            assert following[: len(turn)] == turn
            assert len(following) == len(turn) + 2
