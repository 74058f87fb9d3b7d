"""The typed results of an intervention: per prompt, per edit, per role, and the roles side by side."""

from __future__ import annotations

from pydantic import BaseModel, Field

from lnscope.analysis.dla import DLATarget
from lnscope.analysis.results import Manifest


class TokenProb(BaseModel):
    token_id: int
    token: str
    prob: float


class PromptOutcome(BaseModel):
    """One prompt's next-token distribution at `end_pos`, clean and with every edit applied."""

    end_pos: int
    clean_top: list[TokenProb]
    intervened_top: list[TokenProb]
    kl: float = Field(description="KL(clean || intervened) of the next-token distributions, nats")
    entropy_clean: float = Field(description="nats")
    entropy_intervened: float
    metric_clean: float
    metric_intervened: float
    metric_change: float = Field(description="metric_intervened - metric_clean")
    continuation_clean: str | None = Field(default=None, description="greedy continuation, decoded")
    continuation_intervened: str | None = None


class EditEffect(BaseModel):
    """One edit applied alone: the actual change of the metric per prompt, its linear prediction and the gap.

    predicted = the cached-scale DLA of the edit's change of its direct write into the residual stream at the
    metric's position: (dw - mean(dw)) . d / s with s the clean ln_final scale, or dw . d without LN (exact)."""

    index: int
    label: str
    applied: bool = Field(description="false when a transcoder feature has no match in this role")
    feature: int | None = Field(default=None, description="the feature edited in this role (matched for non-lead)")
    match_cos: float | None = Field(default=None, description="decoder cosine of the match with the lead's feature")
    actual: list[float] = Field(description="[prompt] metric change with this edit alone")
    predicted: list[float] = Field(description="[prompt] linear (direct-path) prediction")
    prediction_gap: list[float] = Field(description="[prompt] actual - predicted")
    mean_actual: float
    mean_predicted: float
    mean_gap: float


class RoleIntervention(BaseModel):
    role: str
    has_ln: bool
    target: DLATarget
    n_prompts: int
    prompts: list[PromptOutcome]
    edits: list[EditEffect]
    mean_metric_clean: float
    mean_metric_intervened: float
    mean_metric_change: float
    mean_kl: float


class EditDifference(BaseModel):
    index: int
    label: str
    actual: float = Field(description="mean actual change, this role - the reference role")
    prediction_gap: float = Field(description="mean prediction gap, this role - the reference role")


class RoleDifference(BaseModel):
    """One role against the reference role (original, else the lead)."""

    metric_change: float = Field(description="mean metric change, this role - the reference")
    kl: float = Field(description="mean KL, this role - the reference")
    edits: list[EditDifference]


class InterventionResult(BaseModel):
    manifest: Manifest
    lead: str = Field(description="the role whose transcoder features the others matched")
    roles: dict[str, RoleIntervention]
    differences: dict[str, RoleDifference] = Field(description="'<role> - <reference>' -> differences")
