"""The adaptive strategy's transcript message: older turns packed as lines of
one message, counted exactly with the real tokenizers of smollm2 and tiny-gpt."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate import tokenization
from meshgate.common.v1 import common_pb2
from meshgate.config import Settings
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.context import assembly, token_counts
from tests.unit.test_smollm2_tokenizer import build_smollm2_files

SYSTEM, USER, ASSISTANT = common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT
MODELS = Settings().models
ALIASES = ("smollm2", "tiny-gpt")


@pytest.fixture(scope="module")
def counters() -> dict[str, token_counts.PromptCounter]:
    build_smollm2_files()
    return token_counts.for_models(MODELS)


def n(alias: str, text: str) -> int:
    return len(tokenization.load(MODELS[alias].tokenizer).encode(text, add_special_tokens=False).ids)


def prompt_length(alias: str, messages: list[common_pb2.Message]) -> int:
    """Tokens of the whole rendered prompt, as the model counts them."""
    model = MODELS[alias]
    prompt = tokenization.load_chat_template(model.chat_template).render_messages(
        messages, as_text=tokenization.as_text(model.tokenizer)
    )
    return n(alias, prompt)


def msg(role: int, content: str) -> common_pb2.Message:
    return common_pb2.Message(role=role, content=content)


# Pieces that would break additivity at a line's ends if the tokenizer merged
# across them: whitespace of every kind (the rstrip must match the
# tokenizer's idea of whitespace), digits, punctuation, multi-byte characters,
# special-token text, speaker names.
_CONTENT = st.lists(
    st.one_of(
        st.sampled_from(
            [
                " ",
                "  ",
                "\n",
                "\r\n",
                "\t",
                "\u00a0",
                "\u3000",
                "\u200b",
                "\u2028",
                "\x0b",
                "a",
                "Hi",
                "1",
                "23",
                ".",
                ":",
                "?!",
                "<|im_end|>",
                "<|im_start|>",
                "é",
                "e\u0301",
                "東",
                "🎉",
                "user:",
                "assistant",
                "[SEP]",
                "'s",
            ]
        ),
        st.text(max_size=3),
    ),
    max_size=10,
).map("".join)
_TURNS = st.lists(st.tuples(st.sampled_from([USER, ASSISTANT]), _CONTENT), max_size=8)


def test_both_models_pack(counters) -> None:
    for alias in ALIASES:
        counter = counters[alias]
        assert counter.transcript_tokens == n(alias, counter.framed(assembly.transcript([]))), alias


def test_a_line_names_its_speaker_and_drops_trailing_whitespace() -> None:
    assert assembly.transcript_line(msg(USER, "  hello there \n\t")) == "user:   hello there\n"
    assert assembly.transcript_line(msg(ASSISTANT, "")) == "assistant:\n"
    assert assembly.transcript_line(msg(ASSISTANT, " \n ")) == "assistant:\n"
    message = assembly.transcript([msg(USER, "a"), msg(ASSISTANT, "b")])
    assert message.role == common_pb2.ROLE_USER
    assert message.content == "Earlier in this conversation:\nuser: a\nassistant: b\n"


@settings(max_examples=300, deadline=None)
@given(turns=_TURNS)
def test_a_transcript_costs_its_frame_and_header_plus_its_lines(counters, turns) -> None:
    messages = [msg(role, content) for role, content in turns]
    for alias in ALIASES:
        counter = counters[alias]
        whole = n(alias, counter.framed(assembly.transcript(messages)))
        lines = asyncio.run(counter.count_lines(messages))
        assert lines == [n(alias, counter.line(m)) for m in messages]
        assert whole == counter.transcript_tokens + sum(lines), alias


def plan_and_render(counter, turns, new, budget, scores, floor=2, pinned=()):
    counts = asyncio.run(counter.count(turns))
    lines = asyncio.run(counter.count_lines(turns))
    costs = assembly.SessionCosts.of(
        [assembly.TurnCost(m.role, c, line) for m, c, line in zip(turns, counts, lines, strict=True)]
    )
    candidates = [assembly.Candidate(m, c) for m, c in zip(new, asyncio.run(counter.count(new)), strict=True)]
    chosen = assembly.plan(
        costs,
        [assembly.TurnCost(c.message.role, c.tokens) for c in candidates],
        budget,
        counter.template_tokens,
        pinned_turns=pinned,
        relevance=scores,
        recency_floor=floor,
        transcript_tokens=counter.transcript_tokens,
    )
    response = assembly.render(chosen, costs, dict(enumerate(turns)), candidates, (), scores)
    return chosen, response


_CONVERSATIONS = st.tuples(
    st.lists(st.tuples(st.sampled_from([SYSTEM, USER, ASSISTANT, ASSISTANT]), _CONTENT), max_size=40),
    st.integers(min_value=0, max_value=2**32 - 1),
    st.integers(min_value=20, max_value=400),
    st.integers(min_value=0, max_value=4),
)


@settings(max_examples=150, deadline=None)
@given(conversation=_CONVERSATIONS)
def test_a_packed_prompt_is_counted_exactly_and_fits(counters, conversation) -> None:
    turns_spec, seed, budget, floor = conversation
    rng = np.random.default_rng(seed)
    turns = [msg(role, content) for role, content in turns_spec]
    scores = np.where(rng.random(len(turns)) < 0.3, 0.0, rng.random(len(turns)))
    pinned = [i for i in range(len(turns)) if rng.random() < 0.1]
    new = [msg(USER, "what did we say?")]
    for alias in ALIASES:
        counter = counters[alias]
        try:
            chosen, response = plan_and_render(counter, turns, new, budget, scores, floor, pinned)
        except MeshgateError as error:
            # What must be kept (system and pinned turns, the question) exceeds the budget.
            assert error.reason == Reason.CONTEXT_WINDOW_EXCEEDED
            continue
        real = prompt_length(alias, list(response.messages))
        assert response.manifest.prompt_tokens == real <= budget, alias
        included = [e for e in response.manifest.entries if e.disposition == pb.DISPOSITION_INCLUDED]
        template = counter.template_tokens
        has_system = any(m.role == SYSTEM for m in response.messages)
        outside = template.prompt_prefix + template.generation_prompt
        outside += 0 if has_system else template.default_system
        assert sum(e.tokens for e in included) + outside == real, alias
        assert [e.index for e in response.manifest.entries if e.packed] == chosen.packed


def planted(count: int) -> list[common_pb2.Message]:
    return [
        msg(USER if i % 2 == 0 else ASSISTANT, f"turn {i} says something about topic {i % 7} today.")
        for i in range(count)
    ]


def test_packing_keeps_more_turns_in_the_same_budget(counters) -> None:
    counter = counters["smollm2"]
    turns = planted(120)
    scores = np.linspace(1.0, 0.1, len(turns))
    packed, response = plan_and_render(counter, turns, [msg(USER, "topic 3?")], 600, scores)
    unpacked = assembly.plan(
        assembly.SessionCosts.of(
            [assembly.TurnCost(m.role, c) for m, c in zip(turns, asyncio.run(counter.count(turns)))]
        ),
        [assembly.TurnCost(USER, asyncio.run(counter.count([msg(USER, "topic 3?")]))[0])],
        600,
        counter.template_tokens,
        relevance=scores,
        recency_floor=2,
    )
    assert len(packed.kept()) > len(unpacked.kept())
    assert not unpacked.packed
    # The floor's two newest turns are messages of their own, after the transcript.
    floor = [len(turns) - 2, len(turns) - 1]
    assert [packed.reasons[i] for i in floor] == [pb.INCLUSION_REASON_RECENCY] * 2
    assert not set(floor) & set(packed.packed)
    messages = list(response.messages)
    assert messages[0].content.startswith(assembly.TRANSCRIPT_HEADER)
    assert messages[1:3] == [turns[i] for i in floor]
    # Oldest first, each packed turn a line.
    lines = messages[0].content.removeprefix(assembly.TRANSCRIPT_HEADER).splitlines(keepends=True)
    assert lines == [assembly.transcript_line(turns[i]) for i in packed.packed]
    assert packed.packed == sorted(packed.packed)
    entries = response.manifest.entries
    for i in packed.packed:
        assert entries[i].packed and entries[i].reason == pb.INCLUSION_REASON_RELEVANCE
        assert entries[i].tokens == asyncio.run(counter.count_lines([turns[i]]))[0]
    (frame,) = [e for e in entries if e.source == pb.SOURCE_TRANSCRIPT]
    assert frame.tokens == counter.transcript_tokens
    assert frame.reason == pb.INCLUSION_REASON_TRANSCRIPT


def test_pinned_and_system_turns_stay_messages_of_their_own(counters) -> None:
    counter = counters["smollm2"]
    turns = planted(30)
    turns[0] = msg(SYSTEM, "Be brief.")
    scores = np.ones(len(turns))
    # Everything fits as messages: nothing is packed.
    chosen, response = plan_and_render(counter, turns, [msg(USER, "q")], 4000, scores, pinned=[10])
    assert len(chosen.kept()) == 30 and not chosen.packed
    assert list(response.messages)[:30] == turns
    # Not everything does: the relevant older turns are packed, never the system and pinned ones.
    everything = sum(asyncio.run(counter.count(turns))) + 30
    chosen, response = plan_and_render(counter, turns, [msg(USER, "q")], everything - 60, scores, pinned=[10])
    assert chosen.packed and 0 not in chosen.packed and 10 not in chosen.packed
    assert set(chosen.packed) <= set(range(1, 28)) - {10} and 1 in chosen.packed
    messages = list(response.messages)
    assert messages[0] == turns[0]
    assert messages[1].content.startswith(assembly.TRANSCRIPT_HEADER)
    # The pinned turn follows the transcript, whose oldest turn is older.
    assert messages[2] == turns[10]
    assert response.manifest.entries[10].reason == pb.INCLUSION_REASON_PINNED
    assert not response.manifest.entries[10].packed


def test_newest_and_unknown_line_counts_do_not_pack(counters) -> None:
    counter = counters["smollm2"]
    turns = planted(50)
    counts = asyncio.run(counter.count(turns))
    lines = asyncio.run(counter.count_lines(turns))
    with_lines = assembly.SessionCosts.of(
        [assembly.TurnCost(m.role, c, line) for m, c, line in zip(turns, counts, lines)]
    )
    required = [assembly.TurnCost(USER, 5)]
    newest = assembly.plan(
        with_lines, required, 500, counter.template_tokens, transcript_tokens=counter.transcript_tokens
    )
    assert not newest.packed and newest.transcript_tokens == 0
    # One turn of the session lacks its line count (stored before this change and not yet counted).
    without = assembly.SessionCosts.of(
        [
            assembly.TurnCost(m.role, c, None if i == 3 else line)
            for i, (m, c, line) in enumerate(zip(turns, counts, lines))
        ]
    )
    assert without.lines is None
    adaptive = assembly.plan(
        without,
        required,
        500,
        counter.template_tokens,
        relevance=np.ones(len(turns)),
        recency_floor=2,
        transcript_tokens=counter.transcript_tokens,
    )
    assert adaptive.kept() and not adaptive.packed


def test_the_frame_is_paid_once_and_only_when_something_is_packed(counters) -> None:
    counter = counters["smollm2"]
    turns = planted(6)
    # Only turn 2 is relevant; the floor (2 newest) takes at most half of what is left.
    scores = np.array([0.0, 0.0, 0.9, 0.0, 0.0, 0.0])
    new = [msg(USER, "topic 2?")]
    outside = counter.template_tokens.generation_prompt + counter.template_tokens.default_system
    base = outside + asyncio.run(counter.count(new))[0]
    floor_cost = sum(asyncio.run(counter.count(turns[-2:])))
    line = asyncio.run(counter.count_lines([turns[2]]))[0]
    frame = counter.transcript_tokens
    # Room for the floor (twice its cost, so the half-share admits it) and the packed line exactly.
    budget = base + 2 * floor_cost
    assert floor_cost >= frame + line  # planted turns are long enough for this arithmetic
    chosen, response = plan_and_render(counter, turns, new, budget, scores)
    assert chosen.packed[0] == 2 and chosen.transcript_tokens == frame
    assert response.manifest.prompt_tokens == prompt_length("smollm2", list(response.messages)) <= budget
    # Everything in the recency floor, nothing packed: no frame paid, no transcript message.
    chosen, response = plan_and_render(counter, turns, new, 1000, np.zeros(6), floor=6)
    assert len(chosen.kept()) == 6 and not chosen.packed and chosen.transcript_tokens == 0
    assert not any(m.content.startswith(assembly.TRANSCRIPT_HEADER) for m in response.messages)
    # Without a floor: the frame and the line exactly fit, and one token fewer does not.
    chosen, response = plan_and_render(counter, turns, new, base + frame + line, scores, floor=0)
    assert chosen.packed == [2] and chosen.prompt_tokens == base + frame + line
    assert prompt_length("smollm2", list(response.messages)) == base + frame + line
    chosen, _ = plan_and_render(counter, turns, new, base + frame + line - 1, scores, floor=0)
    assert 2 not in chosen.kept()
