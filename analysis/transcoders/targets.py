"""Logit targets: which logits at the last position an attribution graph explains.

Each target is a direction d over the vocabulary and its input is d . logits[-1]:

- a token v: d = e_v - 1/V, the demeaned logit (circuit-tracer's target); by default the most likely
  tokens up to `desired_logit_prob` cumulative probability, at most `max_n_logits`, or given tokens;
- a logit difference (a, b): d = e_a - e_b, one target with circuit-tracer's virtual index V.
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import BaseModel, Field

from lnscope.analysis.loading import LoadedModel


class LogitTarget(BaseModel):
    token: str
    vocab_idx: int = Field(
        description="token id; vocab_size + i for a logit difference (circuit-tracer's virtual index)")
    probability: float = Field(description="softmax probability (for a logit difference: p(token) - p(other))")
    weight: float = Field(description="weight in influence computations (probability, or 1 for a difference)")
    value: float = Field(description="the target's input: the demeaned logit (or the logit difference)")
    other_token_id: int | None = None


def select_targets(model: LoadedModel, logits_last: torch.Tensor, *, target_tokens: Sequence[int] | None,
                   logit_diff: tuple[int, int] | None, max_n_logits: int,
                   desired_logit_prob: float) -> tuple[list[LogitTarget], torch.Tensor]:
    """(targets, directions [n_targets, vocab] float64) for `logits_last` [vocab]: direction . logits = input."""
    if logit_diff is not None:
        return _logit_diff_target(model, logits_last, logit_diff)
    V = logits_last.shape[-1]
    probs = torch.softmax(logits_last.double(), -1)
    demeaned = logits_last.double() - logits_last.double().mean()
    if target_tokens is not None:
        idx = torch.tensor([int(v) for v in target_tokens], dtype=torch.long)
        if (idx < 0).any() or (idx >= V).any():
            raise ValueError(f"target token ids must be in [0, {V})")
    else:
        idx = _most_likely(probs, max_n_logits, desired_logit_prob)
    directions = torch.full((len(idx), V), -1.0 / V, dtype=torch.float64)
    directions[torch.arange(len(idx)), idx] += 1.0
    decode = model.tokenizer.decode
    targets = [LogitTarget(token=decode([int(i)]), vocab_idx=int(i), probability=float(probs[i]),
                           weight=float(probs[i]), value=float(demeaned[i])) for i in idx]
    return targets, directions


def _most_likely(probs: torch.Tensor, max_n_logits: int, desired_logit_prob: float) -> torch.Tensor:
    """Token ids [n] of the top probabilities up to the first that brings the total to `desired_logit_prob`."""
    top_p, top_i = probs.topk(min(max_n_logits, probs.shape[-1]))
    cumulative = torch.cumsum(top_p, 0)
    cutoff = int(torch.searchsorted(cumulative, torch.tensor(desired_logit_prob, dtype=torch.float64))) + 1
    return top_i[:cutoff]


def _logit_diff_target(model: LoadedModel, logits_last: torch.Tensor,
                       logit_diff: tuple[int, int]) -> tuple[list[LogitTarget], torch.Tensor]:
    """One target logit[a] - logit[b], weight 1, at the virtual vocabulary index V."""
    V = logits_last.shape[-1]
    probs = torch.softmax(logits_last.double(), -1)
    a, b = (int(v) for v in logit_diff)
    direction = torch.zeros(V, dtype=torch.float64)
    direction[a], direction[b] = 1.0, -1.0
    decode = model.tokenizer.decode
    target = LogitTarget(token=f"{decode([a])} - {decode([b])}", vocab_idx=V, probability=float(probs[a] - probs[b]),
                         weight=1.0, value=float(logits_last[a].double() - logits_last[b].double()), other_token_id=b)
    return [target], direction[None]
