"""The miss analysis of bench/context_misses.py: its ranks are the plan's
order, its oracle puts the evidence first, and it reads which participant a
question names."""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from meshgate.common.v1 import common_pb2
from services.context import assembly

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))

import context_misses  # noqa: E402  (bench/, put on the path above)

USER, ASSISTANT = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT


def costs(count: int) -> assembly.SessionCosts:
    return assembly.SessionCosts.of([assembly.TurnCost(USER, 10)] * count)


def test_ranks_follow_the_plans_order_ties_to_the_newer_turn() -> None:
    scores = np.array([0.5, 0.9, 0.5, 0.1])
    place = context_misses.ranks(scores)
    assert place.tolist() == [2, 0, 1, 3]
    # Room for two turns, no floor: the plan keeps the two ranked first.
    chosen = assembly.plan(costs(4), [], 20, relevance=scores)
    assert chosen.kept() == sorted(np.flatnonzero(place < 2).tolist())


def test_the_oracle_ranks_the_evidence_above_every_other_turn() -> None:
    scores = np.array([0.9, -0.5, 0.8, 0.0, 0.7])
    evidence = [1, 3]
    place = context_misses.ranks(context_misses.evidence_first(scores, evidence))
    assert sorted(place[evidence].tolist()) == [0, 1]
    # The other turns keep their order among themselves.
    assert place[[0, 2, 4]].tolist() == [2, 3, 4]
    chosen = assembly.plan(costs(5), [], 20, relevance=context_misses.evidence_first(scores, evidence))
    assert context_misses.all_kept(chosen, evidence)
    assert not context_misses.all_kept(assembly.plan(costs(5), [], 20, relevance=scores), evidence)


def test_a_question_names_the_first_speaker_the_user_the_other_the_assistant() -> None:
    names = ["Fahim Khan", "Muhhamed"]
    assert context_misses.named_role("What games does Fahim play?", names) == USER
    assert context_misses.named_role("Where does Muhhamed work?", names) == ASSISTANT
    assert context_misses.named_role("Do Fahim and Muhhamed both cook?", names) is None
    assert context_misses.named_role("What did they eat?", names) is None
