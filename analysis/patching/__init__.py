"""Attribution patching (AtP, AtP*), batched activation patching and their fidelity, per model.

Modules: nodes (node types, hooks), atp (AtP / AtP* QK fix), activation (batched ground truth),
fidelity (correlations, top-k recall, normalised error, task sets), results (pydantic models).
The `attribution-patching`, `activation-patching` and `patching-fidelity` kinds run them on every role
(lnscope.analysis.kinds.patching).
"""

from lnscope.analysis.patching.activation import act_patch_tensors, activation_patching
from lnscope.analysis.patching.atp import atp_tensors, attribution_patching
from lnscope.analysis.patching.fidelity import (
    bootstrap_mean_ci,
    normalized_error,
    patching_fidelity,
    pearson,
    rankdata,
    spearman,
    task_set_fidelity,
    top_k_recall,
)
from lnscope.analysis.patching.nodes import DEFAULT_NODES, NODE_TYPES, QK_FIX_NODES
from lnscope.analysis.patching.results import (
    ActPatchResult,
    AtPResult,
    FidelityResult,
    FidelitySummary,
    Interval,
    MetricSummary,
    NodeFidelity,
    NodeMap,
    NodeMapCI,
    TaskSetFidelity,
    TrioResult,
)

__all__ = [
    "DEFAULT_NODES", "NODE_TYPES", "QK_FIX_NODES",
    "attribution_patching", "activation_patching", "patching_fidelity", "task_set_fidelity",
    "atp_tensors", "act_patch_tensors",
    "pearson", "spearman", "rankdata", "top_k_recall", "normalized_error", "bootstrap_mean_ci",
    "AtPResult", "ActPatchResult", "FidelityResult", "FidelitySummary", "Interval", "MetricSummary",
    "NodeFidelity", "NodeMap", "NodeMapCI", "TaskSetFidelity", "TrioResult",
]
