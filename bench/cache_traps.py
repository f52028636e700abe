"""Writes ``bench/data/cache_traps.jsonl``: question pairs a semantic cache
must tell apart (negations, changed numbers and dates, swapped entities,
reversed roles, changed scope) and pairs it should serve (paraphrases,
near-verbatim repeats).

Most are rewrites of QQP development questions by fixed rules, so every
trap inherits the train/calibration/test portion of the question it was
made from (``cache_data.load_qqp``) and the held-out portion stays unseen;
the rest are written by hand below, their portion chosen by a hash. The
output is deterministic: rerunning rewrites the same file.

    .venv/bin/python bench/cache_traps.py
"""

from __future__ import annotations

import hashlib
import json
import re
import sys

import cache_data

# Per category, at most this many rewrites of QQP questions.
PER_CATEGORY = 450

ENTITY_GROUPS = [
    [
        "India",
        "Pakistan",
        "China",
        "Japan",
        "Germany",
        "France",
        "Canada",
        "Australia",
        "Russia",
        "Brazil",
        "Italy",
        "Spain",
        "Mexico",
        "Nepal",
        "Bangladesh",
        "Singapore",
        "Dubai",
        "Israel",
        "Iran",
        "Korea",
    ],
    [
        "London",
        "Paris",
        "Delhi",
        "Mumbai",
        "Bangalore",
        "Chennai",
        "Hyderabad",
        "Pune",
        "Kolkata",
        "Tokyo",
        "Berlin",
        "Toronto",
        "Sydney",
        "Boston",
        "Chicago",
        "Seattle",
        "Beijing",
        "Moscow",
        "Rome",
        "Madrid",
    ],
    [
        "Google",
        "Facebook",
        "Amazon",
        "Microsoft",
        "Apple",
        "Quora",
        "Twitter",
        "Uber",
        "Netflix",
        "Samsung",
        "Flipkart",
        "Infosys",
        "Tesla",
        "Intel",
        "Oracle",
        "IBM",
        "Snapchat",
        "Instagram",
        "WhatsApp",
        "YouTube",
    ],
    ["Python", "Java", "JavaScript", "Ruby", "PHP", "Swift", "Haskell", "Perl", "Scala", "Kotlin"],
    ["Trump", "Clinton", "Obama", "Modi", "Putin", "Kejriwal", "Gandhi", "Hitler", "Lincoln", "Einstein"],
    ["Hindi", "English", "French", "German", "Spanish", "Chinese", "Japanese", "Tamil", "Arabic", "Russian"],
]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
SCOPE_SWAPS = {
    "all": "only",
    "only": "all",
    "first": "last",
    "last": "first",
    "most": "least",
    "least": "most",
    "always": "sometimes",
    "every": "no",
    "some": "all",
    "everyone": "no one",
    "any": "every",
    "each": "only one",
}
NEGATABLE = re.compile(
    r"^(?P<head>(?:(?:Why|How|When|Where|What|Which|Who) )?"
    r"(?:do|does|did|can|could|should|would|will|is|are|was|were) "
    r"(?:I|you|we|they|he|she|it|people|one|women|men|Indians|Americans|students|girls|guys))\b",
    re.IGNORECASE,
)
NEGATED = [
    (re.compile(p, re.IGNORECASE), r)
    for p, r in [
        (r"\bcan't\b", "can"),
        (r"\bcannot\b", "can"),
        (r"\bdon't\b", "do"),
        (r"\bdoesn't\b", "does"),
        (r"\bdidn't\b", "did"),
        (r"\bisn't\b", "is"),
        (r"\baren't\b", "are"),
        (r"\bwon't\b", "will"),
        (r"\bshouldn't\b", "should"),
        (r"\bwouldn't\b", "would"),
        (r"\bnever\b", "always"),
        (r" not\b", ""),
    ]
]
NUMBER = re.compile(r"\b\d+(?:\.\d+)?\b")
DIRECTIONAL = re.compile(r"\b(from|between) (\w+) (to|and) (\w+)|\b(\w+) (to|into|than|over|vs\.?) (\w+)")
PARAPHRASE_RULES = [
    (re.compile(p), r)
    for p, r in [
        (r"^How do I (.+)\?$", r"How can I \1?"),
        (r"^How can I (.+)\?$", r"What is the way to \1?"),
        (r"^What is the best way to (.+)\?$", r"How do I best \1?"),
        (r"^What is (.+)\?$", r"Can you tell me what \1 is?"),
        (r"^What are (.+)\?$", r"Can you tell me what \1 are?"),
        (r"^Why (?:is|are) (\w+) (.+)\?$", r"What makes \1 \2?"),
        (r"^Is it possible to (.+)\?$", r"Can one \1?"),
        (r"^How should I (.+)\?$", r"What is the right way to \1?"),
        (r"^Which is the best (.+)\?$", r"What is the best \1?"),
    ]
]

# (category, stored, asked): each should miss, except paraphrase and repeat.
HAND_WRITTEN = [
    ("negation", "Cancel my subscription", "Don't cancel my subscription"),
    ("negation", "How do I delete my account?", "How do I not delete my account?"),
    ("negation", "Should I take ibuprofen with food?", "Should I not take ibuprofen with food?"),
    ("negation", "Is it safe to drink tap water in Mexico?", "Is it unsafe to drink tap water in Mexico?"),
    ("negation", "Why does my phone charge?", "Why doesn't my phone charge?"),
    ("negation", "Which foods contain gluten?", "Which foods contain no gluten?"),
    ("negation", "Enable two-factor authentication", "Disable two-factor authentication"),
    ("negation", "What are the advantages of remote work?", "What are the disadvantages of remote work?"),
    ("negation", "Is coffee good for your heart?", "Is coffee bad for your heart?"),
    ("negation", "How do I start the server?", "How do I stop the server?"),
    ("negation", "Is it legal to record a phone call?", "Is it illegal to record a phone call?"),
    ("negation", "Can I buy stocks on weekends?", "Can I sell stocks on weekends?"),
    ("negation", "Why do cats like boxes?", "Why do cats dislike boxes?"),
    ("negation", "How can I increase my credit score?", "How can I decrease my credit score?"),
    # The flip said in another form: an antonym inflected, an opposite
    # prefix, a particle turned around, another verb.
    ("negation", "Is it cheaper to rent or buy?", "Is it more expensive to rent or buy?"),
    ("negation", "How do I upgrade my plan?", "How do I downgrade my plan?"),
    ("negation", "How do I import contacts to my phone?", "How do I export contacts from my phone?"),
    ("negation", "What is the maximum dose of ibuprofen?", "What is the minimum dose of ibuprofen?"),
    ("negation", "How do I zoom in on a Mac?", "How do I zoom out on a Mac?"),
    (
        "negation",
        "I will renew my membership, what happens to my locker?",
        "I won't be renewing my membership, what happens to my locker?",
    ),
    ("negation", "How do I cancel my subscription?", "How do I keep my subscription?"),
    # Intents opposed by words no antonym or prefix relates: left to the
    # learned stage, which serves them at the loosest bounds.
    ("negation", "How do I renew my subscription?", "How do I cancel my subscription?"),
    ("negation", "How can I increase my credit limit?", "How can I lower my credit limit?"),
    ("number", "What is 2+2?", "What is 2+3?"),
    ("number", "How many calories are in 2 eggs?", "How many calories are in 3 eggs?"),
    ("number", "What happened on 9 November 1989?", "What happened on 9 November 1991?"),
    ("number", "Convert 5 miles to kilometers", "Convert 50 miles to kilometers"),
    ("number", "Is 17 a prime number?", "Is 19 a prime number?"),
    ("number", "What was the weather on March 3?", "What was the weather on March 4?"),
    (
        "number",
        "What is the boiling point of water in Celsius?",
        "What is the boiling point of water in Kelvin?",
    ),
    (
        "number",
        "How long does it take to boil an egg for 5 minutes?",
        "How long does it take to boil an egg for 5 hours?",
    ),
    (
        "number",
        "What is the tax rate for income above $50,000?",
        "What is the tax rate for income above $80,000?",
    ),
    ("number", "Who won the World Cup in 2014?", "Who won the World Cup in 2018?"),
    # A number or date in words.
    ("number", "What happened yesterday in the news?", "What happened today in the news?"),
    (
        "number",
        "How much rice should I cook for 4 people?",
        "How much rice should I cook for a dozen people?",
    ),
    (
        "number",
        "What is the weather like in Paris in summer?",
        "What is the weather like in Paris in winter?",
    ),
    ("entity_order", "How far is it from Paris to London?", "How far is it from London to Paris?"),
    ("entity_order", "How do I convert Celsius to Fahrenheit?", "How do I convert Fahrenheit to Celsius?"),
    ("entity_order", "Is Python faster than Java?", "Is Java faster than Python?"),
    (
        "entity_order",
        "How do I move files from Dropbox to Google Drive?",
        "How do I move files from Google Drive to Dropbox?",
    ),
    ("entity_order", "Translate hello from English to Spanish", "Translate hello from Spanish to English"),
    ("entity_order", "Did Federer beat Nadal in 2008?", "Did Nadal beat Federer in 2008?"),
    (
        "entity_order",
        "What is the exchange rate from dollars to euros?",
        "What is the exchange rate from euros to dollars?",
    ),
    ("entity_order", "How do I migrate from MySQL to Postgres?", "How do I migrate from Postgres to MySQL?"),
    ("entity_swap", "What is the capital of France?", "What is the capital of Germany?"),
    ("entity_swap", "Who founded Microsoft?", "Who founded Apple?"),
    ("entity_swap", "How tall is Mount Everest?", "How tall is Mount Kilimanjaro?"),
    ("entity_swap", "What is the population of Tokyo?", "What is the population of Osaka?"),
    ("entity_swap", "When did Obama become president?", "When did Lincoln become president?"),
    ("entity_swap", "How do I install Docker on Ubuntu?", "How do I install Docker on Windows?"),
    ("scope", "List all the planets in the solar system", "List only the rocky planets in the solar system"),
    (
        "scope",
        "Who was the first president of the United States?",
        "Who was the last president of the United States?",
    ),
    ("scope", "Which countries use the euro?", "Which countries except Germany use the euro?"),
    ("scope", "What are all the side effects of aspirin?", "What is the most common side effect of aspirin?"),
    ("scope", "Do all birds fly?", "Do some birds fly?"),
    ("scope", "Is Python the best language for beginners?", "Is Python the only language for beginners?"),
    ("scope", "What are the symptoms of flu?", "What are the earliest symptoms of flu?"),
    # "except" in other words.
    ("scope", "Which countries use the euro?", "Which countries besides Germany use the euro?"),
    ("scope", "Which countries use the euro?", "Which countries other than Germany use the euro?"),
    ("paraphrase", "How do I learn Python quickly?", "What is the fastest way to learn Python?"),
    ("paraphrase", "What is the capital of France?", "Which city is the capital of France?"),
    ("paraphrase", "How can I lose weight fast?", "What is the quickest way to lose weight?"),
    ("paraphrase", "How do I reset my password?", "How can I reset my password?"),
    ("paraphrase", "What are good books to read?", "Which books are worth reading?"),
    ("paraphrase", "How do I make money online?", "What are ways to earn money online?"),
    ("paraphrase", "Why is the sky blue?", "What makes the sky blue?"),
    ("paraphrase", "How do I improve my English?", "How can I get better at English?"),
    ("paraphrase", "What is machine learning?", "Can you explain what machine learning is?"),
    ("paraphrase", "How do I cancel my subscription?", "How can I cancel my subscription?"),
    ("paraphrase", "What is the best way to learn guitar?", "How should I learn to play guitar?"),
    ("paraphrase", "How do I stop procrastinating?", "How can I stop procrastinating?"),
    ("paraphrase", "How do transformers work?", "How does a transformer work?"),
    ("paraphrase", "What causes earthquakes?", "Why do earthquakes happen?"),
    ("paraphrase", "How do I become a data scientist?", "What should I do to become a data scientist?"),
    ("paraphrase", "Is it safe to eat raw eggs?", "Are raw eggs safe to eat?"),
    ("paraphrase", "How can I sleep better?", "How do I improve my sleep?"),
    ("paraphrase", "What is the meaning of life?", "What's the meaning of life?"),
    ("paraphrase", "How do I cancel my subscription?", "How can I end my subscription?"),
    (
        "paraphrase",
        "Which countries except Germany use the euro?",
        "Which countries other than Germany use the euro?",
    ),
    ("paraphrase", "How do I turn on Bluetooth?", "How can I turn on Bluetooth?"),
    ("paraphrase", "Is buying a house worth it?", "Is it worth it to buy a house?"),
    # Each holds what reads as a flip, and is none: a side saying both halves
    # of an opposite pair, a stop word "negated" by a prefix ("into"), a
    # particle after another particle, opposite prefixes on unrelated words.
    ("paraphrase", "Is coffee good or bad for your health?", "Is coffee good for your health?"),
    ("paraphrase", "How can someone hack into my phone?", "How can someone hack my phone?"),
    ("paraphrase", "Where can I eat out in Paris?", "Where can I eat in Paris?"),
    ("paraphrase", "What does a career in nursing entail?", "Describe a career in nursing in detail."),
    ("repeat", "How do I learn Python quickly?", "how do i learn python quickly"),
    ("repeat", "What is the capital of France?", "what is the capital of france?"),
    ("repeat", "How do I reset my password?", "How do I reset my pasword?"),
    ("repeat", "Why is the sky blue?", "why is the sky blue"),
]


def _hash_order(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def negate(q: str) -> str | None:
    for pattern, replacement in NEGATED:
        if pattern.search(q):
            return " ".join(pattern.sub(replacement, q, count=1).split())
    match = NEGATABLE.match(q)
    if match:
        return f"{match.group('head')} not{q[match.end() :]}"
    return None


def change_number(q: str) -> str | None:
    match = NUMBER.search(q)
    if match:
        text = match.group()
        value = float(text) if "." in text else int(text)
        if isinstance(value, int) and 1900 <= value <= 2100:
            changed = str(value - 3)
        elif isinstance(value, int):
            changed = str(value + 1 if value < 10 else value * 2)
        else:
            changed = f"{value * 2:g}"
        return q[: match.start()] + changed + q[match.end() :]
    for i, month in enumerate(MONTHS):
        if re.search(rf"\b{month}\b", q):
            return re.sub(rf"\b{month}\b", MONTHS[(i + 5) % 12], q, count=1)
    return None


def swap_entity(q: str) -> str | None:
    for group in ENTITY_GROUPS:
        for i, name in enumerate(group):
            if re.search(rf"\b{re.escape(name)}\b", q):
                for other in group[i + 1 :] + group[:i]:
                    if not re.search(rf"\b{re.escape(other)}\b", q):
                        return re.sub(rf"\b{re.escape(name)}\b", other, q, count=1)
    return None


def reverse_roles(q: str) -> str | None:
    match = DIRECTIONAL.search(q)
    if match is None:
        return None
    if match.group(1):
        if match.group(1) == "between":
            return None  # "between X and Y" is symmetric
        a, b = match.group(2), match.group(4)
        swapped = f"{match.group(1)} {b} {match.group(3)} {a}"
    else:
        a, b = match.group(5), match.group(7)
        # Only names (capitalized, not the first word) make the swap a role
        # change, not a garbled sentence.
        if not (a[:1].isupper() and b[:1].isupper()) or match.start() == 0:
            return None
        swapped = f"{b} {match.group(6)} {a}"
    if a.lower() == b.lower():
        return None
    return q[: match.start()] + swapped + q[match.end() :]


def change_scope(q: str) -> str | None:
    for word, replacement in SCOPE_SWAPS.items():
        pattern = re.compile(rf"\b{word}\b", re.IGNORECASE)
        if pattern.search(q):
            return pattern.sub(replacement, q, count=1)
    match = re.search(r"\bthe (best|main|biggest|most important)\b", q)
    if match:
        return q[: match.start()] + "the only" + q[match.end() :]
    return None


def paraphrase(q: str) -> str | None:
    for pattern, replacement in PARAPHRASE_RULES:
        if pattern.match(q):
            return pattern.sub(replacement, q)
    return None


def repeat(q: str) -> str | None:
    # Case, trailing punctuation and one transposed letter: what people retype.
    words = q.rstrip("?!. ").lower().split()
    long_words = [i for i, w in enumerate(words) if len(w) >= 6 and w.isalpha()]
    if not long_words:
        return None
    i = long_words[int.from_bytes(_hash_order(q)[:2], "little") % len(long_words)]
    w = words[i]
    words[i] = w[:2] + w[3] + w[2] + w[4:]
    return " ".join(words)


RULES = {
    "negation": (negate, False),
    "number": (change_number, False),
    "entity_swap": (swap_entity, False),
    "entity_order": (reverse_roles, False),
    "scope": (change_scope, False),
    "paraphrase": (paraphrase, True),
    "repeat": (repeat, True),
}


def generate() -> list[dict]:
    questions: dict[str, str] = {}
    for pair in cache_data.load_qqp():
        for q in (pair.stored, pair.asked):
            questions.setdefault(q, pair.portion)
    # Clean, ordinary questions: the rules are written for them.
    ordered = sorted(
        (q for q in questions if 20 <= len(q) <= 150 and q.endswith("?") and q.count("?") == 1),
        key=_hash_order,
    )
    rows = []
    for category, (rule, duplicate) in RULES.items():
        made = 0
        for q in ordered:
            asked = rule(q)
            if asked is None or asked == q:
                continue
            rows.append(
                {
                    "category": category,
                    "stored": q,
                    "asked": asked,
                    "duplicate": duplicate,
                    "portion": questions[q],
                    "source": "qqp-rewrite",
                }
            )
            made += 1
            if made == PER_CATEGORY:
                break
    group = cache_data.question_groups((stored, asked) for _, stored, asked in HAND_WRITTEN)
    for category, stored, asked in HAND_WRITTEN:
        # By the pair's group of linked questions, as load_qqp splits QQP: a
        # portion by the pair alone put "How do I cancel my subscription?" in
        # a train pair and in test pairs (an audit).
        bucket = int.from_bytes(_hash_order(group[stored])[:8], "little") % 100
        portion = (
            "train"
            if bucket < cache_data.TRAIN_BUCKETS
            else "calibration"
            if bucket < cache_data.CALIBRATION_BUCKETS
            else "test"
        )
        rows.append(
            {
                "category": category,
                "stored": stored,
                "asked": asked,
                "duplicate": category in ("paraphrase", "repeat"),
                "portion": portion,
                "source": "hand",
            }
        )
    return rows


def main() -> None:
    rows = generate()
    cache_data.TRAPS_JSONL.parent.mkdir(parents=True, exist_ok=True)
    with cache_data.TRAPS_JSONL.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["category"]] = counts.get(row["category"], 0) + 1
    print(f"{len(rows)} pairs to {cache_data.TRAPS_JSONL}: {counts}", file=sys.stderr)


if __name__ == "__main__":
    main()
