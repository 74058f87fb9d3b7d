"""Activation patching ground truth (denoising), batched: many patched nodes per forward pass.

effect(n) = mean_b [ metric_b(corrupt run with node n := its clean activation) - metric_b(corrupt run) ].

The corrupt batch [batch, pos] is tiled k times along the batch dimension (rows j*batch + b = prompt b,
copy j); copy j has node n_j patched (all its elements set to the clean activation of the same prompt)
by a hook at n_j's layer, so one forward pass measures k nodes. Nodes of different types and layers mix
freely in a chunk. Numerically this is the per-node loop of TransformerLens's patching.get_act_patch_*
(one forward per node) with k forwards fused; `chunk_size` = k bounds memory: a pass holds
k * batch rows of activations and logits (k * batch * pos * vocab floats for the logits alone).

Four shortcuts leave the result as it is:
- Unchanged nodes. A node whose clean activation equals its corrupt activation (bit for bit, in every
  prompt) leaves the corrupt run as it is: its effect is exactly 0 and it is not run.
- Later layers only. Nothing before a node's layer L changes when it is patched, so a chunk whose
  lowest layer is L starts from the corrupt run's cached resid_pre at L and runs blocks L.., ln_final
  and the unembedding.
- Later positions only. A patch changes nothing before the first position p where the node's clean
  and corrupt activations differ (its own position, for a position-specific node), and causal attention
  carries nothing backwards, so a chunk whose lowest such p is p0 runs only positions p0.., attending to
  the corrupt run's cached keys and values at positions < p0 in every layer; the logits before p0 are
  the corrupt run's.
- Read positions only. ln_final and the unembedding run only at the positions the metric reads (found
  from its gradient, confirmed by perturbing the others); it is handed the corrupt run's logits at the
  positions it never reads.
The layer and position shortcuts are checked once per model to reproduce the full forward to float
rounding (a few ulps of the largest logit); the tests hold every shortcut to TransformerLens's sweeps
and to full forwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from analysis.patching.atp import bridge_of, device_of, role_of
from analysis.patching.nodes import (
    LAYOUTS,
    NODE_TYPES,
    MetricFn,
    NodeSpec,
    check_tokens,
    evaluate_metric,
    layer_hook_names,
    metric_from,
    numel,
    resolve_nodes,
    run_and_cache,
)
from analysis.patching.results import ActPatchResult, MetricSummary, NodeMap
from analysis.progress import Progress, ensure

logger = logging.getLogger(__name__)

# Largest |suffix forward - full forward| accepted, in units of eps(dtype) * max(1, max |logit|).
_SUFFIX_TOLERANCE_EPS = 256


@dataclass
class ActPatchTensors:
    """Per-prompt effects in raw metric units: [batch, n_layers, *grid] float64 per node type."""

    node_types: list[str]
    per_prompt: dict[str, torch.Tensor]
    clean_metric: torch.Tensor  # [batch]
    corrupt_metric: torch.Tensor  # [batch]
    n_forward_passes: int
    chunk_size: int
    n_unchanged_nodes: int = 0


class _KVRecorder:
    """Stands in for a Hugging Face Cache in one forward pass: keeps each layer's keys and values.

    The bridge's attention calls `update(k, v, layer)` with k, v [rows, heads, pos, d_head]."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v


class _PrefixKV:
    """Stands in for a Hugging Face Cache: prepends the corrupt run's keys and values at positions < p0.

    keys[layer], values[layer]: [batch, heads, p0, d_head], tiled over the k copies of a chunk."""

    def __init__(self, rec: _KVRecorder, p0: int, copies: int) -> None:
        self.keys = {layer: k[:, :, :p0].repeat(copies, 1, 1, 1) for layer, k in rec.keys.items()}
        self.values = {layer: v[:, :, :p0].repeat(copies, 1, 1, 1) for layer, v in rec.values.items()}

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        return torch.cat([self.keys[layer_idx], k], dim=-2), torch.cat([self.values[layer_idx], v], dim=-2)


def _patch_hook(mask: torch.Tensor, clean_act: torch.Tensor, k: int):
    """Replace, in copy j, the elements where mask[j] is set by the clean activation.

    mask [k, *broadcast shape of one prompt's activation] bool; clean_act [batch, *act]."""

    def hook(tensor: torch.Tensor, hook: Any = None) -> torch.Tensor:
        rows = tensor.shape[0]
        act = tensor.reshape(k, rows // k, *tensor.shape[1:])  # [k, batch, *act]
        patched = torch.where(mask[:, None], clean_act[None].to(tensor.dtype), act)
        return patched.reshape(tensor.shape)

    return hook


def _forward_from(bridge, layer: int, resid: torch.Tensor, prefix: _PrefixKV | _KVRecorder | None = None,
                  read: torch.Tensor | None = None) -> torch.Tensor:
    """logits [rows, pos', vocab] of blocks[layer:], ln_final and the unembedding on resid [rows, pos', d_model].

    With `prefix`, the positions of resid come after the prefix's cached ones in every layer. With `read`
    (indices into pos'), only those positions go through ln_final and the unembedding: [rows, len(read), vocab]."""
    kwargs = {} if prefix is None else {"past_key_values": prefix}
    for block in bridge.blocks[layer:]:
        resid = block(resid, **kwargs)
        resid = resid[0] if isinstance(resid, tuple) else resid
    if read is not None:
        resid = resid[:, read]
    return bridge.unembed(bridge.ln_final(resid))


def _metric_positions(metric_fn: MetricFn, logits: torch.Tensor, n_prompts: int) -> torch.Tensor | None:
    """The positions whose logits the metric reads, or None (all of them, or unknown).

    Found where the metric's gradient w.r.t. the corrupt run's logits is non-zero (in any prompt), then
    confirmed: noise at every other position must leave the metric bit-for-bit unchanged. A metric that
    cannot be differentiated, or that reads everything, gets None."""
    probe = logits.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(evaluate_metric(metric_fn, probe, n_prompts).sum(), probe, allow_unused=True)
    except (RuntimeError, TypeError):
        return None
    if grad is None:
        return None
    read = grad.abs().amax(dim=(0, 2)) > 0  # [pos]
    if read.all() or not read.any():
        return None
    gen = torch.Generator(device=logits.device).manual_seed(0)
    noisy = logits.detach().clone()
    noisy[:, ~read] = 10 * torch.randn(noisy[:, ~read].shape, generator=gen, device=logits.device, dtype=logits.dtype)
    with torch.no_grad():
        same = torch.equal(evaluate_metric(metric_fn, noisy, n_prompts), evaluate_metric(metric_fn, logits, n_prompts))
    return read.nonzero()[:, 0] if same else None


def _matches(logits: torch.Tensor, reference: torch.Tensor) -> bool:
    """Equal to float rounding: max |diff| <= n * eps(dtype) * max(1, max |reference|), n = _SUFFIX_TOLERANCE_EPS
    in float32/64 and 4 in 16-bit dtypes (whose eps is already coarse)."""
    if logits.shape != reference.shape:
        return False
    n_eps = _SUFFIX_TOLERANCE_EPS if reference.dtype in (torch.float32, torch.float64) else 4
    scale = max(1.0, float(reference.abs().max()))
    return bool((logits - reference).abs().max() <= n_eps * torch.finfo(reference.dtype).eps * scale)


def _shortcuts(bridge, corrupt_resid: dict[str, torch.Tensor], corrupt_logits: torch.Tensor,
               n_layers: int) -> tuple[bool, _KVRecorder | None]:
    """(may chunks start at a later layer, the corrupt run's keys/values if they may start at a later position).

    Once per model: blocks run one by one on the cached resid_pre 0 (layers), and a run from the middle
    position on with the recorded keys and values before it (positions), must both give the full
    forward's logits to float rounding."""
    layers_ok = getattr(bridge, "_lnscope_suffix_exact", None)
    positions_ok = getattr(bridge, "_lnscope_prefix_kv_ok", None)
    if layers_ok is False or (layers_ok and positions_ok is False):  # verdicts known, no keys/values needed
        return bool(layers_ok), None
    resid0 = corrupt_resid["blocks.0.hook_resid_pre"]
    rec = _KVRecorder()
    try:
        with torch.no_grad():
            blockwise = _forward_from(bridge, 0, resid0, rec)
    except Exception as exc:  # an architecture whose blocks cannot be run one by one
        logger.info("blocks cannot run one by one (%s): patching runs full forwards", exc)
        bridge._lnscope_suffix_exact = False
        return False, None
    if layers_ok is None:
        layers_ok = _matches(blockwise, corrupt_logits)
        bridge._lnscope_suffix_exact = layers_ok
        if not layers_ok:
            logger.info("block-by-block forward differs from the full forward: patching runs full forwards")
    if not layers_ok or len(rec.keys) != n_layers:
        return layers_ok, None
    if positions_ok is None:
        p0 = corrupt_logits.shape[1] // 2
        positions_ok = False
        if p0 > 0:
            try:
                with torch.no_grad():
                    suffix = _forward_from(bridge, 0, resid0[:, p0:], _PrefixKV(rec, p0, 1))
                positions_ok = _matches(suffix, corrupt_logits[:, p0:])
            except Exception as exc:
                logger.info("cached keys/values not accepted (%s)", exc)
            if not positions_ok:
                logger.info("a run from a later position differs from the full forward: every position is run")
            bridge._lnscope_prefix_kv_ok = positions_ok
    return layers_ok, rec if positions_ok else None


def _changed_grid(spec: NodeSpec, clean: torch.Tensor, corrupt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(changed, start), both [*grid]: does patching the node change anything (clean != corrupt anywhere in
    its elements, in any prompt), and the first position where it does (the patch is a no-op before it)."""
    layout = LAYOUTS[spec.layout]  # every layout starts with pos
    differs = (clean != corrupt).any(dim=0)  # [*layout]
    reduce = tuple(i for i, d in enumerate(layout) if d != "pos" and d not in spec.axes)
    if reduce:
        differs = differs.any(dim=reduce)  # [pos, *grid axes other than pos, in layout order]
    kept = [d for d in layout if d == "pos" or d in spec.axes]
    if "pos" in spec.axes:  # one position per node
        changed = differs.permute(*[kept.index(a) for a in spec.axes])
        start = torch.arange(differs.shape[0], device=differs.device).reshape(-1, *[1] * (differs.ndim - 1))
        return changed, start.expand(differs.shape).permute(*[kept.index(a) for a in spec.axes])
    changed = differs.any(dim=0)  # [*grid axes in layout order]
    start = differs.int().argmax(dim=0)  # first changed position (argmax returns the first maximum)
    order = [kept.index(a) - 1 for a in spec.axes]
    return changed.permute(*order), start.permute(*order)


def _chunk_cost(chunk: torch.Tensor, n_layers: int, n_pos: int) -> float:
    """Relative compute of one chunk [k, (layer, pos)]: rows x later layers x later positions."""
    return chunk.shape[0] * (n_layers - int(chunk[:, 0].min())) * (n_pos - int(chunk[:, 1].min()))


def _plan_order(layer_pos: torch.Tensor, chunk_size: int, n_layers: int, n_pos: int) -> torch.Tensor:
    """The node order whose chunks cost least to run: bands of t layers, position-major inside a band.

    t = 1 is layer-major, t = n_layers position-major; each t in between is tried too."""
    layer, pos = layer_pos[:, 0], layer_pos[:, 1]
    best, best_cost = torch.zeros(0, dtype=torch.long), None
    for t in sorted({1, 2, 3, 4, 6, n_layers}):
        if t > n_layers:
            continue
        order = torch.argsort(((layer // t) * n_pos + pos) * n_layers + layer, stable=True)
        cost = sum(_chunk_cost(layer_pos[order[s:s + chunk_size]], n_layers, n_pos)
                   for s in range(0, order.numel(), chunk_size))
        if best_cost is None or cost < best_cost:
            best, best_cost = order, cost
    return best


def default_chunk_size(device: torch.device | str) -> int:
    """Nodes per forward pass: 32 on accelerators (wide batches keep them busy); 8 on CPU, where compute
    grows with the rows anyway and smaller chunks start at later layers and positions (bench/analyses.py)."""
    return 8 if torch.device(device).type == "cpu" else 32


def act_patch_tensors(
    model: Any,
    clean_tokens: torch.Tensor,
    corrupt_tokens: torch.Tensor,
    metric_fn: MetricFn,
    nodes: Iterable[str] | None = None,
    *,
    chunk_size: int | None = None,
    progress: Progress | None = None,
) -> ActPatchTensors:
    """Every node's patched metric per prompt, `chunk_size` nodes per forward pass (default_chunk_size)."""
    progress = ensure(progress)
    chunk_size = default_chunk_size(device_of(model)) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    bridge = bridge_of(model)
    node_types = resolve_nodes(nodes)
    clean, corrupt = check_tokens(clean_tokens, corrupt_tokens, device_of(model))
    n_prompts, n_pos, n_layers = clean.shape[0], clean.shape[1], int(bridge.cfg.n_layers)
    specs = [NODE_TYPES[n] for n in node_types]
    names = layer_hook_names(specs, n_layers)

    progress.stage("activation patching: clean and corrupt runs", 0.0)
    clean_logits, clean_cache = run_and_cache(bridge, clean, names)
    clean_metric = evaluate_metric(metric_fn, clean_logits, n_prompts).to(torch.float64)
    del clean_logits
    resid_names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    corrupt_logits, corrupt_cache = run_and_cache(bridge, corrupt, list(dict.fromkeys(resid_names + names)))
    corrupt_metric = evaluate_metric(metric_fn, corrupt_logits, n_prompts).to(torch.float64)
    skip_layers, kv = _shortcuts(bridge, corrupt_cache, corrupt_logits, n_layers)
    read_pos = _metric_positions(metric_fn, corrupt_logits, n_prompts) if skip_layers else None

    act_shape = {s.name: tuple(clean_cache[s.hook_name(0)].shape[1:]) for s in specs}
    grids = {s.name: s.grid(act_shape[s.name]) for s in specs}
    # per hook template: the broadcast shape covering every node type that patches it
    full_shape: dict[str, tuple[int, ...]] = {}
    for s in specs:
        shape = s.mask_shape(act_shape[s.name])
        prev = full_shape.get(s.hook, shape)
        full_shape[s.hook] = tuple(max(a, b) for a, b in zip(prev, shape))
    # Every node as (type index, layer, flat index in the layer's grid, first position its patch changes),
    # type-major (the result layout).
    table, changed = [], []
    for ti, s in enumerate(specs):
        idx = torch.arange(numel(grids[s.name]))
        for layer in range(n_layers):
            name = s.hook_name(layer)
            node_changed, start = _changed_grid(s, clean_cache[name], corrupt_cache[name])
            table.append(torch.stack([torch.full_like(idx, ti), torch.full_like(idx, layer), idx,
                                      start.flatten().cpu()], 1))
            changed.append(node_changed.flatten().cpu())
    table_t = torch.cat(table)  # [n_nodes, 4]
    active = torch.cat(changed).nonzero()[:, 0]
    n_nodes = table_t.shape[0]
    layer_pos = table_t[active][:, [1, 3]]
    if kv is None:
        layer_pos[:, 1] = 0
    if not skip_layers:
        layer_pos[:, 0] = 0
    order = active[_plan_order(layer_pos, chunk_size, n_layers, n_pos)]
    results = corrupt_metric.to("cpu")[None].repeat(n_nodes, 1)  # unchanged nodes: the corrupt run
    device = clean.device
    n_passes = 0
    with torch.no_grad():
        for start in range(0, order.numel(), chunk_size):
            progress.stage("activation patching", start / max(1, order.numel()))
            rows_out = order[start:start + chunk_size]
            chunk = table_t[rows_out]
            k = chunk.shape[0]
            first = int(chunk[:, 1].min()) if skip_layers else 0
            p0 = int(chunk[:, 3].min()) if kv is not None else 0
            masks: dict[str, torch.Tensor] = {}
            for ti, layer in torch.unique(chunk[:, :2], dim=0).tolist():
                spec = specs[ti]
                name = spec.hook_name(layer)
                rows = ((chunk[:, 0] == ti) & (chunk[:, 1] == layer)).nonzero()[:, 0]
                grid = grids[spec.name]
                onehot = torch.zeros(rows.numel(), numel(grid), dtype=torch.bool)
                onehot[torch.arange(rows.numel()), chunk[rows, 2]] = True
                shape = full_shape[spec.hook]
                node_mask = onehot.reshape(rows.numel(), *spec.mask_shape(act_shape[spec.name]))
                if name not in masks:
                    masks[name] = torch.zeros(k, *shape, dtype=torch.bool)
                masks[name][rows] |= node_mask.expand(rows.numel(), *shape)
            # every layout starts with pos: a run from p0 sees positions p0.. of masks and activations
            hooks = [(name, _patch_hook((m[:, p0:] if m.shape[1] > 1 else m).to(device), clean_cache[name][:, p0:], k))
                     for name, m in masks.items()]
            if skip_layers and (p0 > 0 or read_pos is not None):
                # run positions p0.. only (earlier keys/values from the corrupt run) and unembed only the positions
                # the metric reads; the rest keep the corrupt run's logits (unchanged before p0, unread after)
                read = read_pos[read_pos >= p0] if read_pos is not None else torch.arange(p0, n_pos, device=device)
                with bridge.hooks(fwd_hooks=hooks):
                    patched = _forward_from(bridge, first, corrupt_cache[resid_names[first]][:, p0:].repeat(k, 1, 1),
                                            _PrefixKV(kv, p0, k) if p0 > 0 else None, read - p0)
                logits = corrupt_logits.repeat(k, 1, 1)
                logits[:, read] = patched
                del patched
            elif skip_layers:
                with bridge.hooks(fwd_hooks=hooks):
                    logits = _forward_from(bridge, first, corrupt_cache[resid_names[first]].repeat(k, 1, 1))
            else:
                logits = bridge.run_with_hooks(corrupt.repeat(k, 1), fwd_hooks=hooks)
            n_passes += 1
            logits = logits.reshape(k, n_prompts, *logits.shape[1:])  # [copy, batch, pos, vocab]
            values = torch.stack([evaluate_metric(metric_fn, logits[j], n_prompts) for j in range(k)])
            results[rows_out] = values.to("cpu", torch.float64)
            del logits, values

    effects = results - corrupt_metric.to("cpu")[None]
    per_prompt: dict[str, torch.Tensor] = {}
    offset = 0
    for s in specs:
        grid = grids[s.name]
        count = n_layers * numel(grid)
        block = effects[offset:offset + count].reshape(n_layers, *grid, n_prompts)
        per_prompt[s.name] = block.movedim(-1, 0).contiguous()  # [batch, layer, *grid]
        offset += count
    progress.stage("activation patching", 1.0)
    return ActPatchTensors(node_types, per_prompt, clean_metric.cpu(), corrupt_metric.cpu(), n_passes, chunk_size,
                           n_unchanged_nodes=n_nodes - int(active.numel()))


def act_patch_result(model: Any, t: ActPatchTensors, *, normalize: bool, manifest=None) -> ActPatchResult:
    summary, factor = MetricSummary.build(t.clean_metric, t.corrupt_metric, normalize)
    effects = {n: NodeMap.from_tensor(n, ["layer", *NODE_TYPES[n].axes], v.mean(0) * factor)
               for n, v in t.per_prompt.items()}
    n_pos = next((v.shape[2] for n, v in t.per_prompt.items() if "pos" in NODE_TYPES[n].axes), -1)
    return ActPatchResult(
        role=role_of(model), node_types=t.node_types, n_prompts=int(t.clean_metric.shape[0]), n_pos=int(n_pos),
        chunk_size=t.chunk_size, n_forward_passes=t.n_forward_passes,
        n_unchanged_nodes=t.n_unchanged_nodes, metric=summary, effects=effects,
        manifest=manifest,
    )


def activation_patching(
    model: Any,
    clean_tokens: torch.Tensor,
    corrupt_tokens: torch.Tensor,
    metric_fn: MetricFn | Any,
    nodes: Iterable[str] | None = None,
    *,
    chunk_size: int | None = None,
    normalize: bool = False,
    progress: Progress | None = None,
) -> ActPatchResult:
    """Batched activation patching at every node of `nodes` (default DEFAULT_NODES) for one model.

    clean_tokens, corrupt_tokens [batch, pos]; metric_fn(logits [batch, pos, vocab]) -> [batch] (or a task
    batch). Effects are batch means of patched - corrupt, in metric units, or divided by
    mean(clean) - mean(corrupt) when `normalize`.
    """
    from analysis.results import make_manifest

    t = act_patch_tensors(model, clean_tokens, corrupt_tokens, metric_from(metric_fn), nodes,
                          chunk_size=chunk_size, progress=progress)
    manifest = None
    if hasattr(model, "manifest"):
        manifest = make_manifest("activation_patching", {role_of(model): model},
                                 options={"nodes": t.node_types, "chunk_size": t.chunk_size, "normalize": normalize})
    return act_patch_result(model, t, normalize=normalize, manifest=manifest)



