"""Attribution patching (AtP, AtP*), batched activation patching and their fidelity, per model and trio.

Modules: nodes (node types, hooks), atp (AtP / AtP* QK fix), activation (batched ground truth),
fidelity (correlations, top-k recall, normalised error, task sets), trio, results (pydantic models).
"""

from lnscope.analysis.patching.activation import activation_patching, act_patch_tensors
from lnscope.analysis.patching.atp import attribution_patching, atp_tensors
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
from lnscope.analysis.patching.trio import (
    activation_patching_trio,
    attribution_patching_trio,
    patching_fidelity_trio,
    task_set_fidelity_trio,
)

__all__ = [
    "DEFAULT_NODES", "NODE_TYPES", "QK_FIX_NODES",
    "attribution_patching", "activation_patching", "patching_fidelity", "task_set_fidelity",
    "attribution_patching_trio", "activation_patching_trio", "patching_fidelity_trio", "task_set_fidelity_trio",
    "atp_tensors", "act_patch_tensors",
    "pearson", "spearman", "rankdata", "top_k_recall", "normalized_error", "bootstrap_mean_ci",
    "AtPResult", "ActPatchResult", "FidelityResult", "FidelitySummary", "Interval", "MetricSummary",
    "NodeFidelity", "NodeMap", "NodeMapCI", "TaskSetFidelity", "TrioResult",
]
