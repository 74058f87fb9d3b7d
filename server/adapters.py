"""Adapters registering the built-in analysis kinds: request -> analysis/ call -> result.

Each adapter only translates: token strings to ids, a task to its batch, options to keyword
arguments. The maths lives in analysis/.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from analysis import dla as dla_module
from analysis import ln_stats as ln_stats_module

from server.kinds import Inputs, Kind, RequestError, RunContext, register


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


register(Kind("dla", "Direct logit attribution per head, layer and neuron under three LN treatments, "
              "with the error of DLA against the true direct effect (NMAE, bootstrap CI)",
              "prompts_or_task", DLAOptions, _run_dla, prepare=_prepare_dla))


# -- LN statistics and loss -------------------------------------------------------------------
class LNStatsOptions(_Options):
    per_prompt: bool = Field(default=True, description="also return per-prompt trajectories")



def _run_ln_stats(ctx: RunContext):
    tokens, lengths = ctx.inputs.tokens, None
    if tokens is None:  # text: BOS + the first context-length chunk of each text
        n_ctx = min(m.bridge.cfg.n_ctx for m in ctx.models.values())
        tokenizer = next(iter(ctx.models.values())).tokenizer
        seqs = ln_stats_module.text_sequences(tokenizer, ctx.inputs.texts, n_ctx)[: ctx.settings.max_prompts]
        from analysis.tasks.base import pad_right, pad_id

        tokens, lengths = pad_right(seqs, pad_id(tokenizer)), [len(s) for s in seqs]
    elif ctx.inputs.end_pos is not None:
        lengths = (ctx.inputs.end_pos + 1).tolist()
    return ln_stats_module.ln_stats_trio(ctx.models, tokens, pair=ctx.pair.name, lengths=lengths,
                                         per_prompt=ctx.options.per_prompt, progress=ctx.progress)



register(Kind("ln-stats", "Per token and layer: ln1/ln2/ln_final scales of models with LN, the frozen "
              "constants of the LN-free twin, and residual-stream norms",
              "prompts_or_task", LNStatsOptions, _run_ln_stats))


class LossOptions(_Options):
    max_tokens: int = Field(default=8192, ge=16, le=1_000_000, description="predicted tokens at most")
    n_bootstrap: int = Field(default=1000, ge=0, le=10000)
    per_token: bool = Field(default=False, description="also return every token's loss")


def _run_loss(ctx: RunContext):
    o: LossOptions = ctx.options  # type: ignore[assignment]
    return ln_stats_module.loss_trio(ctx.models, ctx.inputs.texts, pair=ctx.pair.name, max_tokens=o.max_tokens,
                                     n_bootstrap=o.n_bootstrap, seed=ctx.request.seed, per_token=o.per_token,
                                     progress=ctx.progress)


register(Kind("loss", "Held-out cross-entropy of each role (mean, bootstrap CI, per token) and the "
              "paper's table: original / control / LN-free with gaps", "text", LossOptions, _run_loss))


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
    from analysis.tasks.base import pad_id, pad_right

    n_ctx = min(m.bridge.cfg.n_ctx for m in ctx.models.values())
    tokenizer = next(iter(ctx.models.values())).tokenizer
    seqs = ln_stats_module.text_sequences(tokenizer, ctx.inputs.texts, n_ctx, max_tokens=max_tokens)
    if not seqs:
        raise RequestError(["body", "text"], "the text has fewer than two tokens")
    return pad_right(seqs, pad_id(tokenizer)), [len(s) for s in seqs]


def _run_confidence(ctx: RunContext):
    from analysis import confidence_neurons as cn

    o: ConfidenceOptions = ctx.options  # type: ignore[assignment]
    tokens, lengths = _text_tokens(ctx, o.max_tokens)
    # A neuron or layer the model lacks raises ConfidenceNeuronsError: the job fails as invalid (422 inline).
    return cn.confidence_neurons_trio(
        ctx.models, tokens, pair=ctx.pair.name, layer=o.layer, candidates=o.candidates, k=o.k, top_n=o.top_n,
        lengths=lengths, propagate=o.propagate, rank_by=o.rank_by, progress=ctx.progress)


register(Kind("confidence-neurons", "Confidence (entropy) neurons: W_out norm, null-space fraction rho, LogitVar, "
              "mean-ablation total vs direct effect on loss and entropy, LN-mediated fraction",
              "text", ConfidenceOptions, _run_confidence))
