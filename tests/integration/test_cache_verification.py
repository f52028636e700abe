"""Verified semantic hits through the real cache service, real Redis and
real minilm embeddings (inference service in front of Triton)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import string
import time

import pytest

from meshgate.cache.v1 import cache_service_pb2 as pb
from meshgate.config import CacheSettings
from tests.integration.test_cache_service import conversation, lookup, make_settings, running, scope, store

# Serial (make test runs it alone): bounds a call's latency beside lookups at 0.3 s.
pytestmark = [pytest.mark.integration, pytest.mark.serial]


@pytest.fixture(scope="module")
def settings(redis_url: str, inference_address: str):
    settings = make_settings(redis_url, inference_address)
    # The defaults: the 0.8 pre-filter and the 0.01 bound (threshold 0.897
    # in verifier_model.json; the paraphrase below scores 0.90, the traps
    # are vetoed at any bound).
    defaults = CacheSettings()
    settings.cache.semantic_threshold = defaults.semantic_threshold
    settings.cache.max_false_hit_rate = defaults.max_false_hit_rate
    return settings


@pytest.fixture(scope="module")
async def stub(settings):
    async with running(settings) as stub:
        yield stub


async def test_a_paraphrase_hits(stub, tenant):
    entry_id = await store(stub, tenant, conversation("What is the quickest way to learn Python?"))
    response = await lookup(stub, tenant, conversation("How can I learn Python fast?"))
    assert response.status == pb.LOOKUP_STATUS_SEMANTIC_HIT
    assert response.entry_id == entry_id


@pytest.mark.parametrize(
    ("stored", "asked"),
    [
        ("How do I reset my password?", "How do I not reset my password?"),
        ("How many eggs do I need for 2 cakes?", "How many eggs do I need for 3 cakes?"),
        ("How far is it from Paris to London?", "How far is it from London to Paris?"),
        ("How do I install Docker on Ubuntu?", "How do I install Docker on Windows?"),
        ("Is Python faster than Java?", "Is Java faster than Python?"),
    ],
)
async def test_negation_changed_number_and_swapped_entities_miss(stub, tenant, stored, asked):
    await store(stub, tenant, conversation(stored))
    before = await stub.GetStats(pb.GetStatsRequest())
    assert (await lookup(stub, tenant, conversation(asked))).status == pb.LOOKUP_STATUS_MISS
    after = await stub.GetStats(pb.GetStatsRequest())
    # Refused by the verifier, not by the pre-filter (all score above 0.86).
    assert after.verifier_rejections > before.verifier_rejections


def _names(tail: str) -> str:
    """A question of 160 names (1 KB, about the longest matched by meaning):
    50 that every such question says ("Azzaa", "Azzab", ...), enough for
    the first stage to embed it, then 110 of "A", two of the letters a-m
    and two more as ``tail`` maps them."""
    first = string.ascii_lowercase[:13]
    spellings = list(itertools.islice(itertools.product(first, repeat=4), 110))
    shared = ["Azz" + "".join(s[2:]) for s in spellings[:50]]
    letters = str.maketrans(first, tail)
    own = ["A" + "".join(s[:2]) + "".join(s[2:]).translate(letters) for s in spellings]
    return " ".join(["x", *shared, *own])


async def test_questions_of_names_one_typo_from_none_of_the_others_do_not_stall_other_callers(stub, tenant):
    # Each name of one question was compared with each word of the other
    # for a typo: ~30 ms of the cache's event loop per candidate and check,
    # with five candidates per lookup. Stored: the names with their last
    # two letters in n-z, two letters from every asked one (no typo), and
    # close enough in meaning to be verified, and vetoed.
    for shift in range(5):
        tail = string.ascii_lowercase[13 + shift :] + string.ascii_lowercase[13 : 13 + shift]
        await store(stub, tenant, conversation(_names(tail)))
    asked = conversation(_names(string.ascii_lowercase[:13]))
    before = await stub.GetStats(pb.GetStatsRequest())
    lookups = asyncio.ensure_future(asyncio.gather(*(lookup(stub, tenant, asked) for _ in range(8))))
    # Another caller's cheapest call, answered from memory, meanwhile; the
    # pause after it is timed too (all of this test shares the service's
    # event loop, so a stall can fall in either).
    slowest = 0.0
    while not lookups.done():
        started = time.perf_counter()
        await stub.GetStats(pb.GetStatsRequest())
        await asyncio.sleep(0.005)
        slowest = max(slowest, time.perf_counter() - started)
    assert {response.status for response in await lookups} == {pb.LOOKUP_STATUS_MISS}
    after = await stub.GetStats(pb.GetStatsRequest())
    assert after.verifier_rejections - before.verifier_rejections == 8 * 5
    assert slowest < 0.3, f"a GetStats call and a 5 ms pause took {slowest:.2f} s beside the lookups"


async def test_a_reported_wrong_entry_is_never_served_again(stub, tenant):
    stored, asked = "What is the quickest way to learn Python?", "How can I learn Python fast?"
    entry_id = await store(stub, tenant, conversation(stored))
    hit = await lookup(stub, tenant, conversation(asked))
    assert hit.entry_id == entry_id
    report = await stub.ReportWrongHit(
        pb.ReportWrongHitRequest(scope=scope(tenant), messages=conversation(asked), entry_id=entry_id)
    )
    assert report.entry_removed and report.reports_in_partition == 1
    for question in (asked, stored, "How do I learn Python fast?"):
        assert (await lookup(stub, tenant, conversation(question))).status == pb.LOOKUP_STATUS_MISS
    stats = await stub.GetStats(pb.GetStatsRequest())
    assert stats.wrong_hit_reports >= 1
    assert 0 < stats.expected_false_hit_rate <= stats.max_false_hit_rate == pytest.approx(0.01)


async def test_a_reported_pair_outlives_its_ttl_while_the_entry_is_stored_again(settings, tenant):
    """The pair reported expired cache.ttl_s after the report even when the
    entry it names was stored again meanwhile: the prompt reported was then
    served that entry once more (and the partition's strictness reset)."""
    settings = dataclasses.replace(settings, cache=dataclasses.replace(settings.cache, ttl_s=2))
    stored, asked = "What is the quickest way to learn Python?", "How can I learn Python fast?"
    async with running(settings) as stub:
        entry_id = await store(stub, tenant, conversation(stored))
        assert (await lookup(stub, tenant, conversation(asked))).entry_id == entry_id
        wrong = {"scope": scope(tenant), "messages": conversation(asked), "entry_id": entry_id}
        assert (await stub.ReportWrongHit(pb.ReportWrongHitRequest(**wrong))).entry_removed
        await asyncio.sleep(1.0)
        # Stored again by its own prompt: it lives 2 s from now.
        assert await store(stub, tenant, conversation(stored)) == entry_id
        await asyncio.sleep(1.5)
        # The report's own 2 s are over; the entry's are not.
        assert (await lookup(stub, tenant, conversation(stored))).entry_id == entry_id
        assert (await lookup(stub, tenant, conversation(asked))).status == pb.LOOKUP_STATUS_MISS
