"""Adapters registering the transcoder kinds: circuit, circuit-diff and feature.

`circuit` builds one attribution graph per role for one prompt (the first role's logit targets are
reused by the others, so the graphs explain the same logits); `circuit-diff` builds the graphs of
two roles and matches their features by decoder cosine (analysis.transcoders.diff); `feature` is a
feature's page (top contexts, histogram, promoted / suppressed tokens) for each role.
The maths lives in analysis.transcoders.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from lnscope.analysis.kinds import Inputs, Kind, RequestError, RunContext, register
from lnscope.analysis.adapters import TargetIn, _Options, single_token
from lnscope.analysis.pairs import ROLES, PairSpec
from lnscope.analysis.results import Manifest, make_manifest, run_per_role
from lnscope.analysis.transcoders.diff import CircuitDiff, paired_circuits
from lnscope.analysis.transcoders.features import FeatureIndex, FeaturePage, feature_page
from lnscope.analysis.transcoders.formats import (
    FileCache,
    TranscoderFormatError,
    cached_transcoders_for,
    missing_transcoders_message,
    transcoder_dir,
    transcoder_fingerprint,
)
from lnscope.analysis.transcoders.graph import AttributionGraph, CTGraphJSON, GraphPath, GraphSummary, attribute

def _transcoder_resources(pair: PairSpec, roles: list[str]) -> dict[str, Any]:
    """422 naming `roles` when a role has no transcoders; else their fingerprints (result identity)."""
    out = {}
    for i, role in enumerate(roles):
        if (message := missing_transcoders_message(pair, role)) is not None:
            raise RequestError(["body", "roles", i], message)
        out[role] = transcoder_fingerprint(transcoder_dir(pair, role))
    return {"transcoders": out}


# -- circuit and circuit-diff -----------------------------------------------------------------
class CircuitOptions(_Options):
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


class CircuitResult(BaseModel):
    manifest: Manifest
    prompt: str
    roles: dict[str, CircuitRole]


class CircuitDiffResult(BaseModel):
    manifest: Manifest
    prompt: str
    roles: dict[str, CircuitRole]
    diff: CircuitDiff


def _prepare_target(options: CircuitOptions, inputs: Inputs, tokenizer) -> dict[str, Any]:
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


def _attribute_kwargs(o: CircuitOptions) -> dict[str, Any]:
    return {"max_n_logits": o.max_n_logits, "desired_logit_prob": o.desired_logit_prob,
            "max_feature_nodes": o.max_feature_nodes}


def _circuit_role(graph: AttributionGraph, o: CircuitOptions, pair: str) -> CircuitRole:
    slug = f"{pair}-{graph.role}"
    return CircuitRole(
        graph=graph.to_json(slug, node_threshold=o.node_threshold, edge_threshold=o.edge_threshold),
        summary=graph.summary(o.node_threshold, o.edge_threshold),
        top_paths=graph.top_paths(graph.logit_start, k=o.top_paths) if o.top_paths else [],
    )


def _run_circuit(ctx: RunContext) -> CircuitResult:
    o: CircuitOptions = ctx.options  # type: ignore[assignment]
    prompt = ctx.inputs.texts[0]
    target: dict[str, Any] = dict(ctx.inputs.extra["target"])

    def one(model, progress) -> CircuitRole:
        tset = cached_transcoders_for(ctx.pair, model.role, model)
        graph = attribute(model, tset, prompt, pair=ctx.pair.name, progress=progress, **_attribute_kwargs(o), **target)
        if not target:  # the other roles explain the same logits as the first
            target["target_tokens"] = [t.vocab_idx for t in graph.logit_targets]
        return _circuit_role(graph, o, ctx.pair.name)

    roles = run_per_role(ctx.models, one, ctx.progress, order=ROLES)
    manifest = make_manifest("circuit", ctx.models, pair=ctx.pair.name, seed=ctx.request.seed,
                             options=o.model_dump(mode="json"))
    return CircuitResult(manifest=manifest, prompt=prompt, roles=roles)


def _run_circuit_diff(ctx: RunContext) -> CircuitDiffResult:
    o: CircuitOptions = ctx.options  # type: ignore[assignment]
    roles = [r for r in ROLES if r in ctx.models]
    prompt = ctx.inputs.texts[0]
    transcoders = {r: cached_transcoders_for(ctx.pair, r, ctx.models[r]) for r in roles}
    graphs, diff = paired_circuits(ctx.models, transcoders, prompt, roles=roles, node_threshold=o.node_threshold,
                                   edge_threshold=o.edge_threshold, pair=ctx.pair.name, progress=ctx.progress,
                                   **_attribute_kwargs(o), **ctx.inputs.extra["target"])
    manifest = make_manifest("circuit-diff", ctx.models, pair=ctx.pair.name, seed=ctx.request.seed,
                             options=o.model_dump(mode="json"))
    return CircuitDiffResult(manifest=manifest, prompt=prompt, diff=diff,
                             roles={r: _circuit_role(graphs[r], o, ctx.pair.name) for r in roles})


def _summarize_circuit(result) -> str:
    lines = [f"{'role':<9} {'features':>9} {'kept nodes':>11} {'edges':>7} {'replacement':>12} {'completeness':>13}"]
    for role, r in result.roles.items():
        s = r.summary
        lines.append(f"{role:<9} {s.n_active_features:>9} {s.n_pruned_nodes:>11} {s.n_pruned_edges:>7} "
                     f"{s.replacement_score:>12.3f} {s.completeness_score:>13.3f}")
    if getattr(result, "diff", None) is not None:
        d = result.diff
        lines.append(f"matched nodes {len(d.matched_nodes)}, only {d.roles[0]} {len(d.only_a)}, "
                     f"only {d.roles[1]} {len(d.only_b)}, node Jaccard {d.node_jaccard:.3f}")
    return "\n".join(lines)


register(Kind("circuit", "Attribution graph of one prompt per role through the role's transcoders (circuit-tracer "
              "JSON, pruned by influence; replacement and completeness scores; top paths)",
              "prompt", CircuitOptions, _run_circuit, prepare=_prepare_target, summarize=_summarize_circuit,
              resources=_transcoder_resources))
register(Kind("circuit-diff", "The attribution graphs of one prompt on two roles and their diff: features matched "
              "by decoder cosine, matched / gained / lost nodes, edge weight changes, scores side by side",
              "prompt", CircuitOptions, _run_circuit_diff, min_roles=2, max_roles=2,
              default_roles=("original", "ln_free"), prepare=_prepare_target,
              summarize=_summarize_circuit, resources=_transcoder_resources))


# -- feature pages ----------------------------------------------------------------------------
class FeatureOptions(_Options):
    layer: int = Field(ge=0, le=1000, examples=[1])
    feature: int = Field(ge=0, le=10_000_000, examples=[42], description="the feature's index in its layer's transcoder")
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


def _run_feature(ctx: RunContext) -> FeatureResult:
    o: FeatureOptions = ctx.options  # type: ignore[assignment]

    def one(model, progress) -> FeaturePage:
        progress.stage("feature page", 0.0)
        tset = cached_transcoders_for(ctx.pair, model.role, model)
        if o.layer not in tset.transcoders:
            raise RequestError(["body", "options", "layer"],
                               f"layer {o.layer} has no transcoder for {model.role} (layers {sorted(tset.transcoders)})")
        d_tc = tset[o.layer].d_transcoder
        if o.feature >= d_tc:
            raise RequestError(["body", "options", "feature"],
                               f"feature {o.feature} out of range: layer {o.layer} of {model.role} has {d_tc} features")
        index = feature_index_for(ctx.pair, model.role)
        if o.layer not in index.layers or o.feature >= index.top_acts[o.layer].shape[0]:
            raise TranscoderFormatError(
                f"the feature index of {model.role} does not cover layer {o.layer} feature {o.feature} (indexed layers "
                f"{index.layers}); rebuild it with `lnscope train-transcoders` or build_feature_index")
        return feature_page(model, tset, index, o.layer, o.feature,
                            n_contexts=o.n_contexts, n_tokens=o.n_tokens, pair=ctx.pair.name)

    roles = run_per_role(ctx.models, one, ctx.progress, order=ROLES)
    manifest = make_manifest("feature", ctx.models, pair=ctx.pair.name, seed=ctx.request.seed,
                             options=o.model_dump(mode="json"))
    return FeatureResult(manifest=manifest, layer=o.layer, feature=o.feature, roles=roles)


def _summarize_feature(result) -> str:
    lines = []
    for role, page in result.roles.items():
        promoted = ", ".join(repr(t.token) for t in page.promoted[:5])
        lines.append(f"{role}: L{page.layer} #{page.feature} fires on {page.firing_rate:.2%} of tokens, "
                     f"max {page.max_activation:.3g}; promotes {promoted}")
    return "\n".join(lines)


register(Kind("feature", "A transcoder feature's page per role: top-activating contexts over the pair's eval text, "
              "activation histogram, tokens promoted and suppressed through W_dec W_U",
              "none", FeatureOptions, _run_feature, summarize=_summarize_feature, resources=_transcoder_resources))
