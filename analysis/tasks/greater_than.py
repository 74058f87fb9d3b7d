"""Greater-than (Hanna et al. 2023).

"The war lasted from the year 1732 to the year 17" -> a two-digit suffix YY > 32. The prompt ends
with the century token(s); the model predicts the suffix as the next token. With p the softmax
over the full vocabulary at the last prompt token and YY ranging over the 100 suffix tokens
"00".."99":

    metric = sum_{YY > start} p(YY) - sum_{YY <= start} p(YY)      (in [-1, 1])

Accuracy: fraction of prompts with metric > 0. Corrupted prompt: the start year's suffix is "01"
(1701), which leaves almost every suffix "greater".

Tokenization. A year " 1732" must split into the century piece(s) of " 17" followed by one
suffix token "32" (GPT-2: " 17" + "32"). The builder checks this for every (century, suffix) and
keeps only the combinations that split so, in centuries where most years do. A byte-level BPE
trained on the synthetic corpus with GPT-2's pre-tokenizer alone learns whole-year tokens
(" 1732"), which breaks the task; analysis.tinymodel.tokenizer trains with digit runs cut into
pairs (Split(" ?\\d{2}") before ByteLevel) and re-ranks the merges so years split as above.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lnscope.analysis.tasks import vocab
from lnscope.analysis.tasks.base import (
    TaskBatch,
    encode,
    last_positions,
    pad_id,
    pad_right,
    single_token_id,
    tokenize_prompts,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)
CORRUPT_SUFFIX = 1  # "01"
N_SUFFIXES = 100
MIN_CENTURY_COVERAGE = 0.9  # fraction of a century's years that must split as century + suffix


@dataclass(kw_only=True)
class GreaterThanBatch(TaskBatch):
    """Greater-than prompts; start_suffix[i] is YY of the start year of prompt i."""

    start_suffix: Int[Tensor, " batch"]
    century: Int[Tensor, " batch"]
    suffix_token_ids: Int[Tensor, " 100"] = field(metadata={"shared": True})  # ids of "00".."99"
    templates: list[str] = field(default_factory=list)
    split: str = field(default="heldout", metadata={"shared": True})

    metric_description: ClassVar[str] = (
        "sum of p(YY > start) - sum of p(YY <= start) over the suffix tokens 00..99 "
        "(softmax over the full vocabulary at the last prompt token)"
    )

    def suffix_probs(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, "batch 100"]:
        """p(YY) for YY = 00..99 at end_pos."""
        probs = self.end_logits(logits).float().softmax(dim=-1)  # [batch, vocab]
        return probs[:, self.suffix_token_ids.to(probs.device)]

    def metric(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        probs = self.suffix_probs(logits)  # [batch, 100]
        years = torch.arange(N_SUFFIXES, device=probs.device)
        greater = years[None, :] > self.start_suffix.to(probs.device)[:, None]  # [batch, 100]
        return (probs * greater).sum(-1) - (probs * ~greater).sum(-1)

    def _describe_extra(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "n_templates": len(set(self.templates)),
            "centuries": sorted({int(c) for c in self.century.tolist()}),
        }


@dataclass(frozen=True)
class YearTokens:
    """How a tokenizer writes years: century pieces and suffix ids, and which years split well."""

    suffix_ids: list[int]  # id of "00".."99"
    century_ids: dict[int, list[int]]  # century -> ids of " CC"
    splits_well: dict[int, list[bool]]  # century -> [ " CCYY" == century ids + suffix id ]


def year_tokens(tokenizer: PreTrainedTokenizerBase) -> YearTokens:
    """Find the suffix and century token ids; raise a ValueError if the suffixes are not tokens."""
    suffix_ids, missing = [], []
    for yy in range(N_SUFFIXES):
        token = single_token_id(tokenizer, f"{yy:02d}")
        if token is None:
            missing.append(f"{yy:02d}")
        suffix_ids.append(-1 if token is None else token)
    if missing:
        raise ValueError(
            "greater-than needs every two-digit suffix '00'..'99' to be one token; not single tokens "
            f"with this tokenizer: {', '.join(missing)} (a byte-level BPE must be trained on text with "
            "four-digit years and digit runs split into pairs; see analysis.tasks.greater_than)"
        )
    century_ids, splits_well = {}, {}
    for century in vocab.CENTURIES:
        prefix = encode(tokenizer, f" {century}")
        century_ids[century] = prefix
        splits_well[century] = [
            encode(tokenizer, f" {century}{yy:02d}") == prefix + [suffix_ids[yy]]
            for yy in range(N_SUFFIXES)
        ]
    return YearTokens(suffix_ids=suffix_ids, century_ids=century_ids, splits_well=splits_well)


def usable_start_years(tokens: YearTokens, split: str) -> list[tuple[int, int]]:
    """(century, start suffix) combos of `split` whose start year and corrupt year split well,
    in centuries where at least MIN_CENTURY_COVERAGE of the 100 years split well (elsewhere the
    tokenizer writes many years as one token, and p(suffix | century) is not the model's answer;
    with GPT-2 this keeps 12..17, as Hanna et al. restrict to 11..17)."""
    return [
        (century, yy)
        for century, ok in tokens.splits_well.items()
        if ok[CORRUPT_SUFFIX] and sum(ok) >= MIN_CENTURY_COVERAGE * N_SUFFIXES
        for yy in range(vocab.MIN_START_SUFFIX, vocab.MAX_START_SUFFIX + 1)
        if ok[yy] and vocab.year_in_split(century, yy, split)
    ]


def _prompt(template: str, noun: str, century: int, yy: int) -> str:
    """The template up to the end year, which is replaced by its century: '... to the year 17'."""
    head = template.split("{Y2}")[0]
    return head.format(NOUN=noun, Y1=f"{century}{yy:02d}") + f"{century}"


def make_greater_than(
    tokenizer: PreTrainedTokenizerBase,
    n_prompts: int = 100,
    seed: int = 0,
    split: str = "heldout",
    prepend_bos: bool = True,
) -> GreaterThanBatch:
    """Greater-than prompts with start suffixes 02..98.

    split "heldout" uses only held-out templates and held-out (century, start suffix) combos,
    "train" only training ones, "all" any of them (see analysis.tasks.vocab).
    """
    vocab.check_split(split)
    if n_prompts < 1:
        raise ValueError("n_prompts must be at least 1")
    tokens = year_tokens(tokenizer)
    combos = usable_start_years(tokens, split)
    if not combos:
        example = encode(tokenizer, " 1732")
        pieces = tokenizer.convert_ids_to_tokens(example)
        raise ValueError(
            f"greater-than found no {split} start year that splits into a century token and a "
            f"two-digit suffix token (' 1732' -> {pieces}); tokenizers trained on the synthetic "
            "corpus need digit runs split into pairs before byte-level BPE (see "
            "lnscope.analysis.tasks.greater_than)"
        )
    logger.debug("greater-than: %d usable %s (century, start) combos", len(combos), split)
    templates = vocab.year_templates(split)
    rng = random.Random(seed)
    clean, corrupt, used, starts, centuries = [], [], [], [], []
    for _ in range(n_prompts):
        template = rng.choice(templates)
        noun = rng.choice(vocab.YEAR_NOUNS)
        century, yy = rng.choice(combos)
        clean.append(_prompt(template, noun, century, yy))
        corrupt.append(_prompt(template, noun, century, CORRUPT_SUFFIX))
        used.append(template)
        starts.append(yy)
        centuries.append(century)

    clean_ids = tokenize_prompts(tokenizer, clean, prepend_bos)
    corrupt_ids = tokenize_prompts(tokenizer, corrupt, prepend_bos)
    for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids)):
        tail = tokens.century_ids[centuries[i]]
        if len(a) != len(b) or a[-len(tail) :] != tail:
            raise ValueError(
                f"greater-than prompt {i + 1} does not tokenize as expected (clean and corrupt must "
                f"have the same length and end with the century tokens): {clean[i]!r}"
            )
    pad = pad_id(tokenizer)
    return GreaterThanBatch(
        name="greater_than",
        clean_tokens=pad_right(clean_ids, pad),
        corrupt_tokens=pad_right(corrupt_ids, pad),
        end_pos=last_positions(clean_ids),
        prompts=clean,
        corrupt_prompts=corrupt,
        start_suffix=torch.tensor(starts, dtype=torch.long),
        century=torch.tensor(centuries, dtype=torch.long),
        suffix_token_ids=torch.tensor(tokens.suffix_ids, dtype=torch.long),
        templates=used,
        split=split,
    )
