"""The `dla` kind: direct logit attribution per role under three LN treatments, differences vs original."""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import Field

from lnscope.analysis import dla as dla_module
from lnscope.analysis.dla import DLAModelResult, DLAResult, DLATarget, head_differences
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


class DLAOptions(KindOptions):
    target: TargetIn | None = Field(default=None, description="default with a task: its metric "
                                    "(e.g. IOI logit(IO) - logit(S))")
    treatments: list[Literal["cached_scale", "direct_effect", "raw"]] = Field(
        default=["cached_scale", "direct_effect", "raw"], min_length=1)
    top_k_neurons: int = Field(default=20, ge=0, le=200)
    n_bootstrap: int = Field(default=1000, ge=0, le=10000)


def target_from(options: Any, inputs: Inputs, tokenizer) -> DLATarget:
    """The request's target: the named logit (difference), or the task's metric when none is named."""
    if options.target is None:
        if inputs.task is None:
            raise RequestError(["body", "options", "target"], "prompts need a target (a logit or a logit difference)")
        try:
            return DLATarget.from_task(inputs.task)
        except ValueError as exc:
            raise RequestError(["body", "task"], str(exc)) from None
    t = options.target
    token = single_token(tokenizer, t.token, ["body", "options", "target", "token"])
    if t.kind == "logit":
        return DLATarget.logit(token)
    if t.other is None:
        raise RequestError(["body", "options", "target", "other"], "a logit_diff target needs `other`")
    return DLATarget.logit_diff(token, single_token(tokenizer, t.other, ["body", "options", "target", "other"]))


def prepare(options: DLAOptions, inputs: Inputs, tokenizer, limits: Limits, n_ctx: int) -> dict[str, Any]:
    return {"target": target_from(options, inputs, tokenizer)}


def unit(ctx: UnitContext) -> DLAModelResult:
    o: DLAOptions = ctx.options
    return dla_module.dla(ctx.model, ctx.inputs.tokens, target=ctx.inputs.extra["target"], end_pos=ctx.inputs.end_pos,
                          treatments=o.treatments, top_k_neurons=o.top_k_neurons, n_bootstrap=o.n_bootstrap,
                          seed=ctx.seed, progress=ctx.progress)


def combine(partials: Mapping[str, DLAModelResult], ctx: CombineContext) -> DLAResult:
    """The roles side by side, with per-head differences against `original`."""
    return DLAResult(manifest=ctx.manifest, roles=dict(partials), head_diffs=head_differences(partials))


def summarize(result: DLAResult) -> str:
    lines = [f"{'role':<9} {'target':>9} {'NMAE % (cached scale vs DE)':>30} {'top head':>10}"]
    for role, r in result.roles.items():
        t = r.treatments.get("cached_scale") or next(iter(r.treatments.values()))
        heads = [(abs(v), f"L{layer}H{h}") for layer, row in enumerate(t.heads) for h, v in enumerate(row)]
        err = r.errors.get("cached_scale")
        nmae = f"{err.nmae.value:.3g} [{err.nmae.ci_low:.3g}, {err.nmae.ci_high:.3g}]" if err else "-"
        mean_target = sum(r.target_value) / len(r.target_value)
        lines.append(f"{role:<9} {mean_target:>9.3f} {nmae:>30} {max(heads)[1]:>10}")
    return "\n".join(lines)
