"""Patching nodes: which hook each node type lives at, its index grid, and the shared plumbing.

A node type is a hook (one per layer) plus the axes that index one node inside that hook's
per-prompt activation. Activation layouts (batch dimension dropped):
    resid   [pos, d_model]          hook_resid_pre, hook_mlp_out
    head    [pos, head, d_head]     attn.hook_z, attn.hook_q, attn.hook_k, attn.hook_v
    neuron  [pos, d_mlp]            mlp.hook_post
A node covers every activation element whose coordinates on its axes match and all elements on
the other dimensions (e.g. `head` = one head at every position, `resid_pre` = one position's whole
residual vector). So the node's patch mask has the layout's size on its axes and 1 elsewhere, and
the AtP contraction grad . delta sums over exactly the dimensions where that mask has size 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

# metric_fn(logits [batch, pos, vocab]) -> [batch]: one scalar per prompt, differentiable.
MetricFn = Callable[[torch.Tensor], torch.Tensor]

LAYOUTS: dict[str, tuple[str, ...]] = {
    "resid": ("pos", "d_model"),
    "head": ("pos", "head", "d_head"),
    "neuron": ("pos", "neuron"),
}


@dataclass(frozen=True)
class NodeSpec:
    """One node type: `hook` (formatted with the layer) and the `axes` that index a node in a layer."""

    name: str
    hook: str
    layout: str
    axes: tuple[str, ...]
    description: str

    def hook_name(self, layer: int) -> str:
        return self.hook.format(layer=layer)

    def grid(self, act_shape: Sequence[int]) -> tuple[int, ...]:
        """Node grid inside one layer, from the per-prompt activation shape (layout order)."""
        dims = dict(zip(LAYOUTS[self.layout], act_shape))
        return tuple(int(dims[a]) for a in self.axes)

    def mask_shape(self, act_shape: Sequence[int]) -> tuple[int, ...]:
        """Broadcastable per-prompt mask shape: the layout's size on the node axes, 1 elsewhere."""
        return tuple(int(s) if d in self.axes else 1 for d, s in zip(LAYOUTS[self.layout], act_shape))

    def reduce_dims(self) -> tuple[int, ...]:
        """Dimensions of a [batch, *layout] tensor that one node sums over."""
        return tuple(i + 1 for i, d in enumerate(LAYOUTS[self.layout]) if d not in self.axes)


NODE_TYPES: dict[str, NodeSpec] = {
    spec.name: spec
    for spec in [
        NodeSpec("resid_pre", "blocks.{layer}.hook_resid_pre", "resid", ("pos",),
                 "residual stream entering block L at one position"),
        NodeSpec("head", "blocks.{layer}.attn.hook_z", "head", ("head",),
                 "one attention head's output z (hence z W_O), all positions"),
        NodeSpec("head_pos", "blocks.{layer}.attn.hook_z", "head", ("pos", "head"),
                 "one attention head's output z at one (query) position"),
        NodeSpec("head_q", "blocks.{layer}.attn.hook_q", "head", ("head",), "one head's queries, all positions"),
        NodeSpec("head_k", "blocks.{layer}.attn.hook_k", "head", ("head",), "one head's keys, all positions"),
        NodeSpec("head_v", "blocks.{layer}.attn.hook_v", "head", ("head",), "one head's values, all positions"),
        NodeSpec("head_q_pos", "blocks.{layer}.attn.hook_q", "head", ("pos", "head"),
                 "one head's query at one position"),
        NodeSpec("head_k_pos", "blocks.{layer}.attn.hook_k", "head", ("pos", "head"), "one head's key at one position"),
        NodeSpec("head_v_pos", "blocks.{layer}.attn.hook_v", "head", ("pos", "head"),
                 "one head's value at one position"),
        NodeSpec("mlp", "blocks.{layer}.hook_mlp_out", "resid", ("pos",), "one MLP's output at one position"),
        NodeSpec("neuron", "blocks.{layer}.mlp.hook_post", "neuron", ("neuron",),
                 "one MLP neuron's activation (times its W_out row), all positions"),
        NodeSpec("neuron_pos", "blocks.{layer}.mlp.hook_post", "neuron", ("pos", "neuron"),
                 "one MLP neuron's activation at one position"),
    ]
}

# The default sweep: everything except the per-position q/k/v and neuron nodes (large grids).
DEFAULT_NODES: tuple[str, ...] = ("resid_pre", "head", "head_pos", "head_q", "head_k", "head_v", "mlp", "neuron")
# Node types for which AtP* (the QK fix) differs from AtP.
QK_FIX_NODES: tuple[str, ...] = ("head", "head_q", "head_k", "head_q_pos", "head_k_pos")


def resolve_nodes(nodes: Iterable[str] | str | None) -> list[str]:
    if nodes is None:
        return list(DEFAULT_NODES)
    if isinstance(nodes, str):
        nodes = [nodes]
    out = list(dict.fromkeys(nodes))
    unknown = [n for n in out if n not in NODE_TYPES]
    if unknown or not out:
        raise ValueError(f"unknown node types {unknown}; choose from {list(NODE_TYPES)}")
    return out


def check_tokens(clean: Any, corrupt: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """clean, corrupt [batch, pos] int64 on `device`, same shape."""
    clean = torch.as_tensor(clean).long()
    corrupt = torch.as_tensor(corrupt).long()
    if clean.ndim == 1 and corrupt.ndim == 1:  # one prompt
        clean, corrupt = clean[None], corrupt[None]
    if clean.ndim != 2 or clean.shape != corrupt.shape:
        raise ValueError(
            f"clean and corrupt tokens must both be [batch, pos] with the same shape, got "
            f"{tuple(clean.shape)} and {tuple(corrupt.shape)}"
        )
    if clean.shape[0] == 0 or clean.shape[1] == 0:
        raise ValueError("no prompts (or zero-length prompts) to patch")
    return clean.to(device), corrupt.to(device)


def evaluate_metric(metric_fn: MetricFn, logits: torch.Tensor, n_prompts: int) -> torch.Tensor:
    """metric_fn(logits [batch, pos, vocab]) checked to be [batch] (a scalar is accepted for batch 1)."""
    out = metric_fn(logits)
    out = torch.as_tensor(out)
    if out.ndim == 0 and n_prompts == 1:
        out = out[None]
    if out.shape != (n_prompts,):
        raise ValueError(f"metric_fn must return one value per prompt, shape ({n_prompts},), got {tuple(out.shape)}")
    return out


def metric_from(task_or_fn: Any) -> MetricFn:
    """A task batch's `.metric` or a plain callable."""
    if callable(task_or_fn) and not hasattr(task_or_fn, "clean_tokens"):
        return task_or_fn
    metric = getattr(task_or_fn, "metric", None)
    if metric is None or not callable(metric):
        raise TypeError("metric must be a callable logits [batch, pos, vocab] -> [batch] or a task batch")
    return metric


def layer_hook_names(specs: Sequence[NodeSpec], n_layers: int) -> list[str]:
    return list(dict.fromkeys(spec.hook_name(layer) for spec in specs for layer in range(n_layers)))


def run_and_cache(bridge, tokens: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass, no gradients: logits [batch, pos, vocab] and the detached activations at `names`."""
    cache: dict[str, torch.Tensor] = {}

    def make(name: str):
        def hook(tensor: torch.Tensor, hook: Any = None) -> None:
            cache[name] = tensor.detach()

        return hook

    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=[(n, make(n)) for n in names])
    missing = [n for n in names if n not in cache]
    if missing:
        raise RuntimeError(f"hooks did not fire: {missing}")
    return logits, cache


def axis_labels(axes: Sequence[str], shape: Sequence[int]) -> dict[str, list[str]]:
    prefix = {"layer": "L", "pos": "P", "head": "H", "neuron": "N"}
    return {a: [f"{prefix.get(a, a)}{i}" for i in range(n)] for a, n in zip(axes, shape)}


def numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape))
