"""Confidence-regulation (entropy) neurons: weight statistics and mean-ablation effects.

Weights (every neuron n of one MLP layer L, float64):
- norm = |W_out[n]|;  rho = |W_out[n] @ U[:, -k:]| / |W_out[n]| with W_U = U S V^T (U in
  d_model space, singular values descending, so U[:, -k:] spans the bottom-k directions);
- LogitVar = Var_v cos(W_out[n], W_U[:, v]) (population variance over the vocabulary).

Effects (Stolfo et al. 2024; the LN-free paper's measurement). Mean ablation on a token
sample: delta_n(t) = mean_t' a_n(t') - a_n(t). Writing the final norm as N(r) = C r / s(r)
(C the centring of LayerNorm, s its scale; an identity norm has C = I and s = 1):
- total:  r' = r + delta_n W_out[n];  logits = C r' @ W_U / s(r') + b_U  (ln_final recomputed);
- direct: the same with s frozen at its clean value s(r).
Per scored token (every position with a next token): dLoss = CE' - CE (next-token CE) and
dEntropy = H' - H of the predicted distribution. LN-mediated fraction =
1 - mean_t |dLoss_direct(t)| / mean_t |dLoss_total(t)| (likewise for entropy; None when the
denominator is 0; negative when the final-LN path counteracts the direct one).

This is the *direct-to-final-residual* ablation: only the neuron's direct write into the final
residual stream changes, then ln_final (none in an LN-free model) and the unembedding are
recomputed; later layers are not re-run. On the last layer that is exact (the only path to
the output is direct). For an earlier layer, `propagate=True` re-runs the model with
`blocks.{L}.mlp.hook_post[..., n]` set to its mean (one forward per candidate neuron), so the
total effect includes every later layer; the direct effect then freezes only the ln_final scale.

No LN-free special case: a final norm without `ln_final.hook_scale` has s = 1, so total and
direct are the same computation and the LN-mediated fraction is 0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator, Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, Field

from lnscope.analysis.errors import LnscopeError
from lnscope.analysis.loading import LoadedModel
from lnscope.analysis.progress import Progress, ensure
from lnscope.analysis.results import Manifest

logger = logging.getLogger(__name__)

KNOWN_ENTROPY_NEURONS: dict[str, list[str]] = {
    "gpt2-small": ["11.584", "11.2378", "11.2870", "11.2123", "11.1611", "11.2910"],
    "gpt2-small-2024": ["11.584", "11.2378", "11.2870", "11.2123", "11.1611", "11.2910"],
    "gpt2-medium": ["23.3144", "23.1083", "23.1108"],
}
"""Entropy neurons reported for GPT-2 (Stolfo et al. 2024; Gurnee et al. 2024; the LN-free paper)."""

KNOWN_MODEL_SHAPES: dict[str, tuple[int, int, int]] = {
    "gpt2-small": (12, 768, 3072),
    "gpt2-small-2024": (12, 768, 3072),
    "gpt2-medium": (24, 1024, 4096),
}
"""(n_layers, d_model, d_mlp) a model must have for KNOWN_ENTROPY_NEURONS to apply."""

HUB_ID_ALIASES: dict[str, str] = {
    "gpt2": "gpt2-small",
    "openai-community/gpt2": "gpt2-small",
    "gpt2-medium": "gpt2-medium",
    "openai-community/gpt2-medium": "gpt2-medium",
}

RankBy = Literal["total_loss", "norm_rho"]
CandidateSource = Literal["given", "known", "top_norm_rho", "all"]
SCALE_HOOK = "ln_final.hook_scale"
RESID_HOOK = "ln_final.hook_in"


class ConfidenceNeuronsError(LnscopeError, ValueError):
    """Bad arguments to the confidence-neuron analysis (layer, neuron ids, tokens)."""


# ----------------------------------------------------------------------------- results


class FlagThresholds(BaseModel):
    """When a neuron is flagged "entropy-neuron-like": all three conditions hold.

    norm_percentile >= norm_percentile_min, rho >= rho_min_factor * sqrt(k / d_model) (the RMS
    null-space fraction of a random direction, times a factor), and
    logit_var_percentile <= logit_var_percentile_max. Percentiles are within the layer:
    100 * (fraction of the layer's neurons whose value is <= this neuron's).
    """

    norm_percentile_min: float = 90.0
    rho_min_factor: float = 2.0
    logit_var_percentile_max: float = 25.0


class NeuronWeights(BaseModel):
    """Per-neuron weight statistics of the whole layer (index = neuron index)."""

    w_out_norm: list[float]
    rho: list[float]
    logit_var: list[float]


class NeuronEffect(BaseModel):
    """One row of the ranked table. Effects are means over scored tokens."""

    rank: int = Field(description="1 = first in the ranking")
    neuron: str = Field(examples=["11.584"], description="'layer.index'")
    layer: int
    index: int
    w_out_norm: float
    norm_percentile: float
    rho: float
    logit_var: float
    logit_var_percentile: float
    entropy_neuron_like: bool
    mean_activation: float
    abs_dloss_total: float = Field(description="mean_t |dLoss_total(t)|")
    abs_dloss_direct: float = Field(description="mean_t |dLoss_direct(t)|")
    dloss_total: float = Field(description="mean_t dLoss_total(t) (signed)")
    dloss_direct: float
    abs_dentropy_total: float
    abs_dentropy_direct: float
    dentropy_total: float
    dentropy_direct: float
    ln_mediated_fraction_loss: float | None = Field(
        description="1 - abs_dloss_direct / abs_dloss_total (None when abs_dloss_total == 0)")
    ln_mediated_fraction_entropy: float | None = Field(
        description="1 - abs_dentropy_direct / abs_dentropy_total (None when abs_dentropy_total == 0)")


class ConfidenceModelResult(BaseModel):
    """Confidence-neuron analysis of one model (one role)."""

    role: str
    layer: int
    n_layers: int
    d_model: int
    d_mlp: int
    d_vocab: int
    k: int = Field(description="bottom singular directions of W_U used for rho")
    bottom_singular_values: list[float] = Field(description="the k smallest singular values of W_U, descending")
    rho_random_baseline: float = Field(description="sqrt(k / d_model)")
    has_final_scale: bool = Field(description="whether ln_final has a scale (False: LN-free, total == direct)")
    method: Literal["direct_to_final_residual", "propagate"]
    rank_by: RankBy
    candidate_source: CandidateSource
    thresholds: FlagThresholds
    n_tokens: int = Field(description="scored tokens (positions with a next token)")
    n_mean_tokens: int = Field(description="tokens the mean activation is taken over (every real position)")
    clean_loss: float
    clean_entropy: float
    clean_logit_rel_error: float = Field(
        description="max |C r @ W_U / s + b_U - logits| / max |logits| on scored tokens (checks the norm model)")
    neurons: list[NeuronEffect] = Field(description="ranked table of the candidate neurons")
    weights: NeuronWeights


class RoleCandidate(BaseModel):
    neuron: str
    entropy_neuron_like: bool
    abs_dloss_total: float
    abs_dloss_direct: float
    ln_mediated_fraction_loss: float | None
    ln_mediated_fraction_entropy: float | None


class TopCandidate(BaseModel):
    """The original model's highest-ranked entropy-neuron-like candidate, seen in every role."""

    neuron: str
    flagged: bool = Field(description="False: no candidate was flagged, this is the first row of the ranking")
    from_role: str
    by_role: dict[str, RoleCandidate]


class ConfidenceResult(BaseModel):
    manifest: Manifest
    pair: str | None
    layer: int
    candidates: list[str]
    candidate_source: CandidateSource
    roles: dict[str, ConfidenceModelResult]
    top_candidate: TopCandidate | None


# ----------------------------------------------------------------------------- helpers


def neuron_id(layer: int, index: int) -> str:
    return f"{layer}.{index}"


def parse_neuron(spec: int | str, layer: int) -> int:
    """A neuron index from an int (in `layer`) or an 'L.N' id (L must be `layer`)."""
    if isinstance(spec, int):
        return spec
    text = str(spec).strip()
    if "." in text:
        left, right = text.split(".", 1)
        try:
            spec_layer, index = int(left), int(right)
        except ValueError:
            raise ConfidenceNeuronsError(f"neuron id {spec!r} is not 'layer.index'") from None
        if spec_layer != layer:
            raise ConfidenceNeuronsError(f"neuron {spec!r} is not in the analysed layer {layer}")
        return index
    try:
        return int(text)
    except ValueError:
        raise ConfidenceNeuronsError(f"neuron id {spec!r} is not 'layer.index' or an index") from None


def resolve_layer(model: LoadedModel, layer: int) -> int:
    n_layers = model.bridge.cfg.n_layers
    resolved = layer + n_layers if layer < 0 else layer
    if not 0 <= resolved < n_layers:
        raise ConfidenceNeuronsError(f"layer {layer} out of range for a {n_layers}-layer model")
    return resolved


def default_k(d_model: int) -> int:
    return max(1, round(0.01 * d_model))


def _stats_device(device: torch.device) -> torch.device:
    return torch.device("cpu") if device.type == "mps" else device  # no float64 on MPS


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def weight_statistics(model: LoadedModel, layer: int = -1, k: int | None = None,
                      chunk: int = 256) -> tuple[NeuronWeights, list[float]]:
    """(norm, rho, LogitVar of every neuron of `layer`, the k smallest singular values), float64.

    rho = |W_out[n] @ U[:, -k:]| / |W_out[n]| (SVD W_U = U S V^T);
    LogitVar = Var_v (W_out[n] . W_U[:, v]) / (|W_out[n]| |W_U[:, v]|).
    """
    bridge = model.bridge
    layer = resolve_layer(model, layer)
    dev = _stats_device(model.device)
    w_out = bridge.blocks[layer].mlp.W_out.detach().to(dev, torch.float64)  # [d_mlp, d_model]
    w_u = bridge.W_U.detach().to(dev, torch.float64)  # [d_model, d_vocab]
    d_model = w_u.shape[0]
    k = default_k(d_model) if k is None else int(k)
    if not 1 <= k <= d_model:
        raise ConfidenceNeuronsError(f"k = {k} must be in [1, d_model = {d_model}]")
    u, s, _ = torch.linalg.svd(w_u, full_matrices=False)  # u [d_model, d_model], s descending
    bottom = u[:, -k:]  # [d_model, k]
    norm = w_out.norm(dim=1)  # [d_mlp]
    rho = (w_out @ bottom).norm(dim=1) / norm
    w_u_unit = w_u / w_u.norm(dim=0, keepdim=True)  # [d_model, d_vocab]
    logit_var = torch.empty_like(norm)
    for start in range(0, w_out.shape[0], chunk):
        rows = w_out[start:start + chunk]
        cos = (rows / rows.norm(dim=1, keepdim=True)) @ w_u_unit  # [chunk, d_vocab]
        logit_var[start:start + chunk] = cos.var(dim=1, unbiased=False)
    weights = NeuronWeights(w_out_norm=norm.tolist(), rho=rho.tolist(), logit_var=logit_var.tolist())
    return weights, s[-k:].tolist()


def _percentiles(values: torch.Tensor) -> torch.Tensor:
    """100 * fraction of entries <= each entry: [n] -> [n]."""
    sorted_vals = torch.sort(values).values
    return 100.0 * torch.searchsorted(sorted_vals, values, right=True).double() / values.numel()


def _top_norm_rho(weights: NeuronWeights, top_n: int) -> list[int]:
    score = torch.tensor(weights.w_out_norm, dtype=torch.float64) * torch.tensor(weights.rho, dtype=torch.float64)
    return torch.argsort(score, descending=True)[:top_n].tolist()


def known_model_name(model: LoadedModel, pair: str | None) -> str | None:
    """The KNOWN_ENTROPY_NEURONS key for this pair name or Hub id, if any."""
    if pair in KNOWN_ENTROPY_NEURONS:
        return pair
    hub_id = getattr(model.source, "hub_id", None)
    if pair is None and model.role == "original" and hub_id in HUB_ID_ALIASES:
        return HUB_ID_ALIASES[hub_id]
    return None


def default_candidates(model: LoadedModel, layer: int = -1, *, pair: str | None = None, top_n: int = 20,
                       k: int | None = None, weights: NeuronWeights | None = None) -> tuple[list[int], CandidateSource]:
    """Known GPT-2 entropy neurons when the pair (or Hub id) and the model's shape match and the
    neurons lie in `layer`; otherwise the top-N neurons by |W_out| * rho."""
    layer = resolve_layer(model, layer)
    cfg = model.bridge.cfg
    name = known_model_name(model, pair)
    if name is not None and KNOWN_MODEL_SHAPES[name] == (cfg.n_layers, cfg.d_model, cfg.d_mlp):
        ids = [tuple(map(int, n.split("."))) for n in KNOWN_ENTROPY_NEURONS[name]]
        if all(lay == layer and idx < cfg.d_mlp for lay, idx in ids):
            return [idx for _, idx in ids], "known"
    if weights is None:
        weights, _ = weight_statistics(model, layer, k)
    return _top_norm_rho(weights, top_n), "top_norm_rho"


# ----------------------------------------------------------------------------- tokens


def _token_batches(tokens, lengths, batch_size: int, n_ctx: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Normalise to [(tokens [b, p] long, lengths [b])] with b <= batch_size."""
    if isinstance(tokens, torch.Tensor):
        tokens = [tokens]
        lengths = [lengths] if lengths is not None else None
    tokens = list(tokens)
    if lengths is not None and len(lengths) != len(tokens):
        raise ConfidenceNeuronsError("lengths must match the token batches one to one")
    out = []
    for i, toks in enumerate(tokens):
        toks = torch.as_tensor(toks).long()
        if toks.ndim == 1:
            toks = toks[None]
        if toks.ndim != 2:
            raise ConfidenceNeuronsError(f"token batch {i} has shape {tuple(toks.shape)}; expected [batch, pos]")
        if toks.shape[1] > n_ctx:
            raise ConfidenceNeuronsError(
                f"token batch {i} has {toks.shape[1]} positions; the model's context is {n_ctx}")
        lens = (torch.as_tensor(lengths[i]).long().reshape(-1) if lengths is not None
                else torch.full((toks.shape[0],), toks.shape[1], dtype=torch.long))
        if lens.shape[0] != toks.shape[0] or bool((lens > toks.shape[1]).any()) or bool((lens < 1).any()):
            raise ConfidenceNeuronsError(f"lengths of token batch {i} do not fit its shape {tuple(toks.shape)}")
        for start in range(0, toks.shape[0], batch_size):
            out.append((toks[start:start + batch_size], lens[start:start + batch_size]))
    if not out:
        raise ConfidenceNeuronsError("no tokens given")
    return out


def _masks(lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(real [b, p]: pos < length, scored [b, p]: pos < length - 1, i.e. has a next token)."""
    pos = torch.arange(width)[None, :]
    return pos < lengths[:, None], pos < (lengths[:, None] - 1)


# ----------------------------------------------------------------------------- core maths


def _final_norm(model: LoadedModel, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """ln_final as N(x) = C x / s(x): returns (C x [..., d_model], s(x) [..., 1]) in `dtype`.

    s is what `ln_final.hook_scale` sees (recomputed from x); a final norm without that hook
    has s = 1 and C x = N(x) (an identity in an LN-free model).
    """
    bridge = model.bridge
    captured: list[torch.Tensor] = []

    def grab(scale, hook):
        captured.append(scale)

    hooks = [(SCALE_HOOK, grab)] if SCALE_HOOK in bridge.hook_dict else []
    with bridge.hooks(fwd_hooks=hooks):
        y = bridge.ln_final(x.to(model.dtype)).to(dtype)
    scale = captured[-1].to(dtype) if captured else torch.ones_like(y[..., :1])
    return y * scale, scale


def _loss_entropy(num: torch.Tensor, scale: torch.Tensor, b_u: torch.Tensor,
                  targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits = num / scale + b_U: num [n, t, V], scale [n or 1, t, 1], targets [t] ->
    (next-token CE [n, t], entropy [n, t])."""
    lp = (num / scale + b_u).log_softmax(-1)
    loss = -lp.gather(-1, targets[None, :, None].expand(lp.shape[0], -1, 1)).squeeze(-1)
    entropy = -(lp.exp() * lp).sum(-1)
    return loss, entropy


def _chunk_rows(chunk_size: int | None, d_vocab: int) -> int:
    """(neuron, token) rows per block of logits: default 2**24 logits per block."""
    return max(1, int(chunk_size) if chunk_size is not None else (1 << 24) // d_vocab)


@torch.no_grad()
def mean_activations(model: LoadedModel, batches, layer: int) -> tuple[torch.Tensor, int]:
    """(mean over every real sample token of blocks.{layer}.mlp.hook_post [d_mlp] float64, count)."""
    bridge = model.bridge
    name = f"blocks.{layer}.mlp.hook_post"
    total, count = None, 0
    for toks, lens in batches:
        real, _ = _masks(lens, toks.shape[1])
        _, cache = bridge.run_with_cache(toks.to(model.device), names_filter=[name])
        acts = cache[name][real.to(model.device)].double()  # [t, d_mlp]
        total = acts.sum(0) if total is None else total + acts.sum(0)
        count += acts.shape[0]
    return total / count, count


@dataclass
class _BatchEffects:
    """Per scored token of one forward batch (t = scored tokens in row-major order)."""

    loss: torch.Tensor  # [t] clean CE
    entropy: torch.Tensor  # [t] clean entropy
    dloss_total: torch.Tensor  # [n, t]
    dloss_direct: torch.Tensor  # [n, t]
    dentropy_total: torch.Tensor  # [n, t]
    dentropy_direct: torch.Tensor  # [n, t]
    logit_abs_err: float
    logit_abs_max: float


@dataclass
class _Ablation:
    """What every batch's ablation reads: the candidates' weights in the working dtype and the logit block sizes."""

    post: str  # the layer's hook_post
    neurons: list[int]  # [n] candidate indices in the layer
    idx: torch.Tensor  # [n] the same, a long tensor on the model's device
    mean: torch.Tensor  # [n] float64: each candidate's mean activation, its ablated value
    w_u: torch.Tensor  # [d_model, V]
    b_u: torch.Tensor  # [V]
    w_out: torch.Tensor  # [n, d_model]: W_out[n]
    cw: torch.Tensor  # [n, d_model]: C W_out[n]
    cw_u: torch.Tensor | None  # [n, V]: C W_out[n] @ W_U, when it fits (else computed per neuron block)
    dtype: torch.dtype  # the working dtype
    nb: int  # neurons per block of logits
    tb: int  # tokens per block of logits


def _ablation(model: LoadedModel, layer: int, neurons: list[int], means: torch.Tensor, *, propagate: bool,
              chunk_rows: int) -> _Ablation:
    """The weights of `layer`'s candidate `neurons`; a block holds about chunk_rows (neuron, token) rows of logits."""
    bridge, dev = model.bridge, model.device
    wd = _work_dtype(model.dtype)
    w_u = bridge.W_U.detach().to(wd)  # [d_model, V]
    idx = torch.tensor(neurons, dtype=torch.long, device=dev)
    w_out = bridge.blocks[layer].mlp.W_out.detach()[idx].to(wd)  # [n, d_model]
    cw, _ = _final_norm(model, w_out, wd)  # C W_out[n]: [n, d_model]
    n = len(neurons)
    nb = 1 if propagate else max(1, min(n, chunk_rows))
    return _Ablation(
        post=f"blocks.{layer}.mlp.hook_post", neurons=neurons, idx=idx, mean=means.to(dev)[idx], w_u=w_u,
        b_u=bridge.b_U.detach().to(wd), w_out=w_out, cw=cw,
        cw_u=cw @ w_u if not propagate and n * w_u.shape[1] <= (1 << 26) else None,
        dtype=wd, nb=nb, tb=max(1, chunk_rows // nb),
    )


class _EffectTables:
    """One batch's clean CE / entropy [t] and ablated - clean tables [n, t], filled a block of logits at a time."""

    def __init__(self, ab: _Ablation, targets: torch.Tensor, s0: torch.Tensor) -> None:
        n, t, dev = len(ab.neurons), targets.shape[0], targets.device
        self.ab, self.targets, self.s0 = ab, targets, s0  # targets [t] next tokens, s0 [t, 1] the clean scale
        self.out = {key: torch.empty(n, t, dtype=torch.float64, device=dev)
                    for key in ("dloss_total", "dloss_direct", "dentropy_total", "dentropy_direct")}
        self.loss0 = torch.empty(t, dtype=torch.float64, device=dev)
        self.ent0 = torch.empty(t, dtype=torch.float64, device=dev)
        self.err, self.ref_max = 0.0, 0.0

    def clean(self, sl: slice, a: torch.Tensor, ref_logits: torch.Tensor) -> None:
        """Tokens sl of the clean run, a = C r @ W_U [tb, V]; checks a / s + b_U against the model's logits [tb, V]."""
        l0, e0 = _loss_entropy(a[None], self.s0[sl][None], self.ab.b_u, self.targets[sl])
        self.loss0[sl], self.ent0[sl] = l0[0].double(), e0[0].double()
        self.err = max(self.err, float((a / self.s0[sl] + self.ab.b_u - ref_logits).abs().max()))
        self.ref_max = max(self.ref_max, float(ref_logits.abs().max()))

    def record(self, ns: slice, sl: slice, num: torch.Tensor, s_total: torch.Tensor) -> None:
        """Neurons ns, tokens sl: num = C r' @ W_U [nb, tb, V]; total divides by s(r') [nb, tb, 1], direct by the
        clean s."""
        lt, et = _loss_entropy(num, s_total, self.ab.b_u, self.targets[sl])
        ld, ed = _loss_entropy(num, self.s0[sl][None], self.ab.b_u, self.targets[sl])
        self.out["dloss_total"][ns, sl] = lt.double() - self.loss0[sl]
        self.out["dentropy_total"][ns, sl] = et.double() - self.ent0[sl]
        self.out["dloss_direct"][ns, sl] = ld.double() - self.loss0[sl]
        self.out["dentropy_direct"][ns, sl] = ed.double() - self.ent0[sl]

    def result(self) -> _BatchEffects:
        return _BatchEffects(self.loss0, self.ent0, logit_abs_err=self.err, logit_abs_max=self.ref_max, **self.out)


def _direct_to_final_residual(model: LoadedModel, ab: _Ablation, tables: _EffectTables, sl: slice, a: torch.Tensor,
                              resid: torch.Tensor, delta: torch.Tensor) -> None:
    """Tokens sl, r' = r + delta_n W_out[n]: C r' @ W_U = a + delta_n (C W_out[n] @ W_U), s(r') from ln_final.

    a [tb, V] the clean C r @ W_U, resid [t, d_model] the clean r, delta [n, t] the ablation's change."""
    n, nb, wd = len(ab.neurons), ab.nb, ab.dtype
    for n0 in range(0, n, nb):
        ns = slice(n0, min(n, n0 + nb))
        d = delta[ns, sl][..., None]  # [nb, tb, 1]
        _, s_total = _final_norm(model, resid[sl][None] + d * ab.w_out[ns][:, None, :], wd)  # [nb, tb, 1]
        b = ab.cw_u[ns] if ab.cw_u is not None else ab.cw[ns] @ ab.w_u  # [nb, V]
        tables.record(ns, sl, a[None] + d * b[:, None, :], s_total)


def _propagated(model: LoadedModel, ab: _Ablation, tables: _EffectTables, toks: torch.Tensor,
                scored: torch.Tensor) -> None:
    """Each neuron set to its mean in a re-run of toks [b, p]: r' at ln_final's input includes every later layer."""
    bridge, wd = model.bridge, ab.dtype
    t = tables.targets.shape[0]
    for j, neuron in enumerate(ab.neurons):
        def ablate(act, hook, neuron=neuron, value=float(ab.mean[j])):
            act = act.clone()
            act[..., neuron] = value
            return act

        with bridge.hooks(fwd_hooks=[(ab.post, ablate)]):
            _, c2 = bridge.run_with_cache(toks, names_filter=[RESID_HOOK])
        cr_abl, s_abl = _final_norm(model, c2[RESID_HOOK][scored].to(wd), wd)  # [t, d], [t, 1]
        del c2
        for t0 in range(0, t, ab.tb):
            sl = slice(t0, min(t, t0 + ab.tb))
            tables.record(slice(j, j + 1), sl, (cr_abl[sl] @ ab.w_u)[None], s_abl[sl][None])


def _batch_effects(model: LoadedModel, ab: _Ablation, toks: torch.Tensor, lens: torch.Tensor, *,
                   propagate: bool) -> _BatchEffects:
    """The clean run of toks [b, p] (lengths lens [b]) and every candidate's ablation, per scored token."""
    bridge, dev, wd = model.bridge, model.device, ab.dtype
    toks = toks.to(dev)
    _, scored = _masks(lens, toks.shape[1])
    scored = scored.to(dev)  # [b, p]
    targets = torch.roll(toks, -1, dims=1)[scored]  # [t]
    logits, cache = bridge.run_with_cache(toks, names_filter=[ab.post, RESID_HOOK])
    ref_logits = logits[scored].to(wd)  # [t, V]
    resid = cache[RESID_HOOK][scored].to(wd)  # [t, d_model]
    delta = (ab.mean[:, None] - cache[ab.post][scored][:, ab.idx].double().T).to(wd)  # [n, t]
    del logits, cache
    t = resid.shape[0]
    cr, s0 = _final_norm(model, resid, wd)  # [t, d_model], clean scale [t, 1]
    tables = _EffectTables(ab, targets, s0)
    for t0 in range(0, t, ab.tb):
        sl = slice(t0, min(t, t0 + ab.tb))
        a = cr[sl] @ ab.w_u  # clean C r @ W_U: [tb, V]
        tables.clean(sl, a, ref_logits[sl])
        if not propagate:
            _direct_to_final_residual(model, ab, tables, sl, a, resid, delta)
    if propagate:
        _propagated(model, ab, tables, toks, scored)
    return tables.result()


def _iter_effects(model: LoadedModel, batches, layer: int, neurons: list[int], means: torch.Tensor, *,
                  propagate: bool, chunk_rows: int, progress: Progress, start: float, end: float
                  ) -> Iterator[_BatchEffects]:
    """Per forward batch, the clean and ablated CE / entropy of every scored token.

    Direct-to-final-residual (default): C r' @ W_U = C r @ W_U + delta * (C W_out[n]) @ W_U, so
    a block of [neurons, tokens] logits costs one elementwise op over the vocabulary; s(r') is
    recomputed by ln_final itself. propagate: r' comes from a re-run with the neuron at its mean.
    """
    ab = _ablation(model, layer, neurons, means, propagate=propagate, chunk_rows=chunk_rows)
    for bi, (toks, lens) in enumerate(batches):
        progress.stage("ablation", start + (end - start) * bi / len(batches))
        yield _batch_effects(model, ab, toks, lens, propagate=propagate)


@dataclass
class AblationEffects:
    """Per-token mean-ablation effects; t runs over scored tokens (batch rows in order, row-major)."""

    neurons: list[int]
    mean_activation: torch.Tensor  # [n] float64
    loss: torch.Tensor  # [t] clean CE
    entropy: torch.Tensor  # [t]
    dloss_total: torch.Tensor  # [n, t]
    dloss_direct: torch.Tensor  # [n, t]
    dentropy_total: torch.Tensor  # [n, t]
    dentropy_direct: torch.Tensor  # [n, t]


@torch.no_grad()
def neuron_ablation_effects(model: LoadedModel, tokens, neurons: Sequence[int | str], *, layer: int = -1,
                            lengths=None, propagate: bool = False, chunk_size: int | None = None,
                            batch_size: int = 4) -> AblationEffects:
    """Per-token total and direct effects of mean-ablating each neuron (see the module docstring)."""
    layer = resolve_layer(model, layer)
    bridge = model.bridge
    batches = _token_batches(tokens, lengths, batch_size, bridge.cfg.n_ctx)
    idx = [parse_neuron(n, layer) for n in neurons]
    means, _ = mean_activations(model, batches, layer)
    parts = list(_iter_effects(model, batches, layer, idx, means, propagate=propagate,
                               chunk_rows=_chunk_rows(chunk_size, bridge.cfg.d_vocab),
                               progress=Progress.none(), start=0.0, end=1.0))
    cat = lambda key, dim: torch.cat([getattr(p, key) for p in parts], dim).cpu()  # noqa: E731
    return AblationEffects(
        neurons=idx, mean_activation=means[idx].cpu(), loss=cat("loss", 0), entropy=cat("entropy", 0),
        dloss_total=cat("dloss_total", 1), dloss_direct=cat("dloss_direct", 1),
        dentropy_total=cat("dentropy_total", 1), dentropy_direct=cat("dentropy_direct", 1),
    )


# ----------------------------------------------------------------------------- analysis


def _fraction(direct: float, total: float) -> float | None:
    return 1.0 - direct / total if total > 0 else None


def resolve_candidates(ref: LoadedModel, layer: int, candidates: Sequence[int | str] | Literal["all"] | None, *,
                       pair: str | None, top_n: int, k: int | None,
                       weights: NeuronWeights | None = None) -> tuple[list[int], CandidateSource]:
    """(candidate neuron indices of `layer` (resolved, >= 0), their source): the given ones, "all", or
    `default_candidates` of the reference model (its `weights` if already computed, else computed with k)."""
    if candidates is None:
        return default_candidates(ref, layer, pair=pair, top_n=top_n, k=k, weights=weights)
    if isinstance(candidates, str) and candidates == "all":
        return list(range(ref.bridge.cfg.d_mlp)), "all"
    return [parse_neuron(c, layer) for c in candidates], "given"


def _check_candidates(idx: list[int], d_mlp: int) -> list[int]:
    """The candidates without repeats, in order; each must be a neuron of the layer, and one at least."""
    idx = list(dict.fromkeys(idx))
    if not idx or not all(0 <= i < d_mlp for i in idx):
        raise ConfidenceNeuronsError(f"candidate neurons must be in [0, {d_mlp}) and non-empty, got {idx[:10]}")
    return idx


@dataclass
class _MeanEffects:
    """Every candidate's effects averaged over the scored tokens, and the clean run's own numbers."""

    stats: dict[str, list[float]]  # NeuronEffect field (abs_dloss_total, dloss_total, ...) -> [n]
    n_tokens: int
    clean_loss: float
    clean_entropy: float
    logit_rel_error: float  # max |C r @ W_U / s + b_U - logits| / max |logits|


def _mean_effects(model: LoadedModel, batches, layer: int, idx: list[int], means: torch.Tensor, *,
                  propagate: bool, chunk_rows: int, progress: Progress) -> _MeanEffects:
    """mean_t dX(t) and mean_t |dX(t)| of X in (loss, entropy), total and direct, over every scored token t."""
    sums = {key: torch.zeros(len(idx), dtype=torch.float64) for key in (
        "abs_dloss_total", "abs_dloss_direct", "dloss_total", "dloss_direct",
        "abs_dentropy_total", "abs_dentropy_direct", "dentropy_total", "dentropy_direct")}
    n_tok, loss_sum, ent_sum, err, ref_max = 0, 0.0, 0.0, 0.0, 0.0
    for part in _iter_effects(model, batches, layer, idx, means, propagate=propagate, chunk_rows=chunk_rows,
                              progress=progress, start=0.3, end=1.0):
        for name in ("loss", "entropy"):
            for kind in ("total", "direct"):
                values = getattr(part, f"d{name}_{kind}").cpu()  # [n, t]
                sums[f"abs_d{name}_{kind}"] += values.abs().sum(1)
                sums[f"d{name}_{kind}"] += values.sum(1)
        n_tok += part.loss.numel()
        loss_sum += float(part.loss.sum())
        ent_sum += float(part.entropy.sum())
        err, ref_max = max(err, part.logit_abs_err), max(ref_max, part.logit_abs_max)
    if n_tok == 0:
        raise ConfidenceNeuronsError("no scored tokens: every sequence needs at least two tokens")
    return _MeanEffects(
        stats={key: (value / n_tok).tolist() for key, value in sums.items()}, n_tokens=n_tok,
        clean_loss=loss_sum / n_tok, clean_entropy=ent_sum / n_tok,
        logit_rel_error=err / ref_max if ref_max > 0 else err,
    )


def _neuron_rows(layer: int, idx: list[int], weights: NeuronWeights, means: torch.Tensor, effects: _MeanEffects,
                 thresholds: FlagThresholds, rho_min: float) -> list[NeuronEffect]:
    """One unranked row per candidate: weight statistics with percentiles in the layer, the flag, mean effects."""
    norm_pct = _percentiles(torch.tensor(weights.w_out_norm, dtype=torch.float64)).tolist()
    lv_pct = _percentiles(torch.tensor(weights.logit_var, dtype=torch.float64)).tolist()
    rows = []
    for j, i in enumerate(idx):
        stats = {key: values[j] for key, values in effects.stats.items()}
        flag = (norm_pct[i] >= thresholds.norm_percentile_min and weights.rho[i] >= rho_min
                and lv_pct[i] <= thresholds.logit_var_percentile_max)
        rows.append(NeuronEffect(
            rank=0, neuron=neuron_id(layer, i), layer=layer, index=i,
            w_out_norm=weights.w_out_norm[i], norm_percentile=norm_pct[i], rho=weights.rho[i],
            logit_var=weights.logit_var[i], logit_var_percentile=lv_pct[i], entropy_neuron_like=flag,
            mean_activation=float(means[i]), **stats,
            ln_mediated_fraction_loss=_fraction(stats["abs_dloss_direct"], stats["abs_dloss_total"]),
            ln_mediated_fraction_entropy=_fraction(stats["abs_dentropy_direct"], stats["abs_dentropy_total"]),
        ))
    return rows


def _rank(rows: list[NeuronEffect], rank_by: RankBy) -> list[NeuronEffect]:
    """rows sorted by |dLoss_total| (ties: norm * rho) or by norm * rho (ties: index), with their ranks set."""
    if rank_by == "total_loss":
        rows.sort(key=lambda r: (-r.abs_dloss_total, -r.w_out_norm * r.rho, r.index))
    elif rank_by == "norm_rho":
        rows.sort(key=lambda r: (-r.w_out_norm * r.rho, r.index))
    else:
        raise ConfidenceNeuronsError(f"rank_by must be 'total_loss' or 'norm_rho', got {rank_by!r}")
    for rank, row in enumerate(rows, 1):
        row.rank = rank
    return rows



@torch.no_grad()
def confidence_neurons(
    model: LoadedModel,
    tokens,
    *,
    layer: int = -1,
    candidates: Sequence[int | str] | Literal["all"] | None = None,
    k: int | None = None,
    top_n: int = 20,
    chunk_size: int | None = None,
    batch_size: int = 4,
    lengths=None,
    propagate: bool = False,
    rank_by: RankBy = "total_loss",
    thresholds: FlagThresholds | None = None,
    pair: str | None = None,
    progress: Progress | None = None,
    _candidate_source: CandidateSource | None = None,
) -> ConfidenceModelResult:
    """Weight statistics of every neuron of `layer` and mean-ablation effects of the candidates.

    tokens: a [batch, pos] tensor (or a list of them), optionally with `lengths` marking real
    positions (right padding). candidates: neuron indices or 'L.N' ids, "all", or None for
    `default_candidates` (known GPT-2 entropy neurons, else the top-N by |W_out| * rho).
    chunk_size: (neuron, token) rows per block of logits (default 2**24 / d_vocab).
    """
    progress = ensure(progress)
    thresholds = thresholds or FlagThresholds()
    cfg = model.bridge.cfg
    layer = resolve_layer(model, layer)
    batches = _token_batches(tokens, lengths, batch_size, cfg.n_ctx)

    progress.stage("weights", 0.0)
    weights, bottom_s = weight_statistics(model, layer, k)
    k = len(bottom_s)
    idx, source = resolve_candidates(model, layer, candidates, pair=pair, top_n=top_n, k=k, weights=weights)
    source = _candidate_source or source
    idx = _check_candidates(idx, cfg.d_mlp)
    if propagate and layer == cfg.n_layers - 1:
        logger.info("propagate=True on the last layer: same result as the direct-to-final-residual ablation")

    progress.stage("mean activations", 0.1)
    means, n_mean = mean_activations(model, batches, layer)
    effects = _mean_effects(model, batches, layer, idx, means, propagate=propagate,
                            chunk_rows=_chunk_rows(chunk_size, cfg.d_vocab), progress=progress)
    rho_baseline = math.sqrt(k / cfg.d_model)
    rows = _neuron_rows(layer, idx, weights, means, effects, thresholds, thresholds.rho_min_factor * rho_baseline)
    rows = _rank(rows, rank_by)
    progress.stage("ablation", 1.0)

    result = ConfidenceModelResult(
        role=model.role, layer=layer, n_layers=cfg.n_layers, d_model=cfg.d_model, d_mlp=cfg.d_mlp,
        d_vocab=cfg.d_vocab, k=k, bottom_singular_values=bottom_s, rho_random_baseline=rho_baseline,
        has_final_scale=SCALE_HOOK in model.bridge.hook_dict,
        method="propagate" if propagate else "direct_to_final_residual", rank_by=rank_by,
        candidate_source=source, thresholds=thresholds, n_tokens=effects.n_tokens, n_mean_tokens=n_mean,
        clean_loss=effects.clean_loss, clean_entropy=effects.clean_entropy,
        clean_logit_rel_error=effects.logit_rel_error, neurons=rows, weights=weights,
    )
    logger.info("confidence neurons %s layer %d: %d candidates on %d tokens (%s); top %s",
                model.role, layer, len(idx), effects.n_tokens, result.method, rows[0].neuron)
    return result


def _role_candidate(row: NeuronEffect) -> RoleCandidate:
    return RoleCandidate(
        neuron=row.neuron, entropy_neuron_like=row.entropy_neuron_like, abs_dloss_total=row.abs_dloss_total,
        abs_dloss_direct=row.abs_dloss_direct, ln_mediated_fraction_loss=row.ln_mediated_fraction_loss,
        ln_mediated_fraction_entropy=row.ln_mediated_fraction_entropy)


def top_candidate(roles: Mapping[str, ConfidenceModelResult], ref_role: str) -> TopCandidate:
    """The reference role's highest-ranked entropy-neuron-like neuron (else its first row), seen in every role.

    Every role must have scored that neuron (the same candidates in every role)."""
    ref_rows = roles[ref_role].neurons
    chosen = next((row for row in ref_rows if row.entropy_neuron_like), ref_rows[0])
    by_role = {role: _role_candidate(next(row for row in res.neurons if row.index == chosen.index))
               for role, res in roles.items()}
    return TopCandidate(neuron=chosen.neuron, flagged=chosen.entropy_neuron_like, from_role=ref_role, by_role=by_role)
