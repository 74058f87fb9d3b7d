"""Activation patching ground truth (denoising), batched: many patched nodes per forward pass.

effect(n) = mean_b [ metric_b(corrupt run with node n := its clean activation) - metric_b(corrupt run) ].

The corrupt batch [batch, pos] is tiled k times along the batch dimension (rows j*batch + b = prompt b,
copy j); copy j has node n_j patched (all its elements set to the clean activation of the same prompt)
by a hook at n_j's layer, so one forward pass measures k nodes. Nodes of different types and layers mix
freely in a chunk. Numerically this is the per-node loop of TransformerLens's patching.get_act_patch_*
(one forward per node) with k forwards fused; `chunk_size` = k bounds memory: a pass holds
k * batch rows of activations and logits (k * batch * pos * vocab floats for the logits alone).

Nothing before a node's layer changes when it is patched, so nodes are taken in layer order and a
chunk whose lowest layer is L starts from the corrupt run's cached resid_pre at L and runs only
blocks L.., ln_final and the unembedding (checked once per model to equal the full forward exactly;
otherwise every chunk runs the full forward).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from analysis.patching.atp import bridge_of, device_of, role_of
from analysis.patching.nodes import (
    NODE_TYPES,
    MetricFn,
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


@dataclass
class ActPatchTensors:
    """Per-prompt effects in raw metric units: [batch, n_layers, *grid] float64 per node type."""

    node_types: list[str]
    per_prompt: dict[str, torch.Tensor]
    clean_metric: torch.Tensor  # [batch]
    corrupt_metric: torch.Tensor  # [batch]
    n_forward_passes: int
    chunk_size: int


def _patch_hook(mask: torch.Tensor, clean_act: torch.Tensor, k: int):
    """Replace, in copy j, the elements where mask[j] is set by the clean activation.

    mask [k, *broadcast shape of one prompt's activation] bool; clean_act [batch, *act]."""

    def hook(tensor: torch.Tensor, hook: Any = None) -> torch.Tensor:
        rows = tensor.shape[0]
        act = tensor.reshape(k, rows // k, *tensor.shape[1:])  # [k, batch, *act]
        patched = torch.where(mask[:, None], clean_act[None].to(tensor.dtype), act)
        return patched.reshape(tensor.shape)

    return hook


def _suffix_forward_is_exact(bridge, tokens: torch.Tensor, resid_pre0: torch.Tensor, logits: torch.Tensor) -> bool:
    """Does running blocks 0.. on the cached resid_pre 0 reproduce the full forward's logits?"""
    verdict = getattr(bridge, "_lnscope_suffix_exact", None)
    if verdict is None:
        with torch.no_grad():
            verdict = bool(torch.equal(_forward_from(bridge, 0, resid_pre0), logits))
        if not verdict:
            logger.info("block-by-block forward differs from the full forward: patching runs full forwards")
        bridge._lnscope_suffix_exact = verdict
    return verdict


def _forward_from(bridge, layer: int, resid: torch.Tensor) -> torch.Tensor:
    """logits [rows, pos, vocab] of blocks[layer:], ln_final and the unembedding on resid [rows, pos, d_model]."""
    for block in bridge.blocks[layer:]:
        resid = block(resid)
        resid = resid[0] if isinstance(resid, tuple) else resid
    return bridge.unembed(bridge.ln_final(resid))


def act_patch_tensors(
    model: Any,
    clean_tokens: torch.Tensor,
    corrupt_tokens: torch.Tensor,
    metric_fn: MetricFn,
    nodes: Iterable[str] | None = None,
    *,
    chunk_size: int = 32,
    progress: Progress | None = None,
) -> ActPatchTensors:
    """Every node's patched metric per prompt, `chunk_size` nodes per forward pass."""
    progress = ensure(progress)
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    bridge = bridge_of(model)
    node_types = resolve_nodes(nodes)
    clean, corrupt = check_tokens(clean_tokens, corrupt_tokens, device_of(model))
    n_prompts, n_layers = clean.shape[0], int(bridge.cfg.n_layers)
    specs = [NODE_TYPES[n] for n in node_types]
    names = layer_hook_names(specs, n_layers)

    progress.stage("activation patching: clean and corrupt runs", 0.0)
    clean_logits, clean_cache = run_and_cache(bridge, clean, names)
    clean_metric = evaluate_metric(metric_fn, clean_logits, n_prompts).to(torch.float64)
    del clean_logits
    resid_names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    corrupt_logits, corrupt_resid = run_and_cache(bridge, corrupt, resid_names)
    corrupt_metric = evaluate_metric(metric_fn, corrupt_logits, n_prompts).to(torch.float64)
    skip_layers = _suffix_forward_is_exact(bridge, corrupt, corrupt_resid[resid_names[0]], corrupt_logits)
    del corrupt_logits

    # Every node as (type index, layer, flat index in the layer's grid), type-major.
    act_shape = {s.name: tuple(clean_cache[s.hook_name(0)].shape[1:]) for s in specs}
    grids = {s.name: s.grid(act_shape[s.name]) for s in specs}
    # per hook template: the broadcast shape covering every node type that patches it
    full_shape: dict[str, tuple[int, ...]] = {}
    for s in specs:
        shape = s.mask_shape(act_shape[s.name])
        prev = full_shape.get(s.hook, shape)
        full_shape[s.hook] = tuple(max(a, b) for a, b in zip(prev, shape))
    table = []
    for ti, s in enumerate(specs):
        per_layer = numel(grids[s.name])
        idx = torch.arange(per_layer)
        for layer in range(n_layers):
            table.append(torch.stack([torch.full_like(idx, ti), torch.full_like(idx, layer), idx], 1))
    table_t = torch.cat(table)  # [n_nodes, 3], type-major (the result layout)
    n_nodes = table_t.shape[0]
    order = torch.argsort(table_t[:, 1], stable=True)  # layer order: chunks start as late as they can
    results = torch.empty(n_nodes, n_prompts, dtype=torch.float64)
    device = clean.device
    n_passes = 0
    with torch.no_grad():
        for start in range(0, n_nodes, chunk_size):
            progress.stage("activation patching", start / n_nodes)
            rows_out = order[start:start + chunk_size]
            chunk = table_t[rows_out]
            k = chunk.shape[0]
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
            hooks = [(name, _patch_hook(m.to(device), clean_cache[name], k)) for name, m in masks.items()]
            if skip_layers:
                first = int(chunk[:, 1].min())
                with bridge.hooks(fwd_hooks=hooks):
                    logits = _forward_from(bridge, first, corrupt_resid[resid_names[first]].repeat(k, 1, 1))
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
    return ActPatchTensors(node_types, per_prompt, clean_metric.cpu(), corrupt_metric.cpu(), n_passes, chunk_size)


def act_patch_result(model: Any, t: ActPatchTensors, *, normalize: bool, manifest=None) -> ActPatchResult:
    summary, factor = MetricSummary.build(t.clean_metric, t.corrupt_metric, normalize)
    effects = {n: NodeMap.from_tensor(n, ["layer", *NODE_TYPES[n].axes], v.mean(0) * factor)
               for n, v in t.per_prompt.items()}
    n_pos = next((v.shape[2] for n, v in t.per_prompt.items() if "pos" in NODE_TYPES[n].axes), -1)
    return ActPatchResult(
        role=role_of(model), node_types=t.node_types, n_prompts=int(t.clean_metric.shape[0]), n_pos=int(n_pos),
        chunk_size=t.chunk_size, n_forward_passes=t.n_forward_passes, metric=summary, effects=effects,
        manifest=manifest,
    )


def activation_patching(
    model: Any,
    clean_tokens: torch.Tensor,
    corrupt_tokens: torch.Tensor,
    metric_fn: MetricFn | Any,
    nodes: Iterable[str] | None = None,
    *,
    chunk_size: int = 32,
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
                                 options={"nodes": t.node_types, "chunk_size": chunk_size, "normalize": normalize})
    return act_patch_result(model, t, normalize=normalize, manifest=manifest)



