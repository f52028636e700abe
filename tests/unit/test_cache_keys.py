"""What makes two prompts one cache entry, and what keeps partitions apart."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshgate.cache.v1 import cache_service_pb2 as pb
from meshgate.common.v1 import common_pb2
from services.cache import keys

USER = common_pb2.ROLE_USER
ASSISTANT = common_pb2.ROLE_ASSISTANT
SYSTEM = common_pb2.ROLE_SYSTEM


def msg(content: str, role: int = USER) -> common_pb2.Message:
    return common_pb2.Message(role=role, content=content)


def scope(tenant: str = "acme", model: str = "tiny-gpt", **parameters) -> pb.CacheScope:
    return pb.CacheScope(
        tenant_id=tenant, model=model, parameters=common_pb2.GenerationParameters(**parameters)
    )


def entry(s: pb.CacheScope, *messages: common_pb2.Message) -> str:
    return keys.entry_id(keys.partition(s), messages)


def test_normalization_folds_spaces_in_a_line_and_keeps_case_lines_and_indentation():
    assert keys.normalize_text("  What is\tthe  capital   of France? \n") == "What is the capital of France?"
    assert keys.normalize_text("def f(x):\n    return  2 \n") == "def f(x):\n    return 2"
    assert keys.normalize_text("Python") != keys.normalize_text("python")
    # Composed and decomposed forms of one character are one text.
    assert keys.normalize_text("caf\u00e9") == keys.normalize_text("cafe\u0301")


def test_relative_indentation_and_characters_other_than_spaces_and_tabs_are_kept():
    """A bug hunt: the text was trimmed before its lines were read, so two
    blocks differing in their first line's indentation were one entry (an
    IndentationError and a valid block), and str.split() folded no-break
    spaces, form feeds and other separators as spaces or line breaks."""
    n = keys.normalize_text
    assert n("  if ready:\n  launch()") != n("if ready:\n  launch()")
    # One line loses its leading blanks (a typing slip more often than code).
    assert n("  What is 2 + 2?") == n("What is 2 + 2?")
    # Nor the indentation all lines share (a review: dedented, an indented
    # block, an IndentationError at top level, was the unindented one).
    assert n("  x = 1\n  y = 2") != n("x = 1\ny = 2")
    assert n("Is 'a\u00a0b' == 'a b'?") != n("Is 'a b' == 'a b'?")
    assert n("a\fb") != n("a\nb") and n("a\u2028b") != n("a\nb") and n("a\rb") != n("a\nb")
    # A Windows line break is a line break.
    assert n("line one\r\n  line two\r\n") == n("line one\n  line two")
    # Blank lines: dropped at the ends, kept (empty) inside.
    assert n("\n \t\nfirst\n   \nsecond\n\n") == "first\n\nsecond"


_PIECES = [" ", "\t", "\r", "\n", "\xa0", "\u2028", "a", "B", "é", "e\u0301"]


@given(st.lists(st.sampled_from(_PIECES)).map("".join))
def test_normalizing_twice_changes_nothing(text):
    """A review: 'x\\r\\r\\ny' normalized to 'x\\r\\ny', which normalized again to
    'x\\ny', so a text normalized before it was keyed (a conversation's reply)
    and the same text keyed at once could differ."""
    once = keys.normalize_text(text)
    assert keys.normalize_text(once) == once


def test_entries_stored_under_the_former_normalization_are_never_reached():
    """It made texts equal that differ: the names of normalized texts
    changed with it, so no entry stored under it answers a prompt now."""
    s = scope()
    assert entry(s, msg("if ready:\n  launch()")) != keys._conversation_digest(
        keys.partition(s), [msg("if ready:\n  launch()")], b"mg-cache-entry", b""
    )


def test_whitespace_variants_share_an_entry_but_case_and_role_do_not():
    s = scope()
    base = entry(s, msg("What is the capital of France?"))
    assert entry(s, msg("  What is the   capital of France?  \n")) == base
    assert entry(s, msg("what is the capital of france?")) != base
    assert entry(s, msg("What is the capital of France?", SYSTEM)) != base


def test_message_boundaries_are_part_of_the_key():
    s = scope()
    assert entry(s, msg("ab"), msg("c")) != entry(s, msg("a"), msg("bc"))
    assert entry(s, msg("a"), msg("b")) != entry(s, msg("a b"))


def test_tenants_models_and_parameters_are_separate_partitions():
    question = msg("What is the capital of France?")
    base = entry(scope(), question)
    assert entry(scope(tenant="globex"), question) != base
    assert entry(scope(model="other-model"), question) != base
    assert entry(scope(max_tokens=32), question) != base
    assert entry(scope(temperature=0.7), question) != base


def test_unset_and_zero_parameters_differ():
    question = msg("Hi")
    assert entry(scope(temperature=0.0), question) != entry(scope(), question)
    assert entry(scope(seed=0), question) != entry(scope(), question)


def test_stop_sequences_are_a_set():
    question = msg("Hi")
    assert entry(scope(stop=["b", "a"]), question) == entry(scope(stop=["a", "b"]), question)
    assert entry(scope(stop=["a", "a", "b"]), question) == entry(scope(stop=["a", "b"]), question)
    assert entry(scope(stop=["a"]), question) != entry(scope(stop=["a", "b"]), question)


def test_separators_in_tenant_and_model_cannot_forge_another_partition():
    one = keys.partition(scope(tenant="a:b", model="c"))
    other = keys.partition(scope(tenant="a", model="b:c"))
    assert one.digest != other.digest
    assert one.key_prefix != other.key_prefix


def test_context_separates_single_questions_conversations_tenants_and_embedding_models():
    p = keys.partition(scope())
    single = keys.context_id(p, "minilm")
    in_conversation = keys.context_id(p, "minilm", conversational=True)
    assert single == keys.context_id(p, "minilm") and single != in_conversation
    assert single != keys.context_id(p, "other-embedder")
    assert in_conversation != keys.context_id(p, "other-embedder", conversational=True)
    other_tenant = keys.partition(scope(tenant="globex"))
    assert single != keys.context_id(other_tenant, "minilm")
    assert in_conversation != keys.context_id(other_tenant, "minilm", conversational=True)


def test_entry_and_context_ids_never_collide():
    p = keys.partition(scope())
    messages = [msg("Hi")]
    assert keys.entry_id(p, []) != keys.context_id(p, "")
    assert keys.entry_id(p, messages) != keys.context_id(p, "", conversational=True)


def test_tenant_prefix_is_glob_safe_and_exact():
    prefix = keys.tenant_prefix("a*[?]")
    assert not set("*[?]") & set(prefix)
    # Tenant "a" must not match the keys of tenant "ab".
    assert not keys.partition(scope(tenant="ab")).key_prefix.startswith(keys.tenant_prefix("a"))
    p = keys.partition(scope(tenant="acme", model="tiny-gpt"))
    assert p.exact_key("x").startswith(keys.tenant_prefix("acme", "tiny-gpt"))
    assert p.exact_key("x").startswith(keys.tenant_prefix("acme"))
    assert not p.exact_key("x").startswith(keys.tenant_prefix("acme", "tiny"))


def test_code_that_differs_only_in_indentation_is_two_entries():
    """One returns 2, the other None: one entry served the first's answer to both."""
    s = scope()
    returns_two = "What does this return?\ndef f():\n    x = 2\n    return x"
    returns_none = "What does this return?\ndef f():\n    x = 2\nreturn x"
    assert entry(s, msg(returns_two)) != entry(s, msg(returns_none))


def test_a_scopes_route_separates_partitions_and_its_absence_changes_nothing():
    unrouted = keys.partition(scope())
    assert keys.partition(pb.CacheScope(tenant_id="acme", model="tiny-gpt", route="")) == unrouted
    routed = [keys.partition(pb.CacheScope(tenant_id="acme", model="tiny-gpt", route=r)) for r in ("a", "b")]
    assert routed[0].digest != routed[1].digest != unrouted.digest
    # Invalidate of the alias still finds every route's entries: the key prefix names the alias.
    assert routed[0].key_prefix.startswith(keys.tenant_prefix("acme", "tiny-gpt"))
