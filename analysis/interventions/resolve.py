"""Turn requested edits into `sites.Resolved` edits for one model, checking every index against its sizes.

An index out of range is an EditError naming the edit's field (the kind answers 422). A role other than the
lead edits the lead's transcoder features matched by decoder cosine (`FeatureMatch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from pydantic import BaseModel

from lnscope.analysis.interventions.edits import (
    AblateHead,
    AblateMLP,
    AblateNeuron,
    AblateResid,
    EditError,
    FeatureDirection,
    FeatureEdit,
    LogitDirection,
    NeuronDirection,
    Steer,
    edit_label,
)
from lnscope.analysis.interventions.sites import (
    FeatureSet,
    HeadDirect,
    HeadPattern,
    Replace,
    Resolved,
    SteerAdd,
)
from lnscope.analysis.loading import LoadedModel


@dataclass(frozen=True)
class FeatureMatch:
    """The feature a role edits for the lead's (layer, feature): its index (-1: unmatched) and decoder cosine."""

    feature: int
    cos: float | None = None


@dataclass
class ModelParts:
    """What resolving reads of one model: sizes, weights and (lazily) its transcoders and feature matches."""

    model: LoadedModel
    transcoders: Callable[[], object]  # () -> TranscoderSet (an error when the role has none)
    match: Callable[[int, int], FeatureMatch]  # (layer, lead feature) -> this role's feature

    @property
    def cfg(self):
        return self.model.bridge.cfg

    def block(self, layer: int):
        return self.model.bridge.blocks[layer]

    @property
    def final_hook(self) -> str:
        return f"blocks.{self.cfg.n_layers - 1}.hook_resid_post"


def _loc(i: int, *fields: str | int) -> list[str | int]:
    return ["body", "options", "edits", i, *fields]


def _check_index(value: int, size: int, what: str, loc: list[str | int]) -> None:
    if not 0 <= value < size:
        raise EditError(loc, f"{what} {value} out of range: the model has {size}")


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _head_write(W_O: torch.Tensor, head: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """z at one position [b, head, d_head] -> the head's write z_h W_O[h] [b, d_model]."""
    w = _f64(W_O[head]).cpu()
    return lambda z: z[:, head].cpu() @ w


def resolve_head(i: int, e: AblateHead, parts: ModelParts, positions) -> Resolved:
    cfg = parts.cfg
    _check_index(e.head, cfg.n_heads, "head", _loc(i, "head"))
    if e.what != "output" and (e.how != "zero" or e.scope != "all"):
        raise EditError(_loc(i, "how" if e.how != "zero" else "scope"),
                           "pattern ablations take neither `how` nor `scope` (they apply to head outputs)")
    z_hook = f"blocks.{e.layer}.attn.hook_z"
    W_O = parts.block(e.layer).attn.W_O.detach()  # [head, d_head, d_model]
    common = dict(index=i, label=edit_label(e), positions=positions)
    if e.what != "output":
        return HeadPattern(**common, write_hook=z_hook, to_resid=_head_write(W_O, e.head),
                           hook=f"blocks.{e.layer}.attn.hook_pattern", head=e.head, what=e.what)
    sources = dict(mean_hooks=(z_hook,) * (e.how == "mean"), corrupt_hooks=(z_hook,) * (e.how == "resample"))
    if e.scope == "direct":
        return HeadDirect(**common, **sources, write_hook=parts.final_hook, to_resid=_identity, z_hook=z_hook,
                          final_hook=parts.final_hook, head=e.head, how=e.how, W_O=W_O[e.head])
    return Replace(**common, **sources, write_hook=z_hook, to_resid=_head_write(W_O, e.head), hook=z_hook,
                   sel=(e.head,), how=e.how)


def resolve_neuron(i: int, e: AblateNeuron, parts: ModelParts, positions) -> Resolved:
    _check_index(e.neuron, parts.cfg.d_mlp, "neuron", _loc(i, "neuron"))
    hook = f"blocks.{e.layer}.mlp.hook_post"
    w_out = _f64(parts.block(e.layer).mlp.W_out[e.neuron]).cpu()  # [d_model]
    return Replace(index=i, label=edit_label(e), positions=positions, write_hook=hook,
                   to_resid=lambda post: post[:, e.neuron, None].cpu() * w_out, hook=hook, sel=(e.neuron,),
                   how=e.how, **_sources(hook, e.how))


def _sources(hook: str, how: str) -> dict:
    return dict(mean_hooks=(hook,) * (how == "mean"), corrupt_hooks=(hook,) * (how == "resample"))


def resolve_whole(i: int, e: AblateMLP | AblateResid, parts: ModelParts, positions) -> Resolved:
    hook = f"blocks.{e.layer}.hook_mlp_out" if isinstance(e, AblateMLP) else f"blocks.{e.layer}.hook_resid_pre"
    return Replace(index=i, label=edit_label(e), positions=positions, write_hook=hook, to_resid=_identity,
                   hook=hook, sel=(), how=e.how, **_sources(hook, e.how))


def _transcoder(parts: ModelParts, layer: int, feature: int, loc: list[str | int]):
    """The layer's transcoder after checking that it has `feature`."""
    tset = parts.transcoders()
    if layer not in tset:
        raise EditError(loc[:-1] + ["layer"] if loc[-1] == "feature" else loc,
                           f"layer {layer} has no transcoder for {parts.model.role} (layers {tset.layers})")
    tc = tset[layer]
    if not 0 <= feature < tc.d_transcoder:
        raise EditError(loc, f"feature {feature} out of range: layer {layer} of {parts.model.role} has "
                           f"{tc.d_transcoder} features")
    return tc


def resolve_feature(i: int, e: FeatureEdit, parts: ModelParts, positions) -> Resolved | None:
    """The feature edit on this role's matched feature (None when the lead's feature has no match here)."""
    _transcoder(parts, e.layer, e.feature, _loc(i, "feature"))
    match = parts.match(e.layer, e.feature)
    if match.feature < 0:
        return None
    tc = _transcoder(parts, e.layer, match.feature, _loc(i, "feature"))
    hook = f"blocks.{e.layer}.hook_mlp_out"
    return FeatureSet(index=i, label=edit_label(e), positions=positions, write_hook=hook, to_resid=_identity,
                      in_hook=f"blocks.{e.layer}.mlp.hook_in", out_hook=hook, transcoder=tc, feature=match.feature,
                      set=e.set, scale=e.scale)


def steer_direction(i: int, e: Steer, parts: ModelParts, logit_token: int | None) -> torch.Tensor | None:
    """The unnormalised direction [d_model] (None: a feature without a match in this role)."""
    d = e.direction
    loc = _loc(i, "direction")
    if isinstance(d, FeatureDirection):
        layer, feature = d.feature
        _check_index(layer, parts.cfg.n_layers, "layer", loc + ["feature", 0])
        _transcoder(parts, layer, feature, loc + ["feature", 1])
        match = parts.match(layer, feature)
        return None if match.feature < 0 else _transcoder(parts, layer, match.feature, loc).W_dec[match.feature]
    if isinstance(d, NeuronDirection):
        layer, neuron = d.neuron
        _check_index(layer, parts.cfg.n_layers, "layer", loc + ["neuron", 0])
        _check_index(neuron, parts.cfg.d_mlp, "neuron", loc + ["neuron", 1])
        return parts.block(layer).mlp.W_out[neuron]
    if isinstance(d, LogitDirection):
        return parts.model.bridge.W_U[:, logit_token]
    vector = torch.tensor(d.vector, dtype=torch.float64)
    if vector.numel() != parts.cfg.d_model:
        raise EditError(loc + ["vector"], f"the vector has {vector.numel()} entries; d_model is {parts.cfg.d_model}")
    return vector


def resolve_steer(i: int, e: Steer, parts: ModelParts, positions, logit_token: int | None) -> Resolved | None:
    if not math.isfinite(e.alpha):
        raise EditError(_loc(i, "alpha"), "alpha must be finite")
    direction = steer_direction(i, e, parts, logit_token)
    if direction is None:
        return None
    direction = _f64(direction)
    norm = float(direction.norm())
    if norm == 0.0:
        raise EditError(_loc(i, "direction"), "the direction is the zero vector")
    hook = f"blocks.{e.layer}.hook_{e.site}"
    return SteerAdd(index=i, label=edit_label(e), positions=positions, write_hook=hook, to_resid=_identity,
                    hook=hook, vector=e.alpha * direction / norm)


def resolve_edit(i: int, edit: BaseModel, parts: ModelParts, positions, logit_token: int | None) -> Resolved | None:
    """Edit i for this model; None when it has no counterpart here (an unmatched transcoder feature)."""
    _check_index(edit.layer, parts.cfg.n_layers, "layer", _loc(i, "layer"))
    if isinstance(edit, AblateHead):
        return resolve_head(i, edit, parts, positions)
    if isinstance(edit, AblateNeuron):
        return resolve_neuron(i, edit, parts, positions)
    if isinstance(edit, (AblateMLP, AblateResid)):
        return resolve_whole(i, edit, parts, positions)
    if isinstance(edit, FeatureEdit):
        return resolve_feature(i, edit, parts, positions)
    return resolve_steer(i, edit, parts, positions, logit_token)
