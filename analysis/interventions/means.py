"""Mean activations for mean ablation, over the pair's eval text, computed once per (model, text, hook).

    mean[hook] = (1 / T) * sum over every real token t of every chunk of act[hook](t)     (float64)

The chunks are `ln_stats.text_sequences` of the text: BOS + up to n_ctx - 1 tokens each, at most
MEAN_TOKENS predicted tokens in all; every real position, BOS included, counts once (T tokens).
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Sequence

import torch

from lnscope.analysis.ln_stats import text_sequences
from lnscope.analysis.loading import LoadedModel

MEAN_TOKENS = 4096  # predicted tokens of eval text the means are taken over
BATCH_ROWS = 8

_means: "weakref.WeakKeyDictionary[object, dict[tuple[str, str], torch.Tensor]]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def mean_chunks(tokenizer, texts: Sequence[str], n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The text as BOS-prefixed chunks, right-padded: (tokens [chunk, pos], lengths [chunk])."""
    seqs = text_sequences(tokenizer, texts, n_ctx, max_tokens=MEAN_TOKENS)
    if not seqs:
        raise ValueError("the eval text has fewer than two tokens: no mean to ablate to")
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    return tokens, torch.tensor([len(s) for s in seqs])


@torch.no_grad()
def compute_means(model: LoadedModel, hooks: Sequence[str], tokens: torch.Tensor,
                  lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """mean over the real positions of tokens [chunk, pos] of each hook's activation [*rest], float64."""
    totals: dict[str, torch.Tensor] = {}
    count = 0
    for start in range(0, tokens.shape[0], BATCH_ROWS):
        toks, lens = tokens[start:start + BATCH_ROWS], lengths[start:start + BATCH_ROWS]
        real = (torch.arange(toks.shape[1])[None] < lens[:, None]).to(model.device)  # [b, pos]
        _, cache = model.bridge.run_with_cache(toks.to(model.device), names_filter=list(hooks))
        for hook in hooks:
            part = cache[hook][real].to(torch.float64).sum(0)  # [*rest]
            totals[hook] = part if hook not in totals else totals[hook] + part
        count += int(lens.sum())
    return {hook: total / count for hook, total in totals.items()}


def cached_means(model: LoadedModel, hooks: Sequence[str], texts: Callable[[], Sequence[str]], text_key: str,
                 n_ctx: int) -> dict[str, torch.Tensor]:
    """`compute_means` of the hooks not yet cached for this model and text (`texts()`, read only then, named by
    `text_key`); every hook's mean [*rest]."""
    hooks = list(dict.fromkeys(hooks))
    with _lock:
        known = _means.setdefault(model.bridge, {})
        missing = [h for h in hooks if (text_key, h) not in known]
    if missing:
        tokens, lengths = mean_chunks(model.tokenizer, texts(), n_ctx)
        fresh = compute_means(model, missing, tokens, lengths)
        with _lock:
            known.update({(text_key, h): m for h, m in fresh.items()})
    return {h: known[(text_key, h)] for h in hooks}
