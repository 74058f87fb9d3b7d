"""Attribution graphs on a local replacement model (Ameisen et al. 2025; circuit-tracer's construction).

For one prompt, every MLP is replaced by its transcoder plus a frozen error term, and the attention
patterns and LayerNorm scales are frozen at their values on the prompt. The residual stream is then
an affine function of the node outputs:

- feature nodes (layer, pos, f) with activation a > 0: output a * W_dec[f] into the residual at pos
  (features at position 0 are dropped, see `bos`),
- error nodes (layer, pos): MLP output - transcoder reconstruction (a layer without a transcoder is
  all error),
- token embedding nodes (pos): the token embedding (`hook_embed`),
- plus constants ("bias"): positional embeddings, attention b_O, transcoder b_dec, b_enc, b_U, and
  (bos="bias", circuit-tracer's choice) the MLP outputs at position 0.

Target nodes: feature pre-activations (x_l[pos] . W_enc[f], x_l what the MLP receives) and logit nodes
(demeaned logits at the last position: the top logits up to `desired_logit_prob` cumulative
probability, at most `max_n_logits`; or given tokens; or one logit difference). The direct effect of
a source s on a target t is A[t, s] = (d input_t / d output_s) . output_s, read from one backward pass
per target (batched: the prompt is copied `batch_size` times, each copy carries one target) through
the bridge with hooks that replace `hook_pattern` / `hook_scale` by their frozen values and each
`hook_mlp_out` by leaf tensors (features + error) + b_dec + the skip term. A bias-only pass (all node
outputs zero) gives each target's bias term, so that exactly

    input_t = sum_s A[t, s] + bias_t          (checked for every row: `identity_*` fields)

For an LN-free model (no hook_scale) the replacement model is the model itself on this prompt except
for the MLP nonlinearities; with LayerNorm the frozen scales make it linear. Encoder rows are taken
mean-free when the residual stream is centred (see `attribute`); pre-activations are unchanged.

Node order and graph JSON follow circuit-tracer (PyPI circuit-tracer 0.5; error nodes use its newer
collision-free ids `{layer}_-1_{pos}`, as 0.5's `0_{layer}_{pos}` can equal a layer-0 feature's id): adjacency rows = targets,
columns = sources, nodes [features (layer, pos, feature order), errors (layer-major), tokens, logits];
pruning by influence (`prune`), replacement / completeness scores (`scores`), and `to_json` writes
its viewer's schema. `top_paths` lists the k strongest paths from the token embeddings to a node.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, Field

from lnscope.analysis.loading import LoadedModel
from lnscope.analysis.progress import Progress, ensure
from lnscope.analysis.results import Manifest, make_manifest
from lnscope.analysis.transcoders.model import TranscoderSet

logger = logging.getLogger(__name__)

BosMode = Literal["bias", "error", "features"]
_CHUNK = 1 << 22  # elements of scratch per gathered decoder chunk


# --------------------------------------------------------------------------------- JSON (viewer)
class CTMetadata(BaseModel):
    slug: str
    scan: str
    transcoder_list: list[str] = Field(default_factory=list)
    prompt_tokens: list[str]
    prompt: str
    node_threshold: float | None = None
    schema_version: int | None = 1
    # lnscope additions (the viewer ignores unknown keys)
    model_role: str | None = None
    replacement_score: float | None = None
    completeness_score: float | None = None


class CTQParams(BaseModel):
    pinnedIds: list[str] = Field(default_factory=list)
    supernodes: list[list[str]] = Field(default_factory=list)
    linkType: str = "both"
    clickedId: str = ""
    sg_pos: str = ""


class CTNode(BaseModel):
    node_id: str
    feature: int
    layer: str
    ctx_idx: int
    feature_type: str
    token_prob: float = 0.0
    is_target_logit: bool = False
    run_idx: int = 0
    reverse_ctx_idx: int = 0
    jsNodeId: str
    clerp: str = ""
    influence: float | None = None
    activation: float | None = None


class CTLink(BaseModel):
    source: str
    target: str
    weight: float


class CTGraphJSON(BaseModel):
    """circuit-tracer's graph file (frontend/graph_models.Model)."""

    metadata: CTMetadata
    qParams: CTQParams = Field(default_factory=CTQParams)
    nodes: list[CTNode]
    links: list[CTLink]


# ------------------------------------------------------------------------------ results (pydantic)
class LogitTarget(BaseModel):
    token: str
    vocab_idx: int = Field(description="token id; vocab_size + i for a logit difference (circuit-tracer's virtual index)")
    probability: float = Field(description="softmax probability (for a logit difference: p(token) - p(other))")
    weight: float = Field(description="weight in influence computations (probability, or 1 for a difference)")
    value: float = Field(description="the target's input: the demeaned logit (or the logit difference)")
    other_token_id: int | None = None


class PathStep(BaseModel):
    node_id: str
    label: str


class GraphPath(BaseModel):
    nodes: list[PathStep] = Field(description="from the source (usually a token embedding) to the node")
    weights: list[float] = Field(description="edge weights along the path")
    score: float = Field(description="product (or sum) of the edge weights")


class GraphSummary(BaseModel):
    """A graph's headline numbers, JSON-serialisable."""

    manifest: Manifest
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
    identity_max_rel_error: float = Field(description="max over rows of the gap / max(|input|, |bias| + sum |edges|)")
    seconds: float


# ------------------------------------------------------------------------------- pruning (maths)
def normalize_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """|A| with each row divided by its sum (rows of zeros stay zero)."""
    m = matrix.abs()
    return m / m.sum(dim=1, keepdim=True).clamp(min=1e-10)


def compute_influence(A: torch.Tensor, weights: torch.Tensor, max_iter: int = 10_000) -> torch.Tensor:
    """weights @ (A + A^2 + ...): the total influence of each node on the weighted targets (A is a DAG)."""
    current = weights @ A
    influence = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return influence
        current = current @ A
        influence += current
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")


def find_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The smallest score among the top scores that together hold `threshold` of the total."""
    s = torch.sort(scores.flatten(), descending=True).values
    cum = torch.cumsum(s, 0) / s.sum().clamp(min=1e-30)
    idx = int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype)).item())
    nonzero = int((s > 0).sum().item())
    idx = min(idx, max(nonzero - 1, 0))
    return s[idx]


@dataclass
class PruneResult:
    node_mask: torch.Tensor
    edge_mask: torch.Tensor  # [target, source]
    cumulative_scores: torch.Tensor


@dataclass
class GraphNode:
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
        w = torch.zeros(self.n_nodes, dtype=self.adjacency.dtype)
        w[self.logit_start:] = torch.tensor([t.weight for t in self.logit_targets], dtype=w.dtype)
        return w

    def node(self, index: int) -> GraphNode:
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
        return compute_influence(normalize_matrix(self.adjacency), self.logit_weights)

    def scores(self, adjacency: torch.Tensor | None = None) -> tuple[float, float]:
        """(replacement score, completeness score) as circuit-tracer defines them."""
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
        """The pruned graph in circuit-tracer's viewer schema."""
        pr = self.prune(node_threshold, edge_threshold)
        replacement, completeness = self.scores()
        nodes: dict[int, CTNode] = {}
        for i in pr.node_mask.nonzero().flatten().tolist():
            nodes[i] = self._ct_node(i, float(pr.cumulative_scores[i]))
        dst, src = pr.edge_mask.nonzero(as_tuple=True)
        links = [CTLink(source=nodes[s].node_id, target=nodes[d].node_id, weight=float(self.adjacency[d, s]))
                 for d, s in zip(dst.tolist(), src.tolist()) if s in nodes and d in nodes]
        connected = {l.source for l in links} | {l.target for l in links}
        used = [n for n in nodes.values() if n.node_id in connected or n.feature_type in ("embedding", "logit")]
        meta = CTMetadata(slug=slug, scan=scan or self.scan or "lnscope", prompt_tokens=list(self.token_strs),
                          prompt=self.prompt, node_threshold=node_threshold, model_role=self.role,
                          replacement_score=replacement, completeness_score=completeness)
        return CTGraphJSON(metadata=meta, nodes=used, links=links)

    def _ct_node(self, i: int, influence: float) -> CTNode:
        n = self.node(i)
        if n.kind == "feature":
            cantor = (n.layer + n.feature) * (n.layer + n.feature + 1) // 2 + n.feature
            return CTNode(node_id=self.node_id(i), feature=cantor, layer=str(n.layer), ctx_idx=n.pos,
                          feature_type="cross layer transcoder", jsNodeId=f"{n.layer}_{n.feature}-0",
                          influence=influence, activation=n.activation)
        if n.kind == "error":
            return CTNode(node_id=self.node_id(i), feature=-1, layer=str(n.layer), ctx_idx=n.pos,
                          feature_type="mlp reconstruction error", jsNodeId=f"{n.layer}_-1-{n.pos}", influence=influence)
        if n.kind == "token":
            return CTNode(node_id=self.node_id(i), feature=n.pos, layer="E", ctx_idx=n.pos, feature_type="embedding",
                          jsNodeId=f"E_{n.feature}-{n.pos}", influence=influence)
        t = self.logit_targets[i - self.logit_start]
        return CTNode(node_id=self.node_id(i), feature=t.vocab_idx, layer=str(self.n_layers + 1), ctx_idx=n.pos,
                      feature_type="logit", token_prob=t.probability, is_target_logit=i == self.logit_start,
                      jsNodeId=f"L_{t.vocab_idx}-{n.pos}", clerp=f'Output "{t.token}" (p={t.probability:.3f})')

    def write_json(self, directory: str | Path, slug: str, **kwargs) -> Path:
        """`<dir>/<slug>.json` plus `graph-metadata.json` (the viewer's index), as circuit-tracer writes them."""
        import json

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        model = self.to_json(slug, **kwargs)
        path = d / f"{slug}.json"
        path.write_text(model.model_dump_json(indent=2))
        index = d / "graph-metadata.json"
        meta = json.loads(index.read_text()) if index.is_file() else {"graphs": []}
        meta["graphs"] = [g for g in meta["graphs"] if g.get("slug") != slug] + [model.metadata.model_dump()]
        index.write_text(json.dumps(meta, indent=2))
        return path

    def summary(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> GraphSummary:
        pr = self.prune(node_threshold, edge_threshold)
        replacement, completeness = self.scores()
        pruned_adj = self.adjacency * pr.edge_mask
        return GraphSummary(
            manifest=self.manifest or Manifest(kind="transcoder_graph", roles={}),
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


# ------------------------------------------------------------------------------------ computation
def _decode_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(t)]) for t in ids]


def prompt_tokens(model: LoadedModel, prompt: str | Sequence[int] | torch.Tensor, *, prepend_bos: bool = True) -> list[int]:
    """BOS + the prompt's tokens (as analysis.checks.tokenize_prompts), or the given ids."""
    if isinstance(prompt, str):
        bos = model.tokenizer.bos_token_id
        ids = ([bos] if prepend_bos and bos is not None else []) + list(model.tokenizer.encode(prompt, add_special_tokens=False))
    else:
        ids = [int(t) for t in (prompt.reshape(-1).tolist() if isinstance(prompt, torch.Tensor) else prompt)]
    n_ctx = int(model.bridge.cfg.n_ctx)
    if len(ids) > n_ctx:
        raise ValueError(f"the prompt has {len(ids)} tokens, more than the model's context {n_ctx}")
    if not ids:
        raise ValueError("empty prompt")
    return ids


def _hook_names(bridge) -> dict[str, list[str]]:
    names = bridge.hook_dict
    L = int(bridge.cfg.n_layers)
    return {
        "freeze": [n for n in names if n.endswith(".hook_pattern") or n.endswith(".hook_scale")],
        "mlp_in": [f"blocks.{l}.mlp.hook_in" for l in range(L)],
        "mlp_out": [f"blocks.{l}.hook_mlp_out" for l in range(L)],
        "embed": ["hook_embed"],
    }


@dataclass
class _Prepared:
    """Everything the replacement model needs for one prompt."""

    tokens: torch.Tensor  # [1, pos]
    logits: torch.Tensor  # [pos, vocab] clean
    frozen: dict[str, torch.Tensor]  # hook name -> [1, ...] value
    mlp_in: list[torch.Tensor]  # [pos, d]
    node_out: list[torch.Tensor]  # [pos, d] features + error (what the leaf carries)
    const_out: list[torch.Tensor]  # [pos, d] b_dec (+ BOS constants)
    error: list[torch.Tensor]  # [pos, d]
    embed: torch.Tensor  # [pos, d]
    active: torch.Tensor  # [n, 3]
    values: torch.Tensor  # [n]
    pre_acts: torch.Tensor  # [n] pre-activation of each active feature (with bias)


@torch.no_grad()
def _prepare(model: LoadedModel, transcoders: TranscoderSet, ids: list[int], bos: BosMode) -> _Prepared:
    bridge = model.bridge
    names = _hook_names(bridge)
    wanted = set(names["freeze"] + names["mlp_in"] + names["mlp_out"] + names["embed"])
    tokens = torch.tensor([ids], device=model.device)
    logits, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n in wanted)
    L = int(bridge.cfg.n_layers)
    dtype = logits.dtype
    mlp_in, node_out, const_out, error = [], [], [], []
    active, values, pres = [], [], []
    for l in range(L):
        x = cache[f"blocks.{l}.mlp.hook_in"][0]
        out = cache[f"blocks.{l}.hook_mlp_out"][0]
        mlp_in.append(x)
        const = torch.zeros_like(out)
        if l in transcoders:
            tc = transcoders[l]
            pre = tc.pre_acts(x).to(dtype)
            z = tc.activate(pre)
            if bos != "features":
                z[0] = 0
            recon = z @ tc.W_dec.to(dtype)
            const = const + tc.b_dec.to(dtype)
            skip = tc.skip_term(x).to(dtype) if tc.has_skip else torch.zeros_like(out)
            err = out - recon - const - skip
            nz = z.nonzero()
            active.append(torch.cat([torch.full((nz.shape[0], 1), l, device=nz.device), nz], 1))
            values.append(z[nz[:, 0], nz[:, 1]])
            pres.append(pre[nz[:, 0], nz[:, 1]])
        else:
            recon, err, skip = torch.zeros_like(out), out.clone(), torch.zeros_like(out)
        if bos == "bias":  # position 0's MLP output is a constant, not a node (circuit-tracer)
            const[0] = out[0] - skip[0]
            err[0] = 0
        node_out.append(recon + err)
        const_out.append(const)
        error.append(err)
    frozen = {n: cache[n] for n in names["freeze"]}
    empty = torch.zeros((0, 3), dtype=torch.long, device=model.device)
    act = torch.cat(active) if active else empty
    return _Prepared(tokens=tokens, logits=logits[0], frozen=frozen, mlp_in=mlp_in, node_out=node_out,
                     const_out=const_out, error=error, embed=cache["hook_embed"][0],
                     active=act.long(), values=torch.cat(values) if values else torch.zeros(0, dtype=dtype),
                     pre_acts=torch.cat(pres) if pres else torch.zeros(0, dtype=dtype))


class _Replacement:
    """Runs the frozen replacement model through the bridge's hooks."""

    def __init__(self, model: LoadedModel, transcoders: TranscoderSet, prep: _Prepared) -> None:
        self.model, self.tc, self.prep = model, transcoders, prep
        self.L = int(model.bridge.cfg.n_layers)
        self.names = _hook_names(model.bridge)

    def run(self, batch: int, *, zero_nodes: bool = False):
        """One forward of `batch` copies. Returns (leaves [embed, mlp_out_0..], live mlp inputs, logits)."""
        prep, tcs = self.prep, self.tc
        leaves: dict[str, torch.Tensor] = {}
        live: dict[int, torch.Tensor] = {}

        def expand(t: torch.Tensor) -> torch.Tensor:
            return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t[None].expand(batch, *t.shape)

        def freeze(t, hook):
            return expand(self.prep.frozen[hook.name]).detach()

        def embed(t, hook):
            if zero_nodes:
                return torch.zeros_like(t)
            leaf = expand(prep.embed).clone().requires_grad_(True)
            leaves["embed"] = leaf
            return leaf

        def mlp_in(t, hook):
            live[int(hook.name.split(".")[1])] = t
            return t

        def mlp_out(t, hook):
            l = int(hook.name.split(".")[1])
            value = expand(prep.const_out[l])
            if not zero_nodes:
                leaf = expand(prep.node_out[l]).clone().requires_grad_(True)
                leaves[f"mlp{l}"] = leaf
                value = value + leaf
            if l in tcs and tcs[l].has_skip:
                value = value + tcs[l].skip_term(live[l]).to(t.dtype)
            return value

        hooks = [(n, freeze) for n in self.names["freeze"]] + [("hook_embed", embed)]
        hooks += [(n, mlp_in) for n in self.names["mlp_in"]] + [(n, mlp_out) for n in self.names["mlp_out"]]
        toks = prep.tokens.expand(batch, -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logits = self.model.bridge.run_with_hooks(toks, fwd_hooks=hooks)
        return leaves, live, logits


def _select_targets(model: LoadedModel, logits_last: torch.Tensor, *, target_tokens, logit_diff,
                    max_n_logits: int, desired_logit_prob: float) -> tuple[list[LogitTarget], torch.Tensor]:
    """(targets, directions [n, vocab]) on the last position's logits; direction . logits = target value."""
    tok = model.tokenizer
    V = logits_last.shape[-1]
    probs = torch.softmax(logits_last.double(), -1)
    demeaned = logits_last.double() - logits_last.double().mean()
    if logit_diff is not None:
        a, b = (int(v) for v in logit_diff)
        d = torch.zeros(V, dtype=torch.float64)
        d[a], d[b] = 1.0, -1.0
        t = LogitTarget(token=f"{tok.decode([a])} - {tok.decode([b])}", vocab_idx=V, probability=float(probs[a] - probs[b]),
                        weight=1.0, value=float(logits_last[a].double() - logits_last[b].double()), other_token_id=b)
        return [t], d[None]
    if target_tokens is not None:
        idx = torch.tensor([int(v) for v in target_tokens], dtype=torch.long)
        if (idx < 0).any() or (idx >= V).any():
            raise ValueError(f"target token ids must be in [0, {V})")
    else:
        top_p, top_i = probs.topk(min(max_n_logits, V))
        cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), torch.tensor(desired_logit_prob, dtype=torch.float64))) + 1
        idx = top_i[:cutoff]
    dirs = torch.full((len(idx), V), -1.0 / V, dtype=torch.float64)
    dirs[torch.arange(len(idx)), idx] += 1.0
    targets = [LogitTarget(token=tok.decode([int(i)]), vocab_idx=int(i), probability=float(probs[i]),
                           weight=float(probs[i]), value=float(demeaned[i])) for i in idx]
    return targets, dirs


def attribute(
    model: LoadedModel,
    transcoders: TranscoderSet,
    prompt: str | Sequence[int] | torch.Tensor,
    *,
    target_tokens: Sequence[int] | None = None,
    logit_diff: tuple[int, int] | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 32,
    max_feature_nodes: int | None = None,
    update_interval: int = 4,
    bos: BosMode = "bias",
    prepend_bos: bool = True,
    pair: str | None = None,
    progress: Progress | None = None,
) -> AttributionGraph:
    """The attribution graph of `prompt` on `model` with `transcoders` (see the module docstring).

    `max_feature_nodes` (default all): how many feature rows to compute; beyond it the features with the
    highest estimated influence are chosen, as circuit-tracer does. `bos`: "bias" (default, circuit-tracer)
    position 0's MLP outputs are constants; "error": they stay in the error nodes (no features there);
    "features": position 0 is treated like the others. `batch_size`: targets per backward pass (the
    prompt is run once with that many copies). `target_tokens` / `logit_diff`: explicit logit targets.

    The transcoders are moved to the model's device and dtype. Memory: a dense float32 matrix of
    (n_features + (n_layers + 1) n_pos + n_logits)^2 entries; cap `max_feature_nodes` for long prompts.
    """
    progress = ensure(progress)
    start = time.perf_counter()
    if bos not in ("bias", "error", "features"):
        raise ValueError(f"bos must be 'bias', 'error' or 'features', not {bos!r}")
    bridge = model.bridge
    L = int(bridge.cfg.n_layers)
    d_model = int(bridge.cfg.d_model)
    if transcoders.d_model != d_model:
        from lnscope.analysis.transcoders.formats import TranscoderFormatError

        raise TranscoderFormatError(f"transcoders have d_model {transcoders.d_model}, the model {d_model}")
    bad = [l for l in transcoders.layers if not 0 <= l < L]
    if bad:
        from lnscope.analysis.transcoders.formats import TranscoderFormatError

        raise TranscoderFormatError(f"transcoders for layers {bad}, but the model has {L} layers")
    transcoders.to(device=model.device, dtype=model.dtype)
    ids = prompt_tokens(model, prompt, prepend_bos=prepend_bos)
    P = len(ids)
    progress.stage("graph: forward", 0.0)

    prep = _prepare(model, transcoders, ids, bos)
    dtype = prep.logits.dtype
    targets, dirs = _select_targets(model, prep.logits[-1], target_tokens=target_tokens, logit_diff=logit_diff,
                                    max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob)
    dirs = dirs.to(device=model.device, dtype=dtype)
    n_logits = len(targets)
    n_active = int(prep.active.shape[0])
    n_sources = n_active + (L + 1) * P
    max_rows = n_active if max_feature_nodes is None else min(int(max_feature_nodes), n_active)

    # encoder rows of the active features (the linear part of their pre-activations). With a centred
    # residual stream (TL's center_writing_weights) what an MLP reads is mean-free on the prompt, so an
    # encoder row's component along the all-ones direction reads nothing there; it is dropped, else (no
    # LayerNorm to remove it) it would be a spurious channel from the transcoders' decoder rows and the
    # error nodes to later encoders. With LayerNorm (ln2 centres) this changes nothing.
    centred = bool(model.weight_processing.get("center_writing_weights", False))
    enc = torch.zeros(n_active, d_model, dtype=dtype, device=model.device)
    enc_bias = torch.zeros(n_active, dtype=torch.float64)
    dec = torch.zeros(n_active, d_model, dtype=dtype, device=model.device)
    for l in transcoders.layers:
        m = (prep.active[:, 0] == l).nonzero().flatten()
        if m.numel():
            f = prep.active[m, 2]
            rows = transcoders[l].W_enc.detach()[f].to(dtype)
            enc[m] = rows - rows.mean(-1, keepdim=True) if centred else rows
            enc_bias[m.cpu()] = transcoders[l].effective_b_enc().detach()[f].double().cpu()
            dec[m] = transcoders[l].W_dec.detach()[f].to(dtype) * prep.values[m, None]

    B = max(1, min(batch_size, max(max_rows, n_logits)))
    rep = _Replacement(model, transcoders, prep)
    with torch.enable_grad():
        leaves, live, logits = rep.run(B)
    leaf_list = [leaves["embed"]] + [leaves[f"mlp{l}"] for l in range(L)]

    def rows_for(kinds: list[tuple[str, int]]) -> torch.Tensor:
        """Rows (float64, cpu) for targets ('logit', i) / ('feature', active index); one backward."""
        r = len(kinds)
        total = torch.zeros((), dtype=dtype, device=model.device)
        for b, (kind, i) in enumerate(kinds):
            if kind == "logit":
                total = total + logits[b, P - 1] @ dirs[i]
            else:
                l, p = int(prep.active[i, 0]), int(prep.active[i, 1])
                total = total + live[l][b, p] @ enc[i]
        grads = torch.autograd.grad(total, leaf_list, retain_graph=True, allow_unused=True)
        g_embed = grads[0] if grads[0] is not None else torch.zeros_like(leaf_list[0])
        row = torch.zeros(r, n_sources, dtype=torch.float64)
        for l in range(L):
            g = grads[1 + l]
            if g is None:
                continue
            g = g[:r]
            m = (prep.active[:, 0] == l).nonzero().flatten()
            if m.numel():
                step = max(1, _CHUNK // max(1, r * d_model))
                for s in range(0, m.numel(), step):
                    mm = m[s:s + step]
                    row[:, mm.cpu()] = (g[:, prep.active[mm, 1]] * dec[mm][None]).sum(-1).double().cpu()
            row[:, n_active + l * P: n_active + (l + 1) * P] = (g * prep.error[l][None]).sum(-1).double().cpu()
        row[:, n_active + L * P:] = (g_embed[:r] * prep.embed[None]).sum(-1).double().cpu()
        return row

    # logit rows (float64 while summed; stored as float32)
    logit_rows = torch.zeros(n_logits, n_sources, dtype=torch.float64)
    for s in range(0, n_logits, B):
        chunk = [("logit", i) for i in range(s, min(s + B, n_logits))]
        logit_rows[s:s + len(chunk)] = rows_for(chunk)
    progress.stage("graph: feature rows", 0.05)

    # feature rows (all, or the most influential first). With every row computed, row j is active feature
    # j and goes straight into the final matrix; else rows are kept and their columns selected at the end.
    full = max_rows == n_active
    N = max_rows + (L + 1) * P + n_logits
    adjacency = torch.zeros(N, N, dtype=torch.float32)
    feat_rows = adjacency if full else torch.zeros(max_rows, n_sources, dtype=torch.float32)
    row_sum = torch.zeros(max_rows, dtype=torch.float64)
    row_abs = torch.zeros(max_rows, dtype=torch.float64)
    row_owner = torch.full((max_rows,), -1, dtype=torch.long)  # active index per computed row
    visited = torch.zeros(n_active, dtype=torch.bool)
    done = 0
    while done < max_rows:
        if full:
            pending = torch.arange(n_active)
        else:
            infl = _partial_influence(logit_rows, feat_rows[:done], row_owner[:done], n_active, n_sources, targets)
            rank = torch.argsort(infl[:n_active], descending=True)
            pending = rank[~visited[rank]][: min(update_interval * B, max_rows - done)]
        for s in range(0, pending.numel(), B):
            idx = pending[s:s + B]
            rows = rows_for([("feature", int(i)) for i in idx])
            sl = slice(done, done + idx.numel())
            feat_rows[sl, :n_sources] = rows.float()
            row_sum[sl], row_abs[sl] = rows.sum(1), rows.abs().sum(1)
            row_owner[sl] = idx
            visited[idx] = True
            done += idx.numel()
            progress.stage("graph: feature rows", 0.05 + 0.9 * done / max(max_rows, 1))
        if full:
            break
    del leaves, live, logits, leaf_list

    # bias terms: the same replacement model with every node output zero
    with torch.no_grad():
        _, live0, logits0 = rep.run(1, zero_nodes=True)
    logit_bias = (logits0[0, P - 1].to(torch.float64) @ dirs.T.to(torch.float64)).cpu()
    feat_bias = torch.zeros(max_rows, dtype=torch.float64)
    for j in range(done):
        i = int(row_owner[j])
        l, p = int(prep.active[i, 0]), int(prep.active[i, 1])
        feat_bias[j] = float(live0[l][0, p].double() @ enc[i].double()) + float(enc_bias[i])

    # inputs and the identity, on full rows (all active features as columns), in float64
    logit_inputs = (prep.logits[-1].double() @ dirs.T.double()).cpu()
    feat_inputs = prep.pre_acts.double().cpu()[row_owner[:done]] if done else torch.zeros(0, dtype=torch.float64)
    logit_gap = logit_rows.sum(1) + logit_bias - logit_inputs
    feat_gap = row_sum[:done] + feat_bias[:done] - feat_inputs

    # assemble the square matrix in circuit-tracer's order
    order = torch.argsort(row_owner[:done])
    selected = row_owner[:done][order]
    if not full:
        cols = torch.cat([selected, torch.arange(n_active, n_sources)])
        adjacency[:done, : N - n_logits] = feat_rows[:done][order][:, cols]
        del feat_rows
        logit_cols = logit_rows[:, cols]
    else:
        logit_cols = logit_rows
    adjacency[N - n_logits:, : N - n_logits] = logit_cols.float()
    node_inputs = torch.zeros(N, dtype=torch.float64)
    node_bias = torch.zeros(N, dtype=torch.float64)
    gap = torch.zeros(N, dtype=torch.float64)
    scale = torch.zeros(N, dtype=torch.float64)
    node_inputs[:done], node_bias[:done], gap[:done] = feat_inputs[order], feat_bias[:done][order], feat_gap[order]
    scale[:done] = row_abs[:done][order] + feat_bias[:done][order].abs()
    node_inputs[N - n_logits:], node_bias[N - n_logits:], gap[N - n_logits:] = logit_inputs, logit_bias, logit_gap
    scale[N - n_logits:] = logit_rows.abs().sum(1) + logit_bias.abs()

    token_strs = _decode_tokens(model.tokenizer, ids)
    options = dict(max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob, batch_size=batch_size,
                   max_feature_nodes=max_feature_nodes, bos=bos, target_tokens=list(target_tokens) if target_tokens else None,
                   logit_diff=list(logit_diff) if logit_diff else None, transcoders=transcoders.describe())
    graph = AttributionGraph(
        prompt=model.tokenizer.decode(ids) if not isinstance(prompt, str) else prompt,
        token_ids=ids, token_strs=token_strs, n_layers=L,
        active_features=prep.active.cpu(), activation_values=prep.values.double().cpu(),
        selected_features=selected.cpu(), adjacency=adjacency, logit_targets=targets,
        node_inputs=node_inputs, node_bias=node_bias, identity_gap=gap, row_scale=scale, role=model.role,
        scan=transcoders.scan or "", bos=bos, seconds=time.perf_counter() - start,
        manifest=make_manifest("transcoder_graph", {model.role: model}, pair=pair, options=options), options=options,
    )
    progress.stage("graph: done", 1.0)
    logger.info("graph: %d active features, %d rows, identity max rel error %.2e, %.1f s", n_active, done,
                graph.identity_max_rel_error, graph.seconds)
    return graph


def _partial_influence(logit_rows, feat_rows, owners, n_active, n_sources, targets) -> torch.Tensor:
    """circuit-tracer's partial influences: estimated influence of every source from the rows computed so far."""
    n_logits = len(targets)
    rows = torch.cat([logit_rows, feat_rows.double()]).abs()
    rows = rows / rows.sum(1, keepdim=True).clamp(min=1e-8)
    # row r belongs to node: logits -> n_sources + i, features -> their active index
    row_node = torch.cat([torch.arange(n_logits) + n_sources, owners])
    prod = torch.zeros(n_sources + n_logits, dtype=torch.float64)
    prod[n_sources:] = torch.tensor([t.weight for t in targets], dtype=torch.float64)
    influence = torch.zeros(n_sources, dtype=torch.float64)
    for _ in range(256):
        nxt = prod[row_node] @ rows
        if not nxt.any():
            break
        influence += nxt
        prod = torch.zeros_like(prod)
        prod[:n_sources] = nxt
    return influence
