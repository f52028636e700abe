"""On a Redis Cluster every script and transaction must name keys of one hash
slot, or Redis refuses it CROSSSLOT (redis-py's cluster client refuses it
first), and the mesh reads that as an outage (redis_access.CONNECTION_ERRORS):
a caller would be told UNAVAILABLE for ever. So each key builder's group, as
the scripts take it, must hash to one slot for every input, whatever a tenant
id, session id, model name or day holds: braces that would move a hash tag,
colons, the empty string, any unicode. The router's admission has its own
such test (test_router_admission.py), over its recorded script calls.

A tenant id is never empty: every service refuses one (TENANT_REQUIRED),
and an empty one would make the hex-tagged keys' tag ``{}``, which Redis
ignores (the whole key is hashed, and a tenant's two keys part). A session
id is what the context service admits (servicer._SESSION_ID: no braces).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from meshgate.cache.v1 import cache_service_pb2
from meshgate.common.v1 import common_pb2
from services.cache import keys as cache_keys
from services.context import servicer, store
from services.router import keys as api_keys
from services.router import ledger

# Anything a caller could send, braces and colons made likely.
text = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from("{}:"), max_size=24)
tenants = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from("{}:"), min_size=1, max_size=24)
session_ids = st.from_regex(servicer._SESSION_ID, fullmatch=True)


def one_slot(keys: list[str]) -> bool:
    return len({key_slot(key.encode()) for key in keys}) == 1


@given(tenant=tenants, session=session_ids)
def test_a_sessions_scripts_keys_share_one_slot(tenant: str, session: str) -> None:
    """Every script over a session takes session_keys, some with its usage
    record or its fork's request record beside them (store.py)."""
    assert one_slot(
        [
            *store.session_keys(tenant, session),
            store.unbilled_key(tenant, session),
            store.fork_request_key(tenant, session),
        ]
    )


@given(tenant=tenants)
def test_a_tenants_holdings_and_listing_keys_share_their_slots(tenant: str) -> None:
    assert one_slot([store.holdings_key(tenant, "bytes"), store.holdings_key(tenant, "expiry")])
    assert one_slot([store.listing_key(tenant, "newest"), store.listing_key(tenant, "due")])


@given(tenant=tenants, model=text, route=text, stop=st.lists(text, max_size=3), entry=text, context=text)
def test_a_cache_partitions_script_keys_share_one_slot(
    tenant: str, model: str, route: str, stop: list[str], entry: str, context: str
) -> None:
    """The store, report and undo scripts take these, and the semantic
    store deletes evicted entries it names from ``exact_key("")``."""
    scope = cache_service_pb2.CacheScope(
        tenant_id=tenant, model=model, route=route, parameters=common_pb2.GenerationParameters(stop=stop)
    )
    partition = cache_keys.partition(scope)
    assert one_slot(
        [
            partition.exact_key(entry),
            partition.exact_key(""),
            partition.order_key(context),
            partition.vectors_key(context),
            partition.sequence_key,
            partition.strictness_key(context),
            partition.reported_key(context),
        ]
    )


@given(tenant=tenants, window=st.integers(min_value=1, max_value=2**40), counter=text)
def test_the_caches_byte_charge_and_stats_keys_share_their_slots(
    tenant: str, window: int, counter: str
) -> None:
    assert one_slot(
        [
            cache_keys.stored_bytes_key(tenant, 3600, window),
            cache_keys.stored_bytes_key(tenant, 3600, window - 1),
        ]
    )
    assert one_slot([cache_keys.STATS_KEY, cache_keys.stats_flushed_key(counter)])


@given(tenant=tenants, day=text, name=text)
def test_a_ledger_calls_keys_share_its_marks_slot(tenant: str, day: str, name: str) -> None:
    """A call writes a tenant's day hash or the log, and marks itself in
    that key's slot (ledger.marker)."""
    day_key = ledger.day_key(tenant, day)
    assert one_slot([day_key, ledger.marker(day_key, name), ledger.take_marker(day_key, name)])
    assert one_slot([ledger.STREAM, ledger.marker(ledger.STREAM, name)])


@given(tenant=tenants, hashes=st.lists(text, max_size=3), request=text)
def test_the_api_key_stores_keys_share_one_slot(tenant: str, hashes: list[str], request: str) -> None:
    assert one_slot(
        [
            api_keys._TENANT_KEYS.format(tenant),
            api_keys._IDS,
            api_keys._REQUEST.format(request),
            *(api_keys._RECORD.format(key_hash) for key_hash in hashes),
        ]
    )
