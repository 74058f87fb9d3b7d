"""circuit-tracer's viewer JSON (frontend/graph_models.py) and the builder that writes a pruned graph in it.

Node ids follow circuit-tracer: features `{layer}_{feature}_{pos}`, error nodes `{layer}_-1_{pos}` (its
collision-free form: 0.5's `0_{layer}_{pos}` can equal a layer-0 feature's id), token embeddings
`E_{token}_{pos}`, logits `{n_layers + 1}_{vocab_idx}_{pos}`. A feature's `feature` field is the Cantor
pairing of (layer, feature), as circuit-tracer's per-layer transcoders number them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from lnscope.analysis.transcoders.graph import AttributionGraph


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


def graph_json(graph: AttributionGraph, slug: str = "graph", *, node_threshold: float = 0.8,
               edge_threshold: float = 0.98, scan: str | None = None) -> CTGraphJSON:
    """The pruned graph in circuit-tracer's viewer schema: kept nodes with an edge (tokens and logits always)."""
    pruned = graph.prune(node_threshold, edge_threshold)
    replacement, completeness = graph.scores()
    nodes: dict[int, CTNode] = {}
    for i in pruned.node_mask.nonzero().flatten().tolist():
        nodes[i] = ct_node(graph, i, float(pruned.cumulative_scores[i]))
    dst, src = pruned.edge_mask.nonzero(as_tuple=True)
    links = [CTLink(source=nodes[s].node_id, target=nodes[d].node_id, weight=float(graph.adjacency[d, s]))
             for d, s in zip(dst.tolist(), src.tolist()) if s in nodes and d in nodes]
    connected = {l.source for l in links} | {l.target for l in links}
    used = [n for n in nodes.values() if n.node_id in connected or n.feature_type in ("embedding", "logit")]
    meta = CTMetadata(slug=slug, scan=scan or graph.scan or "lnscope", prompt_tokens=list(graph.token_strs),
                      prompt=graph.prompt, node_threshold=node_threshold, model_role=graph.role,
                      replacement_score=replacement, completeness_score=completeness)
    return CTGraphJSON(metadata=meta, nodes=used, links=links)


def ct_node(graph: AttributionGraph, i: int, influence: float) -> CTNode:
    """Node `i` of `graph` as the viewer's node; `influence`: its cumulative influence score."""
    n = graph.node(i)
    node_id = graph.node_id(i)
    if n.kind == "feature":
        cantor = (n.layer + n.feature) * (n.layer + n.feature + 1) // 2 + n.feature
        return CTNode(node_id=node_id, feature=cantor, layer=str(n.layer), ctx_idx=n.pos,
                      feature_type="cross layer transcoder", jsNodeId=f"{n.layer}_{n.feature}-0",
                      influence=influence, activation=n.activation)
    if n.kind == "error":
        return CTNode(node_id=node_id, feature=-1, layer=str(n.layer), ctx_idx=n.pos,
                      feature_type="mlp reconstruction error", jsNodeId=f"{n.layer}_-1-{n.pos}", influence=influence)
    if n.kind == "token":
        return CTNode(node_id=node_id, feature=n.pos, layer="E", ctx_idx=n.pos, feature_type="embedding",
                      jsNodeId=f"E_{n.feature}-{n.pos}", influence=influence)
    t = graph.logit_targets[i - graph.logit_start]
    return CTNode(node_id=node_id, feature=t.vocab_idx, layer=str(graph.n_layers + 1), ctx_idx=n.pos,
                  feature_type="logit", token_prob=t.probability, is_target_logit=i == graph.logit_start,
                  jsNodeId=f"L_{t.vocab_idx}-{n.pos}", clerp=f'Output "{t.token}" (p={t.probability:.3f})')


def write_graph_files(graph: AttributionGraph, directory: str | Path, slug: str, **kwargs) -> Path:
    """`<dir>/<slug>.json` plus `graph-metadata.json` (the viewer's index), as circuit-tracer writes them."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model = graph_json(graph, slug, **kwargs)
    path = d / f"{slug}.json"
    path.write_text(model.model_dump_json(indent=2))
    index = d / "graph-metadata.json"
    meta = json.loads(index.read_text()) if index.is_file() else {"graphs": []}
    meta["graphs"] = [g for g in meta["graphs"] if g.get("slug") != slug] + [model.metadata.model_dump()]
    index.write_text(json.dumps(meta, indent=2))
    return path
