"""Interventions: ablate, edit and steer components of a model and compare with the linear prediction.

- `edits`: the request's edits (a union tagged by `type`).
- `resolve`: edits checked against one model's sizes and turned into hooks (`sites`).
- `means`: eval-text means for mean ablation, cached per model.
- `run`: clean, all-edits and one-edit-alone runs, metrics, distributions and predictions.
"""

from lnscope.analysis.interventions.edits import Edit, edit_label
from lnscope.analysis.interventions.results import (
    EditEffect,
    InterventionResult,
    PromptOutcome,
    RoleDifference,
    RoleIntervention,
)
from lnscope.analysis.interventions.run import Prompts, intervene, linear_prediction

__all__ = ["Edit", "EditEffect", "InterventionResult", "PromptOutcome", "Prompts", "RoleDifference",
           "RoleIntervention", "edit_label", "intervene", "linear_prediction"]
