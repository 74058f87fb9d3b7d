"""Write a FakeLN-trained model in the released LN-free format (and the LN-kept control).

Released format (Baroni et al. 2025): a plain GPT2LMHeadModel whose every ln_1, ln_2, ln_f has
`weight = gamma * 1e6 / sigma_avg`, its bias kept, and `layer_norm_epsilon = 1e12` (config and
modules), so LN(x) = (x - mean) * gamma * 1e6 / (sigma * sqrt(var + 1e12)) + beta, which is
FakeLN(x) up to a relative var / 2e12.

ln_1 was trained with two sigmas (Q/K path and V path) but the format has one ln_1. We export
ln_1 with sigma_qk and fold the difference into c_attn's V columns. With xc = x - mean(x),
y = xc * gamma / sigma_qk + beta (what the exported ln_1 gives) and W_v, b_v the V columns:

    value = (xc * gamma / sigma_v + beta) @ W_v + b_v
          = (sigma_qk / sigma_v) (y - beta) @ W_v + beta @ W_v + b_v
          = y @ W_v' + b_v'     with  W_v' = (sigma_qk / sigma_v) W_v,
                                      b_v' = b_v + beta @ W_v - beta @ W_v'.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fake_ln import FakeLNGPT2

logger = logging.getLogger(__name__)

RELEASED_EPS = 1e12
RELEASED_SCALE = math.sqrt(RELEASED_EPS)  # 1e6
METADATA_FILE = "lnscope_removal.json"


def fold_v_scale(
    W_v: torch.Tensor, b_v: torch.Tensor, beta: torch.Tensor, sigma_qk: float, sigma_v: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_v', b_v') so that (xc*g/sigma_qk + beta) @ W_v' + b_v' == (xc*g/sigma_v + beta) @ W_v + b_v.

    W_v is [d_model, d_v] (HF Conv1D layout); computed in float64, returned in W_v's dtype.
    """
    W = W_v.double()
    beta64 = beta.double()
    W_new = W * (float(sigma_qk) / float(sigma_v))
    b_new = b_v.double() + beta64 @ W - beta64 @ W_new
    return W_new.to(W_v.dtype), b_new.to(b_v.dtype)


@torch.no_grad()
def released_ln_free_model(wrapper: FakeLNGPT2, *, device: str | torch.device = "cpu") -> nn.Module:
    """A copy of the wrapped HF model in the released LN-free format (every LN must be fake)."""
    real = [n for n in wrapper.names if not wrapper.is_fake(n)]
    if real:
        raise ValueError(f"cannot export an LN-free model while these LNs are still real: {real}")
    sigma = wrapper.sigma_dict()
    model = copy.deepcopy(wrapper.model).to(device)
    D = wrapper.d_model

    def scale_ln(ln: nn.LayerNorm, s: float) -> None:
        ln.weight.copy_((ln.weight.double() * (RELEASED_SCALE / s)).to(ln.weight.dtype))
        ln.eps = RELEASED_EPS

    for i, block in enumerate(model.transformer.h):
        s_qk, s_v, s_2 = sigma[f"blocks.{i}.ln_1_qk"], sigma[f"blocks.{i}.ln_1_v"], sigma[f"blocks.{i}.ln_2"]
        c_attn = block.attn.c_attn
        beta = block.ln_1.bias
        W_v, b_v = fold_v_scale(c_attn.weight[:, 2 * D :], c_attn.bias[2 * D :], beta, s_qk, s_v)
        c_attn.weight[:, 2 * D :] = W_v
        c_attn.bias[2 * D :] = b_v
        scale_ln(block.ln_1, s_qk)
        scale_ln(block.ln_2, s_2)
    scale_ln(model.transformer.ln_f, sigma["ln_f"])
    model.config.layer_norm_epsilon = RELEASED_EPS
    return model.eval()


def _save(model: nn.Module, out_dir: Path, tokenizer: Any, metadata: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return out_dir


def export_ln_free(
    wrapper: FakeLNGPT2, out_dir: str | Path, *, tokenizer: Any = None, metadata: dict[str, Any] | None = None
) -> Path:
    """Save the released-format LN-free checkpoint (+ tokenizer, + lnscope_removal.json)."""
    model = released_ln_free_model(wrapper)
    meta = {
        "format": "lnscope-ln-free/1",
        "role": "ln_free",
        "ln_removed": True,
        "released_format": {
            "ln_weight": "gamma * 1e6 / sigma_avg",
            "layer_norm_epsilon": RELEASED_EPS,
            "ln_1_sigma": "sigma of the Q/K path; the V path's sigma folded into c_attn's V columns",
        },
        "sigmas": wrapper.sigma_dict(),
        **(metadata or {}),
    }
    path = _save(model, Path(out_dir), tokenizer, meta)
    logger.info("exported LN-free checkpoint to %s", path)
    return path


def export_control(
    model: nn.Module, out_dir: str | Path, *, tokenizer: Any = None, metadata: dict[str, Any] | None = None
) -> Path:
    """Save the LN-kept control as an ordinary GPT2LMHeadModel (eps unchanged)."""
    meta = {"format": "lnscope-ln-free/1", "role": "control", "ln_removed": False, **(metadata or {})}
    path = _save(copy.deepcopy(model).cpu().eval(), Path(out_dir), tokenizer, meta)
    logger.info("exported control checkpoint to %s", path)
    return path
