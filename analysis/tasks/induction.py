"""Induction: a random token sequence r of length half_len, repeated: [BOS] r r.

With loss_t = -log p(token_t | tokens_<t), the per-prompt losses are

    first_half_loss  = mean of loss_t over the first copy's tokens r[1:]   (unpredictable)
    second_half_loss = mean of loss_t over the second copy's tokens r[1:]  (copyable)

(the first token of each copy is left out: nothing earlier predicts it). metric is the second
half loss, so LOWER is better (higher_is_better = False); accuracy is the fraction of the second
copy's tokens r[1:] that are the model's top-1 prediction. The corrupted prompt is [BOS] plus
2 * half_len fresh random tokens, with no repeat.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from lnscope.analysis.tasks.base import TaskBatch, bos_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_WORD_TOKEN = re.compile(r"^(?:Ġ|▁| )[A-Za-z]{2,}$")  # a space marker then letters


@dataclass(kw_only=True)
class InductionBatch(TaskBatch):
    """Repeated random tokens; the first copy starts at `first_pos`."""

    half_len: int = field(metadata={"shared": True})
    first_pos: int = field(default=1, metadata={"shared": True})

    metric_description: ClassVar[str] = (
        "mean cross-entropy loss (nats) on the second copy's tokens r[1:]; lower is better"
    )
    higher_is_better: ClassVar[bool] = False

    def _token_losses(self, logits: Float[Tensor, "batch pos vocab"], start: int) -> Tensor:
        """-log p of the tokens at positions start+1 .. start+half_len-1: [batch, half_len-1]."""
        pred = logits[:, start : start + self.half_len - 1].float().log_softmax(dim=-1)
        targets = self.clean_tokens[:, start + 1 : start + self.half_len].to(logits.device)
        return -pred.gather(-1, targets[..., None])[..., 0]

    def half_losses(self, logits: Float[Tensor, "batch pos vocab"]) -> tuple[Tensor, Tensor]:
        """(first_half_loss, second_half_loss), each Float[Tensor, "batch"]."""
        first = self._token_losses(logits, self.first_pos).mean(-1)
        second = self._token_losses(logits, self.first_pos + self.half_len).mean(-1)
        return first, second

    def metric(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        return self._token_losses(logits, self.first_pos + self.half_len).mean(-1)

    def per_prompt_accuracy(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        start = self.first_pos + self.half_len
        pred = logits[:, start : start + self.half_len - 1].argmax(-1)
        targets = self.clean_tokens[:, start + 1 : start + self.half_len].to(pred.device)
        return (pred == targets).float().mean(-1)

    def _describe_extra(self) -> dict[str, Any]:
        return {"half_len": self.half_len, "prepend_bos": self.first_pos == 1}


def word_token_pool(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of ordinary word tokens: a leading space then two or more letters, not special."""
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [
        i for i, piece in enumerate(pieces) if piece and i not in special and _WORD_TOKEN.match(piece)
    ]


def make_induction(
    tokenizer_or_vocab_size: PreTrainedTokenizerBase | int,
    n_prompts: int = 100,
    half_len: int = 25,
    seed: int = 0,
    prepend_bos: bool = True,
    bos_token_id: int | None = None,
) -> InductionBatch:
    """Repeated random sequences; from a tokenizer (word tokens) or a vocabulary size (any id).

    With a vocabulary size, tokens are drawn from 0..vocab_size-1 except `bos_token_id`, which
    must be given when prepend_bos is True.
    """
    if half_len < 2:
        raise ValueError("half_len must be at least 2")
    if n_prompts < 1:
        raise ValueError("n_prompts must be at least 1")
    tokenizer = None
    if isinstance(tokenizer_or_vocab_size, int):
        if prepend_bos and bos_token_id is None:
            raise ValueError("give bos_token_id when building from a vocabulary size (or prepend_bos=False)")
        pool = [i for i in range(tokenizer_or_vocab_size) if i != bos_token_id]
    else:
        tokenizer = tokenizer_or_vocab_size
        pool = word_token_pool(tokenizer)
        if prepend_bos:
            bos_token_id = bos_id(tokenizer) if bos_token_id is None else bos_token_id
    if len(pool) < 2 * half_len:
        raise ValueError(
            f"induction needs at least {2 * half_len} distinct ordinary tokens for half_len={half_len}; "
            f"found {len(pool)}"
        )
    rng = random.Random(seed)
    prefix = [int(bos_token_id)] if prepend_bos else []  # type: ignore[arg-type]
    clean, corrupt = [], []
    for _ in range(n_prompts):
        half = rng.sample(pool, half_len)
        clean.append(prefix + half + half)
        corrupt.append(prefix + rng.sample(pool, 2 * half_len))
    clean_t = torch.tensor(clean, dtype=torch.long)
    corrupt_t = torch.tensor(corrupt, dtype=torch.long)

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))

    return InductionBatch(
        name="induction",
        clean_tokens=clean_t,
        corrupt_tokens=corrupt_t,
        end_pos=torch.full((n_prompts,), clean_t.shape[1] - 1, dtype=torch.long),
        prompts=[text(ids) for ids in clean],
        corrupt_prompts=[text(ids) for ids in corrupt],
        half_len=half_len,
        first_pos=len(prefix),
    )
