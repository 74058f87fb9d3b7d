"""The `confidence-neurons` kind: entropy-neuron candidates per role, with the same neurons in every role.

The lead role (original where requested) picks the candidate neurons from its own weights; the other
roles score the same neurons, so the table compares like with like.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping

from pydantic import BaseModel, Field

from lnscope.analysis import confidence_neurons as cn
from lnscope.analysis.kinds.base import CombineContext, Inputs, KindOptions, Limits, UnitContext
from lnscope.analysis.kinds.ln_stats import text_tokens


class ConfidenceOptions(KindOptions):
    layer: int = Field(default=-1, description="the MLP layer (negative counts from the end)")
    candidates: list[Annotated[str, Field(pattern=r"^\d+\.\d+$")]] | None = Field(
        default=None, max_length=200, examples=[["3.17", "3.101"]],
        description='neurons as "L.N"; default: known entropy neurons of the pair or top by norm x rho')
    k: int | None = Field(default=None, ge=1, description="bottom singular directions of W_U (default 1% of d_model)")
    top_n: int = Field(default=20, ge=1, le=500)
    propagate: bool = Field(default=False, description="re-run later layers (true total effect) instead of the "
                            "direct-to-output ablation")
    rank_by: Literal["total_loss", "norm_rho"] = "total_loss"
    max_tokens: int = Field(default=4096, ge=16, le=200_000, description="sample tokens at most")


def prepare(options: ConfidenceOptions, inputs: Inputs, tokenizer, limits: Limits, n_ctx: int) -> dict[str, Any]:
    return text_tokens(inputs, tokenizer, n_ctx, max_tokens=options.max_tokens)


class ConfidencePartial(BaseModel):
    """One role's analysis and the candidate neurons it scored (layer indices, in the order given)."""

    result: cn.ConfidenceModelResult
    candidates: list[int]


def unit(ctx: UnitContext) -> ConfidencePartial:
    """confidence_neurons on this role; the lead role resolves the layer and candidates, the others reuse them."""
    o: ConfidenceOptions = ctx.options
    if ctx.shared:
        layer, idx, source = ctx.shared["layer"], ctx.shared["candidates"], ctx.shared["candidate_source"]
    else:
        layer = cn.resolve_layer(ctx.model, o.layer)
        idx, source = cn.resolve_candidates(ctx.model, layer, o.candidates, pair=ctx.pair_name, top_n=o.top_n, k=o.k)
    result = cn.confidence_neurons(
        ctx.model, ctx.inputs.extra["tokens"], layer=layer, candidates=idx, k=o.k, top_n=o.top_n,
        lengths=ctx.inputs.extra["lengths"], propagate=o.propagate, rank_by=o.rank_by, pair=ctx.pair_name,
        progress=ctx.progress, _candidate_source=source)
    return ConfidencePartial(result=result, candidates=list(idx))


def shares(partial: ConfidencePartial) -> dict[str, Any]:
    """The lead's layer and candidate neurons, for every other role."""
    return {"layer": partial.result.layer, "candidates": partial.candidates,
            "candidate_source": partial.result.candidate_source}


def combine(partials: Mapping[str, ConfidencePartial], ctx: CombineContext) -> cn.ConfidenceResult:
    """The roles side by side, and the lead's top entropy-neuron candidate seen in every role."""
    roles = {role: p.result for role, p in partials.items()}
    ref = partials[ctx.lead]
    return cn.ConfidenceResult(
        manifest=ctx.manifest, pair=ctx.pair_name, layer=ref.result.layer,
        candidates=[cn.neuron_id(ref.result.layer, i) for i in ref.candidates],
        candidate_source=ref.result.candidate_source, roles=roles, top_candidate=cn.top_candidate(roles, ctx.lead))


def summarize(result: cn.ConfidenceResult) -> str:
    lines = [f"{'role':<9} {'neuron':>8} {'norm':>7} {'rho':>6} "
             f"{'|dLoss| total':>14} {'direct':>9} {'LN-mediated':>12}"]
    for role, r in result.roles.items():
        for n in r.neurons[:5]:
            frac = "-" if n.ln_mediated_fraction_loss is None else f"{n.ln_mediated_fraction_loss:.3f}"
            lines.append(f"{role:<9} {n.neuron:>8} {n.w_out_norm:>7.2f} {n.rho:>6.3f} "
                         f"{n.abs_dloss_total:>14.4g} {n.abs_dloss_direct:>9.4g} {frac:>12}")
    return "\n".join(lines)
