"""The `intervene` kind: ablate, edit and steer components in every requested role, against the linear prediction.

The lead role (original where requested) runs first; the other roles edit the same heads, neurons and MLPs by
index and the lead's transcoder features through decoder-cosine matching (circuit-diff's matching).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from pydantic import Field

from lnscope.analysis.eval_text import PACKAGED, pair_eval_text, split_documents
from lnscope.analysis.interventions.edits import (
    AblateHead,
    Edit,
    EditError,
    FeatureEdit,
    LogitDirection,
    Steer,
    edit_label,
)
from lnscope.analysis.interventions.means import MEAN_TOKENS, cached_means
from lnscope.analysis.interventions.resolve import FeatureMatch, ModelParts, resolve_edit
from lnscope.analysis.interventions.results import (
    EditDifference,
    InterventionResult,
    RoleDifference,
    RoleIntervention,
)
from lnscope.analysis.interventions.run import Prompts, corrupt_activations, intervene, unapplied
from lnscope.analysis.interventions.sites import Sources
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
from lnscope.analysis.kinds.costs import Cost, ModelShape, n_prompts
from lnscope.analysis.kinds.dla import target_from


class IntervenOptions(KindOptions):
    edits: list[Edit] = Field(min_length=1, max_length=16, description="applied together; each also alone")
    target: TargetIn | None = Field(default=None, description="the metric; default with a task: its metric")
    top_k: int = Field(default=10, ge=1, le=100, description="next tokens listed, clean and intervened")
    continuation_tokens: int = Field(default=0, ge=0, le=32, description="greedy continuation of both runs")


# -- prepare --------------------------------------------------------------------------------------
def _loc(i: int, *fields: str | int) -> list[str | int]:
    return ["body", "options", "edits", i, *fields]


def absolute_positions(positions, end: list[int], loc: list[str | int]) -> list[list[int]] | None:
    """Each prompt's absolute positions (None: all); p < 0 counts back from the end position (-1 = it)."""
    if positions == "all":
        return None
    wanted = [positions] if isinstance(positions, int) else list(positions)
    out = []
    for row_end in end:
        row = []
        for j, p in enumerate(wanted):
            absolute = p if p >= 0 else row_end + 1 + p
            if not 0 <= absolute <= row_end:
                where = loc if isinstance(positions, int) else loc + [j]
                raise RequestError(where, f"position {p} is out of range for a prompt of {row_end + 1} tokens "
                                   f"(0..{row_end}, or -1..-{row_end + 1} from its end)")
            row.append(absolute)
        out.append(sorted(set(row)))
    return out


def check_edit(i: int, edit, has_task: bool, tokenizer) -> int | None:
    """The edit's checks that need no model; the token id of a logit steering direction."""
    how = getattr(edit, "how", "zero")
    if how == "resample" and not has_task:
        raise RequestError(_loc(i, "how"), "resample ablation needs a task (its corrupt prompts)")
    if isinstance(edit, AblateHead) and edit.scope == "direct" and edit.what != "output":
        raise RequestError(_loc(i, "scope"), "the direct-path scope applies to head output ablation only")
    if isinstance(edit, FeatureEdit) and (edit.set is None) == (edit.scale is None):
        raise RequestError(_loc(i, "set" if edit.set is not None else "scale"),
                           "give exactly one of `set` and `scale`")
    if isinstance(edit, Steer):
        if not math.isfinite(edit.alpha):
            raise RequestError(_loc(i, "alpha"), "alpha must be finite")
        if isinstance(edit.direction, LogitDirection):
            return single_token(tokenizer, edit.direction.logit, _loc(i, "direction", "logit"))
    return None


def prepare(options: IntervenOptions, inputs: Inputs, tokenizer, limits: Limits, n_ctx: int) -> dict[str, Any]:
    """The target, each edit's absolute positions per prompt and logit-direction token ids."""
    target = target_from(options, inputs, tokenizer)
    end = inputs.end_pos.tolist()
    logit_tokens = [check_edit(i, e, inputs.task is not None, tokenizer) for i, e in enumerate(options.edits)]
    positions = [absolute_positions(e.positions, end, _loc(i, "positions")) for i, e in enumerate(options.edits)]
    return {"target": target, "positions": positions, "logit_tokens": logit_tokens}


# -- unit -----------------------------------------------------------------------------------------
def _transcoders(ctx: UnitContext):
    from lnscope.analysis.transcoders.formats import cached_transcoders_for, missing_transcoders_message

    if ctx.pair is None:
        raise RequestError(["body", "pair"], "transcoder feature edits need a pair with transcoders")
    if (message := missing_transcoders_message(ctx.pair, ctx.role)) is not None:
        raise RequestError(["body", "roles"], message)
    return cached_transcoders_for(ctx.pair, ctx.role, ctx.model)


def _matcher(ctx: UnitContext, lead: str):
    """(layer, lead feature) -> this role's feature: itself in the lead, else the decoder-cosine match."""
    if ctx.role == lead:
        return lambda layer, feature: FeatureMatch(feature, None)
    from lnscope.analysis.kinds.circuits import pair_feature_matching

    def match(layer: int, feature: int) -> FeatureMatch:
        matching = pair_feature_matching(ctx.pair, lead, ctx.role)
        other = matching.match(layer, feature)
        return FeatureMatch(other, float(matching.cos[layer][feature]) if other >= 0 else None)

    return match


def _eval_text(ctx: UnitContext) -> tuple[Callable[[], list[str]], str]:
    """The text means are taken over (read when first needed) and its cache key: the pair's eval text, or the
    packaged sample without a pair."""
    if ctx.pair is None:
        return lambda: split_documents(PACKAGED.read_text()), "packaged"
    pair = ctx.pair
    return lambda: pair_eval_text(pair), f"pair:{pair.name}"


def _sources(ctx: UnitContext, resolved) -> Sources:
    mean_hooks = [h for e in resolved for h in e.mean_hooks]
    corrupt_hooks = [h for e in resolved for h in e.corrupt_hooks]
    sources = Sources()
    if mean_hooks:
        ctx.progress.stage("intervene: eval-text means", 0.0)
        texts, key = _eval_text(ctx)
        sources.means = cached_means(ctx.model, mean_hooks, texts, key, int(ctx.model.bridge.cfg.n_ctx))
    if corrupt_hooks:
        sources.corrupt = corrupt_activations(ctx.model, ctx.inputs.task.corrupt_tokens, corrupt_hooks)
    return sources


def unit(ctx: UnitContext) -> RoleIntervention:
    """Resolve (and check) every edit for this role, then run them: clean, together, each alone."""
    o: IntervenOptions = ctx.options
    extra = ctx.inputs.extra
    lead = ctx.shared.get("lead", ctx.role)
    parts = ModelParts(model=ctx.model, transcoders=lambda: _transcoders(ctx), match=_matcher(ctx, lead))
    resolved, skipped, features = [], [], {}
    n = int(ctx.inputs.tokens.shape[0])
    for i, edit in enumerate(o.edits):
        try:
            r = resolve_edit(i, edit, parts, extra["positions"][i], extra["logit_tokens"][i])
        except EditError as exc:
            raise RequestError(exc.loc, exc.message) from None
        if isinstance(edit, FeatureEdit):
            match = parts.match(edit.layer, edit.feature)
            features[i] = (match.feature, match.cos)
        if r is None:
            skipped.append(unapplied(i, edit_label(edit), n, features.get(i, (None,))[0]))
        else:
            resolved.append(r)
    prompts = Prompts(tokens=ctx.inputs.tokens, end=ctx.inputs.end_pos)
    return intervene(ctx.model, prompts, extra["target"], resolved, sources=_sources(ctx, resolved), skipped=skipped,
                     features=features, top_k=o.top_k, continuation_tokens=o.continuation_tokens,
                     progress=ctx.progress)


def shares(partial: RoleIntervention) -> dict[str, Any]:
    """The lead's role: every other role edits the features matched with the lead's."""
    return {"lead": partial.role}


# -- combine --------------------------------------------------------------------------------------
def role_difference(role: RoleIntervention, reference: RoleIntervention) -> RoleDifference:
    ref_edits = {e.index: e for e in reference.edits}
    return RoleDifference(
        metric_change=role.mean_metric_change - reference.mean_metric_change,
        kl=role.mean_kl - reference.mean_kl,
        edits=[EditDifference(index=e.index, label=e.label, actual=e.mean_actual - ref_edits[e.index].mean_actual,
                              prediction_gap=e.mean_gap - ref_edits[e.index].mean_gap)
               for e in role.edits if e.index in ref_edits])


def combine(partials: Mapping[str, RoleIntervention], ctx: CombineContext) -> InterventionResult:
    """The roles side by side, and each other role minus the original (the lead without one)."""
    reference = "original" if "original" in partials else ctx.lead
    return InterventionResult(
        manifest=ctx.manifest, lead=ctx.lead, roles=dict(partials),
        differences={f"{role} - {reference}": role_difference(p, partials[reference])
                     for role, p in partials.items() if role != reference})


def summarize(result: InterventionResult) -> str:
    lines = [f"{'role':<9} {'metric':>9} {'change':>9} {'KL':>8}   edits: actual / predicted"]
    for role, r in result.roles.items():
        edits = "; ".join(f"{e.label}: {e.mean_actual:.3g} / {e.mean_predicted:.3g}" for e in r.edits)
        lines.append(f"{role:<9} {r.mean_metric_clean:>9.3f} {r.mean_metric_change:>9.3f} {r.mean_kl:>8.4f}   {edits}")
    return "\n".join(lines)


def cost(options: IntervenOptions, inputs: Inputs, shape: ModelShape) -> Cost:
    """Per prompt: clean, all edits (more than one), each alone, the corrupt run (resample), 2 per continued
    token; plus the eval-text passes of mean ablation."""
    edits = options.edits
    per_prompt = 1 + len(edits) + (len(edits) > 1) + any(getattr(e, "how", "") == "resample" for e in edits)
    per_prompt += 2 * options.continuation_tokens
    means = math.ceil(MEAN_TOKENS / max(shape.n_ctx - 1, 1)) if any(getattr(e, "how", "") == "mean"
                                                                    for e in edits) else 0
    return Cost(forward_passes=n_prompts(inputs) * per_prompt + means)
