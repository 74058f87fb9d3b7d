"""Run resolved edits on one model: clean run, every edit together, each edit alone, and the linear predictions.

Metric m = logit(a) - logit(b) (or logit(a)) at each prompt's end position. Each edit alone changes its
direct write w into the residual stream by dw (read at the metric's position, upstream of the edit clean);
its linear prediction is the cached-scale DLA of dw: (dw - mean(dw)) . d / s with d = W_U[:, a] - W_U[:, b]
and s the clean ln_final scale, or dw . d in an LN-free model, where it is exact for a direct-path edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lnscope.analysis.dla import DLATarget
from lnscope.analysis.interventions.results import EditEffect, PromptOutcome, RoleIntervention, TokenProb
from lnscope.analysis.interventions.sites import Batch, Hook, Resolved, Sources
from lnscope.analysis.loading import LoadedModel
from lnscope.analysis.progress import Progress, ensure

SCALE_HOOK = "ln_final.hook_scale"


@dataclass
class Prompts:
    """The prompts of a request: tokens [batch, pos] (right-padded), end [batch] (the metric's position)."""

    tokens: torch.Tensor
    end: torch.Tensor
    corrupt: torch.Tensor | None = None  # [batch, pos]: the task's corrupt prompts (resample ablation)

    def batch(self) -> Batch:
        return Batch(rows=torch.arange(self.tokens.shape[0]), width=self.tokens.shape[1])


@dataclass
class Readout:
    """What one forward pass gave at the metric positions: logits [b, vocab] and captured activations [b, ...]."""

    logits: torch.Tensor
    acts: dict[str, torch.Tensor]


def edit_hooks(edits: Sequence[Resolved], batch: Batch, sources: Sources, device: torch.device) -> list[Hook]:
    return [hook for e in edits for hook in e.hooks(batch, sources, device)]


def run_at_end(model: LoadedModel, prompts: Prompts, hooks: list[Hook], capture: Sequence[str]) -> Readout:
    """One forward pass with `hooks`, then `capture` read at each prompt's end position (after the hooks)."""
    rows = torch.arange(prompts.tokens.shape[0], device=model.device)
    end = prompts.end.to(model.device)
    acts: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        def keep(act, hook):
            acts[name] = act[rows, end].detach().to("cpu", torch.float64)  # [b, ...]
            return act

        return keep

    logits = model.bridge.run_with_hooks(prompts.tokens.to(model.device),
                                         fwd_hooks=hooks + [(n, keeper(n)) for n in dict.fromkeys(capture)])
    return Readout(logits=logits[rows, end].detach().to("cpu", torch.float64), acts=acts)


@torch.no_grad()
def corrupt_activations(model: LoadedModel, corrupt: torch.Tensor, hooks: Sequence[str]) -> dict[str, torch.Tensor]:
    """The corrupt prompts' activations [batch, pos, *rest] at each hook (resample ablation)."""
    if not hooks:
        return {}
    _, cache = model.bridge.run_with_cache(corrupt.to(model.device), names_filter=list(dict.fromkeys(hooks)))
    return {h: cache[h].detach() for h in dict.fromkeys(hooks)}


def metric(logits: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None) -> torch.Tensor:
    """logit(a) - logit(b) (no b: logit(a)) of logits [b, vocab]: [b]."""
    value = logits.gather(1, pos[:, None])[:, 0]
    return value - (logits.gather(1, neg[:, None])[:, 0] if neg is not None else 0)


def target_direction(model: LoadedModel, pos: torch.Tensor, neg: torch.Tensor | None) -> torch.Tensor:
    """d [b, d_model] float64 = W_U[:, a] - W_U[:, b] (no b: W_U[:, a])."""
    W_U = model.bridge.W_U.detach()
    d = W_U[:, pos.to(W_U.device)].T.to("cpu", torch.float64)
    return d - (W_U[:, neg.to(W_U.device)].T.to("cpu", torch.float64) if neg is not None else 0)


def linear_prediction(dw: torch.Tensor, d: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Cached-scale DLA of a write change dw [b, d_model]: (dw - mean(dw)) . d / s, or dw . d without LN: [b]."""
    if scale is None:
        return (dw * d).sum(-1)
    return ((dw - dw.mean(-1, keepdim=True)) * d).sum(-1) / scale


def top_tokens(probs: torch.Tensor, k: int, tokenizer) -> list[TokenProb]:
    """The k most likely tokens of probs [vocab]."""
    values, ids = probs.topk(min(k, probs.numel()))
    return [TokenProb(token_id=int(i), token=tokenizer.decode([int(i)]), prob=float(v))
            for v, i in zip(values.tolist(), ids.tolist())]


@torch.no_grad()
def greedy_continuation(model: LoadedModel, prompts: Prompts, row: int, n_tokens: int,
                        edits: Sequence[Resolved], sources: Sources) -> str:
    """Prompt `row` (up to its end position) continued greedily by n_tokens, with `edits` at every step; decoded."""
    seq = prompts.tokens[row, : int(prompts.end[row]) + 1].tolist()
    start = len(seq)
    for _ in range(n_tokens):
        batch = Batch(rows=torch.tensor([row]), width=len(seq))
        hooks = edit_hooks(edits, batch, sources, model.device)
        logits = model.bridge.run_with_hooks(torch.tensor([seq], device=model.device), fwd_hooks=hooks)
        seq.append(int(logits[0, -1].argmax()))
    return model.tokenizer.decode(seq[start:])


def _outcome(clean: torch.Tensor, edited: torch.Tensor, m_clean: float, m_edited: float, end: int, k: int,
             tokenizer) -> PromptOutcome:
    """One prompt's distributions from its logits [vocab] clean and edited."""
    lp, lq = clean.log_softmax(-1), edited.log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    return PromptOutcome(
        end_pos=end, clean_top=top_tokens(p, k, tokenizer), intervened_top=top_tokens(q, k, tokenizer),
        kl=float((p * (lp - lq)).sum()), entropy_clean=float(-(p * lp).sum()),
        entropy_intervened=float(-(q * lq).sum()),
        metric_clean=m_clean, metric_intervened=m_edited, metric_change=m_edited - m_clean)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _effect(e: Resolved, actual: torch.Tensor, predicted: torch.Tensor, feature: int | None,
            cos: float | None) -> EditEffect:
    gap = actual - predicted
    return EditEffect(index=e.index, label=e.label, applied=True, feature=feature, match_cos=cos,
                      actual=actual.tolist(), predicted=predicted.tolist(), prediction_gap=gap.tolist(),
                      mean_actual=float(actual.mean()), mean_predicted=float(predicted.mean()),
                      mean_gap=float(gap.mean()))


def unapplied(index: int, label: str, n_prompts: int, feature: int | None = None) -> EditEffect:
    """An edit with no counterpart in this role (an unmatched feature): no change, no prediction."""
    zeros = [0.0] * n_prompts
    return EditEffect(index=index, label=label, applied=False, feature=feature, actual=zeros, predicted=zeros,
                      prediction_gap=zeros, mean_actual=0.0, mean_predicted=0.0, mean_gap=0.0)


@torch.no_grad()
def intervene(model: LoadedModel, prompts: Prompts, target: DLATarget, edits: Sequence[Resolved], *,
              sources: Sources, skipped: Sequence[EditEffect] = (), features: dict[int, tuple[int, float | None]]
              | None = None, top_k: int = 10, continuation_tokens: int = 0,
              progress: Progress | None = None) -> RoleIntervention:
    """Every edit together and each alone on `prompts`, against the clean run, with linear predictions.

    `skipped`: effects of edits with no counterpart in this model; `features`: edit index -> (feature, cos).
    Forward passes: clean, all edits (when more than one), one per edit, plus 2 x continuation_tokens per prompt.
    """
    progress = ensure(progress)
    features = features or {}
    batch = prompts.batch()
    pos, neg = target.token_pairs(prompts.tokens.shape[0])  # [b], [b] | None
    has_ln = SCALE_HOOK in model.bridge.hook_dict
    writes = [e.write_hook for e in edits]
    progress.stage("intervene: clean", 0.0)
    clean = run_at_end(model, prompts, [], writes + ([SCALE_HOOK] if has_ln else []))
    scale = clean.acts[SCALE_HOOK][:, 0] if has_ln else None  # [b]
    direction = target_direction(model, pos, neg)  # [b, d_model]
    m_clean = metric(clean.logits, pos, neg)  # [b]

    effects = list(skipped)
    alone_logits = None
    for j, e in enumerate(edits):
        progress.stage("intervene: each edit alone", j / max(len(edits), 1))
        run = run_at_end(model, prompts, e.hooks(batch, sources, model.device), [e.write_hook])
        dw = e.to_resid(run.acts[e.write_hook]) - e.to_resid(clean.acts[e.write_hook])  # [b, d_model]
        feature, cos = features.get(e.index, (None, None))
        effects.append(_effect(e, metric(run.logits, pos, neg) - m_clean, linear_prediction(dw, direction, scale),
                               feature, cos))
        alone_logits = run.logits
    effects.sort(key=lambda x: x.index)

    progress.stage("intervene: all edits", 0.0)
    if len(edits) == 1:
        edited = alone_logits
    elif edits:
        edited = run_at_end(model, prompts, edit_hooks(edits, batch, sources, model.device), []).logits
    else:
        edited = clean.logits
    m_edited = metric(edited, pos, neg)
    outcomes = [_outcome(clean.logits[i], edited[i], float(m_clean[i]), float(m_edited[i]), int(prompts.end[i]),
                         top_k, model.tokenizer) for i in range(len(m_clean))]
    if continuation_tokens > 0:
        for i, outcome in enumerate(outcomes):
            progress.stage("intervene: continuations", i / len(outcomes))
            outcome.continuation_clean = greedy_continuation(model, prompts, i, continuation_tokens, [], sources)
            outcome.continuation_intervened = greedy_continuation(model, prompts, i, continuation_tokens, edits,
                                                                  sources)
    progress.stage("intervene: done", 1.0)
    return RoleIntervention(
        role=model.role, has_ln=has_ln, target=target, n_prompts=len(outcomes), prompts=outcomes, edits=effects,
        mean_metric_clean=_mean([o.metric_clean for o in outcomes]),
        mean_metric_intervened=_mean([o.metric_intervened for o in outcomes]),
        mean_metric_change=_mean([o.metric_change for o in outcomes]), mean_kl=_mean([o.kl for o in outcomes]))
