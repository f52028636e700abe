"""bench/context_beam.py's loader on a hand-written chat in BEAM-100k's
format: message ids resolve to the positions the context service stores the
turns at, every id of a list, nested list or dict counts as evidence, and a
question whose evidence does not resolve is left out and counted, never
scored with part of its evidence."""

from __future__ import annotations

import json
import pathlib
import sys

from meshgate.common.v1 import common_pb2

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))

import context_beam  # noqa: E402  (bench/, put on the path above)

USER, ASSISTANT = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT


def message(message_id: int, role: str, content: str) -> dict:
    return {"id": message_id, "role": role, "content": content}


def write_chat(directory: pathlib.Path) -> None:
    # Ids start at 10 and skip 13, so that an id is never its position by accident.
    batches = [
        {
            "batch_number": 1,
            "time_anchor": None,
            "turns": [
                [message(10, "user", "I use Flask. ->-> 1,1"), message(11, "assistant", "Noted.")],
                [message(12, "user", "My deadline is March 15 ->-> 1,2)")],
            ],
        },
        {
            "batch_number": 2,
            "time_anchor": "April-1-2024",
            "turns": [
                [message(14, "user", "It moved to April 1.\n->-> 2,N/A")],
                [message(15, "assistant", "Good luck with the launch. ->-> 2,3")],
            ],
        },
    ]
    questions = {
        "information_extraction": [{"question": "Which framework?", "source_chat_ids": [10]}],
        "event_ordering": [{"question": "In what order?", "source_chat_ids": [[10, 11], 14]}],
        "knowledge_update": [
            {
                "question": "When is the deadline?",
                "source_chat_ids": {"original_info": [12], "updated_info": [14]},
            }
        ],
        "summarization": [
            {"question": "Summarize.", "source_chat_ids": []},
            {"question": "And the rest?", "source_chat_ids": [11, 13]},
        ],
        "abstention": [{"question": "What about Django?", "source_chat_ids": None}],
    }
    (directory / "probing_questions").mkdir(parents=True)
    (directory / "chat.json").write_text(json.dumps(batches))
    (directory / "probing_questions" / "probing_questions.json").write_text(json.dumps(questions))


def test_ids_resolve_to_turn_positions_and_unresolvable_questions_are_counted(tmp_path) -> None:
    write_chat(tmp_path)
    turns, ids, questions, left_out = context_beam.load_chat(tmp_path)

    assert ids == [10, 11, 12, 14, 15]
    assert [m.role for m in turns] == [USER, ASSISTANT, USER, USER, ASSISTANT]
    # The generator's marker is cut in all its forms; the text before it stays.
    assert [m.content for m in turns] == [
        "I use Flask.",
        "Noted.",
        "My deadline is March 15",
        "It moved to April 1.",
        "Good luck with the launch.",
    ]
    by_question = {q["question"]: q for q in questions}
    assert set(by_question) == {"Which framework?", "In what order?", "When is the deadline?"}
    assert by_question["Which framework?"]["evidence"] == {0}
    # Nested lists: every message of each mention.
    assert by_question["In what order?"]["evidence"] == {0, 1, 3}
    # A dict: all of its ids, and the update alone apart.
    update = by_question["When is the deadline?"]
    assert update["evidence"] == {2, 3}
    assert update["updated"] == {3}
    assert by_question["Which framework?"]["updated"] is None
    # No evidence, or an id (13) naming no message: left out, counted by category.
    assert left_out == {"summarization": 2, "abstention": 1}
