"""How faithful AtP / AtP* are to activation patching, per node type, per model and over a task set.

Per node type (maps flattened over layer x grid, batch-mean effects of one prompt group):
- Pearson r and Spearman rho (Pearson of average ranks; ties share their mean rank);
- top-k recall: |top-k nodes by |activation| ∩ top-k by |attribution|| / k (k = 10 or fewer nodes);
- the LN-free paper's normalised absolute error: both maps divided by the activation-patching value at
  one reference cell (the cell with the largest |activation| effect), error = sum_nodes |act - attr| / |act[ref]|.
Over a task set (several prompt groups): each statistic per group, summarised by its mean over groups
with a 95% percentile-bootstrap CI over groups; per node, the mean effect over all prompts with a 95%
percentile-bootstrap CI over prompts (n_bootstrap resamples, fixed seed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from lnscope.analysis.patching.activation import act_patch_result, act_patch_tensors
from lnscope.analysis.patching.atp import atp_result, atp_tensors, role_of
from lnscope.analysis.patching.nodes import NODE_TYPES, MetricFn, metric_from
from lnscope.analysis.patching.results import (
    FidelityResult,
    FidelitySummary,
    Interval,
    NodeFidelity,
    NodeMap,
    NodeMapCI,
    TaskSetFidelity,
    finite_or_none,
)
from lnscope.analysis.progress import Progress, ensure

logger = logging.getLogger(__name__)

STATISTICS: tuple[str, ...] = ("pearson", "spearman", "top_k_recall", "normalized_error")


# --- statistics on two flat maps ------------------------------------------------------------------

def _flat(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def pearson(x: Any, y: Any) -> float | None:
    """sum (x - mean x)(y - mean y) / sqrt(sum (x - mean x)^2 sum (y - mean y)^2); None if either is constant."""
    x, y = _flat(x), _flat(y)
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    if denom == 0 or not np.isfinite(denom):
        return None
    return finite_or_none(float((dx * dy).sum() / denom))


def rankdata(x: Any) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span (scipy's 'average')."""
    x = _flat(x)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first occurrence
    return (first + (counts + 1) / 2.0)[inverse.ravel()]


def spearman(x: Any, y: Any) -> float | None:
    return pearson(rankdata(x), rankdata(y))


def _top(x: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-np.abs(x), kind="stable")[:k].tolist())


def top_k_recall(act: Any, attr: Any, k: int = 10) -> tuple[float, int]:
    """(fraction of the k largest-|act| nodes among the k largest-|attr| nodes, k used)."""
    a, b = _flat(act), _flat(attr)
    k = min(k, a.size)
    if k == 0:
        return float("nan"), 0
    return len(_top(a, k) & _top(b, k)) / k, k


def normalized_error(act: Any, attr: Any) -> tuple[float | None, int, float]:
    """(sum |act/act[ref] - attr/act[ref]|, ref flat index, act[ref]), ref = argmax |act|."""
    a, b = _flat(act), _flat(attr)
    ref = int(np.argmax(np.abs(a)))
    value = float(a[ref])
    if value == 0.0:
        return None, ref, value
    return finite_or_none(float(np.abs(a / value - b / value).sum())), ref, value


def node_fidelity(node_type: str, method: str, act: torch.Tensor, attr: torch.Tensor, top_k: int = 10) -> NodeFidelity:
    """All statistics for one node type; act and attr are maps of the same shape [layer, *grid]."""
    if tuple(act.shape) != tuple(attr.shape):
        raise ValueError(f"{node_type}: activation map {tuple(act.shape)} vs attribution map {tuple(attr.shape)}")
    recall, k = top_k_recall(act, attr, top_k)
    err, ref, ref_value = normalized_error(act, attr)
    return NodeFidelity(
        node_type=node_type, method=method, n_nodes=int(act.numel()), pearson=pearson(act, attr),
        spearman=spearman(act, attr), top_k=k, top_k_recall=recall, normalized_error=err,
        reference_index=[int(i) for i in np.unravel_index(ref, tuple(act.shape))], reference_value=ref_value,
    )


# --- one group ------------------------------------------------------------------------------------

@dataclass
class _GroupRun:
    name: str
    result: FidelityResult
    act: dict[str, torch.Tensor]  # per prompt [batch, layer, *grid], factor applied
    atp: dict[str, torch.Tensor]
    atp_star: dict[str, torch.Tensor]



def _run_group(model, clean, corrupt, metric_fn, nodes, *, qk_fix, chunk_size, normalize, top_k, progress, name=None):
    progress = ensure(progress)
    atp_t = atp_tensors(model, clean, corrupt, metric_fn, nodes, qk_fix=qk_fix,
                        progress=progress.span("", 0.0, 0.1))
    act_t = act_patch_tensors(model, clean, corrupt, metric_fn, atp_t.node_types, chunk_size=chunk_size,
                              progress=progress.span("", 0.1, 1.0))
    atp_res = atp_result(model, atp_t, qk_fix=qk_fix, normalize=normalize)
    act_res = act_patch_result(model, act_t, normalize=normalize)
    fids = []
    for n in atp_t.node_types:
        act_map = act_res.effects[n].tensor()
        fids.append(node_fidelity(n, "atp", act_map, atp_res.atp[n].tensor(), top_k))
        if n in atp_res.atp_star:
            fids.append(node_fidelity(n, "atp_star", act_map, atp_res.atp_star[n].tensor(), top_k))
    factor = 1.0 / act_res.metric.denominator if normalize else 1.0
    result = FidelityResult(role=role_of(model), group=name, fidelity=fids, atp=atp_res, activation=act_res)
    return _GroupRun(
        name or "group", result,
        {n: v * factor for n, v in act_t.per_prompt.items()},
        {n: v.cpu() * factor for n, v in atp_t.per_prompt.items()},
        {n: v.cpu() * factor for n, v in atp_t.star_per_prompt.items()},
    )


def patching_fidelity(
    model: Any,
    clean_tokens: torch.Tensor,
    corrupt_tokens: torch.Tensor,
    metric_fn: MetricFn | Any,
    nodes: Iterable[str] | None = None,
    *,
    qk_fix: bool = True,
    chunk_size: int | None = None,
    normalize: bool = False,
    top_k: int = 10,
    progress: Progress | None = None,
) -> FidelityResult:
    """AtP, AtP* and activation patching at the same nodes for one model and prompt group, side by side."""
    return _run_group(model, clean_tokens, corrupt_tokens, metric_from(metric_fn), nodes, qk_fix=qk_fix,
                      chunk_size=chunk_size, normalize=normalize, top_k=top_k, progress=progress).result


# --- task sets ------------------------------------------------------------------------------------

def as_group(item: Any, index: int) -> tuple[str, torch.Tensor, torch.Tensor, MetricFn]:
    """A prompt group from a task batch (clean_tokens, corrupt_tokens, metric[, name]), a dict with
    those keys, or a tuple (clean, corrupt, metric) / (name, clean, corrupt, metric)."""
    if hasattr(item, "clean_tokens"):
        return (str(getattr(item, "name", f"group{index}")) + f"#{index}", item.clean_tokens, item.corrupt_tokens,
                item.metric)
    if isinstance(item, dict):
        return (str(item.get("name", f"group{index}")), item["clean_tokens"], item["corrupt_tokens"],
                metric_from(item["metric"]))
    if isinstance(item, (tuple, list)) and len(item) == 3:
        return f"group{index}", item[0], item[1], metric_from(item[2])
    if isinstance(item, (tuple, list)) and len(item) == 4:
        return str(item[0]), item[1], item[2], metric_from(item[3])
    raise TypeError("a prompt group is a task batch, a dict, or (clean, corrupt, metric) / "
                    "(name, clean, corrupt, metric)")


def bootstrap_mean_ci(values: torch.Tensor, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95,
                      chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """values [n, *shape] -> (mean, lo, hi) [*shape]: percentile bootstrap of the mean over the n rows."""
    values = values.to(torch.float64)
    n = values.shape[0]
    flat = values.reshape(n, -1)
    mean = flat.mean(0)
    if n < 2 or n_bootstrap < 1:
        return mean.reshape(values.shape[1:]), mean.reshape(values.shape[1:]), mean.reshape(values.shape[1:])
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_bootstrap, n), generator=gen)
    counts = torch.zeros(n_bootstrap, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones_like(idx, dtype=torch.float64))
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    lo, hi = torch.empty_like(mean), torch.empty_like(mean)
    for s in range(0, flat.shape[1], chunk):
        boot = counts @ flat[:, s:s + chunk] / n  # [n_bootstrap, c]
        qs = torch.quantile(boot, q, dim=0)
        lo[s:s + chunk], hi[s:s + chunk] = qs[0], qs[1]
    shape = values.shape[1:]
    return mean.reshape(shape), lo.reshape(shape), hi.reshape(shape)


def _interval(values: Sequence[float | None], n_bootstrap: int, seed: int) -> Interval:
    kept = [v for v in values if v is not None]
    if not kept:
        return Interval(mean=None, lo=None, hi=None, n=0)
    mean, lo, hi = bootstrap_mean_ci(torch.tensor(kept, dtype=torch.float64)[:, None], n_bootstrap, seed)
    return Interval(mean=float(mean[0]), lo=float(lo[0]), hi=float(hi[0]), n=len(kept))


def task_set_fidelity(
    model: Any,
    groups: Sequence[Any],
    nodes: Iterable[str] | None = None,
    *,
    qk_fix: bool = True,
    chunk_size: int | None = None,
    normalize: bool = False,
    top_k: int = 10,
    n_bootstrap: int = 1000,
    seed: int = 0,
    keep_groups: bool = False,
    progress: Progress | None = None,
) -> TaskSetFidelity:
    """Fidelity over several prompt groups (e.g. the paper's 30 sets of 16 IOI prompts) for one model.

    Every group must have the same prompt length (per-node maps are pooled over prompts). With
    `normalize`, each group's effects are divided by that group's mean(clean) - mean(corrupt).
    """
    progress = ensure(progress)
    parsed = [as_group(g, i) for i, g in enumerate(groups)]
    if not parsed:
        raise ValueError("no prompt groups")
    lengths = {torch.as_tensor(g[1]).shape[-1] for g in parsed}
    if len(lengths) != 1:
        raise ValueError(f"all groups must have the same prompt length to pool per-node maps, got {sorted(lengths)}")
    runs: list[_GroupRun] = []
    for i, (name, clean, corrupt, metric) in enumerate(parsed):
        span = progress.span(f"{name}: ", i / len(parsed), (i + 1) / len(parsed))
        runs.append(_run_group(model, clean, corrupt, metric, nodes, qk_fix=qk_fix, chunk_size=chunk_size,
                               normalize=normalize, top_k=top_k, progress=span, name=name))
    node_types = runs[0].result.atp.node_types
    methods = [(n, m) for n in node_types for m in ("atp", "atp_star")
               if m == "atp" or n in runs[0].result.atp.atp_star]
    summaries = []
    for n, m in methods:
        for stat in STATISTICS:
            per_group = [getattr(r.result.get(n, m), stat) for r in runs]
            summaries.append(FidelitySummary(node_type=n, method=m, statistic=stat, per_group=per_group,
                                             interval=_interval(per_group, n_bootstrap, seed)))
    node_maps = []
    for n in node_types:
        axes = ["layer", *NODE_TYPES[n].axes]
        sources = [("activation", [r.act for r in runs]), ("atp", [r.atp for r in runs])]
        if n in runs[0].atp_star:
            sources.append(("atp_star", [r.atp_star for r in runs]))
        for method, per_run in sources:
            mean, lo, hi = bootstrap_mean_ci(torch.cat([d[n] for d in per_run]), n_bootstrap, seed)
            node_maps.append(NodeMapCI(node_type=n, method=method, mean=NodeMap.from_tensor(n, axes, mean),
                                       lo=NodeMap.from_tensor(n, axes, lo), hi=NodeMap.from_tensor(n, axes, hi)))
    progress.stage("task-set fidelity: done", 1.0)
    return TaskSetFidelity(
        role=role_of(model), groups=[r.name for r in runs], n_prompts=sum(r.result.atp.n_prompts for r in runs),
        n_bootstrap=n_bootstrap, seed=seed, summaries=summaries, node_maps=node_maps,
        per_group=[r.result for r in runs] if keep_groups else [],
    )
