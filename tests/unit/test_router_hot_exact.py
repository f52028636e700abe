"""The router's local copies of exact hits: what is served, for how long,
and what a notice or a reconnect takes away."""

from __future__ import annotations

import math

import pytest
import structlog

from meshgate import cache_notices
from meshgate.common.v1 import common_pb2
from services.cache import keys
from services.router.hot_exact import HotExactHits
from services.router.pipeline import Answer, CachePlan, CacheStatus, Hit
from tests.clocks import Clock


def plan(tenant: str = "t1", model: str = "m1", max_tokens: int = 8) -> CachePlan:
    return CachePlan(True, True, tenant, model, common_pb2.GenerationParameters(max_tokens=max_tokens))


def messages(text: str) -> list[common_pb2.Message]:
    return [common_pb2.Message(role=common_pb2.ROLE_USER, content=text)]


# The heartbeat id of the cache replica that answers these tests' hits.
REPLICA = "0123456789abcdef"
HEARTBEAT = cache_notices.heartbeat(REPLICA)


def hit(text: str) -> Hit:
    return Hit(Answer(text=text, completion_tokens=3), CacheStatus.EXACT_HIT, 1.0)


def live_hits(
    max_entries: int = 16, max_age_s: float = 10.0, heartbeat_lost_after_s: float = math.inf, **options
) -> tuple[HotExactHits, Clock]:
    """Copies in use: subscribed, the cache service's heartbeat heard (and,
    unless a test of the heartbeat says, never lost)."""
    clock = Clock(100.0)
    hits = HotExactHits(
        max_entries, max_age_s, clock, heartbeat_lost_after_s=heartbeat_lost_after_s, **options
    )
    hits.subscribed(True)
    hits.announce(HEARTBEAT)
    return hits, clock


def stored(hits: HotExactHits, text: str, entry_id: str, scope: CachePlan | None = None) -> bytes:
    scope = scope or plan()
    key = hits.key(scope, messages(text))
    hits.put(key, hits.ticket(), hit(f"answer to {text}"), entry_id, scope.tenant_id, scope.model, REPLICA)
    return key


def test_a_copy_is_served_for_the_very_same_request_only():
    hits, _ = live_hits()
    key = stored(hits, "q", "e1")
    assert hits.get(hits.key(plan(), messages("q"))).answer.text == "answer to q"
    assert hits.get(key) is not None
    for other in (
        hits.key(plan(tenant="t2"), messages("q")),
        hits.key(plan(model="m2"), messages("q")),
        hits.key(plan(max_tokens=9), messages("q")),
        hits.key(plan(), messages("q ")),
        hits.key(plan(), messages("Q")),
    ):
        assert hits.get(other) is None


def test_a_copy_is_not_served_past_its_age():
    hits, clock = live_hits(max_age_s=2.0)
    key = stored(hits, "q", "e1")
    clock.now += 1.9
    assert hits.get(key) is not None
    clock.now += 0.2
    assert hits.get(key) is None
    assert len(hits) == 0


def test_a_copy_is_not_served_past_its_entrys_expiry():
    """Expiry announces nothing: the lookup's expires_in_ms bounds the copy
    when it comes before the age limit; 0 (a cache that does not say) leaves
    the age limit alone."""
    hits, clock = live_hits(max_age_s=2.0)
    key = hits.key(plan(), messages("q"))
    hits.put(key, hits.ticket(), hit("expiring"), "e1", "t1", "m1", REPLICA, expires_in_s=0.5)
    clock.now += 0.4
    assert hits.get(key) is not None
    clock.now += 0.2
    assert hits.get(key) is None
    for expires_in_s in (0.0, 60.0):
        hits.put(key, hits.ticket(), hit("lasting"), "e1", "t1", "m1", REPLICA, expires_in_s=expires_in_s)
        clock.now += 1.9
        assert hits.get(key) is not None
        clock.now += 0.2
        assert hits.get(key) is None


def test_nothing_is_served_or_kept_while_the_notices_are_not_known_to_arrive():
    hits, _ = live_hits()
    key = stored(hits, "q", "e1")
    hits.subscribed(False)
    assert hits.get(key) is None
    assert stored(hits, "r", "e2") is not None
    hits.subscribed(True)
    hits.announce(HEARTBEAT)
    assert hits.get(hits.key(plan(), messages("r"))) is None


def test_no_copy_is_served_or_kept_before_the_subscriptions_first_heartbeat():
    """A subscription where the cache service does not publish is up and
    hears nothing: its copies were served for their whole age limit after
    an Invalidate. Whatever the last subscription heard does not count."""
    hits = HotExactHits(16, 600.0, Clock(100.0))
    for _ in range(2):
        hits.subscribed(True)
        assert not hits.live
        key = stored(hits, "q", "e1")
        assert hits.get(key) is None and len(hits) == 0
        hits.announce(HEARTBEAT)
        assert hits.live
        stored(hits, "q", "e1")
        assert hits.get(key) is not None
        hits.subscribed(False)
        assert not hits.live and len(hits) == 0


def test_copies_are_bypassed_once_no_heartbeat_came_for_the_bound_and_dropped_at_the_next():
    hits, clock = live_hits(max_age_s=600.0, heartbeat_lost_after_s=3.0)
    key = stored(hits, "q", "e1")
    unasked = stored(hits, "s", "e3")
    clock.now += 3.0
    assert hits.get(key) is not None
    # A lookup under way as the heartbeat goes silent.
    ticket = hits.ticket()
    clock.now += 0.01
    # The copy asked for meanwhile goes; nothing is kept.
    assert not hits.live and hits.get(key) is None
    assert stored(hits, "r", "e2") is not None and len(hits) == 1
    # What the silence held back is unknown: the copy from before it is
    # dropped, and the lookup from before it puts nothing back.
    hits.announce(HEARTBEAT)
    assert hits.live and len(hits) == 0
    assert hits.get(unasked) is None
    hits.put(key, ticket, hit("stale"), "e1", "t1", "m1", REPLICA)
    assert hits.get(key) is None
    stored(hits, "q", "e1")
    assert hits.get(key) is not None
    # Heartbeats in time keep the copies.
    for _ in range(5):
        clock.now += 2.9
        hits.announce(HEARTBEAT)
    assert hits.get(key) is not None


def test_a_heartbeats_silence_is_logged_once_as_a_warning_and_its_end_once_at_info():
    hits = HotExactHits(16, 600.0, (clock := Clock(100.0)), heartbeat_lost_after_s=3.0)

    def told() -> list[str]:
        return [entry["log_level"] for entry in logs]

    with structlog.testing.capture_logs() as logs:
        # A subscription that is down is the listener's to log.
        clock.now += 10.0
        hits.check_heartbeat()
        hits.subscribed(True)
        clock.now += 3.0
        hits.check_heartbeat()
        assert told() == []
        # None since the subscription came up (a router not told the cache's Redis).
        clock.now += 0.5
        for _ in range(3):
            hits.check_heartbeat()
            clock.now += 1.0
        assert told() == ["warning"]
        for _ in range(2):
            hits.announce(HEARTBEAT)
            hits.check_heartbeat()
        assert told() == ["warning", "info"]
        # Silent again after heartbeats were heard.
        clock.now += 3.0
        hits.check_heartbeat()
        assert told() == ["warning", "info"]
        clock.now += 0.5
        hits.check_heartbeat()
        hits.check_heartbeat()
        assert told() == ["warning", "info", "warning"]
    assert "router.cache_redis_url" in logs[0]["event"]


def test_a_heartbeat_reads_as_an_entry_notice_of_no_entry_to_a_router_from_before_heartbeat_ids():
    """A router that cannot read a notice drops every copy it holds: a
    heartbeat of a kind of its own would have done that once a second in
    the routers not yet upgraded. Routers from before heartbeats, and from
    before their ids (which took ``e heartbeat`` alone for one), read it as
    the notice of an id no entry has."""
    heartbeat_id = cache_notices.new_heartbeat_id()
    heartbeat = cache_notices.heartbeat(heartbeat_id)
    assert cache_notices.parse(heartbeat) == cache_notices.Heartbeat(heartbeat_id)
    named = heartbeat.removeprefix(b"e ").decode()
    assert cache_notices.entry_notice(named) == heartbeat
    assert not keys.is_entry_id(named)
    # Nor is it the bare heartbeat from before the ids, on whose word a
    # router of then copied every replica's hits, heard or not.
    assert cache_notices.parse(b"e heartbeat") == cache_notices.EntryNotice("heartbeat")
    assert heartbeat != b"e heartbeat"


@pytest.mark.parametrize("checked", [False, True], ids=["back-before-the-check", "checked-meanwhile"])
def test_a_hit_is_copied_and_its_copy_served_only_while_the_heartbeat_it_names_is_heard(checked):
    """A router hearing another mesh's Redis hears that mesh's cache
    services; one cache replica alone on another Redis is heard by no
    router. Either way a heartbeat is heard, but not the one of the replica
    that answered, whose notices do not reach this router: its hits were
    copied all the same."""
    hits, clock = live_hits(max_age_s=600.0, heartbeat_lost_after_s=3.0)
    elsewhere = "feedfacefeedface"
    asked, unasked = (hits.key(plan(), messages(text)) for text in ("q", "s"))
    hits.put(asked, hits.ticket(), hit("elsewhere"), "e1", "t1", "m1", elsewhere)
    assert hits.get(asked) is None and len(hits) == 0
    # Once its heartbeat is heard, its hits are copied too.
    hits.announce(cache_notices.heartbeat(elsewhere))
    for key, entry_id in ((asked, "e1"), (unasked, "e3")):
        hits.put(key, hits.ticket(), hit("elsewhere"), entry_id, "t1", "m1", elsewhere)
    assert hits.get(asked) is not None
    # Its heartbeat unheard for the bound, its copies go, whether asked for
    # meanwhile or not; another replica's, heard, stay.
    other = stored(hits, "r", "e2")
    for _ in range(3):
        clock.now += 1.5
        hits.announce(HEARTBEAT)
        if checked:
            hits.check_heartbeat()
    assert hits.get(asked) is None
    hits.announce(cache_notices.heartbeat(elsewhere))
    assert hits.get(unasked) is None and len(hits) == 1
    assert hits.get(other) is not None


def test_a_hit_of_a_cache_from_before_heartbeat_ids_is_not_copied():
    """Its heartbeat, the bare ``e heartbeat``, names no replica, and its
    hits name none: a router beside such caches keeps no copies."""
    hits = HotExactHits(16, 600.0, Clock(100.0))
    hits.subscribed(True)
    hits.announce(b"e heartbeat")
    assert not hits.live
    key = hits.key(plan(), messages("q"))
    hits.put(key, hits.ticket(), hit("old"), "e1", "t1", "m1", "")
    assert hits.get(key) is None and len(hits) == 0


def test_hits_naming_a_heartbeat_not_heard_put_the_copies_out_of_use_warned_of_once():
    hits, clock = live_hits(heartbeat_lost_after_s=3.0)
    elsewhere = "feedfacefeedface"
    key = hits.key(plan(), messages("q"))

    def told() -> list[str]:
        return [entry["log_level"] for entry in logs]

    with structlog.testing.capture_logs() as logs:
        assert hits.live
        hits.put(key, hits.ticket(), hit("elsewhere"), "e1", "t1", "m1", elsewhere)
        assert not hits.live
        # A replica's first hits may come before its first heartbeat: no
        # warning until they have named it for the bound.
        for _ in range(3):
            hits.check_heartbeat()
            clock.now += 1.0
            hits.announce(HEARTBEAT)
            hits.put(key, hits.ticket(), hit("elsewhere"), "e1", "t1", "m1", elsewhere)
        assert told() == []
        clock.now += 0.5
        hits.check_heartbeat()
        hits.check_heartbeat()
        assert told() == ["warning"] and logs[0]["heartbeat_ids"] == [elsewhere]
        assert not hits.live
        # No hit has named it for the bound: the copies are in use again.
        clock.now += 3.1
        hits.announce(HEARTBEAT)
        hits.check_heartbeat()
        assert hits.live and told() == ["warning", "info"]


def test_an_entry_notice_drops_every_copy_of_that_entry_only():
    hits, _ = live_hits()
    # Two requests the cache folds into one entry (whitespace) are two copies here.
    first = stored(hits, "q", "e1")
    second = stored(hits, "q  ", "e1")
    other = stored(hits, "r", "e2")
    hits.announce(cache_notices.entry_notice("e1"))
    assert hits.get(first) is None
    assert hits.get(second) is None
    assert hits.get(other) is not None


def test_a_semantic_copy_is_dropped_by_the_notice_of_its_match_or_of_the_asked_prompts_entry():
    hits, _ = live_hits()
    scope = plan()
    variant = hits.key(scope, messages("why is the sky blue"))
    # Matched entry "e1"; the asked prompt's own entry (none yet) is "asked".
    for notice in ("e1", "asked"):
        hits.put(
            variant,
            hits.ticket(),
            hit("matched"),
            "e1",
            scope.tenant_id,
            scope.model,
            REPLICA,
            asked_entry_id="asked",
        )
        other = stored(hits, "r", "e2")
        hits.announce(cache_notices.entry_notice(notice))
        assert hits.get(variant) is None, notice
        assert hits.get(other) is not None
        # Nothing is left filed under either id.
        hits.announce(cache_notices.entry_notice("e2"))
        assert len(hits) == 0
        assert not hits._by_entry


def test_a_scope_notice_drops_a_tenants_model_or_all_its_models():
    hits, _ = live_hits()
    t1_m1 = stored(hits, "q", "e1", plan("t1", "m1"))
    t1_m2 = stored(hits, "q", "e2", plan("t1", "m2"))
    t2_m1 = stored(hits, "q", "e3", plan("t2", "m1"))
    hits.announce(cache_notices.scope_notice("t1", "m1"))
    assert [hits.get(k) is not None for k in (t1_m1, t1_m2, t2_m1)] == [False, True, True]
    hits.announce(cache_notices.scope_notice("t1", ""))
    assert [hits.get(k) is not None for k in (t1_m2, t2_m1)] == [False, True]


def test_an_unreadable_notice_drops_everything():
    hits, _ = live_hits()
    key = stored(hits, "q", "e1")
    hits.announce(b"z something new")
    assert hits.get(key) is None


def test_a_lookup_in_flight_during_a_notice_that_concerns_its_copy_puts_nothing_back():
    hits, _ = live_hits()
    key = hits.key(plan(), messages("q"))
    for change in (
        lambda: hits.announce(cache_notices.entry_notice("e1")),
        lambda: hits.announce(cache_notices.entry_notice("asked")),
        lambda: hits.announce(cache_notices.scope_notice("t1", "m1")),
        lambda: hits.announce(cache_notices.scope_notice("t1", "")),
        lambda: hits.announce(b"z something new"),
        hits.clear,
        lambda: hits.forget(key),
    ):
        ticket = hits.ticket()
        change()
        hits.put(key, ticket, hit("stale"), "e1", "t1", "m1", REPLICA, asked_entry_id="asked")
        assert hits.get(key) is None
    hits.put(key, hits.ticket(), hit("fresh"), "e1", "t1", "m1", REPLICA)
    assert hits.get(key).answer.text == "fresh"


def test_a_notice_for_another_entry_or_scope_during_a_lookup_does_not_refuse_its_copy():
    hits, _ = live_hits()
    key = hits.key(plan(), messages("q"))
    ticket = hits.ticket()
    # Every Store announces its entry: under misses, these arrive all the time.
    hits.announce(cache_notices.entry_notice("another"))
    hits.announce(cache_notices.scope_notice("t2", ""))
    hits.announce(cache_notices.scope_notice("t1", "m2"))
    hits.forget(hits.key(plan(), messages("another question")))
    hits.put(key, ticket, hit("fresh"), "e1", "t1", "m1", REPLICA, asked_entry_id="asked")
    assert hits.get(key).answer.text == "fresh"


def test_once_the_notices_it_remembers_are_trimmed_a_lookup_older_than_the_trimmed_one_is_refused():
    hits, _ = live_hits(recent_notices=2)
    key = hits.key(plan(), messages("q"))
    ticket = hits.ticket()
    hits.announce(cache_notices.entry_notice("e1"))
    hits.announce(cache_notices.entry_notice("a"))
    hits.announce(cache_notices.entry_notice("b"))  # e1's notice is no longer remembered
    hits.put(key, ticket, hit("stale"), "e1", "t1", "m1", REPLICA)
    assert hits.get(key) is None
    # A lookup after the trimmed notice is not refused by it.
    after_trim = hits.ticket()
    hits.announce(cache_notices.entry_notice("c"))
    hits.announce(cache_notices.entry_notice("d"))
    hits.put(key, after_trim, hit("fresh"), "e1", "t1", "m1", REPLICA)
    assert hits.get(key).answer.text == "fresh"


def test_the_least_recently_served_copy_goes_first():
    hits, _ = live_hits(max_entries=2)
    a = stored(hits, "a", "ea")
    b = stored(hits, "b", "eb")
    assert hits.get(a) is not None  # a is now the most recent
    c = stored(hits, "c", "ec")
    assert len(hits) == 2
    assert hits.get(b) is None
    assert hits.get(a) is not None and hits.get(c) is not None
    # Its entry's index went with it: a notice for it touches nothing else.
    hits.announce(cache_notices.entry_notice("eb"))
    assert len(hits) == 2


def test_the_answers_held_stay_under_the_byte_bound_least_recent_going_first():
    hits, _ = live_hits(64, max_bytes=1024 * 1024)
    large = "x" * (60 * 1024)  # under a sixteenth of the bound: kept
    keys = []
    for number in range(20):
        key = hits.key(plan(), messages(f"q{number}"))
        hits.put(key, hits.ticket(), hit(large), f"e{number}", "t1", "m1", REPLICA)
        keys.append(key)
        assert hits.bytes_held <= 1024 * 1024
    # The bound holds 17 of them (49 bytes of str header each); the entry
    # cap (64) is not what binds.
    assert len(hits) == 1024 * 1024 // (60 * 1024 + 49) == 17
    assert hits.get(keys[0]) is None and hits.get(keys[-1]) is not None
    # What was dropped (by notice, age or bound) gives its bytes back.
    hits.announce(cache_notices.entry_notice("e19"))
    assert hits.bytes_held == len(hits) * (60 * 1024 + 49)
    hits.clear()
    assert hits.bytes_held == 0


def test_an_answer_over_a_sixteenth_of_the_byte_bound_is_not_kept():
    hits, _ = live_hits(max_bytes=1024 * 1024)
    small = stored(hits, "small", "e1")
    key = hits.key(plan(), messages("huge"))
    hits.put(key, hits.ticket(), hit("x" * (64 * 1024)), "e2", "t1", "m1", REPLICA)
    assert hits.get(key) is None
    assert hits.get(small) is not None


def test_notices_round_trip_and_malformed_ones_parse_to_none():
    assert cache_notices.parse(cache_notices.entry_notice("ab12")) == cache_notices.EntryNotice("ab12")
    scope = cache_notices.ScopeNotice("a b:*", "")
    assert cache_notices.parse(cache_notices.scope_notice(scope.tenant_id, scope.model)) == scope
    for malformed in (b"", b"e", b"e ", b"s zz 00", b"s  ", b"x 1", b"e \xff"):
        assert cache_notices.parse(malformed) is None


def test_a_turn_computes_its_key_once_however_often_it_asks(monkeypatch):
    from services.router import hot_exact

    digests = []
    real_blake2b = hot_exact.hashlib.blake2b

    def counting_blake2b(*args, **kwargs):
        digests.append(1)
        return real_blake2b(*args, **kwargs)

    monkeypatch.setattr(hot_exact.hashlib, "blake2b", counting_blake2b)
    scope, prompt = plan(), messages("what is the capital of France?")
    # The exact lookup, the semantic lookup and the store of one turn.
    first = HotExactHits.key(scope, prompt)
    assert HotExactHits.key(scope, prompt) is first and HotExactHits.key(scope, prompt) is first
    assert len(digests) == 1
    # An equal prompt in another turn (another plan) is the same key, computed anew.
    assert HotExactHits.key(plan(), messages("what is the capital of France?")) == first
    assert len(digests) == 2
    # Another prompt under the same plan has its own key.
    assert HotExactHits.key(scope, messages("and of Spain?")) != first


def test_a_plan_for_another_model_does_not_inherit_the_keys_computed_for_the_first():
    import dataclasses

    scope, prompt = plan(model="m1"), messages("what is the capital of France?")
    first = HotExactHits.key(scope, prompt)
    # What model selection does to a turn's plan.
    reselected = dataclasses.replace(scope, model="m2")
    assert reselected.hot_exact_keys == {} and reselected.hot_exact_keys is not scope.hot_exact_keys
    assert HotExactHits.key(reselected, prompt) == HotExactHits.key(plan(model="m2"), prompt) != first
