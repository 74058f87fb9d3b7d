"""Attribution patching (AtP) and AtP* (QK fix), denoising convention, from one clean forward and
one corrupt forward + backward.

AtP (Nanda; Kramár et al. 2024): for a node n with activation a_n,
    atp(n) = sum_{elements of n} grad_corrupt(metric)[a_n] * (a_n,clean - a_n,corrupt),
the gradient taken on the CORRUPT run; per prompt, then averaged over prompts. The metric is a
per-prompt scalar; prompts do not interact, so the gradient of sum_b metric_b gives every prompt's own
gradient. For heads, d metric / d z_h . dz_h equals d metric / d(z_h W_O[h]) . d(z_h W_O[h]) (the
head's output is linear in z), so heads are scored at attn.hook_z.

AtP* QK fix (Kramár et al. 2024, sec. 3.1.1). Patching a query or key changes the attention logits
and a linear estimate through the softmax fails when it saturates. Instead, per layer and head, with
A = softmax(mask(q k^T * scale)) the corrupt pattern and g_A = d metric / d A on the corrupt run
(g_A[t, s] = g_z[t] . v[s], as z_t = sum_s A[t, s] v_s), we recompute the pattern exactly and
linearise only downstream of it:
    head_q     : sum_{t,s} g_A[t,s] (softmax(q_clean k^T)[t,s]      - A[t,s])       (all queries clean)
    head_q_pos : the same restricted to row t (only q_t clean; rows are independent)
    head_k     : sum_{t,s} g_A[t,s] (softmax(q k_clean^T)[t,s]      - A[t,s])       (all keys clean)
    head_k_pos : key s clean only: every row t >= s recomputed with logit column s = q_t . k_clean,s
    head       : head_q + head_k + sum grad_v . (v_clean - v_corrupt): the sum of the head's Q, K and V node
                 estimates, each patched alone (the paper's per-node decomposition; V enters z = A v linearly,
                 so plain AtP on v is already exact through the head). Patching z at every position is the
                 same intervention as patching the head's q, k and v together; q-k-v interactions are dropped.
                 Plain AtP on z uses the exact clean z (no softmax between z and the linearisation), so this
                 is a different decomposition of the head's effect rather than a strict improvement of it.
AtP* is not defined for head_pos (z at one position is not a function of that position's q, k, v). Not
implemented: the upstream part of the paper's QK fix (effects of resid / MLP / earlier-head nodes through
later heads' softmax) and GradDrop; for those node types AtP* is AtP and `atp_star` has no entry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from lnscope.analysis.patching.nodes import (
    NODE_TYPES,
    QK_FIX_NODES,
    MetricFn,
    check_tokens,
    evaluate_metric,
    layer_hook_names,
    resolve_nodes,
    run_and_cache,
)
from lnscope.analysis.patching.results import AtPResult, MetricSummary, NodeMap
from lnscope.analysis.progress import Progress, ensure

logger = logging.getLogger(__name__)

# float64 scratch elements a chunk of the per-key recomputation may use (~128 MiB).
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class AtPTensors:
    """Per-prompt estimates in raw metric units: [batch, n_layers, *grid] float64 per node type."""

    node_types: list[str]
    per_prompt: dict[str, torch.Tensor]
    star_per_prompt: dict[str, torch.Tensor] = field(default_factory=dict)
    clean_metric: torch.Tensor | None = None  # [batch]
    corrupt_metric: torch.Tensor | None = None  # [batch]


def bridge_of(model: Any):
    return getattr(model, "bridge", model)


def role_of(model: Any) -> str:
    return str(getattr(model, "role", "model"))


def device_of(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if dev is not None:
        return torch.device(dev)
    return next(bridge_of(model).parameters()).device


def forward_backward(
    bridge, tokens: torch.Tensor, names: Sequence[str], metric_fn: MetricFn, cache_only: Sequence[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Corrupt run: activations and d(sum_b metric_b)/d(activation) at `names`; also caches `cache_only`.

    Gradients are read through zero-valued probes added at each hook (a + p, p = 0), so the gradient is
    exactly the one flowing into the hooked activation. Returns (activations, gradients, metric [batch]).
    """
    acts: dict[str, torch.Tensor] = {}
    probes: dict[str, torch.Tensor] = {}

    def probe(name: str):
        def hook(tensor: torch.Tensor, hook: Any = None) -> torch.Tensor:
            acts[name] = tensor.detach()
            p = torch.zeros_like(tensor, requires_grad=True)
            probes[name] = p
            return tensor + p

        return hook

    def keep(name: str):
        def hook(tensor: torch.Tensor, hook: Any = None) -> None:
            acts[name] = tensor.detach()

        return hook

    hooks = [(n, probe(n)) for n in names] + [(n, keep(n)) for n in cache_only if n not in names]
    with torch.enable_grad():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=hooks)
        metric = evaluate_metric(metric_fn, logits, tokens.shape[0])
        missing = [n for n in names if n not in probes]
        if missing:
            raise RuntimeError(f"hooks did not fire: {missing}")
        grads = torch.autograd.grad(metric.sum(), [probes[n] for n in names], allow_unused=True)
    out: dict[str, torch.Tensor] = {}
    for n, g in zip(names, grads):
        if g is None:
            raise RuntimeError(f"the metric does not depend on {n} through the hook (no gradient path)")
        out[n] = g.detach()
    return acts, out, metric.detach()


def attention_scale(cfg, layer: int) -> float:
    """The factor q . k is multiplied by in the attention logits (HookedTransformer conventions)."""
    scale = 1.0
    if getattr(cfg, "use_attn_scale", True):
        attn_scale = float(getattr(cfg, "attn_scale", -1.0) or -1.0)
        scale = 1.0 / (attn_scale if attn_scale > 0 else float(cfg.d_head) ** 0.5)
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        scale /= layer + 1
    return scale


def causal_pattern(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax over keys of causally masked q . k * scale: q, k [batch, pos, head, d_head] -> [batch, head, t, s]."""
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    n = scores.shape[-1]
    mask = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1)


def _pattern_tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-8, torch.float32: 1e-3}.get(dtype, 5e-2)


def qk_fix_layer(
    q: torch.Tensor, k: torch.Tensor, q_clean: torch.Tensor, k_clean: torch.Tensor,
    v: torch.Tensor, grad_z: torch.Tensor, pattern: torch.Tensor, scale: float, per_key: bool,
) -> dict[str, torch.Tensor]:
    """AtP* query/key estimates of one layer (float64); all inputs [batch, pos, head, d_head] except
    pattern [batch, head, t, s] (the cached corrupt pattern, used to check the recomputation).

    Returns head_q [batch, head], head_q_pos [batch, pos, head], head_k [batch, head] and, when
    `per_key`, head_k_pos [batch, pos, head].
    """
    f64 = torch.float64
    q, k, q_clean, k_clean, v, grad_z = (x.to(f64) for x in (q, k, q_clean, k_clean, v, grad_z))
    A = causal_pattern(q, k, scale)  # [b, h, t, s]
    err = float((A - pattern.to(f64)).abs().max())
    if err > _pattern_tolerance(pattern.dtype):
        raise RuntimeError(
            f"AtP* QK fix: softmax(mask(q k^T * {scale:.4g})) differs from the model's attention pattern "
            f"by {err:.3g}; this attention variant is not supported (use qk_fix=False)"
        )
    g_A = torch.einsum("bthd,bshd->bhts", grad_z, v)  # d metric / d A
    q_rows = (g_A * (causal_pattern(q_clean, k, scale) - A)).sum(-1)  # [b, h, t]
    out = {
        "head_q_pos": q_rows.transpose(1, 2),
        "head_q": q_rows.sum(-1),
        "head_k": (g_A * (causal_pattern(q, k_clean, scale) - A)).sum((-1, -2)),
    }
    if per_key:
        b, h, n, _ = A.shape
        scores = torch.einsum("bthd,bshd->bhts", q, k) * scale  # [b, h, t, s]
        new_col = torch.einsum("bthd,bshd->bhts", q, k_clean) * scale  # logit (t, s) with key s clean
        mask = torch.ones(n, n, dtype=torch.bool, device=A.device).triu(1)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * n * n))
        per_key_eff = []
        for start in range(0, n, chunk):
            keys = torch.arange(start, min(n, start + chunk), device=A.device)  # [c]
            c = keys.numel()
            mod = scores[:, :, None].expand(b, h, c, n, n).clone()  # [b, h, c, t, s]
            sel = torch.nn.functional.one_hot(keys, n).bool()[None, None, :, None, :]  # [1,1,c,1,s]
            mod = torch.where(sel, new_col[:, :, None], mod)
            new = mod.masked_fill(mask, float("-inf")).softmax(-1)
            per_key_eff.append((g_A[:, :, None] * (new - A[:, :, None])).sum((-1, -2)))  # [b, h, c]
        out["head_k_pos"] = torch.cat(per_key_eff, -1).transpose(1, 2)
    return out


def atp_tensors(
    model: Any,
    clean_tokens: torch.Tensor,
    corrupt_tokens: torch.Tensor,
    metric_fn: MetricFn,
    nodes: Iterable[str] | None = None,
    *,
    qk_fix: bool = True,
    progress: Progress | None = None,
) -> AtPTensors:
    """AtP (and AtP*) per prompt and node, in raw metric units; see the module docstring."""
    progress = ensure(progress)
    bridge = bridge_of(model)
    node_types = resolve_nodes(nodes)
    clean, corrupt = check_tokens(clean_tokens, corrupt_tokens, device_of(model))
    n_prompts = clean.shape[0]
    n_layers = int(bridge.cfg.n_layers)
    specs = [NODE_TYPES[n] for n in node_types]
    star_types = [n for n in node_types if n in QK_FIX_NODES] if qk_fix else []
    names = layer_hook_names(specs, n_layers)
    qkv = ["head_q", "head_k", "head_v", "head"]
    if star_types:
        names = list(dict.fromkeys(names + layer_hook_names([NODE_TYPES[n] for n in qkv], n_layers)))
    patterns = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)] if star_types else []

    progress.stage("attribution patching: clean forward", 0.0)
    clean_logits, clean_cache = run_and_cache(bridge, clean, names)
    clean_metric = evaluate_metric(metric_fn, clean_logits, n_prompts).detach().to(torch.float64)
    del clean_logits
    progress.stage("attribution patching: corrupt forward + backward", 0.3)
    acts, grads, corrupt_metric = forward_backward(bridge, corrupt, names, metric_fn, cache_only=patterns)
    progress.stage("attribution patching: contractions", 0.7)

    # elementwise grad * (clean - corrupt) once per hook, reduced per node type.
    per_layer: dict[str, list[torch.Tensor]] = {n: [] for n in node_types}
    star_layer: dict[str, list[torch.Tensor]] = {n: [] for n in star_types}
    for layer in range(n_layers):
        contrib: dict[str, torch.Tensor] = {}
        for name in dict.fromkeys(s.hook_name(layer) for s in specs):
            contrib[name] = grads[name].to(torch.float64) * (
                clean_cache[name].to(torch.float64) - acts[name].to(torch.float64))
        for spec in specs:
            c = contrib[spec.hook_name(layer)]
            dims = spec.reduce_dims()
            per_layer[spec.name].append(c.sum(dim=dims) if dims else c)  # [batch, *grid]
        if star_types:
            h = {t: NODE_TYPES[t].hook_name(layer) for t in qkv}
            if acts[h["head_k"]].shape[2] != acts[h["head_q"]].shape[2]:
                raise NotImplementedError("AtP* QK fix needs one key/value head per query head (no GQA/MQA)")
            fixed = qk_fix_layer(
                acts[h["head_q"]], acts[h["head_k"]], clean_cache[h["head_q"]], clean_cache[h["head_k"]],
                acts[h["head_v"]], grads[h["head"]], acts[patterns[layer]],
                attention_scale(bridge.cfg, layer), per_key="head_k_pos" in star_types,
            )
            if "head" in star_types:
                v_path = (grads[h["head_v"]].to(torch.float64)
                          * (clean_cache[h["head_v"]].to(torch.float64) - acts[h["head_v"]].to(torch.float64))
                          ).sum(dim=(1, 3))  # [batch, head]
                fixed["head"] = fixed["head_q"] + fixed["head_k"] + v_path
            for t in star_types:
                star_layer[t].append(fixed[t])
        progress.stage("attribution patching: contractions", 0.7 + 0.3 * (layer + 1) / n_layers)

    return AtPTensors(
        node_types=node_types,
        per_prompt={n: torch.stack(v, 1) for n, v in per_layer.items()},
        star_per_prompt={n: torch.stack(v, 1) for n, v in star_layer.items()},
        clean_metric=clean_metric,
        corrupt_metric=corrupt_metric.to(torch.float64),
    )


def atp_result(model: Any, t: AtPTensors, *, qk_fix: bool, normalize: bool) -> AtPResult:
    """Batch means of the per-prompt estimates as typed maps (optionally divided by clean - corrupt)."""
    summary, factor = MetricSummary.build(t.clean_metric, t.corrupt_metric, normalize)
    any_map = next(iter(t.per_prompt.values()))

    def maps(d: dict[str, torch.Tensor]) -> dict[str, NodeMap]:
        return {n: NodeMap.from_tensor(n, ["layer", *NODE_TYPES[n].axes], v.mean(0) * factor) for n, v in d.items()}

    n_pos = int(_n_pos(t))
    return AtPResult(
        role=role_of(model), node_types=t.node_types, n_prompts=int(any_map.shape[0]), n_pos=n_pos,
        qk_fix=qk_fix, metric=summary, atp=maps(t.per_prompt), atp_star=maps(t.star_per_prompt),
    )


def _n_pos(t: AtPTensors) -> int:
    for n, v in t.per_prompt.items():
        if "pos" in NODE_TYPES[n].axes:
            return v.shape[2]
    return -1


def attribution_patching(
    model: Any,
    clean_tokens: torch.Tensor,
    corrupt_tokens: torch.Tensor,
    metric_fn: MetricFn | Any,
    nodes: Iterable[str] | None = None,
    *,
    qk_fix: bool = True,
    normalize: bool = False,
    progress: Progress | None = None,
) -> AtPResult:
    """AtP and AtP* at every node of `nodes` (default DEFAULT_NODES) for one model.

    clean_tokens, corrupt_tokens [batch, pos]; metric_fn(logits [batch, pos, vocab]) -> [batch]
    (or a task batch with `.metric`). Estimates are batch means, in metric units, or divided by
    mean(clean metric) - mean(corrupt metric) when `normalize`.
    """
    from lnscope.analysis.patching.nodes import metric_from

    t = atp_tensors(model, clean_tokens, corrupt_tokens, metric_from(metric_fn), nodes, qk_fix=qk_fix,
                    progress=progress)
    result = atp_result(model, t, qk_fix=qk_fix, normalize=normalize)
    ensure(progress).stage("attribution patching: done", 1.0)
    return result
