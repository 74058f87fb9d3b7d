"""Adapters registering the built-in analysis kinds: request -> analysis/ call -> result.

Each adapter only translates: token strings to ids, a task to its batch, options to keyword
arguments. The maths lives in analysis/.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lnscope.analysis import dla as dla_module
from lnscope.analysis import ln_stats as ln_stats_module

from lnscope.analysis.kinds import Inputs, Kind, RequestError, RunContext, register


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


def single_token(tokenizer, text: str, loc: list[str | int]) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise RequestError(loc, f"{text!r} is {len(ids)} tokens {pieces} for this pair's tokenizer; give a single token")
    return ids[0]


# -- DLA --------------------------------------------------------------------------------------
class TargetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["logit", "logit_diff"] = Field(examples=["logit_diff"])
    token: str = Field(min_length=1, description="the token whose logit is attributed", examples=[" Mary"])
    other: str | None = Field(default=None, min_length=1, description="logit_diff: the token subtracted", examples=[" John"])


class DLAOptions(_Options):
    target: TargetIn | None = Field(default=None, description="default with a task: its metric (e.g. IOI logit(IO) - logit(S))")
    treatments: list[Literal["cached_scale", "direct_effect", "raw"]] = Field(
        default=["cached_scale", "direct_effect", "raw"], min_length=1)
    top_k_neurons: int = Field(default=20, ge=0, le=200)
    n_bootstrap: int = Field(default=1000, ge=0, le=10000)


def _prepare_dla(options: DLAOptions, inputs: Inputs, tokenizer) -> dict[str, Any]:
    if options.target is None:
        if inputs.task is None:
            raise RequestError(["body", "options", "target"], "prompts need a target (a logit or a logit difference)")
        try:
            return {"target": dla_module.DLATarget.from_task(inputs.task)}
        except ValueError as exc:
            raise RequestError(["body", "task"], str(exc)) from None
    t = options.target
    token = single_token(tokenizer, t.token, ["body", "options", "target", "token"])
    if t.kind == "logit":
        return {"target": dla_module.DLATarget.logit(token)}
    if t.other is None:
        raise RequestError(["body", "options", "target", "other"], "a logit_diff target needs `other`")
    other = single_token(tokenizer, t.other, ["body", "options", "target", "other"])
    return {"target": dla_module.DLATarget.logit_diff(token, other)}


def _run_dla(ctx: RunContext):
    o: DLAOptions = ctx.options  # type: ignore[assignment]
    return dla_module.dla_trio(
        ctx.models, ctx.inputs.tokens, ctx.inputs.extra["target"], pair=ctx.pair.name, end_pos=ctx.inputs.end_pos,
        treatments=o.treatments, top_k_neurons=o.top_k_neurons, n_bootstrap=o.n_bootstrap,
        seed=ctx.request.seed, progress=ctx.progress,
    )


def _summarize_dla(result) -> str:
    lines = [f"{'role':<9} {'target':>9} {'NMAE % (cached scale vs DE)':>30} {'top head':>10}"]
    for role, r in result.roles.items():
        t = r.treatments.get("cached_scale") or next(iter(r.treatments.values()))
        heads = [(abs(v), f"L{l}H{h}") for l, row in enumerate(t.heads) for h, v in enumerate(row)]
        err = r.errors.get("cached_scale")
        nmae = f"{err.nmae.value:.3g} [{err.nmae.ci_low:.3g}, {err.nmae.ci_high:.3g}]" if err else "-"
        mean_target = sum(r.target_value) / len(r.target_value)
        lines.append(f"{role:<9} {mean_target:>9.3f} {nmae:>30} {max(heads)[1]:>10}")
    return "\n".join(lines)


register(Kind("dla", "Direct logit attribution per head, layer and neuron under three LN treatments, "
              "with the error of DLA against the true direct effect (NMAE, bootstrap CI)",
              "prompts_or_task", DLAOptions, _run_dla, prepare=_prepare_dla, summarize=_summarize_dla))


# -- LN statistics and loss -------------------------------------------------------------------
class LNStatsOptions(_Options):
    per_prompt: bool = Field(default=True, description="also return per-prompt trajectories")



def _run_ln_stats(ctx: RunContext):
    tokens, lengths = ctx.inputs.tokens, None
    if tokens is None:  # text: BOS + the first context-length chunk of each text
        n_ctx = min(m.bridge.cfg.n_ctx for m in ctx.models.values())
        tokenizer = next(iter(ctx.models.values())).tokenizer
        seqs = ln_stats_module.text_sequences(tokenizer, ctx.inputs.texts, n_ctx)[: ctx.limits.max_prompts]
        from lnscope.analysis.tasks.base import pad_right, pad_id

        tokens, lengths = pad_right(seqs, pad_id(tokenizer)), [len(s) for s in seqs]
    elif ctx.inputs.end_pos is not None:
        lengths = (ctx.inputs.end_pos + 1).tolist()
    return ln_stats_module.ln_stats_trio(ctx.models, tokens, pair=ctx.pair.name, lengths=lengths,
                                         per_prompt=ctx.options.per_prompt, progress=ctx.progress)



def _summarize_ln_stats(result) -> str:
    roles = list(result.roles)
    lines = [f"{'LN':<12}" + "".join(f"{r:>14}" for r in roles) + "   (scale with LN / frozen sigma LN-free)"]
    for row in result.layer_table:
        name = row.site if row.layer is None else f"{row.site} L{row.layer}"
        cells = "".join(f"{'-' if row.values.get(r) is None else f'{row.values[r]:.4g}':>14}" for r in roles)
        lines.append(f"{name:<12}{cells}")
    norms = "  ".join(f"{r}: {result.roles[r].resid_norm_layer_mean[-1]:.4g}" for r in roles)
    lines.append(f"final residual norm  {norms}")
    return "\n".join(lines)


register(Kind("ln-stats", "Per token and layer: ln1/ln2/ln_final scales of models with LN, the frozen "
              "constants of the LN-free twin, and residual-stream norms",
              "prompts_or_task", LNStatsOptions, _run_ln_stats, summarize=_summarize_ln_stats))


class LossOptions(_Options):
    max_tokens: int = Field(default=8192, ge=16, le=1_000_000, description="predicted tokens at most")
    n_bootstrap: int = Field(default=1000, ge=0, le=10000)
    per_token: bool = Field(default=False, description="also return every token's loss")


def _run_loss(ctx: RunContext):
    o: LossOptions = ctx.options  # type: ignore[assignment]
    return ln_stats_module.loss_trio(ctx.models, ctx.inputs.texts, pair=ctx.pair.name, max_tokens=o.max_tokens,
                                     n_bootstrap=o.n_bootstrap, seed=ctx.request.seed, per_token=o.per_token,
                                     progress=ctx.progress)


def _summarize_loss(result) -> str:
    lines = [f"{'model':<9} {'CE (nats)':>10} {'95% CI':>20} {'gap':>8}"]
    for row in result.table:
        gap = "" if row.gap_vs_original is None else f"{row.gap_vs_original:+.4f}"
        lines.append(f"{row.role:<9} {row.ce:>10.4f} {f'[{row.ci_low:.4f}, {row.ci_high:.4f}]':>20} {gap:>8}")
    return "\n".join(lines)


register(Kind("loss", "Held-out cross-entropy of each role (mean, bootstrap CI, per token) and the "
              "paper's table: original / control / LN-free with gaps", "text", LossOptions, _run_loss,
              summarize=_summarize_loss))


# -- confidence neurons -----------------------------------------------------------------------
class ConfidenceOptions(_Options):
    layer: int = Field(default=-1, description="the MLP layer (negative counts from the end)")
    candidates: list[Annotated[str, Field(pattern=r"^\d+\.\d+$")]] | None = Field(default=None, max_length=200, examples=[["3.17", "3.101"]],
                                         description='neurons as "L.N"; default: known entropy neurons of the pair or top by norm x rho')
    k: int | None = Field(default=None, ge=1, description="bottom singular directions of W_U (default 1% of d_model)")
    top_n: int = Field(default=20, ge=1, le=500)
    propagate: bool = Field(default=False, description="re-run later layers (true total effect) instead of the direct-to-output ablation")
    rank_by: Literal["total_loss", "norm_rho"] = "total_loss"
    max_tokens: int = Field(default=4096, ge=16, le=200_000, description="sample tokens at most")


def _text_tokens(ctx: RunContext, max_tokens: int):
    """The text inputs as BOS-prefixed, right-padded chunks: (tokens [batch, pos], lengths [batch])."""
    from lnscope.analysis.tasks.base import pad_id, pad_right

    n_ctx = min(m.bridge.cfg.n_ctx for m in ctx.models.values())
    tokenizer = next(iter(ctx.models.values())).tokenizer
    seqs = ln_stats_module.text_sequences(tokenizer, ctx.inputs.texts, n_ctx, max_tokens=max_tokens)
    if not seqs:
        raise RequestError(["body", "text"], "the text has fewer than two tokens")
    return pad_right(seqs, pad_id(tokenizer)), [len(s) for s in seqs]


def _run_confidence(ctx: RunContext):
    from lnscope.analysis import confidence_neurons as cn

    o: ConfidenceOptions = ctx.options  # type: ignore[assignment]
    tokens, lengths = _text_tokens(ctx, o.max_tokens)
    # A neuron or layer the model lacks raises ConfidenceNeuronsError: the job fails as invalid (422 inline).
    return cn.confidence_neurons_trio(
        ctx.models, tokens, pair=ctx.pair.name, layer=o.layer, candidates=o.candidates, k=o.k, top_n=o.top_n,
        lengths=lengths, propagate=o.propagate, rank_by=o.rank_by, progress=ctx.progress)


def _summarize_confidence(result) -> str:
    lines = [f"{'role':<9} {'neuron':>8} {'norm':>7} {'rho':>6} {'|dLoss| total':>14} {'direct':>9} {'LN-mediated':>12}"]
    for role, r in result.roles.items():
        for n in r.neurons[:5]:
            frac = "-" if n.ln_mediated_fraction_loss is None else f"{n.ln_mediated_fraction_loss:.3f}"
            lines.append(f"{role:<9} {n.neuron:>8} {n.w_out_norm:>7.2f} {n.rho:>6.3f} "
                         f"{n.abs_dloss_total:>14.4g} {n.abs_dloss_direct:>9.4g} {frac:>12}")
    return "\n".join(lines)


register(Kind("confidence-neurons", "Confidence (entropy) neurons: W_out norm, null-space fraction rho, LogitVar, "
              "mean-ablation total vs direct effect on loss and entropy, LN-mediated fraction",
              "text", ConfidenceOptions, _run_confidence, summarize=_summarize_confidence))


# -- patching ------------------------------------------------------------------------------------
NodeName = Literal["resid_pre", "head", "head_pos", "head_q", "head_k", "head_v", "head_q_pos", "head_k_pos",
                   "head_v_pos", "mlp", "neuron", "neuron_pos"]
GROUND_TRUTH_NODES = ["resid_pre", "head", "head_pos", "mlp"]


class AtPOptions(_Options):
    nodes: list[NodeName] = Field(default=["resid_pre", "head", "head_pos", "head_q", "head_k", "head_v", "mlp", "neuron"],
                                  min_length=1)
    qk_fix: bool = Field(default=True, description="AtP*: recompute the attention softmax for patched queries/keys")
    normalize: bool = Field(default=False, description="divide by the clean - corrupt metric gap")


class ActPatchOptions(_Options):
    nodes: list[NodeName] = Field(default=GROUND_TRUTH_NODES, min_length=1)
    chunk_size: int | None = Field(default=None, ge=1, le=1024,
                                  description="patched nodes per forward pass (default: 8 on CPU, 32 on GPU)")
    normalize: bool = False


class FidelityOptions(_Options):
    nodes: list[NodeName] = Field(default=GROUND_TRUTH_NODES, min_length=1)
    qk_fix: bool = True
    chunk_size: int | None = Field(default=None, ge=1, le=1024,
                                  description="patched nodes per forward pass (default: 8 on CPU, 32 on GPU)")
    normalize: bool = False
    top_k: int = Field(default=10, ge=1, le=1000)
    group_size: int = Field(default=8, ge=1, description="prompts per group; the task's prompts form the task set")
    n_bootstrap: int = Field(default=1000, ge=0, le=10000)


def _task(ctx: RunContext):
    return ctx.inputs.task


def _run_atp(ctx: RunContext):
    from lnscope.analysis import patching

    o: AtPOptions = ctx.options  # type: ignore[assignment]
    t = _task(ctx)
    return patching.attribution_patching_trio(ctx.models, t.clean_tokens, t.corrupt_tokens, t, pair=ctx.pair.name,
                                              nodes=o.nodes, qk_fix=o.qk_fix, normalize=o.normalize,
                                              progress=ctx.progress)


def _run_act_patch(ctx: RunContext):
    from lnscope.analysis import patching

    o: ActPatchOptions = ctx.options  # type: ignore[assignment]
    t = _task(ctx)
    return patching.activation_patching_trio(ctx.models, t.clean_tokens, t.corrupt_tokens, t, pair=ctx.pair.name,
                                             nodes=o.nodes, chunk_size=o.chunk_size, normalize=o.normalize,
                                             progress=ctx.progress)


def _run_fidelity(ctx: RunContext):
    from lnscope.analysis import patching

    o: FidelityOptions = ctx.options  # type: ignore[assignment]
    t = _task(ctx)
    groups = [t.subset(slice(start, start + o.group_size)) for start in range(0, len(t), o.group_size)]
    return patching.task_set_fidelity_trio(ctx.models, groups, pair=ctx.pair.name, nodes=o.nodes, qk_fix=o.qk_fix,
                                           chunk_size=o.chunk_size, normalize=o.normalize, top_k=o.top_k,
                                           n_bootstrap=o.n_bootstrap, seed=ctx.request.seed, progress=ctx.progress)


def _summarize_fidelity(result) -> str:
    stats = ("pearson", "spearman", "top_k_recall", "normalized_error")
    lines = [f"{'role':<9} {'node':<10} {'method':<9}" + "".join(f"{s:>18}" for s in stats) + "   (mean over groups)"]
    for role, r in result.roles.items():
        rows: dict[tuple[str, str], dict[str, float | None]] = {}
        for s in r.summaries:
            rows.setdefault((s.node_type, s.method), {})[s.statistic] = s.interval.mean
        for (node, method), values in rows.items():
            cells = "".join(f"{'-' if values.get(s) is None else f'{values[s]:.3f}':>18}" for s in stats)
            lines.append(f"{role:<9} {node:<10} {method:<9}{cells}")
    return "\n".join(lines)


register(Kind("attribution-patching", "Attribution patching (AtP, denoising) and AtP* (QK fix) at resid_pre, heads, "
              "head queries/keys/values, MLPs and neurons: two forwards and one backward",
              "task", AtPOptions, _run_atp))
register(Kind("activation-patching", "Activation patching ground truth at the same nodes, many patched nodes per "
              "forward pass", "task", ActPatchOptions, _run_act_patch))
register(Kind("patching-fidelity", "AtP and AtP* against activation patching over a task set: Pearson, Spearman, "
              "top-k recall, normalised error (mean and 95% CI per node)", "task", FidelityOptions, _run_fidelity,
              summarize=_summarize_fidelity))
