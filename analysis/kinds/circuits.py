"""The transcoder kinds: `circuit`, `circuit-diff` and `feature`.

`circuit` builds one attribution graph per role for one prompt (the lead role's logit targets are
reused by the others, so the graphs explain the same logits); `circuit-diff` builds the graphs of two
roles and matches their features by decoder cosine (analysis.transcoders.diff); `feature` is a
feature's page (top contexts, histogram, promoted / suppressed tokens) for each role.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field

from lnscope.analysis.kinds.base import (
    CombineContext,
    Inputs,
    KindOptions,
    Limits,
    RequestError,
    TargetIn,
    UnitContext,
    single_token,
)
from lnscope.analysis.pairs import PairSpec
from lnscope.analysis.results import Manifest
from lnscope.analysis.transcoders.diff import CircuitDiff, diff_graphs
from lnscope.analysis.transcoders.features import FeatureIndex, FeaturePage, feature_page
from lnscope.analysis.transcoders.formats import (
    FileCache,
    TranscoderFormatError,
    cached_transcoders_for,
    load_transcoders,
    missing_transcoders_message,
    transcoder_dir,
    transcoder_fingerprint,
)
from lnscope.analysis.transcoders.graph import AttributionGraph, CTGraphJSON, GraphPath, GraphSummary, attribute
from lnscope.analysis.transcoders.matching import FeatureMatching, match_features


def transcoder_resources(pair: PairSpec, roles: list[str]) -> dict[str, Any]:
    """422 naming `roles` when a role has no transcoders; else their fingerprints (result identity)."""
    out = {}
    for i, role in enumerate(roles):
        if (message := missing_transcoders_message(pair, role)) is not None:
            raise RequestError(["body", "roles", i], message)
        out[role] = transcoder_fingerprint(transcoder_dir(pair, role))
    return {"transcoders": out}


# -- circuit and circuit-diff -----------------------------------------------------------------
class CircuitOptions(KindOptions):
    target: TargetIn | None = Field(
        default=None, description="default: the top logits up to `desired_logit_prob` (at most `max_n_logits`)")
    max_n_logits: int = Field(default=10, ge=1, le=50)
    desired_logit_prob: float = Field(default=0.95, gt=0, le=1)
    node_threshold: float = Field(default=0.8, gt=0, le=1, description="keep nodes up to this cumulative influence")
    edge_threshold: float = Field(default=0.98, gt=0, le=1, description="keep edges up to this cumulative influence")
    max_feature_nodes: int = Field(default=4096, ge=1, le=20000,
                                   description="feature rows computed (the most influential first); bounds memory")
    top_paths: int = Field(default=5, ge=0, le=20, description="strongest embedding-to-target paths listed per role")


class CircuitRole(BaseModel):
    graph: CTGraphJSON = Field(description="the pruned graph in circuit-tracer's JSON schema")
    summary: GraphSummary
    top_paths: list[GraphPath] = Field(description="the strongest paths into the first target logit")


class CircuitPartial(BaseModel):
    """One role's graph: its viewer form, the target tokens it explained and (for a diff) the graph itself."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    role: CircuitRole
    target_tokens: list[int]
    graph: AttributionGraph | None = None


class CircuitResult(BaseModel):
    manifest: Manifest
    prompt: str
    roles: dict[str, CircuitRole]


class CircuitDiffResult(BaseModel):
    manifest: Manifest
    prompt: str
    roles: dict[str, CircuitRole]
    diff: CircuitDiff


def prepare_target(options: CircuitOptions, inputs: Inputs, tokenizer, limits: Limits, n_ctx: int) -> dict[str, Any]:
    """attribute()'s target keywords: none (the top logits), one token, or a logit difference."""
    t = options.target
    if t is None:
        return {"target": {}}
    token = single_token(tokenizer, t.token, ["body", "options", "target", "token"])
    if t.kind == "logit":
        return {"target": {"target_tokens": [token]}}
    if t.other is None:
        raise RequestError(["body", "options", "target", "other"], "a logit_diff target needs `other`")
    other = single_token(tokenizer, t.other, ["body", "options", "target", "other"])
    return {"target": {"logit_diff": (token, other)}}


def role_graph(ctx: UnitContext) -> AttributionGraph:
    """The attribution graph of the prompt on this role, for the request's target or the lead's targets."""
    o: CircuitOptions = ctx.options
    target = ctx.inputs.extra["target"] or ctx.shared
    tset = cached_transcoders_for(ctx.pair, ctx.role, ctx.model)
    return attribute(ctx.model, tset, ctx.inputs.texts[0], pair=ctx.pair_name, progress=ctx.progress,
                     max_n_logits=o.max_n_logits, desired_logit_prob=o.desired_logit_prob,
                     max_feature_nodes=o.max_feature_nodes, **target)


def circuit_role(graph: AttributionGraph, o: CircuitOptions, pair: str) -> CircuitRole:
    """The graph pruned to the options' thresholds in circuit-tracer's JSON, its scores and top paths."""
    return CircuitRole(
        graph=graph.to_json(f"{pair}-{graph.role}", node_threshold=o.node_threshold, edge_threshold=o.edge_threshold),
        summary=graph.summary(o.node_threshold, o.edge_threshold),
        top_paths=graph.top_paths(graph.logit_start, k=o.top_paths) if o.top_paths else [],
    )


def graph_partial(ctx: UnitContext, keep_graph: bool) -> CircuitPartial:
    graph = role_graph(ctx)
    return CircuitPartial(role=circuit_role(graph, ctx.options, ctx.pair_name),
                          target_tokens=[t.vocab_idx for t in graph.logit_targets], graph=graph if keep_graph else None)


def circuit_unit(ctx: UnitContext) -> CircuitPartial:
    return graph_partial(ctx, keep_graph=False)


def circuit_diff_unit(ctx: UnitContext) -> CircuitPartial:
    """As `circuit_unit`, keeping the whole graph: the diff matches its nodes with the other role's."""
    return graph_partial(ctx, keep_graph=True)


def shares_targets(partial: CircuitPartial) -> dict[str, Any]:
    """The lead's logit targets, so that every role's graph explains the same logits."""
    return {"target_tokens": partial.target_tokens}


def combine_circuit(partials: Mapping[str, CircuitPartial], ctx: CombineContext) -> CircuitResult:
    return CircuitResult(manifest=ctx.manifest, prompt=ctx.inputs.texts[0],
                         roles={role: p.role for role, p in partials.items()})


_matching_cache = FileCache()


def pair_feature_matching(pair: PairSpec, role_a: str, role_b: str) -> FeatureMatching:
    """Decoder-cosine matching of two roles' transcoder features, from their files (on the CPU), cached."""
    dir_a, dir_b = transcoder_dir(pair, role_a), transcoder_dir(pair, role_b)
    return _matching_cache.get(dir_a, lambda: match_features(load_transcoders(dir_a), load_transcoders(dir_b)),
                               str(dir_b), transcoder_fingerprint(dir_b))


def combine_circuit_diff(partials: Mapping[str, CircuitPartial], ctx: CombineContext) -> CircuitDiffResult:
    """Both graphs and their diff: features matched by decoder cosine, nodes gained, lost and kept."""
    o: CircuitOptions = ctx.options
    (a, part_a), (b, part_b) = partials.items()
    diff = diff_graphs(part_a.graph, part_b.graph, pair_feature_matching(ctx.pair, a, b),
                       node_threshold=o.node_threshold, edge_threshold=o.edge_threshold)
    return CircuitDiffResult(manifest=ctx.manifest, prompt=ctx.inputs.texts[0], diff=diff,
                             roles={role: p.role for role, p in partials.items()})


def summarize_circuit(result: CircuitResult | CircuitDiffResult) -> str:
    lines = [f"{'role':<9} {'features':>9} {'kept nodes':>11} {'edges':>7} {'replacement':>12} {'completeness':>13}"]
    for role, r in result.roles.items():
        s = r.summary
        lines.append(f"{role:<9} {s.n_active_features:>9} {s.n_pruned_nodes:>11} {s.n_pruned_edges:>7} "
                     f"{s.replacement_score:>12.3f} {s.completeness_score:>13.3f}")
    if isinstance(result, CircuitDiffResult):
        d = result.diff
        lines.append(f"matched nodes {len(d.matched_nodes)}, only {d.roles[0]} {len(d.only_a)}, "
                     f"only {d.roles[1]} {len(d.only_b)}, node Jaccard {d.node_jaccard:.3f}")
    return "\n".join(lines)


# -- feature pages ----------------------------------------------------------------------------
class FeatureOptions(KindOptions):
    layer: int = Field(ge=0, le=1000, examples=[1])
    feature: int = Field(ge=0, le=10_000_000, examples=[42],
                         description="the feature's index in its layer's transcoder")
    n_contexts: int | None = Field(default=None, ge=1, le=100, description="top contexts shown (default: all indexed)")
    n_tokens: int = Field(default=10, ge=1, le=100, description="promoted and suppressed tokens listed")


class FeatureResult(BaseModel):
    manifest: Manifest
    layer: int
    feature: int
    roles: dict[str, FeaturePage]


_index_cache = FileCache()


def feature_index_for(pair: PairSpec, role: str) -> FeatureIndex:
    """The role's feature index (beside its transcoders), loaded once per set of files."""
    path = transcoder_dir(pair, role)
    return _index_cache.get(path, lambda: FeatureIndex.load(path))


def feature_unit(ctx: UnitContext) -> FeaturePage:
    """The feature's page on this role; 422 naming the option when the layer or index is out of range."""
    o: FeatureOptions = ctx.options
    ctx.progress.stage("feature page", 0.0)
    tset = cached_transcoders_for(ctx.pair, ctx.role, ctx.model)
    if o.layer not in tset.transcoders:
        raise RequestError(["body", "options", "layer"],
                           f"layer {o.layer} has no transcoder for {ctx.role} (layers {sorted(tset.transcoders)})")
    d_tc = tset[o.layer].d_transcoder
    if o.feature >= d_tc:
        raise RequestError(["body", "options", "feature"],
                           f"feature {o.feature} out of range: layer {o.layer} of {ctx.role} has {d_tc} features")
    index = feature_index_for(ctx.pair, ctx.role)
    if o.layer not in index.layers or o.feature >= index.top_acts[o.layer].shape[0]:
        raise TranscoderFormatError(
            f"the feature index of {ctx.role} does not cover layer {o.layer} feature {o.feature} (indexed layers "
            f"{index.layers}); rebuild it with `lnscope train-transcoders` or build_feature_index")
    return feature_page(ctx.model, tset, index, o.layer, o.feature, n_contexts=o.n_contexts, n_tokens=o.n_tokens)


def combine_feature(partials: Mapping[str, FeaturePage], ctx: CombineContext) -> FeatureResult:
    return FeatureResult(manifest=ctx.manifest, layer=ctx.options.layer, feature=ctx.options.feature,
                         roles=dict(partials))


def summarize_feature(result: FeatureResult) -> str:
    lines = []
    for role, page in result.roles.items():
        promoted = ", ".join(repr(t.token) for t in page.promoted[:5])
        lines.append(f"{role}: L{page.layer} #{page.feature} fires on {page.firing_rate:.2%} of tokens, "
                     f"max {page.max_activation:.3g}; promotes {promoted}")
    return "\n".join(lines)
