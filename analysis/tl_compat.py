"""Small, documented adjustments to TransformerLens 4.3 that lnscope's exactness depends on."""

from __future__ import annotations

import functools

import torch
from transformer_lens.weight_processing import ProcessWeights


class _KeepFloat64(dict):
    """A state dict that refuses to downcast a float64 tensor to float32.

    TransformerLens 4.3's ProcessWeights.process_weights upcasts every tensor whose dtype is
    not float32 "to avoid precision loss" before folding, which also *downcasts* float64 to
    float32 (then casts back): a float64 model comes out with float32 rounding (~1e-8).
    """

    def __setitem__(self, key, value):
        current = self.get(key)
        if (
            isinstance(current, torch.Tensor)
            and isinstance(value, torch.Tensor)
            and current.dtype == torch.float64
            and value.dtype == torch.float32
        ):
            value = current
        super().__setitem__(key, value)


def keep_float64_in_weight_processing() -> None:
    """Wrap ProcessWeights.process_weights once so float64 weights are folded in float64."""
    original = ProcessWeights.process_weights
    if getattr(original, "_lnscope_keeps_float64", False):
        return

    @functools.wraps(original)
    def process_weights(state_dict, *args, **kwargs):
        if any(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in state_dict.values()):
            state_dict = _KeepFloat64(state_dict)
        return original(state_dict, *args, **kwargs)

    process_weights._lnscope_keeps_float64 = True  # type: ignore[attr-defined]
    ProcessWeights.process_weights = staticmethod(process_weights)
