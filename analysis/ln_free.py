"""Turn a checkpoint in the released LN-free format into a bridge with no normalization.

Released format (Baroni et al. 2025; Heimersheim 2024): every LayerNorm keeps its bias, has
`weight = gamma / sigma * sqrt(eps)` and a huge `eps` (1e12), so that

    LN(x) = (x - mean(x)) * weight / sqrt(var(x) + eps)  ~=  (x - mean(x)) * gamma / sigma + beta.

That map is linear. We make it exactly linear: divide each weight by sqrt(eps), fold the LN
into the weights that read it (TransformerLens `fold_ln`, which also centres those weights
and so reproduces the mean subtraction), then replace every LN by an identity. The result
has no `hook_scale` anywhere: direct logit attribution on it is exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge

from lnscope.analysis.errors import NotLnFreeError

# sqrt(eps) must dwarf the residual std for LN(x) to be linear: at eps 1e12 and a residual
# std of 1e3 the relative error of the linear map is std^2 / (2 eps) = 5e-7.
MIN_LN_FREE_EPS = 1e10


class IdentityNorm(GeneralizedComponent):
    """A normalization slot that does nothing: hook_in and hook_out, no scale, no parameters."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.hook_out(self.hook_in(hidden_states))


def layer_norms(model: nn.Module) -> dict[str, nn.LayerNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}


def check_released_format(hf_model: nn.Module, where: str) -> None:
    """Refuse a checkpoint whose LayerNorms are ordinary (eps below MIN_LN_FREE_EPS)."""
    norms = layer_norms(hf_model)
    if not norms:
        raise NotLnFreeError(
            f"{where} was registered as `ln_free` but has no LayerNorm modules; lnscope expects "
            "the released LN-free format (GPT-2 architecture, LN weight x 1e6/sigma, eps 1e12)"
        )
    ordinary = {name: m.eps for name, m in norms.items() if m.eps < MIN_LN_FREE_EPS}
    if ordinary:
        names = ", ".join(f"{n} (eps={e:g})" for n, e in list(ordinary.items())[:4])
        more = f" and {len(ordinary) - 4} more" if len(ordinary) > 4 else ""
        raise NotLnFreeError(
            f"{where} was registered as `ln_free`, but {len(ordinary)} of its {len(norms)} "
            f"LayerNorms are ordinary normalizations: {names}{more}. The LN-free format has every "
            f"LN weight multiplied by 1e6/sigma and eps = 1e12 (at least {MIN_LN_FREE_EPS:g}). "
            "Register this checkpoint as `original` or `control`, or convert it with `lnscope remove-ln`."
        )


@torch.no_grad()
def linearize_layer_norms(hf_model: nn.Module) -> None:
    """weight <- weight / sqrt(eps), so each LN weight is gamma / sigma (the authors' recipe)."""
    for norm in layer_norms(hf_model).values():
        norm.weight.div_(math.sqrt(norm.eps))
        norm.eps = 1e-5  # irrelevant once the module is replaced, but keeps folding honest


def remove_normalization(bridge: TransformerBridge) -> int:
    """Replace every NormalizationBridge (already folded) by an IdentityNorm; return the count.

    Must run after `enable_compatibility_mode(fold_ln=True, ...)`, which moved each LN's
    weight and bias into the weights that read it and centred them.
    """
    # The bridge does not register the wrapped Hugging Face model as a child module, so both
    # trees are walked.
    trees = [bridge, bridge.original_model]
    replacements: dict[int, IdentityNorm] = {}
    for module in [m for tree in trees for m in tree.modules()]:
        if isinstance(module, NormalizationBridge) and id(module) not in replacements:
            identity = IdentityNorm(name=module.name, config=module.config)
            identity.set_original_component(nn.Identity())
            identity.compatibility_mode = module.compatibility_mode
            identity.disable_warnings = True
            replacements[id(module)] = identity
    # The same NormalizationBridge object sits both on the bridge (blocks.0.ln1) and inside the
    # wrapped Hugging Face module (transformer.h.0.ln_1): swap it wherever it is referenced.
    for parent in [m for tree in trees for m in tree.modules()]:
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[child_name] = replacements[id(child)]
    bridge.clear_hook_registry()
    bridge._initialize_hook_registry()
    bridge._register_all_aliases_recursive()
    leftover = [
        n for tree in trees for n, m in tree.named_modules() if isinstance(m, (NormalizationBridge, nn.LayerNorm))
    ]
    if leftover or any(name.endswith("hook_scale") for name in bridge.hook_dict):
        raise RuntimeError(f"normalization left after removal: {leftover[:5]}")
    return len(replacements)
