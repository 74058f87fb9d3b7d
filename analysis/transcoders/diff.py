"""Paired circuits: the same prompt's attribution graphs on two roles, nodes matched across models.

Features are matched per layer by the cosine similarity of their decoder rows, one-to-one
(maximum total cosine): scipy.optimize.linear_sum_assignment when scipy is installed, else our own
Hungarian algorithm (`hungarian`, the shortest-augmenting-path O(n^3) method, vectorised over columns)
up to `hungarian_max` features per side; above that a greedy assignment (pairs taken in decreasing
cosine among each feature's `greedy_candidates` best, each feature used once) — documented as
approximate. Pairs below `min_cos` are left unmatched. Error nodes match by (layer, position), token
nodes by position (both models must share the tokenizer), logit nodes by token.

A node of graph A "has a counterpart" in B when its matched node exists among B's graph nodes (for a
feature: the matched feature is active and attributed at the same position). The diff lists, over the
union of the two pruned graphs: matched nodes (with both influences and activations), nodes only in
one pruned graph (and why: the counterpart is pruned, inactive, or the feature is unmatched), and the
edges of either pruned graph whose two ends have counterparts, with both weights (read from the full
adjacency matrices) and their difference; plus both graphs' replacement / completeness scores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel, Field

from lnscope.analysis.loading import LoadedModel
from lnscope.analysis.progress import Progress, ensure
from lnscope.analysis.results import Manifest, make_manifest
from lnscope.analysis.transcoders.graph import AttributionGraph, attribute
from lnscope.analysis.transcoders.model import TranscoderSet

logger = logging.getLogger(__name__)

try:  # pragma: no cover - depends on the environment
    from scipy.optimize import linear_sum_assignment as _scipy_lsa
except ImportError:  # scipy is not a dependency
    _scipy_lsa = None


# ------------------------------------------------------------------------------------ assignment
def hungarian(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one assignment of a rectangular cost matrix: (rows, cols), sorted by row.

    Every row is assigned when rows <= cols (else every column). O(n^2 m) time, O(n m) memory.
    """
    cost = np.asarray(cost, dtype=np.float64)
    transposed = cost.shape[0] > cost.shape[1]
    if transposed:
        cost = cost.T
    n, m = cost.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=np.int64)  # p[j]: row (1-based) assigned to column j; column 0 is virtual
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            free = ~used[1:]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            masked = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    cols = np.nonzero(p[1:])[0]
    rows = p[1:][cols] - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


def assign(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy's linear_sum_assignment when available, else `hungarian` (same optimum)."""
    if _scipy_lsa is not None:
        r, c = _scipy_lsa(cost)
        return np.asarray(r, dtype=np.int64), np.asarray(c, dtype=np.int64)
    return hungarian(cost)


def _greedy_from_candidates(vals: torch.Tensor, cols: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = vals.shape
    rows = torch.arange(n)[:, None].expand(-1, k)
    order = torch.argsort(vals.flatten(), descending=True)
    used_r = torch.zeros(n, dtype=torch.bool)
    used_c = torch.zeros(n_cols, dtype=torch.bool)
    out_r, out_c, out_v = [], [], []
    flat_r, flat_c, flat_v = rows.flatten()[order].tolist(), cols.flatten()[order].tolist(), vals.flatten()[order].tolist()
    for r, c, v in zip(flat_r, flat_c, flat_v):
        if not used_r[r] and not used_c[c]:
            used_r[r] = used_c[c] = True
            out_r.append(r)
            out_c.append(c)
            out_v.append(v)
    r = torch.tensor(out_r, dtype=torch.long)
    o = torch.argsort(r)
    return r[o], torch.tensor(out_c, dtype=torch.long)[o], torch.tensor(out_v, dtype=torch.float64)[o]


def greedy_assign(sim: torch.Tensor, candidates: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate max-similarity matching: each row's `candidates` best columns, taken greedily."""
    vals, cols = sim.topk(min(candidates, sim.shape[1]), dim=1)
    r, c, _ = _greedy_from_candidates(vals, cols, sim.shape[1])
    return r, c


def greedy_assign_vectors(a: torch.Tensor, b: torch.Tensor, candidates: int = 8, chunk: int = 2048):
    """`greedy_assign` on the cosines of the rows of a and b, without the full similarity matrix."""
    a = a.detach().float()
    b = b.detach().float()
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = min(candidates, b.shape[0])
    vals, cols = [], []
    for s in range(0, a.shape[0], chunk):
        v, c = (a[s:s + chunk] @ b.T).topk(k, dim=1)
        vals.append(v.cpu())
        cols.append(c.cpu())
    return _greedy_from_candidates(torch.cat(vals), torch.cat(cols), b.shape[0])


@dataclass
class FeatureMatching:
    """Per layer: a_to_b[f] = matched feature of B (-1: none), cos[f] its decoder cosine."""

    a_to_b: dict[int, torch.Tensor]
    b_to_a: dict[int, torch.Tensor]
    cos: dict[int, torch.Tensor]
    method: dict[int, str]

    def match(self, layer: int, feature: int) -> int:
        t = self.a_to_b.get(layer)
        return -1 if t is None or feature >= t.numel() else int(t[feature])

    def summary(self) -> list[dict]:
        out = []
        for l, a2b in self.a_to_b.items():
            m = a2b >= 0
            c = self.cos[l][m]
            out.append({"layer": l, "matched": int(m.sum()), "n_a": int(a2b.numel()), "n_b": int(self.b_to_a[l].numel()),
                        "mean_cos": float(c.mean()) if c.numel() else None, "method": self.method[l]})
        return out


def decoder_cosines(W_a: torch.Tensor, W_b: torch.Tensor) -> torch.Tensor:
    a = W_a.detach().double()
    b = W_b.detach().double()
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).cpu()


def match_features(tset_a: TranscoderSet, tset_b: TranscoderSet, *, method: Literal["auto", "optimal", "greedy"] = "auto",
                   hungarian_max: int = 4096, greedy_candidates: int = 8, min_cos: float | None = None) -> FeatureMatching:
    """One-to-one decoder-cosine matching of the two sets' features, per shared layer."""
    a_to_b, b_to_a, cos, used = {}, {}, {}, {}
    for layer in sorted(set(tset_a.layers) & set(tset_b.layers)):
        W_a, W_b = tset_a[layer].W_dec, tset_b[layer].W_dec
        n_a, n_b = W_a.shape[0], W_b.shape[0]
        how = method
        if how == "auto":
            how = "optimal" if max(n_a, n_b) <= hungarian_max else "greedy"
        if how == "optimal":
            sim = decoder_cosines(W_a, W_b)
            r, c = assign(-sim.numpy())
            r, c = torch.from_numpy(r), torch.from_numpy(c)
            s = sim[r, c]
            name = "scipy" if _scipy_lsa is not None else "hungarian"
        else:
            r, c, s = greedy_assign_vectors(W_a, W_b, greedy_candidates)
            name = "greedy"
        if min_cos is not None:
            keep = s >= min_cos
            r, c, s = r[keep], c[keep], s[keep]
        ab = torch.full((n_a,), -1, dtype=torch.long)
        ba = torch.full((n_b,), -1, dtype=torch.long)
        cs = torch.full((n_a,), float("nan"), dtype=torch.float64)
        ab[r], ba[c], cs[r] = c, r, s
        a_to_b[layer], b_to_a[layer], cos[layer], used[layer] = ab, ba, cs, name
    return FeatureMatching(a_to_b, b_to_a, cos, used)


# -------------------------------------------------------------------------------------- the diff
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
    manifest: Manifest
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


def diff_graphs(graph_a: AttributionGraph, graph_b: AttributionGraph, matching: FeatureMatching, *,
                node_threshold: float = 0.8, edge_threshold: float = 0.98, max_edges: int = 2000,
                pair: str | None = None, models: Mapping[str, LoadedModel] | None = None) -> CircuitDiff:
    """The diff of two graphs of the same prompt (see the module docstring)."""
    if graph_a.token_ids != graph_b.token_ids:
        raise ValueError("the two graphs are of different token sequences (do the models share a tokenizer?)")
    pa, pb = graph_a.prune(node_threshold, edge_threshold), graph_b.prune(node_threshold, edge_threshold)
    inf_a, inf_b = _shares(graph_a), _shares(graph_b)
    keys_a = {_node_key(graph_a, i): i for i in range(graph_a.n_nodes)}
    keys_b = {_node_key(graph_b, i): i for i in range(graph_b.n_nodes)}
    kept_a = set(pa.node_mask.nonzero().flatten().tolist())
    kept_b = set(pb.node_mask.nonzero().flatten().tolist())

    matched: dict[tuple[int, int], MatchedNode] = {}
    only_a, only_b = [], []

    def ref(g, i, infl, reason):
        n = g.node(i)
        return NodeRef(node_id=g.node_id(i), kind=n.kind, layer=n.layer, pos=n.pos, feature=n.feature,
                       influence=float(infl[i]), activation=n.activation, reason=reason)

    for g, kept, keys_other, fwd, infl, only in ((graph_a, kept_a, keys_b, True, inf_a, only_a),
                                                 (graph_b, kept_b, keys_a, False, inf_b, only_b)):
        for i in sorted(kept):
            key = _node_key(g, i)
            other_key = _counterpart(key, matching, forward=fwd)
            j = keys_other.get(other_key) if other_key is not None else None
            if j is None:
                reason = "unmatched feature" if other_key is None else "counterpart not active / not attributed"
                only.append(ref(g, i, infl, reason))
                continue
            ia, ib = (i, j) if fwd else (j, i)
            if (ia, ib) in matched:
                continue
            na, nb = graph_a.node(ia), graph_b.node(ib)
            in_a, in_b = ia in kept_a, ib in kept_b
            if fwd and not in_b or not fwd and not in_a:
                only.append(ref(g, i, infl, "counterpart pruned"))
            matched[(ia, ib)] = MatchedNode(
                kind=na.kind, layer=na.layer, pos=na.pos, node_id_a=graph_a.node_id(ia), node_id_b=graph_b.node_id(ib),
                feature_a=na.feature if na.kind == "feature" else None,
                feature_b=nb.feature if nb.kind == "feature" else None,
                decoder_cos=float(matching.cos[na.layer][na.feature]) if na.kind == "feature" else None,
                influence_a=float(inf_a[ia]), influence_b=float(inf_b[ib]), activation_a=na.activation,
                activation_b=nb.activation, in_pruned_a=in_a, in_pruned_b=in_b)

    # edges of either pruned graph whose ends both have counterparts
    a_of_b = {ib: ia for ia, ib in matched}
    b_of_a = {ia: ib for ia, ib in matched}

    def full_index(g_from, i, keys_other, fwd):
        k = _counterpart(_node_key(g_from, i), matching, forward=fwd)
        return keys_other.get(k) if k is not None else None

    pairs: set[tuple[int, int, int, int]] = set()
    for d, s in pa.edge_mask.nonzero().tolist():
        db, sb = b_of_a.get(d, full_index(graph_a, d, keys_b, True)), b_of_a.get(s, full_index(graph_a, s, keys_b, True))
        if db is not None and sb is not None:
            pairs.add((d, s, db, sb))
    for d, s in pb.edge_mask.nonzero().tolist():
        da, sa = a_of_b.get(d, full_index(graph_b, d, keys_a, False)), a_of_b.get(s, full_index(graph_b, s, keys_a, False))
        if da is not None and sa is not None:
            pairs.add((da, sa, d, s))
    edges = []
    for da, sa, db, sb in pairs:
        wa, wb = float(graph_a.adjacency[da, sa]), float(graph_b.adjacency[db, sb])
        edges.append(EdgeDiff(source_a=graph_a.node_id(sa), target_a=graph_a.node_id(da), source_b=graph_b.node_id(sb),
                              target_b=graph_b.node_id(db), weight_a=wa, weight_b=wb, delta=wb - wa,
                              in_pruned_a=bool(pa.edge_mask[da, sa]), in_pruned_b=bool(pb.edge_mask[db, sb])))
    edges.sort(key=lambda e: -abs(e.delta))
    both = sum(1 for m in matched.values() if m.in_pruned_a and m.in_pruned_b)
    union = len(kept_a) + len(kept_b) - both
    scores = []
    for g, pr in ((graph_a, pa), (graph_b, pb)):
        rep, comp = g.scores()
        scores.append(GraphScores(role=g.role, replacement_score=rep, completeness_score=comp,
                                  n_active_features=int(g.active_features.shape[0]), n_pruned_nodes=int(pr.node_mask.sum()),
                                  n_pruned_edges=int(pr.edge_mask.sum()), identity_max_rel_error=g.identity_max_rel_error))
    manifest = make_manifest("transcoder_circuit_diff", models or {}, pair=pair,
                             options={"node_threshold": node_threshold, "edge_threshold": edge_threshold,
                                      "graph_options": graph_a.options})
    return CircuitDiff(
        manifest=manifest, roles=[graph_a.role, graph_b.role], prompt=graph_a.prompt, prompt_tokens=graph_a.token_strs,
        node_threshold=node_threshold, edge_threshold=edge_threshold, scores=scores, matching=matching.summary(),
        matched_nodes=sorted(matched.values(), key=lambda m: -(m.influence_a + m.influence_b)),
        only_a=only_a, only_b=only_b, edges=edges[:max_edges], n_edges_compared=len(edges),
        node_jaccard=both / union if union else 1.0)


def _shares(g: AttributionGraph) -> torch.Tensor:
    """Each node's share of the total influence on the logits (logits: their weights)."""
    infl = g.influence() + g.logit_weights
    return infl / infl[: g.logit_start].sum().clamp(min=1e-30)


def paired_circuits(models: Mapping[str, LoadedModel], transcoders: Mapping[str, TranscoderSet],
                    prompt: str | Sequence[int], *, roles: Sequence[str] | None = None, matching: FeatureMatching | None = None,
                    node_threshold: float = 0.8, edge_threshold: float = 0.98, pair: str | None = None,
                    progress: Progress | None = None, **attribute_kwargs) -> tuple[dict[str, AttributionGraph], CircuitDiff]:
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
    gb = attribute(models[b], transcoders[b], ga.token_ids, pair=pair, progress=progress.span(f"{b}: ", 0.45, 0.9), **kw)
    gb.prompt = ga.prompt
    progress.stage("matching features", 0.9)
    matching = matching or match_features(transcoders[a], transcoders[b])
    diff = diff_graphs(ga, gb, matching, node_threshold=node_threshold, edge_threshold=edge_threshold, pair=pair,
                       models={a: models[a], b: models[b]})
    progress.stage("done", 1.0)
    return {a: ga, b: gb}, diff
