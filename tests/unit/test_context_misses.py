"""The miss analysis of bench/context_misses.py: its ranks are the plan's
order, its oracle puts the evidence first, and it reads which participant a
question names."""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from meshgate.common.v1 import common_pb2
from services.context import assembly, relevance

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


def planted_words(words: list[str]) -> np.ndarray:
    """Word vectors in which the hobby words and the skiing words share a
    direction (cosine 0.64 between two of them); every other word has a
    direction of its own (cosine 0)."""
    rows = np.zeros((len(words), 64), np.float32)
    for i, word in enumerate(words):
        rows[i, 1 + i] = 1.0
        if word in {"hobbies", "hobby", "skiing", "ski"}:
            rows[i, 1 + i] = 0.6
            rows[i, 0] = 0.8
    return rows


def test_term_expansion_finds_the_skiing_turn_for_a_question_about_hobbies() -> None:
    turns = [
        "I went skiing in the Alps all weekend",
        "The weather was grey and cold",
        "Work ran late again on Tuesday",
        "We should paint the kitchen",
    ]
    messages = [common_pb2.Message(role=USER, content=t) for t in turns]
    postings, lengths, _ = context_misses.bench.offline_index(messages, np.zeros((len(turns), 384)))
    question = "What are Kate's hobbies?"
    q = context_misses.Question(
        1, [0], list(relevance.index_terms(question)), np.zeros(384), [], None, None, question
    )
    c = context_misses.Conversation(
        costs(len(turns)), postings, lengths, np.zeros((len(turns), 384), np.float32), [], [q]
    )
    assert context_misses.question_words(c, q, False) == [("hobby", "hobbies")]
    assert context_misses.asks_for_instances(question, context_misses.question_words(c, q, True))
    space = context_misses.TermVectors([(c, turns)], planted_words)
    # No turn shares a word with the question: the service's ranking is its ties, newest first.
    service = context_misses.ranks(context_misses.service_scores(c, q, nameless=False))
    assert service[0] == len(turns) - 1
    assert context_misses.ranks(context_misses.term_expansion(space, 0.3)(c, q))[0] == 0
    # Above the pair's cosine the floor expands nothing: the service's ranking.
    unexpanded = context_misses.term_expansion(space, 0.3, floor=0.7)(c, q)
    assert context_misses.ranks(unexpanded).tolist() == service.tolist()


def test_a_questions_form_names_the_kind_of_thing_that_answers_it() -> None:
    assert context_misses.asked_kind("Where does Kate work?") == "place"
    assert context_misses.asked_kind("Which cities has Elise been to?") == "place"
    assert context_misses.asked_kind("What movies does Kevin like?") == "title"
    assert context_misses.asked_kind("How long did Elise have the flu?") == "time"
    assert context_misses.asked_kind("When did Kate start skiing?") == "time"
    assert context_misses.asked_kind("What are Kate's hobbies?") is None
    assert context_misses.asked_kind("How does Paola spend time with her friends?") is None


def test_a_turn_holds_names_past_a_sentences_first_word_and_times() -> None:
    # "Yes" starts a sentence, "I" is a stop word: Miami, the quoted title and its capitalized
    # word (a title counts once more; the rows read whether a turn holds a name, not how many).
    assert context_misses.answer_kinds('Yes I went to Miami. We watched "The Office" there') == {
        "name": 3,
        "time": 0,
    }
    assert context_misses.answer_kinds("Two days ago, on Monday at 5") == {"name": 0, "time": 4}
    assert context_misses.answer_kinds("Great. That was fun") == {"name": 0, "time": 0}


def lexical_conversation(turns: list[str], question: str) -> tuple:
    """A conversation of ``turns`` scored by words alone (no vectors), asked ``question``."""
    messages = [common_pb2.Message(role=USER, content=t) for t in turns]
    postings, lengths, _ = context_misses.bench.offline_index(messages, np.zeros((len(turns), 384)))
    q = context_misses.Question(
        1, [0], list(relevance.index_terms(question)), np.zeros(384), [], None, None, question
    )
    c = context_misses.Conversation(
        costs(len(turns)),
        postings,
        lengths,
        np.zeros((len(turns), 384), np.float32),
        [relevance.index_terms(t) for t in turns],
        [q],
        turns,
    )
    return c, q


def test_the_answer_kind_raises_the_turn_that_names_a_place_for_a_where_question() -> None:
    turns = ["Dinner was fine", "The trip was fun", "The trip to Lisbon was fun", "Work again", "Rain"]
    c, q = lexical_conversation(turns, "Where did Kate go on her trip?")
    service = context_misses.ranks(context_misses.service_scores(c, q, nameless=False))
    # Both trip turns match "trip"; the one naming Lisbon has more terms, so a lower BM25.
    assert service[1] < service[2]
    raised = context_misses.ranks(context_misses.answer_kind_signal(0.3)(c, q))
    assert raised[2] == 0
    # A question of no kind is scored as the service scores it.
    c, q = lexical_conversation(turns, "What are Kate's trip plans?")
    unchanged = context_misses.answer_kind_signal(0.3)(c, q)
    assert (
        context_misses.ranks(unchanged).tolist()
        == context_misses.ranks(context_misses.service_scores(c, q, nameless=False)).tolist()
    )


def test_entity_chaining_raises_a_turn_sharing_a_found_turns_rare_name_and_a_question_word() -> None:
    filler = [f"Plain talk number {i} about nothing" for i in range(40)]
    turns = [
        "My cooking class starts with Chef Moreau tonight",  # found by "cooking class"
        *filler[:20],
        "Moreau showed us tiramisu, and the class loved it",  # Moreau and "class": chained
        *filler[20:],
        # Shorter turns matching "class" alone, newer: the service ranks them above the chained one.
        *["Another class today"] * 3,
        "Moreau is also a painter",  # Moreau but no question word: not chained
    ]
    c, q = lexical_conversation(turns, "What did Kate learn in her cooking class?")
    service = context_misses.ranks(context_misses.service_scores(c, q, nameless=False))
    chained = context_misses.ranks(context_misses.entity_chaining(0.5)(c, q))
    assert chained[21] < service[21]
    assert chained[21] < chained[len(turns) - 1]
