"""The context service's counts are the model's own prompt length.

With the real tokenizers and chat templates of both models, the prompt
tokens the assembly reports equal the tokens of the prompt the inference
service renders from the assembled messages, which is what the model
tokenizes (neither model adds tokens of its own: tiny-gpt's [CLS] is in its template).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate import tokenization
from meshgate.common.v1 import common_pb2
from meshgate.config import ConfigError, Settings
from services.context import assembly, summaries, token_counts
from tests.unit.test_smollm2_tokenizer import build_smollm2_files

SYSTEM, USER, ASSISTANT = common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT
MODELS = Settings().models


@pytest.fixture(scope="module")
def counters() -> dict[str, token_counts.PromptCounter]:
    build_smollm2_files()
    return token_counts.for_models(MODELS)


def prompt_length(alias: str, messages: list[common_pb2.Message]) -> int:
    """Tokens of the whole rendered prompt, as the model counts them."""
    model = MODELS[alias]
    prompt = tokenization.load_chat_template(model.chat_template).render_messages(
        messages, as_text=tokenization.as_text(model.tokenizer)
    )
    return len(tokenization.load(model.tokenizer).encode(prompt, add_special_tokens=False).ids)


def assemble(counter, session, new, budget=100_000):
    session_counts = asyncio.run(counter.count(session))
    new_counts = asyncio.run(counter.count(new))
    return assembly.assemble(
        [assembly.Candidate(m, n) for m, n in zip(session, session_counts)],
        [assembly.Candidate(m, n) for m, n in zip(new, new_counts)],
        budget,
        counter.template_tokens,
    )


def msg(role: int, content: str) -> common_pb2.Message:
    return common_pb2.Message(role=role, content=content)


def test_smollm2_template_costs(counters) -> None:
    counter = counters["smollm2"]
    # "<|im_start|>assistant\n" and the default system prompt of the template.
    default_system = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )
    tokenizer = counter.tokenizer
    assert counter.template_tokens.generation_prompt == len(
        tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False).ids
    )
    assert counter.template_tokens.default_system == len(
        tokenizer.encode(default_system + "<|im_end|>\n", add_special_tokens=False).ids
    )
    # <|im_start|> "user" "\n" ... <|im_end|> "\n": five tokens around the content.
    assert asyncio.run(counter.count([msg(USER, "What is the capital of France?")])) == [7 + 5]


CONVERSATIONS = {
    "one question": ([], [msg(USER, "What is the capital of France?")]),
    "with a system message": (
        [msg(SYSTEM, "You are terse."), msg(USER, "Hi"), msg(ASSISTANT, "Hello.")],
        [msg(USER, "What is 12 + 30?")],
    ),
    "system message only in the request": (
        [msg(USER, "Hi"), msg(ASSISTANT, " Hello.\n\n")],
        [msg(SYSTEM, "  Answer in French."), msg(USER, "\n Où est Paris ? 東京?")],
    ),
    "whitespace at the edges of contents": (
        [msg(USER, " \nleading"), msg(ASSISTANT, "\n"), msg(USER, "trailing \n\n")],
        [msg(USER, "\t tab")],
    ),
}


@pytest.mark.parametrize("alias", ["smollm2", "tiny-gpt"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_assembled_prompt_tokens_equal_the_rendered_prompt(counters, alias, name) -> None:
    session, new = CONVERSATIONS[name]
    response = assemble(counters[alias], session, new)
    assert len(response.messages) == len(session) + len(new)
    assert response.manifest.prompt_tokens == prompt_length(alias, list(response.messages))


def test_dropped_turns_leave_an_exact_count(counters) -> None:
    counter = counters["smollm2"]
    session = [msg(USER, f"Question {n}: what is {n} squared?") for n in range(6)]
    new = [msg(USER, "And the last one?")]
    full = assemble(counter, session, new).manifest.prompt_tokens
    response = assemble(counter, session, new, budget=full - 1)
    assert len(response.messages) < len(session) + len(new)
    assert response.manifest.prompt_tokens == prompt_length("smollm2", list(response.messages))
    assert response.manifest.prompt_tokens <= full - 1


def test_counting_contents_alone_would_be_wrong(counters) -> None:
    """Why messages are counted framed: in ChatML a content that starts with
    whitespace merges with the newline after the role."""
    tokenizer = counters["smollm2"].tokenizer

    def n(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    content = " \nHello"
    framed = n(f"<|im_start|>user\n{content}<|im_end|>\n")
    assert framed != n("<|im_start|>user\n<|im_end|>\n") + n(content)
    assert asyncio.run(counters["smollm2"].count([msg(USER, content)])) == [framed]


# Contents heavy in what tokenizers merge: whitespace, newlines, digits,
# punctuation, special tokens written as text and their look-alikes, accents and CJK.
_CONTENT = st.lists(
    st.sampled_from(
        [" ", "  ", "\n", "\t", "a", "Hi", "1", "23", ".", "?!", "<|", "|>", "é", "東", "🎉", "im_end"]
        + ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "[SEP]", "[CLS]"]
    ),
    max_size=12,
).map("".join)
_MESSAGES = st.lists(st.tuples(st.sampled_from([SYSTEM, USER, ASSISTANT]), _CONTENT), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(session=_MESSAGES, new=_MESSAGES)
def test_counts_are_exact_for_any_conversation(counters, session, new) -> None:
    for alias in ("smollm2", "tiny-gpt"):
        session_messages = [msg(role, content) for role, content in session]
        new_messages = [msg(role, content) for role, content in new]
        response = assemble(counters[alias], session_messages, new_messages)
        assert response.manifest.prompt_tokens == prompt_length(alias, list(response.messages)), alias


@settings(max_examples=150, deadline=None)
@given(
    session=st.lists(st.tuples(st.sampled_from([SYSTEM, USER, ASSISTANT]), _CONTENT), max_size=8),
    new=st.lists(st.tuples(st.sampled_from([SYSTEM, USER, ASSISTANT]), _CONTENT), max_size=2),
    spare=st.integers(0, 120),
    adaptive=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_counts_are_exact_for_any_budget_and_strategy(counters, session, new, spare, adaptive, seed) -> None:
    """Whatever is kept, nothing included: the prompt costs what it renders
    to, for both strategies and the transcript; a prompt of no message does
    not pay the template's default system prompt, and a summary added to it
    then costs all its tokens."""
    for alias in ("smollm2", "tiny-gpt"):
        counter = counters[alias]
        session_messages = [msg(role, content) for role, content in session]
        new_messages = [msg(role, content) for role, content in new]
        counts = asyncio.run(counter.count(session_messages))
        lines = asyncio.run(counter.count_lines(session_messages))
        new_counts = asyncio.run(counter.count(new_messages))
        turns = assembly.SessionCosts.of(
            [assembly.TurnCost(m.role, n, line) for m, n, line in zip(session_messages, counts, lines)]
        )
        required = [assembly.TurnCost(m.role, n) for m, n in zip(new_messages, new_counts)]
        template = counter.template_tokens
        budget = template.prompt_prefix + template.generation_prompt + sum(new_counts) + spare
        options = {}
        if adaptive:
            options = {
                "relevance": np.random.default_rng(seed).random(len(session_messages)),
                "recency_floor": 1,
                "transcript_tokens": counter.transcript_tokens,
            }
        try:
            chosen = assembly.plan(turns, required, budget, template, **options)
        except Exception as error:  # noqa: BLE001 - only the refusal of what must be kept is expected
            assert "budget" in str(error), alias
            continue
        candidates = [assembly.Candidate(m, n) for m, n in zip(new_messages, new_counts)]
        response = assembly.render(chosen, turns, session_messages, candidates)
        assert response.manifest.prompt_tokens == prompt_length(alias, list(response.messages)), alias
        assert response.manifest.prompt_tokens <= budget
        left_out = summaries.excluded_ranges(chosen.reasons)
        if not left_out:
            continue
        first, end = left_out[0]
        summary = summaries.Summary("s", first, end, first + 1, end, "extractive", "A said 12.")
        summary_tokens = asyncio.run(counter.count([summary.message()]))
        added = summaries.add_summaries(
            response, [summary], summary_tokens, budget + summary_tokens[0], template.default_system
        )
        assert added == [summary], alias
        assert response.manifest.prompt_tokens == prompt_length(alias, list(response.messages)), alias


def test_a_template_that_rewrites_contents_is_refused(tmp_path) -> None:
    template = tmp_path / "strip.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
        "{% endfor %}"
    )
    with pytest.raises(ConfigError, match="changes contents"):
        token_counts.build(MODELS["smollm2"].tokenizer, str(template))


@pytest.mark.parametrize("alias", ["smollm2", "tiny-gpt"])
def test_a_template_with_nothing_between_messages_is_refused(tmp_path, alias) -> None:
    """A review: contents glued together merge across the boundary ("hel"
    then "lo" is "hello", one token, counted as two), and the check let it
    through: every prompt undercounted, past its budget."""
    template = tmp_path / "glued.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ConfigError, match="merges across message boundaries"):
        token_counts.build(MODELS[alias].tokenizer, str(template))


def test_a_package_path_naming_a_package_not_installed_is_a_missing_file():
    """A review's finding: "nosuchpkg.sub:chat.jinja" (a dotted package whose
    parent is not installed) raised ModuleNotFoundError from find_spec,
    which failed a router's start with a traceback naming no setting; a
    missing file is an OSError, which says which setting it was."""
    with pytest.raises(OSError, match="nosuchpkg.sub:tok.json"):
        tokenization.load("nosuchpkg.sub:tok.json")
    with pytest.raises(OSError):
        tokenization.load_chat_template("nosuchpkg.sub:chat.jinja")


@pytest.mark.parametrize("alias", ["tiny-gpt", "smollm2"])
def test_count_until_stops_once_past_what_it_may_count_and_counts_exactly_before(
    counters, alias, monkeypatch
):
    """A review's finding: AssembleContext counted every new message whole
    to refuse a prompt over its budget, 127 messages of 256 KiB holding the
    context service 1.3 GB and 10.7 s for a budget of 448 tokens. Counted in
    groups of COUNT_GROUP_CHARS, it stops after the group that passes: the
    counts it gives are count()'s, and all of them where the messages fit."""
    counter = counters[alias]
    counted_chars = []
    count = tokenization.count
    monkeypatch.setattr(
        tokenization,
        "count",
        lambda tokenizer, texts: counted_chars.append(sum(map(len, texts))) or count(tokenizer, texts),
    )
    big = [msg(USER, "word " * (token_counts.COUNT_GROUP_CHARS // 5)) for _ in range(20)]
    framed = []
    frame = token_counts.PromptCounter.framed
    monkeypatch.setattr(
        token_counts.PromptCounter, "framed", lambda self, m: framed.append(m) or frame(self, m)
    )
    counts = asyncio.run(counter.count_until(big, 448))
    # One message framed and counted, not twenty (all framed first, on the
    # event loop: 1.4 s for 120 of special-token text, a review).
    assert len(framed) == 1
    monkeypatch.setattr(token_counts.PromptCounter, "framed", frame)
    assert counted_chars == [len(counter.framed(big[0]))]
    assert counts == asyncio.run(counter.count(big[:1]))
    small = [msg(USER, f"message {n}") for n in range(50)]
    assert asyncio.run(counter.count_until(small, 10_000)) == asyncio.run(counter.count(small))
    # Past it, counting stops after the group that passed (small ones go in one group).
    assert asyncio.run(counter.count_until(small, 5)) == asyncio.run(counter.count(small))
    assert len(asyncio.run(counter.count_until([*big[:2], *small], 10))) == 1


def test_a_reload_reuses_the_counters_of_unchanged_files_and_builds_only_new_ones(
    counters, monkeypatch
) -> None:
    """for_models(reuse=...), a context service's reload: an alias naming a
    tokenizer and template already in use gets that counter, unread; a new
    pair is read."""
    built: list[tuple[str, str]] = []
    real_build = token_counts.build

    def counted_build(spec: str, template: str) -> token_counts.PromptCounter:
        built.append((spec, template))
        return real_build(spec, template)

    monkeypatch.setattr(token_counts, "build", counted_build)
    only_tiny = {"tiny-gpt": MODELS["tiny-gpt"]}
    in_use = {"tiny-gpt": counters["tiny-gpt"]}
    reloaded = token_counts.for_models({**only_tiny, "also-tiny": MODELS["tiny-gpt"]}, reuse=in_use)
    assert reloaded["tiny-gpt"] is reloaded["also-tiny"] is counters["tiny-gpt"]
    assert built == []
    reloaded = token_counts.for_models({**only_tiny, "chat": MODELS["smollm2"]}, reuse=in_use)
    assert reloaded["tiny-gpt"] is counters["tiny-gpt"]
    assert built == [(MODELS["smollm2"].tokenizer, MODELS["smollm2"].chat_template)]
    assert reloaded["chat"].id == counters["smollm2"].id
