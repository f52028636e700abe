"""A question read once for every check and feature: its text as typed
plainly (NFKC, curly apostrophes, exponents, fractions, signs), its tokens
with contractions and clitics spelled out, and what the checks look for in
it (numbers and units, days, negations, names and their neighbours, role
markers, scope words, stems), kept in an ``Analysis``; the word tables the
checks share. Pure, no I/O."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
import unicodedata
from collections import Counter

# Beside the package, where the training script writes it.
MODEL_PATH = pathlib.Path(__file__).parent.with_name("verifier_model.json")


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _ordered_words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Letters of the Latin script (ASCII, Latin-1, Extended-A and -B, and
# Extended Additional's Vietnamese): accented words are words ("Zürich" was
# "z" and "rich"). Text in other scripts is not read at all (readable()).
_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff"
_TOKEN = re.compile(rf"\d+(?:[.,]\d+)*|[{_LATIN}]+(?:'[{_LATIN}]+)?|[$%+*/=<>-]")
_LATIN_LETTER = re.compile(rf"[{_LATIN}]")
# Characters read as the ones the tokens and checks know. Apostrophes as
# keyboards type them: phones and word processors turn "'" into a right
# single quotation mark ("don’t"), which the tokens split at ("don" + "t"):
# "Why don’t cats like water?" was served the answer of "Why do cats like
# water?" (no negation read), and the same question typed with "'" was
# vetoed as its negation. The fraction slash NFKC writes in a vulgar
# fraction ("½" is "1⁄2"), and signs as the operators the code check reads
# ("5 × 3" was served "5 ÷ 3"'s answer, "x ≤ 5" that of "x ≥ 5", "A → B"
# that of "A ← B"); currency signs as the units the number check reads
# ("100 €" was served "100 £"'s answer).
_TYPED = str.maketrans(
    {
        "\u2019": "'",
        "\u2018": "'",
        "\u02bc": "'",
        "\u2044": "/",
        "\u00d7": "*",
        "\u00f7": "/",
        "\u2212": "-",
        "\u2264": "<=",
        "\u2265": ">=",
        "\u2260": "!=",
        "\u2192": "->",
        "\u2190": "<-",
        "\u20ac": " euro ",
        "\u00a3": " pound ",
        "\u00a5": " yen ",
        "\u20b9": " rupee ",
    }
)
# Before NFKC, which would glue them to a word or number: a trademark sign
# to nothing ("Netflix™" would read as "NetflixTM", a name of its own), a
# numero sign to a word ("№ 5" would read "No 5", a negation).
_BEFORE_NFKC = str.maketrans({"\u2122": "", "\u2120": "", "\u2116": " number "})
# A superscript number is an exponent, said as "^" ("10³" is "10^3" where
# NFKC would read 103: "10³ kg" was served "103 kg"'s answer); a vulgar
# fraction after a number is a mixed number ("1½" is "1 1/2", not 11/2).
_SUPERSCRIPT = re.compile("[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+")
_MIXED_NUMBER = re.compile("(?<=\\d)(?=[\u00bc-\u00be\u2150-\u215e\u2189])")


# An ordinal of one to ten in digits, said as its word: "1st" is "first"
# (a scope word), "2nd" is "second" (a hunt: "the 1st president" was vetoed
# against "the first president" as a scope word added).
_SHORT_ORDINAL = re.compile(r"\b(10|[1-9])(?:st|nd|rd|th)\b", re.IGNORECASE)
# A bound said with a negation is the scope word it means: "no more than an
# hour" is "at most an hour" (a hunt: vetoed as a negation added).
_AT_MOST = re.compile(r"\b(?:no|not) (?:more|greater) than\b", re.IGNORECASE)
_AT_LEAST = re.compile(r"\b(?:no|not) (?:less|fewer) than\b", re.IGNORECASE)
_ORDINALS = _ordered_words(
    """first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth
    fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth"""
)


# Numbers written in notations the words of the other side say otherwise
# (a hunt: 8 such paraphrases vetoed as numbers replaced):
# A date in digits, where which part is the month is plain: "7/20/1969" and
# "1969-07-20" are "july 20, 1969" ("3/4/2020" is left as it is: March or
# April).
_SLASHED_DATE = re.compile(r"(?<![\w/.,])(\d{1,2})/(\d{1,2})/(\d{4}|\d{2})(?![\w/])")
_ISO_DATE = re.compile(r"(?<![\w/.,-])(\d{4})-(\d{2})-(\d{2})(?![\w/-])")
_MONTH_NAMES = _ordered_words(
    "january february march april may june july august september october november december"
)
# A time on the 24-hour clock, and whole hours: "14:30" is "2:30 pm",
# "18:00" "6 pm", "6:00 pm" "6 pm". An hour under 12 is a morning's only
# with its leading zero ("09:30"; "9:30" may be either half of the day).
# Only after a word that puts a time of day after it ("at 14:30"): "Is
# 14:30 a good 5k time?", "around 14:30", "from 16:10 to 16:9" say a duration
# or a ratio (two reviews).
_CLOCK = re.compile(
    r"\b(at|by|until|till|before|after|between|and|or|since) "
    r"(\d{1,2}):([0-5]\d)(?![\w:])(?!\s*[ap]\.?m\b)",
    re.IGNORECASE,
)
_WHOLE_HOUR = re.compile(r"(?<![\w:.,])(\d{1,2}):00(?=\s*[ap]\.?m\b)", re.IGNORECASE)
# A fraction of halves, thirds, quarters or eighths, after a whole number
# or alone, before a measure, as its decimal: "1/2 cup" is "0.5 cup" ("half
# a cup"), "1 1/2 cups" is "1.5 cups", "3/4 of" is "0.75 of". Not a date
# ("on 1/12") nor a ratio ("24/7", "50/50"), nor a division whose value the
# question may ask ("What does 1/2 return in Python?"), nor in a text with
# code (_CODE_SIGNS).
_FRACTION = re.compile(r"(?<![\w/.,])(?:(\d+) )?([1-7])/([2348]) ([^\W\d_]+)")
_MEASURES = _words(
    """of cup cups teaspoon teaspoons tablespoon tablespoons tsp tbsp stick sticks pint pints quart quarts
    inches miles pounds ounces hours tablet tablets pill pills dose"""
)
_CODE_SIGNS = re.compile(r"[=<>*+`(){}\[\]]")
# Quarters and thirds: "three quarters of a cup" is 0.75 of one ("3/4
# cup"), "three quarters of Americans" "0.75 of Americans" ("3/4 of"), "a
# quarter teaspoon" 0.25. A quarter alone may be a coin, and "a third"
# without an "of" is an ordinal ("a third pill", "for a third day": a
# review found them served against "a third of a pill").
_PARTS_OF = re.compile(
    r"\b(a|one|two|three|[1-3]) (quarters?|thirds?) (of )?((?:a|an|the) )*([^\W\d_]+)", re.IGNORECASE
)
_PARTS = {"quarter": 4, "quarters": 4, "third": 3, "thirds": 3}
# "one and a half" is 1.5, "two and a half" 2.5.
_AND_A_HALF = re.compile(
    r"(?<![\d,.])\b(\d+|one|two|three|four|five|six|seven|eight|nine|ten) and a half\b", re.IGNORECASE
)


def _date_as_said(month: int, day: int, year: str, whole: str) -> str:
    if 1 <= month <= 12 and 1 <= day <= 31:
        return f"{_MONTH_NAMES[month - 1]} {day}, {year}"
    return whole


def _slashed_date(match: re.Match) -> str:
    first, second = int(match.group(1)), int(match.group(2))
    if first <= 12 < second:
        return _date_as_said(first, second, match.group(3), match.group())
    if second <= 12 < first:
        return _date_as_said(second, first, match.group(3), match.group())
    return match.group()


def _iso_date(match: re.Match) -> str:
    return _date_as_said(int(match.group(2)), int(match.group(3)), match.group(1), match.group())


def _clock(match: re.Match) -> str:
    before, hour, minutes = match.group(1), int(match.group(2)), match.group(3)
    if 13 <= hour <= 23:
        return f"{before} {hour - 12}:{minutes} pm"
    if hour == 12:
        return f"{before} 12:{minutes} pm"
    if hour == 0:
        return f"{before} 12:{minutes} am"
    if match.group(2).startswith("0"):
        return f"{before} {hour}:{minutes} am"
    return match.group()


# The most digits a whole number before a fraction or "and a half" is read
# with: a longer one is left as typed (a review: 400 nines overflowed a float).
_MOST_DIGITS = 12


def _a_measure(word: str) -> bool:
    return word.lower() in _MEASURES or word.lower() in UNIT_WORDS


def _fraction(match: re.Match) -> str:
    numerator, denominator, measure = int(match.group(2)), int(match.group(3)), match.group(4)
    if numerator >= denominator or not _a_measure(measure):
        return match.group()
    if len(match.group(1) or "") > _MOST_DIGITS:
        return match.group()
    value = int(match.group(1) or 0) + numerator / denominator
    return f"{_written(round(value, 4))} {measure}"


def _parts_of(match: re.Match) -> str:
    count, part, of, measure = match.group(1).lower(), match.group(2).lower(), match.group(3), match.group(5)
    parts = _PARTS[part]
    number = {"a": 1, "one": 1, "two": 2, "three": 3}.get(count) or int(count)
    if number >= parts:
        return match.group()
    a_measure = _a_measure(measure)
    if of and not a_measure:
        return f"{_written(round(number / parts, 4))} of {match.group(4) or ''}{measure}"
    if not of and (part.startswith("third") or not a_measure):
        return match.group()
    # "three quarters of a cup" is "0.75 cup", as "3/4 cup" reads.
    return f"{_written(round(number / parts, 4))} {measure}"


def _and_a_half(match: re.Match) -> str:
    whole = match.group(1).lower()
    before = match.string[: match.start()].split()[-1:]
    if len(whole) > _MOST_DIGITS or (before and before[0].lower() in _TENS_WORDS):
        # "thirty two and a half" is 32.5, which this does not read.
        return match.group()
    value = int(whole) if whole.isdigit() else (1 if whole == "one" else NUMBER_WORDS[whole])
    return _written(value + 0.5)


# A degree sign as the words it stands for: "100°F" is "100 degrees
# Fahrenheit" (a hunt: the "F" read as a name against "Fahrenheit"); NFKC
# writes "℉" as "°F".
_DEGREES = re.compile(r"°\s*([CF])\b|°")
_SCALES = {"C": " degrees Celsius", "F": " degrees Fahrenheit", None: " degrees"}
# The world wars by their initials, their ordinals or their numbers in words:
# "WWII", "ww2", "the second world war" and "world war two" are "World War
# II" (two hunts: read as a name, a number or the scope word "first" against
# "World War II"). "WW I" with a space only in capitals: "ww i" may be "ww" and "I".
_WORLD_WAR = re.compile(
    r"\b(?:WW (II|I|2|1)|(?i:(?:ww|world war )(ii|i|2|1|two|one)))\b"
    r"|\b(?i:(?:the )?(first|second) world war)\b"
)
_WAR_NUMBERS = {
    "ii": "II",
    "2": "II",
    "two": "II",
    "second": "II",
    "i": "I",
    "1": "I",
    "one": "I",
    "first": "I",
}


# Chat shorthand: "w/o" is "without" (a hunt: 9 paraphrases vetoed as a
# negation dropped). Not "w/" as "with": the score read the pairs it joined
# lower (3 of a hunt's served paraphrases refused).
_WITHOUT = re.compile(r"\bw/o\b", re.IGNORECASE)


# "half a dozen" is 6 ("half dozen" reads as half of the dozen after it).
_HALF_A_DOZEN = re.compile(r"\bhalf an? dozen\b", re.IGNORECASE)


# A century by its ordinal is its hundreds: "the 19th century" and "the
# nineteenth century" are "the 1800s" (a hunt: 10 such paraphrases vetoed as
# numbers replaced). From the second to the twentieth: "the 2000s" is a
# decade as often, and the first century's hundreds are none.
_CENTURY = re.compile(
    rf"\b(1\d|20|[2-9])(?:st|nd|rd|th)[ -]century\b"
    rf"|(?<![-\w])(?<!twenty )({'|'.join(_ORDINALS[1:])})[ -]century\b",
    re.IGNORECASE,
)
# A year said beside a century, or its first or last year, its start or end,
# asks where its edge is ("Was 1900 in the 19th century?" is no "... in the
# 1800s?", "What was the first year of the 20th century?": a review): the
# century is left as said.
_A_CENTURYS_EDGE = re.compile(
    r"\b1\d{3}\b|\b20\d{2}\b|\b(?:years?|decades?|first|last|begin|began|begins|start|started|starts|end|ended"
    r"|ends)\b",
    re.IGNORECASE,
)
# A decade by its last two digits with an apostrophe, or early, mid or late
# in one: "the '70s", "the 70's", "the late 60s", "the mid-60s" are the 1970s
# and 1960s (a hunt: 7 such vetoed). Not "the 70s" alone, a temperature, a
# heart rate or a score as often, nor in a text about those (a review: 40
# such served as decades); from the thirties ("the 20s" may be this
# century's).
_SHORT_DECADE = re.compile(
    r"(?:'([3-9]0)s|\b([3-9]0)'s|(?<=\bearly )([3-9]0)s|(?<=\blate )([3-9]0)s|(?<=\bmid )([3-9]0)s"
    r"|(?<=\bmid-)([3-9]0)s)\b",
    re.IGNORECASE,
)
_NOT_A_DECADE = re.compile(
    r"\b(?:degrees?|temp\w*|weather|warm|hot|cold|heart|rate|blood|pressure|sugar|oxygen|score|iq|grade|mph"
    r"|water|outside|age|aged|my|your|his|her|their)\b",
    re.IGNORECASE,
)


def _decade(match: re.Match) -> str:
    return "19" + next(group for group in match.groups() if group) + "s"


def _century(match: re.Match) -> str:
    number = int(match.group(1)) if match.group(1) else _ORDINALS.index(match.group(2).lower()) + 1
    return f"{number - 1}00s"


def _world_war(war: re.Match) -> str:
    return "World War " + _WAR_NUMBERS[next(group for group in war.groups() if group).lower()]


def _numbers_as_said(text: str) -> str:
    # Each rewrite only where its cue is in the text: most questions have
    # none, and every text the cache reads passes here (a regex each cost
    # the analysis ~15%).
    lowered = text.lower()
    if "w/o" in lowered:
        text = _WITHOUT.sub("without", text)
    if "dozen" in lowered:
        text = _HALF_A_DOZEN.sub("6", text)
    if "°" in text:
        text = _DEGREES.sub(lambda sign: _SCALES[sign.group(1)], text)
    if "centur" in lowered:
        if not _A_CENTURYS_EDGE.search(text):
            text = _CENTURY.sub(_century, text)
    elif ("0s" in lowered or "0's" in lowered) and not _NOT_A_DECADE.search(text):
        # Not beside a century: "the '80s of the 19th century" (a review).
        text = _SHORT_DECADE.sub(_decade, text)
    if "ww" in lowered or "world war" in lowered:
        text = _WORLD_WAR.sub(_world_war, text)
    if "/" in text or "-" in text:
        text = _ISO_DATE.sub(_iso_date, _SLASHED_DATE.sub(_slashed_date, text))
    if ":" in text:
        text = _WHOLE_HOUR.sub(r"\1", _CLOCK.sub(_clock, text))
    if "/" in text and not _CODE_SIGNS.search(text):
        text = _FRACTION.sub(_fraction, text)
    if "quarter" in lowered or "third" in lowered:
        text = _PARTS_OF.sub(_parts_of, text)
    if "half" in lowered:
        text = _AND_A_HALF.sub(_and_a_half, text)
    return text


# A language or a note named by a letter and a sharp sign: "C#", "F#" (a
# hunt: "Is C faster than C#?" was served "Is C# faster than C?"'s answer,
# the sign read as no part of a word).
_SHARP = re.compile(r"(?<![\w#])([A-Za-z])#(?![\w#])")


def _as_typed(text: str) -> str:
    """``text`` with compatibility characters as their plain forms (NFKC:
    "½" is "1⁄2", a full-width "１０" is "10": "½ cup" was served "¼ cup"'s
    answer, no number read in either), exponents and mixed numbers as they
    are typed plainly, _TYPED's characters as the ones the checks read,
    dates, clock times and fractions in digits as words say them
    (_numbers_as_said), and short ordinals as words (_SHORT_ORDINAL), bounds as scope words
    (_AT_MOST, _AT_LEAST)."""
    text = _SUPERSCRIPT.sub(lambda power: "^" + unicodedata.normalize("NFKC", power.group()), text)
    text = _MIXED_NUMBER.sub(" ", text.translate(_BEFORE_NFKC))
    text = _numbers_as_said(unicodedata.normalize("NFKC", text).translate(_TYPED))
    text = _AT_MOST.sub("at most", _AT_LEAST.sub("at least", text))
    if "#" in text:
        text = _SHARP.sub(r"\1sharp", text)
    return _SHORT_ORDINAL.sub(lambda ordinal: _ORDINALS[int(ordinal.group(1)) - 1], text)


def readable(text: str) -> bool:
    """Whether the checks read every word of ``text``: every letter in it is
    of the Latin script. They read words by their spelling (stop words,
    negations, antonyms, names by capitals, numbers), so a letter of another
    script is read as nothing at all: a review served "Как удалить Docker на
    Windows?" the answer to "Как установить ...?" (remove for install), and
    "Python比Java慢吗?" that of "...快吗?" (slower for faster), score 0.99,
    since both read as "Docker Windows" and "Python Java". Such a text is
    matched exactly only, as conversation.py binds a reply it cannot read."""
    if text.isascii():
        return True
    return all(_LATIN_LETTER.match(ch) for ch in text if ord(ch) > 127 and ch.isalpha())


# Function words carry no topic: they are left out of "words only one side
# has" and of what counts as the object of a role marker.
STOPWORDS = _words(
    """a an the of in on at for to from by with about as into onto over under than then and or but if
    is are was were be been being am do does did done have has had having can could should would will
    shall may might must i me my mine we us our you your he him his she her it its they them their one
    ones what which who whom whose when where why how that this these those there here so such very
    just also too get got some any much many way ways thing things really"""
)

NUMBER_WORDS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
    "hundred": 100,
    "dozen": 12,
    "thousand": 1000,
    "million": 10**6,
    "billion": 10**9,
    "half": 0.5,
    "twice": 2,
    "double": 2,
}
# "one" is mostly a pronoun ("how can one ..."), not a count.
NUMBER_WORDS.pop("one")
# Ordinals are numbers too: "the second largest city" is not "the third"
# (a hunt: served). Not "first", a scope word (scope_veto reads it against
# any other order), and "second" only where it is no time (_a_time_second).
ORDINAL_WORDS = {word: value for value, word in enumerate(_ORDINALS[1:], start=2)} | {
    "thirtieth": 30,
    "fortieth": 40,
    "fiftieth": 50,
    "hundredth": 100,
}
# After a number, what multiplies it: "2 thousand" is 2000 (it read as 2 and
# 1000 against "2,000"), "$80k" is $80,000 (a hunt: vetoed as numbers replaced).
_MULTIPLIERS = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9, "k": 1000, "dozen": 12}
# Tens and units said in words make one number: "twenty-one" is 21.
_TENS_WORDS = _words("twenty thirty forty fifty sixty seventy eighty ninety")
_UNIT_NUMBER_WORDS = {
    word: value
    for value, word in enumerate(_ordered_words("one two three four five six seven eight nine"), 1)
}
# Before "second", words that make it a time: "a second", "per second",
# "30 second ad", "a split second".
_TIME_SECOND_AFTER = _words("a per one each few couple split nano milli micro")
# Dates: a changed month or weekday is a changed date.
_WEEKDAYS = _words("monday tuesday wednesday thursday friday saturday sunday")
_MONTHS = _words("january february march april june july august september october november december")
CALENDAR_WORDS = _MONTHS | _WEEKDAYS
# So is a day said relative to today ("What happened yesterday?" vs "...
# today?"). Kept apart from the numbers: a greeting's "today" ("How can I
# help you today?") is no referent (conversation.py), and a question that
# merely adds one ("... today?") asks what it asks without.
RELATIVE_DAYS = _words("yesterday today tonight tomorrow")


def _relative_days(tokens: list[str]) -> frozenset[str]:
    """The RELATIVE_DAYS said, and "now" for "right now" (_days_against).
    "Now" alone is left out: "What should I do now?" says no day."""
    days = {t for t in tokens if t in RELATIVE_DAYS}
    if any(tokens[i : i + 2] == ["right", "now"] for i in range(len(tokens) - 1)):
        days.add("now")
    return frozenset(days)


def _days_against(a: Analysis, b: Analysis) -> tuple[frozenset[str], frozenset[str]]:
    """Each side's days, its "now" read as whichever of today and tonight
    the other says, else as today, where it says no other day: "I had chest
    pain yesterday, should I go to the ER?" is not "I have chest pain right
    now, ...?" (a hunt: served at 0.925), but "I can't fall asleep right
    now" is "... tonight" (a final read: 3 such vetoed while "now" was
    always "today")."""

    def read(days: frozenset[str], other: frozenset[str]) -> frozenset[str]:
        if "now" not in days:
            return days
        # Beside another day, "right now" is when it is asked, not what
        # about ("I'm sick right now, should I go to work tomorrow?").
        return (days - {"now"}) or (other & {"today", "tonight"}) or frozenset({"today"})

    return read(a.days, b.days), read(b.days, a.days)


# Singular forms; a trailing "s" is dropped before the lookup.
UNIT_WORDS = _words(
    """km kilometer kilometre mile meter metre cm mm foot feet inch yard kg kilogram gram pound lb lbs
    ounce oz ton tonne liter litre ml gallon celsius fahrenheit kelvin degree second minute hour day week
    month year decade century dollar usd euro eur rupee rs inr pound yen yuan bitcoin percent % gb mb tb
    kb ghz mhz mph kmph kmh calorie kcal watt kw kwh volt amp mg mcg bps kbps mbps gbps kbit mbit gbit
    kib mib gib mmol umol"""
)
# Units of money, after which ".00" says no cents (a hunt: "$50" / "$50.00"
# vetoed as numbers replaced).
_MONEY = frozenset({"dollar", "euro", "rupee", "pound", "yen", "yuan"})
_NO_CENTS = re.compile(r"-?\d+\.0+")
# After a number: which half of the day a time is in.
_MERIDIEMS = _words("am pm")
# Spellings of one unit: "1 dollar" and "1 USD" ask the same.
UNIT_SYNONYMS = {
    "usd": "dollar",
    "eur": "euro",
    "rs": "rupee",
    "inr": "rupee",
    "kilometer": "km",
    "kilometre": "km",
    "metre": "meter",
    "litre": "liter",
    "lb": "pound",
    "lbs": "pound",
    "kilogram": "kg",
    "kmph": "kmh",
    "feet": "foot",
    "%": "percent",
    "oz": "ounce",
    "kcal": "calorie",
}

# "unable" says "can not" ("Why am I unable to log in?" / "Why can't I log
# in?": a hunt, vetoed as a negation added).
NEGATIONS = _words("not no never none nobody nothing neither nor without cannot unable")
# Contractions typed without the apostrophe: "wont" is "will not".
_BARE_CONTRACTIONS = {
    "dont": "do",
    "doesnt": "does",
    "didnt": "did",
    "cant": "can",
    "wont": "will",
    "isnt": "is",
    "arent": "are",
    "wasnt": "was",
    "werent": "were",
    "shouldnt": "should",
    "wouldnt": "would",
    "couldnt": "could",
    "havent": "have",
    "hasnt": "has",
    "hadnt": "had",
    "aint": "is",
}
# Contractions whose stem is not their first word: "won't" is "will not",
# not "wo not" ("Why won't my laptop charge" was scored as a question about
# "wo" against "why wont my laptop charge", and "can't" as "ca" against
# "cant" and "cannot").
_IRREGULAR_NOT = {"won't": "will", "can't": "can", "shan't": "shall", "ain't": "is"}
# The other clitics, said and typed: "I'm" is "I am" as "Im" is. Left out
# where the bare spelling is a word of its own ("its", "were", "well", "ill",
# "id", "hell", "shell", "lets", "wed"), or written in capitals ("IM", an
# intramuscular injection). "'d" is "did", "had" or "would", which only the
# next words tell ("What'd Napoleon do?", "What'd happen if ...", "I'd
# gone"): such a word stays whole, as it was (a review: "'d" read as "would"
# served "What would Napoleon do after Waterloo?" the answer for "What'd
# ...").
_CLITICS = {"'m": "am", "'re": "are", "'ve": "have", "'ll": "will"}
# Participles no suffix gives away, and the verb each is of: what a "'d"
# before one is ("had"), and a passive's verb ("Was the child bitten by the
# dog?" / "Did the child bite the dog?": a final read). One table: a second
# one of the same name, for the voice check, silently replaced the clitics'
# (a session's read: "I'd gone" was not "I had gone").
_IRREGULAR_PARTICIPLES = {
    "bitten": "bite", "written": "write", "eaten": "eat", "beaten": "beat", "taken": "take",
    "chosen": "choose", "paid": "pay", "caught": "catch", "shot": "shoot", "hit": "hit",
    "driven": "drive", "given": "give", "stolen": "steal", "broken": "break", "spoken": "speak",
    "known": "know", "seen": "see", "made": "make", "sold": "sell", "bought": "buy", "told": "tell",
    "held": "hold", "found": "find", "built": "build", "sent": "send", "led": "lead", "won": "win",
    "fought": "fight", "thrown": "throw", "drawn": "draw", "hidden": "hide", "forgotten": "forget",
    "shaken": "shake", "struck": "strike", "taught": "teach", "brought": "bring", "kept": "keep",
    "left": "leave", "lost": "lose", "met": "meet", "run": "run", "hurt": "hurt", "cut": "cut",
    "been": "be", "done": "do", "gone": "go", "said": "say", "got": "get", "gotten": "get",
    "heard": "hear", "thought": "think", "spent": "spend", "become": "become", "begun": "begin",
    "fallen": "fall", "frozen": "freeze", "grown": "grow", "ridden": "ride", "risen": "rise",
    "woken": "wake", "worn": "wear", "shown": "show", "sung": "sing", "swum": "swim",
    "drunk": "drink", "sunk": "sink", "forgiven": "forgive", "understood": "understand", "flown": "fly",
}  # fmt: skip
# Verbs ending in "ed" that are no participle ("I'd need ...").
_BASE_VERBS_IN_ED = _words(
    "need feed bleed breed speed seed weed heed exceed proceed succeed shed shred wed embed"
)


def _had_before(word: str, following: list[str]) -> bool:
    """Whether ``word`` is a clitic "'d" standing for "had": before a past
    participle ("I'd cancelled the order" is no "I would cancel the order":
    a hunt's pair, served at 0.917; _IRREGULAR_PARTICIPLES, or a word in
    -ed), but not one
    that is its verb's base too ("I'd run away", "I'd hit it", "I'd
    become": read "would", _WOULD_CLITICS, as "I'd hurt my back" is too,
    which only the rest of the sentence could tell); ``following``,
    the next two words (lowered), one of _BEFORE_A_PARTICIPLE between ("I'd
    already paid": a hunt)."""
    if not (len(word) > 2 and word[-2:] in ("'d", "'D")):
        return False  # most words: nothing lowered
    return _perfect_after(following, None)


# A subject pronoun's "'d" before anything but a participle (or "better",
# "had better") is "would": "I'd pay the deposit if ..." against "I'd
# already paid the deposit when ..." (a hunt: served at 0.930 once the
# second read "had" and the first stayed "i'd"). After a question word it
# stays whole: "What'd Napoleon do?" is "did".
_WOULD_CLITICS = frozenset(f"{pronoun}'d" for pronoun in _words("i you he she we they it"))
# Words that may stand between a perfect's auxiliary and its participle.
_BEFORE_A_PARTICIPLE = _words("already just never ever not recently previously also always finally actually")
# After "'s", the participles of "has" alone: "it's broken" is "it is
# broken", but "who's been", "she's got" are "has" (a hunt: "Who's won ...?"
# read "who is won").
_HAS_PARTICIPLES = _words("been got gotten")


def _perfect_after(following: list[str], participles: frozenset[str] | None) -> bool:
    """Whether ``following`` opens with a past participle (of
    ``participles``, or any: _a_participle), one of _BEFORE_A_PARTICIPLE
    aside."""
    if following[:1] and following[0] in _BEFORE_A_PARTICIPLE:
        following = following[1:]
    if not following:
        return False
    return following[0] in participles if participles is not None else _a_participle(following[0])


def _a_participle(word: str) -> bool:
    """A past participle no base verb is spelled as (_had_before)."""
    return _IRREGULAR_PARTICIPLES.get(word, word) != word or (
        word.endswith("ed") and len(word) > 3 and word not in _BASE_VERBS_IN_ED
    )


_BARE_CLITICS = {
    **{f"{w}s": (w, "is") for w in _words("what that how who where when there here she")},
    "im": ("i", "am"),
    "ive": ("i", "have"),
    "youre": ("you", "are"),
    "youve": ("you", "have"),
    "youll": ("you", "will"),
    "theyre": ("they", "are"),
    "theyve": ("they", "have"),
    "theyll": ("they", "will"),
    "weve": ("we", "have"),
    "alot": ("a", "lot"),
}
# "... or not?" and "why or why not?" ask the same yes/no question as without.
_NEUTRAL_NEGATION = re.compile(r"\bor (?:why )?not\b", re.IGNORECASE)
# A run of ? . ! before a space or the end. Only from a run's first mark (the
# lookbehind): tried from every mark, a run before a letter was scanned again
# from each, quadratic in the run (10 ms for 1,024 dots, 50 times a question's).
_SENTENCE_END = re.compile(r"(?<![?.!])[?.!]+(?:\s|$)")
# Words whose swap for the other reverses the question (antonyms that a
# prefix does not give away).
ANTONYMS = {
    frozenset(p)
    for p in [
        ("good", "bad"),
        # How bad a condition is: "I have mild acne." / "I have severe acne."
        # (a hunt: 2 of 3 served at 0.90-0.92).
        ("mild", "severe"),
        ("slight", "severe"),
        ("minor", "severe"),
        ("mild", "serious"),
        ("best", "worst"),
        ("better", "worse"),
        ("increase", "decrease"),
        ("more", "less"),
        ("pros", "cons"),
        ("start", "stop"),
        ("buy", "sell"),
        ("win", "lose"),
        ("safe", "dangerous"),
        ("enable", "disable"),
        ("positive", "negative"),
        ("high", "low"),
        ("higher", "lower"),
        ("cheap", "expensive"),
        ("love", "hate"),
        ("easy", "hard"),
        ("gain", "lose"),
        ("true", "false"),
        ("before", "after"),
        ("open", "close"),
        ("add", "remove"),
        ("accept", "reject"),
        ("allow", "block"),
        ("rich", "poor"),
        ("fast", "slow"),
        ("quick", "slow"),
        ("big", "small"),
        ("large", "small"),
        ("old", "young"),
        ("strong", "weak"),
        ("near", "far"),
        ("close", "far"),
        ("wide", "narrow"),
        ("long", "short"),
        ("heavy", "light"),
        ("hot", "cold"),
        ("early", "late"),
        ("always", "sometimes"),
        # A second hunt's topic turns (2026-12-06): a changed season, time of
        # day, level or direction of travel scored 0.905-0.920.
        ("summer", "winter"),
        ("morning", "evening"),
        ("beginner", "advanced"),
        ("arrive", "leave"),
        # A hunt of the forty-ninth session: "How do I speed up my laptop?" /
        # "... slow down ...?" served at 0.903-0.956 (18 pairs).
        ("speed", "slow"),
        ("accelerate", "decelerate"),
        ("north", "south"),
        ("east", "west"),
        ("upper", "lower"),
        ("ahead", "behind"),
        # A hunt of the fifty-first session: "I'm left handed. Which side
        # should the mouse be on?" / "... right handed ..." served at 0.91.
        ("left", "right"),
        ("front", "back"),
        # Not give / receive, lend / borrow: "money I receive from my parents"
        # is "money my parents give me" (a converse, said either way).
    ]
}
# Each word's antonyms ("small": "big" and "large").
_ANTONYMS_OF: dict[str, frozenset[str]] = {}
for _pair in ANTONYMS:
    for _word in _pair:
        _ANTONYMS_OF[_word] = _ANTONYMS_OF.get(_word, frozenset()) | (_pair - {_word})
_NEGATING_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non")
# Prefixes that reverse each other on the same stem: "upgrade" vs
# "downgrade", "import" vs "export", "encrypt" vs "decrypt", "maximum" vs
# "minimum", "overpaid" vs "underpaid", "inbound" vs "outbound".
_OPPOSITE_PREFIXES = [
    ("up", "down"),
    ("im", "ex"),
    ("in", "ex"),
    ("in", "out"),
    ("in", "de"),
    ("en", "de"),
    ("max", "min"),
    ("over", "under"),
]
# Each prefix with those that reverse it ("in": "ex", "out", "de").
_OPPOSITE_PREFIX_OF = {
    prefix: tuple(other for pair in _OPPOSITE_PREFIXES if prefix in pair for other in pair if other != prefix)
    for pair in _OPPOSITE_PREFIXES
    for prefix in pair
}
_OPPOSITE_PREFIX_LENGTHS = sorted({len(prefix) for prefix in _OPPOSITE_PREFIX_OF})
# A shorter stem pairs unrelated words ("exit" vs "init").
_PREFIXED_STEM_MIN = 4
# A verb's particle turned around: "zoom in" vs "zoom out", "turn on" vs
# "turn off", "scale up" vs "scale down". Only after the same word: "in"
# and "on" are everywhere else too.
_OPPOSITE_PARTICLES = {"in": "out", "out": "in", "on": "off", "off": "on", "up": "down", "down": "up"}
# Words a share is counted with ("one in five"): "one" is no NUMBER_WORDS'.
_COUNT_WORDS = frozenset(NUMBER_WORDS) | {"one"}

# Words after which the next content word fills a role: swapping the fillers
# of the same markers reverses who does what to whom, where from and to.
ROLE_MARKERS = _words("from to into than vs versus over against beat beats defeat defeated")
# Words that narrow or widen what is asked. "some" and "any" are left out:
# questions use them as filler ("what are some good books").
SCOPE_WORDS = _words(
    """only all every each except first last both either none always sometimes most least
    earliest latest entire whole single sole solely exclusively alone"""
)
# Other spellings of a scope word, one word or two: "besides Germany",
# "other than Germany" and "apart from Germany" all say "except Germany",
# so each is a scope word on one side, and none is a swap for another.
SCOPE_SPELLINGS = {
    ("excluding",): "except",
    ("besides",): "except",
    ("other", "than"): "except",
    ("apart", "from"): "except",
    ("aside", "from"): "except",
}
_SCOPE_SPELLING_STARTS = frozenset(words[0] for words in SCOPE_SPELLINGS)
# Scope words questions also use as mere emphasis ("the most beautiful
# songs" = "the best songs", "the latest news" = "the news"): only their
# replacement by another scope word vetoes, not their being on one side.
WEAK_SCOPE_WORDS = _words("most always latest entire whole single")
# Words that open a sentence of their own, capitalized as any first word,
# and say nothing a name would: courtesies and joining words. Not a modal
# or a pronoun ("My flight was delayed. Must the airline ...?" / "... May
# the airline ...?": a hunt, served once every stop word there was no name).
_SENTENCE_OPENERS = _words(
    """please thanks thank thx cheers hi hello hey regards appreciated sorry help
    and but or so also any anyone some"""
)
# Capitalized words that are not names.
_NOT_NAMES = _words("i what which who whom whose when where why how is are do does can should")

VETOES = ("number", "negation", "entity", "role", "scope", "code")
# What code is told apart by, which the words leave out: an operator, a
# bracket, a separator ("&&" for "||", "x[1:]" for "x[:1]", "{}" for "[]"),
# "!" and ":" only where a character follows (not a sentence's "!", nor
# "Question: ...").
_CODE_SYMBOL = re.compile(r"[&|\[\]{}()^~#;=<>+*/\\-]|[!:](?=\S)")
# The same with the numbers among them: "x[1:]" is not "x[:1]".
_CODE_SKELETON = re.compile(rf"\d+(?:\.\d+)*|{_CODE_SYMBOL.pattern}")


# A hyphen inside a word is no operator: "e-mail", "hard-drive", "a
# 3-year-old" (a hunt: "Can a 3-year-old eat popcorn?" was vetoed against
# "a three-year-old" as code changed, its skeleton "3 - -" against "- -").
_WORD_HYPHEN = re.compile(r"(?<=[A-Za-z]{2})-(?=[A-Za-z])|(?<=\d)-(?=[A-Za-z]{2})")


# An operator of "?", "!", "." and ":" alone, standing as a word or in
# brackets or quotes: "??" / "?." in "What does ?? mean in JavaScript?" (a
# hunt: 7 such served at 0.94-0.99). Not one ending the text ("... in Excel
# ?", "Is this right ??": a review).
_BARE_OPERATOR = re.compile(r"(?<![^\s(\[\"'`])[?!.:]+(?![^\s)\]\"'`,])")


# Words of a question about code, where punctuation standing alone is an operator.
_ABOUT_CODE = re.compile(
    r"\b(?:mean|means|operators?|syntax|code|programming|javascript|typescript|python|regex|csharp|fsharp|rust"
    r"|php|swift|kotlin|java|bash|shell|sql|ruby|perl|js|ts|c|cpp|go|dart|scala|haskell|lua|elixir)\b",
    re.IGNORECASE,
)


def _bare_operators(text: str) -> frozenset[str]:
    """_BARE_OPERATOR's operators: in a text about code (_ABOUT_CODE) each,
    but a lone "?" or "!" ending it; elsewhere only those of two signs or
    more, not all dots or all "!" ("help ! my phone won't charge" / "help !!!
    ..." says no operator: a review)."""
    if not ("?" in text or "!" in text or ":" in text or "." in text):
        return frozenset()
    matches = list(_BARE_OPERATOR.finditer(text))
    if not matches:
        return frozenset()
    about_code = _ABOUT_CODE.search(text) is not None
    return frozenset(
        match.group()
        for match in matches
        if (about_code and (len(match.group()) > 1 or text[match.end() :].strip(" \t)]\"'`")))
        # Elsewhere only an operator of two signs or more that are not all dots
        # ("the difference between ?. and ??").
        or (len(match.group()) > 1 and set(match.group()) != {"."} and set(match.group()) != {"!"})
    )


def _code_symbols(text: str) -> tuple[str, ...]:
    """The code skeleton of ``text``; a hyphen inside a word read as one
    only where nothing else in the text is code: in "total = price-discount",
    "=Revenue-Expenses" or "3-cos(x)" it subtracts (a hunt: served against
    "price_discount" at 0.998 while every word hyphen was dropped)."""
    if not _CODE_SYMBOL.search(_WORD_HYPHEN.sub(" ", text)):
        return ()
    return tuple(_CODE_SKELETON.findall(text))


_BACKTICKED = re.compile(r"`([^`\n]+)`")
# Spaces beside these say nothing in code: "x=5" is "x = 5", "arr[ 0 ]" is
# "arr[0]"; not beside "/" or "-" ("rm -rf / tmp/build" is no "rm -rf /tmp/build").
_SPACE_BESIDE_PUNCTUATION = re.compile(r"\s*([=()\[\]{},:;])\s*")


def _code_span(span: str) -> str:
    """A span in backticks as code_veto compares it: spaces folded, none
    beside _SPACE_BESIDE_PUNCTUATION's characters, double quotes as single
    (a hunt: `print("hello")` / `print('hello')`, `x=5` / `x = 5` vetoed)."""
    return _SPACE_BESIDE_PUNCTUATION.sub(r"\1", " ".join(span.split())).replace('"', "'")


# Between a multi-turn question and the topic turn it refers to
# (conversation.py). Normalized text never holds a newline, so a text
# without one is a single-turn question.
CONTEXT_SEPARATOR = "\n"
_QUESTION_WORDS = _words("what which who whom whose when where why how is are do does can should")


@dataclasses.dataclass(frozen=True, slots=True)
class Analysis:
    """What the checks and features need of one question, computed once."""

    tokens: tuple[str, ...]  # lowercased
    token_set: frozenset[str]
    content: frozenset[str]  # tokens that are not stopwords, plural "s" dropped
    numbers: Counter  # with calendar words; a multiset: "2+2" is not "2+3"
    days: frozenset[str]  # RELATIVE_DAYS
    units: frozenset[str]
    negations: int
    base_forms: frozenset[str]  # of every token (_base_forms)
    # (word, particle) for each particle of _OPPOSITE_PARTICLES and the word before it (_particles).
    particles: frozenset[tuple[str, str]]
    names: frozenset[str]  # lowercased capitalized words not starting a sentence
    # Per name, the tokens just before and after each of its occurrences.
    name_contexts: tuple[tuple[str, str, str], ...]
    roles: tuple[tuple[str, str], ...]  # (marker, next content word)
    scope: frozenset[str]
    # (word, scope word) pairs: the word says the scope word where the
    # other side says it (_scope_said_otherwise).
    scope_otherwise: frozenset[tuple[str, str]]
    trigrams: frozenset[str]
    question_word: str  # the first of what/how/why/...; "" if none
    sentences: int
    # Code's operators and brackets (_CODE_SYMBOL) with the numbers among
    # them, in order, where there is one of them (else empty); and the spans
    # in backticks, their spaces folded (code_veto).
    symbols: tuple[str, ...] = ()
    # Operators of "?", "!", "." and ":" standing alone (_BARE_OPERATOR).
    operators: frozenset[str] = frozenset()
    code: tuple[str, ...] = ()
    # (number, the unit right after it: "" for none), as numbers and units
    # are normalized ("three months" -> ("3", "month")).
    number_units: frozenset[tuple[str, str]] = frozenset()
    # Where a token was a possessive ("landlord's": the "'s" is dropped from
    # the tokens), by its index in tokens.
    possessives: frozenset[int] = frozenset()
    # Where a "not" was a contraction's ("doesn't", "wont", "cannot"), by its
    # index in tokens: at a question's opening auxiliary it negates the
    # question, where a "not" written out there negates what follows ("Does
    # not smoking ...?" asks about not smoking; "Doesn't smoking ...?" does not).
    contracted: frozenset[int] = frozenset()
    # Symbols outside ASCII that no check reads as a word (emoji, "♂", "☀",
    # "⌘", "√"), in order, skin tones left out (_glyphs, glyph_veto).
    glyphs: tuple[str, ...] = ()
    # (the name before it, its value) of each Roman numeral after a name,
    # "I" included where it may be the pronoun (number_veto).
    numerals: frozenset[tuple[str, int]] = frozenset()
    # (relation, period) of each period said relative to now ("next week":
    # ("later", "week"); time_frame_veto).
    time_frames: frozenset[tuple[str, str]] = frozenset()
    # The content words' stems (stem): what the lookup's first stage matches.
    stems: frozenset[str] = frozenset()
    # Those of names written in capitals ("NYC", "US"): what initials are.
    acronyms: frozenset[str] = frozenset()
    # Numbers that name one of a series, as an ordinal does ("season 2",
    # "World War II": _a_named_number); number_veto reads them as one.
    named_numbers: frozenset[str] = frozenset()


# Protocols whose "s" says "secure", no plural: "https" is no "http" (a hunt:
# "http and ftp" / "https and ftp" served at 0.96, "ldap" / "ldaps" at 0.90).
_SECURE_PROTOCOLS = _words("https smtps ldaps imaps ftps wss")


def singular(word: str) -> str:
    if len(word) <= 3 or not word.endswith("s") or word.endswith("ss") or word in _SECURE_PROTOCOLS:
        return word
    return word[:-1]


# Longest first: one is stripped, the first that leaves three letters.
_STEM_SUFFIXES = ("ation", "ment", "ness", "ing", "ion", "ity", "al", "ed", "er", "ly", "e", "y")


def stem(word: str) -> str:
    """A content word less one derivational or inflectional ending, for the
    lookup's first stage only: "renewal" meets "renew", "healing" "heal",
    "baked" "baking", "interviewer" "interview" (paraphrases that share no
    word as written were never embedded, so never verified). Crude on
    purpose: both sides go through it, and a looser first stage only embeds
    a question more; what is served is still the checks' and the score's."""
    for suffix in _STEM_SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


# Words recur across questions: one word's forms are worked out once.
@functools.lru_cache(maxsize=16384)
def _base_forms(word: str) -> frozenset[str]:
    """What ``word`` may be inflected from, itself included: "buying" and
    "bought" are not both found, but "buying" -> "buy", "selling" -> "sell",
    "cheaper" -> "cheap", "easier" -> "easy", "safer" -> "safe",
    "stopped" -> "stop". Only compared with ANTONYMS and prefixed stems, so
    a made-up base ("bett" of "better") finds nothing."""
    forms = {word, singular(word)}
    for suffix in ("ing", "ed", "er", "est"):
        stem = word[: -len(suffix)]
        if word.endswith(suffix) and len(stem) >= 3:
            forms.update((stem, stem + "e"))
            if stem[-1] == stem[-2]:  # "stopped", "bigger"
                forms.add(stem[:-1])
            if stem[-1] == "i":  # "easier", "tried"
                forms.add(stem[:-1] + "y")
    return frozenset(forms)


_IS_CONTRACTIONS = frozenset(
    f"{w}'s" for w in _words("what who where when why how it that there here he she")
)


def _split(word: str) -> list[str]:
    """One word's tokens: "don't" -> "do" + "not", "Clinton's" -> "clinton"."""
    lower = word.lower()
    if lower in _IS_CONTRACTIONS:
        return [lower[:-2], "is"]  # "what's" is "what is", not a possessive
    if lower.endswith("'s"):
        return [lower[:-2]]
    if lower in _IRREGULAR_NOT:
        return [_IRREGULAR_NOT[lower], "not"]
    if lower == "n't":
        return ["not"]  # "do n't", as some tools split it: one negation, not two
    if lower.endswith("n't"):
        return [lower[:-3], "not"]
    if lower == "cannot":
        return ["can", "not"]
    if lower in _BARE_CONTRACTIONS:
        return [_BARE_CONTRACTIONS[lower], "not"]
    if lower in _BARE_CLITICS and not word.isupper():
        return list(_BARE_CLITICS[lower])
    before, _, clitic = lower.rpartition("'")
    if before and f"'{clitic}" in _CLITICS:
        return [before, _CLITICS[f"'{clitic}"]]
    return [lower]


# A letter's "." before another letter: "D.C." is two initials, no numeral
# (its "D" and "C" read 500 and 100 against "DC"'s 600: a hunt).
_AN_INITIAL = re.compile(r"\.[A-Za-z]")
# A Roman numeral of 1 to 3999 in capitals, as after a name.
_ROMAN_NUMERAL = re.compile(r"(?=[MDCLXVI])M{0,3}(?:C[MD]|D?C{0,3})(?:X[CL]|L?X{0,3})(?:I[XV]|V?I{0,3})")
_ROMAN_DIGITS = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}


def _roman_value(numeral: str) -> int:
    values = [_ROMAN_DIGITS[ch] for ch in numeral]
    return sum(-v if v < after else v for v, after in zip(values, [*values[1:], 0], strict=True))


# After "I" a numeral ends ("World War I?", "World War I and II") where the
# pronoun goes on to its verb.
_AFTER_A_NUMERAL = _words("and or vs versus")


def _ends_a_numeral(text: str, end: int) -> bool:
    rest = text[end:].lstrip()
    return not rest or not rest[0].isalnum() or rest.split(None, 1)[0].lower() in _AFTER_A_NUMERAL


# A skin tone only colours the emoji before it ("👍" / "👍🏻").
_SKIN_TONES = frozenset(map(chr, range(0x1F3FB, 0x1F400)))


# Emoji that show a feeling rather than name a thing: faces, hands, hearts,
# a party's ("thanks 😊", "ok 👍", "Hi 👋", "I upgraded! 🎉"). A question's are
# read as any other symbol ("What does 🙃 mean?"); a conversation's small
# talk and statements do not bind them (services/cache/conversation.py).
_EMOTIVE_RANGES = (
    (0x1F600, 0x1F64F),  # emoticons, 🙏 🙌 included
    (0x1F910, 0x1F92F),  # faces and hands of the supplement (🤔 🤗 🤝)
    (0x1F970, 0x1F97A),
    (0x1F44A, 0x1F450),  # 👊 👋 👌 👍 👎 👏 👐
    (0x1F493, 0x1F49F),  # hearts
    (0x1F389, 0x1F38A),  # 🎉 🎊
)
_EMOTIVE = frozenset({0x2764, 0x2665, 0x2728, 0x263A, 0x270C, 0x1F642, 0x1F643})


def emotive(glyph: str) -> bool:
    """Whether a symbol shows a feeling (a face, a hand, a heart, a party)."""
    code = ord(glyph)
    return code in _EMOTIVE or any(low <= code <= high for low, high in _EMOTIVE_RANGES)


def _glyphs(text: str) -> tuple[str, ...]:
    """The symbols outside ASCII that no check reads (Unicode's symbol
    categories: math Sm, currency Sc, modifier Sk, other So: emoji,
    dingbats, arrows), in order, skin tones left out (glyph_veto). None is
    taken for decoration, wherever it stands: a hunt's "Can my dog eat
    these? 🍇" asks what "... 🍌" does not, after the question's end."""
    if text.isascii():
        return ()
    return tuple(
        ch for ch in text if ord(ch) > 127 and unicodedata.category(ch)[0] == "S" and ch not in _SKIN_TONES
    )


# A period said relative to now: the word before it ("the" and a count
# between them skipped: "in the next 3 months") says which one. "last" is
# also a scope word (scope_veto reads it alone); "next" is not one, as it
# is no period's ("the next step").
TIMES_OF_DAY = _words("morning afternoon evening night day")
_PERIODS = (
    _words(
        """minute hour week weekend month year season quarter semester term decade century spring summer
    autumn fall winter"""
    )
    | TIMES_OF_DAY
    | CALENDAR_WORDS
)
_RELATIONS = {
    **dict.fromkeys(("this", "current", "present"), "now"),
    **dict.fromkeys(("next", "coming", "upcoming", "following"), "later"),
    **dict.fromkeys(("last", "past", "previous", "prior", "preceding"), "earlier"),
}
_BETWEEN_RELATION_AND_PERIOD = _words("the few couple of several")
# Periods whose "this coming" one is this one, the nearest ahead.
_NEAREST_AHEAD = _WEEKDAYS | {"weekend"} | (TIMES_OF_DAY - {"day"})
# "the week after next", "the year before last".
_SECOND_REMOVES = {("after", "next"): "later still", ("before", "last"): "earlier still"}


def _time_frames(tokens: list[str]) -> frozenset[tuple[str, str]]:
    frames = set()
    for at, token in enumerate(tokens):
        period = singular(token)
        if period not in _PERIODS:
            continue
        if (relation := _SECOND_REMOVES.get(tuple(tokens[at + 1 : at + 3]))) is not None:
            frames.add((relation, period))
            continue
        before = at - 1
        while (
            before >= 0
            and at - before <= 4
            and (tokens[before] in _BETWEEN_RELATION_AND_PERIOD or tokens[before][0].isdigit())
        ):
            before -= 1
        if before >= 0 and tokens[before] in _RELATIONS:
            relation = _RELATIONS[tokens[before]]
            if relation == "later" and before and tokens[before - 1] == "this" and period in _NEAREST_AHEAD:
                relation = "now"  # "this coming Friday" is this Friday ("this coming week" the next)
            frames.add((relation, period))
    return frozenset(frames)


_TONIGHT = frozenset({("now", "evening"), ("now", "night")})


def _whens(analysis: Analysis, days: frozenset[str]) -> frozenset[str]:
    """When a question is about, however said: a relative day (``days``, as
    _days_against read them), a weekday or month named, a period said
    relative to now (its relation aside; "this evening" and "this night"
    are "tonight")."""
    periods = frozenset(
        "tonight" if (relation, period) in _TONIGHT else period for relation, period in analysis.time_frames
    )
    return days | (analysis.token_set & CALENDAR_WORDS) | periods


# The memo of analyses is bounded by count, so what one costs must be bounded
# too: an Analysis holds sets of tokens and trigrams, ~9 KiB for a 60-character
# question, ~66 KiB at 500 characters, ~1.9 MiB at 100,000 (tracemalloc), and
# with no length bound 65,536 long prompts once could have held gigabytes.
# Analysing afresh costs ~15-25 us for a question, so the memo only spares the
# candidates that recent lookups shared: a few thousand short texts. At most
# ~270 MiB at its bounds, ~40 MiB of typical questions.
_ANALYSIS_MEMO_ENTRIES = 4096
_ANALYSIS_MEMO_MAX_CHARS = 512


def analyze(text: str) -> Analysis:
    if len(text) > _ANALYSIS_MEMO_MAX_CHARS:
        return analyze_uncached(text)
    return _analyze_memoized(text)


def clear_analysis_memo() -> None:
    """Forgets every memoized analysis (benchmarks time fresh ones)."""
    _analyze_memoized.cache_clear()


def analyze_uncached(text: str) -> Analysis:
    text = _as_typed(text)
    tokens: list[str] = []
    names: set[str] = set()
    acronyms: set[str] = set()
    possessives: set[int] = set()
    contracted: set[int] = set()
    # Where a minus sign makes the number after it negative (_signs).
    minus_signs: set[int] = set()
    roman_numbers: list[str] = []
    numerals: set[tuple[str, int]] = set()
    sentence_start = True
    prefix_joined = False
    matches = list(_TOKEN.finditer(text))
    for at, match in enumerate(matches):
        word = match.group()
        if (
            at
            and text[matches[at - 1].end() : match.start()] != " "
            and _SENTENCE_END.search(text, matches[at - 1].end(), match.start())
        ):
            # After a sentence's end, one of _SENTENCE_OPENERS ("How do I
            # reset my router? Any help appreciated!") is no name: a hunt's
            # "Any" and "Please" were read as names replaced.
            sentence_start = word.lower() in _SENTENCE_OPENERS
        if (
            word == "-"
            and text[max(0, match.start() - 2) : match.start()].isalpha()
            and text[match.end() : match.end() + 2].isalpha()
        ):
            # A hyphen joining two words joins nothing the words do not:
            # "jump-start" is "jump start" (it was a token of one side only).
            # Not after or before a single letter, where it may subtract
            # ("a-b" is not "a b"; "x-ray" keeps it as before). After "non"
            # it joins them: "non-stick" is "nonstick" (else the negated
            # form of "stick", a hunt: 5 paraphrases vetoed).
            prefix_joined = tokens[-1:] == ["non"]
            continue
        if word == "-" and _signs(tokens, text, match.start(), match.end()):
            minus_signs.add(len(tokens))
        parts = _split(word)
        if prefix_joined:
            parts[0] = tokens.pop() + parts[0]
            prefix_joined = False
        following = [later.group().lower() for later in matches[at + 1 : at + 3]]
        if _had_before(word, following):
            parts = [word.lower()[:-2], "had"]
        elif word.lower() in _WOULD_CLITICS and following[:1] != ["better"]:
            parts = [word.lower()[:-2], "would"]  # "I'd pay" is "I would pay"
        elif len(parts) == 2 and parts[1] == "is" and _perfect_after(following, _HAS_PARTICIPLES):
            parts = [parts[0], "has"]  # "who's been" is "who has been"
        if parts[-1] == "not" and word.lower() != "not":
            contracted.add(len(tokens) + len(parts) - 1)
        # "landlord's", and a plural's "roommates'" (its "'" no token's).
        if (len(parts) == 1 and parts[0] != word.lower()) or (
            word[-1:] in "sS" and text.startswith("'", match.end())
        ):
            possessives.add(len(tokens))
        name = parts[0]
        if (
            tokens
            and tokens[-1] in names
            and _ROMAN_NUMERAL.fullmatch(word)
            and not _AN_INITIAL.match(text, match.end())
            and not (at and _AN_INITIAL.match(text, matches[at - 1].end()) and len(word) == 1)
        ):
            # A Roman numeral after a name is its number ("World War I" vs
            # "World War II", "Henry VIII"): "I" was read as the pronoun,
            # and "World War Ⅰ" was served "World War Ⅱ"'s answer (NFKC
            # spells them "I" and "II"; the embedder reads neither). A lone
            # "I" before another word may be the pronoun ("In Python I get
            # ...", "When Harry met Sally I cried"): a number only as one
            # side of numerals after the same name (number_veto).
            value = _roman_value(word)
            numerals.add((tokens[-1], value))
            if word != "I" or _ends_a_numeral(text, match.end()):
                roman_numbers.append(str(value))
        if name not in _NOT_NAMES and (
            (word[:1].isupper() and not sentence_start) or (word.isupper() and len(word) > 1)
        ):
            names.add(name)  # acronyms even first: "CBSE", "USA"
            if word.isupper() and len(word) > 1:
                acronyms.add(name)
        sentence_start = False
        tokens.extend(parts)
    _spell_unit_signs(tokens)
    _not_before_to(tokens)
    numbers: Counter = Counter(roman_numbers)
    named_numbers = set(roman_numbers)
    units = set()
    number_units = set()
    read_with_the_one_before = set()
    for at, token in enumerate(tokens):
        if at in read_with_the_one_before:
            continue
        number = _number_of(token)
        if token in _TENS_WORDS and tokens[at + 1 : at + 2] and tokens[at + 1] in _UNIT_NUMBER_WORDS:
            read_with_the_one_before.add(at + 1)
            number = str(NUMBER_WORDS[token] + _UNIT_NUMBER_WORDS[tokens[at + 1]])
        # Where a multiplier ends the number so far ("three hundred", or
        # "hundred" itself: "one hundred fifty", "one" being no count here),
        # so that the words after it can join it (_said_after_a_multiplier).
        multiplier_at = None
        if (
            number is not None
            and tokens[at + 1 : at + 2]
            and (product := _multiplied(number, tokens[at + 1])) is not None
        ):
            read_with_the_one_before.add(at + 1)
            number = product
            multiplier_at = at + 1
        elif number is not None and token in _MULTIPLIERS:
            multiplier_at = at
        elif token in ORDINAL_WORDS and not _a_time_second(tokens, at):
            # Not the count ("the second most populated city" is no "the 2
            # most populated cities"), but in a date ("July fourth").
            value = ORDINAL_WORDS[token]
            number = str(value) if _a_day_of_month(tokens, at) else f"{value}th"
        if multiplier_at is not None:
            rest, read = _said_after_a_multiplier(
                tokens, multiplier_at + 1, _MULTIPLIERS[tokens[multiplier_at]]
            )
            if rest:
                read_with_the_one_before.update(read)
                number = _written(float(number) + rest)
        if (
            number is not None
            and token[0].isdigit()
            and tokens[at + 1 : at + 2]
            and tokens[at + 1] in _ORDINAL_SUFFIXES
            and not _a_day_of_month(tokens, at)
        ):
            number = f"{number}th"  # "16th" is "sixteenth" ("1st" to "10th" read as words)
        if number is not None and number[0].isdigit() and _a_named_number(tokens, at, names):
            named_numbers.add(number)
        if number is not None:
            if at and (_signed(tokens, at, minus_signs) or _said_negative(tokens, at)):
                number = "-" + number
            after = at + 1
            while after in read_with_the_one_before:
                after += 1
            following = tokens[after] if after < len(tokens) else ""
            unit = _unit_of(following) or ""
            if unit in _MONEY and _NO_CENTS.fullmatch(number):
                number = number.split(".")[0]  # "$50.00" is "$50" (not "Python 3.0", a version)
            numbers[number] += 1
            number_units.add((number, unit))
        elif token in CALENDAR_WORDS:
            numbers[token] += 1
        elif token in _MERIDIEMS:
            # A time's half of the day ("9am" vs "9pm"; "I am" is no unit).
            if at and tokens[at - 1][0].isdigit():
                units.add(token)
        elif (unit := _unit_of(token)) is not None:
            units.add(unit)
    negations = sum(1 for t in tokens if t in NEGATIONS) - len(_NEUTRAL_NEGATION.findall(text))
    padded = ("", *tokens, "")
    name_contexts = tuple(
        (padded[i - 1], padded[i], padded[i + 1]) for i in range(1, len(padded) - 1) if padded[i] in names
    )
    # Each marker's filler, the next word that is no stop word, or a name
    # spelled like one ("from US to India": "us"): read from the end, so
    # that each token is looked at once (a search after each marker was
    # quadratic in a question of markers).
    roles = []
    filler = ""
    for at in range(len(tokens) - 1, -1, -1):
        token = tokens[at]
        if token in ROLE_MARKERS:
            roles.append((token, filler))
        # "the us" is the country, never the pronoun ("fly from the us to
        # Japan" / "from Japan to the us": a hunt, served at 0.90).
        if token not in STOPWORDS or token in names or (token == "us" and at and tokens[at - 1] == "the"):
            filler = token
    roles.reverse()
    joined = " " + " ".join(tokens) + " "
    token_set = frozenset(tokens)
    scope = _scope(tokens)
    content = _content_words(tokens)
    return Analysis(
        tokens=tuple(tokens),
        token_set=token_set,
        content=content,
        numbers=numbers,
        days=_relative_days(tokens),
        units=frozenset(units),
        negations=negations,
        # Stop words are not inflected forms of anything the checks look for.
        base_forms=token_set.union(*(_base_forms(t) for t in token_set - STOPWORDS)),
        particles=_particles(tokens),
        names=frozenset(names),
        name_contexts=name_contexts,
        roles=tuple(roles),
        scope=scope,
        scope_otherwise=_scope_said_otherwise(tokens, scope),
        trigrams=frozenset(joined[i : i + 3] for i in range(len(joined) - 2)),
        question_word=next((t for t in tokens if t in _QUESTION_WORDS), ""),
        sentences=max(1, len(_SENTENCE_END.findall(text))),
        symbols=_code_symbols(text),
        operators=_bare_operators(text),
        code=tuple(_code_span(span) for span in _BACKTICKED.findall(text)),
        number_units=frozenset(number_units),
        possessives=frozenset(possessives),
        contracted=frozenset(contracted),
        glyphs=_glyphs(text),
        numerals=frozenset(numerals),
        time_frames=_time_frames(tokens),
        # A question of numbers and signs alone ("What is 7-3?") is still
        # looked for: its signs are its first stage's words.
        stems=frozenset(stem(word) for word in content) | (token_set & SIGNS),
        acronyms=frozenset(acronyms),
        named_numbers=frozenset(named_numbers),
    )


_MAGNITUDES = _words("thousand million billion trillion k m bn")


def _not_before_to(tokens: list[str]) -> None:
    """A split infinitive's "to not" written "not to", in place: "Is it
    rude to not tip?" asks "Is it rude not to tip?" (a hunt: 10 such
    paraphrases vetoed as roles swapped)."""
    for at in range(len(tokens) - 2):
        if tokens[at] == "to" and tokens[at + 1] == "not":
            tokens[at], tokens[at + 1] = "not", "to"


def _spell_unit_signs(tokens: list[str]) -> None:
    """The unit signs as the words they stand for, where those would stand:
    "10%" is "10 percent", "$20" "20 dollar", "$5 million" "5 million
    dollar" ("Is $20 an hour a good wage?" is "Is 20 dollars an hour ...",
    typed again; with the signs apart from the words, it was refused at
    0.894). In place and as many tokens, so that what indexes them stays
    true. A sign elsewhere ("What does % do in Python?") stays a sign."""
    for i, token in enumerate(tokens):
        if token == "%" and i and tokens[i - 1][0].isdigit():
            tokens[i] = "percent"
        elif token == "$" and i + 1 < len(tokens) and tokens[i + 1][0].isdigit():
            end = i + 2 if i + 2 < len(tokens) and tokens[i + 2] in _MAGNITUDES else i + 1
            tokens[i : end + 1] = [*tokens[i + 1 : end + 1], "dollar"]


# After an operator a minus is a sign however it is spaced ("x+5=-3" is "x +
# 5 = -3", "2*-3" is "2 * -3"); after a number, a time or a unit it is a
# subtraction or a range ("10 - 5", "9am -5pm"); after a word of two letters
# or more, a sign where it touches the digits and not the word ("at -18
# degrees", "of (-16)", "|-7|"; not "apples - 5", "COVID-19"); after a
# single letter, a variable's subtraction ("2x -3").
_SIGN_AFTER_OPERATORS = frozenset("=+*/<>")
_BEFORE_A_SIGN = frozenset({"", " ", "\t", "(", "[", "{", "|"})
_NEGATIVE_WORDS = _words("minus negative")


def _signs(tokens: list[str], text: str, start: int, end: int) -> bool:
    """Whether the "-" at ``text[start:end]``, after ``tokens``, is a sign."""
    previous = tokens[-1] if tokens else ""
    if not previous or previous in _SIGN_AFTER_OPERATORS:
        return True
    if _number_of(previous) is not None or _unit_of(previous) is not None or len(previous) < 2:
        return False
    touching = text[end : end + 1].isdigit() or text[end : end + 1] == "$"
    return touching and text[start - 1 : start] in _BEFORE_A_SIGN


def _signed(tokens: list[str], at: int, minus_signs: set[int]) -> bool:
    """Whether the number at ``at`` follows a sign: right after it, or after
    a "$" right after it ("-$50")."""
    if at - 1 in minus_signs:
        return True
    return at >= 2 and tokens[at - 1] == "$" and at - 2 in minus_signs


def _said_negative(tokens: list[str], at: int) -> bool:
    """Whether the number at ``at`` is said negative in words ("negative 5",
    "minus 40"), not subtracted ("10 minus 5")."""
    return tokens[at - 1] in _NEGATIVE_WORDS and (at < 2 or _number_of(tokens[at - 2]) is None)


_ORDINAL_SUFFIXES = _words("st nd rd th")


def _a_day_of_month(tokens: list[str], at: int) -> bool:
    """Whether the ordinal at ``at`` is a day of a month: "July fourth",
    "the fourth of July" ("July 4th" reads "July fourth": a date, as "July 4")."""
    return (at > 0 and tokens[at - 1] in _MONTHS) or (
        tokens[at + 1 : at + 2] == ["of"] and at + 2 < len(tokens) and tokens[at + 2] in _MONTHS
    )


def _a_named_number(tokens: list[str], at: int, names: set[str]) -> bool:
    """Whether the number at ``at`` names one of a series, as an ordinal
    does: after a name ("World War 2") or after a word with nothing after it
    in its phrase ("season 2 of", "in grade 3?"); not a count ("2 seasons",
    "the 2 most populated cities", "fail my test 3 times")."""
    if not at:
        return False
    before = tokens[at - 1]
    if before in names:
        return True
    return (
        before not in STOPWORDS
        and _number_of(before) is None
        and (at + 1 == len(tokens) or tokens[at + 1] in STOPWORDS)
    )


def _a_time_second(tokens: list[str], at: int) -> bool:
    """Whether ``tokens[at]`` is "second" as a time: after a number or one of
    _TIME_SECOND_AFTER ("30 second ad", "wait a second"), or before "ago"."""
    if tokens[at] != "second":
        return False
    before = tokens[at - 1] if at else ""
    return (
        before in _TIME_SECOND_AFTER
        or (bool(before) and _number_of(before) is not None)
        or tokens[at + 1 : at + 2] == ["ago"]
    )


# The number words that may follow a multiplier within one number: units,
# teens and tens ("three hundred fifty", "two thousand and ten"), not
# "twice" or "double" ("four hundred twice a day" is 400, a review).
_WITHIN_A_NUMBER = {
    word: value
    for word, value in NUMBER_WORDS.items()
    if isinstance(value, int) and value < 100 and word not in ("twice", "double", "dozen")
} | _UNIT_NUMBER_WORDS


def _said_after_a_multiplier(tokens: list[str], at: int, factor: int) -> tuple[int, list[int]]:
    """What words at ``at`` add to a number a multiplier of ``factor`` ended,
    and where they stand: "three hundred (and) fifty" is 350, "two thousand
    five hundred" 2500 (a hunt: "three hundred fifty degrees" was vetoed
    against "350 degrees"). (0, []) where no number word follows, or where
    the words start a number of their own ("between five hundred and six
    hundred": a review read 506 and 100)."""
    read = []
    if tokens[at : at + 1] == ["and"]:
        read.append(at)
        at += 1
    word = tokens[at] if at < len(tokens) else ""
    value = _WITHIN_A_NUMBER.get(word)
    if value is None or value >= factor:
        return 0, []
    read.append(at)
    if word in _TENS_WORDS and tokens[at + 1 : at + 2] and tokens[at + 1] in _UNIT_NUMBER_WORDS:
        value += _UNIT_NUMBER_WORDS[tokens[at + 1]]
        at += 1
        read.append(at)
    following = _MULTIPLIERS.get(tokens[at + 1]) if at + 1 < len(tokens) else None
    if following is not None:
        if following >= factor:
            return 0, []
        # "two thousand five hundred": the hundreds after the thousands.
        read.append(at + 1)
        value *= following
    return value, read


def _number_of(token: str) -> str | None:
    """A token's number as Analysis.numbers writes it; None for none."""
    if token[0].isdigit():
        return token.replace(",", "")
    if token in NUMBER_WORDS:
        return _written(NUMBER_WORDS[token])
    return None


def _written(value: float) -> str:
    # As digits write it: "1000000", not "1e+06".
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _multiplied(number: str, following: str) -> str | None:
    """``number`` times the multiplier after it, as digits write the product
    ("2 thousand", "1.5 million", "80k", "fifteen hundred": 2000, 1500000,
    80000, 1500); None where none follows or ``number`` is no plain one."""
    factor = _MULTIPLIERS.get(following)
    if factor is None:
        return None
    try:
        return _written(float(number) * factor)
    except ValueError:
        return None


def _unit_of(token: str) -> str | None:
    """A token's unit as Analysis.units writes it (am/pm too); None for none."""
    if not token:
        return None
    if token in _MERIDIEMS:
        return token
    if token in UNIT_WORDS or singular(token) in UNIT_WORDS:
        unit = token if token in UNIT_WORDS else singular(token)
        return UNIT_SYNONYMS.get(unit, unit)
    return None


def _particles(tokens: list[str]) -> frozenset[tuple[str, str]]:
    """(word, particle) for each particle of _OPPOSITE_PARTICLES after a
    word. A run of particles all follow the word before the run: "eat out
    in Paris" says (eat, out) and (eat, in), both halves, so it turns
    around nothing of "eat in Paris". After a count, "in" and "out" tell a
    share ("1 in 10", "one out of ten"), not a particle."""
    found = set()
    word = ""
    for before, token in zip(tokens, tokens[1:]):
        token = _INTO.get(token, token)
        if token not in _OPPOSITE_PARTICLES:
            continue
        if _INTO.get(before, before) not in _OPPOSITE_PARTICLES:
            word = before
        if word and not (word[0].isdigit() or word in _COUNT_WORDS):
            found.add((word, token))
    return frozenset(found)


# "into" says "in" as a particle: "go into hibernation" is the way "come out
# of hibernation" comes back (a hunt: served at 0.942).
_INTO = {"into": "in"}


# Scope words that say no scope in some places: "last" as a verb ("How long
# do boiled eggs last in the fridge?": a question asking how many days they
# are good for was vetoed as "last" dropped), and "at all" or "after all"
# ending a question ("Is it safe at all?"). Not "the last of", "were they
# last in", "at all airports", "all right triangles" (a review).
_LAST_VERB_AFTER = _words("to will would can could should may might")
# "last" before these is the verb whatever comes before it ("make my phone
# battery last longer" was vetoed against "extend its battery life").
_LAST_VERB_BEFORE = _words("longer long forever")
_BEFORE_LAST_AS_A_VERB = _words("usually typically generally normally actually really commonly still")
_TIME_UNITS = _words("seconds minutes hours days weeks months years")
# What a "last" that is a verb runs until: "last a week", "last until spring".
_LASTS_FOR = _TIME_UNITS | _words(
    "until till past through a an one two three four five six seven eight nine ten"
)
_LAST_VERB_QUESTIONS = _words("do does did will would can could")
# Verbs after which "last" is a place in an order: "Do nice guys finish last?"
_LAST_AS_A_PLACE_AFTER = _words(
    "finish finished finishes come came comes arrive arrived rank ranked place placed end ended"
)
# Before a subject and a verb (not a form of "be": "Was he last?" is the adjective).
_VERB_AUXILIARIES = _words("do does did can could should would will must may might")
_DETERMINERS = _words("the a an my your his her its our their this that these those")


# Before a period, "every" and "each" say how often ("every day", "each
# night": the same as "per day", "a day", "daily"), and "last" with no
# determiner says when ("last night", a time frame _time_frames reads): no
# scope (a hunt: 14 paraphrases vetoed as a scope word on one side).
_HOW_OFTEN = _words("every each")


def _a_period(word: str) -> bool:
    return singular(word) in _PERIODS


def _says_scope(tokens: list[str], i: int) -> bool:
    token = tokens[i]
    before = tokens[i - 1] if i else ""
    following = tokens[i + 1] if i + 1 < len(tokens) else ""
    if token in _HOW_OFTEN and following and _a_period(following):
        return False
    if token in _HOW_OFTEN and following == "single" and i + 2 < len(tokens) and _a_period(tokens[i + 2]):
        return False  # "every single day" is "every day" (a hunt)
    if token == "single" and before in _HOW_OFTEN and following and _a_period(following):
        return False
    if token == "each" and following == "other":
        return False  # "damage each other": no scope, one another
    if token == "last" and following and _a_period(following) and before not in _DETERMINERS:
        return False
    if token == "last":
        if following in _LAST_VERB_BEFORE and before not in _DETERMINERS:
            return False
        if not following and before in _SUBJECT_PRONOUNS and i >= 2 and tokens[i - 2] in _VERB_AUXILIARIES:
            return False  # "Will it last?", "Does it last?" (not "Was he last?", "... see him last?")
        if before not in _DETERMINERS and (following[:1].isdigit() or following in _LASTS_FOR):
            return False  # "Does a Tesla battery last 10 years?", "... last until spring?"
        verb_here = (
            (not following or following in STOPWORDS)
            and before not in _DETERMINERS
            and before not in _LAST_AS_A_PLACE_AFTER
        )
        return not (
            verb_here
            and (
                "long" in tokens
                or before in _LAST_VERB_AFTER
                # "How many days does a cold typically last?", "Do gel nails
                # actually last?" (not "finished surprisingly last").
                or before in _BEFORE_LAST_AS_A_VERB
                or ("many" in tokens and not _TIME_UNITS.isdisjoint(tokens))
                # "Do gel nails last?": a do / will question ending on it.
                or (not following and tokens[0] in _LAST_VERB_QUESTIONS)
            )
        )
    if token in _FOR_A_WHOLE_PERIOD and (
        (_a_period(following) and singular(following) == following)
        or (following == "the" and i + 2 < len(tokens) and tokens[i + 2] in _A_WHOLE_SPAN)
    ):
        # "all night", "the whole day", "all the time": how long, no scope
        # ("... out overnight?" / "... out all night?", "... constantly?" /
        # "... all the time?": a hunt, 24 such paraphrases vetoed).
        return False
    if token == "least" and before == "at" and (following[:1].isdigit() or following in _A_COUNT):
        return False  # "at least 8 hours": a bound (number_veto), said also "a minimum of 8 hours"
    if token == "all":
        # "at all" ends the phrase where no noun of "all" follows: "Is it
        # safe at all to eat ...?" (not "at all airports", "at all the
        # airports", "at all of them", "at all such venues").
        no_noun = not following or (
            following in STOPWORDS and following not in _DETERMINERS and following not in ("of", "such")
        )
        return not (before in ("at", "after") and no_noun)
    return True


# Scope words that say the same: "each" and "every" ask of one at a time
# ("Should I stretch before every run?" / "... each run?": a hunt). Not
# "all", a total as often ("What is the weight of all the boxes?" / "... of
# each box?": two reviews found such served while "all" was one with them).
# "earliest" says "first" ("the earliest signs" / "the first signs": a hunt).
_SAME_SCOPE = {"each": "every", "earliest": "first"}
# Words that say a scope word where the other side says that one, and only
# there (_scope_said_otherwise): "the final episode" / "the last episode",
# the "initial" / "first" stage, to stay "by myself", "solo" or "unattended" /
# "alone", "my whole savings" / "all my savings" (a hunt: 40 such
# paraphrases vetoed as a scope word on one side or swapped). Not where the
# other side says none: "... by myself" asks no "alone" of a question that
# says neither (a QQP duplicate).
_SCOPE_SAID_OTHERWISE = {
    ("final",): "last",
    ("initial",): "first",
    ("solo",): "alone",
    ("unattended",): "alone",
    ("whole",): "all",
    ("entire",): "all",
    # "Can I just use cash?" / "Can I only use cash?" (a hunt: 9 vetoed).
    ("just",): "only",
    **{
        ("by", pronoun): "alone"
        for pronoun in _words("myself yourself himself herself itself themselves ourselves")
    },
}
# What "all", "whole" and "entire" may span as a time: "all night", "all the
# time", "the whole day".
_FOR_A_WHOLE_PERIOD = _words("all whole entire")
_A_WHOLE_SPAN = _PERIODS | {"time"}
# Words after "at least" that make it a bound on a count.
_A_COUNT = frozenset(NUMBER_WORDS) | _words("a an one")


def _scope(tokens: list[str]) -> frozenset[str]:
    scope = {
        _SAME_SCOPE.get(t, t) for i, t in enumerate(tokens) if t in SCOPE_WORDS and _says_scope(tokens, i)
    }
    if "most" in scope and any(
        t == "most" and tokens[i + 1 : i + 2] == ["recent"] for i, t in enumerate(tokens)
    ):
        # "the most recent commit" is "the latest commit" (a hunt: vetoed as
        # swapped); not "the last": "Is Windows 10 the last version?" asks
        # whether it is the final one (a review).
        scope = (scope - {"most"}) | {"latest"}
    for i, token in enumerate(tokens):
        if token in _SCOPE_SPELLING_STARTS:
            for words in ((token,), tuple(tokens[i : i + 2])):
                if words in SCOPE_SPELLINGS:
                    scope.add(SCOPE_SPELLINGS[words])
    return frozenset(scope)


# Words that ask a total, of which "all" says the sum: "What is the weight
# of all boxes?" is no "... of each box?" (two reviews).
_TOTALS = _words("much many total sum weight weigh cost costs price prices combined altogether together")
# Words of _SCOPE_SAID_OTHERWISE that say the scope word only before a noun.
_BEFORE_A_NOUN_ONLY = _words("final initial whole entire")
# Stop words that are no noun ("the final thing", "the last one" are).
_NO_NOUN = STOPWORDS - _words("thing things one ones way ways")
# Questions that ask which one, of which "the last" is the latest.
_ASKING_WHICH_ONE = _words("what which who when where how")


# The words _scope_said_otherwise reads: each first word of
# _SCOPE_SAID_OTHERWISE, "last" and "all".
_SAYING_SCOPE_OTHERWISE = frozenset(words[0] for words in _SCOPE_SAID_OTHERWISE) | {"last", "all"}


def _scope_said_otherwise(tokens: list[str], scope: frozenset[str]) -> frozenset[tuple[str, str]]:
    """(the word as said, the scope word it says where the other side says
    that one): _SCOPE_SAID_OTHERWISE, and "all" before a bare plural, which
    says "every" ("Do all dogs need vaccines?" / "Does every dog need
    vaccines?": a hunt, 26 such paraphrases vetoed; not "all the boxes",
    which may be their total)."""
    said: set[tuple[str, str]] = set()
    if _SAYING_SCOPE_OTHERWISE.isdisjoint(tokens):
        return frozenset(said)
    asks_a_total = not _TOTALS.isdisjoint(tokens)
    for i, token in enumerate(tokens):
        if token not in _SAYING_SCOPE_OTHERWISE:
            continue
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if token in _BEFORE_A_NOUN_ONLY and (not following or following in _NO_NOUN):
            continue  # "When were they last in the final?": the final is a match
        if token == "last" and "last" in scope and tokens[0] in _ASKING_WHICH_ONE:
            # "Who won the last World Cup?" / "... the most recent World
            # Cup?" (a hunt: 25 such vetoed); not "Is Windows 10 the last
            # version?", which asks whether it is the final one (a review).
            said.add(("last", "latest"))
        for words in ((token,), tuple(tokens[i : i + 2])):
            if words in _SCOPE_SAID_OTHERWISE:
                said.add((token, _SCOPE_SAID_OTHERWISE[words]))
        if (
            token == "all"
            and "all" in scope
            and following
            and not asks_a_total
            and following not in STOPWORDS
            and following not in _DETERMINERS
            and singular(following) != following
        ):
            said.add(("all", "every"))
    return frozenset(said)


def scope_against(side: Analysis, other: frozenset[str]) -> frozenset[str]:
    """The scope words of ``side``, each word that says one of ``other``'s
    otherwise (Analysis.scope_otherwise) read as that one."""
    scope = set(side.scope)
    for word, said in side.scope_otherwise:
        if said in other and said not in scope:
            scope.discard(word)
            scope.add(said)
    return frozenset(scope)


_analyze_memoized = functools.lru_cache(maxsize=_ANALYSIS_MEMO_ENTRIES)(analyze_uncached)


# Who a question's auxiliary asks about, where English puts "not" after it
# when the auxiliary is not contracted: a pronoun, a determiner and a word
# ("my car"), or one word ("cats"); never a quantifier ("Is everyone not
# invited?" is not "Isn't everyone invited?"), nor a word in -ing, which
# may be what a "not" negates ("Does not exercising ...?"), nor more words,
# which may hold a verb or an adverb ("Why did the team decide not to
# play?", "Why is my dog still not trained?": a review's 50 such pairs).
_SUBJECT_PRONOUNS = _words("i you he she it we they")


def _content_words(tokens: tuple[str, ...]) -> frozenset[str]:
    """A stretch's content words, as Analysis.content has a whole text's:
    singular, no stop word, no number, no dash and no unit sign ("10%" and
    "10 percent", "$5" and "5 dollars" say the same words: their units are
    Analysis.units). Other operators stay words ("C++" is not "C")."""
    return frozenset(singular(t) for t in tokens if t not in _NOT_CONTENT and not t[0].isdigit())


# A dash and the unit signs: tokens, no content words.
SIGNS = frozenset("-$%")
_NOT_CONTENT = STOPWORDS | SIGNS
