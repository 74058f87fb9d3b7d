"""Every analysis kind, written out: name, inputs, options, per-role unit, combine step and helpers.

`lnscope.analysis.pipeline` turns a request into a prepared run of one of these kinds and runs it.
"""

from __future__ import annotations

from lnscope.analysis.kinds import circuits, confidence, costs, dla, intervene, ln_stats, patching
from lnscope.analysis.kinds.base import (
    CombineContext,
    Inputs,
    Kind,
    KindOptions,
    Limits,
    NoOptions,
    RequestError,
    TargetIn,
    UnitContext,
)

KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("dla", "Direct logit attribution per head, layer and neuron under three LN treatments, with the error of "
         "DLA against the true direct effect (NMAE, bootstrap CI)",
         cost=costs.cost_dla,
         inputs="prompts_or_task", options=dla.DLAOptions, prepare=dla.prepare, unit=dla.unit, combine=dla.combine,
         summarize=dla.summarize),
    Kind("ln-stats", "Per token and layer: ln1/ln2/ln_final scales of models with LN, the frozen constants of the "
         "LN-free twin, and residual-stream norms",
         cost=costs.cost_ln_stats,
         inputs="prompts_or_task", options=ln_stats.LNStatsOptions, prepare=ln_stats.prepare_ln_stats,
         unit=ln_stats.ln_stats_unit, combine=ln_stats.combine_ln_stats, summarize=ln_stats.summarize_ln_stats,
         result_order="paper"),
    Kind("loss", "Held-out cross-entropy of each role (mean, bootstrap CI, per token) and the paper's table: "
         "original / control / LN-free with gaps",
         cost=costs.cost_loss,
         inputs="text", options=ln_stats.LossOptions, unit=ln_stats.loss_unit, combine=ln_stats.combine_loss,
         summarize=ln_stats.summarize_loss, result_order="paper"),
    Kind("confidence-neurons", "Confidence (entropy) neurons: W_out norm, null-space fraction rho, LogitVar, "
         "mean-ablation total vs direct effect on loss and entropy, LN-mediated fraction",
         cost=costs.cost_confidence,
         inputs="text", options=confidence.ConfidenceOptions, prepare=confidence.prepare, unit=confidence.unit,
         shares=confidence.shares, combine=confidence.combine, summarize=confidence.summarize),
    Kind("attribution-patching", "Attribution patching (AtP, denoising) and AtP* (QK fix) at resid_pre, heads, head "
         "queries/keys/values, MLPs and neurons: two forwards and one backward",
         cost=costs.cost_atp,
         inputs="task", options=patching.AtPOptions, unit=patching.atp_unit,
         combine=patching.combine_roles("attribution-patching")),
    Kind("activation-patching", "Activation patching ground truth at the same nodes, many patched nodes per forward "
         "pass", cost=costs.cost_act_patch,
         inputs="task", options=patching.ActPatchOptions, unit=patching.act_patch_unit,
         combine=patching.combine_roles("activation-patching")),
    Kind("patching-fidelity", "AtP and AtP* against activation patching over a task set: Pearson, Spearman, top-k "
         "recall, normalised error (mean and 95% CI per node)",
         cost=costs.cost_fidelity,
         inputs="task", options=patching.FidelityOptions, prepare=patching.prepare_groups,
         unit=patching.fidelity_unit, combine=patching.combine_roles("patching-fidelity"),
         summarize=patching.summarize_fidelity),
    Kind("circuit", "Attribution graph of one prompt per role through the role's transcoders (circuit-tracer JSON, "
         "pruned by influence; replacement and completeness scores; top paths)",
         cost=costs.cost_circuit,
         inputs="prompt", options=circuits.CircuitOptions, prepare=circuits.prepare_target,
         resources=circuits.transcoder_resources, unit=circuits.circuit_unit, shares=circuits.shares_targets,
         combine=circuits.combine_circuit, summarize=circuits.summarize_circuit, result_order="roles"),
    Kind("circuit-diff", "The attribution graphs of one prompt on two roles and their diff: features matched by "
         "decoder cosine, matched / gained / lost nodes, edge weight changes, scores side by side",
         cost=costs.cost_circuit_diff,
         inputs="prompt", options=circuits.CircuitOptions, prepare=circuits.prepare_target,
         resources=circuits.transcoder_resources, unit=circuits.circuit_diff_unit, shares=circuits.shares_targets,
         combine=circuits.combine_circuit_diff, summarize=circuits.summarize_circuit, result_order="roles",
         min_roles=2, max_roles=2, default_roles=("original", "ln_free")),
    Kind("feature", "A transcoder feature's page per role: top-activating contexts over the pair's eval text, "
         "activation histogram, tokens promoted and suppressed through W_dec W_U",
         cost=costs.cost_feature,
         inputs="none", options=circuits.FeatureOptions, resources=circuits.transcoder_resources,
         unit=circuits.feature_unit, combine=circuits.combine_feature, summarize=circuits.summarize_feature,
         result_order="roles"),
    Kind("intervene", "Ablate heads, neurons, MLPs or the residual stream, edit transcoder features or steer, in every "
         "role: next-token top-k, KL, metric change, and each edit's actual change against its linear prediction",
         cost=intervene.cost,
         inputs="prompts_or_task", options=intervene.IntervenOptions, prepare=intervene.prepare, unit=intervene.unit,
         shares=intervene.shares, combine=intervene.combine, summarize=intervene.summarize),
)}

__all__ = ["KINDS", "CombineContext", "Inputs", "Kind", "KindOptions", "Limits", "NoOptions", "RequestError",
           "TargetIn", "UnitContext"]
