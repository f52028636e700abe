"""Whether a session's turns lack vectors, told without reading every row:
what an append leaves (turn_index.leaves_gaps), what a hot session's index
says after one (IndexedTurns.extended, as TurnIndex.write counts it in
Redis), and what assembly asks the backfill for (servicer._lacks_vectors)."""

from __future__ import annotations

import numpy as np

from meshgate.common.v1 import common_pb2
from meshgate.embedding import Embeddings
from services.context.servicer import _lacks_vectors, _SessionView
from services.context.turn_index import IndexedTurns, features, leaves_gaps

EMPTY = np.zeros(0, np.int64)
TURN = features([common_pb2.Message(role=common_pb2.ROLE_USER, content="The door is green.")])


def test_an_append_leaves_gaps_when_a_turn_got_no_vector() -> None:
    rows = np.ones((3, 4), np.float32)
    assert not leaves_gaps(Embeddings(rows, "minilm@2"))
    rows[1] = 0.0  # servicer._embed's row for a turn the embedder gave none
    assert leaves_gaps(Embeddings(rows, "minilm@2"))
    assert leaves_gaps(None)


def indexed_with_one_turn(embedder: str = "minilm@2") -> IndexedTurns:
    index = IndexedTurns(1, 0, EMPTY, EMPTY.astype(np.uint8), EMPTY, None, {}, [], [])
    return index.extended(2, 0, TURN, Embeddings(np.ones((1, 4), np.float32), embedder))


def test_a_hot_index_says_a_gap_was_left_as_the_write_counts_it() -> None:
    index = indexed_with_one_turn()
    assert not index.vector_gaps
    assert index.extended(3, 1, TURN, None).vector_gaps
    assert index.extended(3, 1, TURN, Embeddings(np.zeros((1, 4), np.float32), "minilm@2")).vector_gaps
    # Another embedder's rows before it are dropped: that turn has none now.
    assert index.extended(3, 1, TURN, Embeddings(np.ones((1, 4), np.float32), "minilm@3")).vector_gaps
    whole = index.extended(3, 1, TURN, Embeddings(np.ones((1, 4), np.float32), "minilm@2"))
    assert not whole.vector_gaps
    # Once said, it stays until the index is read again (the backfill clears it in Redis).
    assert (
        whole.extended(4, 2, TURN, None)
        .extended(5, 3, TURN, Embeddings(np.ones((1, 4)), "minilm@2"))
        .vector_gaps
    )


def view(rows: np.ndarray | None, *, vector_gaps: bool = False, embedder: str = "minilm@2") -> _SessionView:
    turns = 0 if rows is None else len(rows)
    return _SessionView(
        version=1,
        counts=np.zeros(turns, np.int64),
        roles=np.ones(turns, np.uint8),
        texts=None,
        postings={},
        term_counts=np.zeros(turns),
        unit_vectors=rows,
        pinned_turns=[],
        pinned_facts=[],
        embedder=embedder,
        vector_gaps=vector_gaps,
    )


def test_assembly_asks_for_a_gap_in_the_middle_of_a_session_by_the_index_count() -> None:
    rows = np.ones((3, 4), np.float32)
    assert not _lacks_vectors(view(rows), "minilm@2")
    rows[1] = 0.0
    # One row is read, the first: a gap behind it is told by the count alone.
    assert not _lacks_vectors(view(rows), "minilm@2")
    assert _lacks_vectors(view(rows, vector_gaps=True), "minilm@2")
    # As before: another embedder's rows, or a first row without a vector.
    assert _lacks_vectors(view(np.ones((3, 4), np.float32), embedder="minilm@1"), "minilm@2")
    rows = np.ones((3, 4), np.float32)
    rows[0] = 0.0
    assert _lacks_vectors(view(rows), "minilm@2")
