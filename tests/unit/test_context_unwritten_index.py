"""Which appends a turn-index repair writes again (turn_index.unwritten_appends):
those that last stored a turn at a position whose index write was lost."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from meshgate.common.v1 import common_pb2
from services.context import servicer
from services.context.store import UNDONE
from services.context.turn_index import UnwrittenAppend, features, term_counts, unwritten_appends

USER, ASSISTANT = 1, 2


def _history(*held: int) -> bytes:
    """The versions string: turns held at versions 0, 1, 2, ..."""
    return np.array(held, dtype="<u4").tobytes()


def test_an_index_that_covers_every_turn_needs_nothing() -> None:
    assert unwritten_appends(bytes([USER, ASSISTANT] * 2), _history(0, 2, 4), 4, 0, 512) == []


def test_a_lost_write_between_two_written_appends_is_that_append() -> None:
    # Version 2 stored positions 2-3; version 3's write zero-filled them.
    roles = bytes([USER, ASSISTANT, 0, 0, USER])
    assert unwritten_appends(roles, _history(0, 2, 4, 5), 5, 0, 512) == [UnwrittenAppend(2, 2, 2)]


def test_positions_past_the_roles_end_belong_to_the_last_appends() -> None:
    roles = bytes([USER, ASSISTANT])
    assert unwritten_appends(roles, _history(0, 2, 3, 5), 5, 0, 512) == [
        UnwrittenAppend(2, 2, 1),
        UnwrittenAppend(3, 3, 2),
    ]


def test_after_a_revert_the_append_that_stored_a_position_again_owns_it() -> None:
    # v1 stored 0-1, v2 2-3 (undone by v3, a revert to v1), v4 stored 2-3 again.
    history = _history(0, 2, UNDONE, 2, 4)
    assert unwritten_appends(bytes([USER, ASSISTANT, 0, 0]), history, 4, 0, 512) == [UnwrittenAppend(4, 2, 2)]
    # The undone version's turns are not the session's: nothing to write for them.
    assert unwritten_appends(bytes([USER, ASSISTANT]), _history(0, 2, UNDONE, 2), 2, 0, 512) == []


def test_compacted_turns_and_appends_reaching_into_them_are_left_alone() -> None:
    roles = bytes([0, 0, 0, USER])
    # Positions 0-1 compacted (their texts are gone); v2 stored 2-3 but
    # position 2's role is lost: its texts are all there, so it is written.
    assert unwritten_appends(roles, _history(0, 2, 4), 4, 2, 512) == [UnwrittenAppend(2, 2, 2)]
    # v1 stored 0-2 and position 0 is compacted: its turns cannot be read whole.
    assert unwritten_appends(roles, _history(0, 3, 4), 4, 1, 512) == []


def test_without_version_history_no_append_can_be_named() -> None:
    assert unwritten_appends(b"", b"", 3, 0, 512) == []


def test_a_repair_takes_at_most_max_turns_but_always_one_append() -> None:
    history = _history(0, 300, 600, 1200)
    assert unwritten_appends(b"", history, 1200, 0, 512) == [UnwrittenAppend(1, 0, 300)]
    assert unwritten_appends(bytes([USER] * 600), history, 1200, 0, 512) == [UnwrittenAppend(3, 600, 600)]


def test_turns_past_the_count_asked_for_are_not_looked_at() -> None:
    # A read saw 2 turns; an append storing 2-3 since is still indexing them.
    assert unwritten_appends(bytes([USER, ASSISTANT]), _history(0, 2, 4), 2, 0, 512) == []


def _last_writers(roles: bytes, held: list[int], count: int, compacted: int) -> list[int]:
    """The appends to write again, found the plain way: every append in
    version order claims its positions, a later one over an earlier one."""
    owner = [-1] * count
    for version in range(1, len(held)):
        before, after = held[version - 1], held[version]
        if before != UNDONE and after != UNDONE and after > before:
            for position in range(before, min(after, count)):
                owner[position] = version
    unwritten = [p for p in range(compacted, count) if p >= len(roles) or roles[p] == 0]
    return list(dict.fromkeys(owner[p] for p in unwritten if owner[p] >= 0))


@st.composite
def _sessions(draw):
    """A session's versions history after appends and reverts, as the store
    writes it, with some positions' index writes lost."""
    held = [0]
    for _ in range(draw(st.integers(0, 12))):
        current = len(held) - 1
        live = [v for v in range(current) if held[v] != UNDONE]
        if live and draw(st.booleans()) and current > 0:
            target = draw(st.sampled_from(live))
            for version in range(target + 1, current + 1):
                held[version] = UNDONE
            held.append(held[target])
        else:
            held.append(held[-1] + draw(st.integers(1, 4)))
    count = held[-1]
    roles = bytes(draw(st.lists(st.sampled_from([0, USER]), min_size=0, max_size=count)))
    return roles, held, count, draw(st.integers(0, count))


@given(_sessions())
def test_the_appends_named_are_those_that_last_wrote_each_unwritten_position(session) -> None:
    roles, held, count, compacted = session
    found = unwritten_appends(roles, _history(*held), count, compacted, 10**6)
    expected = [v for v in _last_writers(roles, held, count, compacted) if held[v - 1] >= compacted]
    assert [a.version for a in found] == expected
    for append in found:
        assert (append.first, append.count) == (
            held[append.version - 1],
            held[append.version] - held[append.version - 1],
        )


def test_the_paths_that_read_turn_texts_count_terms_as_the_index_stores_them():
    """The index stores a turn's term count capped at 65,535 (uint16); the
    whole-session path counted it uncapped, so BM25's average length, and
    with it the ranking, differed between a live assembly and its rebuild
    under the same assembly_id (a bug hunt: a turn of 499,000 terms)."""
    turns = [
        common_pb2.Message(role=common_pb2.ROLE_USER, content="7 " * 70_000),
        common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="The storage is near."),
    ]
    _, counted = servicer._postings_of(turns, ["storag"])
    assert counted.tolist() == term_counts(features(turns)).tolist()
    assert counted[0] == 0xFFFF
