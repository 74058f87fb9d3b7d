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
- Read logits only. The last block's MLP, ln_final and the unembedding run only at the positions the
  metric reads, and the unembedding only for the vocabulary entries it reads when they are few (a logit
  difference reads two per prompt); both are found from the metric's gradient and confirmed by perturbing
  every other logit. The metric is handed the corrupt run's logits wherever it never reads.
The metric must not modify the logits it is given (one buffer of them is reused across copies and chunks).
The layer and position shortcuts are checked once per model, and the read-only tail once per call, to
reproduce the full forward to float rounding (a few ulps of the largest logit); the tests hold every
shortcut to TransformerLens's sweeps and to full forwards.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from lnscope.analysis.patching.atp import bridge_of, device_of, role_of
from lnscope.analysis.patching.nodes import (
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
from lnscope.analysis.patching.results import ActPatchResult, MetricSummary, NodeMap
from lnscope.analysis.progress import Progress, ensure

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
    shortcuts: list[str] = field(default_factory=list)


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
                  read: torch.Tensor | None = None, unembed: _SubUnembed | None = None,
                  last_mlp_read_only: bool = False) -> torch.Tensor:
    """logits [rows, pos', vocab] of blocks[layer:], ln_final and the unembedding on resid [rows, pos', d_model].

    With `prefix`, the positions of resid come after the prefix's cached ones in every layer. With `read`
    (indices into pos'), only those positions go through ln_final and the unembedding: [rows, len(read), vocab],
    and with `last_mlp_read_only` through the last block's MLP too (nothing reads its other positions). With
    `unembed`, only its vocabulary entries are computed: [rows, len(read), len(unembed.vocab)]."""
    # TransformerLens's attention bridge takes the cache as `past_key_values` or `layer_past`; transformers 5.24's
    # GPT2Block renames `past_key_values` to `cache` on its way to the attention, but passes `layer_past` through
    kwargs = {} if prefix is None else {"layer_past": prefix}
    blocks = bridge.blocks[layer:]
    for i, block in enumerate(blocks):
        only = read if last_mlp_read_only and read is not None and i == len(blocks) - 1 else None
        with _mlp_only_at(block.mlp, only):
            resid = block(resid, **kwargs)
        resid = resid[0] if isinstance(resid, tuple) else resid
    if read is not None:
        resid = resid[:, read]
    resid = bridge.ln_final(resid)
    return bridge.unembed(resid) if unembed is None else unembed(resid)


@contextmanager
def _mlp_only_at(mlp: torch.nn.Module, index: torch.Tensor | None):
    """Within the block: `mlp` runs only at positions `index` (dim 1) of its input; its output is 0 elsewhere.

    Hooks inside the MLP see [rows, len(index), ...] meanwhile. index None: the MLP as it is."""
    if index is None:
        yield
        return
    full_shape: list[torch.Size] = []

    def before(module: Any, args: tuple) -> tuple:
        full_shape.append(args[0].shape)
        return (args[0][:, index], *args[1:])

    def after(module: Any, args: tuple, out: torch.Tensor) -> torch.Tensor:
        rows, n_pos = full_shape.pop()[:2]
        padded = out.new_zeros(rows, n_pos, *out.shape[2:])
        padded[:, index] = out
        return padded

    # `before` runs after any pre-hooks already there, and `after` before any forward hooks (prepend): hooks the
    # bridge itself keeps on the MLP (a block-level hook_mlp_out, in some architectures) see full-length tensors
    handles = [mlp.register_forward_pre_hook(before), mlp.register_forward_hook(after, prepend=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _SubUnembed:
    """The unembedding restricted to vocabulary ids `vocab` [m]: x @ W_U[:, vocab] + b_U[vocab]."""

    def __init__(self, bridge, vocab: torch.Tensor) -> None:
        linear = getattr(bridge.unembed, "original_component", None)
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"the unembedding is a {type(linear).__name__}, not a Linear")
        self.vocab = vocab
        self.weight = linear.weight[vocab]  # [m, d_model]
        self.bias = None if linear.bias is None else linear.bias[vocab]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@dataclass(frozen=True)
class _Reads:
    """The logits a metric reads: positions [n] (sorted) and, if it reads few, vocabulary ids [m] (None: all)."""

    pos: torch.Tensor
    vocab: torch.Tensor | None = None

    def index(self, pos: torch.Tensor | None = None) -> tuple:
        """Index of these entries in logits [rows, pos, vocab] (positions `pos` if given)."""
        pos = self.pos if pos is None else pos
        return (slice(None), pos) if self.vocab is None else (slice(None), pos[:, None], self.vocab)


# The vocabulary is restricted only when the metric reads at most this fraction of it.
_VOCAB_READ_MAX_FRACTION = 0.25


def _metric_reads(metric_fn: MetricFn, logits: torch.Tensor, n_prompts: int) -> _Reads | None:
    """The logits the metric reads, or None (all of them, or unknown).

    Found where the metric's gradient w.r.t. the corrupt run's logits is non-zero (in any prompt): the
    positions, and the vocabulary ids if they are few (a logit difference reads two per prompt). Then
    confirmed: noise at every other entry must leave the metric bit-for-bit unchanged; if it does not, the
    positions alone are tried the same way. A metric that cannot be differentiated, or that reads
    everything, gets None."""
    probe = logits.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(evaluate_metric(metric_fn, probe, n_prompts).sum(), probe, allow_unused=True)
    except (RuntimeError, TypeError):
        return None
    if grad is None:
        return None
    read = grad.abs().amax(dim=(0, 2)) > 0  # [pos]
    if not read.any():
        return None
    pos = read.nonzero()[:, 0]
    vocab_read = grad[:, pos].abs().amax(dim=(0, 1)) > 0  # [vocab]
    candidates = []
    if int(vocab_read.sum()) <= _VOCAB_READ_MAX_FRACTION * logits.shape[-1]:
        candidates.append(_Reads(pos, vocab_read.nonzero()[:, 0]))
    if not read.all():
        candidates.append(_Reads(pos))
    with torch.no_grad():
        reference = evaluate_metric(metric_fn, logits, n_prompts)
        scale = 10 * max(1.0, float(logits.abs().max()))  # noise well beyond the logits' own range, both signs
        for reads in candidates:
            gen = torch.Generator(device=logits.device).manual_seed(0)
            noisy = scale * torch.randn(logits.shape, generator=gen, device=logits.device, dtype=logits.dtype)
            noisy[reads.index()] = logits[reads.index()]
            if torch.equal(evaluate_metric(metric_fn, noisy, n_prompts), reference):
                return reads
    return None


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


def _read_only_tail(bridge, reads: _Reads | None, resid_last: torch.Tensor, corrupt_logits: torch.Tensor,
                    names: list[str]) -> tuple[_Reads | None, _SubUnembed | None, frozenset[str] | None]:
    """(reads, the unembedding restricted to the read vocabulary, the node hooks inside the last block's MLP).

    The last block's MLP and the unembedding may run only on what the metric reads if, on the corrupt run's
    resid_pre of the last layer, that reproduces the corrupt logits there to float rounding. If not, both run
    in full (None, None), and reads drop their vocabulary restriction."""
    if reads is None:
        return None, None, None
    last_mlp = bridge.blocks[len(bridge.blocks) - 1].mlp
    inside = {id(m) for m in last_mlp.modules()}
    mlp_hooks = frozenset(n for n in names if id(bridge.hook_dict.get(n)) in inside)
    try:
        unembed = _SubUnembed(bridge, reads.vocab) if reads.vocab is not None else None
        with torch.no_grad():
            logits = _forward_from(bridge, len(bridge.blocks) - 1, resid_last, None, reads.pos, unembed,
                                   last_mlp_read_only=True)
        ok = _matches(logits, corrupt_logits[reads.index()])
    except Exception as exc:  # an MLP or unembedding that cannot be run in part
        logger.info("the last MLP and the unembedding cannot run on the read logits only (%s)", exc)
        ok = False
    if ok:
        return reads, unembed, mlp_hooks
    logger.info("the last MLP and the unembedding run in full")
    positions_only = _Reads(reads.pos) if reads.pos.numel() < corrupt_logits.shape[1] else None
    return positions_only, None, None


def _on(index: torch.Tensor | slice, tensor: torch.Tensor) -> torch.Tensor | slice:
    """`index` on tensor's device (a slice as it is)."""
    return index.to(tensor.device) if isinstance(index, torch.Tensor) else index


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
    reads = _metric_reads(metric_fn, corrupt_logits, n_prompts) if skip_layers else None
    reads, unembed, mlp_hooks = _read_only_tail(bridge, reads, corrupt_cache[resid_names[-1]], corrupt_logits, names)

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
    # runs from a later position fill in only the positions they unembed, in a copy of the corrupt logits
    # (not one [k*batch, pos, vocab] copy per chunk: 400 MB at GPT-2's vocabulary and chunk 8)
    logits_buf = corrupt_logits.clone() if skip_layers and (kv is not None or reads is not None) else None
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
            fast = skip_layers and (p0 > 0 or reads is not None)
            read = None
            if fast:
                read = reads.pos[reads.pos >= p0] if reads is not None else torch.arange(p0, n_pos, device=device)
            if fast and read.numel() == 0:  # every patch in the chunk starts after the last position read
                values = corrupt_metric[None].repeat(k, 1)
            elif fast:
                # run positions p0.. only (earlier keys/values from the corrupt run) and unembed only the entries
                # the metric reads; the rest keep the corrupt run's logits (unchanged before p0, unread after)
                # every layout starts with pos: a run from p0 sees positions p0.. of masks and activations, and
                # the last block's MLP (when restricted to the read positions) sees those
                at = {name: read if mlp_hooks is not None and name in mlp_hooks else slice(p0, None) for name in masks}
                hooks = [(name, _patch_hook((m[:, _on(at[name], m)] if m.shape[1] > 1 else m).to(device),
                                            clean_cache[name][:, at[name]], k)) for name, m in masks.items()]
                with bridge.hooks(fwd_hooks=hooks):
                    patched = _forward_from(bridge, first, corrupt_cache[resid_names[first]][:, p0:].repeat(k, 1, 1),
                                            _PrefixKV(kv, p0, k) if p0 > 0 else None, read - p0, unembed,
                                            last_mlp_read_only=mlp_hooks is not None)
                n_passes += 1
                patched = patched.reshape(k, n_prompts, *patched.shape[1:])  # [copy, batch, read, vocab]
                per_copy = []
                index = reads.index(read) if reads is not None else (slice(None), read)
                for j in range(k):  # one corrupt-logits buffer, its read entries overwritten per copy
                    logits_buf[index] = patched[j]
                    per_copy.append(evaluate_metric(metric_fn, logits_buf, n_prompts).clone())  # not a buffer view
                logits_buf[index] = corrupt_logits[index]
                values = torch.stack(per_copy)
                del patched, per_copy
            else:
                hooks = [(name, _patch_hook(m.to(device), clean_cache[name], k)) for name, m in masks.items()]
                if skip_layers:
                    with bridge.hooks(fwd_hooks=hooks):
                        logits = _forward_from(bridge, first, corrupt_cache[resid_names[first]].repeat(k, 1, 1))
                else:
                    logits = bridge.run_with_hooks(corrupt.repeat(k, 1), fwd_hooks=hooks)
                n_passes += 1
                logits = logits.reshape(k, n_prompts, *logits.shape[1:])  # [copy, batch, pos, vocab]
                values = torch.stack([evaluate_metric(metric_fn, logits[j], n_prompts) for j in range(k)])
                del logits
            results[rows_out] = values.to("cpu", torch.float64)

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
    taken = {"later_layers": skip_layers, "later_positions": kv is not None, "read_positions": reads is not None,
             "read_vocab": unembed is not None, "last_mlp_read_only": mlp_hooks is not None}
    return ActPatchTensors(node_types, per_prompt, clean_metric.cpu(), corrupt_metric.cpu(), n_passes, chunk_size,
                           n_unchanged_nodes=n_nodes - int(active.numel()), shortcuts=[name for name, on in taken.items() if on])


def act_patch_result(model: Any, t: ActPatchTensors, *, normalize: bool, manifest=None) -> ActPatchResult:
    summary, factor = MetricSummary.build(t.clean_metric, t.corrupt_metric, normalize)
    effects = {n: NodeMap.from_tensor(n, ["layer", *NODE_TYPES[n].axes], v.mean(0) * factor)
               for n, v in t.per_prompt.items()}
    n_pos = next((v.shape[2] for n, v in t.per_prompt.items() if "pos" in NODE_TYPES[n].axes), -1)
    return ActPatchResult(
        role=role_of(model), node_types=t.node_types, n_prompts=int(t.clean_metric.shape[0]), n_pos=int(n_pos),
        chunk_size=t.chunk_size, n_forward_passes=t.n_forward_passes,
        n_unchanged_nodes=t.n_unchanged_nodes, shortcuts=t.shortcuts, metric=summary, effects=effects,
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
    from lnscope.analysis.results import make_manifest

    t = act_patch_tensors(model, clean_tokens, corrupt_tokens, metric_from(metric_fn), nodes,
                          chunk_size=chunk_size, progress=progress)
    manifest = None
    if hasattr(model, "manifest"):
        manifest = make_manifest("activation_patching", {role_of(model): model},
                                 options={"nodes": t.node_types, "chunk_size": t.chunk_size, "normalize": normalize})
    return act_patch_result(model, t, normalize=normalize, manifest=manifest)



