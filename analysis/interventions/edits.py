"""The edits an intervention request names: ablations of heads, neurons, MLPs and the residual stream,
transcoder feature edits and steering vectors (a pydantic union tagged by `type`).

Positions are relative to each prompt: 0 is BOS, negative counts back from the position the metric
reads (-1 = that position: the last real token of a prompt, a task's end position), "all" is every one.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from lnscope.analysis.requests import TokenText

Positions = Union[Literal["all"], int, Annotated[list[int], Field(min_length=1, max_length=512)]]
How = Literal["zero", "mean", "resample"]
LayerIndex = Annotated[int, Field(ge=0, le=1000)]
UnitIndex = Annotated[int, Field(ge=0, le=10_000_000)]
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class EditError(ValueError):
    """An edit that does not fit the model (an index out of range, a wrong length), at `loc` in the request."""

    def __init__(self, loc: list[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message

HOW_DESCRIPTION = ("zero; mean: the mean activation over every real token of the pair's eval text (BOS-prefixed "
                   "context-length chunks); resample: the activation of the task's corrupt prompt at the same position")


class AblateHead(BaseModel):
    """A head's output (its z, so z W_O; the value bias b_V W_O stays in b_O as in DLA) or its attention pattern."""

    model_config = STRICT
    type: Literal["ablate_head"]
    layer: LayerIndex
    head: UnitIndex
    what: Literal["output", "pattern_uniform", "pattern_bos"] = Field(
        default="output", description="output: replace z; pattern_uniform: every query attends uniformly to its "
        "causal keys; pattern_bos: every query attends to BOS only")
    how: How = Field(default="zero", description=HOW_DESCRIPTION + " (output only)")
    scope: Literal["all", "direct"] = Field(
        default="all", description="all: every later layer reads the edit; direct: the head's output change is "
        "removed from the final residual stream only (output only)")
    positions: Positions = "all"


class AblateNeuron(BaseModel):
    """One MLP neuron's activation (`blocks.{layer}.mlp.hook_post[..., neuron]`)."""

    model_config = STRICT
    type: Literal["ablate_neuron"]
    layer: LayerIndex
    neuron: UnitIndex
    how: How = Field(default="zero", description=HOW_DESCRIPTION)
    positions: Positions = "all"


class AblateMLP(BaseModel):
    """A whole MLP's output (`blocks.{layer}.hook_mlp_out`)."""

    model_config = STRICT
    type: Literal["ablate_mlp"]
    layer: LayerIndex
    how: How = Field(default="zero", description=HOW_DESCRIPTION)
    positions: Positions = "all"


class AblateResid(BaseModel):
    """The residual stream entering a layer (`blocks.{layer}.hook_resid_pre`)."""

    model_config = STRICT
    type: Literal["ablate_resid"]
    layer: LayerIndex
    how: How = Field(default="zero", description=HOW_DESCRIPTION)
    positions: Positions = "all"


class FeatureEdit(BaseModel):
    """A transcoder feature's activation set or scaled; the rest of the MLP output, error term included, is kept:
    mlp_out' = mlp_out + (a' - a) W_dec[feature]. Other roles edit the feature matched by decoder cosine."""

    model_config = STRICT
    type: Literal["feature"]
    layer: LayerIndex
    feature: UnitIndex
    set: float | None = Field(default=None, description="the new activation (exactly one of set and scale)")
    scale: float | None = Field(default=None, description="the activation multiplied by this")
    positions: Positions = "all"


class FeatureDirection(BaseModel):
    model_config = STRICT
    feature: tuple[LayerIndex, UnitIndex] = Field(description="[layer, index]: the feature's decoder row")


class NeuronDirection(BaseModel):
    model_config = STRICT
    neuron: tuple[LayerIndex, UnitIndex] = Field(description="[layer, index]: the neuron's W_out row")


class LogitDirection(BaseModel):
    model_config = STRICT
    logit: TokenText = Field(description="a single token: its unembedding column W_U[:, token]")


class VectorDirection(BaseModel):
    model_config = STRICT
    vector: list[float] = Field(min_length=1, max_length=100_000, description="d_model floats")


Direction = Union[FeatureDirection, NeuronDirection, LogitDirection, VectorDirection]


class Steer(BaseModel):
    """x <- x + alpha * u at the positions, u the unit vector along `direction`, x the residual stream entering
    (`site` resid_pre) or leaving (resid_post) block `layer`."""

    model_config = STRICT
    type: Literal["steer"]
    layer: LayerIndex
    alpha: float
    direction: Direction
    site: Literal["resid_pre", "resid_post"] = "resid_pre"
    positions: Positions = "all"


Edit = Annotated[Union[AblateHead, AblateNeuron, AblateMLP, AblateResid, FeatureEdit, Steer],
                 Field(discriminator="type")]


def edit_label(edit: BaseModel) -> str:
    """A short name: L1H2 output zero, L0N5 mean, L1 MLP zero, L0 resid_pre mean, L1F7 set 0, steer L0 resid_pre."""
    if isinstance(edit, AblateHead):
        direct = " (direct path)" if edit.scope == "direct" else ""
        how = f" {edit.how}" if edit.what == "output" else ""
        return f"L{edit.layer}H{edit.head} {edit.what}{how}{direct}"
    if isinstance(edit, AblateNeuron):
        return f"L{edit.layer}N{edit.neuron} {edit.how}"
    if isinstance(edit, AblateMLP):
        return f"L{edit.layer} MLP {edit.how}"
    if isinstance(edit, AblateResid):
        return f"L{edit.layer} resid_pre {edit.how}"
    if isinstance(edit, FeatureEdit):
        change = f"set {edit.set:g}" if edit.set is not None else f"scale {edit.scale:g}"
        return f"L{edit.layer}F{edit.feature} {change}"
    return f"steer L{edit.layer} {edit.site} alpha {edit.alpha:g}"
