"""Attribution graphs (Ameisen et al. 2025; circuit-tracer's Graph): the matrix, influence, pruning, paths.

An attribution graph of one prompt is a dense matrix A over nodes in circuit-tracer's order,
rows = targets, columns = sources:

    [features (layer, pos, feature order) | errors (layer-major, pos) | token embeddings (pos) | logits]

A[t, s] is the direct effect of source s on target t through the replacement model (replacement.py,
built by attribution.py); every target row satisfies, up to rounding,

    input_t = sum_s A[t, s] + bias_t          (checked per row: `identity_*` fields)

Influence is circuit-tracer's: with N = |A| row-normalised and w the logit weights, the total
influence of the nodes on the logits is w (N + N^2 + ...). Pruning (`prune`) keeps the nodes, then
the edges, holding a given share of it; `scores` gives the replacement and completeness scores,
`top_paths` the k strongest paths from the token embeddings to a node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, Field

from lnscope.analysis.results import Manifest
from lnscope.analysis.transcoders.graph_json import CTGraphJSON, graph_json, write_graph_files
from lnscope.analysis.transcoders.targets import LogitTarget


# ------------------------------------------------------------------------------------ results (pydantic)
class PathStep(BaseModel):
    node_id: str
    label: str


class GraphPath(BaseModel):
    nodes: list[PathStep] = Field(description="from the source (usually a token embedding) to the node")
    weights: list[float] = Field(description="edge weights along the path")
    score: float = Field(description="product (or sum) of the edge weights")


class GraphSummary(BaseModel):
    """A graph's headline numbers, JSON-serialisable."""

    role: str
    prompt: str
    prompt_tokens: list[str]
    token_ids: list[int]
    targets: list[LogitTarget]
    n_layers: int
    n_active_features: int
    n_selected_features: int
    n_nodes: int
    n_pruned_nodes: int
    n_pruned_edges: int
    node_threshold: float
    edge_threshold: float
    replacement_score: float
    completeness_score: float
    pruned_replacement_score: float | None = None
    bos: str
    identity_max_abs_error: float = Field(description="max over rows |sum of edges + bias - input|")
    identity_max_rel_error: float = Field(
        description="max over rows of the gap / max(|input|, |bias| + sum |edges|)")
    seconds: float


# ------------------------------------------------------------------------------- influence and pruning
def normalize_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """|A| with each row divided by its sum (rows of zeros stay zero)."""
    m = matrix.abs()
    return m / m.sum(dim=1, keepdim=True).clamp(min=1e-10)


def compute_influence(A: torch.Tensor, weights: torch.Tensor, max_iter: int = 10_000) -> torch.Tensor:
    """weights @ (A + A^2 + ...) [n_nodes]: each node's total influence on the weighted targets.

    A [n_nodes, n_nodes] is a DAG's (nilpotent) matrix, so the series ends; a cycle raises RuntimeError.
    """
    current = weights @ A
    influence = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return influence
        current = current @ A
        influence += current
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")


def find_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The smallest score among the top scores that together hold `threshold` of the total (a 0-d tensor)."""
    s = torch.sort(scores.flatten(), descending=True).values
    cum = torch.cumsum(s, 0) / s.sum().clamp(min=1e-30)
    idx = int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype)).item())
    nonzero = int((s > 0).sum().item())
    idx = min(idx, max(nonzero - 1, 0))
    return s[idx]


@dataclass
class PruneResult:
    """What `AttributionGraph.prune` keeps."""

    node_mask: torch.Tensor  # [n_nodes] bool
    edge_mask: torch.Tensor  # [n_nodes, n_nodes] bool: [target, source]
    cumulative_scores: torch.Tensor  # [n_nodes]: share of the influence held by the nodes up to this one


@dataclass
class GraphNode:
    """One node of a graph, decoded from its index."""

    index: int
    kind: Literal["feature", "error", "token", "logit"]
    layer: int  # -1 for tokens, n_layers for logits
    pos: int
    feature: int | None = None  # feature index, or the logit's vocab index
    activation: float | None = None

    def label(self, token_strs: Sequence[str]) -> str:
        if self.kind == "feature":
            return f"L{self.layer}/F{self.feature}@{self.pos}"
        if self.kind == "error":
            return f"L{self.layer}/err@{self.pos}"
        if self.kind == "token":
            return f"emb {token_strs[self.pos]!r}@{self.pos}"
        return f"logit {self.feature}"


# ------------------------------------------------------------------------------------- the graph
@dataclass
class AttributionGraph:
    """A dense attribution graph (rows = targets, columns = sources), circuit-tracer's node order."""

    prompt: str
    token_ids: list[int]
    token_strs: list[str]
    n_layers: int
    active_features: torch.Tensor  # [n_active, 3] (layer, pos, feature)
    activation_values: torch.Tensor  # [n_active]
    selected_features: torch.Tensor  # [n_selected] indices into active_features
    adjacency: torch.Tensor  # [n_nodes, n_nodes] float32
    logit_targets: list[LogitTarget]
    node_inputs: torch.Tensor  # [n_nodes] float64: pre-activation / logit; 0 for errors and tokens
    node_bias: torch.Tensor  # [n_nodes] float64
    identity_gap: torch.Tensor  # [n_nodes] float64: sum of row + bias - input (0 for source-only nodes)
    row_scale: torch.Tensor | None = None  # [n_nodes] float64: |bias| + sum |row| over all sources
    role: str = ""
    scan: str = ""
    bos: str = "bias"
    manifest: Manifest | None = None
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    # prune() per (node_threshold, edge_threshold): to_json, summary and diff_graphs share one
    _pruned: dict[tuple[float, float], "PruneResult"] = field(default_factory=dict, init=False, repr=False,
                                                               compare=False)

    # ------------------------------------------------------------------------------ layout
    @property
    def n_pos(self) -> int:
        return len(self.token_ids)

    @property
    def n_features(self) -> int:
        return int(self.selected_features.numel())

    @property
    def n_logits(self) -> int:
        return len(self.logit_targets)

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[0]

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def logit_weights(self) -> torch.Tensor:
        """[n_nodes]: each logit target's weight (its probability, or 1 for a difference); 0 elsewhere."""
        w = torch.zeros(self.n_nodes, dtype=self.adjacency.dtype)
        w[self.logit_start:] = torch.tensor([t.weight for t in self.logit_targets], dtype=w.dtype)
        return w

    def node(self, index: int) -> GraphNode:
        """The node at `index` (circuit-tracer's node order, see the module docstring)."""
        if index < self.n_features:
            a = int(self.selected_features[index])
            layer, pos, feat = (int(v) for v in self.active_features[a])
            return GraphNode(index, "feature", layer, pos, feat, float(self.activation_values[a]))
        if index < self.token_start:
            layer, pos = divmod(index - self.error_start, self.n_pos)
            return GraphNode(index, "error", layer, pos)
        if index < self.logit_start:
            return GraphNode(index, "token", -1, index - self.token_start, self.token_ids[index - self.token_start])
        t = self.logit_targets[index - self.logit_start]
        return GraphNode(index, "logit", self.n_layers, self.n_pos - 1, t.vocab_idx)

    def node_id(self, index: int) -> str:
        """circuit-tracer's node_id."""
        n = self.node(index)
        if n.kind == "feature":
            return f"{n.layer}_{n.feature}_{n.pos}"
        if n.kind == "error":
            return f"{n.layer}_-1_{n.pos}"
        if n.kind == "token":
            return f"E_{n.feature}_{n.pos}"
        return f"{self.n_layers + 1}_{n.feature}_{n.pos}"

    def index_of(self, node_id: str) -> int:
        ids = {self.node_id(i): i for i in range(self.n_nodes)}
        if node_id not in ids:
            raise KeyError(f"no node {node_id!r} in this graph")
        return ids[node_id]

    def feature_index(self, layer: int, pos: int, feature: int) -> int | None:
        """The node index of a selected feature, or None."""
        sel = self.active_features[self.selected_features]
        hit = ((sel[:, 0] == layer) & (sel[:, 1] == pos) & (sel[:, 2] == feature)).nonzero()
        return int(hit[0, 0]) if hit.numel() else None

    # ------------------------------------------------------------------------------ scores
    def influence(self) -> torch.Tensor:
        """[n_nodes]: w (N + N^2 + ...), N = |A| row-normalised, w the logit weights."""
        return compute_influence(normalize_matrix(self.adjacency), self.logit_weights)

    def scores(self, adjacency: torch.Tensor | None = None) -> tuple[float, float]:
        """(replacement score, completeness score) as circuit-tracer defines them.

        replacement = influence of the tokens / influence of tokens and errors; completeness = the
        influence-weighted mean over nodes of the share of their normalised input that is not error.
        """
        A = self.adjacency if adjacency is None else adjacency
        w = self.logit_weights
        norm = normalize_matrix(A)
        infl = compute_influence(norm, w)
        tok = infl[self.token_start:self.logit_start].sum()
        err = infl[self.error_start:self.token_start].sum()
        replacement = float(tok / (tok + err).clamp(min=1e-30))
        non_error = 1 - norm[:, self.error_start:self.token_start].sum(dim=-1)
        out = infl + w
        completeness = float((non_error * out).sum() / out.sum().clamp(min=1e-30))
        return replacement, completeness

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
        """circuit-tracer's pruning: keep the nodes holding `node_threshold` of the influence on the
        logits, then the edges holding `edge_threshold` of the edge influence; tokens and logits stay;
        feature/error nodes without kept outgoing (features: and incoming) edges go, iteratively.
        Computed once per thresholds; the result is shared, so treat its masks as read-only."""
        for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        key = (float(node_threshold), float(edge_threshold))
        if key not in self._pruned:
            self._pruned[key] = self._prune(*key)
        return self._pruned[key]

    def _prune(self, node_threshold: float, edge_threshold: float) -> PruneResult:
        A = self.adjacency
        w = self.logit_weights
        keep_tail = self.n_logits + self.n_pos
        influence = compute_influence(normalize_matrix(A), w)
        node_mask = influence >= find_threshold(influence, node_threshold)
        node_mask[-keep_tail:] = True
        pruned = A.clone()
        pruned[~node_mask] = 0
        pruned[:, ~node_mask] = 0
        norm = normalize_matrix(pruned)
        edge_infl = compute_influence(norm, w) + w
        edge_scores = norm * edge_infl[:, None]
        edge_mask = edge_scores >= find_threshold(edge_scores, edge_threshold)
        old = node_mask.clone()
        node_mask[:-keep_tail] &= edge_mask[:, :-keep_tail].any(0)
        node_mask[:self.n_features] &= edge_mask[:self.n_features].any(1)
        while not torch.equal(node_mask, old):
            old = node_mask.clone()
            edge_mask[~node_mask] = False
            edge_mask[:, ~node_mask] = False
            node_mask[:-keep_tail] &= edge_mask[:, :-keep_tail].any(0)
            node_mask[:self.n_features] &= edge_mask[:self.n_features].any(1)
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        sorted_scores, order = torch.sort(influence, descending=True)
        cum = torch.cumsum(sorted_scores, 0) / sorted_scores.sum().clamp(min=1e-30)
        cumulative = torch.zeros_like(influence)
        cumulative[order] = cum
        return PruneResult(node_mask, edge_mask, cumulative)

    # ------------------------------------------------------------------------------ identity
    @property
    def identity_max_abs_error(self) -> float:
        return float(self.identity_gap.abs().max()) if self.identity_gap.numel() else 0.0

    @property
    def identity_max_rel_error(self) -> float:
        """max over target rows of |gap| / max(|input|, |bias| + sum_s |A[t, s]|) (the size of the summed terms)."""
        rows = self._target_rows()
        if not rows.numel():
            return 0.0
        denom = self.node_inputs[rows].abs()
        if self.row_scale is not None:
            denom = torch.maximum(denom, self.row_scale[rows])
        return float((self.identity_gap[rows].abs() / denom.clamp(min=1e-30)).max())

    def _target_rows(self) -> torch.Tensor:
        return torch.cat([torch.arange(self.n_features), torch.arange(self.logit_start, self.n_nodes)])

    # ------------------------------------------------------------------------------ export
    def to_json(self, slug: str = "graph", *, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                scan: str | None = None) -> CTGraphJSON:
        """The pruned graph in circuit-tracer's viewer schema (graph_json.py)."""
        return graph_json(self, slug, node_threshold=node_threshold, edge_threshold=edge_threshold, scan=scan)

    def write_json(self, directory: str | Path, slug: str, **kwargs) -> Path:
        """`<dir>/<slug>.json` plus `graph-metadata.json` (the viewer's index), as circuit-tracer writes them."""
        return write_graph_files(self, directory, slug, **kwargs)

    def summary(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> GraphSummary:
        pr = self.prune(node_threshold, edge_threshold)
        replacement, completeness = self.scores()
        pruned_adj = self.adjacency * pr.edge_mask
        return GraphSummary(
            role=self.role, prompt=self.prompt, prompt_tokens=self.token_strs, token_ids=self.token_ids,
            targets=self.logit_targets, n_layers=self.n_layers,
            n_active_features=int(self.active_features.shape[0]), n_selected_features=self.n_features,
            n_nodes=self.n_nodes, n_pruned_nodes=int(pr.node_mask.sum()), n_pruned_edges=int(pr.edge_mask.sum()),
            node_threshold=node_threshold, edge_threshold=edge_threshold,
            replacement_score=replacement, completeness_score=completeness,
            pruned_replacement_score=self.scores(pruned_adj)[0], bos=self.bos,
            identity_max_abs_error=self.identity_max_abs_error, identity_max_rel_error=self.identity_max_rel_error,
            seconds=self.seconds,
        )

    # ------------------------------------------------------------------------------ paths
    def top_paths(self, node: int | str, k: int = 5, *, mode: Literal["product", "sum"] = "product",
                  adjacency: torch.Tensor | None = None, sources: Literal["tokens", "all"] = "tokens",
                  max_in_edges: int = 64) -> list[GraphPath]:
        """The k strongest paths ending at `node` (Dunefsky et al.'s path view).

        A path's score is the product (or sum) of its |edge weights|; paths start at token embeddings
        (`sources="all"`: also at error nodes). Exact k-best by dynamic programming over the DAG
        (layer order), considering each node's `max_in_edges` strongest incoming edges.
        """
        A = self.adjacency if adjacency is None else adjacency
        target = self.index_of(node) if isinstance(node, str) else int(node)
        layer_of = torch.empty(self.n_nodes, dtype=torch.long)
        for i in range(self.n_nodes):
            layer_of[i] = self.node(i).layer
        # nodes that can reach the target, in increasing layer order
        needed = {target}
        frontier = [target]
        in_edges: dict[int, list[tuple[int, float]]] = {}
        while frontier:
            nxt = []
            for t in frontier:
                row = A[t]
                nz = row.nonzero().flatten()
                if nz.numel() > max_in_edges:
                    nz = nz[row[nz].abs().topk(max_in_edges).indices]
                in_edges[t] = [(int(s), float(row[s])) for s in nz]
                for s, _ in in_edges[t]:
                    if s not in needed:
                        needed.add(s)
                        nxt.append(s)
            frontier = nxt
        order = sorted(needed, key=lambda i: (int(layer_of[i]), i))
        is_source = lambda i: (self.token_start <= i < self.logit_start) or (  # noqa: E731
            sources == "all" and self.error_start <= i < self.token_start)
        best: dict[int, list[tuple[float, list[int], list[float]]]] = {}
        for i in order:
            cands: list[tuple[float, list[int], list[float]]] = []
            if is_source(i):
                cands.append((1.0 if mode == "product" else 0.0, [i], []))
            for s, w in in_edges.get(i, []):
                for score, path, ws in best.get(s, []):
                    new = score * abs(w) if mode == "product" else score + abs(w)
                    cands.append((new, path + [i], ws + [w]))
            cands.sort(key=lambda c: -c[0])
            best[i] = cands[:k]
        out = []
        for score, path, ws in best.get(target, []):
            if len(path) < 2:
                continue
            sign = math.prod(1 if w >= 0 else -1 for w in ws) if mode == "product" else 1
            out.append(GraphPath(nodes=[PathStep(node_id=self.node_id(p), label=self.node(p).label(self.token_strs))
                                        for p in path], weights=ws, score=sign * score))
        return out

    # ------------------------------------------------------------------------------ io
    def save(self, path: str | Path) -> Path:
        """A .pt file of tensors and plain values (loadable with weights_only=True)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save({
            "prompt": self.prompt, "token_ids": self.token_ids, "token_strs": self.token_strs,
            "n_layers": self.n_layers, "active_features": self.active_features,
            "activation_values": self.activation_values, "selected_features": self.selected_features,
            "adjacency": self.adjacency, "logit_targets": [t.model_dump() for t in self.logit_targets],
            "node_inputs": self.node_inputs, "node_bias": self.node_bias, "identity_gap": self.identity_gap,
            "row_scale": self.row_scale,
            "role": self.role, "scan": self.scan, "bos": self.bos, "seconds": self.seconds,
            "manifest": self.manifest.model_dump_json() if self.manifest else None, "options": self.options,
        }, p)
        return p

    @classmethod
    def load(cls, path: str | Path) -> "AttributionGraph":
        d = torch.load(str(path), map_location="cpu", weights_only=True)
        d["logit_targets"] = [LogitTarget(**t) for t in d["logit_targets"]]
        d["manifest"] = Manifest.model_validate_json(d["manifest"]) if d.get("manifest") else None
        return cls(**d)


# `attribute` lives in attribution.py; analysis/kinds/circuits.py imports it from here (lazily: no import cycle).
def __getattr__(name: str) -> Any:
    if name == "attribute":
        from lnscope.analysis.transcoders.attribution import attribute

        return attribute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
