"""The windowed-embedding experiment of bench/context_windows.py (the context
service does not use it): which texts it embeds for a turn, and how two
cosines a turn combine inside the service's scoring."""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from meshgate.common.v1 import common_pb2
from services.context import relevance

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))

import context_windows  # noqa: E402  (bench/, put on the path above)


def test_each_turn_is_embedded_with_the_neighbours_its_window_names() -> None:
    turns = [common_pb2.Message(role=common_pb2.ROLE_USER, content=c) for c in ("a", "b", "c")]
    texts = context_windows.window_texts(turns, [{"question": "ignored"}])
    assert texts == [
        *("a", "a\nb", "b\nc"),  # prev+cur: the first turn has no previous one
        *("a\nb", "b\nc", "c"),  # cur+next: the last has no next one
        *("a\nb", "a\nb\nc", "b\nc"),  # prev+cur+next
    ]


def test_two_cosines_take_the_max_or_the_mix_and_feed_back_the_own_rows() -> None:
    own = relevance.unit_rows(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32))
    window = relevance.unit_rows(np.array([[0.0, 1.0], [1.0, 0.0]], np.float32))
    query = np.array([1.0, 0.0], np.float32)
    assert np.allclose(context_windows.TwoCosines(own, window, None) @ query, [1.0, 1.0])
    assert np.allclose(context_windows.TwoCosines(own, window, 0.25) @ query, [0.75, 0.25])
    rows = context_windows.TwoCosines(own, window, 0.25)
    assert len(rows) == 2
    assert np.array_equal(rows[[1]], own[[1]])


def test_a_short_reply_read_with_its_question_outranks_it_read_alone() -> None:
    """Through hybrid_scores: with its window's cosine, the reply whose own
    vector says nothing (orthogonal to the question) climbs above a turn
    equally unrelated on its own, so the scoring really uses the window."""
    own = relevance.unit_rows(np.array([[1.0, 0.0, 0.0]] + [[0.0, 1.0, 0.0]] * 3, np.float32))
    window = own.copy()
    window[2] = relevance.unit_rows(np.array([[1.0, 1.0, 0.0]], np.float32))[0]
    lengths = np.ones(4)
    query = np.array([1.0, 0.0, 0.0], np.float32)
    weights = relevance.Weights(neighbour=0.0, span=0.0, feedback_weight=0.0)
    alone = relevance.hybrid_scores([], {}, lengths, own, query, weights).scores
    read_with = relevance.hybrid_scores(
        [], {}, lengths, context_windows.TwoCosines(own, window, 0.5), query, weights
    ).scores
    assert alone[2] == alone[3]
    assert read_with[2] > read_with[3]
