"""Which window of a tenant's count an entry is charged to (store.py,
``charge_window``): the one before the window it expires in, so that an
Invalidate finds it again from the expiry the entry carries."""

from __future__ import annotations

import hypothesis
from hypothesis import strategies as st

from services.cache.store import charge_window

WINDOW_S = 60
WINDOW_MS = WINDOW_S * 1000
# A window of the count: [START, START + WINDOW_MS).
WINDOW = 29_000_000
START = WINDOW * WINDOW_MS


def test_an_entry_of_the_full_ttl_is_charged_to_the_window_it_is_stored_in():
    for stored_at in (START, START + 1, START + WINDOW_MS - 1):
        assert charge_window(stored_at + WINDOW_MS, WINDOW_S) == WINDOW


def test_an_entry_expiring_before_its_windows_end_is_charged_to_the_window_before():
    assert charge_window(START + WINDOW_MS // 2, WINDOW_S) == WINDOW - 1
    assert charge_window(START + 1, WINDOW_S) == WINDOW - 1
    assert charge_window(START + WINDOW_MS - 1, WINDOW_S) == WINDOW - 1


def test_an_entry_expiring_as_its_window_ends_is_charged_to_it():
    # It expires at the first millisecond of the next window: it lives
    # while this window is read as "the current one", and the next.
    assert charge_window(START + WINDOW_MS, WINDOW_S) == WINDOW


@hypothesis.given(
    stored_at=st.integers(START - 3 * WINDOW_MS, START + 3 * WINDOW_MS),
    ttl_ms=st.integers(1, WINDOW_MS),
)
def test_an_entry_is_charged_to_one_of_the_two_windows_the_bound_reads_while_it_lives(stored_at, ttl_ms):
    """The bound reads the window of now and the one before (``charge``):
    the charged one is among them at the Store, and still at any moment
    the entry lives."""
    charged = charge_window(stored_at + ttl_ms, WINDOW_S)
    for now in (stored_at, stored_at + ttl_ms - 1):
        assert now // WINDOW_MS - 1 <= charged <= now // WINDOW_MS
