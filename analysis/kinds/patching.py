"""The patching kinds: attribution patching (AtP, AtP*), activation patching, and their fidelity.

Every role patches the same clean / corrupt task prompts with the same metric (the roles share a tokenizer).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import Field

from lnscope.analysis.kinds.base import CombineContext, Inputs, KindOptions, Limits, UnitContext
from lnscope.analysis.patching.activation import activation_patching
from lnscope.analysis.patching.atp import attribution_patching
from lnscope.analysis.patching.fidelity import task_set_fidelity
from lnscope.analysis.patching.nodes import resolve_nodes
from lnscope.analysis.patching.results import ActPatchResult, AtPResult, TaskSetFidelity, TrioResult

NodeName = Literal["resid_pre", "head", "head_pos", "head_q", "head_k", "head_v", "head_q_pos", "head_k_pos",
                   "head_v_pos", "mlp", "neuron", "neuron_pos"]
GROUND_TRUTH_NODES = ["resid_pre", "head", "head_pos", "mlp"]
CHUNK_SIZE = Field(default=None, ge=1, le=1024,
                   description="patched nodes per forward pass (default: 8 on CPU, 32 on GPU)")


class AtPOptions(KindOptions):
    nodes: list[NodeName] = Field(default=["resid_pre", "head", "head_pos", "head_q", "head_k", "head_v", "mlp",
                                           "neuron"], min_length=1)
    qk_fix: bool = Field(default=True, description="AtP*: recompute the attention softmax for patched queries/keys")
    normalize: bool = Field(default=False, description="divide by the clean - corrupt metric gap")


class ActPatchOptions(KindOptions):
    nodes: list[NodeName] = Field(default=GROUND_TRUTH_NODES, min_length=1)
    chunk_size: int | None = CHUNK_SIZE
    normalize: bool = False


class FidelityOptions(KindOptions):
    nodes: list[NodeName] = Field(default=GROUND_TRUTH_NODES, min_length=1)
    qk_fix: bool = True
    chunk_size: int | None = CHUNK_SIZE
    normalize: bool = False
    top_k: int = Field(default=10, ge=1, le=1000)
    group_size: int | None = Field(
        default=None, ge=1, description="prompts per group; the task's prompts form the task set "
        "(default: n_prompts // 5, at least 1, so 5 or more prompts give 5+ groups)")
    n_bootstrap: int = Field(default=1000, ge=0, le=10000)


def atp_unit(ctx: UnitContext) -> AtPResult:
    o: AtPOptions = ctx.options
    t = ctx.inputs.task
    return attribution_patching(ctx.model, t.clean_tokens, t.corrupt_tokens, t, resolve_nodes(o.nodes),
                                qk_fix=o.qk_fix, normalize=o.normalize, progress=ctx.progress)


def act_patch_unit(ctx: UnitContext) -> ActPatchResult:
    o: ActPatchOptions = ctx.options
    t = ctx.inputs.task
    return activation_patching(ctx.model, t.clean_tokens, t.corrupt_tokens, t, resolve_nodes(o.nodes),
                               chunk_size=o.chunk_size, normalize=o.normalize, progress=ctx.progress)


MIN_GROUPS = 5  # a bootstrap CI over fewer groups is unreliable


def default_group_size(n_prompts: int) -> int:
    """Prompts per group when the request names none: n // 5 (at least 1), so n >= 5 prompts give >= 5 groups."""
    return max(1, n_prompts // MIN_GROUPS)


def prepare_groups(options: FidelityOptions, inputs: Inputs, tokenizer, limits: Limits, n_ctx: int) -> dict[str, Any]:
    """The task set: consecutive groups of `group_size` prompts."""
    t = inputs.task
    size = options.group_size or default_group_size(len(t))
    return {"groups": [t.subset(slice(start, start + size)) for start in range(0, len(t), size)]}


def fidelity_unit(ctx: UnitContext) -> TaskSetFidelity:
    o: FidelityOptions = ctx.options
    return task_set_fidelity(ctx.model, ctx.inputs.extra["groups"], resolve_nodes(o.nodes), qk_fix=o.qk_fix,
                             chunk_size=o.chunk_size, normalize=o.normalize, top_k=o.top_k,
                             n_bootstrap=o.n_bootstrap, seed=ctx.seed, progress=ctx.progress)


def combine_roles(kind: str):
    """The combine step of a patching kind: the roles side by side under the result's manifest."""

    def combine(partials: Mapping[str, Any], ctx: CombineContext) -> TrioResult:
        return TrioResult(kind=kind, roles=dict(partials), manifest=ctx.manifest)

    combine.__name__ = f"combine_{kind.replace('-', '_')}"
    return combine


def summarize_fidelity(result: TrioResult) -> str:
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
