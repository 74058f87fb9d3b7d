"""The patching analyses for every role of a trio (original, control, ln_free), stamped with one manifest.

The same clean/corrupt tokens and metric are used for every role (the roles share a tokenizer).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from lnscope.analysis.loading import LoadedModel
from lnscope.analysis.patching.activation import activation_patching
from lnscope.analysis.patching.atp import attribution_patching
from lnscope.analysis.patching.fidelity import patching_fidelity, task_set_fidelity
from lnscope.analysis.patching.nodes import resolve_nodes
from lnscope.analysis.patching.results import ActPatchResult, AtPResult, FidelityResult, TaskSetFidelity, TrioResult
from lnscope.analysis.progress import Progress
from lnscope.analysis.results import make_manifest, run_per_role


def _per_role(kind: str, models: Mapping[str, LoadedModel], run: Callable[[LoadedModel, Any], Any],
              pair: str | None, options: dict, progress: Progress | None, seed: int | None = None) -> tuple[dict, Any]:
    if not models:
        raise ValueError("no models")
    roles = run_per_role(models, run, progress)
    manifest = make_manifest(kind, models, pair=pair, seed=seed, options=options)
    return roles, manifest


def attribution_patching_trio(models: Mapping[str, LoadedModel], clean: torch.Tensor, corrupt: torch.Tensor,
                              metric: Any, pair: str | None = None, nodes: Iterable[str] | None = None, *,
                              qk_fix: bool = True, normalize: bool = False,
                              progress: Progress | None = None) -> TrioResult[AtPResult]:
    """attribution_patching for every role."""
    nodes = resolve_nodes(nodes)
    roles, manifest = _per_role(
        "attribution_patching", models,
        lambda m, p: attribution_patching(m, clean, corrupt, metric, nodes, qk_fix=qk_fix, normalize=normalize, progress=p),
        pair, {"nodes": nodes, "qk_fix": qk_fix, "normalize": normalize}, progress)
    return TrioResult[AtPResult](kind="attribution_patching", roles=roles, manifest=manifest)


def activation_patching_trio(models: Mapping[str, LoadedModel], clean: torch.Tensor, corrupt: torch.Tensor,
                             metric: Any, pair: str | None = None, nodes: Iterable[str] | None = None, *,
                             chunk_size: int | None = None, normalize: bool = False,
                             progress: Progress | None = None) -> TrioResult[ActPatchResult]:
    """activation_patching for every role."""
    nodes = resolve_nodes(nodes)
    roles, manifest = _per_role(
        "activation_patching", models,
        lambda m, p: activation_patching(m, clean, corrupt, metric, nodes, chunk_size=chunk_size,
                                         normalize=normalize, progress=p),
        pair, {"nodes": nodes, "chunk_size": chunk_size, "normalize": normalize}, progress)
    return TrioResult[ActPatchResult](kind="activation_patching", roles=roles, manifest=manifest)


def patching_fidelity_trio(models: Mapping[str, LoadedModel], clean: torch.Tensor, corrupt: torch.Tensor,
                           metric: Any, pair: str | None = None, nodes: Iterable[str] | None = None, *,
                           qk_fix: bool = True, chunk_size: int | None = None, normalize: bool = False, top_k: int = 10,
                           progress: Progress | None = None) -> TrioResult[FidelityResult]:
    """patching_fidelity (AtP / AtP* vs activation patching) for every role, side by side."""
    nodes = resolve_nodes(nodes)
    roles, manifest = _per_role(
        "patching_fidelity", models,
        lambda m, p: patching_fidelity(m, clean, corrupt, metric, nodes, qk_fix=qk_fix, chunk_size=chunk_size,
                                       normalize=normalize, top_k=top_k, progress=p),
        pair, {"nodes": nodes, "qk_fix": qk_fix, "chunk_size": chunk_size, "normalize": normalize,
               "top_k": top_k}, progress)
    return TrioResult[FidelityResult](kind="patching_fidelity", roles=roles, manifest=manifest)


def task_set_fidelity_trio(models: Mapping[str, LoadedModel], groups: Sequence[Any], pair: str | None = None,
                           nodes: Iterable[str] | None = None, *, qk_fix: bool = True, chunk_size: int | None = None,
                           normalize: bool = False, top_k: int = 10, n_bootstrap: int = 1000, seed: int = 0,
                           keep_groups: bool = False, progress: Progress | None = None) -> TrioResult[TaskSetFidelity]:
    """task_set_fidelity (per-group statistics with bootstrap CIs, per-node CIs) for every role."""
    nodes = resolve_nodes(nodes)
    groups = list(groups)
    roles, manifest = _per_role(
        "task_set_fidelity", models,
        lambda m, p: task_set_fidelity(m, groups, nodes, qk_fix=qk_fix, chunk_size=chunk_size, normalize=normalize,
                                       top_k=top_k, n_bootstrap=n_bootstrap, seed=seed, keep_groups=keep_groups,
                                       progress=p),
        pair, {"nodes": nodes, "qk_fix": qk_fix, "chunk_size": chunk_size, "normalize": normalize, "top_k": top_k,
               "n_bootstrap": n_bootstrap, "n_groups": len(groups)}, progress, seed=seed)
    return TrioResult[TaskSetFidelity](kind="task_set_fidelity", roles=roles, manifest=manifest)
