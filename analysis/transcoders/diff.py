"""Paired circuits: the same prompt's attribution graphs on two roles, nodes matched across models.

Features are matched by decoder cosine (matching.py); error nodes match by (layer, position), token
nodes by position (both models must share the tokenizer), logit nodes by token.

A node of graph A "has a counterpart" in B when its matched node exists among B's graph nodes (for a
feature: the matched feature is active and attributed at the same position). The diff lists, over the
union of the two pruned graphs: matched nodes (with both influences and activations), nodes only in
one pruned graph (and why: the counterpart is pruned, inactive, or the feature is unmatched), and the
edges of either pruned graph whose two ends have counterparts, with both weights (read from the full
adjacency matrices) and their difference; plus both graphs' replacement / completeness scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from pydantic import BaseModel, Field

from lnscope.analysis.loading import LoadedModel
from lnscope.analysis.progress import Progress, ensure
from lnscope.analysis.transcoders.attribution import attribute
from lnscope.analysis.transcoders.graph import AttributionGraph, PruneResult
from lnscope.analysis.transcoders.matching import FeatureMatching, match_features
from lnscope.analysis.transcoders.model import TranscoderSet


class NodeRef(BaseModel):
    node_id: str
    kind: str
    layer: int
    pos: int
    feature: int | None = None
    influence: float = Field(description="share of the graph's total logit influence through this node")
    activation: float | None = None
    reason: str | None = Field(default=None, description="why it has no kept counterpart")


class MatchedNode(BaseModel):
    kind: str
    layer: int
    pos: int
    node_id_a: str
    node_id_b: str
    feature_a: int | None = None
    feature_b: int | None = None
    decoder_cos: float | None = None
    influence_a: float
    influence_b: float
    activation_a: float | None = None
    activation_b: float | None = None
    in_pruned_a: bool
    in_pruned_b: bool


class EdgeDiff(BaseModel):
    source_a: str
    target_a: str
    source_b: str
    target_b: str
    weight_a: float
    weight_b: float
    delta: float = Field(description="weight_b - weight_a")
    in_pruned_a: bool
    in_pruned_b: bool


class GraphScores(BaseModel):
    role: str
    replacement_score: float
    completeness_score: float
    n_active_features: int
    n_pruned_nodes: int
    n_pruned_edges: int
    identity_max_rel_error: float


class CircuitDiff(BaseModel):
    roles: list[str] = Field(description="[a, b]")
    prompt: str
    prompt_tokens: list[str]
    node_threshold: float
    edge_threshold: float
    scores: list[GraphScores] = Field(description="[a, b] side by side")
    matching: list[dict] = Field(description="per layer: matched features, mean decoder cosine, method")
    matched_nodes: list[MatchedNode]
    only_a: list[NodeRef]
    only_b: list[NodeRef]
    edges: list[EdgeDiff] = Field(description="largest |delta| first (at most max_edges)")
    n_edges_compared: int
    node_jaccard: float = Field(description="|matched kept in both| / |kept in either| over the pruned graphs")


def _node_key(g: AttributionGraph, i: int) -> tuple:
    n = g.node(i)
    if n.kind == "logit":
        return ("logit", n.feature)
    return (n.kind, n.layer, n.pos, n.feature if n.kind == "feature" else None)


def _counterpart(key: tuple, matching: FeatureMatching, forward: bool) -> tuple | None:
    if key[0] != "feature":
        return key
    kind, layer, pos, f = key
    table = matching.a_to_b if forward else matching.b_to_a
    t = table.get(layer)
    if t is None or f >= t.numel() or int(t[f]) < 0:
        return None
    return (kind, layer, pos, int(t[f]))


@dataclass
class _Side:
    """One graph of a diff, pruned, with its nodes keyed for matching."""

    graph: AttributionGraph
    pruned: PruneResult
    shares: torch.Tensor  # [n_nodes] share of the total logit influence per node
    keys: dict[tuple, int]  # node key -> node index
    kept: set[int]  # nodes of the pruned graph


def _side(g: AttributionGraph, node_threshold: float, edge_threshold: float) -> _Side:
    pruned = g.prune(node_threshold, edge_threshold)
    return _Side(graph=g, pruned=pruned, shares=_shares(g), keys={_node_key(g, i): i for i in range(g.n_nodes)},
                 kept=set(pruned.node_mask.nonzero().flatten().tolist()))


def diff_graphs(graph_a: AttributionGraph, graph_b: AttributionGraph, matching: FeatureMatching, *,
                node_threshold: float = 0.8, edge_threshold: float = 0.98, max_edges: int = 2000) -> CircuitDiff:
    """The diff of two graphs of the same prompt (see the module docstring)."""
    if graph_a.token_ids != graph_b.token_ids:
        raise ValueError("the two graphs are of different token sequences (do the models share a tokenizer?)")
    a, b = _side(graph_a, node_threshold, edge_threshold), _side(graph_b, node_threshold, edge_threshold)
    matched, only_a, only_b = _match_nodes(a, b, matching)
    edges = _edge_diffs(a, b, matching, matched)
    both = sum(1 for m in matched.values() if m.in_pruned_a and m.in_pruned_b)
    union = len(a.kept) + len(b.kept) - both
    return CircuitDiff(
        roles=[graph_a.role, graph_b.role], prompt=graph_a.prompt, prompt_tokens=graph_a.token_strs,
        node_threshold=node_threshold, edge_threshold=edge_threshold, scores=[_graph_scores(a), _graph_scores(b)],
        matching=matching.summary(),
        matched_nodes=sorted(matched.values(), key=lambda m: -(m.influence_a + m.influence_b)),
        only_a=only_a, only_b=only_b, edges=edges[:max_edges], n_edges_compared=len(edges),
        node_jaccard=both / union if union else 1.0)


def _match_nodes(a: _Side, b: _Side, matching: FeatureMatching
                 ) -> tuple[dict[tuple[int, int], MatchedNode], list[NodeRef], list[NodeRef]]:
    """Each kept node of either graph: matched to its counterpart, or listed as only in its graph (and why).

    A node whose counterpart exists but is pruned is both matched and listed as only in its graph.
    """
    matched: dict[tuple[int, int], MatchedNode] = {}
    only_a: list[NodeRef] = []
    only_b: list[NodeRef] = []
    for side, other, forward, only in ((a, b, True, only_a), (b, a, False, only_b)):
        for i in sorted(side.kept):
            other_key = _counterpart(_node_key(side.graph, i), matching, forward=forward)
            j = other.keys.get(other_key) if other_key is not None else None
            if j is None:
                reason = "unmatched feature" if other_key is None else "counterpart not active / not attributed"
                only.append(_node_ref(side, i, reason))
                continue
            ia, ib = (i, j) if forward else (j, i)
            if (ia, ib) in matched:
                continue
            if (ib if forward else ia) not in other.kept:
                only.append(_node_ref(side, i, "counterpart pruned"))
            matched[(ia, ib)] = _matched_node(a, b, ia, ib, matching)
    return matched, only_a, only_b


def _node_ref(side: _Side, i: int, reason: str) -> NodeRef:
    n = side.graph.node(i)
    return NodeRef(node_id=side.graph.node_id(i), kind=n.kind, layer=n.layer, pos=n.pos, feature=n.feature,
                   influence=float(side.shares[i]), activation=n.activation, reason=reason)


def _matched_node(a: _Side, b: _Side, ia: int, ib: int, matching: FeatureMatching) -> MatchedNode:
    na, nb = a.graph.node(ia), b.graph.node(ib)
    return MatchedNode(
        kind=na.kind, layer=na.layer, pos=na.pos, node_id_a=a.graph.node_id(ia), node_id_b=b.graph.node_id(ib),
        feature_a=na.feature if na.kind == "feature" else None,
        feature_b=nb.feature if nb.kind == "feature" else None,
        decoder_cos=float(matching.cos[na.layer][na.feature]) if na.kind == "feature" else None,
        influence_a=float(a.shares[ia]), influence_b=float(b.shares[ib]), activation_a=na.activation,
        activation_b=nb.activation, in_pruned_a=ia in a.kept, in_pruned_b=ib in b.kept)


def _edge_diffs(a: _Side, b: _Side, matching: FeatureMatching,
                matched: Mapping[tuple[int, int], MatchedNode]) -> list[EdgeDiff]:
    """The edges of either pruned graph whose two ends have counterparts, largest |weight_b - weight_a| first."""
    b_of_a = {ia: ib for ia, ib in matched}
    a_of_b = {ib: ia for ia, ib in matched}

    def counterpart_index(side: _Side, i: int, other: _Side, forward: bool) -> int | None:
        key = _counterpart(_node_key(side.graph, i), matching, forward=forward)
        return other.keys.get(key) if key is not None else None

    pairs: set[tuple[int, int, int, int]] = set()  # (target_a, source_a, target_b, source_b)
    for d, s in a.pruned.edge_mask.nonzero().tolist():
        db = b_of_a.get(d, counterpart_index(a, d, b, True))
        sb = b_of_a.get(s, counterpart_index(a, s, b, True))
        if db is not None and sb is not None:
            pairs.add((d, s, db, sb))
    for d, s in b.pruned.edge_mask.nonzero().tolist():
        da = a_of_b.get(d, counterpart_index(b, d, a, False))
        sa = a_of_b.get(s, counterpart_index(b, s, a, False))
        if da is not None and sa is not None:
            pairs.add((da, sa, d, s))
    ga, gb = a.graph, b.graph
    edges = []
    for da, sa, db, sb in pairs:
        wa, wb = float(ga.adjacency[da, sa]), float(gb.adjacency[db, sb])
        edges.append(EdgeDiff(source_a=ga.node_id(sa), target_a=ga.node_id(da), source_b=gb.node_id(sb),
                              target_b=gb.node_id(db), weight_a=wa, weight_b=wb, delta=wb - wa,
                              in_pruned_a=bool(a.pruned.edge_mask[da, sa]),
                              in_pruned_b=bool(b.pruned.edge_mask[db, sb])))
    edges.sort(key=lambda e: -abs(e.delta))
    return edges


def _graph_scores(side: _Side) -> GraphScores:
    g, pr = side.graph, side.pruned
    rep, comp = g.scores()
    return GraphScores(role=g.role, replacement_score=rep, completeness_score=comp,
                       n_active_features=int(g.active_features.shape[0]), n_pruned_nodes=int(pr.node_mask.sum()),
                       n_pruned_edges=int(pr.edge_mask.sum()), identity_max_rel_error=g.identity_max_rel_error)


def _shares(g: AttributionGraph) -> torch.Tensor:
    """Each node's share of the total influence on the logits (logits: their weights)."""
    infl = g.influence() + g.logit_weights
    return infl / infl[: g.logit_start].sum().clamp(min=1e-30)


def paired_circuits(models: Mapping[str, LoadedModel], transcoders: Mapping[str, TranscoderSet],
                    prompt: str | Sequence[int], *, roles: Sequence[str] | None = None,
                    matching: FeatureMatching | None = None, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                    pair: str | None = None, progress: Progress | None = None,
                    **attribute_kwargs) -> tuple[dict[str, AttributionGraph], CircuitDiff]:
    """Graphs of `prompt` on two roles (default: original and ln_free) and their diff.

    Without explicit targets, role b's logit targets are role a's (the same tokens in both graphs).
    """
    progress = ensure(progress)
    roles = list(roles or (["original", "ln_free"] if {"original", "ln_free"} <= set(models) else list(models)[:2]))
    if len(roles) != 2:
        raise ValueError(f"a diff needs two roles, got {roles}")
    a, b = roles
    ga = attribute(models[a], transcoders[a], prompt, pair=pair, progress=progress.span(f"{a}: ", 0.0, 0.45),
                   **attribute_kwargs)
    kw = dict(attribute_kwargs)
    if kw.get("target_tokens") is None and kw.get("logit_diff") is None:
        kw["target_tokens"] = [t.vocab_idx for t in ga.logit_targets]
    gb = attribute(models[b], transcoders[b], ga.token_ids, pair=pair, progress=progress.span(f"{b}: ", 0.45, 0.9),
                   **kw)
    gb.prompt = ga.prompt
    progress.stage("matching features", 0.9)
    matching = matching or match_features(transcoders[a], transcoders[b])
    diff = diff_graphs(ga, gb, matching, node_threshold=node_threshold, edge_threshold=edge_threshold)
    progress.stage("done", 1.0)
    return {a: ga, b: gb}, diff
