"""The `ln-stats` and `loss` kinds: LN scales and residual norms per role; held-out CE and the paper's table."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import Field

from lnscope.analysis.kinds.base import CombineContext, Inputs, KindOptions, Limits, RequestError, UnitContext
from lnscope.analysis.ln_stats import (
    LNStatsModelResult,
    LNStatsResult,
    LossModelResult,
    LossResult,
    ce_table,
    ln_layer_table,
    ln_stats,
    loss,
    text_sequences,
)
from lnscope.analysis.tasks.base import pad_id, pad_right


def text_tokens(inputs: Inputs, tokenizer, n_ctx: int, max_tokens: int | None = None,
                max_rows: int | None = None) -> dict[str, Any]:
    """Text as BOS-prefixed, right-padded context-length chunks: tokens [batch, pos] and lengths [batch]."""
    seqs = text_sequences(tokenizer, inputs.texts, n_ctx, max_tokens=max_tokens)[:max_rows]
    if not seqs:
        raise RequestError(["body", "text"], "the text has fewer than two tokens")
    return {"tokens": pad_right(seqs, pad_id(tokenizer)), "lengths": [len(s) for s in seqs]}


# -- ln-stats -----------------------------------------------------------------------------------
class LNStatsOptions(KindOptions):
    per_prompt: bool = Field(default=True, description="also return per-prompt trajectories")


def prepare_ln_stats(options: LNStatsOptions, inputs: Inputs, tokenizer, limits: Limits, n_ctx: int) -> dict[str, Any]:
    """Text inputs become the first context-length chunk of each text (at most max_prompts rows)."""
    if inputs.tokens is None:
        return text_tokens(inputs, tokenizer, n_ctx, max_rows=limits.max_prompts)
    return {"tokens": inputs.tokens, "lengths": None if inputs.end_pos is None else (inputs.end_pos + 1).tolist()}


def ln_stats_unit(ctx: UnitContext) -> LNStatsModelResult:
    extra = ctx.inputs.extra
    return ln_stats(ctx.model, extra["tokens"], lengths=extra["lengths"], per_prompt=ctx.options.per_prompt,
                    progress=ctx.progress)


def combine_ln_stats(partials: Mapping[str, LNStatsModelResult], ctx: CombineContext) -> LNStatsResult:
    return LNStatsResult(manifest=ctx.manifest, roles=dict(partials), layer_table=ln_layer_table(partials))


def summarize_ln_stats(result: LNStatsResult) -> str:
    roles = list(result.roles)
    lines = [f"{'LN':<12}" + "".join(f"{r:>14}" for r in roles) + "   (scale with LN / frozen sigma LN-free)"]
    for row in result.layer_table:
        name = row.site if row.layer is None else f"{row.site} L{row.layer}"
        cells = "".join(f"{'-' if row.values.get(r) is None else f'{row.values[r]:.4g}':>14}" for r in roles)
        lines.append(f"{name:<12}{cells}")
    norms = "  ".join(f"{r}: {result.roles[r].resid_norm_layer_mean[-1]:.4g}" for r in roles)
    lines.append(f"final residual norm  {norms}")
    return "\n".join(lines)


# -- loss ---------------------------------------------------------------------------------------
class LossOptions(KindOptions):
    max_tokens: int = Field(default=8192, ge=16, le=1_000_000, description="predicted tokens at most")
    n_bootstrap: int = Field(default=1000, ge=0, le=10000)
    per_token: bool = Field(default=False, description="also return every token's loss")


def loss_unit(ctx: UnitContext) -> LossModelResult:
    o: LossOptions = ctx.options
    return loss(ctx.model, ctx.inputs.texts, max_tokens=o.max_tokens, n_bootstrap=o.n_bootstrap, seed=ctx.seed,
                per_token=o.per_token, progress=ctx.progress)


def combine_loss(partials: Mapping[str, LossModelResult], ctx: CombineContext) -> LossResult:
    return LossResult(manifest=ctx.manifest, roles=dict(partials), table=ce_table(partials))


def summarize_loss(result: LossResult) -> str:
    lines = [f"{'model':<9} {'CE (nats)':>10} {'95% CI':>20} {'gap':>8}"]
    for row in result.table:
        gap = "" if row.gap_vs_original is None else f"{row.gap_vs_original:+.4f}"
        lines.append(f"{row.role:<9} {row.ce:>10.4f} {f'[{row.ci_low:.4f}, {row.ci_high:.4f}]':>20} {gap:>8}")
    return "\n".join(lines)
