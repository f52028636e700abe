"""Which messages make the prompt, given their token counts and a budget.

Pure and synchronous, so the policy can be tested without Redis or gRPC and
changed (summaries, say) without touching storage.

Assembly runs in two steps, so that a long session's texts are never read
to decide: :func:`plan` chooses from each turn's role, token count and
relevance alone; :func:`render` then builds the prompt and its manifest from
the texts of the chosen turns only.
"""

from __future__ import annotations

import collections.abc
import dataclasses

import numpy as np

from meshgate import tokenization
from meshgate.common.v1 import common_pb2
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.errors import MeshgateError, invalid_argument
from meshgate.reasons import Reason


@dataclasses.dataclass(frozen=True, slots=True)
class TemplateTokens:
    """Tokens the chat template adds to a prompt outside any message."""

    # Before the first message, always: a begin-of-sequence token such as
    # tiny-gpt's [CLS].
    prompt_prefix: int = 0
    # The assistant's cue after the last message.
    generation_prompt: int = 0
    # Added by templates like SmolLM2's when no message is a system message.
    default_system: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """A message that may enter the prompt, with what it would cost there."""

    message: common_pb2.Message
    # Its tokens as the chat template renders it (role marker and separators included).
    tokens: int


@dataclasses.dataclass(frozen=True, slots=True)
class TurnCost:
    """What planning needs of a stored turn: never its text."""

    role: int
    tokens: int
    # Its tokens as a line of the transcript message (transcript_line), or
    # None when not known.
    line_tokens: int | None = None


# Older turns the adaptive strategy chooses beyond the recency floor go into
# the prompt as ONE message, a chronological transcript, rather than one
# message each: a chat template frames every message in about 5 tokens
# (SmolLM2's "<|im_start|>user\n ... <|im_end|>\n") and a line less
# ("user: ... \n"): over realtalk's 8,944 turns 28.05 tokens a turn as a
# message against 25.98 as a line, about 7% of the budget back for more
# evidence, less the message's own frame and header (11 tokens; bench/
# README.md, "Older turns packed into one transcript message"). A user
# message, not a system one: a system message after the first changes
# whether templates like SmolLM2's add their default system prompt, and
# the transcript is what was said, not an instruction. Lines name the
# speaker by role, as the model knows the roles from its template.
TRANSCRIPT_ROLE = common_pb2.ROLE_USER
TRANSCRIPT_HEADER = "Earlier in this conversation:\n"


def transcript_line(message: common_pb2.Message) -> str:
    """One turn as a line of the transcript message.

    Its count adds up exactly inside the message (tests/unit/
    test_context_transcript.py checks it on the real tokenizers): each line
    starts with the speaker's name, letters, and ends with one newline after
    text that is not whitespace, so byte-level BPE (which pre-tokenizes
    whitespace runs apart, a run before a letter apart from its last
    character) and WordPiece (which drops whitespace) cut the message at
    every line's end as they cut the line alone. Trailing whitespace is
    therefore dropped (it would join the newline into one run), and an empty
    text leaves no space after the colon.
    """
    text = message.content.rstrip()
    speaker = tokenization.ROLE_NAMES.get(message.role, "user")
    return f"{speaker}: {text}\n" if text else f"{speaker}:\n"


@dataclasses.dataclass(frozen=True, slots=True)
class SessionCosts:
    """A session's turns as planning sees them, one array per column, so
    that planning a session of thousands of turns is a few array operations
    rather than a Python object per turn."""

    roles: np.ndarray
    tokens: np.ndarray
    # Each turn's tokens as a transcript line; None: not known, no packing.
    lines: np.ndarray | None = None

    @classmethod
    def of(cls, turns: collections.abc.Sequence[TurnCost]) -> SessionCosts:
        lines = [t.line_tokens for t in turns]
        return cls(
            np.array([t.role for t in turns], dtype=np.int64),
            np.array([t.tokens for t in turns], dtype=np.int64),
            None if None in lines else np.array(lines, dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    # Per session turn: why it is in the prompt, or INCLUSION_REASON_UNSPECIFIED
    # when it is left out.
    reasons: list[int]
    prompt_tokens: int
    budget: int
    # Kept turns sent as lines of one transcript message, oldest first.
    packed: list[int] = dataclasses.field(default_factory=list)
    # The transcript message's own tokens (frame and header), when packed.
    transcript_tokens: int = 0

    def kept(self) -> list[int]:
        return [i for i, reason in enumerate(self.reasons) if reason]


# The newest turns kept under the adaptive strategy whatever their relevance,
# at most this share of what is left after the required messages, so a
# long recent turn cannot crowd out the relevant ones.
RECENCY_FLOOR_SHARE = 0.5


def window_exceeded(needed: int, budget: int, counted_all: bool = True) -> MeshgateError:
    """CONTEXT_WINDOW_EXCEEDED: what must be kept needs ``needed`` tokens
    (at least that many, where not ``counted_all``: the new messages were
    counted only until they passed the budget, token_counts.count_until)."""
    at_least = "" if counted_all else "at least "
    return invalid_argument(
        Reason.CONTEXT_WINDOW_EXCEEDED,
        f"the new messages, pinned items and the session's system messages, as the chat template"
        f" renders them, need {at_least}{needed} tokens, more than the budget of {budget}",
        tokens=str(needed),
        budget=str(budget),
    )


def plan(
    turns: SessionCosts,
    required: collections.abc.Sequence[TurnCost],
    budget: int,
    template: TemplateTokens = TemplateTokens(),
    *,
    pinned_turns: collections.abc.Collection[int] = (),
    relevance: np.ndarray | None = None,
    recency_floor: int = 0,
    compacted: int = 0,
    transcript_tokens: int | None = None,
) -> Plan:
    """Chooses the session turns of the prompt.

    Always: the session's system messages, ``pinned_turns`` and the
    ``required`` messages (the request's new messages and pinned facts).
    Without ``relevance`` (the "newest" strategy), then the newest turns that
    fit, stopping at the first that does not: a gap in the middle of a
    conversation would mislead the model more than a shorter past. With it
    (adaptive), then up to ``recency_floor`` newest turns, then the others by
    decreasing relevance, each that still fits (those of no relevance newest
    first), in chronological order in the prompt.

    The prompt's cost is exactly what the model will see: the kept messages
    plus ``template``'s tokens outside them (the default system prompt only
    when no system message is kept).

    With ``transcript_tokens`` (the transcript message's frame and header,
    as the template renders them) and the turns' line counts, the adaptive
    strategy packs the turns it keeps beyond the floor into one transcript
    message (see TRANSCRIPT_HEADER): each costs its line, and the first one
    also the message's own tokens. Not when every turn fits as a message.

    The first ``compacted`` turns are kept only when system or pinned: the
    others' texts are gone (store.SessionStore.compact), their summary
    stands for them.

    Fails with CONTEXT_WINDOW_EXCEEDED when what must be kept exceeds the budget.
    """
    reasons = np.zeros(len(turns), dtype=np.int64)
    is_system = turns.roles == common_pb2.ROLE_SYSTEM
    reasons[is_system] = pb.INCLUSION_REASON_SYSTEM
    for index in pinned_turns:
        if not reasons[index]:
            reasons[index] = pb.INCLUSION_REASON_PINNED
    any_system = bool(is_system.any()) or any(t.role == common_pb2.ROLE_SYSTEM for t in required)
    # The template adds its default system prompt before the first message,
    # so a prompt of no message at all does not pay it: until something is
    # kept, the first turn kept pays it (``unpaid``).
    default_system = 0 if any_system else template.default_system
    unpaid = 0 if required or (reasons > 0).any() else default_system
    needed = (
        template.prompt_prefix
        + template.generation_prompt
        + default_system
        - unpaid
        + sum(t.tokens for t in required)
        + int(turns.tokens[reasons > 0].sum())
    )
    if needed > budget:
        raise window_exceeded(needed, budget)
    remaining = budget - needed
    candidate = reasons == 0
    candidate[:compacted] = False
    pack = relevance is not None and transcript_tokens is not None and turns.lines is not None
    if pack and int(turns.tokens[candidate].sum()) + unpaid <= remaining:
        # Everything fits as the conversation it was: nothing to gain.
        pack = False
    newest_first = np.flatnonzero(candidate)[::-1]
    if relevance is None:
        floor = newest_first
        floor_tokens = remaining
    else:
        floor = newest_first[: max(recency_floor, 0)]
        # A share of what the turns may have: the default system prompt
        # the first of them pays is not theirs.
        floor_tokens = int(max(remaining - unpaid, 0) * RECENCY_FLOOR_SHARE) + min(unpaid, remaining)
    # The floor stops at the first turn that does not fit in it (counts are
    # not negative, so those that fit are a prefix).
    floor = floor[np.cumsum(turns.tokens[floor]) + unpaid <= floor_tokens]
    reasons[floor] = pb.INCLUSION_REASON_RECENCY
    if len(floor):
        remaining -= int(turns.tokens[floor].sum()) + unpaid
        unpaid = 0
    packed: list[int] = []
    # Paid with the first turn packed, so a prompt packing nothing pays nothing.
    opening = transcript_tokens if pack else 0
    if relevance is not None:
        # Most relevant first; among equals, the newer. Turns nothing points
        # to still fill what budget is left, newest first: by recency.
        relevance = np.asarray(relevance, dtype=np.float64)
        order = np.lexsort((-np.arange(len(turns)), -relevance))
        order = order[candidate[order] & (reasons[order] == 0)]
        costs = (turns.lines if pack else turns.tokens)[order]
        # Once less than the cheapest turn is left, nothing more fits.
        cheapest = int(costs.min()) if len(costs) else 0
        for index, cost, relevant in zip(order.tolist(), costs.tolist(), (relevance[order] > 0).tolist()):
            if remaining < cheapest + opening + unpaid:
                break
            if cost + opening + unpaid > remaining:
                continue
            reasons[index] = pb.INCLUSION_REASON_RELEVANCE if relevant else pb.INCLUSION_REASON_RECENCY
            remaining -= cost + opening + unpaid
            unpaid = 0
            if pack:
                packed.append(index)
                opening = 0
    packed.sort()
    return Plan(reasons.tolist(), budget - remaining, budget, packed, transcript_tokens if packed else 0)


def render(
    chosen: Plan,
    turns: SessionCosts,
    texts: collections.abc.Mapping[int, common_pb2.Message] | collections.abc.Sequence[common_pb2.Message],
    new: collections.abc.Sequence[Candidate],
    pinned_facts: collections.abc.Sequence[Candidate] = (),
    relevance: np.ndarray | None = None,
) -> pb.AssembleContextResponse:
    """The prompt and manifest of ``chosen``. ``texts`` holds (at least) the
    kept turns, by position (the chosen ones read, or the list of every
    turn). Order: the session's system messages, pinned facts, the new
    system messages, kept turns oldest first, the other new messages."""
    kept = chosen.kept()
    is_system = [role == common_pb2.ROLE_SYSTEM for role in turns.roles[kept].tolist()]
    response = pb.AssembleContextResponse()
    response.messages.extend(texts[i] for i, system in zip(kept, is_system, strict=True) if system)
    response.messages.extend(c.message for c in pinned_facts)
    response.messages.extend(c.message for c in new if c.message.role == common_pb2.ROLE_SYSTEM)
    packed = set(chosen.packed)
    for i, system in zip(kept, is_system, strict=True):
        if system:
            continue
        if i not in packed:
            response.messages.append(texts[i])
        elif i == chosen.packed[0]:
            # Where its oldest turn would be: pinned turns among the packed
            # ones follow it, the recency floor's (all newer) too.
            response.messages.append(transcript(texts[j] for j in chosen.packed))
    response.messages.extend(c.message for c in new if c.message.role != common_pb2.ROLE_SYSTEM)

    manifest = response.manifest
    reasons = np.asarray(chosen.reasons, dtype=np.int64)
    scores = np.zeros(len(turns)) if relevance is None else np.asarray(relevance, dtype=np.float64)
    manifest.MergeFromString(_session_entries(turns, reasons, scores))
    for i in chosen.packed:
        entry = manifest.entries[i]
        entry.packed = True
        entry.tokens = int(turns.lines[i])
    if chosen.packed:
        manifest.entries.add(
            source=pb.SOURCE_TRANSCRIPT,
            role=TRANSCRIPT_ROLE,
            tokens=chosen.transcript_tokens,
            disposition=pb.DISPOSITION_INCLUDED,
            reason=pb.INCLUSION_REASON_TRANSCRIPT,
        )
    for index, c in enumerate(pinned_facts):
        manifest.entries.add(
            source=pb.SOURCE_PINNED_FACT,
            index=index,
            role=c.message.role,
            tokens=c.tokens,
            disposition=pb.DISPOSITION_INCLUDED,
            reason=pb.INCLUSION_REASON_PINNED,
        )
    for index, c in enumerate(new):
        manifest.entries.add(
            source=pb.SOURCE_REQUEST,
            index=index,
            role=c.message.role,
            tokens=c.tokens,
            disposition=pb.DISPOSITION_INCLUDED,
            reason=pb.INCLUSION_REASON_REQUEST,
        )
    manifest.prompt_tokens = chosen.prompt_tokens
    manifest.budget_tokens = chosen.budget
    return response


def transcript(messages: collections.abc.Iterable[common_pb2.Message]) -> common_pb2.Message:
    """The one message that holds packed turns, oldest first."""
    return common_pb2.Message(
        role=TRANSCRIPT_ROLE, content=TRANSCRIPT_HEADER + "".join(map(transcript_line, messages))
    )


# Each session turn's manifest entry, encoded for all turns at once:
# building thousands of entries one message at a time was half of a hot
# assembly's time. Every field is written, numbers as 4-byte varints (a
# longer encoding than needed, which every protobuf parser reads as the
# same value), so each entry has the same size and the whole list is one
# array; the parsed manifest equals, and serializes as, the one built
# field by field (tests/unit/test_context_relevance.py).
_ENTRY = np.dtype(
    [
        ("tag", "u1"),  # ContextManifest.entries, length-delimited
        ("size", "u1"),
        ("source_tag", "u1"),
        ("source", "u1"),
        ("index_tag", "u1"),
        ("index", "u1", 4),
        ("role_tag", "u1"),
        ("role", "u1"),
        ("tokens_tag", "u1"),
        ("tokens", "u1", 4),
        ("disposition_tag", "u1"),
        ("disposition", "u1"),
        ("reason_tag", "u1", 2),
        ("reason", "u1"),
        ("relevance_tag", "u1", 2),
        ("relevance", "<f4"),
    ]
)
_VARINT4_LIMIT = 1 << 28


def _varint4(values: np.ndarray) -> np.ndarray:
    shifts = np.arange(4, dtype=np.uint32) * 7
    groups = (values.astype(np.uint32)[:, None] >> shifts) & 0x7F
    return (groups | np.array([0x80, 0x80, 0x80, 0], dtype=np.uint32)).astype(np.uint8)


def _session_entries(turns: SessionCosts, reasons: np.ndarray, relevance: np.ndarray) -> bytes:
    """The serialized ``entries`` of a ContextManifest for the session's turns."""
    count = len(turns)
    if count >= _VARINT4_LIMIT or (count and int(turns.tokens.max()) >= _VARINT4_LIMIT):
        manifest = pb.ContextManifest()
        for index in range(count):
            manifest.entries.add(
                source=pb.SOURCE_SESSION,
                index=index,
                role=int(turns.roles[index]),
                tokens=int(turns.tokens[index]),
                disposition=pb.DISPOSITION_INCLUDED if reasons[index] else pb.DISPOSITION_DROPPED,
                reason=int(reasons[index]),
                relevance=float(relevance[index]),
            )
        return manifest.SerializeToString()
    entries = np.zeros(count, dtype=_ENTRY)
    entries["tag"] = 1 << 3 | 2
    entries["size"] = _ENTRY.itemsize - 2
    entries["source_tag"] = 1 << 3
    entries["source"] = pb.SOURCE_SESSION
    entries["index_tag"] = 2 << 3
    entries["index"] = _varint4(np.arange(count))
    entries["role_tag"] = 3 << 3
    entries["role"] = turns.roles
    entries["tokens_tag"] = 4 << 3
    entries["tokens"] = _varint4(turns.tokens)
    entries["disposition_tag"] = 5 << 3
    entries["disposition"] = np.where(reasons > 0, pb.DISPOSITION_INCLUDED, pb.DISPOSITION_DROPPED)
    # Field 30, varint, and field 31, 32-bit: two-byte tags.
    entries["reason_tag"] = (30 << 3 | 0x80) & 0xFF, 30 << 3 >> 7
    entries["reason"] = reasons
    entries["relevance_tag"] = (31 << 3 | 5 | 0x80) & 0xFF, (31 << 3 | 5) >> 7
    entries["relevance"] = relevance
    return entries.tobytes()


def _cost(candidate: Candidate) -> TurnCost:
    return TurnCost(candidate.message.role, candidate.tokens)


def assemble(
    session: collections.abc.Sequence[Candidate],
    new: collections.abc.Sequence[Candidate],
    budget: int,
    template: TemplateTokens = TemplateTokens(),
) -> pb.AssembleContextResponse:
    """The "newest turns" prompt of a session whose texts are at hand."""
    turns = SessionCosts.of([_cost(c) for c in session])
    chosen = plan(turns, [_cost(c) for c in new], budget, template)
    return render(chosen, turns, {i: c.message for i, c in enumerate(session)}, new)
