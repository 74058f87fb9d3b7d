"""TaskBatch: a batch of clean/corrupt prompts and the per-prompt metric read from a model's logits.

Prompts are right-padded with the tokenizer's pad (else eos) id so prompts of different lengths
share a batch; a causal model's logits at positions <= end_pos do not see the padding.
Clean and corrupt prompts are token-aligned (same length, same end_pos) for activation patching.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

B = TypeVar("B", bound="TaskBatch")

@dataclass(kw_only=True)
class TaskBatch:
    """Clean and corrupt prompts of one task; subclasses define the metric.

    Every tensor or list field is per prompt (first dimension = batch) unless its field metadata
    says `shared`.
    """

    name: str
    clean_tokens: Int[Tensor, "batch pos"]
    corrupt_tokens: Int[Tensor, "batch pos"]
    end_pos: Int[Tensor, " batch"]  # position whose logits the metric reads
    prompts: list[str]
    corrupt_prompts: list[str]
    answer_tokens: Int[Tensor, "batch 2"] | None = None

    metric_description: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True

    def __post_init__(self) -> None:
        n = self.clean_tokens.shape[0]
        if self.corrupt_tokens.shape != self.clean_tokens.shape:
            raise ValueError(
                f"clean tokens {tuple(self.clean_tokens.shape)} and corrupt tokens "
                f"{tuple(self.corrupt_tokens.shape)} must have the same shape"
            )
        if self.end_pos.shape != (n,) or len(self.prompts) != n or len(self.corrupt_prompts) != n:
            raise ValueError("end_pos, prompts and corrupt_prompts need one entry per prompt")

    def __len__(self) -> int:
        return int(self.clean_tokens.shape[0])

    # --- metric ----------------------------------------------------------------------------

    def metric(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        """Per-prompt metric, differentiable in `logits`."""
        raise NotImplementedError

    def per_prompt_accuracy(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        """Per-prompt accuracy in [0, 1] (1.0 or 0.0 where a prompt is right or wrong)."""
        return (self.metric(logits) > 0).float()

    def accuracy(self, logits: Float[Tensor, "batch pos vocab"]) -> float:
        """Mean of per_prompt_accuracy."""
        with torch.no_grad():
            return float(self.per_prompt_accuracy(logits).mean().item())

    def end_logits(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, "batch vocab"]:
        """logits[i, end_pos[i], :] for every prompt i."""
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, self.end_pos.to(logits.device)]

    # --- plumbing --------------------------------------------------------------------------

    def to(self: B, device: torch.device | str) -> B:
        """A copy with every tensor on `device`."""
        changes = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **changes)

    def subset(self: B, index: slice | Sequence[int] | Tensor) -> B:
        """The prompts selected by `index` (a slice or a list/tensor of prompt indices)."""
        rows = list(range(len(self)))[index] if isinstance(index, slice) else [int(i) for i in index]
        row_tensor = torch.tensor(rows, dtype=torch.long)
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("shared"):
                continue
            if isinstance(value, Tensor):
                changes[f.name] = value[row_tensor.to(value.device)]
            elif isinstance(value, list):
                changes[f.name] = [value[i] for i in rows]
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: size, metric and a few example prompts."""
        examples = [
            {"clean": c, "corrupt": k} for c, k in zip(self.prompts[:3], self.corrupt_prompts[:3])
        ]
        return {
            "name": self.name,
            "n_prompts": len(self),
            "seq_len": int(self.clean_tokens.shape[1]),
            "metric": self.metric_description,
            "higher_is_better": self.higher_is_better,
            "examples": examples,
            **self._describe_extra(),
        }

    def _describe_extra(self) -> dict[str, Any]:
        return {}


@dataclass(kw_only=True)
class LogitDiffBatch(TaskBatch):
    """Metric: logit(answer_tokens[:, 0]) - logit(answer_tokens[:, 1]) at end_pos."""

    answer_tokens: Int[Tensor, "batch 2"]
    answers: list[tuple[str, str]] = field(default_factory=list)  # (correct, wrong) strings

    metric_description: ClassVar[str] = "logit(correct) - logit(wrong) at the last prompt token"

    def metric(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        end = self.end_logits(logits)  # [batch, vocab]
        answers = self.answer_tokens.to(end.device)
        picked = end.gather(1, answers)  # [batch, 2]
        return picked[:, 0] - picked[:, 1]


# --- tokenizer helpers -------------------------------------------------------------------------


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text`, without any special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def single_token_id(tokenizer: PreTrainedTokenizerBase, text: str) -> int | None:
    """The id of `text` if it is exactly one token (and not the unknown token), else None."""
    ids = encode(tokenizer, text)
    if len(ids) != 1:
        return None
    if ids[0] == tokenizer.unk_token_id and text != tokenizer.unk_token:
        return None
    return ids[0]


def single_token_words(
    tokenizer: PreTrainedTokenizerBase, words: Sequence[str], prefix: str = " "
) -> dict[str, int]:
    """word -> id of `prefix + word` for the words that are one token with that prefix."""
    out = {}
    for word in words:
        token = single_token_id(tokenizer, prefix + word)
        if token is not None:
            out[word] = token
    return out


def require_words(
    kept: dict[str, int], wanted: Sequence[str], minimum: int, what: str, task: str
) -> None:
    """Raise a ValueError naming the missing words if fewer than `minimum` are single tokens."""
    if len(kept) < minimum:
        missing = [w for w in wanted if w not in kept]
        shown = ", ".join(repr(" " + w) for w in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise ValueError(
            f"{task} needs at least {minimum} {what} that are a single token with a leading space; "
            f"this tokenizer has {len(kept)} of {len(wanted)} (not single tokens: {shown})"
        )


def bos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.bos_token_id is None:
        raise ValueError("prepend_bos=True but the tokenizer has no bos_token_id")
    return int(tokenizer.bos_token_id)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its eos id, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], prepend_bos: bool
) -> list[list[int]]:
    """Token ids of each text, with the BOS id first when `prepend_bos`."""
    prefix = [bos_id(tokenizer)] if prepend_bos else []
    return [prefix + encode(tokenizer, text) for text in texts]


def pad_right(seqs: Sequence[Sequence[int]], pad: int) -> Int[Tensor, "batch pos"]:
    """Right-pad token lists with `pad` into a LongTensor."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, seq in enumerate(seqs):
        out[i, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
    return out


def last_positions(seqs: Sequence[Sequence[int]]) -> Int[Tensor, " batch"]:
    return torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)
