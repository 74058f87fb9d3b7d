"""Edits resolved for one model: TransformerLens hooks that apply them, and the residual write each one changes.

Every resolved edit reads the rows being run (`Batch`) and the replacement values (`Sources`), and names
its `write_hook`: the activation whose change, mapped into the residual stream by `to_resid`, is the edit's
direct write (the linear prediction dots it with the target direction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

Hook = tuple[str, Callable]


@dataclass
class Batch:
    """The prompts of one forward pass: rows [b] (indices into the request's prompts) and the width run."""

    rows: torch.Tensor  # [b] long, on the CPU
    width: int


@dataclass
class Sources:
    """Replacement values: eval-text means per hook [*rest], and the corrupt run's activations [prompt, pos, *rest]."""

    means: dict[str, torch.Tensor] = field(default_factory=dict)
    corrupt: dict[str, torch.Tensor] = field(default_factory=dict)


def position_mask(positions: list[list[int]] | None, batch: Batch, device: torch.device) -> torch.Tensor:
    """[b, width] bool: the edit's absolute positions of each row (None: every position)."""
    if positions is None:
        return torch.ones(len(batch.rows), batch.width, dtype=torch.bool, device=device)
    mask = torch.zeros(len(batch.rows), batch.width, dtype=torch.bool)
    for i, row in enumerate(batch.rows.tolist()):
        kept = [p for p in positions[row] if p < batch.width]
        mask[i, kept] = True
    return mask.to(device)


def _trailing(mask: torch.Tensor, ndim: int) -> torch.Tensor:
    """mask [b, pos] viewed as [b, pos, 1, ...] with ndim dimensions in all."""
    return mask.reshape(mask.shape + (1,) * (ndim - 2))


def replacement(how: str, hook: str, sel: tuple, region: torch.Tensor, batch: Batch, sources: Sources) -> torch.Tensor:
    """The value an ablation writes over region = act[:, :, *sel] [b, pos, ...] (positions beyond a corrupt prompt
    keep their own value)."""
    if how == "zero":
        return torch.zeros_like(region)
    if how == "mean":
        return sources.means[hook][sel].to(region.dtype).expand_as(region)
    corrupt = sources.corrupt[hook][batch.rows.to(sources.corrupt[hook].device)]  # [b, pos_c, *rest]
    corrupt = corrupt[(slice(None), slice(None)) + sel].to(region.device, region.dtype)
    out = region.clone()
    n = min(out.shape[1], corrupt.shape[1])
    out[:, :n] = corrupt[:, :n]
    return out


def overwrite(act: torch.Tensor, sel: tuple, mask: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """act with act[:, :, *sel] replaced by value where mask [b, pos] holds."""
    out = act.clone()
    region = out[(slice(None), slice(None)) + sel]
    region.copy_(torch.where(_trailing(mask, region.ndim), value, region))
    return out


@dataclass
class Resolved:
    """One edit for one model: its positions, hooks and direct write."""

    index: int
    label: str
    positions: list[list[int]] | None  # per prompt, absolute; None: every position
    write_hook: str
    to_resid: Callable[[torch.Tensor], torch.Tensor]  # the write hook's activation at one position -> [b, d_model]
    mean_hooks: tuple[str, ...] = ()
    corrupt_hooks: tuple[str, ...] = ()

    def hooks(self, batch: Batch, sources: Sources, device: torch.device) -> list[Hook]:
        raise NotImplementedError


@dataclass
class Replace(Resolved):
    """act[:, :, *sel] <- zero / mean / resampled value at the positions (heads' z, neurons, MLP outputs, resid)."""

    hook: str = ""
    sel: tuple = ()
    how: str = "zero"

    def hooks(self, batch: Batch, sources: Sources, device: torch.device) -> list[Hook]:
        mask = position_mask(self.positions, batch, device)

        def ablate(act, hook):
            region = act[(slice(None), slice(None)) + self.sel]
            return overwrite(act, self.sel, mask, replacement(self.how, self.hook, self.sel, region, batch, sources))

        return [(self.hook, ablate)]


@dataclass
class HeadDirect(Resolved):
    """Head `head`'s output change (z_h - z_h') W_O[h], z_h' its ablated z, subtracted from the final residual only."""

    z_hook: str = ""
    final_hook: str = ""
    head: int = 0
    how: str = "zero"
    W_O: torch.Tensor | None = None  # [d_head, d_model] of the head

    def hooks(self, batch: Batch, sources: Sources, device: torch.device) -> list[Hook]:
        mask = position_mask(self.positions, batch, device)
        store: dict[str, torch.Tensor] = {}

        def keep(z, hook):
            z_h = z[:, :, self.head]  # [b, pos, d_head]
            ablated = torch.where(mask[..., None], replacement(self.how, self.z_hook, (self.head,), z_h, batch,
                                                              sources), z_h)
            store["delta"] = (z_h - ablated) @ self.W_O.to(z.dtype)  # [b, pos, d_model]
            return z

        def remove(resid, hook):
            return resid - store["delta"]

        return [(self.z_hook, keep), (self.final_hook, remove)]


def pattern_template(what: str, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[q, k]: uniform over the causal keys (1 / (q + 1) for k <= q) or every query on BOS."""
    causal = torch.tril(torch.ones(width, width, dtype=dtype, device=device))
    if what == "pattern_uniform":
        return causal / causal.sum(-1, keepdim=True)
    bos = torch.zeros(width, width, dtype=dtype, device=device)
    bos[:, 0] = 1
    return bos


@dataclass
class HeadPattern(Resolved):
    """Head `head`'s attention pattern [b, head, q, k] replaced at the query positions."""

    hook: str = ""
    head: int = 0
    what: str = "pattern_uniform"

    def hooks(self, batch: Batch, sources: Sources, device: torch.device) -> list[Hook]:
        mask = position_mask(self.positions, batch, device)  # [b, q]

        def set_pattern(pattern, hook):
            out = pattern.clone()
            template = pattern_template(self.what, pattern.shape[-1], pattern.dtype, pattern.device)
            out[:, self.head] = torch.where(mask[..., None], template, pattern[:, self.head])
            return out

        return [(self.hook, set_pattern)]


@dataclass
class FeatureSet(Resolved):
    """mlp_out <- mlp_out + (a' - a) W_dec[f], a = the transcoder feature's activation on the MLP's input."""

    in_hook: str = ""
    out_hook: str = ""
    transcoder: torch.nn.Module | None = None
    feature: int = 0
    set: float | None = None
    scale: float | None = None

    def new_activation(self, a: torch.Tensor) -> torch.Tensor:
        return torch.full_like(a, self.set) if self.set is not None else a * self.scale

    def hooks(self, batch: Batch, sources: Sources, device: torch.device) -> list[Hook]:
        mask = position_mask(self.positions, batch, device)
        store: dict[str, torch.Tensor] = {}

        def keep(x, hook):
            store["x"] = x
            return x

        def edit(mlp_out, hook):
            tc = self.transcoder
            a = tc.encode(store["x"])[..., self.feature]  # [b, pos]
            change = torch.where(mask, self.new_activation(a) - a, torch.zeros_like(a))
            return mlp_out + (change[..., None] * tc.W_dec[self.feature]).to(mlp_out.dtype)

        return [(self.in_hook, keep), (self.out_hook, edit)]


@dataclass
class SteerAdd(Resolved):
    """x <- x + alpha * u at the positions."""

    hook: str = ""
    vector: torch.Tensor | None = None  # [d_model]: alpha * u

    def hooks(self, batch: Batch, sources: Sources, device: torch.device) -> list[Hook]:
        mask = position_mask(self.positions, batch, device)

        def steer(x, hook):
            return x + mask[..., None].to(x.dtype) * self.vector.to(x.device, x.dtype)

        return [(self.hook, steer)]
