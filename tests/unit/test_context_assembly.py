"""The assembly policy on plain data: what is kept, in what order, at what cost."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate.common.v1 import common_pb2
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.errors import MeshgateError
from services.context.assembly import Candidate, SessionCosts, TemplateTokens, assemble, plan

SYSTEM, USER, ASSISTANT = common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT


def turn(role: int, content: str, tokens: int) -> Candidate:
    """A candidate costing exactly ``tokens``, its template frame included."""
    return Candidate(common_pb2.Message(role=role, content=content), tokens)


def contents(response: pb.AssembleContextResponse) -> list[str]:
    return [m.content for m in response.messages]


def dispositions(response: pb.AssembleContextResponse, source: int) -> list[int]:
    return [e.disposition for e in response.manifest.entries if e.source == source]


INCLUDED, DROPPED = pb.DISPOSITION_INCLUDED, pb.DISPOSITION_DROPPED


def test_everything_fits() -> None:
    session = [turn(SYSTEM, "s", 5), turn(USER, "u1", 10), turn(ASSISTANT, "a1", 10)]
    new = [turn(USER, "u2", 10)]
    response = assemble(session, new, budget=100)
    assert contents(response) == ["s", "u1", "a1", "u2"]
    assert response.manifest.prompt_tokens == 35
    assert response.manifest.budget_tokens == 100
    assert dispositions(response, pb.SOURCE_SESSION) == [INCLUDED] * 3


def test_oldest_turns_are_dropped_first_and_system_is_kept() -> None:
    session = [
        turn(SYSTEM, "s", 5),
        turn(USER, "u1", 10),
        turn(ASSISTANT, "a1", 10),
        turn(USER, "u2", 10),
        turn(ASSISTANT, "a2", 10),
    ]
    new = [turn(USER, "u3", 10)]
    # 5 (system) + 10 (new) leaves 20: room for the two newest turns only.
    response = assemble(session, new, budget=35)
    assert contents(response) == ["s", "u2", "a2", "u3"]
    assert dispositions(response, pb.SOURCE_SESSION) == [
        INCLUDED,
        DROPPED,
        DROPPED,
        INCLUDED,
        INCLUDED,
    ]
    assert response.manifest.prompt_tokens == 35


def test_stops_at_the_first_turn_that_does_not_fit() -> None:
    """An older small turn after a gap would make an incoherent history."""
    session = [turn(USER, "small", 1), turn(ASSISTANT, "huge", 50), turn(USER, "recent", 5)]
    response = assemble(session, [turn(USER, "now", 5)], budget=20)
    assert contents(response) == ["recent", "now"]
    assert dispositions(response, pb.SOURCE_SESSION) == [DROPPED, DROPPED, INCLUDED]
    assert response.manifest.prompt_tokens == 10


def test_system_messages_come_first_then_history_then_new_messages() -> None:
    session = [turn(USER, "u1", 3), turn(SYSTEM, "s-late", 3), turn(ASSISTANT, "a1", 3)]
    new = [turn(SYSTEM, "s-new", 3), turn(USER, "u2", 3)]
    response = assemble(session, new, budget=100)
    assert contents(response) == ["s-late", "s-new", "u1", "a1", "u2"]


def test_manifest_lists_every_message_with_source_index_role_and_tokens() -> None:
    session = [turn(SYSTEM, "s", 5), turn(USER, "u1", 20), turn(ASSISTANT, "a1", 6)]
    new = [turn(USER, "u2", 7), turn(ASSISTANT, "prefill", 2)]
    response = assemble(session, new, budget=21)
    entries = [(e.source, e.index, e.role, e.tokens, e.disposition) for e in response.manifest.entries]
    assert entries == [
        (pb.SOURCE_SESSION, 0, SYSTEM, 5, INCLUDED),
        (pb.SOURCE_SESSION, 1, USER, 20, DROPPED),
        (pb.SOURCE_SESSION, 2, ASSISTANT, 6, INCLUDED),
        (pb.SOURCE_REQUEST, 0, USER, 7, INCLUDED),
        (pb.SOURCE_REQUEST, 1, ASSISTANT, 2, INCLUDED),
    ]
    assert response.manifest.prompt_tokens == 20


def test_exactly_full_budget_is_allowed() -> None:
    response = assemble([turn(USER, "u1", 10)], [turn(USER, "u2", 10)], budget=20)
    assert contents(response) == ["u1", "u2"]
    assert response.manifest.prompt_tokens == 20


def test_stateless_assembly_of_new_messages_alone() -> None:
    response = assemble([], [turn(SYSTEM, "s", 4), turn(USER, "u", 4)], budget=8)
    assert contents(response) == ["s", "u"]
    assert dispositions(response, pb.SOURCE_REQUEST) == [INCLUDED, INCLUDED]


def test_new_messages_over_budget_fail_with_the_numbers() -> None:
    with pytest.raises(MeshgateError) as caught:
        assemble([turn(USER, "old", 1)], [turn(USER, "big", 30)], budget=29)
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "CONTEXT_WINDOW_EXCEEDED"
    assert error.metadata == {"tokens": "30", "budget": "29"}


def test_session_system_messages_count_as_required() -> None:
    with pytest.raises(MeshgateError) as caught:
        assemble([turn(SYSTEM, "long rules", 20)], [turn(USER, "q", 10)], budget=25)
    assert caught.value.reason == "CONTEXT_WINDOW_EXCEEDED"
    assert caught.value.metadata == {"tokens": "30", "budget": "25"}


CHATML = TemplateTokens(generation_prompt=3, default_system=20)


def test_template_tokens_count_the_generation_prompt_and_a_default_system_prompt() -> None:
    # No system message: the template adds its default one.
    response = assemble([turn(USER, "u1", 10)], [turn(USER, "u2", 10)], budget=100, template=CHATML)
    assert response.manifest.prompt_tokens == 10 + 10 + 3 + 20
    # A system message replaces it, wherever it came from.
    with_system = assemble([turn(SYSTEM, "s", 5)], [turn(USER, "u", 10)], budget=100, template=CHATML)
    assert with_system.manifest.prompt_tokens == 5 + 10 + 3
    from_request = assemble([], [turn(SYSTEM, "s", 5), turn(USER, "u", 10)], budget=100, template=CHATML)
    assert from_request.manifest.prompt_tokens == 5 + 10 + 3


def test_template_tokens_take_room_from_the_history() -> None:
    session = [turn(USER, "u1", 10), turn(ASSISTANT, "a1", 10)]
    new = [turn(USER, "u2", 10)]
    # 33 for the template and the new message leaves 10: only the newest turn fits.
    response = assemble(session, new, budget=43, template=CHATML)
    assert contents(response) == ["a1", "u2"]
    assert response.manifest.prompt_tokens == 43
    with pytest.raises(MeshgateError) as caught:
        assemble([], new, budget=32, template=CHATML)
    assert caught.value.metadata == {"tokens": "33", "budget": "32"}


_ROLES = [common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT]


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.integers(1, 40), max_size=12),
    lines=st.lists(st.integers(1, 40), min_size=12, max_size=12),
    spare=st.integers(0, 300),
    adaptive=st.booleans(),
    floor=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_a_prompt_of_no_new_message_keeps_what_it_would_with_the_default_system_prompt_paid_up_front(
    tokens, lines, spare, adaptive, floor, seed
) -> None:
    """With no new message, the first turn kept pays the template's default
    system prompt (a prompt of no message does not have one). A review found
    the recency floor and the packing decision leaving that out, so such a
    prompt kept fewer turns than paying it up front does: it must keep the
    same ones, and cost the same but for the default when nothing is kept."""
    default = TemplateTokens(prompt_prefix=1, generation_prompt=4, default_system=21)
    up_front = TemplateTokens(prompt_prefix=1 + 21, generation_prompt=4, default_system=0)
    turns = SessionCosts(
        np.array([_ROLES[i % 2] for i in range(len(tokens))], dtype=np.int64),
        np.array(tokens, dtype=np.int64),
        np.array(lines[: len(tokens)], dtype=np.int64),
    )
    options = {}
    if adaptive:
        options = {
            "relevance": np.random.default_rng(seed).random(len(tokens)),
            "recency_floor": floor,
            "transcript_tokens": 11,
        }
    budget = 1 + 21 + 4 + spare
    deferred = plan(turns, [], budget, default, **options)
    paid = plan(turns, [], budget, up_front, **options)
    assert (deferred.reasons, deferred.packed) == (paid.reasons, paid.packed)
    kept_any = any(deferred.reasons)
    assert deferred.prompt_tokens == paid.prompt_tokens - (0 if kept_any else 21)


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 3), max_size=6),
    short_by=st.integers(0, 21),
    floor=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_with_less_left_than_the_default_system_prompt_the_plan_stays_within_its_budget(
    tokens, short_by, floor, seed
) -> None:
    """A review's fuzz: the floor's share added the whole unpaid default, so
    a zero-token turn passed it with less than that left (budget 16, 24)."""
    template = TemplateTokens(prompt_prefix=1, generation_prompt=4, default_system=21)
    roles = np.array([_ROLES[i % 2] for i in range(len(tokens))], dtype=np.int64)
    turns = SessionCosts(roles, np.array(tokens, dtype=np.int64))
    budget = 1 + 4 + 21 - short_by
    relevance = np.random.default_rng(seed).random(len(tokens))
    chosen = plan(turns, [], budget, template, relevance=relevance, recency_floor=floor)
    kept = [i for i, reason in enumerate(chosen.reasons) if reason]
    assert chosen.prompt_tokens == 1 + 4 + (21 + sum(tokens[i] for i in kept) if kept else 0)
    assert chosen.prompt_tokens <= budget
