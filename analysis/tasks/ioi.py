"""Indirect object identification (Wang et al. 2022).

"When Mary and John went to the store, John gave a drink to" -> " Mary". The indirect object
IO is the name mentioned once; the subject S is repeated (S1 in the intro, S2 in the action).
ABBA puts IO first in the intro, BABA puts S first. Metric: logit(IO) - logit(S) at the last
prompt token; accuracy: fraction of prompts where it is > 0.

Corruptions (token-aligned with the clean prompt, names being single tokens):
- "abc": the three name slots get three new distinct names X, Y, Z, none of them IO or S
  ("When Anna and Paul went to the store, Kate gave a drink to"): no name is repeated.
- "swap_s": S2 is replaced by IO ("When Mary and John went to the store, Mary gave a drink
  to"): the other subject is repeated, so the answer flips to S.
"""

from __future__ import annotations

import itertools
import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from lnscope.analysis.tasks import vocab
from lnscope.analysis.tasks.base import (
    LogitDiffBatch,
    last_positions,
    pad_id,
    pad_right,
    require_words,
    single_token_words,
    tokenize_prompts,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Corruption = Literal["abc", "swap_s"]
CORRUPTIONS: tuple[str, ...] = ("abc", "swap_s")
logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class IOIBatch(LogitDiffBatch):
    """IOI prompts; answer_tokens[:, 0] is IO, answer_tokens[:, 1] is S."""

    io_names: list[str] = field(default_factory=list)
    s_names: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    orders: list[str] = field(default_factory=list)  # "ABBA" or "BABA"
    name_positions: Int[Tensor, "batch 3"] | None = None  # positions of IO, S1, S2 tokens
    split: str = field(default="heldout", metadata={"shared": True})
    corruption: str = field(default="abc", metadata={"shared": True})

    metric_description: ClassVar[str] = "logit(IO) - logit(S) at the last prompt token"

    def _describe_extra(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "corruption": self.corruption,
            "n_templates": len(set(self.templates)),
            "n_abba": self.orders.count("ABBA"),
            "n_baba": self.orders.count("BABA"),
        }


def _positions(tokens: list[int], io: int, s: int) -> tuple[int, int, int]:
    """Positions of IO, the first S (S1) and the last S (S2) in a clean prompt."""
    s_pos = [i for i, t in enumerate(tokens) if t == s]
    return tokens.index(io), s_pos[0], s_pos[-1]


@dataclass(frozen=True)
class _Words:
    """The task vocabulary that is one token (with a leading space) for this tokenizer."""

    names: dict[str, int]  # name -> token id of " " + name
    name_list: list[str]  # the names, sorted
    pairs: list[tuple[str, str]]  # (IO, S) candidates: name pairs of the split, sorted
    places: list[str]  # sorted
    objects: list[str]  # sorted


def _single_token_words(tokenizer: PreTrainedTokenizerBase, split: str) -> _Words:
    """Names, places and objects that are single tokens, and the split's name pairs among them."""
    names = single_token_words(tokenizer, vocab.NAMES)
    places = single_token_words(tokenizer, vocab.PLACES)
    objects = single_token_words(tokenizer, vocab.OBJECTS)
    require_words(names, vocab.NAMES, 5, "names", "IOI")
    require_words(places, vocab.PLACES, 1, "places", "IOI")
    require_words(objects, vocab.OBJECTS, 1, "objects", "IOI")
    pairs = [p for p in itertools.combinations(sorted(names), 2) if vocab.pair_in_split(*p, split)]
    if not pairs:
        raise ValueError(f"no {split} name pair has both names as single tokens for this tokenizer")
    logger.debug(
        "IOI: %d/%d names, %d/%d places, %d/%d objects are single tokens; %d %s pairs",
        len(names), len(vocab.NAMES), len(places), len(vocab.PLACES), len(objects),
        len(vocab.OBJECTS), len(pairs), split,
    )  # fmt: skip
    return _Words(names=names, name_list=sorted(names), pairs=pairs, places=sorted(places), objects=sorted(objects))


@dataclass(frozen=True)
class _Prompt:
    """One clean prompt and its corruption, the same template, place and object."""

    clean: str
    corrupt: str
    io: str
    s: str
    template: str
    order: str  # "ABBA" or "BABA"


def _sample_prompt(rng: random.Random, words: _Words, templates: tuple[str, ...], order: str,
                   corruption: str) -> _Prompt:
    """Template, (IO, S), place and object drawn from rng; ABBA: N1 = IO, N2 = S; BABA: N1 = S, N2 = IO."""
    template = rng.choice(templates)
    io, s = rng.sample(rng.choice(words.pairs), 2)
    n1, n2 = (io, s) if order == "ABBA" else (s, io)
    place, obj = rng.choice(words.places), rng.choice(words.objects)
    if corruption == "abc":  # three new distinct names, none of them IO or S
        x, y, z = rng.sample([n for n in words.name_list if n not in (io, s)], 3)
    else:  # swap_s: S2 := IO
        x, y, z = n1, n2, io
    return _Prompt(
        clean=template.format(N1=n1, N2=n2, S2=s, PLACE=place, OBJECT=obj),
        corrupt=template.format(N1=x, N2=y, S2=z, PLACE=place, OBJECT=obj),
        io=io, s=s, template=template, order=order,
    )


def _tokenize_aligned(tokenizer: PreTrainedTokenizerBase, prompts: list[_Prompt],
                      prepend_bos: bool) -> tuple[list[list[int]], list[list[int]]]:
    """(clean ids, corrupt ids) per prompt, each pair of the same length (names being single tokens)."""
    clean_ids = tokenize_prompts(tokenizer, [p.clean for p in prompts], prepend_bos)
    corrupt_ids = tokenize_prompts(tokenizer, [p.corrupt for p in prompts], prepend_bos)
    for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids)):
        if len(a) != len(b):  # names are single tokens, so this means a tokenizer surprise
            raise ValueError(f"IOI prompt {i + 1}: clean and corrupt differ in length: {prompts[i].clean!r}")
    return clean_ids, corrupt_ids


def make_ioi(
    tokenizer: PreTrainedTokenizerBase,
    n_prompts: int = 100,
    seed: int = 0,
    split: str = "heldout",
    prepend_bos: bool = True,
    corruption: str = "abc",
) -> IOIBatch:
    """IOI prompts, half ABBA and half BABA.

    split "heldout" uses only held-out templates and held-out name pairs, "train" only training
    ones, "all" any of them (see analysis.tasks.vocab).
    """
    vocab.check_split(split)
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {', '.join(CORRUPTIONS)}; got {corruption!r}")
    if n_prompts < 1:
        raise ValueError("n_prompts must be at least 1")
    words = _single_token_words(tokenizer, split)
    templates = vocab.ioi_templates(split)
    rng = random.Random(seed)
    prompts = [_sample_prompt(rng, words, templates, "ABBA" if i % 2 == 0 else "BABA", corruption)
               for i in range(n_prompts)]
    clean_ids, corrupt_ids = _tokenize_aligned(tokenizer, prompts, prepend_bos)
    names, pad = words.names, pad_id(tokenizer)
    return IOIBatch(
        name="ioi",
        clean_tokens=pad_right(clean_ids, pad),
        corrupt_tokens=pad_right(corrupt_ids, pad),
        end_pos=last_positions(clean_ids),
        prompts=[p.clean for p in prompts],
        corrupt_prompts=[p.corrupt for p in prompts],
        answer_tokens=torch.tensor([[names[p.io], names[p.s]] for p in prompts]),  # [batch, 2]: IO, S
        answers=[(" " + p.io, " " + p.s) for p in prompts],
        io_names=[p.io for p in prompts],
        s_names=[p.s for p in prompts],
        templates=[p.template for p in prompts],
        orders=[p.order for p in prompts],
        name_positions=torch.tensor([_positions(ids, names[p.io], names[p.s]) for ids, p in zip(clean_ids, prompts)]),
        split=split,
        corruption=corruption,
    )
