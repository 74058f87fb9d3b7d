"""A functional GPT-2 forward whose LayerNorms can each be real or fake (the FakeLN method).

    real LN:  (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta
    FakeLN:   (x - mean(x)) / sigma_avg          * gamma + beta     (sigma_avg a fixed scalar)

`FakeLNGPT2` wraps a Hugging Face `GPT2LMHeadModel` and runs its parameters (wte, wpe,
c_attn, c_proj, c_fc, the MLP's c_proj, the LN weights, the tied lm_head) through its own
forward, so training it trains the HF model in place. There are 3 * n_layer + 1 LN *sites*,
named in removal order (see `removal_order`):

    blocks.{i}.ln_2       the MLP's LN
    blocks.{i}.ln_1_qk    ln_1 as read by the queries and keys
    blocks.{i}.ln_1_v     ln_1 as read by the values
    ln_f                  the final LN

The two ln_1 sites share ln_1's gamma and beta but have their own mode and sigma_avg. While a
site is real, the std of its input (centred, over d_model, eps included; averaged over batch
and positions, optionally only where `stat_mask` is set) is accumulated in training mode;
`update_sigma()` then folds the average of those batch values into sigma_avg as an EMA
(`new = m * old + (1 - m) * batch`, m = 0.9; the first update initialises it). A fake site's
sigma_avg is frozen. No dropout is applied.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LN_KINDS: tuple[str, ...] = ("ln_2", "ln_1_qk", "ln_1_v")


def removal_order(n_layer: int) -> list[str]:
    """Every LN site in the order the method removes them: ln_2, ln_1 Q/K, ln_1 V (block by block), ln_f."""
    return [f"blocks.{i}.{kind}" for kind in LN_KINDS for i in range(n_layer)] + ["ln_f"]


def _check_gpt2(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "gpt2" or not hasattr(model, "transformer"):
        raise TypeError(f"FakeLNGPT2 needs a GPT2LMHeadModel, got {type(model).__name__}")
    if getattr(config, "add_cross_attention", False):
        raise TypeError("FakeLNGPT2 does not support GPT-2 with cross-attention")


class FakeLNGPT2(nn.Module):
    """GPT-2 with per-LN real/fake modes; trains the wrapped HF model's parameters in place."""

    def __init__(self, model: nn.Module, *, track_sigma: bool = True, momentum: float = 0.9) -> None:
        super().__init__()
        _check_gpt2(model)
        self.model = model
        cfg = model.config
        self.n_layer = cfg.n_layer
        self.n_head = cfg.n_head
        self.d_model = cfg.n_embd
        self.head_dim = self.d_model // self.n_head
        self.eps = float(cfg.layer_norm_epsilon)
        self.track_sigma = track_sigma
        self.momentum = float(momentum)
        self.names = removal_order(self.n_layer)
        self.index = {name: k for k, name in enumerate(self.names)}
        n = self.n_layer
        # (ln_2, ln_1_qk, ln_1_v) site index of each block
        self._block_sites = [(i, n + i, 2 * n + i) for i in range(n)]
        self._ln_f = 3 * n
        self._scales = []
        for i in range(n):
            scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
            if cfg.scale_attn_by_inverse_layer_idx:
                scale /= float(i + 1)
            self._scales.append(scale)
        act = cfg.activation_function
        if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            self._act = lambda h: F.gelu(h, approximate="tanh")
        elif act == "gelu":
            self._act = F.gelu
        else:
            from transformers.activations import ACT2FN

            self._act = ACT2FN[act]
        param = next(model.parameters())
        n_sites = len(self.names)
        self.register_buffer("sigma", torch.ones(n_sites, dtype=param.dtype, device=param.device))
        self.register_buffer("sigma_initialized", torch.zeros(n_sites, dtype=torch.bool, device=param.device))
        self.register_buffer("fake_mask", torch.zeros(n_sites, dtype=torch.bool, device=param.device))
        self.register_buffer(
            "_stat_sum", torch.zeros(n_sites, dtype=torch.float32, device=param.device), persistent=False
        )
        self._n_stats = 0
        self._fake: list[bool] = [False] * n_sites  # python mirror of fake_mask (no device sync in forward)

    # ----------------------------------------------------------------------------- modes
    def is_fake(self, name: str) -> bool:
        return self._fake[self.index[name]]

    def set_fake(self, name: str, fake: bool = True) -> None:
        """Switch one site to fake (its sigma_avg freezes) or back to real."""
        k = self.index[name]
        self._fake[k] = bool(fake)
        self.fake_mask[k] = bool(fake)

    def set_all_fake(self, fake: bool = True) -> None:
        for name in self.names:
            self._fake[self.index[name]] = bool(fake)
        self.fake_mask.fill_(bool(fake))

    @property
    def n_fake(self) -> int:
        return sum(self._fake)

    def fake_names(self) -> list[str]:
        return [n for n, f in zip(self.names, self._fake) if f]

    def set_sigma(self, values: dict[str, float] | torch.Tensor) -> None:
        """Set sigma_avg directly (marks the sites as initialised)."""
        with torch.no_grad():
            if isinstance(values, dict):
                for name, v in values.items():
                    self.sigma[self.index[name]] = float(v)
                    self.sigma_initialized[self.index[name]] = True
            else:
                self.sigma.copy_(values)
                self.sigma_initialized.fill_(True)

    def sigma_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.sigma.double().tolist()))

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):  # type: ignore[override]
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._fake = [bool(f) for f in self.fake_mask.tolist()]
        return result

    # ------------------------------------------------------------------------ sigma EMA
    @torch.no_grad()
    def _record_std(self, std: torch.Tensor, sites: tuple[int, ...], stat_mask: torch.Tensor | None) -> None:
        """Accumulate the mean of `std` [batch, pos] (over `stat_mask` if given) for each site."""
        value = std.mean() if stat_mask is None else (std * stat_mask).sum() / stat_mask.sum()
        for k in sites:
            self._stat_sum[k] += value

    @torch.no_grad()
    def update_sigma(self) -> None:
        """Fold the batch std averaged since the last call into every real site's sigma_avg."""
        if self._n_stats == 0:
            return
        batch = (self._stat_sum / self._n_stats).to(self.sigma.dtype)
        real = ~self.fake_mask
        m = self.momentum
        ema = torch.where(self.sigma_initialized, m * self.sigma + (1.0 - m) * batch, batch)
        self.sigma.copy_(torch.where(real, ema, self.sigma))
        self.sigma_initialized |= real
        self._stat_sum.zero_()
        self._n_stats = 0

    def discard_stats(self) -> None:
        self._stat_sum.zero_()
        self._n_stats = 0

    # --------------------------------------------------------------------------- forward
    def _norm(self, x, k: int, ln: nn.LayerNorm, track: bool, stat_mask, also: tuple[int, ...] = ()):
        if self._fake[k]:
            return (x - x.mean(-1, keepdim=True)) * (ln.weight / self.sigma[k]) + ln.bias
        if track:  # native_layer_norm also returns 1/sqrt(var + eps): no second pass over x
            out, _, rstd = torch.native_layer_norm(x, (self.d_model,), ln.weight, ln.bias, self.eps)
            self._record_std(rstd.detach().squeeze(-1).float().reciprocal(), (k,) + also, stat_mask)
            return out
        return F.layer_norm(x, (self.d_model,), ln.weight, ln.bias, self.eps)

    @staticmethod
    def _conv1d(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
        """HF Conv1D: x @ W + b with W [in, out]."""
        shape = x.shape[:-1] + (conv.weight.shape[1],)
        return torch.addmm(conv.bias, x.reshape(-1, x.shape[-1]), conv.weight).view(shape)

    def residual(self, input_ids: torch.Tensor, *, stat_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final residual stream (the input of ln_f), [batch, pos, d_model]."""
        tr = self.model.transformer
        B, T = input_ids.shape
        D, H, hd = self.d_model, self.n_head, self.head_dim
        track = self.training and self.track_sigma
        if track:
            self._n_stats += 1
        pos = torch.arange(T, device=input_ids.device)
        x = F.embedding(input_ids, tr.wte.weight) + F.embedding(pos, tr.wpe.weight)
        for i, block in enumerate(tr.h):
            k2, kqk, kv = self._block_sites[i]
            attn, mlp = block.attn, block.mlp
            if not self._fake[kqk] and not self._fake[kv]:  # both real: one LN, one matmul
                h = self._norm(x, kqk, block.ln_1, track, stat_mask, also=(kv,))
                qkv = self._conv1d(h, attn.c_attn)
                q, k, v = qkv.split(D, dim=-1)
            else:
                h_qk = self._norm(x, kqk, block.ln_1, track, stat_mask)
                h_v = self._norm(x, kv, block.ln_1, track, stat_mask)
                W, b = attn.c_attn.weight, attn.c_attn.bias
                qk = torch.addmm(b[: 2 * D], h_qk.reshape(-1, D), W[:, : 2 * D]).view(B, T, 2 * D)
                v = torch.addmm(b[2 * D :], h_v.reshape(-1, D), W[:, 2 * D :]).view(B, T, D)
                q, k = qk.split(D, dim=-1)
            q = q.view(B, T, H, hd).transpose(1, 2)
            k = k.view(B, T, H, hd).transpose(1, 2)
            v = v.view(B, T, H, hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self._scales[i])
            a = a.transpose(1, 2).reshape(B, T, D)
            x = x + self._conv1d(a, attn.c_proj)
            h = self._norm(x, k2, block.ln_2, track, stat_mask)
            x = x + self._conv1d(self._act(self._conv1d(h, mlp.c_fc)), mlp.c_proj)
        return x

    def final_norm(self, resid: torch.Tensor, *, stat_mask: torch.Tensor | None = None) -> torch.Tensor:
        track = self.training and self.track_sigma
        return self._norm(resid, self._ln_f, self.model.transformer.ln_f, track, stat_mask)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        head = self.model.lm_head
        return F.linear(h, head.weight, getattr(head, "bias", None))

    def forward(self, input_ids: torch.Tensor, *, stat_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, pos, vocab]. In training mode real sites' stds are accumulated."""
        resid = self.residual(input_ids, stat_mask=stat_mask)
        return self.unembed(self.final_norm(resid, stat_mask=stat_mask))

    def losses(
        self,
        input_ids: torch.Tensor,
        *,
        aux_weight: float = 0.0,
        aux_mask: torch.Tensor | None = None,
        stat_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(next-token cross-entropy, auxiliary ln_f-input std loss or None when aux_weight is 0)."""
        resid = self.residual(input_ids, stat_mask=stat_mask)
        aux = aux_std_loss(resid, aux_mask, self.eps) if aux_weight > 0 else None
        h = self.final_norm(resid, stat_mask=stat_mask)[:, :-1]
        logits = self.unembed(h)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))
        return ce, aux


def aux_std_loss(resid: torch.Tensor, target_mask: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """mean over positions of (std_pos - target)^2 on ln_f's input.

    std_pos is the std over d_model at each (sequence, position), eps included; target is its
    mean over the positions `target_mask` marks (default: every position but 0), detached.
    """
    std = (resid.float().var(-1, unbiased=False) + eps).sqrt()
    with torch.no_grad():
        if target_mask is None:
            target = std[:, 1:].mean() if std.shape[1] > 1 else std.mean()
        else:
            target = (std * target_mask).sum() / target_mask.sum().clamp_min(1)
    return (std - target).pow(2).mean()
