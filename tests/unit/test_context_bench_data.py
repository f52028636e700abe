"""bench/context_bench.py's reading of the long conversations, and its cache
of their vectors: what the retention figure counts, and that it is never
scored on vectors of other texts (an audit found the 70 questions it leaves
out said nowhere, and rewritten turns scored by the old file's vectors)."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest
import uvloop

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))

import context_bench  # noqa: E402  (bench/, put on the path above)


def _conversation(path: pathlib.Path) -> pathlib.Path:
    turns = [
        {"speaker": "Ana" if i % 2 == 0 else "Bo", "clean_text": f"turn {i}", "dia_id": f"D1:{i + 1}"}
        for i in range(6)
    ]
    qa = [
        {"question": "all resolve?", "category": 1, "evidence": ["D1:1", "D1:2-D1:3"]},
        {"question": "one does not?", "category": 1, "evidence": ["D1:4", "D9:9"]},
        {"question": "none resolves?", "category": 2, "evidence": ["D7:1"]},
        {"question": "none listed?", "category": 3, "evidence": []},
    ]
    path.write_text(json.dumps({"session_1": turns, "qa": qa}))
    return path


def test_a_question_with_an_unresolved_id_is_left_out_and_said_or_judged_on_the_rest(tmp_path):
    path = _conversation(tmp_path / "Chat_1.json")
    _, _, questions = context_bench.load_conversation(path)
    assert [(q["question"], q["evidence"]) for q in questions] == [("all resolve?", {0, 1, 2})]
    _, _, partial = context_bench.load_conversation(path, partial_evidence=True)
    assert [(q["question"], q["evidence"]) for q in partial] == [
        ("all resolve?", {0, 1, 2}),
        ("one does not?", {3}),
    ]
    assert context_bench.left_out([path]) == (
        "4 questions in the data; left out 3: 1 some evidence ids resolve to no turn,"
        " 1 no evidence id resolves, 1 no evidence listed (1 multi-hop 1, 2 temporal 1, 3 commonsense 1)"
    )


def test_cached_vectors_are_those_of_the_texts_and_embedder_they_record(tmp_path, monkeypatch):
    monkeypatch.setattr(context_bench, "CACHE", tmp_path)
    path = _conversation(tmp_path / "Chat_1.json")
    conversations = {"Chat_1": context_bench.load_conversation(path)}
    stored = {"Chat_1": np.ones((7, 4), np.float32)}  # 6 turns, 1 question
    np.savez(tmp_path / "v.npz", **stored)
    (tmp_path / "v.json").write_text(
        json.dumps(
            {
                "texts": context_bench.texts_digest(conversations, context_bench.turns_and_questions),
                "embedder": context_bench._embedder(),
            }
        )
    )

    class Embedded(Exception):
        pass

    def embeds_again(*args, **kwargs):
        raise Embedded

    monkeypatch.setattr(context_bench, "build_model_weights", embeds_again)
    kept = uvloop.run(context_bench.cached_vectors(conversations, "v.npz"))
    assert np.array_equal(kept["Chat_1"], stored["Chat_1"])
    # One turn rewritten: the file's vectors are of other texts.
    turns, ids, questions = conversations["Chat_1"]
    turns[0].content = "a turn said otherwise"
    with pytest.raises(Embedded):
        uvloop.run(context_bench.cached_vectors(conversations, "v.npz"))


def test_a_vector_file_without_its_record_is_kept_only_if_its_rows_are_the_texts(tmp_path, monkeypatch):
    from meshgate.minilm import MiniLM

    monkeypatch.setattr(context_bench, "CACHE", tmp_path)
    path = _conversation(tmp_path / "Chat_1.json")
    conversations = {"Chat_1": context_bench.load_conversation(path)}
    turns, _, questions = conversations["Chat_1"]
    rows = MiniLM().embed(context_bench.turns_and_questions(turns, questions))

    def embeds_again(*args, **kwargs):
        raise AssertionError("embedded again")

    monkeypatch.setattr(context_bench, "build_model_weights", embeds_again)
    np.savez(tmp_path / "v.npz", Chat_1=rows)
    kept = uvloop.run(context_bench.cached_vectors(conversations, "v.npz"))
    assert np.array_equal(kept["Chat_1"], rows)
    assert json.loads((tmp_path / "v.json").read_text())["embedder"] == context_bench._embedder()
    # Another file of the same shape, of other texts' vectors, and no record.
    (tmp_path / "v.json").unlink()
    np.savez(tmp_path / "v.npz", Chat_1=rows[::-1])
    with pytest.raises(AssertionError, match="embedded again"):
        uvloop.run(context_bench.cached_vectors(conversations, "v.npz"))


def test_a_record_that_cannot_be_written_is_said_not_fatal(tmp_path, capsys):
    """A read-only cache (a final read: the bench crashed there where it
    loaded the same file before the record existed)."""
    record = tmp_path / "v.json"
    record.mkdir()  # writing it fails as a read-only file system does: an OSError
    context_bench._write_record(record, {"texts": "x", "embedder": "y"})
    assert "v.json not written" in capsys.readouterr().err
