"""Shared vocabulary of the built-in tasks and the synthetic corpus, with its train/held-out split.

Everything the tiny model is tested on is split here, once, so that the corpus (training side
only) and the task builders (either side) agree:

- IOI templates are an intro clause (two names, a place) followed by an action clause (the
  repeated subject S2 does something "to" someone). Training templates are every training intro
  x every training action; held-out templates are every held-out intro x every held-out action,
  so no held-out clause ever occurs in training text.
- An unordered name pair {A, B} is held out iff crc32("A|B" with the names sorted) % 5 == 0.
- A (century, start suffix) combination, e.g. (17, 32) for 1732, is held out iff
  crc32("1732") % 5 == 0.
- Greater-than templates are explicit lists.

Both rules use crc32, not Python's salted `hash`, so they are the same in every process.
"""

from __future__ import annotations

import re
import zlib
from typing import Literal

Split = Literal["train", "heldout", "all"]
SPLITS: tuple[str, ...] = ("train", "heldout", "all")

# Names from the IOI paper's list (single GPT-2 tokens with a leading space), with a gender so
# stories can use pronouns.
FEMALE_NAMES: tuple[str, ...] = (
    "Alice", "Amy", "Anna", "Crystal", "Elizabeth", "Emily", "Eva", "Georgia", "Jane",
    "Jennifer", "Jessica", "Kate", "Kelly", "Laura", "Lisa", "Madison", "Maria", "Mary",
    "Michelle", "Rachel", "Rose", "Ruby", "Sarah", "Victoria", "Theresa",
)  # fmt: skip
MALE_NAMES: tuple[str, ...] = (
    "Aaron", "Adam", "Alan", "Alex", "Andrew", "Andy", "Anthony", "Arthur", "Brian", "Charles",
    "Daniel", "David", "Edward", "Eric", "Frank", "George", "Henry", "Ian", "Jack", "Jacob",
    "James", "Jason", "John", "Joseph", "Kevin", "Luke", "Mark", "Martin", "Max", "Michael",
    "Paul", "Peter", "Richard", "Robert", "Ryan", "Scott", "Simon", "Steven", "Thomas", "William",
)  # fmt: skip
NAMES: tuple[str, ...] = FEMALE_NAMES + MALE_NAMES

# Consonant-initial so that "a {OBJECT}" reads well.
PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park",
    "beach", "library", "market", "kitchen", "farm", "zoo", "river", "lake", "church", "castle",
    "forest", "shop", "museum", "hotel", "bank", "cafe", "party", "playground", "town",
)  # fmt: skip
OBJECTS: tuple[str, ...] = (
    "ring", "bone", "computer", "necklace", "drink", "snack", "book", "ball", "cake", "toy",
    "letter", "hat", "flower", "key", "cup", "pen", "box", "bag", "coin", "gift", "map", "phone",
    "ticket", "cookie", "kite", "doll", "shirt", "basket", "lamp", "sandwich", "card", "picture",
)  # fmt: skip

# Nouns for "The {noun} lasted from the year 1732 to the year 17" (Hanna et al. 2023 use a
# similar list of events that span years).
YEAR_NOUNS: tuple[str, ...] = (
    "war", "dynasty", "expedition", "reign", "plague", "siege", "famine", "drought", "journey",
    "rebellion", "occupation", "truce", "voyage", "kingdom", "empire", "treaty", "trial",
    "campaign", "construction", "project", "festival", "friendship", "marriage", "tour",
    "study", "program", "conflict", "crisis", "invasion", "quest", "pilgrimage", "revolution",
    "alliance", "tradition", "epidemic", "outbreak", "rule", "trip", "dispute", "strike",
)  # fmt: skip

# Centuries ("11" .. "19") used for years; years are always written as four digits.
CENTURIES: tuple[int, ...] = tuple(range(11, 20))

# --- IOI templates -------------------------------------------------------------------------
# An intro has {N1} {N2} (IO and S in either order) and may use {PLACE} and {OBJECT}; an action
# starts with the repeated subject {S2} and ends right before the indirect object. No template
# starts with a name, so every name follows a space and is one " Name" token.

TRAIN_IOI_INTROS: tuple[str, ...] = (
    "When {N1} and {N2} went to the {PLACE},",
    "Then, {N1} and {N2} went to the {PLACE}.",
    "After {N1} and {N2} arrived at the {PLACE},",
    "Today, {N1} and {N2} were at the {PLACE}.",
    "Yesterday {N1} and {N2} visited the {PLACE}.",
    "While {N1} and {N2} were playing at the {PLACE},",
    "One day, {N1} and {N2} walked to the {PLACE}.",
    "At noon, {N1} and {N2} found a {OBJECT} at the {PLACE}.",
    "Friends {N1} and {N2} met at the {PLACE}.",
    "In the morning, {N1} and {N2} went to the {PLACE}.",
    "When {N1} and {N2} got a {OBJECT} at the {PLACE},",
    "The {PLACE} was busy when {N1} and {N2} came in.",
    "That week, {N1} and {N2} had a long day at the {PLACE}.",
    "Later, {N1} and {N2} ran to the {PLACE}.",
)
TRAIN_IOI_ACTIONS: tuple[str, ...] = (
    "{S2} gave a {OBJECT} to",
    "{S2} handed the {OBJECT} to",
    "{S2} decided to give the {OBJECT} to",
    "{S2} threw the {OBJECT} to",
    "{S2} showed the {OBJECT} to",
    "{S2} sent a letter to",
    "{S2} said hello to",
    "{S2} brought a {OBJECT} to",
    "{S2} wanted to give a {OBJECT} to",
    "{S2} offered the {OBJECT} to",
    "{S2} sold the {OBJECT} to",
    "{S2} read a story to",
    "{S2} sang a song to",
    "{S2} waved goodbye to",
)
HELDOUT_IOI_INTROS: tuple[str, ...] = (
    "As {N1} and {N2} were sitting in the {PLACE},",
    "Last summer {N1} and {N2} spent a day at the {PLACE}.",
    "Once {N1} and {N2} had cleaned the {PLACE},",
    "It was late, and {N1} and {N2} were still at the {PLACE}.",
)
HELDOUT_IOI_ACTIONS: tuple[str, ...] = (
    "{S2} passed the {OBJECT} over to",
    "{S2} lent the {OBJECT} to",
    "{S2} tossed the {OBJECT} to",
    "{S2} wrote a note to",
)


def _combine(intros: tuple[str, ...], actions: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{intro} {action}" for intro in intros for action in actions)


TRAIN_IOI_TEMPLATES: tuple[str, ...] = _combine(TRAIN_IOI_INTROS, TRAIN_IOI_ACTIONS)
HELDOUT_IOI_TEMPLATES: tuple[str, ...] = _combine(HELDOUT_IOI_INTROS, HELDOUT_IOI_ACTIONS)

# --- Greater-than templates ----------------------------------------------------------------
# {NOUN}, {Y1} (start year) and {Y2} (end year); {Y2} is always preceded by a space and the
# prompt is the text up to {Y2} followed by the century, e.g. "... to the year 17".

TRAIN_YEAR_TEMPLATES: tuple[str, ...] = (
    "The {NOUN} lasted from the year {Y1} to the year {Y2}.",
    "The {NOUN} lasted from {Y1} to {Y2}.",
    "The {NOUN} started in the year {Y1} and ended in the year {Y2}.",
    "The {NOUN} began in {Y1} and ended in {Y2}.",
    "The {NOUN} ran from {Y1} until {Y2}.",
    "The {NOUN} went on from the year {Y1} until the year {Y2}.",
    "Between {Y1} and {Y2}, there was a long {NOUN}.",
    "The {NOUN} continued from {Y1} through {Y2}.",
    "It was the {NOUN} that lasted from {Y1} to {Y2}.",
    "From {Y1} to {Y2}, the {NOUN} went on.",
    "The great {NOUN} of {Y1} was over by {Y2}.",
    "The {NOUN} was started in {Y1} and was finished in {Y2}.",
)
HELDOUT_YEAR_TEMPLATES: tuple[str, ...] = (
    "The {NOUN} held on from {Y1} all the way to {Y2}.",
    "People still remember the {NOUN}, which stretched from the year {Y1} to the year {Y2}.",
    "The {NOUN} was active from {Y1} and stopped in {Y2}.",
    "In {Y1} the {NOUN} began, and it finished in {Y2}.",
)

MIN_START_SUFFIX, MAX_START_SUFFIX = 2, 98  # greater-than start years end in 02..98


def _crc_mod5(text: str) -> bool:
    return zlib.crc32(text.encode("utf-8")) % 5 == 0


def is_heldout_pair(a: str, b: str) -> bool:
    """Whether the unordered name pair {a, b} is held out: crc32("A|B", sorted) % 5 == 0."""
    first, second = sorted((a, b))
    return _crc_mod5(f"{first}|{second}")


def is_heldout_year(century: int, suffix: int) -> bool:
    """Whether the start year century*100 + suffix is held out: crc32("CCSS") % 5 == 0."""
    return _crc_mod5(f"{century:02d}{suffix:02d}")


def pair_in_split(a: str, b: str, split: str) -> bool:
    """Whether the name pair belongs to `split` ("all" accepts every pair)."""
    check_split(split)
    return split == "all" or is_heldout_pair(a, b) == (split == "heldout")


def year_in_split(century: int, suffix: int, split: str) -> bool:
    """Whether the (century, start suffix) combination belongs to `split`."""
    check_split(split)
    return split == "all" or is_heldout_year(century, suffix) == (split == "heldout")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")


def ioi_templates(split: str) -> tuple[str, ...]:
    """The IOI templates of `split`."""
    check_split(split)
    if split == "train":
        return TRAIN_IOI_TEMPLATES
    if split == "heldout":
        return HELDOUT_IOI_TEMPLATES
    return TRAIN_IOI_TEMPLATES + HELDOUT_IOI_TEMPLATES


def year_templates(split: str) -> tuple[str, ...]:
    """The greater-than templates of `split`."""
    check_split(split)
    if split == "train":
        return TRAIN_YEAR_TEMPLATES
    if split == "heldout":
        return HELDOUT_YEAR_TEMPLATES
    return TRAIN_YEAR_TEMPLATES + HELDOUT_YEAR_TEMPLATES


def name_gender(name: str) -> Literal["female", "male"]:
    if name in FEMALE_NAMES:
        return "female"
    if name in MALE_NAMES:
        return "male"
    raise KeyError(f"{name!r} is not in the task vocabulary")


def template_regex(template: str, name_pattern: str | None = None) -> re.Pattern[str]:
    """A regex matching any rendering of `template` (names, places, objects, years, nouns)."""
    names = name_pattern or "|".join(NAMES)
    slots = {
        "N1": f"(?:{names})",
        "N2": f"(?:{names})",
        "S2": f"(?:{names})",
        "PLACE": r"\w+",
        "OBJECT": r"\w+",
        "NOUN": r"\w+",
        "Y1": r"\d{4}",
        "Y2": r"\d{4}",
    }
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        out.append(slots[part] if i % 2 else re.escape(part))
    return re.compile("".join(out))
