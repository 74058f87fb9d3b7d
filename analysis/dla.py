"""Direct logit attribution (DLA) under three LayerNorm treatments, against the true direct effect.

A target is a direction in the residual stream read at one position per prompt:
    target(x) = LN_final(x) . d + beta,    d = W_U[:, a] (- W_U[:, b]),  beta = b_U[a] (- b_U[b]),
x the final residual stream = sum of its components c (embed, pos_embed, every head L{l}H{h}, every
attention output bias L{l}b_O, every MLP L{l}MLP; the top neurons L{l}N{n} are parts of the MLPs).

Treatments of a component c (per prompt):
- `cached_scale`  (standard DLA, TL's apply_ln_to_stack):  (c - mean(c)) / s . d,  s = cached ln_final scale
- `direct_effect` (ground truth):  target(x) - target(x - c), ln_final (scale included) recomputed on x - c
- `raw`           (no scale):  c . d
With no LayerNorm (the `ln_free` role: LN_final is the identity) the three coincide and
sum_c DLA_c + beta == target exactly. Error of DLA against DE: per component, and the paper's
NMAE = mean|DLA - DE| / mean|DE| * 100 over (components x prompts), with a bootstrap CI over prompts.

All attribution arithmetic is float64 (activations are read at the model's dtype). The bridge is in
TL compatibility mode: unembedding centred, so one logit is defined up to a per-position constant
(log-probs and logit differences are unchanged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, Field, model_validator

from lnscope.analysis.loading import LoadedModel
from lnscope.analysis.progress import Progress, ensure
from lnscope.analysis.results import Manifest

logger = logging.getLogger(__name__)

Treatment = Literal["cached_scale", "direct_effect", "raw"]
TREATMENTS: tuple[str, ...] = ("cached_scale", "direct_effect", "raw")
TargetKind = Literal["logit", "logit_diff", "task_metric"]

# Elements of float64 scratch a vectorised direct-effect chunk may use (~128 MiB).
_CHUNK_ELEMENTS = 1 << 24
_SCALE_HOOK = "ln_final.hook_scale"


# --------------------------------------------------------------------------------------- target
class DLATarget(BaseModel):
    """What is attributed, per prompt: one logit, a difference of two logits, or a task's metric.

    - `logit`: `tokens` (one id for every prompt, or one per prompt).
    - `logit_diff`: logit(`tokens`) - logit(`other_tokens`) (each: one id, or one per prompt).
    - `task_metric`: logit(answer[0]) - logit(answer[1]) with `answer_tokens` [batch, 2] (e.g. IOI:
      IO vs S). Only tasks whose metric is such a logit difference can be attributed linearly.
    `end_pos` (optional, one per prompt) is where the target is read when `dla` gets no end_pos.
    """

    kind: TargetKind
    tokens: list[int] | None = None
    other_tokens: list[int] | None = None
    answer_tokens: list[list[int]] | None = None
    end_pos: list[int] | None = None
    task: str | None = Field(default=None, description="the task name, for a task_metric target")

    @model_validator(mode="after")
    def _check(self) -> "DLATarget":
        if self.kind in ("logit", "logit_diff") and not self.tokens:
            raise ValueError(f"a {self.kind} target needs `tokens`")
        if self.kind == "logit_diff":
            if not self.other_tokens:
                raise ValueError("a logit_diff target needs `other_tokens`")
            if 1 not in (len(self.tokens), len(self.other_tokens)) and len(self.tokens) != len(self.other_tokens):
                raise ValueError("tokens and other_tokens must have the same length (or length 1)")
        if self.kind == "task_metric":
            if not self.answer_tokens or any(len(row) != 2 for row in self.answer_tokens):
                raise ValueError("a task_metric target needs `answer_tokens` as [batch, 2] (correct, wrong)")
        return self

    @classmethod
    def logit(cls, token: int | Sequence[int]) -> "DLATarget":
        return cls(kind="logit", tokens=_as_list(token))

    @classmethod
    def logit_diff(cls, token: int | Sequence[int], other: int | Sequence[int]) -> "DLATarget":
        return cls(kind="logit_diff", tokens=_as_list(token), other_tokens=_as_list(other))

    @classmethod
    def from_task(cls, batch: Any, name: str | None = None) -> "DLATarget":
        """From a TaskBatch-like object: `answer_tokens` [batch, 2] and, if present, `end_pos` [batch]."""
        if getattr(batch, "answer_tokens", None) is None:
            raise ValueError("this task has no answer_tokens: only logit-difference metrics can be attributed")
        answers = torch.as_tensor(batch.answer_tokens).long()
        if answers.ndim != 2 or answers.shape[1] != 2:
            raise ValueError(f"answer_tokens must be [batch, 2], got {tuple(answers.shape)}")
        end_pos = getattr(batch, "end_pos", None)
        return cls(
            kind="task_metric",
            answer_tokens=answers.tolist(),
            end_pos=torch.as_tensor(end_pos).long().tolist() if end_pos is not None else None,
            task=name or getattr(batch, "name", None) or getattr(batch, "task", None),
        )

    def token_pairs(self, n_prompts: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(positive [batch], negative [batch] or None) token ids."""
        if self.kind == "task_metric":
            answers = torch.tensor(self.answer_tokens, dtype=torch.long)  # [batch, 2]
            _check_len(answers.shape[0], n_prompts, "answer_tokens")
            return answers[:, 0], answers[:, 1]
        pos = _broadcast(self.tokens, n_prompts, "tokens")
        neg = _broadcast(self.other_tokens, n_prompts, "other_tokens") if self.kind == "logit_diff" else None
        return pos, neg


def _as_list(token: int | Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(token, torch.Tensor):
        return token.reshape(-1).long().tolist()
    if isinstance(token, int):
        return [token]
    return [int(t) for t in token]


def _check_len(got: int, want: int, what: str) -> None:
    if got != want:
        raise ValueError(f"{what} has {got} entries but there are {want} prompts")


def _broadcast(ids: list[int], n: int, what: str) -> torch.Tensor:
    t = torch.tensor(ids, dtype=torch.long)
    if t.numel() == 1:
        return t.expand(n).clone()
    _check_len(t.numel(), n, what)
    return t


# -------------------------------------------------------------------------------------- results
class TopNeuron(BaseModel):
    layer: int
    neuron: int
    label: str
    attribution: float = Field(description="mean over prompts")
    per_prompt: list[float]


class TreatmentDLA(BaseModel):
    """Attributions under one LN treatment. Component order = `DLAModelResult.labels`."""

    treatment: str
    mean: list[float] = Field(description="[component] mean over prompts")
    per_prompt: list[list[float]] = Field(description="[prompt][component]")
    heads: list[list[float]] = Field(description="[layer][head] mean over prompts")
    heads_per_prompt: list[list[list[float]]] = Field(description="[prompt][layer][head]")
    attn_layer_totals: list[float] = Field(description="[layer] heads + b_O, mean over prompts")
    mlp_layer_totals: list[float] = Field(description="[layer] MLP output, mean over prompts")
    attn_bias: list[float] = Field(description="[layer] b_O term, mean over prompts")
    embed: float
    pos_embed: float | None
    top_neurons: list[TopNeuron] = Field(description="top-k neurons by |mean attribution|")
    bias_term: list[float] = Field(description="[prompt] b_U . target (the unembedding bias term)")
    component_sum: list[float] = Field(description="[prompt] sum of all components + bias term")
    dla_sum_gap: list[float] = Field(description="[prompt] component_sum - actual target")
    max_abs_sum_gap: float


class ComponentError(BaseModel):
    label: str
    mean_abs_error: float = Field(description="mean over prompts of |DLA - DE|")
    mean_abs_de: float = Field(description="mean over prompts of |DE|")
    rel_error: float | None = Field(description="mean_abs_error / mean_abs_de (None if DE is 0)")


class NMAE(BaseModel):
    """mean|DLA - DE| / mean|DE| * 100 over (components x prompts); percentile bootstrap CI over prompts."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    over: str = Field(description="'components' (all of them) or 'heads'")
    n_components: int
    n_prompts: int
    n_bootstrap: int
    seed: int


class DLAErrors(BaseModel):
    treatment: str
    reference: str = "direct_effect"
    components: list[ComponentError]
    heads_abs_error: list[list[float]] = Field(description="[layer][head] mean |DLA - DE|")
    nmae: NMAE
    nmae_heads: NMAE


class DLAModelResult(BaseModel):
    role: str
    has_ln: bool
    final_scale: str = Field(description="'cached' (ln_final scale) or 'none' (LN-free: DLA is exact)")
    target: DLATarget
    n_prompts: int
    n_layers: int
    n_heads: int
    end_pos: list[int]
    labels: list[str] = Field(description="components: embed, pos_embed, L{l}H{h}, L{l}b_O, L{l}MLP")
    target_value: list[float] = Field(description="[prompt] the actual target from the model's logits")
    treatments: dict[str, TreatmentDLA]
    errors: dict[str, DLAErrors] = Field(description="per non-DE treatment: DLA vs direct_effect")
    treatments_max_abs_diff: float | None = Field(
        default=None,
        description="max |attribution difference| between any two treatments (0 up to rounding if LN-free)",
    )


class DLAResult(BaseModel):
    manifest: Manifest
    roles: dict[str, DLAModelResult]
    head_diffs: dict[str, dict[str, list[list[float]]]] = Field(
        description="'ln_free - original', 'control - original' -> treatment -> [layer][head] of mean attributions"
    )


# --------------------------------------------------------------------------------------- inputs
def _maths_device(device: torch.device) -> torch.device:
    return torch.device("cpu") if device.type == "mps" else device  # no float64 on MPS


def _check_treatments(treatments: Sequence[str]) -> list[str]:
    """The requested treatments, deduplicated in order; every one must be in TREATMENTS."""
    treatments = list(dict.fromkeys(treatments))
    unknown = [t for t in treatments if t not in TREATMENTS]
    if unknown or not treatments:
        raise ValueError(f"unknown treatments {unknown}; choose from {list(TREATMENTS)}")
    return treatments


def _as_batch(tokens: torch.Tensor) -> torch.Tensor:
    """tokens as a long [batch, pos] tensor (one prompt [pos] becomes [1, pos])."""
    tokens = torch.as_tensor(tokens).long()
    return tokens[None] if tokens.ndim == 1 else tokens


def _default_end_pos(tokens: torch.Tensor, tokenizer) -> torch.Tensor:
    """Last non-padding position per prompt (trailing pad tokens are padding; position 0 at least)."""
    batch, width = tokens.shape
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        return torch.full((batch,), width - 1, dtype=torch.long)
    real = tokens != pad  # [batch, pos]
    real[:, 0] = True
    idx = torch.arange(width).expand(batch, width)
    return torch.where(real, idx, torch.zeros_like(idx)).max(dim=1).values


def _resolve_end_pos(end_pos, target: DLATarget, tokens: torch.Tensor, tokenizer) -> torch.Tensor:
    """Where the target is read, [batch]: `end_pos`, else the target's, else the last real token (< 0: from the end)."""
    batch, width = tokens.shape
    if end_pos is None and target.end_pos is not None:
        end_pos = target.end_pos
    if end_pos is None:
        out = _default_end_pos(tokens, tokenizer)
    elif isinstance(end_pos, int):
        out = torch.full((batch,), end_pos, dtype=torch.long)
    else:
        out = torch.as_tensor(end_pos, dtype=torch.long).reshape(-1).clone()
        _check_len(out.numel(), batch, "end_pos")
    out = torch.where(out < 0, out + width, out)
    if (out < 0).any() or (out >= width).any():
        raise ValueError(f"end_pos out of range [0, {width})")
    return out


# ------------------------------------------------------------------------------ treatment maths
def layer_norm_pre(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The folded ln_final: (x - mean(x)) / sqrt(var(x) + eps) over the last dim (biased var)."""
    x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def direct_effects(
    resid: torch.Tensor, components: torch.Tensor, direction: torch.Tensor, eps: float | None
) -> torch.Tensor:
    """DE_c = target(x) - target(x - c), ln_final recomputed (none if eps is None): [n_comp, batch].

    resid [batch, d_model], components [n_comp, batch, d_model], direction [batch, d_model].
    The unembedding bias term cancels. Vectorised over components, chunked to bound memory.
    """
    norm = (lambda v: v) if eps is None else (lambda v: layer_norm_pre(v, eps))
    full = (norm(resid) * direction).sum(-1)  # [batch]
    n_comp, batch, d_model = components.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, batch * d_model))
    out = []
    for start in range(0, n_comp, step):
        minus = resid[None] - components[start : start + step]  # [chunk, batch, d_model]
        out.append(full[None] - (norm(minus) * direction[None]).sum(-1))
    return torch.cat(out) if out else components.new_zeros((0, batch))


def _attributions(
    components: torch.Tensor,
    resid: torch.Tensor,
    direction: torch.Tensor,
    scale: torch.Tensor | None,
    eps: float | None,
    treatments: Sequence[str],
) -> dict[str, torch.Tensor]:
    """Every treatment's attributions [n_comp, batch] of components [n_comp, batch, d_model].

    raw: c . d;  cached_scale: (c - mean(c)) . d / s (raw without a scale);  direct_effect: `direct_effects`.
    """
    raw = torch.einsum("nbd,bd->nb", components, direction)
    out: dict[str, torch.Tensor] = {}
    for t in treatments:
        if t == "raw":
            out[t] = raw
        elif t == "cached_scale":
            if scale is None:
                out[t] = raw.clone()
            else:
                centred = components - components.mean(-1, keepdim=True)
                out[t] = torch.einsum("nbd,bd->nb", centred, direction) / scale[None]
        elif t == "direct_effect":
            out[t] = direct_effects(resid, components, direction, eps)
    return out


def _neuron_direct_effects(
    post: torch.Tensor, w_out: torch.Tensor, resid: torch.Tensor, direction: torch.Tensor, eps: float | None
) -> torch.Tensor:
    """`direct_effects` of the neurons c_n = post[:, n] * W_out[n]: [d_mlp, batch], built a chunk at a time."""
    d_mlp, d_model = w_out.shape
    batch = post.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, batch * d_model))
    parts = []
    for start in range(0, d_mlp, step):
        comps = post.T[start : start + step, :, None] * w_out[start : start + step, None, :]  # [chunk, batch, d_model]
        parts.append(direct_effects(resid, comps, direction, eps))
    return torch.cat(parts)


def _neuron_attributions(
    post: torch.Tensor,
    w_out: torch.Tensor,
    resid: torch.Tensor,
    direction: torch.Tensor,
    scale: torch.Tensor | None,
    eps: float | None,
    treatments: Sequence[str],
) -> dict[str, torch.Tensor]:
    """One layer's neuron attributions [d_mlp, batch]; neuron n writes post[:, n] * W_out[n].

    post [batch, d_mlp], w_out [d_mlp, d_model] (float64). The same treatments as `_attributions`, with the
    projection W_out[n] . d shared by every prompt's activation.
    """
    proj = w_out @ direction.T  # [d_mlp, batch]: W_out[n] . d
    out: dict[str, torch.Tensor] = {}
    for t in treatments:
        if t == "raw":
            out[t] = post.T * proj
        elif t == "cached_scale":
            if scale is None:
                out[t] = post.T * proj
            else:
                centred = (w_out - w_out.mean(-1, keepdim=True)) @ direction.T  # [d_mlp, batch]
                out[t] = post.T * centred / scale[None]
        elif t == "direct_effect":
            out[t] = _neuron_direct_effects(post, w_out, resid, direction, eps)
    return out


def bootstrap_nmae(abs_err: torch.Tensor, abs_de: torch.Tensor, *, n_bootstrap: int, seed: int, over: str) -> NMAE:
    """NMAE over (components x prompts) of abs_err, abs_de [n_comp, n_prompts], CI by resampling prompts."""
    n_comp, n_prompts = abs_err.shape
    e_p, d_p = abs_err.sum(0), abs_de.sum(0)  # [prompt]
    kw = dict(over=over, n_components=n_comp, n_prompts=n_prompts, n_bootstrap=n_bootstrap, seed=seed)
    if n_prompts == 0 or float(d_p.sum()) == 0.0:
        return NMAE(value=None, ci_low=None, ci_high=None, **kw)
    value = float(e_p.sum() / d_p.sum() * 100)
    if n_bootstrap <= 0:
        return NMAE(value=value, ci_low=None, ci_high=None, **kw)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n_prompts, (n_bootstrap, n_prompts), generator=gen)  # [boot, prompt]
    num, den = e_p.cpu()[idx].sum(1), d_p.cpu()[idx].sum(1)
    ok = den > 0
    ratios = num[ok] / den[ok] * 100
    if ratios.numel() == 0:
        return NMAE(value=value, ci_low=None, ci_high=None, **kw)
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=ratios.dtype)).tolist()
    return NMAE(value=value, ci_low=lo, ci_high=hi, **kw)


# ----------------------------------------------------------------------------------- collection
@dataclass(frozen=True)
class _Readout:
    """What DLA reads of one model: the hooks cached at end_pos and the weights that turn them into components."""

    bridge: Any
    device: torch.device  # where the model runs
    maths_device: torch.device  # where the float64 maths runs (no float64 on MPS)
    n_layers: int
    has_pos: bool
    eps: float | None  # ln_final's eps; None when ln_final has no scale (LN-free: the identity)
    hook_names: list[str]
    resid_final: str  # the last block's hook_resid_post: x, the final residual stream
    W_U: torch.Tensor  # [d_model, vocab] at the model's dtype: only the target columns are cast to float64
    b_U: torch.Tensor  # [vocab]
    W_O: torch.Tensor  # [layer, head, d_head, d_model] float64
    b_O: torch.Tensor  # [layer, d_model] float64

    def W_out(self, layer: int) -> torch.Tensor:
        """[d_mlp, d_model] float64 (one layer at a time: all of them at once would be L x larger)."""
        return self.bridge.blocks[layer].mlp.W_out.detach().to(self.maths_device, torch.float64)


def _readout(model: LoadedModel, neurons: bool) -> _Readout:
    """The hooks and weights of `model` that DLA reads (with every MLP's hook_post when `neurons`)."""
    bridge = model.bridge
    n_layers = bridge.cfg.n_layers
    hooks = bridge.hook_dict
    has_scale = _SCALE_HOOK in hooks
    has_pos = "hook_pos_embed" in hooks
    last = f"blocks.{n_layers - 1}.hook_resid_post"
    names = ["hook_embed", last] + (["hook_pos_embed"] if has_pos else []) + ([_SCALE_HOOK] if has_scale else [])
    for layer in range(n_layers):
        names += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out"]
        if neurons:
            names.append(f"blocks.{layer}.mlp.hook_post")
    dev, f64 = _maths_device(model.device), torch.float64
    return _Readout(
        bridge=bridge, device=model.device, maths_device=dev, n_layers=n_layers, has_pos=has_pos,
        eps=float(bridge.cfg.eps) if has_scale else None, hook_names=names, resid_final=last,
        W_U=bridge.W_U.detach(), b_U=bridge.b_U.detach(),
        W_O=torch.stack([bridge.blocks[l].attn.W_O.detach() for l in range(n_layers)]).to(dev, f64),
        b_O=torch.stack([bridge.blocks[l].attn.b_O.detach() for l in range(n_layers)]).to(dev, f64),
    )


def _run_at_end(m: _Readout, toks: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits [b, vocab], every hook of m.hook_names [b, ...]) at end [b] of toks [b, pos], in float64."""
    rows = torch.arange(toks.shape[0], device=m.device)
    store: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        def keep(act, hook):
            store[name] = act[rows, end].detach().to(m.maths_device, torch.float64)  # [b, ...] at end_pos
            return act

        return keep

    logits = m.bridge.run_with_hooks(toks, fwd_hooks=[(n, keeper(n)) for n in m.hook_names])
    return logits[rows, end].detach().to(m.maths_device, torch.float64), store


def _target_direction(m: _Readout, pos: torch.Tensor, neg: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d [b, d_model], beta [b]) in float64: d = W_U[:, a] - W_U[:, b], beta = b_U[a] - b_U[b] (no b: 0)."""

    def columns(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # ([b, d_model], [b])
        ids = ids.to(m.W_U.device)
        return m.W_U[:, ids].T.to(m.maths_device, torch.float64), m.b_U[ids].to(m.maths_device, torch.float64)

    w_pos, b_pos = columns(pos)
    w_neg, b_neg = columns(neg) if neg is not None else (0, 0)
    return w_pos - w_neg, b_pos - b_neg


def _target_value(logits_end: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None) -> torch.Tensor:
    """The actual target from the model's logits [b, vocab]: logit(a) - logit(b) (no b: logit(a)), [b]."""
    value = logits_end.gather(1, pos[:, None])[:, 0]
    return value - (logits_end.gather(1, neg[:, None])[:, 0] if neg is not None else 0)


def _components(m: _Readout, store: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    """Every component's write into the final residual stream, in `_Layout.labels` order: [n_comp, b, d_model].

    Head h of layer l writes z[:, h] @ W_O[l, h]; the attention bias b_O and each MLP's output are one each."""
    parts = [store["hook_embed"][None]] + ([store["hook_pos_embed"][None]] if m.has_pos else [])
    for layer in range(m.n_layers):
        z = store[f"blocks.{layer}.attn.hook_z"]  # [b, head, d_head]
        parts.append(torch.einsum("bhe,hed->hbd", z, m.W_O[layer]))  # [head, b, d_model]
        parts.append(m.b_O[layer].expand(1, batch, -1))  # [1, b, d_model]
        parts.append(store[f"blocks.{layer}.hook_mlp_out"][None])  # [1, b, d_model]
    return torch.cat(parts)


def _all_neuron_attributions(
    m: _Readout,
    store: dict[str, torch.Tensor],
    resid: torch.Tensor,
    direction: torch.Tensor,
    scale: torch.Tensor | None,
    treatments: Sequence[str],
) -> dict[str, torch.Tensor]:
    """`_neuron_attributions` of every layer, stacked layer-major on the CPU: [layer * d_mlp, b] per treatment."""
    per_layer: dict[str, list[torch.Tensor]] = {t: [] for t in treatments}
    for layer in range(m.n_layers):
        post = store[f"blocks.{layer}.mlp.hook_post"]  # [b, d_mlp]
        for t, a in _neuron_attributions(post, m.W_out(layer), resid, direction, scale, m.eps, treatments).items():
            per_layer[t].append(a)
    return {t: torch.cat(per_layer[t]).cpu() for t in treatments}


@dataclass
class _Attributions:
    """Attributions of a batch of prompts (or of all of them), per treatment; `prompt` = b or every prompt."""

    target_value: torch.Tensor  # [prompt] from the model's logits
    bias_term: torch.Tensor  # [prompt] beta, the unembedding bias term
    components: dict[str, torch.Tensor]  # treatment -> [n_comp, prompt]
    neurons: dict[str, torch.Tensor] | None  # treatment -> [layer * d_mlp, prompt] (None: neurons not asked for)

    @classmethod
    def cat(cls, parts: Sequence["_Attributions"]) -> "_Attributions":
        """The batches' attributions joined along the prompts."""
        target_value = torch.cat([p.target_value for p in parts])  # no prompts: torch.cat raises
        components, neurons = parts[0].components, parts[0].neurons
        return cls(
            target_value=target_value,
            bias_term=torch.cat([p.bias_term for p in parts]),
            components={t: torch.cat([p.components[t] for p in parts], dim=1) for t in components},
            neurons=None if neurons is None else {t: torch.cat([p.neurons[t] for p in parts], dim=1) for t in neurons},
        )


def _batch_attributions(
    m: _Readout,
    toks: torch.Tensor,
    end: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor | None,
    treatments: Sequence[str],
    neurons: bool,
) -> _Attributions:
    """One forward pass of toks [b, pos] and every treatment's attributions at end [b]."""
    logits_end, store = _run_at_end(m, toks, end)
    direction, bias = _target_direction(m, pos, neg)  # [b, d_model], [b]
    resid = store[m.resid_final]  # [b, d_model]
    scale = store[_SCALE_HOOK][:, 0] if m.eps is not None else None  # [b]
    components = _components(m, store, toks.shape[0])  # [n_comp, b, d_model]
    return _Attributions(
        target_value=_target_value(logits_end, pos, neg),
        bias_term=bias,
        components=_attributions(components, resid, direction, scale, m.eps, treatments),
        neurons=_all_neuron_attributions(m, store, resid, direction, scale, treatments) if neurons else None,
    )


def _collect(
    m: _Readout,
    tokens: torch.Tensor,
    end: torch.Tensor,
    token_ids: tuple[torch.Tensor, torch.Tensor | None],
    treatments: Sequence[str],
    *,
    neurons: bool,
    batch_size: int,
    progress: Progress,
) -> _Attributions:
    """Every prompt's attributions, `batch_size` prompts per forward pass. tokens [batch, pos], end [batch]."""
    pos_ids, neg_ids = token_ids  # [batch], [batch] | None
    n_prompts = tokens.shape[0]
    n_batches = (n_prompts + batch_size - 1) // batch_size
    parts = []
    for bi, start in enumerate(range(0, n_prompts, batch_size)):
        progress.stage("dla: forward", bi / max(n_batches, 1))
        sl = slice(start, start + batch_size)
        pos = pos_ids[sl].to(m.maths_device)
        neg = neg_ids[sl].to(m.maths_device) if neg_ids is not None else None
        toks, end_b = tokens[sl].to(m.device), end[sl].to(m.device)
        parts.append(_batch_attributions(m, toks, end_b, pos, neg, treatments, neurons))
    progress.stage("dla: forward", 1.0)
    return _Attributions.cat(parts)


# ------------------------------------------------------------------------------------ components
@dataclass(frozen=True)
class _Layout:
    """The components' order (`labels`) and where heads, attention biases and MLPs sit in it."""

    n_layers: int
    n_heads: int
    d_mlp: int
    has_pos: bool
    labels: list[str]
    heads: list[int]  # [layer * head], layer-major
    attn_bias: list[int]  # [layer]
    mlp: list[int]  # [layer]

    @classmethod
    def of(cls, n_layers: int, n_heads: int, d_mlp: int, has_pos: bool) -> "_Layout":
        labels = _labels(n_layers, n_heads, has_pos)
        return cls(
            n_layers=n_layers, n_heads=n_heads, d_mlp=d_mlp, has_pos=has_pos, labels=labels,
            heads=[i for i, lab in enumerate(labels) if "H" in lab and lab.startswith("L")],
            attn_bias=[labels.index(f"L{l}b_O") for l in range(n_layers)],
            mlp=[labels.index(f"L{l}MLP") for l in range(n_layers)],
        )

    def head_grid(self, a: torch.Tensor) -> torch.Tensor:
        """The heads of a [n_comp, prompt] as [layer, head, prompt]."""
        return a[self.heads].reshape(self.n_layers, self.n_heads, a.shape[1])


def _labels(n_layers: int, n_heads: int, has_pos: bool) -> list[str]:
    labels = ["embed"] + (["pos_embed"] if has_pos else [])
    for layer in range(n_layers):
        labels += [f"L{layer}H{h}" for h in range(n_heads)] + [f"L{layer}b_O", f"L{layer}MLP"]
    return labels


def _top_neurons(neuron_attr: torch.Tensor, k: int, d_mlp: int) -> list[TopNeuron]:
    """The k neurons of largest |mean attribution|; neuron_attr [layer * d_mlp, prompt], layer-major."""
    mean = neuron_attr.mean(1)  # [layer * d_mlp]
    top = []
    for i in mean.abs().topk(min(k, mean.numel())).indices.tolist():
        layer, neuron = divmod(i, d_mlp)
        top.append(TopNeuron(layer=layer, neuron=neuron, label=f"L{layer}N{neuron}",
                             attribution=float(mean[i]), per_prompt=neuron_attr[i].tolist()))
    return top


def _treatment_tables(treatment: str, attrs: _Attributions, layout: _Layout, top_k_neurons: int) -> TreatmentDLA:
    """One treatment's tables: per component, per head, per layer, top neurons, and sum_c DLA_c + beta - target."""
    a = attrs.components[treatment]  # [n_comp, prompt]
    mean = a.mean(1)  # [n_comp]
    heads = layout.head_grid(a)  # [layer, head, prompt]
    attn_bias = a[layout.attn_bias]  # [layer, prompt]
    total = a.sum(0) + attrs.bias_term  # [prompt]
    gap = total - attrs.target_value  # [prompt]
    top = _top_neurons(attrs.neurons[treatment], top_k_neurons, layout.d_mlp) if top_k_neurons > 0 else []
    return TreatmentDLA(
        treatment=treatment,
        mean=mean.tolist(),
        per_prompt=a.T.tolist(),
        heads=heads.mean(-1).tolist(),
        heads_per_prompt=heads.permute(2, 0, 1).tolist(),
        attn_layer_totals=(heads.sum(1) + attn_bias).mean(-1).tolist(),
        mlp_layer_totals=a[layout.mlp].mean(1).tolist(),
        attn_bias=attn_bias.mean(1).tolist(),
        embed=float(mean[0]),
        pos_embed=float(mean[1]) if layout.has_pos else None,
        top_neurons=top,
        bias_term=attrs.bias_term.tolist(),
        component_sum=total.tolist(),
        dla_sum_gap=gap.tolist(),
        max_abs_sum_gap=float(gap.abs().max()) if a.shape[1] else 0.0,
    )


# ---------------------------------------------------------------------------------------- errors
def _treatment_errors(
    treatment: str, a: torch.Tensor, de: torch.Tensor, layout: _Layout, *, n_bootstrap: int, seed: int
) -> DLAErrors:
    """|DLA - DE| of a, de [n_comp, prompt]: per component (mean over prompts), per head, and as NMAE."""
    err, abs_de = (a - de).abs(), de.abs()  # [n_comp, prompt]
    mean_err, mean_de = err.mean(1), abs_de.mean(1)  # [n_comp]
    return DLAErrors(
        treatment=treatment,
        components=[
            ComponentError(label=label, mean_abs_error=float(mean_err[i]), mean_abs_de=float(mean_de[i]),
                           rel_error=float(mean_err[i] / mean_de[i]) if float(mean_de[i]) > 0 else None)
            for i, label in enumerate(layout.labels)
        ],
        heads_abs_error=mean_err[layout.heads].reshape(layout.n_layers, layout.n_heads).tolist(),
        nmae=bootstrap_nmae(err, abs_de, n_bootstrap=n_bootstrap, seed=seed, over="components"),
        nmae_heads=bootstrap_nmae(err[layout.heads], abs_de[layout.heads], n_bootstrap=n_bootstrap, seed=seed,
                                  over="heads"),
    )


def _errors(attrs: dict[str, torch.Tensor], layout: _Layout, *, n_bootstrap: int, seed: int) -> dict[str, DLAErrors]:
    """Every other treatment against direct_effect, the ground truth (none when it was not computed)."""
    if "direct_effect" not in attrs:
        return {}
    de = attrs["direct_effect"]  # [n_comp, prompt]
    return {t: _treatment_errors(t, a, de, layout, n_bootstrap=n_bootstrap, seed=seed)
            for t, a in attrs.items() if t != "direct_effect"}


def _treatments_spread(attrs: dict[str, torch.Tensor]) -> float | None:
    """max over (component, prompt) of max_t DLA_t - min_t DLA_t (None with one treatment)."""
    if len(attrs) < 2:
        return None
    stacked = torch.stack(list(attrs.values()))  # [treatment, n_comp, prompt]
    return float((stacked.max(0).values - stacked.min(0).values).abs().max()) if stacked.numel() else 0.0


# ------------------------------------------------------------------------------------------ dla
@torch.no_grad()
def dla(
    model: LoadedModel,
    tokens: torch.Tensor,
    *,
    target: DLATarget,
    end_pos: int | Sequence[int] | torch.Tensor | None = None,
    treatments: Sequence[str] = TREATMENTS,
    top_k_neurons: int = 20,
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> DLAModelResult:
    """Direct logit attribution of `target` at `end_pos` (default: the last real position) per prompt.

    tokens [batch, pos]. Returns every requested treatment, and when `direct_effect` is among them,
    the error of each other treatment against it (per component, and NMAE with a bootstrap CI).
    Phases: collect (a forward pass per batch, attributions at end_pos), tables per treatment, errors vs DE.
    """
    progress = ensure(progress)
    treatments = _check_treatments(treatments)
    tokens = _as_batch(tokens)  # [batch, pos]
    end = _resolve_end_pos(end_pos, target, tokens, model.tokenizer)  # [batch]
    token_ids = target.token_pairs(tokens.shape[0])  # [batch], [batch] | None
    cfg = model.bridge.cfg
    readout = _readout(model, neurons=top_k_neurons > 0)
    layout = _Layout.of(cfg.n_layers, cfg.n_heads, cfg.d_mlp, readout.has_pos)

    attrs = _collect(readout, tokens, end, token_ids, treatments, neurons=top_k_neurons > 0,
                     batch_size=batch_size, progress=progress)
    tables = {t: _treatment_tables(t, attrs, layout, top_k_neurons) for t in treatments}
    progress.stage("dla: errors", 0.0)
    errors = _errors(attrs.components, layout, n_bootstrap=n_bootstrap, seed=seed)
    spread = _treatments_spread(attrs.components)
    progress.stage("dla: errors", 1.0)

    return DLAModelResult(
        role=model.role,
        has_ln=readout.eps is not None,
        final_scale="cached" if readout.eps is not None else "none",
        target=target,
        n_prompts=tokens.shape[0],
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        end_pos=end.tolist(),
        labels=layout.labels,
        target_value=attrs.target_value.tolist(),
        treatments=tables,
        errors=errors,
        treatments_max_abs_diff=spread,
    )


def head_differences(per_role: Mapping[str, Any], attr: str = "heads") -> dict[str, dict[str, list[list[float]]]]:
    """'ln_free - original' and 'control - original' of a per-treatment [layer][head] field."""
    out: dict[str, dict[str, list[list[float]]]] = {}
    base = per_role.get("original")
    if base is None:
        return out
    for role in ("ln_free", "control"):
        other = per_role.get(role)
        if other is None:
            continue
        diffs = {}
        for t, res in other.treatments.items():
            if t in base.treatments:
                a = torch.tensor(getattr(res, attr), dtype=torch.float64)
                b = torch.tensor(getattr(base.treatments[t], attr), dtype=torch.float64)
                if a.shape == b.shape:
                    diffs[t] = (a - b).tolist()
        out[f"{role} - original"] = diffs
    return out
