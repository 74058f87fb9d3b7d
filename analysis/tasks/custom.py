"""Custom prompt pairs: {"clean", "corrupt", "correct", "wrong"} each.

Metric: logit(correct) - logit(wrong) at the last clean token. Answers are used as given (write
" Paris" with its leading space) and must be single tokens; clean and corrupt must tokenize to
the same length so they can be patched position by position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from lnscope.analysis.tasks.base import (
    LogitDiffBatch,
    encode,
    last_positions,
    pad_id,
    pad_right,
    tokenize_prompts,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PAIR_FIELDS: tuple[str, ...] = ("clean", "corrupt", "correct", "wrong")


@dataclass(kw_only=True)
class CustomBatch(LogitDiffBatch):
    """User prompt pairs; answer_tokens[:, 0] is the correct answer, [:, 1] the wrong one."""

    metric_description: ClassVar[str] = "logit(correct) - logit(wrong) at the last prompt token"


def _answer_id(tokenizer: PreTrainedTokenizerBase, text: str, index: int, key: str) -> int:
    """The one token id of an answer; `index` numbers the pair from 1, as messages do."""
    ids = encode(tokenizer, text)
    if len(ids) != 1:
        raise ValueError(
            f"pair {index}: {key!r} ({text!r}) is {len(ids)} tokens; it must be exactly one token"
        )
    return ids[0]


def validate_pairs(pairs: Sequence[Mapping[str, str]]) -> None:
    """Raise a ValueError naming the pair index and field that is missing or not a string."""
    if not pairs:
        raise ValueError("custom task needs at least one pair")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, Mapping):
            raise ValueError(f"pair {i + 1}: expected an object with fields {', '.join(PAIR_FIELDS)}")
        for key in PAIR_FIELDS:
            if key not in pair:
                raise ValueError(f"pair {i + 1}: missing field {key!r}")
            if not isinstance(pair[key], str) or not pair[key]:
                raise ValueError(f"pair {i + 1}: field {key!r} must be a non-empty string")


def make_custom(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Mapping[str, str]],
    prepend_bos: bool = True,
    name: str = "custom",
) -> CustomBatch:
    """A logit-difference task from user pairs (see module docstring for the rules)."""
    validate_pairs(pairs)
    clean = [p["clean"] for p in pairs]
    corrupt = [p["corrupt"] for p in pairs]
    clean_ids = tokenize_prompts(tokenizer, clean, prepend_bos)
    corrupt_ids = tokenize_prompts(tokenizer, corrupt, prepend_bos)
    answers = []
    for i, pair in enumerate(pairs):
        if len(clean_ids[i]) != len(corrupt_ids[i]):
            raise ValueError(
                f"pair {i + 1}: 'clean' and 'corrupt' must tokenize to the same length; got "
                f"{len(clean_ids[i])} and {len(corrupt_ids[i])} tokens"
            )
        answers.append(
            [
                _answer_id(tokenizer, pair["correct"], i + 1, "correct"),
                _answer_id(tokenizer, pair["wrong"], i + 1, "wrong"),
            ]
        )
    pad = pad_id(tokenizer)
    return CustomBatch(
        name=name,
        clean_tokens=pad_right(clean_ids, pad),
        corrupt_tokens=pad_right(corrupt_ids, pad),
        end_pos=last_positions(clean_ids),
        prompts=clean,
        corrupt_prompts=corrupt,
        answer_tokens=torch.tensor(answers, dtype=torch.long),
        answers=[(p["correct"], p["wrong"]) for p in pairs],
    )
