"""Writes ``bench/data/cache_conversations.jsonl``: multi-turn conversations a
semantic cache should serve from a stored one (the same context reworded,
with extra small talk, or after unrelated earlier history) and ones it must
not (another topic, a swapped referent, a flipped intent).

Each row is a *scenario*: the stored conversation (user and assistant turns
ending with the user's follow-up) with its answer, and the variants asked
later, each labelled ``should_hit``. Scenarios come from the contextual
query chains of ``../shared/data/semantic-pairs/contextual_queries.json``
(rewritten by fixed rules) and from conversations written by hand below;
each scenario's portion (train, calibration, test) is chosen by a hash of
its stored first turn, so the test portion stays unseen while rules are
written. The output is deterministic.

    .venv/bin/python bench/cache_conversations.py
"""

from __future__ import annotations

import hashlib
import json
import re
import sys

import cache_data
import cache_traps

CONVERSATIONS_JSONL = cache_data.REPO_ROOT / "bench" / "data" / "cache_conversations.jsonl"

SMALL_TALK_BEFORE = [
    ("Hi there!", "Hello! How can I help you today?"),
    ("Good morning, hope you're doing well.", "Good morning! I'm doing well, thanks. What can I do for you?"),
    ("Hey, quick question for you.", "Sure, ask away!"),
]
SMALL_TALK_BETWEEN = [
    ("Thanks, that's helpful.", "You're welcome!"),
    ("Great, thank you!", "Glad to help."),
    ("Ok cool.", "Anything else?"),
]
REWORD_PREFIXES = ["Quick question: ", "I was wondering, ", "I'd like to know: "]

# (stored context, the same context reworded, a changed context, the follow-up,
# the changed context reworded): a changed context differs in what the
# follow-up depends on.
HAND_WRITTEN = [
    (
        "I'm subscribed to the premium streaming plan.",
        "I pay for the premium video streaming subscription.",
        "I have a membership at the downtown gym.",
        "How do I cancel it?",
        "I pay for a membership at the downtown gym.",
    ),
    (
        "My order number is 4521 and it hasn't arrived yet.",
        "Order 4521 still hasn't been delivered.",
        "My order number is 4587 and it hasn't arrived yet.",
        "Can you check its status?",
        "Order 4587 still hasn't been delivered.",
    ),
    (
        "I bought a Samsung Galaxy S23 last month.",
        "Last month I purchased a Samsung Galaxy S23.",
        "I bought an iPhone 15 last month.",
        "How do I reset it to factory settings?",
        "Last month I purchased an iPhone 15.",
    ),
    (
        "My checking account ending in 1234 was charged twice.",
        "I was double charged on my checking account that ends in 1234.",
        "My checking account ending in 9876 was charged twice.",
        "Can you refund the extra charge?",
        "I was double charged on my checking account that ends in 9876.",
    ),
    (
        "I'm planning a trip to Japan in April.",
        "I plan to visit Japan this April.",
        "I'm planning a trip to Japan in October.",
        "What should I pack?",
        "I plan to visit Japan this October.",
    ),
    (
        "I have a Python script that reads a large CSV file.",
        "My Python script reads a big CSV file.",
        "I have a Java program that reads a large CSV file.",
        "How can I make it faster?",
        "My Java program reads a big CSV file.",
    ),
    (
        "I'm cooking dinner for 4 people.",
        "I'm making dinner for four people tonight.",
        "I'm cooking dinner for 12 people.",
        "How much rice should I make?",
        "I'm making dinner for twelve people tonight.",
    ),
    (
        "My Honda Civic makes a grinding noise when braking.",
        "When I brake, my Honda Civic makes a grinding noise.",
        "My Toyota Corolla makes a grinding noise when braking.",
        "What could be causing it?",
        "When I brake, my Toyota Corolla makes a grinding noise.",
    ),
    (
        "I want to learn to play the guitar.",
        "I would like to learn guitar.",
        "I want to learn to play the piano.",
        "How long does it take to get good?",
        "I would like to learn piano.",
    ),
    (
        "I'm renting an apartment in Berlin.",
        "I rent a flat in Berlin.",
        "I'm renting an apartment in Munich.",
        "What is the average rent?",
        "I rent a flat in Munich.",
    ),
    (
        "My dog is 2 years old and keeps chewing the furniture.",
        "My two year old dog keeps chewing the furniture.",
        "My dog is 9 years old and keeps chewing the furniture.",
        "How do I stop this?",
        "My nine year old dog keeps chewing the furniture.",
    ),
    (
        "I take 200 mg of ibuprofen for headaches.",
        "For headaches I take 200 mg ibuprofen.",
        "I take 800 mg of ibuprofen for headaches.",
        "Is that dose safe?",
        "For headaches I take 800 mg ibuprofen.",
    ),
    (
        "I'm thinking about the Basic plan for $10 a month.",
        "I'm considering the Basic plan at $10 per month.",
        "I'm thinking about the Pro plan for $30 a month.",
        "Does it include customer support?",
        "I'm considering the Pro plan at $30 per month.",
    ),
    (
        "I want to upgrade my Dell laptop to 32 GB of RAM.",
        "I'd like to upgrade my Dell laptop to 32GB RAM.",
        "I want to upgrade my Dell laptop to 64 GB of RAM.",
        "Is it worth it?",
        "I'd like to upgrade my Dell laptop to 64GB RAM.",
    ),
    (
        "I am going to renew my gym membership.",
        "I'll renew my gym membership.",
        "I am not going to renew my gym membership.",
        "What happens to my locker?",
        "I won't renew my gym membership.",
    ),
    (
        "Please cancel my streaming subscription.",
        "I want to cancel my streaming subscription.",
        "Please don't cancel my streaming subscription.",
        "When does that take effect?",
        "I don't want to cancel my streaming subscription.",
    ),
    (
        "I need a flight from Paris to London on Friday.",
        "I'm looking for a Friday flight from Paris to London.",
        "I need a flight from London to Paris on Friday.",
        "Which airline is cheapest?",
        "I'm looking for a Friday flight from London to Paris.",
    ),
    (
        "I'm writing a cover letter for a nursing job.",
        "I'm working on a cover letter for a nursing position.",
        "I'm writing a cover letter for a teaching job.",
        "How long should it be?",
        "I'm working on a cover letter for a teaching position.",
    ),
    # A flipped intent said in other words: an antonym inflected, an
    # opposite prefix.
    (
        "I'm thinking of buying my neighbour's car.",
        "I'm considering buying my neighbour's car.",
        "I'm thinking of selling my car to my neighbour.",
        "What paperwork do I need?",
        "I'd like to sell my car to my neighbour.",
    ),
    (
        "I want to upgrade my phone plan.",
        "I'd like to upgrade my mobile plan.",
        "I want to downgrade my phone plan.",
        "How much will it cost?",
        "I'd like to downgrade my mobile plan.",
    ),
    (
        "I want to increase my credit limit.",
        "I'd like a higher credit limit.",
        "I want to decrease my credit limit.",
        "How long does it take?",
        "I'd like a lower credit limit.",
    ),
]
# Slot-filling conversations, written by hand: a request, the assistant's
# question about it, the user's answer (a fragment, which names nothing of
# the request), and a follow-up. The follow-up's answer depends on the
# request, which neither the answer turn nor the follow-up repeats: (the
# request, the request asked with the same words otherwise, another request,
# the assistant's question, the user's answer, the follow-up).
SLOT_FILLING = [
    (
        "Suggest a recipe for dinner.",
        "Can you suggest a dinner recipe?",
        "Suggest a dessert recipe.",
        "Any dietary restrictions?",
        "Make it vegan.",
        "How long will it take?",
    ),
    (
        "Write a cover letter for a nursing job.",
        "Could you write a nursing job cover letter?",
        "Write a cover letter for a teaching job.",
        "What tone would you like?",
        "Keep it formal.",
        "How long should it be?",
    ),
    (
        "Plan a weekend trip to the beach.",
        "Can you plan a beach trip for the weekend?",
        "Plan a weekend trip to the mountains.",
        "Who is going?",
        "Just me and my wife.",
        "What should we pack?",
    ),
    (
        "Recommend a laptop for video editing.",
        "Which laptop would you recommend for video editing?",
        "Recommend a laptop for office work.",
        "What is your budget?",
        "Not too expensive.",
        "Which brand is most reliable?",
    ),
    (
        "Create a workout plan for building muscle.",
        "Can you create a muscle building workout plan?",
        "Create a workout plan for losing weight.",
        "How experienced are you?",
        "A complete beginner.",
        "How often should I rest?",
    ),
    (
        "Translate my resume into Spanish.",
        "Could you translate my resume to Spanish?",
        "Translate my resume into German.",
        "Should I keep the formatting?",
        "Yes, keep it.",
        "Will the job titles change?",
    ),
    (
        "Suggest a name for my new puppy.",
        "Can you suggest a puppy name for me?",
        "Suggest a name for my new kitten.",
        "Male or female?",
        "A girl.",
        "Which one is most popular?",
    ),
    (
        "Help me write a toast for my sister's wedding.",
        "Could you help me write a wedding toast for my sister?",
        "Help me write a toast for my sister's retirement.",
        "Funny or sentimental?",
        "A bit of both.",
        "How long should I speak?",
    ),
    (
        "Recommend a houseplant for my bedroom.",
        "Which houseplant would you recommend for a bedroom?",
        "Recommend a houseplant for my bathroom.",
        "How much light does it get?",
        "Very little.",
        "How often do I water it?",
    ),
    (
        "Draft an email asking my landlord to fix the heating.",
        "Could you draft an email to my landlord asking to fix the heating?",
        "Draft an email asking my landlord to fix the plumbing.",
        "How urgent is it?",
        "Pretty urgent.",
        "Should I mention the lease?",
    ),
    (
        "Pick a board game for family night.",
        "Can you pick a family night board game?",
        "Pick a card game for family night.",
        "How many players?",
        "Five of us.",
        "How long does a round take?",
    ),
    (
        "Write a bedtime story about a dragon.",
        "Could you write a dragon bedtime story?",
        "Write a bedtime story about a mermaid.",
        "How old is the listener?",
        "She is six.",
        "Can you make it rhyme?",
    ),
]

GENERIC_REPLY = "Sure, I can help with that."
GENERIC_REPLY_REWORDED = "Of course, happy to help."


def _portion(key: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % 100
    if bucket < cache_data.TRAIN_BUCKETS:
        return "train"
    if bucket < cache_data.CALIBRATION_BUCKETS:
        return "calibration"
    return "test"


def _turns(*pairs: tuple[str, str], question: str) -> list[dict]:
    messages = []
    for user, assistant in pairs:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    messages.append({"role": "user", "content": question})
    return messages


def _reworded(text: str, i: int) -> str:
    changed = cache_traps.paraphrase(text)
    if changed is not None:
        return changed
    return REWORD_PREFIXES[i % len(REWORD_PREFIXES)] + text[0].lower() + text[1:]


def _swapped(text: str, reply: str) -> tuple[str, str] | None:
    """A referent of ``text`` replaced (an entity, else a number or date), and
    the same replacement in the reply when it names it."""
    for rule in (cache_traps.swap_entity, cache_traps.change_number):
        changed = rule(text)
        if changed is not None and changed != text:
            before = [w for w in re.findall(r"\w+", text) if w not in re.findall(r"\w+", changed)]
            after = [w for w in re.findall(r"\w+", changed) if w not in re.findall(r"\w+", text)]
            if len(before) == 1 and len(after) == 1:
                reply = re.sub(rf"\b{re.escape(before[0])}\b", after[0], reply)
            return changed, reply
    return None


def _variants(
    i, main, reply, follow_up, other_main, other_reply, reworded, reworded_reply, changed, changed_reworded
):
    small_before = SMALL_TALK_BEFORE[i % len(SMALL_TALK_BEFORE)]
    small_between = SMALL_TALK_BETWEEN[i % len(SMALL_TALK_BETWEEN)]
    variants = [
        ("reworded", True, _turns((reworded, reworded_reply), question=follow_up)),
        ("small_talk", True, _turns(small_before, (main, reply), small_between, question=follow_up)),
        ("unrelated_history", True, _turns((other_main, other_reply), (main, reply), question=follow_up)),
        ("other_topic", False, _turns((other_main, other_reply), question=follow_up)),
        # The right topic earlier, but the follow-up now refers to another.
        ("later_other_topic", False, _turns((main, reply), (other_main, other_reply), question=follow_up)),
    ]
    if changed is not None:
        variants.append(("swapped_referent", False, _turns(changed, question=follow_up)))
    # A changed context said in other words (its name or number in another
    # place than the stored one's).
    if changed_reworded is not None:
        variants.append(("swapped_referent_reworded", False, _turns(changed_reworded, question=follow_up)))
    return [{"category": c, "should_hit": h, "messages": m} for c, h, m in variants]


def generate() -> list[dict]:
    chains = json.loads((cache_data.DATA_DIR / "contextual_queries.json").read_text(encoding="utf-8"))
    rows = []
    for i, chain in enumerate(chains):
        other = chains[(i + 7) % len(chains)]
        main, reply = chain["Main Query"], chain["Main Query Response"]
        rows.append(
            {
                "source": "contextual_queries",
                "portion": _portion(main),
                "stored": _turns((main, reply), question=chain["Follow-Up Query"]),
                "answer": chain["Follow Up Query Response"],
                "asked": _variants(
                    i,
                    main,
                    reply,
                    chain["Follow-Up Query"],
                    other["Main Query"],
                    other["Main Query Response"],
                    _reworded(main, i),
                    reply,
                    _swapped(main, reply),
                    _swapped(_reworded(main, i), reply),
                ),
            }
        )
    for i, (context, reworded, changed, follow_up, changed_reworded) in enumerate(HAND_WRITTEN):
        other = HAND_WRITTEN[(i + 5) % len(HAND_WRITTEN)][0]
        rows.append(
            {
                "source": "hand",
                "portion": _portion(context),
                "stored": _turns((context, GENERIC_REPLY), question=follow_up),
                "answer": f"(the answer to {follow_up!r} about: {context})",
                "asked": _variants(
                    i,
                    context,
                    GENERIC_REPLY,
                    follow_up,
                    other,
                    GENERIC_REPLY,
                    reworded,
                    GENERIC_REPLY_REWORDED,
                    (changed, GENERIC_REPLY),
                    (changed_reworded, GENERIC_REPLY_REWORDED),
                ),
            }
        )
    for i, (request, reworded, changed, asked, answer, follow_up) in enumerate(SLOT_FILLING):
        small_before = SMALL_TALK_BEFORE[i % len(SMALL_TALK_BEFORE)]
        variants = [
            (
                "slot_small_talk",
                True,
                _turns(small_before, (request, asked), (answer, GENERIC_REPLY), question=follow_up),
            ),
            (
                "slot_reworded_request",
                True,
                _turns((reworded, asked), (answer, GENERIC_REPLY), question=follow_up),
            ),
            (
                "slot_other_request",
                False,
                _turns((changed, asked), (answer, GENERIC_REPLY), question=follow_up),
            ),
        ]
        rows.append(
            {
                "source": "hand_slot_filling",
                "portion": _portion(request),
                "stored": _turns((request, asked), (answer, GENERIC_REPLY), question=follow_up),
                "answer": f"(the answer to {follow_up!r} about: {request} {answer})",
                "asked": [{"category": c, "should_hit": h, "messages": m} for c, h, m in variants],
            }
        )
    return rows


def load(portions: tuple[str, ...]) -> list[dict]:
    rows = [json.loads(line) for line in CONVERSATIONS_JSONL.read_text(encoding="utf-8").splitlines() if line]
    return [row for row in rows if row["portion"] in portions]


def main() -> None:
    rows = generate()
    CONVERSATIONS_JSONL.parent.mkdir(parents=True, exist_ok=True)
    with CONVERSATIONS_JSONL.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for row in rows:
        for variant in row["asked"]:
            counts[variant["category"]] = counts.get(variant["category"], 0) + 1
    portions = {p: sum(1 for r in rows if r["portion"] == p) for p in cache_data.PORTIONS}
    print(f"{len(rows)} scenarios {portions} to {CONVERSATIONS_JSONL}: {counts}", file=sys.stderr)


if __name__ == "__main__":
    main()
