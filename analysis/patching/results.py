"""Typed, JSON-serialisable results of attribution patching, activation patching and their fidelity."""

from __future__ import annotations

import math
from typing import Any, Generic, Optional, TypeVar

import torch
from pydantic import BaseModel, Field

from lnscope.analysis.patching.nodes import axis_labels
from lnscope.analysis.results import Manifest

R = TypeVar("R")


class NodeMap(BaseModel):
    """One value per node of a node type: `values` is a nested list shaped `shape` along `axes`."""

    node_type: str
    axes: list[str] = Field(examples=[["layer", "pos"]])
    shape: list[int]
    values: list[Any] = Field(description="nested lists of floats, shaped `shape`")
    axis_labels: dict[str, list[str]] = Field(default_factory=dict, description="axis -> label per index")

    @classmethod
    def from_tensor(cls, node_type: str, axes: list[str], tensor: torch.Tensor) -> "NodeMap":
        t = tensor.detach().to("cpu", torch.float64)
        return cls(node_type=node_type, axes=list(axes), shape=list(t.shape), values=t.tolist(),
                   axis_labels=axis_labels(axes, t.shape))

    def tensor(self) -> torch.Tensor:
        """The values as a float64 tensor shaped `shape`."""
        return torch.tensor(self.values, dtype=torch.float64).reshape(self.shape)


class MetricSummary(BaseModel):
    """Metric values of the unpatched runs (per prompt and the batch mean)."""

    clean: float = Field(description="mean over prompts of metric(clean run)")
    corrupt: float = Field(description="mean over prompts of metric(corrupt run)")
    clean_per_prompt: list[float]
    corrupt_per_prompt: list[float]
    normalized: bool = Field(description="effects divided by (clean - corrupt) (batch means) if true")
    denominator: float = Field(description="clean - corrupt (the normalising gap)")

    @classmethod
    def build(cls, clean: torch.Tensor, corrupt: torch.Tensor, normalize: bool) -> tuple["MetricSummary", float]:
        """The summary and the factor effects are multiplied by: 1, or 1 / (clean - corrupt) if normalising."""
        c, k = float(clean.double().mean()), float(corrupt.double().mean())
        gap = c - k
        if normalize and gap == 0.0:
            raise ValueError("normalize=True but the clean and corrupt metrics are equal (gap 0)")
        summary = cls(clean=c, corrupt=k, clean_per_prompt=clean.double().tolist(),
                      corrupt_per_prompt=corrupt.double().tolist(), normalized=normalize, denominator=gap)
        return summary, (1.0 / gap if normalize else 1.0)


class AtPResult(BaseModel):
    """Attribution patching (denoising): effect(node) ~= grad_corrupt(metric) . (a_clean - a_corrupt).

    `atp[type]` is the batch-mean estimate per node; `atp_star[type]` the AtP* (QK fix) estimate for
    the types in QK_FIX_NODES (see analysis.patching.atp for exactly what is computed).
    """

    role: str
    node_types: list[str]
    n_prompts: int
    n_pos: int
    qk_fix: bool
    metric: MetricSummary
    atp: dict[str, NodeMap]
    atp_star: dict[str, NodeMap] = Field(default_factory=dict)


class ActPatchResult(BaseModel):
    """Activation patching (denoising): effect(node) = mean_prompts metric(corrupt run, node := clean) \
- metric(corrupt)."""

    role: str
    node_types: list[str]
    n_prompts: int
    n_pos: int
    chunk_size: int = Field(description="patched nodes per forward pass")
    n_forward_passes: int
    n_unchanged_nodes: int = Field(
        0, description="nodes whose clean and corrupt activations are identical in every prompt: effect exactly 0, "
                       "not run")
    shortcuts: list[str] = Field(
        default_factory=list,
        description="exact shortcuts taken (each checked against the full forward): later_layers, later_positions, "
                    "read_positions, read_vocab (unembedding only the token ids the metric reads), last_mlp_read_only")
    metric: MetricSummary
    effects: dict[str, NodeMap]


class NodeFidelity(BaseModel):
    """How well an attribution map (AtP or AtP*) matches activation patching for one node type."""

    node_type: str
    method: str = Field(examples=["atp", "atp_star"])
    n_nodes: int
    pearson: Optional[float] = Field(description="None when either map is constant")
    spearman: Optional[float] = Field(description="Pearson of average ranks (ties share their mean rank)")
    top_k: int = Field(description="k of the top-k recall (10, or fewer nodes)")
    top_k_recall: float = Field(description="|top-k by |act| ∩ top-k by |attr|| / k")
    normalized_error: Optional[float] = Field(
        description="sum_nodes |act - attr| / |act[ref]|, ref = argmax |act| (both maps normalised by act[ref])")
    reference_index: list[int] = Field(description="the reference cell (index along the map's axes)")
    reference_value: float = Field(description="activation-patching effect at the reference cell")


class FidelityResult(BaseModel):
    """One model, one prompt group: AtP / AtP* against activation patching at the same nodes."""

    role: str
    group: Optional[str] = None
    fidelity: list[NodeFidelity]
    atp: AtPResult
    activation: ActPatchResult

    def get(self, node_type: str, method: str = "atp") -> NodeFidelity:
        for f in self.fidelity:
            if f.node_type == node_type and f.method == method:
                return f
        raise KeyError((node_type, method))


class Interval(BaseModel):
    """A mean with a 95% percentile-bootstrap confidence interval."""

    mean: Optional[float]
    lo: Optional[float]
    hi: Optional[float]
    n: int = Field(description="how many values (groups or prompts) were resampled")


class FidelitySummary(BaseModel):
    """One fidelity statistic over the groups of a task set."""

    node_type: str
    method: str
    statistic: str = Field(examples=["pearson", "spearman", "top_k_recall", "normalized_error"])
    interval: Interval
    per_group: list[Optional[float]]


class NodeMapCI(BaseModel):
    """Per-node mean over all prompts of a task set, with a per-node 95% bootstrap CI over prompts."""

    node_type: str
    method: str = Field(examples=["activation", "atp", "atp_star"])
    mean: NodeMap
    lo: NodeMap
    hi: NodeMap


class TaskSetFidelity(BaseModel):
    """One model over a task set (several prompt groups): per-group fidelity, summaries and per-node CIs."""

    role: str
    groups: list[str]
    n_prompts: int
    n_bootstrap: int
    seed: int
    summaries: list[FidelitySummary]
    node_maps: list[NodeMapCI]
    per_group: list[FidelityResult] = Field(default_factory=list, description="kept when keep_groups=True")

    def summary(self, node_type: str, statistic: str, method: str = "atp") -> FidelitySummary:
        for s in self.summaries:
            if (s.node_type, s.statistic, s.method) == (node_type, statistic, method):
                return s
        raise KeyError((node_type, statistic, method))


class TrioResult(BaseModel, Generic[R]):
    """The same analysis for every role of a pair, with one manifest."""

    kind: str
    roles: dict[str, R]
    manifest: Manifest


def finite_or_none(x: float) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None
