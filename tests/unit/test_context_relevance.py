"""Relevance scoring and adaptive planning on plain data."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from meshgate.common.v1 import common_pb2
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.errors import MeshgateError
from services.context import assembly, relevance
from services.context.assembly import Candidate, SessionCosts, TemplateTokens, TurnCost, plan, render

SYSTEM, USER, ASSISTANT = common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT


def postings_of(texts: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    postings: dict[str, list[int]] = {}
    lengths = np.zeros(len(texts))
    for index, text in enumerate(texts):
        terms = relevance.index_terms(text)
        lengths[index] = sum(terms.values())
        for term, frequency in terms.items():
            postings.setdefault(term, []).append(relevance.pack_posting(index, frequency))
    return {t: np.array(p, dtype=np.uint32) for t, p in postings.items()}, lengths


def test_terms_are_stemmed_without_stop_words_and_entities_are_marked() -> None:
    terms = relevance.index_terms("Kate's hobbies are skiing and cooking in Denver since 2013.")
    assert {"kate", "hobby", "ski", "cook", "denver", "2013"} <= set(terms)
    assert {"@kate", "@denver", "@2013"} <= set(terms)
    assert not {"are", "and", "in"} & set(terms)
    # Lowercase words are not entities; months are (a time).
    assert "@hobby" not in terms and "@march" in relevance.index_terms("in march")


def test_bm25_prefers_the_turn_with_the_rare_shared_word() -> None:
    texts = ["I like the weather today", "My dog is named Biscuit", "the weather is nice", "ok"]
    postings, lengths = postings_of(texts)
    query = relevance.index_terms("What is the dog called?")
    scores = relevance.bm25(query, postings, lengths)
    assert int(np.argmax(scores)) == 1
    assert scores[3] == 0


def letters(number: int) -> str:
    """A word of lowercase letters for ``number`` (digits would index apart)."""
    word = ""
    while True:
        number, digit = divmod(number, 26)
        word += chr(ord("a") + digit)
        if number == 0:
            return word


def test_past_the_bound_the_rarest_query_terms_the_session_uses_are_scored() -> None:
    common = [f"word{letters(i)}" for i in range(relevance.MAX_QUERY_TERMS)]
    rare = ["zebra", "quokka"]
    # Every common word in two turns, the rare ones in one each.
    postings, _ = postings_of([" ".join(common), " ".join(common), "zebra", "quokka"])
    query = list(relevance.index_terms(" ".join(["unused", *common, *rare])))
    kept = relevance._bounded_terms(query, postings)
    assert len(kept) == relevance.MAX_QUERY_TERMS
    assert set(relevance.index_terms(" ".join(rare))) <= set(kept)
    assert not set(relevance.index_terms("unused")) & set(kept)
    assert kept == [term for term in query if term in kept]  # in the question's order
    # Within the bound, the query is scored as it is.
    assert relevance._bounded_terms(query[:50], postings) == query[:50]


def test_a_question_of_many_thousand_distinct_words_is_scored_in_bounded_time(monkeypatch) -> None:
    """Each scored term costs postings arithmetic on the event loop: a
    pasted document of 20,000 distinct words the session uses took ~0.2 s
    here, holding every other caller's assembly. Timed against the same
    question scored whole (the bound lifted): a ratio, not a clock."""
    words = [f"w{letters(i)}" for i in range(20_000)]
    texts = [" ".join(words[i::40]) for i in range(40)]
    postings, lengths = postings_of(texts)
    query = list(relevance.index_terms(" ".join(words)))

    def fastest_of_three() -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            relevance.hybrid_scores(query, postings, lengths, None, None)
            times.append(time.perf_counter() - started)
        return min(times)

    bounded = fastest_of_three()
    monkeypatch.setattr(relevance, "MAX_QUERY_TERMS", len(query))
    assert bounded < 0.5 * fastest_of_three()


def test_entity_matches_find_a_name_mentioned_once() -> None:
    texts = [f"turn {i} about nothing much" for i in range(50)]
    texts[7] = "My sister Ana moved to Lisbon last spring"
    postings, lengths = postings_of(texts)
    query = relevance.index_terms("Where does Ana live now?")
    scores = relevance.hybrid_scores(query, postings, lengths, None, None).scores
    assert int(np.argmax(scores)) == 7


def test_dense_similarity_counts_and_neighbours_inherit_a_share() -> None:
    vectors = relevance.quantize(np.eye(4, dtype=np.float32))
    lengths = np.ones(4)
    query = np.array([0, 0, 1, 0], dtype=np.float32)
    scores = relevance.hybrid_scores([], {}, lengths, relevance.unit_rows(vectors), query).scores
    assert int(np.argmax(scores)) == 2
    # Turns 1 and 3 border the relevant one; turn 0 does not.
    assert scores[1] > scores[0] and scores[3] > scores[0]


def test_a_turn_without_a_vector_scores_zero_similarity() -> None:
    vectors = np.zeros((2, 3), dtype=np.int8)
    vectors[1] = [127, 0, 0]
    similarity = relevance.cosine(vectors, np.array([1.0, 0, 0]))
    assert similarity[0] == 0 and similarity[1] == pytest.approx(1.0)


def test_quantized_vectors_keep_their_cosine_ranking() -> None:
    generator = np.random.default_rng(7)
    vectors = generator.normal(size=(200, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    query = vectors[17] + 0.3 * generator.normal(size=384).astype(np.float32)
    exact = vectors @ query / np.linalg.norm(query)
    approximate = relevance.cosine(relevance.quantize(vectors), query)
    assert np.argsort(-exact)[:5].tolist() == np.argsort(-approximate)[:5].tolist()
    assert np.abs(exact - approximate).max() < 0.02


def costs(*tokens: int, role: int = USER) -> list[TurnCost]:
    return [TurnCost(role, n) for n in tokens]


def test_adaptive_keeps_the_recency_floor_then_the_most_relevant_that_fit() -> None:
    turns = costs(10, 10, 10, 10, 10, 10)
    scores = np.array([0.0, 0.9, 0.1, 0.5, 0.0, 0.0])
    # 60 budget - 10 required leaves 50: floor (newest 1) 10, then turns 1 and 3 ... and 2.
    chosen = plan(SessionCosts.of(turns), costs(10), 50, relevance=scores, recency_floor=1)
    assert chosen.reasons == [
        0,
        pb.INCLUSION_REASON_RELEVANCE,
        pb.INCLUSION_REASON_RELEVANCE,
        pb.INCLUSION_REASON_RELEVANCE,
        0,
        pb.INCLUSION_REASON_RECENCY,
    ]
    assert chosen.prompt_tokens == 50


def test_a_relevant_turn_too_large_is_skipped_for_smaller_ones() -> None:
    turns = costs(100, 10, 10, 10)
    scores = np.array([1.0, 0.5, 0.0, 0.0])
    chosen = plan(SessionCosts.of(turns), costs(5), 40, relevance=scores, recency_floor=0)
    assert chosen.kept() == [1, 2, 3]


def test_pinned_turns_and_system_messages_stay_whatever_the_budget() -> None:
    turns = SessionCosts.of([TurnCost(SYSTEM, 5), *costs(10, 10, 10, 10)])
    scores = np.array([0.0, 0.0, 0.0, 1.0, 0.0])
    chosen = plan(turns, costs(10), 25, pinned_turns=[1], relevance=scores, recency_floor=2)
    assert chosen.reasons[:2] == [pb.INCLUSION_REASON_SYSTEM, pb.INCLUSION_REASON_PINNED]
    assert chosen.kept() == [0, 1]
    with pytest.raises(MeshgateError) as raised:
        plan(turns, costs(10), 24, pinned_turns=[1], relevance=scores)
    assert raised.value.reason == "CONTEXT_WINDOW_EXCEEDED"


def test_render_orders_chronologically_and_gives_every_reason() -> None:
    rows = [TurnCost(SYSTEM, 5), *costs(10, 10, 10)]
    texts = {i: common_pb2.Message(role=t.role, content=f"t{i}") for i, t in enumerate(rows)}
    turns = SessionCosts.of(rows)
    fact = Candidate(common_pb2.Message(role=SYSTEM, content="fact"), 4)
    new = [Candidate(common_pb2.Message(role=USER, content="q"), 3)]
    scores = np.array([0.0, 0.8, 0.0, 0.0])
    template = TemplateTokens(generation_prompt=2)
    required = [TurnCost(SYSTEM, 4), TurnCost(USER, 3)]
    chosen = plan(turns, required, 34, template, relevance=scores, recency_floor=1)
    response = render(chosen, turns, texts, new, [fact], scores)
    assert [m.content for m in response.messages] == ["t0", "fact", "t1", "t3", "q"]
    reasons = [(e.source, e.index, e.reason) for e in response.manifest.entries]
    assert reasons == [
        (pb.SOURCE_SESSION, 0, pb.INCLUSION_REASON_SYSTEM),
        (pb.SOURCE_SESSION, 1, pb.INCLUSION_REASON_RELEVANCE),
        (pb.SOURCE_SESSION, 2, pb.INCLUSION_REASON_UNSPECIFIED),
        (pb.SOURCE_SESSION, 3, pb.INCLUSION_REASON_RECENCY),
        (pb.SOURCE_PINNED_FACT, 0, pb.INCLUSION_REASON_PINNED),
        (pb.SOURCE_REQUEST, 0, pb.INCLUSION_REASON_REQUEST),
    ]
    assert response.manifest.prompt_tokens == 5 + 10 + 10 + 4 + 3 + 2
    assert response.manifest.entries[1].relevance == pytest.approx(0.8)


def _stretch_and_echo() -> tuple[np.ndarray, np.ndarray]:
    """Unit rows of 40 turns and a question (axis 0): turns 10-14 talk
    about the question's topic, and turn 12 among them answers it plainly
    ("Yes, every winter!"), close to the question only in part; turn 30,
    alone among unrelated turns (axis 2), echoes the question a little
    more than the answer does."""
    rows = np.zeros((40, 3), dtype=np.float32)
    rows[:, 2] = 1.0
    rows[[10, 11, 13, 14]] = [1.0, 0.3, 0.0]
    rows[12] = [0.4, 1.0, 0.0]
    rows[30] = [0.6, 1.0, 0.0]
    return relevance.unit_rows(rows), np.array([1.0, 0.0, 0.0], dtype=np.float32)


def test_a_turn_in_a_stretch_dense_with_the_best_turns_outranks_a_lone_echo() -> None:
    unit, query = _stretch_and_echo()
    lengths = np.ones(len(unit))
    without = relevance.hybrid_scores([], {}, lengths, unit, query, relevance.Weights(span=0.0)).scores
    scores = relevance.hybrid_scores([], {}, lengths, unit, query).scores
    answer, echo = 12, 30
    assert without[echo] > without[answer]
    assert scores[answer] > scores[echo]
    # Room for five turns: the whole stretch, answer included, rather than
    # four of it and the echo.
    costs = SessionCosts.of([TurnCost(USER, 10)] * len(unit))
    assert plan(costs, [], 50, relevance=without).kept() == [10, 11, 13, 14, echo]
    assert plan(costs, [], 50, relevance=scores).kept() == [10, 11, answer, 13, 14]


def test_stretches_need_no_minimum_session_length() -> None:
    # Shorter than a stretch's reach, and a single turn: scored, same length.
    for count in (1, 3):
        unit = relevance.unit_rows(np.eye(3, dtype=np.float32)[:count])
        scores = relevance.hybrid_scores([], {}, np.ones(count), unit, np.array([1.0, 0, 0])).scores
        assert scores.shape == (count,) and int(np.argmax(scores)) == 0


def _lexical_scores(texts: list[str], question: str, weights: relevance.Weights) -> np.ndarray:
    postings, lengths = postings_of(texts)
    return relevance.hybrid_scores(
        relevance.index_terms(question), postings, lengths, None, None, weights
    ).scores


def test_a_stretch_at_the_sessions_edge_gains_by_the_turns_within_its_reach() -> None:
    # Twenty one-word turns, lexical only; turns 0, 1 and 9 say "ski": each
    # scores 1 (their BM25 is equal, the median 0), the others 0.
    texts = ["rain"] * 20
    for evidence in (0, 1, 9):
        texts[evidence] = "ski"
    plain = relevance.Weights(neighbour=0.0)
    scores = _lexical_scores(texts, "Do they ski?", plain)
    without = _lexical_scores(texts, "Do they ski?", relevance.Weights(neighbour=0.0, span=0.0))
    assert without[0] == without[9] == 1.0
    # Best-turn score within 5 turns: turn 0 (the edge, turns 0-5) 2; turns
    # 4 and 5 (0-9, 0-10) 3, the most; turn 9 (4-14) 1; turn 19 (14-19) 0.
    # The median of the twenty is 1, so a turn gains 0.5 * (density - 1) / 2.
    assert scores[0] == pytest.approx(1.0 + 0.5 * (2 - 1) / 2)
    assert scores[4] == pytest.approx(0.5 * (3 - 1) / 2)
    assert scores[9] == pytest.approx(1.0)
    assert scores[19] == 0.0


def test_turns_tied_with_the_last_best_turn_all_count_toward_stretches() -> None:
    # One best turn counts, but turns 0 and 29 tie: both ends gain alike,
    # whichever end the selection would meet first.
    texts = ["rain"] * 30
    texts[0] = texts[29] = "ski"
    scores = _lexical_scores(texts, "Do they ski?", relevance.Weights(neighbour=0.0, span_turns=1))
    # Turns 0-5 and 24-29 reach a tied turn: density 1 against a median of 0.
    assert scores[0] == scores[29] == pytest.approx(1.5)
    assert scores[5] == scores[24] == pytest.approx(0.5)
    assert scores[6] == scores[23] == 0.0


def test_a_names_turns_beyond_the_scored_turns_are_left_out() -> None:
    # Roles (and postings) for more turns than are scored, as while a
    # session grows: the name's later turns are outside the scores.
    texts, roles, rows = [], [], []
    for _ in range(12):
        texts += ["Hi Kevin! How was your day?", "Not bad at all."]
        roles += [USER, ASSISTANT]
        rows += [[1, 0], [0, 1]]
    postings, lengths = postings_of(texts)
    unit = relevance.unit_rows(np.array(rows, dtype=np.float32))
    query = relevance.index_terms("What does Kevin do for fun?")
    scored = 20
    scores = relevance.hybrid_scores(
        query, postings, lengths[:scored], unit[:scored], np.array([1.0, 1.0]), roles=np.array(roles)
    ).scores
    inside = {t: p[(p >> relevance.TF_BITS) < scored] for t, p in postings.items()}
    expected = relevance.hybrid_scores(
        query, inside, lengths[:scored], unit[:scored], np.array([1.0, 1.0]), roles=np.array(roles[:scored])
    ).scores
    np.testing.assert_array_equal(scores, expected)


def test_feedback_raises_the_second_hop_of_an_answer() -> None:
    # Turn 0 answers the question's words; turn 2 shares turn 0's topic
    # (axis 1) but nothing with the question; turn 4 is about something else.
    rows = np.zeros((6, 3), dtype=np.float32)
    rows[0] = [1.0, 1.0, 0.0]
    rows[2] = [0.0, 1.0, 0.0]
    rows[4] = [0.0, 0.0, 1.0]
    unit = relevance.unit_rows(rows)
    query = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    lengths = np.ones(6)
    plain = relevance.Weights(neighbour=0.0, feedback_turns=0)
    with_feedback = relevance.Weights(neighbour=0.0, feedback_turns=1)
    before = relevance.hybrid_scores([], {}, lengths, unit, query, plain).scores
    after = relevance.hybrid_scores([], {}, lengths, unit, query, with_feedback).scores
    assert before[2] == before[4]
    assert after[2] > after[4]
    assert int(np.argmax(after)) == 0


def _greeted_conversation() -> tuple[list[str], np.ndarray]:
    """The user greets Kevin by name most days; Kevin (the assistant) never
    says his own name. Both talk about Lisbon; Kevin starts many lines with
    "Absolutely", the user writes it in lowercase once; the user names Turks
    and Caicos three times."""
    texts, roles = [], []
    for day in range(12):
        texts.append("Hi Kevin! How was your day?" if day else "hi, absolutely great to meet you")
        roles.append(USER)
        texts.append("Absolutely fine, thanks.")
        roles.append(ASSISTANT)
    for _ in range(6):
        texts += ["Lisbon was lovely", "Lisbon is my favourite city"]
        roles += [USER, ASSISTANT]
    texts += ["Turks and Caicos next year?"] * 3
    roles += [USER] * 3
    return texts, np.array(roles, dtype=np.uint8)


def test_a_name_one_speaker_keeps_using_names_the_other_participant() -> None:
    texts, roles = _greeted_conversation()
    postings, _ = postings_of(texts)
    query = relevance.index_terms("Did Kevin, Absolutely, visit Lisbon or Turks and Caicos?")
    # "Kevin": 11 of the user's turns, always capitalized. "Lisbon": named by
    # both. "Absolutely": also lowercase, a sentence's first word. "Turks":
    # three turns, a topic.
    assert relevance.participant_names(query, postings, roles) == {"@kevin"}
    # Too few turns use it: a topic, whoever names it.
    few = {t: p[: relevance.PARTICIPANT_NAME_MIN_TURNS - 1] for t, p in postings.items()}
    assert relevance.participant_names(query, few, roles) == set()


def test_a_third_person_the_user_keeps_naming_stays_a_topic() -> None:
    # The user talks about Sarah in ten turns; the assistant names her back
    # twice: she is who the questions are about, not a participant.
    texts, roles = [], []
    for day in range(10):
        texts += [f"Sarah at work said something on day {day}", "That sounds hard."]
        roles += [USER, ASSISTANT]
    texts += ["What did Sarah decide?", "Sarah may want time.", "Sarah seems kind.", "Yes."]
    roles += [USER, ASSISTANT, ASSISTANT, USER]
    postings, _ = postings_of(texts)
    query = relevance.index_terms("What did Sarah say about the project?")
    assert relevance.participant_names(query, postings, np.array(roles, dtype=np.uint8)) == set()
    # Had the assistant never named her, she would read as the other
    # participant's name: the rule needs the other side's silence.
    silent = [USER if "Sarah" in text else role for text, role in zip(texts, roles)]
    assert relevance.participant_names(query, postings, np.array(silent, dtype=np.uint8)) == {"@sarah"}


def test_a_participants_name_neither_matches_greetings_nor_seeds_feedback() -> None:
    # Axes: 0 the name, 1 having fun, 2 climbing, 3 something else.
    texts, roles = [], []
    rows = []
    for _ in range(12):
        texts += ["Hi Kevin! How was your day?", "Not bad at all."]
        roles += [USER, ASSISTANT]
        rows += [[1, 0, 0, 0], [0, 0, 0, 0]]
    texts += ["ok", "Climbing is how I have fun", "ok", "The wall at the gym was hard", "ok", "Rain again"]
    roles += [USER, ASSISTANT] * 3
    rows += [[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    answer, second_hop, unrelated = 25, 27, 29
    postings, lengths = postings_of(texts)
    unit = relevance.unit_rows(np.array(rows, dtype=np.float32))
    # The question's vector leans toward the name, as a real embedding does.
    query_vector = np.array([1, 1, 0, 0], dtype=np.float32)
    query = relevance.index_terms("What does Kevin do for fun?")
    blind = relevance.hybrid_scores(query, postings, lengths, unit, query_vector).scores
    assert roles[int(np.argmax(blind))] == USER  # a greeting
    scores = relevance.hybrid_scores(
        query, postings, lengths, unit, query_vector, roles=np.array(roles)
    ).scores
    assert int(np.argmax(scores)) == answer
    # Feedback from the answer, not the greetings, raises its second hop.
    assert scores[second_hop] > scores[unrelated]
    assert scores[second_hop] > blind[second_hop]
    # Without a vector, the name no longer scores the greetings at all.
    lexical = relevance.hybrid_scores(query, postings, lengths, None, None, roles=np.array(roles)).scores
    assert lexical[0] == 0 and int(np.argmax(lexical)) == answer


def test_unit_rows_are_unit_length_and_keep_empty_rows_empty() -> None:
    unit = relevance.unit_rows(np.array([[3, 4], [0, 0]], dtype=np.int8))
    assert unit.dtype == np.float32
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, 0.0]])


def test_unit_rows_of_stored_int8_rows_equal_the_float_path_bit_for_bit() -> None:
    # The cold path's in-place int8 conversion must score exactly as before.
    rows = np.random.default_rng(7).integers(-128, 128, size=(500, 384), dtype=np.int8)
    rows[3] = 0
    rows[4] = -128
    rows[5, :] = 0
    rows[5, 17] = 1
    fast = relevance.unit_rows(rows)
    general = relevance.unit_rows(rows.astype(np.float32))
    assert fast.dtype == general.dtype == np.float32
    assert np.array_equal(fast.view(np.uint32), general.view(np.uint32))
    assert not fast[3].any()


def _entries_one_by_one(turns: SessionCosts, reasons: np.ndarray, scores: np.ndarray) -> pb.ContextManifest:
    manifest = pb.ContextManifest()
    for index in range(len(turns)):
        manifest.entries.add(
            source=pb.SOURCE_SESSION,
            index=index,
            role=int(turns.roles[index]),
            tokens=int(turns.tokens[index]),
            disposition=pb.DISPOSITION_INCLUDED if reasons[index] else pb.DISPOSITION_DROPPED,
            reason=int(reasons[index]),
            relevance=float(scores[index]),
        )
    return manifest


@pytest.mark.parametrize("limit", [assembly._VARINT4_LIMIT, 100])
def test_session_entries_encoded_at_once_equal_those_built_field_by_field(monkeypatch, limit) -> None:
    # 100: the field-by-field path taken for numbers too large for the fixed-size encoding.
    monkeypatch.setattr(assembly, "_VARINT4_LIMIT", limit)
    generator = np.random.default_rng(3)
    count = 300
    roles = generator.choice([SYSTEM, USER, ASSISTANT], count)
    tokens = generator.integers(0, 200_000, count)
    tokens[:3] = [0, 127, 128]
    turns = SessionCosts(roles, tokens)
    reasons = generator.choice(
        [0, pb.INCLUSION_REASON_RECENCY, pb.INCLUSION_REASON_RELEVANCE, pb.INCLUSION_REASON_SYSTEM], count
    )
    scores = generator.random(count) * 2
    scores[:5] = 0.0
    expected = _entries_one_by_one(turns, reasons, scores)
    encoded = pb.ContextManifest()
    encoded.MergeFromString(assembly._session_entries(turns, reasons, scores))
    assert encoded == expected
    assert encoded.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


def test_the_nameless_form_drops_stop_words_and_capitalized_words() -> None:
    nameless = relevance.nameless_text("What pets did Vanessa’s brother have in May?")
    assert nameless is not None
    assert nameless.text == "pets brother"
    # Each left-out word as written, less its possessive.
    assert nameless.names == {"Vanessa", "May"}
    # Nothing to leave out, or nothing left: no nameless form.
    assert relevance.nameless_text("what pets did she have?") is None
    assert relevance.nameless_text("Where is Lisbon?") is None
    assert relevance.nameless_text("WHAT PETS DOES VANESSA HAVE?") is None
    assert relevance.nameless_text("") is None


def test_the_nameless_form_keeps_whole_words_in_any_script() -> None:
    # A question of the development data: the index's ASCII words would
    # leave "o" of "Bolaño" behind as a word.
    nameless = relevance.nameless_text('When did Fahim Khan discuss reading "2666" by Roberto Bolaño?')
    assert nameless is not None
    assert nameless.text == "discuss reading 2666"
    assert nameless.names == {"Fahim", "Khan", "Roberto", "Bolaño"}
    # A lowercase word with a Cyrillic letter is a word, not a fragment.
    assert (
        relevance.nameless_text("When did Nicolas go to the cinema with his сrush?").text == "go cinema сrush"
    )
    nameless = relevance.nameless_text("Où est né François?")
    assert (nameless.text, nameless.names) == ("est né", {"Où", "François"})
    assert relevance.nameless_text("İstanbul trip plans?").names == {"İstanbul"}
    # A script without capitals has no names to leave out.
    assert relevance.nameless_text("東京で何を食べましたか?") is None


def test_a_name_the_session_never_uses_stops_pulling_the_question_away() -> None:
    # Axes: 0 what the embedding associates with the name, 1 pets, 2 other.
    rows = relevance.unit_rows(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32))
    texts = ["Some chat about a film", "My cat sleeps all day", "Rain again"]
    postings, lengths = postings_of(texts)
    question = "What pets does Vanessa have?"
    terms = relevance.index_terms(question)
    # The question's vector leans toward the name, as a real embedding does.
    question_vector = np.array([0.8, 0.6, 0.0], dtype=np.float32)
    nameless = relevance.nameless_text(question)
    nameless = relevance.NamelessQuery(nameless.text, nameless.names, np.array([0, 1, 0], dtype=np.float32))
    # The vectors alone: the name's postings must not decide through BM25.
    weights = relevance.Weights(keyword=0.0, entity=0.0, neighbour=0.0, span=0.0, feedback_weight=0.0)

    def scored(postings, nameless_query) -> relevance.Scores:
        return relevance.hybrid_scores(
            terms, postings, lengths, rows, question_vector, weights, nameless=nameless_query
        )

    def best(postings, nameless_query) -> int:
        return int(np.argmax(scored(postings, nameless_query).scores))

    def mixes(postings, nameless_query) -> bool:
        # What names the assembly's ranking (test below: it says what the scores did).
        return scored(postings, nameless_query).mixed_nameless

    assert best(postings, None) == 0 and not mixes(postings, None)
    # "Vanessa" is in no turn: the question is scored half by its nameless form.
    assert "@vanessa" not in postings
    assert best(postings, nameless) == 1 and mixes(postings, nameless)
    # A name the session uses is what the question is about: the question stays whole.
    named = {**postings, "@vanessa": np.array([relevance.pack_posting(0, 1)], dtype=np.uint32)}
    assert best(named, nameless) == 0 and not mixes(named, nameless)
    # Not embedded (the embedder failed): the question alone.
    not_embedded = relevance.NamelessQuery(nameless.text, nameless.names)
    assert best(postings, not_embedded) == 0 and not mixes(postings, not_embedded)
    # Used by the session in lowercase only, it is a word the question is
    # about (a capitalized first word, say), not a name: the question stays whole.
    lowercase = {**postings, "vanessa": np.array([relevance.pack_posting(0, 1)], dtype=np.uint32)}
    assert best(lowercase, nameless) == 0 and not mixes(lowercase, nameless)


def test_a_name_the_index_cuts_is_known_by_the_terms_it_makes() -> None:
    rows = relevance.unit_rows(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32))
    question = "Which novels did Bolaño write?"
    terms = relevance.index_terms(question)
    nameless = relevance.nameless_text(question)
    assert nameless.names == {"Bolaño"}
    nameless = relevance.NamelessQuery(nameless.text, nameless.names, np.array([0, 1, 0], dtype=np.float32))
    question_vector = np.array([0.8, 0.6, 0.0], dtype=np.float32)
    weights = relevance.Weights(keyword=0.0, entity=0.0, neighbour=0.0, span=0.0, feedback_weight=0.0)

    def best(texts) -> int:
        postings, lengths = postings_of(texts)
        scores = relevance.hybrid_scores(
            terms, postings, lengths, rows, question_vector, weights, nameless=nameless
        ).scores
        return int(np.argmax(scores))

    # A turn names him ("Bolaño" is indexed as "bola" and "@bola"): he is what the question is about.
    assert best(["I finally read Bolaño", "My cat sleeps all day", "Rain again"]) == 0
    # No turn does: the nameless form's vector moves the question.
    assert best(["I finally read a book", "My cat sleeps all day", "Rain again"]) == 1


def test_a_session_without_turns_scores_nothing_with_a_nameless_form() -> None:
    nameless = relevance.nameless_text("What pets does Vanessa have?")
    nameless = relevance.NamelessQuery(nameless.text, nameless.names, np.array([0, 1, 0], dtype=np.float32))
    scores = relevance.hybrid_scores(
        relevance.index_terms("What pets does Vanessa have?"),
        {},
        np.zeros(0),
        np.zeros((0, 3), dtype=np.float32),
        np.array([0.8, 0.6, 0.0], dtype=np.float32),
        roles=np.zeros(0, dtype=np.int32),
        nameless=nameless,
    ).scores
    assert scores.shape == (0,)


def test_the_reported_mix_is_what_the_scores_were_computed_with() -> None:
    """hybrid_scores says it mixed the nameless form exactly where its
    scores differ from the question's alone, and names the ranking by it:
    across names unknown, used, a participant's, not embedded, no vectors
    and a zero share."""
    rows = relevance.unit_rows(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]] * 8, dtype=np.float32))
    question = "What pets does Vanessa have?"
    terms = relevance.index_terms(question)
    question_vector = np.array([0.8, 0.6, 0.0], dtype=np.float32)
    found = relevance.nameless_text(question)
    embedded = relevance.NamelessQuery(found.text, found.names, np.array([0, 1, 0], dtype=np.float32))
    not_embedded = relevance.NamelessQuery(found.text, found.names)
    unknown = ["Some chat about a film", "My cat sleeps all day", "Rain again"] * 8
    # One speaker greets the other by name in twelve turns: a participant's name.
    roles = np.array([i % 2 for i in range(len(unknown))], dtype=np.uint8)
    addressed = [f"Hi Vanessa. {text}" if i % 2 == 0 else text for i, text in enumerate(unknown)]
    assert relevance.participant_names(terms, postings_of(addressed)[0], roles) == {"@vanessa"}
    cases = {
        "unknown name": (unknown, rows, embedded, relevance.DEFAULT_WEIGHTS),
        "a name the session uses": (
            ["Vanessa has a cat"] + unknown[1:],
            rows,
            embedded,
            relevance.DEFAULT_WEIGHTS,
        ),
        "not embedded": (unknown, rows, not_embedded, relevance.DEFAULT_WEIGHTS),
        "no vectors": (unknown, None, embedded, relevance.DEFAULT_WEIGHTS),
        "a zero share": (unknown, rows, embedded, relevance.Weights(nameless=0.0)),
        "a participant's name": (addressed, rows, embedded, relevance.DEFAULT_WEIGHTS),
    }
    mixed = {}
    for label, (texts, vectors, nameless, weights) in cases.items():
        postings, lengths = postings_of(texts)
        with_form = relevance.hybrid_scores(
            terms, postings, lengths, vectors, question_vector, weights, roles, nameless
        )
        alone = relevance.hybrid_scores(terms, postings, lengths, vectors, question_vector, weights, roles)
        assert not alone.mixed_nameless and alone.ranking == relevance.RANKING
        mixed[label] = with_form.mixed_nameless
        assert with_form.mixed_nameless == (not np.array_equal(with_form.scores, alone.scores)), label
        expected = relevance.RANKING_NAMELESS if with_form.mixed_nameless else relevance.RANKING
        assert with_form.ranking == expected, label
    # Both outcomes were seen, so the equivalence above was tested both ways.
    assert mixed == {
        "unknown name": True,
        "a name the session uses": False,
        "not embedded": False,
        "no vectors": False,
        "a zero share": False,
        "a participant's name": True,
    }


def test_a_signal_scaled_to_a_percentile_leaves_one_outlier_less_room() -> None:
    values = np.array([0.0, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 100.0])
    by_max = relevance.scaled(values)
    # The default is the max: the outlier is 1, the next best a few hundredths.
    assert by_max[-1] == 1.0 and by_max[-2] == pytest.approx((7 - 3.5) / (100 - 3.5))
    robust = relevance.scaled(values, top_percentile=90.0)
    top = float(np.percentile(values, 90.0))
    assert robust[-1] == 1.0 and robust[-2] == pytest.approx((7 - 3.5) / (top - 3.5))
    assert robust[-2] > by_max[-2]


def test_hybrid_scores_scale_by_the_weights_top_percentile() -> None:
    # bench/context_misses.py --ideas measures the percentile through Weights alone.
    unit, query = _stretch_and_echo()
    lengths = np.ones(len(unit))
    by_max = relevance.hybrid_scores([], {}, lengths, unit, query).scores
    same = relevance.hybrid_scores(
        [], {}, lengths, unit, query, relevance.Weights(top_percentile=100.0)
    ).scores
    robust = relevance.hybrid_scores(
        [], {}, lengths, unit, query, relevance.Weights(top_percentile=90.0)
    ).scores
    np.testing.assert_array_equal(by_max, same)
    assert not np.array_equal(by_max, robust)


@pytest.mark.parametrize(
    ("question", "first_person"),
    [
        ("What did I decide about my budget?", True),
        ("I'm not sure when my sprint ends", True),
        ("Remind me what I’ve planned", True),  # a typographic apostrophe ends "I" too
        ("what was mine again", True),
        ("i forgot the date, can you tell ME?", True),  # typed lowercase, or shouted
        ("Did I do it myself?", True),
        ("What are Kate's hobbies?", False),
        ("How was the trip to Myanmar?", False),  # "my" inside a word
        ("Which items, i.e. the cheap ones, sold?", False),  # "i.e." is no "I"
        ("What did we agree on for our launch?", False),  # "we": both sides of the chat
        ("Tell me about Mime artists and Imelda", True),  # "me" alone counts
        ("Mimes and Imelda", False),
        # The same letters, no pronoun: a numeral or letter after a capitalized word mid-sentence,
        ("When did World War I end?", False),
        ("Who succeeded Louis I?", False),
        ("How is Type I diabetes treated?", False),
        ("What did the Phase I trials show?", False),
        ("Is it in Part I or II?", False),
        # joined by "/" or "-",
        ("Why is the I/O so slow?", False),
        ("How long is the drive on I-95?", False),
        ("What helps with ME/CFS?", False),
        # and the noun.
        ("When did the coal mine close?", False),
        ("Who owns a gold mine?", False),
        # But a capitalized word that starts the sentence, or one after a comma, is followed by the pronoun,
        ("Did I say when?", True),
        ("Kate, I forgot: when is it?", True),
        ("Louis I will call: when?", True),
        # nor after a day, a month, a place or a greeting, when the clause goes on.
        ("On Monday I mentioned a book, which?", True),
        ("Last Tuesday I said what?", True),
        ("In Paris I bought what?", True),
        ("Hey Claude I need the list", True),
        ("Who ruled after Henry I, and when?", False),
        # and "mine" after anything else is the asker's.
        ("Is that book mine?", True),
        ("Which of the ideas was mine, the coal mine one?", True),
        ("When did the I/O problem reach my team?", True),
    ],
)
def test_first_person_questions_by_their_words(question: str, first_person: bool) -> None:
    assert relevance.asked_in_first_person(question) is first_person


def _budget_session() -> tuple[
    list[str], dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray
]:
    """Thirty turns, user and assistant in turn, about other things, but for
    a long topical assistant reply on budgets (turn 11) and, far from it, the
    user's own short decision (turn 20), which the question's words and
    vector match less well than the reply."""
    texts = [f"turn {i} about the weather and the garden" for i in range(30)]
    texts[11] = "A good budget plan: list income, budget for rent, budget for food, then save"
    texts[20] = "I decided my budget is 1,200 a month"
    postings, lengths = postings_of(texts)
    rows = np.zeros((30, 3), dtype=np.float32)
    rows[:, 2] = 1.0
    rows[11] = [1.0, 0.2, 0.0]
    rows[20] = [0.8, 0.6, 0.0]
    roles = np.array([USER if i % 2 == 0 else ASSISTANT for i in range(30)], dtype=np.uint8)
    question_vector = np.array([1.0, 0.3, 0.0], dtype=np.float32)
    return texts, postings, lengths, relevance.unit_rows(rows), roles, question_vector


def _budget_scores(question: str, weights: relevance.Weights = relevance.DEFAULT_WEIGHTS) -> np.ndarray:
    """The session's scores for the terms and vector of a question about the
    budget decision: only ``question``'s text (what the gate reads) varies."""
    _, postings, lengths, unit, roles, question_vector = _budget_session()
    terms = relevance.index_terms("What was the budget plan?")
    return relevance.hybrid_scores(
        terms, postings, lengths, unit, question_vector, weights, roles, question=question
    ).scores


def test_a_question_in_the_first_person_ranks_the_users_own_turn_above_a_topical_reply() -> None:
    reply, decision = 11, 20
    no_lift = relevance.Weights(first_person_lift=0.0)
    asked = "What did I decide about my budget?"
    without = _budget_scores(asked, no_lift)
    assert int(np.argmax(without)) == reply and without[decision] < without[reply]
    scores = _budget_scores(asked)
    assert int(np.argmax(scores)) == decision
    # Every user turn gains, not only the matching one: the lift is by role.
    user = np.arange(30) % 2 == 0
    assert np.all(scores[user] > without[user])


def test_a_question_in_the_third_person_scores_the_same_with_the_lift_or_without() -> None:
    asked = "What did Kate decide about her budget?"
    with_lift = _budget_scores(asked)
    np.testing.assert_array_equal(with_lift, _budget_scores(asked, relevance.Weights(first_person_lift=0.0)))
    assert int(np.argmax(with_lift)) == 11


def test_the_first_person_lift_needs_the_roles_and_reaches_lexical_scoring_too() -> None:
    texts, postings, lengths, _, roles, _ = _budget_session()
    terms = relevance.index_terms("What was the budget plan?")
    asked = "What did I decide about my budget?"
    off = relevance.Weights(first_person_lift=0.0)
    # Without roles no turn is known to be the user's: nothing to lift.
    np.testing.assert_array_equal(
        relevance.hybrid_scores(terms, postings, lengths, None, None, question=asked).scores,
        relevance.hybrid_scores(terms, postings, lengths, None, None, off, question=asked).scores,
    )
    # Words alone (no vectors): the user's turns gain all the same.
    lexical = relevance.hybrid_scores(terms, postings, lengths, None, None, roles=roles, question=asked)
    plain = relevance.hybrid_scores(terms, postings, lengths, None, None, off, roles, question=asked)
    assert np.all(lexical.scores[roles == USER] > plain.scores[roles == USER])
    assert len(texts) == len(lexical.scores)


def test_scored_by_words_alone_the_lift_shrinks_with_the_signals_it_joins() -> None:
    """Without vectors a turn's score tops out at keyword + entity, not
    keyword + entity + dense: the lift shrinks by that share, so that it
    pulls as hard against the other signals on either path."""
    _, postings, lengths, unit, roles, question_vector = _budget_session()
    terms = relevance.index_terms("What was the budget plan?")
    asked = "What did I decide about my budget?"
    # No stretches or neighbours: what the lift adds is then the difference itself.
    # A lift other than the default's 1.0, so the scaling must multiply it.
    bare = relevance.Weights(span=0.0, neighbour=0.0, first_person_lift=0.7)
    off = dataclasses.replace(bare, first_person_lift=0.0)

    def gained(unit_vectors, query_vector) -> np.ndarray:
        lifted, plain = (
            relevance.hybrid_scores(
                terms, postings, lengths, unit_vectors, query_vector, w, roles, question=asked
            )
            for w in (bare, off)
        )
        return lifted.scores - plain.scores

    words = bare.keyword + bare.entity
    np.testing.assert_allclose(
        gained(None, None)[roles == USER], bare.first_person_lift * words / (words + bare.dense)
    )
    np.testing.assert_allclose(gained(unit, question_vector)[roles == USER], bare.first_person_lift)
    assert not gained(None, None)[roles == ASSISTANT].any()


def test_scores_say_whether_the_vectors_were_part_of_them() -> None:
    _, postings, lengths, unit, _, question_vector = _budget_session()
    terms = relevance.index_terms("What was the budget plan?")
    assert relevance.hybrid_scores(terms, postings, lengths, unit, question_vector).dense
    assert not relevance.hybrid_scores(terms, postings, lengths, None, question_vector).dense
    # Vectors for other turns than those scored (an index behind the session): words alone.
    assert not relevance.hybrid_scores(terms, postings, lengths, unit[:-1], question_vector).dense


def test_a_long_message_is_asked_in_the_first_person_by_its_two_ends() -> None:
    # Its ends are where the ask is; a pasted text between them is not read
    # (each candidate word costs regex searches, on the event loop).
    paste = "lorem ipsum " * 1000
    assert relevance.asked_in_first_person(paste + "What did I decide?")
    assert relevance.asked_in_first_person("Summarize my notes: " + paste)
    assert not relevance.asked_in_first_person(paste + "my notes " + paste)
