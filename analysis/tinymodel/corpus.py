"""Seeded synthetic corpus for the tiny GPT-2: simple stories that also teach IOI, greater-than
and induction.

Each document is a short TinyStories-like story (60-200 words) with, at high rates:
- IOI sentences from the *training* IOI templates (or, with `ioi_grammar`, from a grammar of
  further intros and actions, none held out) and *training* name pairs (ABBA and BABA,
  which name is the subject is random), e.g. "When Mary and John went to the store, John gave
  a drink to Mary." Every pair of names that occurs together in a document is a training pair.
- year spans from the *training* greater-than templates, end > start, same century, and the
  (century, start suffix) never held out, e.g. "The war lasted from the year 1732 to 1758.";
  years are always four digits after a space, so a tokenizer splitting digit runs into pairs
  learns " 17" and "32" pieces (see the tokenizer note in lnscope.analysis.tasks.greater_than).
- a random word sequence said twice (induction),
- simple facts.

`split="heldout"` draws from a disjoint seed stream with the same generator (held-out LM loss);
held-out *task* templates and name pairs never appear in either split.

`repeated_token_rows` makes token-level training rows of repeated random word-token sequences (the
induction task's format, fresh draws), which the build mixes in with the tokenized stories.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch

from lnscope.analysis.tasks import vocab

logger = logging.getLogger(__name__)
T = TypeVar("T")

CORPUS_SPLITS: tuple[str, ...] = ("train", "heldout")
EOT = "<|endoftext|>"

# How often each block appears in a document.
# The task blocks are dense on purpose: a 1M-parameter model sees ~8M tokens, and IOI's
# S-inhibition and induction's K-composition only form when they pay off often.
P_IOI = 0.95  # at least one IOI sentence
P_SECOND_IOI = 0.75
P_THIRD_IOI = 0.4
P_IOI_FIRST = 0.6  # the document opens with the IOI sentence (as the task prompts do)
P_YEARS = 0.7
P_YEARS_FIRST = 0.15
P_REPEAT = 0.9
P_SECOND_REPEAT = 0.4
REPEAT_WORDS = (6, 16)  # words in a repeated sequence
P_FACTS = 0.4
# Token-level rows of repeated random sequences (see repeated_token_rows; the build mixes these in with its own
# span, BuildConfig.repeat_span).
REPEAT_ROW_SPAN = (4, 40)  # repeated_token_rows' default tokens per sequence
P_THIRD_COPY = 0.2
P_THIRD_CHARACTER = 0.3
P_NEW_IOI_NAMES = 0.15  # the IOI sentence introduces two new characters

_PRONOUNS = {
    "female": {"he": "she", "He": "She", "him": "her", "his": "her", "His": "Her"},
    "male": {"he": "he", "He": "He", "him": "him", "his": "his", "His": "His"},
}
_KINDS = {
    "female": ("girl", "little girl", "woman", "princess", "kid", "child"),
    "male": ("boy", "little boy", "man", "prince", "kid", "child"),
}

ANIMALS = (
    "cat", "dog", "bird", "fish", "rabbit", "horse", "cow", "duck", "frog", "bear", "mouse",
    "lion", "fox", "pig", "sheep", "turtle", "bee", "puppy", "kitten", "monkey", "goat", "deer",
    "squirrel", "tiger", "dragon", "snake", "whale", "butterfly", "spider", "chicken", "wolf",
)  # fmt: skip
FOODS = (
    "bread", "soup", "cheese", "rice", "pasta", "candy", "fruit", "pie", "cookies", "ice cream",
    "carrots", "cake", "honey", "milk", "grapes", "pizza", "corn", "beans",
)  # fmt: skip
COLORS = ("red", "blue", "green", "yellow", "pink", "purple", "gray", "white", "black", "brown")
ADJECTIVES = (
    "happy", "kind", "brave", "small", "big", "funny", "quiet", "clever", "shy", "friendly",
    "curious", "gentle", "strong", "silly", "nice", "busy",
)  # fmt: skip
GOOD_FEELINGS = {
    "happy": ("the sun was shining", "{his} friend came to visit", "{he} found {his} lost {OBJECT}"),
    "excited": ("it was {his} birthday", "they were going to the {PLACE}", "{he} got a new {OBJECT}"),
    "proud": ("{he} finished {his} work", "{he} helped {his} mom", "{he} won the race"),
    "glad": ("the rain had stopped", "{his} friend was safe", "dinner was ready"),
}
BAD_FEELINGS = {
    "sad": ("{he} lost {his} {OBJECT}", "it was raining", "{his} friend moved away"),
    "angry": ("someone broke {his} {OBJECT}", "{he} had to stay inside", "the {ANIMAL} ate {his} {FOOD}"),
    "scared": ("the night was dark", "a big dog barked", "there was a loud noise"),
    "tired": ("{he} played all day", "{he} walked to the {PLACE}", "{he} did not sleep well"),
}
FEELINGS = {**GOOD_FEELINGS, **BAD_FEELINGS}

OPENINGS = (
    "Once upon a time, there was a {ADJ} {KIND} named {X}.",
    "{X} was a {KIND} who lived near the {PLACE}.",
    "There once was a {ADJ} {KIND} called {X}.",
    "One sunny day, {X} woke up early.",
    "{X} lived in a small house with {his} family.",
    "This is a story about {X} and {Y}.",
    "Long ago, in a small town, lived a {KIND} named {X}.",
    "It was a cold morning, and {X} was at home.",
    "{X} had a best friend named {Y}.",
    "Every summer, {X} went to visit {his} grandma.",
)
STORY_SENTENCES = (
    "{X} liked to play with {his} {OBJECT}.",
    "{X} went to the {PLACE} with {Y}.",
    "{X} saw a {ANIMAL} near the {PLACE}.",
    "The {ANIMAL} was {ADJ} and {ADJ2}.",
    "{X} was {FEELING} because {REASON}.",
    "{He} wanted to eat some {FOOD}.",
    "{X} and {Y} played a game at the {PLACE}.",
    '{X} asked {Y}, "Do you want to play?"',
    '"Yes!" said {Y}.',
    "{X} had a {COLOR} {OBJECT}.",
    "Every day, {X} walked to the {PLACE}.",
    "The sun was warm, so {X} went outside.",
    "It started to rain, so {X} stayed inside.",
    "{X} helped {Y} find {Yhis} {OBJECT}.",
    "{X} lost {his} {OBJECT} at the {PLACE}.",
    "{X} tossed a stone into the river.",
    "{X} lent {Y} a {OBJECT}.",
    "{X} wrote a note and left it on the table.",
    "{X} carried the {OBJECT} home.",
    "{X} cleaned {his} room.",
    "{X} was sitting under a big tree.",
    "{X} spent the morning in the garden.",
    "{X} ate some {FOOD}.",
    "{X} smiled at {Y}.",
    "{X} gave {Y} a big hug.",
    "{X} thanked {Y} for the {OBJECT}.",
    "{X} felt {FEELING}.",
    "{X} ran to the {PLACE} as fast as {he} could.",
    "{X} found a {COLOR} {OBJECT} under the bed.",
    "{X}'s mom made {FOOD} for dinner.",
    "{X} did not want to go to the {PLACE}.",
    "{X} climbed a big tree.",
    "{X} drew a picture of a {ANIMAL}.",
    "After lunch, {X} took a nap.",
    "{X} and {Y} built a tower out of blocks.",
    "The {ANIMAL} ran away, and {X} ran after it.",
    "{X} asked {his} mom if {he} could go to the {PLACE}.",
    "{X} told {Y} a funny story, and they laughed.",
    "{X} put the {OBJECT} in {his} bag.",
    "When {X} got home, {he} was very tired.",
    "{X} was scared of the dark, but {Y} was brave.",
    "If it rains, {X} will stay at home.",
    "{X} forgot {his} {OBJECT} at the {PLACE}, so {he} went back to get it.",
    "{X} shared {his} {FOOD} with {Y}.",
    "Because {X} was kind, everyone liked {him}.",
    '"I can do it!" said {X}.',
    '"Look at the {ANIMAL}!" said {X}.',
    "{X} looked for {Y} everywhere.",
    "{Y} was waiting for {X} at the {PLACE}.",
    "{X} wanted a {COLOR} {OBJECT} for {his} birthday.",
    "{X} and {Y} went home together.",
    "The {PLACE} was full of people.",
    "{X} heard a {ANIMAL} outside.",
    "{He} was very {FEELING}.",
    "{X} called {Y} on the phone.",
    "{X} and {Y} sat down to eat {FOOD}.",
    "As the sun went down, {X} walked home.",
    "Last week, {X} saw a {ANIMAL} at the {PLACE}.",
    "{X} passed by the {PLACE} on the way home.",
    "It was late, so {X} went to bed.",
    "{X} was still hungry, so {he} ate some {FOOD}.",
    "{X} held the {OBJECT} with both hands.",
    "The {ANIMAL} stretched and yawned.",
    "{X} was very active and liked to run.",
    "The rain stopped, and {X} went outside to play.",
    "{X} had a {OBJECT} which was {COLOR}.",
    "People in the town liked {X}.",
    "{X} will always remember the day at the {PLACE}.",
    "{X} finished {his} {FOOD} and said thank you.",
    "{X} jumped into a big puddle and got wet.",
    "{X} and {Y} made a card for their teacher.",
    "The wind was strong, and {X}'s {OBJECT} flew away.",
    "{X} counted the stars in the sky.",
    "{X} planted a seed, and soon a {COLOR} flower grew.",
    "{X} could not find {his} shoes.",
    "{X} tried again and again until {he} could do it.",
    "{Y} laughed when the {ANIMAL} sneezed.",
    "{X} fed the {ANIMAL} some {FOOD}.",
    "{X} made a sandcastle by the sea.",
    "The box was too heavy, so {Y} helped {X} carry it.",
    "{X} learned to ride a bike.",
    "{X} was sorry, and {Y} forgave {him}.",
    "{X} painted the fence {COLOR}.",
    "{X} whispered a secret to the {ANIMAL}.",
    "The little {ANIMAL} was lost, so {X} took it home.",
    "{X} baked a pie with {his} grandma.",
    # more contexts for words of the held-out IOI clauses, so none is known from one sentence only (a word seen
    # in one sentence makes the model predict that sentence's next word: " left" after "wrote a note to")
    "{X} found a note under the door.",
    '{X} read the note twice. It said, "See you soon!"',
    "There was a note on the {OBJECT}.",
    "{X} wrote {his} name on the {OBJECT}.",
    "{X} wrote a story about a {ANIMAL}.",
    "{X} tossed the {OBJECT} up in the air and caught it.",
    "{X} lent {Y} some {FOOD}.",
    "The days passed quickly.",
    "{X} passed the test at school.",
    "The {ANIMAL} was sitting on the roof.",
    "{X} spent all {his} money on {FOOD}.",
    "{X}'s dad cleaned the car.",
    "The {ANIMAL} was still asleep.",
    "{X} was late for school.",
)
ENDINGS = (
    "In the end, {X} and {Y} were very happy.",
    "From that day on, {X} was never {BAD} again.",
    "{X} went to bed with a big smile.",
    "The end.",
    "They all had a good day.",
    "{X} learned that it is good to share.",
    "{X} and {Y} stayed friends forever.",
    "It was the best day ever.",
)
IOI_ENDINGS = (
    ".",
    ".",
    ". {IO} was very happy.",
    ", who said thank you.",
    " and smiled.",
    ". {IO} smiled.",
    ", and then they went home.",
    " before lunch.",
)
# A grammar of further IOI sentences, so the model meets more than the 196 fixed training templates (which a
# short-context model memorises). Each is an intro naming both characters, an optional name-free sentence,
# then the repeated subject doing something "to" someone.
# None of its intros or actions is a held-out one (tests check every rendering against them).
IOI_SUBORDINATORS = (
    "When", "After", "Just after", "Because", "Since", "Before", "Right after", "The moment", "Soon after",
    "Each time",
)
IOI_OPENERS = (
    "Then,", "Today,", "Yesterday", "One day,", "At noon,", "In the morning,", "That week,", "Later,",
    "On Monday,", "In the evening,", "Soon,", "After lunch,", "That day,", "Early on,", "This time,",
)
IOI_OUTINGS = (
    "went to the {PLACE}", "arrived at the {PLACE}", "were at the {PLACE}", "visited the {PLACE}",
    "were playing at the {PLACE}", "walked to the {PLACE}", "met at the {PLACE}", "ran to the {PLACE}",
    "came home from the {PLACE}", "got to the {PLACE}", "stopped at the {PLACE}", "stayed at the {PLACE}",
    "looked around the {PLACE}", "found a {OBJECT} at the {PLACE}", "got a {OBJECT} at the {PLACE}",
    "bought a {OBJECT} at the {PLACE}", "saw a {OBJECT} at the {PLACE}", "made a {OBJECT}",
    "were working at the {PLACE}", "had fun at the {PLACE}", "went for a walk", "were talking",
    "played a game", "came back", "were having lunch", "left the {PLACE}", "waited at the {PLACE}",
)
IOI_PAIRINGS = (  # intros where the two names are not joined by "and"
    "{N1} met {N2} at the {PLACE}", "{N1} went to the {PLACE} with {N2}", "{N1} was with {N2} at the {PLACE}",
    "{N1} played with {N2} at the {PLACE}", "{N1} saw {N2} at the {PLACE}", "{N1} called {N2}",
)
IOI_ASIDES = (
    "It was a sunny day.", "The sun was warm.", "They were very happy.", "It was fun.",
    "They talked for a while.", "Everyone was busy.", "It started to rain.", "The day was long.",
)
IOI_ADVERBS = ("", "", "", "", "then ", "quickly ", "later ", "happily ", "finally ", "also ")
IOI_GIVINGS = (  # each may follow an adverb
    "gave a {OBJECT}", "gave the {OBJECT}", "handed the {OBJECT}", "handed a {OBJECT}", "showed the {OBJECT}",
    "threw the {OBJECT}", "brought a {OBJECT}", "offered the {OBJECT}", "sold the {OBJECT}", "sent a letter",
    "said hello", "read a story", "sang a song", "waved goodbye", "gave the {OBJECT} back",
    "returned the {OBJECT}", "mailed a card", "sent a gift", "carried the {OBJECT}", "rolled the {OBJECT}",
    "kicked the {OBJECT}", "said sorry", "told a joke", "explained the game", "sent a {OBJECT}",
    "gave a present", "showed a picture", "brought the {OBJECT} back", "gave a big hug", "sent a message",
    "drew a picture", "painted a picture", "baked a cake", "made a {OBJECT}", "played a song", "told a story",
    "blew a kiss", "showed a trick", "taught a song", "whispered a secret", "shouted hello", "served a snack",
    "delivered the {OBJECT}", "gave a smile", "sent a postcard", "read a poem", "described the {PLACE}",
    "explained the rules", "mailed the {OBJECT}", "gave the {OBJECT} away",
)
IOI_INTENTS = (  # never after an adverb
    "decided to give the {OBJECT}", "wanted to give a {OBJECT}", "tried to hand the {OBJECT}",
    "was happy to give a {OBJECT}",
)
P_IOI_SUBORDINATE = 0.4  # "When {N1} and {N2} ..., {S2} ..." rather than two sentences
P_IOI_ASIDE = 0.2  # a name-free sentence between two-sentence intros and the action
P_IOI_PAIRING = 0.2
P_IOI_INTENT = 0.1


def ioi_grammar_template(rng: random.Random) -> str:
    """An IOI template ({N1} {N2} {S2} {PLACE} {OBJECT} slots) from the grammar above."""
    if rng.random() < P_IOI_PAIRING:
        clause = _pick(rng, IOI_PAIRINGS)
    else:
        clause = "{N1} and {N2} " + _pick(rng, IOI_OUTINGS)
    # every clause starts with a name, so an intro always opens with a word (names are " Name" tokens)
    if rng.random() < P_IOI_SUBORDINATE:
        intro = f"{_pick(rng, IOI_SUBORDINATORS)} {clause},"
    else:
        intro = f"{_pick(rng, IOI_OPENERS)} {clause}."
        if rng.random() < P_IOI_ASIDE:
            intro += f" {_pick(rng, IOI_ASIDES)}"
    if rng.random() < P_IOI_INTENT:
        action = _pick(rng, IOI_INTENTS)
    else:
        action = _pick(rng, IOI_ADVERBS) + _pick(rng, IOI_GIVINGS)
    return f"{intro} {{S2}} {action} to"


HISTORY_INTROS = (
    "{X} read a book about history.",
    "The teacher told the class about the past.",
    "{X} liked old stories.",
    "In the history book, {X} read about the old days.",
    "{X}'s grandpa told {him} about long ago.",
    "At the museum, {X} learned about the past.",
)
REPEAT_FRAMES = (
    "{X} said the magic words: {SEQ}. Later {he} said them again: {SEQ}.",
    "The secret code was {SEQ}. {X} wrote down the code: {SEQ}.",
    "{X} made a list: {LIST}. Then {he} read the list again: {LIST}.",
    "The bird sang: {SEQ}. Then the bird sang again: {SEQ}.",
    "{X} learned a new song. It went like this: {SEQ}. Every night {he} sang {SEQ}.",
    "The old book said: {SEQ}. {X} read it again: {SEQ}.",
    "{X} had to remember {SEQ}. {He} said it three times: {SEQ}. {SEQ}. {SEQ}.",
    "On the wall were the words {SEQ}. {X} read them out loud: {SEQ}.",
)
FACTS = (
    "The capital of France is Paris.", "The capital of Italy is Rome.",
    "The capital of Spain is Madrid.", "The capital of England is London.",
    "The capital of Germany is Berlin.", "The capital of Japan is Tokyo.",
    "The capital of Egypt is Cairo.", "The capital of Russia is Moscow.",
    "The capital of China is Beijing.", "The capital of Greece is Athens.",
    "Cats like to eat fish.", "Dogs like to play with balls.", "Rabbits like to eat carrots.",
    "Bears like to eat honey.", "Mice like to eat cheese.", "Cows eat grass.",
    "Birds can fly.", "Fish live in water.", "Bees make honey.", "Cows give milk.",
    "The sun is hot.", "Ice is cold.", "Snow is white.", "The sky is blue.", "Grass is green.",
    "Water is wet.", "The moon comes out at night.", "Plants need water to grow.",
    "A week has seven days.", "A year has twelve months.", "Frogs can jump.",
    "Ducks can swim.", "Lions are big cats.", "The sun rises in the east.",
    "Fire is hot.", "Apples grow on trees.", "Rain comes from clouds.",
    "Winter is colder than summer.", "A spider has eight legs.", "A dog has four legs.",
    "People sleep at night.", "Milk is white.", "Lemons are sour.", "Sugar is sweet.",
)  # fmt: skip
FACT_INTROS = ("Did you know? ", "{X} learned that ", "The teacher said that ", "", "", "Everyone knows that ")

# A large list of simple words for the repeated sequences (duplicates dropped, order kept).
_WORD_TEXT = """
    apple river stone cloud window garden silver paper button candle forest rabbit
    mountain pencil ocean yellow tiger blanket rocket basket purple dragon orange jacket
    spoon castle pillow carrot lemon wagon bucket feather hammer ladder mirror pocket
    rainbow shadow thunder turtle violin whistle zebra anchor bottle bridge cactus
    circle desert engine finger giant honey island jungle kettle letter magnet needle
    onion parrot puzzle queen robot saddle table umbrella valley wizard yarn banana cookie
    dinner elbow fence goose helmet igloo jelly kitten lizard monkey noodle oven peanut
    quilt ribbon sandal tomato unicorn velvet walnut boat cherry doctor eagle flag glove
    horse insect juice king lamp mouse nest owl piano rose sock tent wheel box
    bell chair drum egg fox gate hat ink jar kite leaf moon nut pen ring star tree vase
    wolf cup dog cat sun hill lake road farm barn ship coat shoe milk bread cake fish
    frog duck bear lion bird bee ant pig cow hen goat sheep deer seal crab snail worm
    green blue red white black brown pink gray gold tall short fast slow warm cold
    soft loud quiet happy sad brave tiny huge round sharp sweet sour dark bright
    jump run swim sing dance read write draw paint cook bake climb fly walk sleep
    laugh smile clap wave kick throw catch push pull open close fill spin shake
    hop skip roll bounce float sink dig plant grow pick wash dry fold pack
    north south east west morning evening night noon spring summer autumn winter
    one two three four five six seven eight nine ten first last next
    river bank shore wave sand shell pearl coral storm breeze frost snow rain
    kingdom village city town market tower wall door floor roof room hall
    bread butter sugar salt pepper rice bean corn pea plum grape melon peach pear
    acorn arrow badge beetle bicycle biscuit blossom boulder bracelet broom brush bubble
    cabin camera canoe canyon carpet cereal chalk chimney clock compass cotton crayon crown
    crystal cushion daisy diamond dolphin donkey elephant envelope fairy falcon fern fiddle
    flute fountain frame garlic gem ginger globe goblin grass guitar hammock harbor harp hedge
    hippo holly hook iron ivy jewel kayak kernel knot lantern lava lettuce lighthouse lily
    llama lobster locket map maple marble meadow medal mitten moss muffin mushroom napkin
    necklace oak octopus olive orchard otter paddle pancake panda parcel pebble penguin
    pepper pigeon pine planet plum pond pony potato pumpkin quartz raccoon radio raft raven
    reed rhino saucer scarf seed shovel sled slipper snowman sparrow spider sponge squash
    stamp statue stew straw sunflower swan sweater teapot thimble thistle ticket toad torch
    tractor trumpet tulip tunnel twig vest volcano waffle walrus wand wheat willow window
    wreath yacht yogurt zipper cliff comet dune glacier lagoon marsh prairie reef summit
    swamp tide brave calm eager fancy gentle jolly lazy lucky merry proud shiny silly
    sleepy sneaky sticky tidy wild wise zany hollow crisp dusty fuzzy golden misty rusty
"""
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORD_TEXT.split()))


def _pick(rng: random.Random, options: Sequence[T]) -> T:
    """rng.choice, about twice as fast (one C call); deterministic for a given rng state."""
    return options[int(rng.random() * len(options))]


class _Fill(dict):
    """Slot values for str.format_map, drawn from the rng only when a template asks for them."""

    def __init__(self, rng: random.Random, x: str, y: str) -> None:
        super().__init__()
        self.rng = rng
        self["X"] = x
        self["Y"] = y
        self.update(_PRONOUN_OF[x])
        self["Yhis"] = _PRONOUN_OF[y]["his"]

    def __missing__(self, key: str) -> str:
        rng = self.rng
        if key in ("FEELING", "REASON"):
            feeling = _pick(rng, _FEELING_NAMES)
            self["FEELING"] = feeling
            self["REASON"] = _pick(rng, FEELINGS[feeling]).format_map(self)
            return self[key]
        if key == "KIND":
            value = _pick(rng, _KINDS[_GENDER_OF[self["X"]]])
        else:
            value = _pick(rng, _CHOICES[key])
        self[key] = value
        return value


_FEELING_NAMES = tuple(FEELINGS)
_GENDER_OF = {name: vocab.name_gender(name) for name in vocab.NAMES}
_PRONOUN_OF = {name: _PRONOUNS[gender] for name, gender in _GENDER_OF.items()}
_CHOICES: dict[str, tuple[str, ...]] = {
    "PLACE": vocab.PLACES,
    "OBJECT": vocab.OBJECTS,
    "ANIMAL": ANIMALS,
    "FOOD": FOODS,
    "COLOR": COLORS,
    "ADJ": ADJECTIVES,
    "ADJ2": ADJECTIVES,
    "BAD": tuple(BAD_FEELINGS),
}


class _Story:
    """One document being written: its rng and its characters (all pairs are training pairs)."""

    def __init__(self, rng: random.Random, ioi_grammar: float = 0.0) -> None:
        self.rng = rng
        self.ioi_grammar = ioi_grammar
        self.characters: list[str] = []
        self.add_characters(3 if rng.random() < P_THIRD_CHARACTER else 2)

    def compatible(self, name: str) -> bool:
        return name not in self.characters and all(
            not vocab.is_heldout_pair(name, other) for other in self.characters
        )

    def add_characters(self, n: int) -> list[str]:
        added = []
        while len(added) < n:
            name = _pick(self.rng, vocab.NAMES)
            if self.compatible(name):
                self.characters.append(name)
                added.append(name)
        return added

    def render(self, template: str, x: str | None = None, y: str | None = None) -> str:
        rng = self.rng
        if x is None:
            x = self.characters[0] if rng.random() < 0.5 else _pick(rng, self.characters)
        if y is None:
            y = _pick(rng, [c for c in self.characters if c != x])
        return template.format_map(_Fill(rng, x, y))

    # --- blocks ----------------------------------------------------------------------------

    def opening(self) -> str:
        return self.render(_pick(self.rng, OPENINGS), x=self.characters[0], y=self.characters[1])

    def story_sentences(self, n: int) -> list[str]:
        return [self.render(_pick(self.rng, STORY_SENTENCES)) for _ in range(n)]

    def ending(self) -> str:
        return self.render(_pick(self.rng, ENDINGS))

    def ioi_sentence(self) -> str:
        """An IOI sentence completed with the indirect object: a training template, or with probability
        ioi_grammar one from the grammar (ioi_grammar_template); never a held-out intro or action."""
        rng = self.rng
        if rng.random() < P_NEW_IOI_NAMES:
            pair = self.add_characters(2)
        else:
            pair = rng.sample(self.characters, 2)
        io, s = pair if rng.random() < 0.5 else pair[::-1]
        n1, n2 = (io, s) if rng.random() < 0.5 else (s, io)  # ABBA or BABA
        if self.ioi_grammar and rng.random() < self.ioi_grammar:
            template = ioi_grammar_template(rng)
        else:
            template = _pick(rng, vocab.TRAIN_IOI_TEMPLATES)
        fill = {
            "N1": n1,
            "N2": n2,
            "S2": s,
            "PLACE": _pick(rng, vocab.PLACES),
            "OBJECT": _pick(rng, vocab.OBJECTS),
        }
        ending = _pick(rng, IOI_ENDINGS).replace("{IO}", io)
        return f"{template.format_map(fill)} {io}{ending}"

    def year_span(self) -> str:
        """A training-template span: end > start, same century, start combo not held out."""
        rng = self.rng
        while True:
            century = _pick(rng, vocab.CENTURIES)
            start = rng.randint(0, 98)
            if not vocab.is_heldout_year(century, start):
                break
        if rng.random() < 0.5:
            end = rng.randint(start + 1, 99)
        else:  # short spans are common in real text
            end = min(99, start + 1 + int(rng.expovariate(1 / 12)))
        template = _pick(rng, vocab.TRAIN_YEAR_TEMPLATES)
        return template.format(
            NOUN=_pick(rng, vocab.YEAR_NOUNS),
            Y1=f"{century}{start:02d}",
            Y2=f"{century}{end:02d}",
        )

    def history(self) -> list[str]:
        out = [self.render(_pick(self.rng, HISTORY_INTROS))] if self.rng.random() < 0.7 else []
        return out + [self.year_span() for _ in range(self.rng.randint(1, 3))]

    def repeat(self) -> str:
        rng = self.rng
        words = rng.sample(WORDS, rng.randint(*REPEAT_WORDS))
        frame = _pick(rng, REPEAT_FRAMES)
        seq = " ".join(words)
        return self.render(frame.replace("{SEQ}", seq).replace("{LIST}", ", ".join(words)))

    def facts(self) -> list[str]:
        out = []
        for fact in self.rng.sample(FACTS, self.rng.randint(1, 2)):
            intro = self.render(_pick(self.rng, FACT_INTROS))
            out.append(intro + (fact[0].lower() + fact[1:] if intro else fact))
        return out


def _document(rng: random.Random, ioi_grammar: float = 0.0) -> str:
    story = _Story(rng, ioi_grammar)
    first: list[str] = []
    middle: list[list[str]] = [story.story_sentences(rng.randint(1, 3))]
    if rng.random() < P_IOI:
        block = [story.ioi_sentence()]
        (first if rng.random() < P_IOI_FIRST else middle).append(block)
        if rng.random() < P_SECOND_IOI:
            middle.append([story.ioi_sentence()])
            if rng.random() < P_THIRD_IOI:
                middle.append([story.ioi_sentence()])
    if rng.random() < P_YEARS:
        block = story.history()
        (first if not first and rng.random() < P_YEARS_FIRST else middle).append(block)
    if rng.random() < P_REPEAT:
        middle.append([story.repeat()])
        if rng.random() < P_SECOND_REPEAT:
            middle.append([story.repeat()])
    if rng.random() < P_FACTS:
        middle.append(story.facts())
    middle.append(story.story_sentences(rng.randint(0, 2)))
    rng.shuffle(middle)
    sentences = [s for block in first for s in block] + [story.opening()]
    sentences += [s for block in middle for s in block] + [story.ending()]
    return " ".join(sentences)


def _rng(seed: int, split: str) -> random.Random:
    if split not in CORPUS_SPLITS:
        raise ValueError(f"split must be one of {', '.join(CORPUS_SPLITS)}; got {split!r}")
    # A str seed is hashed with SHA-512 by `random`, so streams are stable and disjoint.
    return random.Random(f"lnscope-corpus/{split}/{int(seed)}")


def iter_documents(n_docs: int | None, seed: int, split: str = "train", ioi_grammar: float = 0.0) -> Iterator[str]:
    """Yield `n_docs` documents (endlessly if None) from the seeded stream of `split`.

    `ioi_grammar`: the fraction of IOI sentences drawn from the grammar (ioi_grammar_template) rather than
    the fixed training templates (0: the fixed templates only).
    """
    if not 0 <= ioi_grammar <= 1:
        raise ValueError(f"ioi_grammar must be in [0, 1]; got {ioi_grammar}")
    rng = _rng(seed, split)
    count = 0
    while n_docs is None or count < n_docs:
        yield _document(rng, ioi_grammar)
        count += 1


def generate_documents(n_docs: int, seed: int, split: str = "train", ioi_grammar: float = 0.0) -> list[str]:
    """`n_docs` documents; the same (n_docs, seed, split, ioi_grammar) always gives the same list."""
    docs = list(iter_documents(n_docs, seed, split, ioi_grammar))
    logger.debug("generated %d %s documents (seed %d)", len(docs), split, seed)
    return docs


def repeated_token_rows(
    pool: Sequence[int],
    n_rows: int,
    context: int,
    seed: int,
    bos_id: int | None,
    span: tuple[int, int] = REPEAT_ROW_SPAN,
) -> torch.Tensor:
    """LongTensor[n_rows, context] of repeated random token sequences, the induction task's format.

    Each row is <|endoftext|> then sequences r of distinct tokens drawn from `pool` (length uniform in
    `span`), each said twice (one in P_THIRD_COPY thrice), back to back, cut at `context`. Evaluation
    prompts are fresh draws, so what carries over is the mechanism (copy what followed the earlier
    occurrence of the current token), not the sequences.
    """
    if n_rows and len(pool) < span[1]:
        raise ValueError(f"repeated rows need at least {span[1]} distinct tokens; the pool has {len(pool)}")
    rng = random.Random(f"lnscope-corpus/repeats/{int(seed)}")
    rows = []
    for _ in range(n_rows):
        row = [] if bos_id is None else [int(bos_id)]
        while len(row) < context:
            seq = rng.sample(pool, rng.randint(*span))
            row += seq * (3 if rng.random() < P_THIRD_COPY else 2)
        rows.append(row[:context])
    return torch.tensor(rows, dtype=torch.long).reshape(n_rows, context)


def join_documents(docs: list[str]) -> str:
    """Documents separated by the end-of-text token, as the trainer concatenates them."""
    return EOT.join(docs)
