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
    names = single_token_words(tokenizer, vocab.NAMES)
    places = single_token_words(tokenizer, vocab.PLACES)
    objects = single_token_words(tokenizer, vocab.OBJECTS)
    require_words(names, vocab.NAMES, 5, "names", "IOI")
    require_words(places, vocab.PLACES, 1, "places", "IOI")
    require_words(objects, vocab.OBJECTS, 1, "objects", "IOI")
    name_list = sorted(names)
    pairs = [p for p in itertools.combinations(name_list, 2) if vocab.pair_in_split(*p, split)]
    if not pairs:
        raise ValueError(f"no {split} name pair has both names as single tokens for this tokenizer")
    logger.debug(
        "IOI: %d/%d names, %d/%d places, %d/%d objects are single tokens; %d %s pairs",
        len(names), len(vocab.NAMES), len(places), len(vocab.PLACES), len(objects),
        len(vocab.OBJECTS), len(pairs), split,
    )  # fmt: skip
    templates = vocab.ioi_templates(split)
    place_list, object_list = sorted(places), sorted(objects)

    rng = random.Random(seed)
    clean, corrupt, io_names, s_names, used, orders = [], [], [], [], [], []
    for i in range(n_prompts):
        template = rng.choice(templates)
        io, s = rng.sample(rng.choice(pairs), 2)
        order = "ABBA" if i % 2 == 0 else "BABA"
        n1, n2 = (io, s) if order == "ABBA" else (s, io)
        place, obj = rng.choice(place_list), rng.choice(object_list)
        clean.append(template.format(N1=n1, N2=n2, S2=s, PLACE=place, OBJECT=obj))
        if corruption == "abc":
            x, y, z = rng.sample([n for n in name_list if n not in (io, s)], 3)
        else:
            x, y, z = n1, n2, io
        corrupt.append(template.format(N1=x, N2=y, S2=z, PLACE=place, OBJECT=obj))
        io_names.append(io)
        s_names.append(s)
        used.append(template)
        orders.append(order)

    clean_ids = tokenize_prompts(tokenizer, clean, prepend_bos)
    corrupt_ids = tokenize_prompts(tokenizer, corrupt, prepend_bos)
    for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids)):
        if len(a) != len(b):  # names are single tokens, so this means a tokenizer surprise
            raise ValueError(f"IOI prompt {i}: clean and corrupt differ in length: {clean[i]!r}")
    answers = torch.tensor([[names[io], names[s]] for io, s in zip(io_names, s_names)])
    positions = torch.tensor(
        [_positions(ids, names[io], names[s]) for ids, io, s in zip(clean_ids, io_names, s_names)]
    )
    pad = pad_id(tokenizer)
    return IOIBatch(
        name="ioi",
        clean_tokens=pad_right(clean_ids, pad),
        corrupt_tokens=pad_right(corrupt_ids, pad),
        end_pos=last_positions(clean_ids),
        prompts=clean,
        corrupt_prompts=corrupt,
        answer_tokens=answers,
        answers=[(" " + io, " " + s) for io, s in zip(io_names, s_names)],
        io_names=io_names,
        s_names=s_names,
        templates=used,
        orders=orders,
        name_positions=positions,
        split=split,
        corruption=corruption,
    )
