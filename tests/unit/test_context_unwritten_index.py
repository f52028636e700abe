"""Which appends a turn-index repair writes again (turn_index.unwritten_appends):
those that last stored a turn at a position whose index write was lost."""

from __future__ import annotations

import numpy as np

from services.context.store import UNDONE
from services.context.turn_index import UnwrittenAppend, unwritten_appends

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
